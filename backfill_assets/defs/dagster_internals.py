"""Every private Dagster import of the project, fenced in one adapter module.

Dagster's minor version is pinned in pyproject.toml; the tests exercise each of these names
through real runs, so an upgrade that moves one fails here, in one place.
"""

from dagster._cli.api import _execute_run_command_body as execute_run_command_body
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.definitions.data_version import (
    CachingStaleStatusResolver,
    StaleCause,
    StaleCauseCategory,
    StaleStatus,
)
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.execution.backfill import (
    BULK_ACTION_TERMINAL_STATUSES,
    BulkActionsFilter,
    BulkActionStatus,
    PartitionBackfill,
)
from dagster._core.execution.retries import RetryMode, auto_reexecution_should_retry_run
from dagster._core.instance.ref import InstanceRef
from dagster._core.launcher.base import CheckRunHealthResult, LaunchRunContext, WorkerStatus
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.event_log.schema import (
    AssetCheckExecutionsTable,
    SqlEventLogStorageTable,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    BACKFILL_ID_TAG,
    GRPC_INFO_TAG,
    PARENT_BACKFILL_ID_TAG,
    PARTITION_NAME_TAG,
    ROOT_BACKFILL_ID_TAG,
    USER_TAG,
    WILL_RETRY_TAG,
)
from dagster._core.utils import make_new_backfill_id
from dagster._core.workspace.load_target import WorkspaceFileTarget
from dagster._core.workspace.workspace import CodeLocationLoadStatus
from dagster._daemon.auto_run_reexecution.auto_run_reexecution import (
    consume_new_runs_for_automatic_reexecution,
)
from dagster._daemon.auto_run_reexecution.event_log_consumer import EventLogConsumerDaemon
from dagster._daemon.backfill import execute_backfill_iteration
from dagster._daemon.controller import (
    DEFAULT_DAEMON_INTERVAL_SECONDS,
    create_daemon_of_type,
    daemon_controller_from_instance,
)
from dagster._daemon.daemon import BackfillDaemon, SpanMarker
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
    QueuedRunCoordinatorDaemon,
)
from dagster._daemon.utils import DaemonErrorCapture
from dagster._serdes import ConfigurableClassData
from dagster._time import get_current_datetime, get_current_timestamp
from dagster._utils import get_run_crash_explanation
from dagster._utils.error import SerializableErrorInfo
from dagster._utils.interrupts import capture_interrupts, setup_interrupt_handlers


def stale_status_resolver(instance, asset_graph) -> CachingStaleStatusResolver:
    """What the UI asks for a partition's "Unsynced" badge: Dagster's stale status resolver, as
    of now (its constructor's arguments changed across minor versions)."""
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=asset_graph,
    )
    return CachingStaleStatusResolver(instance, asset_graph=asset_graph, loading_context=view)


__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "BACKFILL_ID_TAG",
    "BULK_ACTION_TERMINAL_STATUSES",
    "DEFAULT_DAEMON_INTERVAL_SECONDS",
    "GRPC_INFO_TAG",
    "PARENT_BACKFILL_ID_TAG",
    "PARTITION_NAME_TAG",
    "ROOT_BACKFILL_ID_TAG",
    "USER_TAG",
    "WILL_RETRY_TAG",
    "AssetCheckEvaluationTargetMaterializationData",
    "AssetCheckExecutionRecordStatus",
    "AssetCheckExecutionsTable",
    "AssetGraphSubset",
    "AssetKeyPartitionKey",
    "BackfillDaemon",
    "BulkActionStatus",
    "BulkActionsFilter",
    "CheckRunHealthResult",
    "ConfigurableClassData",
    "DaemonErrorCapture",
    "DagsterExecutionInterruptedError",
    "EventLogConsumerDaemon",
    "InstanceRef",
    "LaunchRunContext",
    "PartitionBackfill",
    "PartitionKeyFilter",
    "QueuedRunCoordinatorDaemon",
    "RetryMode",
    "SerializableErrorInfo",
    "SpanMarker",
    "SqlEventLogStorageTable",
    "StaleCause",
    "StaleCauseCategory",
    "StaleStatus",
    "WorkerStatus",
    "WorkspaceFileTarget",
    "auto_reexecution_should_retry_run",
    "capture_interrupts",
    "consume_new_runs_for_automatic_reexecution",
    "create_daemon_of_type",
    "daemon_controller_from_instance",
    "execute_backfill_iteration",
    "execute_run_command_body",
    "get_current_timestamp",
    "get_run_crash_explanation",
    "make_new_backfill_id",
    "setup_interrupt_handlers",
    "stale_status_resolver",
]


def code_location_asset_keys(workspace_process_context) -> set[str] | None:
    """The asset keys (``a/b``) of every code location a daemon's workspace has loaded (one
    that failed to load holds none); None while one is still loading. Read from its request
    context's entries and their repositories' asset node snapshots (private API)."""
    context = workspace_process_context.create_request_context()
    keys: set[str] = set()
    for entry in context.get_code_location_entries().values():
        if entry.load_status == CodeLocationLoadStatus.LOADING:
            return None
        if entry.code_location is None:  # failed to load: it holds no asset
            continue
        for repository in entry.code_location.get_repositories().values():
            keys |= {node.asset_key.to_user_string() for node in repository.get_asset_node_snaps()}
    return keys
