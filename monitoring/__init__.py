"""Drift monitoring: the logic lives in `ctrflow.monitoring`; see README.md here for how to read a report."""

from ctrflow.monitoring import DriftInputError, DriftResult, drift_report, read_request_log

__all__ = ["DriftInputError", "DriftResult", "drift_report", "read_request_log"]
