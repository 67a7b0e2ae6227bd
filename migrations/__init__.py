"""The database's Alembic migrations, shipped in the package so an installed hybridnas finds them
(`search.storage.schema.MIGRATIONS_DIR`, through `importlib.resources`)."""
