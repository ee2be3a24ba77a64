"""A stray `dagster job backfill` does not rewrite a year: a job backfill of every partition of its
job, or of more than BACKFILL_MAX_PARTITIONS, is refused before anything is queued, unless tagged
``backfill_assets/full_rebuild=true``. The refusal is the run coordinator's
(``defs/run_coordinator.py``), so it holds for Dagster's stock CLI."""

from __future__ import annotations

import json
import shutil

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from support import dagster_job_backfill, launched_job_backfill

from backfill_assets.core.registry import DEFAULT_TABLES_DIR, TABLES_PATH_ENV
from backfill_assets.core.settings import MAX_PARTITIONS_ENV
from backfill_assets.defs.run_coordinator import refusal
from backfill_assets.tooling import cli

JOB = "backfill__analytics__fct_orders"
OVERRIDE = json.dumps({"backfill_assets/full_rebuild": "true"})
YEAR = [f"2024-{month:02d}-01" for month in range(1, 13)]


def job_runs(*statuses: DagsterRunStatus):
    with DagsterInstance.get() as instance:
        return instance.get_runs(filters=RunsFilter(job_name=JOB, statuses=list(statuses)))


def test_an_empty_partition_list_queues_no_run_and_says_why_and_how_to_override(
    dagster_env, capsys, monkeypatch, tmp_path
):
    # The demo's table declared over its last 12 days: Dagster's CLI creates every run of the
    # backfill before the coordinator refuses them (366 of them took minutes), the rule is the same.
    tables = tmp_path / "tables"
    shutil.copytree(DEFAULT_TABLES_DIR, tables)
    declaration = tables / "fct_orders.yaml"
    declaration.write_text(
        declaration.read_text().replace("start: 2024-01-01", "start: 2024-12-20")
    )
    monkeypatch.setenv(TABLES_PATH_ENV, str(tables))
    refused = dagster_job_backfill(
        {**dagster_env, TABLES_PATH_ENV: str(tables)}, JOB, "--partitions", ""
    )

    assert refused.returncode == 1
    assert "refused: it selects all 12 partitions of backfill__analytics__fct_orders" in (
        refused.stderr
    )
    assert f"--tags '{OVERRIDE}'" in refused.stderr and "Traceback" not in refused.stderr
    live = (DagsterRunStatus.QUEUED, DagsterRunStatus.STARTED, DagsterRunStatus.SUCCESS)
    assert job_runs(*live) == []
    assert job_runs(DagsterRunStatus.NOT_STARTED) == []
    with DagsterInstance.get() as instance:
        (backfill,) = instance.get_backfills()
    assert backfill.status.value == "CANCELED"
    assert cli.main(["status", backfill.backfill_id]) == 1
    out = capsys.readouterr().out
    stopped = f"the backfill was stopped: backfill {backfill.backfill_id} refused: it selects all"
    assert stopped in out
    assert "status: finished (Dagster: CANCELED)" in out


def test_a_job_backfill_over_the_limit_is_refused_and_queued_with_the_override_tag(dagster_env):
    env = {**dagster_env, MAX_PARTITIONS_ENV: "3"}
    days = ["--partitions", ",".join(YEAR[:4])]
    refused = dagster_job_backfill(env, JOB, *days)
    assert refused.returncode == 1
    assert "it selects 4 partitions of backfill__analytics__fct_orders, more than 3" in (
        refused.stderr
    )
    assert job_runs(DagsterRunStatus.QUEUED) == []

    backfill_id = launched_job_backfill(dagster_job_backfill(env, JOB, *days, "--tags", OVERRIDE))
    queued = job_runs(DagsterRunStatus.QUEUED)
    assert {run.tags["dagster/partition"] for run in queued} == set(YEAR[:4])
    assert {run.tags["dagster/backfill"] for run in queued} == {backfill_id}


def test_a_job_backfill_of_some_partitions_is_not_refused():
    assert refusal("b1", JOB, YEAR, whole_range=[*YEAR, "2025-01-01"], tags={}, limit=400) is None


def test_the_full_rebuild_tag_lifts_the_whole_range_rule_and_the_limit():
    tags = {"backfill_assets/full_rebuild": "true"}
    assert refusal("b1", JOB, YEAR, whole_range=YEAR, tags=tags, limit=3) is None


def test_a_job_outside_the_declarations_is_limited_only_by_the_count():
    assert refusal("b1", "other_job", YEAR, whole_range=None, tags={}, limit=400) is None
    assert "more than 11" in refusal("b1", "other_job", YEAR, whole_range=None, tags={}, limit=11)


def test_a_malformed_override_tag_is_refused_naming_it():
    tags = {"backfill_assets/full_rebuild": "please"}
    why = refusal("b1", JOB, YEAR, whole_range=YEAR, tags=tags, limit=400)
    assert "backfill_assets/full_rebuild='please' is not a boolean; use true or false" in why
