"""Serialized forms of dataset versions: their content and, later, export archives."""
