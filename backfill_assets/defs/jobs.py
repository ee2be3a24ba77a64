"""A backfill job per declared table, and one per table plus everything built from it.

Named ``backfill__<schema>__<table>`` and ``backfill__<schema>__<table>__with_downstream``
(``dagster job backfill -j ...``; ``backfill-assets tables`` lists them). A job of partitioned
assets needs one partitions definition, so "downstream" means the downstream assets that share the
table's partitions.
"""

from collections.abc import Sequence

from dagster import AssetsDefinition, AssetSelection, define_asset_job

from backfill_assets.core.tables import TableSpec
from backfill_assets.defs.partitions import partitions_def
from backfill_assets.defs.table_assets import asset_key
from backfill_assets.project import job_name


def table_jobs(table: TableSpec, assets: Sequence[AssetsDefinition]) -> list:
    key = asset_key(table)
    definition = partitions_def(table.partitioning)
    same_partitions = [k for a in assets if a.partitions_def == definition for k in a.keys]
    return [
        define_asset_job(
            job_name(table),
            selection=AssetSelection.assets(key),
            description=f"Rebuild the selected partitions of {table.qualified_name}.",
        ),
        define_asset_job(
            job_name(table, with_downstream=True),
            selection=AssetSelection.assets(key).downstream()
            & AssetSelection.assets(*same_partitions),
            description=(
                f"Rebuild the selected partitions of {table.qualified_name} and everything "
                "built from it."
            ),
        ),
    ]
