"""alkey.scripts (being written)."""
