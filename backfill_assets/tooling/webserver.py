"""Launch, cancel and retry backfills through a running Dagster webserver's GraphQL API.

The same mutations the UI sends (``launchPartitionBackfill``, ``cancelPartitionBackfill``,
``reexecutePartitionBackfill``), so the webserver validates the selection against the code location
it has loaded and records the backfill exactly as a click would. Used when ``--webserver URL`` or
``BACKFILL_WEBSERVER_URL`` names one; otherwise the CLI writes to the instance directly
(``launch.py``). There is no probing of a default port: a webserver of another instance would
receive the backfill.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

from dagster import AssetKey

from backfill_assets.tooling.launch import with_user

WEBSERVER_ENV = "BACKFILL_WEBSERVER_URL"

_ERRORS = "__typename ... on PythonError { message } ... on UnauthorizedError { message }"
_LAUNCHED = f"{_ERRORS} ... on LaunchBackfillSuccess {{ backfillId }} ... on Error {{ message }}"
LAUNCH = (
    "mutation Launch($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams:"
    f" $params) {{ {_LAUNCHED} }} }}"
)
CANCEL = (
    "mutation Cancel($id: String!) { cancelPartitionBackfill(backfillId: $id)"
    f" {{ {_ERRORS} ... on CancelBackfillSuccess {{ backfillId }} }} }}"
)
RETRY = (
    "mutation Retry($params: ReexecutionParams) { reexecutePartitionBackfill(reexecutionParams:"
    f" $params) {{ {_LAUNCHED} }} }}"
)


class WebserverError(RuntimeError):
    """The webserver was unreachable or refused the request; its message is kept."""


class Webserver:
    def __init__(self, url: str, timeout_s: float = 60) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def launch_asset_backfill(
        self,
        keys: Sequence[AssetKey],
        partitions: Sequence[str],
        *,
        tags: Mapping[str, str],
        title: str,
    ) -> str:
        params = {
            "assetSelection": [{"path": list(key.path)} for key in keys],
            "partitionNames": list(partitions),
            "tags": [{"key": k, "value": v} for k, v in with_user(tags).items()],
            "title": title,
        }
        data = self.execute(LAUNCH, {"params": params})
        return self._backfill_id(data, "launchPartitionBackfill")

    def cancel(self, backfill_id: str) -> None:
        self._backfill_id(self.execute(CANCEL, {"id": backfill_id}), "cancelPartitionBackfill")

    def retry(self, backfill_id: str) -> str:
        params = {"parentRunId": backfill_id, "strategy": "FROM_FAILURE"}
        data = self.execute(RETRY, {"params": params})
        return self._backfill_id(data, "reexecutePartitionBackfill")

    def execute(self, query: str, variables: dict) -> dict:
        """Run one GraphQL document; its data, or WebserverError with the server's message."""
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            answer = _error_body(exc)  # GraphQL refusals come as 400 with a JSON body
            if answer is None:
                raise WebserverError(
                    f"{self.url} answered HTTP {exc.code}: is it a Dagster webserver?"
                ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise WebserverError(
                f"no Dagster webserver answered at {self.url} ({exc}); start one (`make ui`) or "
                f"leave out --webserver / {WEBSERVER_ENV} to use the instance directly"
            ) from None
        if answer.get("errors"):
            raise WebserverError(f"{self.url}: {answer['errors'][0].get('message')}")
        return answer["data"]

    def _backfill_id(self, data: dict, field: str) -> str:
        result = data[field]
        if "backfillId" not in result:
            message = (result.get("message") or result["__typename"]).strip().splitlines()[0]
            raise WebserverError(f"the webserver refused it: {message}")
        return result["backfillId"]


def _error_body(error: urllib.error.HTTPError) -> dict | None:
    try:
        answer = json.loads(error.read())
    except (ValueError, OSError):
        return None
    return answer if isinstance(answer, dict) and answer.get("errors") else None
