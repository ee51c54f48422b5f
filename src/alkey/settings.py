"""alkey.settings (being written)."""
