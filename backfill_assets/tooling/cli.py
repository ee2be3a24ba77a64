"""``backfill-assets``: start the embedded database, seed the demo, run Dagster with the right env.

Dagster's own CLI does the orchestration; this command only prepares what it needs (a running
PostgreSQL, the databases, the dbt manifest, the environment variables) so that a fresh machine
goes from clone to backfill in one command.

The verbs live in ``tooling/commands/``, one module per family; this module builds the parser
from them and runs a verb.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from backfill_assets.core import settings
from backfill_assets.core.database import DatabaseUnavailableError
from backfill_assets.core.session_limits import timed
from backfill_assets.tooling.commands import audit, controls, environment, launching, scenarios

FAMILIES = (environment, launching, controls, audit, scenarios)
"""In the order ``--help`` lists their verbs."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backfill-assets", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="name", required=True)
    for family in FAMILIES:
        family.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with timed("a table this command reads or writes"):
            return args.func(args)
    except (settings.SettingsError, DatabaseUnavailableError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`backfill-assets tables | head`): stop quietly, as Unix tools do.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
