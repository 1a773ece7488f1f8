"""Alembic migrations, applied programmatically when a store is opened."""
