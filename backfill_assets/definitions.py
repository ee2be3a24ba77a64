"""The code location Dagster loads (``workspace.yaml``): the declared tables, as assets and jobs.

Tables are read from ``tables/`` (or ``BACKFILL_TABLES_PATH``); see ``defs/definitions.py``.
"""

from backfill_assets.core.registry import load_registry
from backfill_assets.defs.definitions import build_definitions

defs = build_definitions(load_registry())
