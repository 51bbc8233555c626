"""Fault injection: a TCP proxy between datasetd and its dependencies, and the tests built on it."""
