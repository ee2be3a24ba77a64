"""Local tooling: the ``backfill-assets`` CLI, the demo, the embedded PostgreSQL, launching."""
