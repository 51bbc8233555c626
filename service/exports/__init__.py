"""Serialized forms of dataset versions: their content, and the archives they are exported
as and imported from."""
