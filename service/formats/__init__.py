"""Serialized forms of dataset versions: their content (snapshot), and the archives they
are exported as and imported from (one package per format)."""
