"""alkey.transports (being written)."""
