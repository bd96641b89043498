"""Alembic's environment and the store's schema versions (shipped inside the package)."""
