"""The `datasetd` command-line tool."""
