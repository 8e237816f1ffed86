"""chemfit."""
