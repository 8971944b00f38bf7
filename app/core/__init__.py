"""The torch-free core that the API, the workers, the models and Alembic share: the catalogue of norms
and architectures, the fixed-budget arithmetic, the run states and the canonical dataset format."""
