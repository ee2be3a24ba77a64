"""The code location: every asset, check, job and resource, assembled in one place."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job

from backfill_assets.defs.dbt import dbt_models, dbt_resource
from backfill_assets.defs.partitioned_tables import APP_CUSTOMERS, APP_ORDERS, fct_orders
from backfill_assets.defs.rollback import rollback_backfill
from backfill_assets.resources import PostgresResource

daily_backfill = define_asset_job(
    "daily_backfill",
    selection=AssetSelection.assets(fct_orders).downstream(),
    description="Rebuild the selected days of fct_orders and everything built from it.",
)

defs = Definitions(
    assets=[APP_ORDERS, APP_CUSTOMERS, fct_orders, dbt_models],
    jobs=[daily_backfill, rollback_backfill],
    resources={"postgres": PostgresResource(), "dbt": dbt_resource},
)
