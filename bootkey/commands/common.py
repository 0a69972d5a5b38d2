"""Helpers shared by the command modules: loading the config, printing results."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bootkey import config


def load_config(args: argparse.Namespace) -> config.Config:
    return config.load(getattr(args, "config", None))


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
