"""Argument types and options that verbs of several families share."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable


def bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``, else one line naming the value
    (argparse exits 2 with it, before anything runs)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def seconds_between(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number of seconds from ``low`` to ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value:g} is outside {low:g}..{high:g} seconds")
        return value

    return parse


def webserver(args: argparse.Namespace):
    """The webserver to send the request to, if one is named; else None (the instance)."""
    from backfill_assets.tooling.webserver import WEBSERVER_ENV, Webserver

    url = args.webserver or os.environ.get(WEBSERVER_ENV)
    return Webserver(url) if url else None


def webserver_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--webserver",
        metavar="URL",
        help="send it through this Dagster webserver's GraphQL API, e.g. http://127.0.0.1:3000 "
        "(default: $BACKFILL_WEBSERVER_URL, else the instance directly)",
    )
