"""The database core: partition windows, the one writer, guards, reconciliation, fingerprints,
snapshots, rollback, audit and the table registry. Nothing here imports Dagster."""
