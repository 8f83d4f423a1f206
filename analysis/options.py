"""The report's command-line options, declared once for ``kdablate report`` and
``python -m analysis.report``.

Only argparse here: kdablate's parser declares these for every command, and importing
``analysis.report`` (pandas, matplotlib, MLflow) would slow down ``kdablate dry-run``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_METRIC = "report/test_acc"
DEFAULT_OUT = Path("figures")


def add_report_options(p: argparse.ArgumentParser) -> None:
    """STUDY, --metric, --out and --no-log."""
    p.add_argument("study", help="a study file, or the name of one in studies/")
    p.add_argument("--metric", default=DEFAULT_METRIC,
                   help=f"the metric the tables and figures compare (default {DEFAULT_METRIC})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"write into OUT/<study>/ (default {DEFAULT_OUT}/, relative to the current folder)")
    p.add_argument("--no-log", action="store_true", help="do not log the figures to the study's parent run")
