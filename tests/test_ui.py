"""The Dagster UI as a user meets it: the README's click path, driven in headless Chromium.

A real webserver and daemon on 127.0.0.1 over this test's PostgreSQL storage; Debian's
``chromium`` driven by Playwright (no browser download is possible here, so its executable path is
given). Each step saves a screenshot; ``make screenshots`` writes them to ``docs/images/ui/``. The
test fails, never skips, when a step breaks or Chromium is missing.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus
from playwright.sync_api import Page, expect, sync_playwright
from support import running_webserver, wait_for

from backfill_assets.core.registry import DEFAULT_TABLES_DIR, TABLES_PATH_ENV, load_registry
from backfill_assets.defs.dagster_internals import BulkActionStatus
from backfill_assets.tooling.launch import running_daemon

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS_ENV = "BACKFILL_UI_SCREENSHOTS"
SELECTION = 'key:"analytics/fct_orders"+'  # the table and everything built from it
RANGE = "[2024-04-01...2024-04-03]"  # the syntax the README gives
REFUSED_DAY = "2024-04-02"
REVENUE = AssetKey(["analytics", "daily_revenue"])
MARTS = ("daily_revenue", "customer_daily_orders")
MERGE_TABLES = Path(__file__).parent / "merge_tables"


class Ui:
    """One browser tab on the webserver, with a screenshot and a load time per step."""

    def __init__(self, page: Page, url: str, shots: Path) -> None:
        self.page, self.url, self.shots = page, url, shots
        self.load_times: dict[str, float] = {}

    def open(self, path: str, ready_text: str) -> None:
        """Go to ``path`` and wait until ``ready_text`` shows: the page's load time as a user
        sees it, kept for ``docs/measurements.md``."""
        started = time.monotonic()
        self.page.goto(self.url + path)
        expect(self.page.get_by_text(ready_text).first).to_be_visible(timeout=60_000)
        page = re.sub(r"/runs/b/\w+", "/runs/b/ID", path.split("?")[0])
        self.load_times[page] = time.monotonic() - started

    def shot(self, name: str | None) -> None:
        if name:
            self.page.screenshot(path=self.shots / f"{name}.png")

    def launch_from_lineage(self, shot_prefix: str | None = None) -> None:
        """Lineage → the selection box → *Materialize all…* → the range → *Launch backfill*."""
        self.open("/asset-groups", "Global asset lineage")
        self.page.locator(".CodeMirror").first.click()
        self.page.keyboard.type(SELECTION)
        self.page.keyboard.press("Enter")
        for name in ("fct_orders", "daily_revenue", "customer_daily_orders"):
            expect(self.page.get_by_text(name, exact=True).first).to_be_visible()
        self.shot(shot_prefix and f"{shot_prefix}-lineage-selection")
        self.page.get_by_role("button", name="Materialize all…").click()
        dialog = self.page.get_by_role("dialog")
        expect(dialog).to_contain_text("Launch runs to materialize 3 assets")
        range_box = dialog.get_by_placeholder("ex: 2024-01-01")
        range_box.fill(RANGE)
        range_box.press("Enter")  # the selection applies on Enter or leaving the box
        expect(dialog).to_contain_text("3 partitions")
        self.shot(shot_prefix and f"{shot_prefix}-partition-range")
        dialog.get_by_role("button", name="Launch backfill").click()
        expect(dialog).to_be_hidden(timeout=60_000)

    def launch_from_asset_page(self, asset: str, shot: str) -> None:
        """Catalog → the asset → *Materialize…* → the range → *Launch backfill*."""
        self.open(f"/assets/analytics/{asset}", "Materialize")
        self.page.get_by_role("button", name="Materialize…").first.click()
        dialog = self.page.get_by_role("dialog")
        range_box = dialog.get_by_placeholder("ex: 2024-01-01")
        range_box.fill(RANGE)
        range_box.press("Enter")
        expect(dialog).to_contain_text("3 partitions")
        self.shot(shot)
        dialog.get_by_role("button", name="Launch backfill").click()
        expect(dialog).to_be_hidden(timeout=60_000)

    def follow_backfill(self, backfill_id: str, status: str, shot: str) -> None:
        """Runs → Backfills → the backfill; reload until it shows ``status``."""
        self.open("/runs", "Backfills")
        self.page.get_by_text("Backfills", exact=True).first.click()
        self.page.get_by_role("link", name=backfill_id).first.click()
        expect(self.page).to_have_url(re.compile(f"/runs/b/{backfill_id}"))
        deadline = time.monotonic() + 300
        while (shown := self.backfill_status()) != status:
            if time.monotonic() > deadline:
                self.shot(f"{shot}-timed-out")
                body = self.page.inner_text("body")[-1500:]
                raise AssertionError(f"backfill {backfill_id}: {shown}, not {status}:\n{body}")
            time.sleep(2)
            self.page.reload()
            # The page renders its header after the load event: read it once it is there.
            expect(self.page.get_by_text("Partition selection").first).to_be_visible()
        expect(self.page.get_by_text("analytics / fct_orders").first).to_be_visible(timeout=60_000)
        self.shot(shot)

    def reexecute_from_failure(self, backfill_id: str) -> None:
        """The backfill's page → its menu (the only unlabelled button, top right) → *Re-execute
        from failure*: Dagster launches a new backfill of what this one did not materialize."""
        self.open(f"/runs/b/{backfill_id}", "Partition selection")
        self.page.get_by_role("button").last.click()
        self.page.get_by_role("menuitem", name="Re-execute from failure").click()
        expect(self.page.get_by_text("Created backfill").first).to_be_visible()

    def backfill_status(self) -> str | None:
        """The badge under the backfill page's *Status* heading, once the page shows one."""
        for _ in range(20):
            lines = self.page.inner_text("body").splitlines()
            shown = next((after for before, after in pairwise(lines) if before == "Status"), None)
            if shown:
                return shown
            time.sleep(0.5)
        return None

    def check_partition(self, asset: str, check: str, day: str, shows: str, shot: str) -> str:
        """Catalog → the asset → *Checks* → the check → *Partitions* → the day, until its
        detail ``shows`` a text of that day's result: the page's text."""
        self.open(f"/assets/analytics/{asset}?view=checks", check)
        self.page.get_by_text(check, exact=True).first.click()
        self.page.get_by_text("Partitions", exact=True).last.click()
        self.page.get_by_placeholder("Filter by partition").fill(day)
        self.page.get_by_text(day, exact=True).filter(visible=True).last.click()
        expect(self.page.get_by_text(shows).first).to_be_visible()
        self.shot(shot)
        return self.page.inner_text("body")


@pytest.fixture
def page() -> Iterator[Page]:
    assert CHROMIUM.exists(), (
        f"the UI test needs Debian's chromium at {CHROMIUM}: `make setup` installs it "
        "(apt-get install -y chromium)"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        tab = browser.new_page(viewport={"width": 1500, "height": 1000})
        tab.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)  # pages load slowly while other tests run
        yield tab
        browser.close()


def newest_backfill_id(after: set[str]) -> str:
    with DagsterInstance.get() as instance:
        found = wait_for(
            lambda: [b.backfill_id for b in instance.get_backfills() if b.backfill_id not in after],
            60,
            "the backfill launched from the UI",
        )
    return found[0]


def test_a_user_launches_follows_and_reads_a_backfill_in_the_ui(
    dagster_env, conn, page, tmp_path, monkeypatch
):
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    # The demo's tables and a merge twin of fct_orders, backfilled from its own page last.
    monkeypatch.setenv(TABLES_PATH_ENV, f"{DEFAULT_TABLES_DIR}:{MERGE_TABLES}")
    with (
        running_daemon(dagster_env, tmp_path / "daemon.log"),
        running_webserver(dagster_env, tmp_path / "webserver.log") as url,
    ):
        ui = Ui(page, url, shots)

        ui.launch_from_lineage("1")
        first = newest_backfill_id(set())
        ui.follow_backfill(first, "Succeeded", "2-backfill-succeeded")
        body = ui.check_partition(
            "fct_orders", "measures_reconcile", "2024-04-02", "net_amount_source", "3-check"
        )
        assert "net_amount_source" in body and "Passed" in body

        # A day whose source lost its rows: the guard refuses it and nothing is deleted.
        conn.execute(
            "CREATE TABLE app.refused_day_orders AS SELECT * FROM app.orders "
            "WHERE (ordered_at AT TIME ZONE 'UTC')::date = %s::date",
            [REFUSED_DAY],
        )
        conn.execute(
            "DELETE FROM app.orders WHERE order_id IN (SELECT order_id FROM app.refused_day_orders)"
        )
        ui.launch_from_lineage()
        second = newest_backfill_id({first})
        ui.follow_backfill(second, "Failed", "5-backfill-failed")
        # The refused day fails alone, downstream too: the page counts each mart's other two
        # days succeeded (targeted, in progress, succeeded, failed).
        lines = [line.strip() for line in page.inner_text("body").splitlines()]
        for mart in MARTS:
            after = lines[lines.index(f"analytics / {mart}") + 1 :]
            assert [n for n in after if n.isdigit()][:4] == ["3", "0", "2", "1"], after[:8]
        body = ui.check_partition(
            "fct_orders", "source_guard", REFUSED_DAY, "guard refused", "6-refused-day"
        )
        assert "Failed" in body and "guard refused" in body and "Nothing was deleted" in body
        assert day_rows(conn) > 0, "the refused day keeps its previous rows"

        # The source is fixed; the failed backfill's menu re-runs exactly what it did not write.
        conn.execute("INSERT INTO app.orders SELECT * FROM app.refused_day_orders")
        ui.reexecute_from_failure(second)
        third = newest_backfill_id({first, second})
        ui.follow_backfill(third, "Succeeded", "7-reexecuted-from-failure")

        # "Execute all" on a mart's checks re-evaluates every day it holds, each on its own.
        ui.open("/assets/analytics/daily_revenue?view=checks", "Execute all")
        with DagsterInstance.get() as instance:
            before = {r.run_id for r in instance.get_runs()}
        page.get_by_role("button", name="Execute all").click()
        with DagsterInstance.get() as instance:
            run = wait_for(
                lambda: next(
                    (r for r in instance.get_runs() if r.run_id not in before and r.is_finished),
                    None,
                ),
                180,
                "the run of daily_revenue's checks",
                poll_s=1,
            )
        ui.open("/assets/analytics/daily_revenue?view=checks", "Execute all")
        expect(page.get_by_text("Succeeded", exact=True)).to_have_count(3)
        ui.shot("8-execute-all")

        # strategy: merge goes the same way, here from the table's own page.
        ui.launch_from_asset_page("fct_orders_merge", "9-merge-range")
        merge = newest_backfill_id({first, second, third})
        ui.follow_backfill(merge, "Succeeded", "10-merge-succeeded")
        body = ui.check_partition(
            "fct_orders_merge", "measures_reconcile", "2024-04-02", "net_amount_source", "11-merge"
        )
        assert "Passed" in body

    (shots / "load_times.txt").write_text(
        "".join(f"{path}\t{seconds:.1f}\n" for path, seconds in ui.load_times.items())
    )
    with DagsterInstance.get() as instance:
        assert instance.get_backfill(first).status == BulkActionStatus.COMPLETED_SUCCESS
        failed = instance.get_backfill(second)
        assert failed.status == BulkActionStatus.COMPLETED_FAILED
        built_by_failed = {
            (key.asset_key.path[-1], key.partition_key)
            for key in failed.asset_backfill_data.materialized_subset.iterate_asset_partitions()
            if key.asset_key.path[-1] in MARTS
        }
        reexecution = instance.get_backfill(third)
        assert reexecution.status == BulkActionStatus.COMPLETED_SUCCESS
        assert run.status == DagsterRunStatus.SUCCESS, run.run_id
        assert run.asset_check_selection and not run.asset_selection
    targeted = {
        (key.asset_key.path[-1], key.partition_key)
        for key in reexecution.asset_backfill_data.target_subset.iterate_asset_partitions()
    }
    marts = {(mart, day) for mart in MARTS for day in ("2024-04-01", REFUSED_DAY, "2024-04-03")}
    refused = {("fct_orders", REFUSED_DAY)} | {(mart, REFUSED_DAY) for mart in MARTS}
    # The failed backfill built the marts of the days it wrote (a bad day fails alone,
    # downstream too); what it left is the refused day and what is built from it.
    assert built_by_failed == marts - refused
    assert targeted == refused, "what the failed backfill left"
    held = conn.execute("SELECT count(*) FROM app.refused_day_orders").fetchone()[0]
    assert held > 0 and day_rows(conn) == held, "the refused day holds its source's rows now"
    writer = conn.execute(
        "SELECT backfill_id FROM backfill_audit.backfill_runs WHERE partition_key = %s "
        "AND table_name = 'analytics.fct_orders' AND status = 'succeeded' ORDER BY id DESC LIMIT 1",
        [REFUSED_DAY],
    ).fetchone()[0]
    assert writer == third, "the re-execution wrote the refused day"
    merged = load_registry([MERGE_TABLES]).table("analytics.fct_orders_merge")
    differ = conn.execute(
        "SELECT count(*) FROM ((SELECT * FROM analytics.fct_orders_merge) EXCEPT ALL "
        f"(SELECT * FROM ({merged.query.strip()}) AS q)) AS d",
        {"start": "2024-04-01", "end": "2024-04-04"},
    ).fetchone()[0]
    written = conn.execute("SELECT count(*) FROM analytics.fct_orders_merge").fetchone()[0]
    assert written > 0 and differ == 0
    strategies = conn.execute(
        "SELECT DISTINCT strategy FROM backfill_audit.backfill_runs WHERE backfill_id = %s",
        [merge],
    ).fetchall()
    assert strategies == [("merge",)]


def day_rows(conn) -> int:
    """The rows ``analytics.fct_orders`` holds for the refused day."""
    return conn.execute(
        "SELECT count(*) FROM analytics.fct_orders WHERE order_day = %s", [REFUSED_DAY]
    ).fetchone()[0]
