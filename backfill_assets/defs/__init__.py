"""Dagster definitions, one module per kind of asset, assembled in ``definitions.py``."""

import warnings

from dagster import BetaWarning, PreviewWarning

# Both chosen on purpose, with Dagster's minor version pinned: partitioned check specs (preview)
# give per-partition check results, backfill policies (beta) batch partitions per run.
warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)
