"""alkey.observers (being written)."""
