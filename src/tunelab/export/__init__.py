"""`tunelab export`: trained runs to portable formats, with parity checks (never imports train)."""
