"""Scripts each benchmark runs in its own process (some in a peer's virtualenv)."""
