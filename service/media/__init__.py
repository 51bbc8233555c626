"""Reading what media are from their bytes: the adapter behind the domain's MediaProber port.

`probe` holds the entry points; the other modules each parse one container family.
"""
