"""Monitoring for on-call: drift verdicts (overall and per scenario), online quality from delayed clicks, the
report over time, and the loop back to training. monitoring/README.md is the runbook.

Exit codes of `ctrflow monitor drift|quality|run`: 0 ok, 1 breach, 2 usage error, 3 not enough data.
"""

from pathlib import Path

import pandas as pd

from ctrflow.monitoring.current import CurrentInputError, read_current
from ctrflow.monitoring.drift import (
    BREACHED,
    EXIT_BREACH,
    EXIT_NOT_ENOUGH_DATA,
    EXIT_OK,
    EXIT_USAGE,
    NOT_ENOUGH_DATA,
    OK,
    DriftInputError,
    DriftResult,
    PopulationDrift,
    drift_report,
)


def read_request_log(path: str | Path) -> pd.DataFrame:
    """Every row of a request log folder or Parquet slice (no sampling); raises DriftInputError when unreadable."""
    try:
        return read_current(path)[0]
    except CurrentInputError as exc:
        raise DriftInputError(str(exc)) from exc


__all__ = [
    "BREACHED", "EXIT_BREACH", "EXIT_NOT_ENOUGH_DATA", "EXIT_OK", "EXIT_USAGE", "NOT_ENOUGH_DATA", "OK",
    "CurrentInputError", "DriftInputError", "DriftResult", "PopulationDrift", "drift_report", "read_current",
    "read_request_log",
]  # fmt: skip
