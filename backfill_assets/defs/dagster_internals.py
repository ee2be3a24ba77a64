"""Every private Dagster import of the project, fenced in one adapter module.

Dagster's minor version is pinned in pyproject.toml; the tests exercise each of these names
through real runs, so an upgrade that moves one fails here, in one place.
"""

from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.execution.backfill import (
    BULK_ACTION_TERMINAL_STATUSES,
    BulkActionStatus,
    PartitionBackfill,
)
from dagster._core.execution.retries import auto_reexecution_should_retry_run
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.tags import (
    BACKFILL_ID_TAG,
    GRPC_INFO_TAG,
    PARENT_BACKFILL_ID_TAG,
    ROOT_BACKFILL_ID_TAG,
    WILL_RETRY_TAG,
)
from dagster._core.utils import make_new_backfill_id
from dagster._serdes import ConfigurableClassData
from dagster._time import get_current_timestamp

__all__ = [
    "BACKFILL_ID_TAG",
    "BULK_ACTION_TERMINAL_STATUSES",
    "GRPC_INFO_TAG",
    "PARENT_BACKFILL_ID_TAG",
    "ROOT_BACKFILL_ID_TAG",
    "WILL_RETRY_TAG",
    "AssetCheckEvaluationTargetMaterializationData",
    "AssetCheckExecutionRecordStatus",
    "BulkActionStatus",
    "CheckRunHealthResult",
    "ConfigurableClassData",
    "PartitionBackfill",
    "PartitionKeyFilter",
    "WorkerStatus",
    "auto_reexecution_should_retry_run",
    "get_current_timestamp",
    "make_new_backfill_id",
]
