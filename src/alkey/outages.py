"""alkey.outages (being written)."""
