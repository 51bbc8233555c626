"""Outbound HTTP: the service's own requests to hosts a caller names."""
