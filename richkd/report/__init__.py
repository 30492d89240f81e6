"""`richkd report`: a static HTML page (+ PNGs) summarising a sweep: curves, searched values, importances, leaderboard.

Light at import: matplotlib, optuna, mlflow and (through richkd.tune) ray load only inside build_report.
"""
from richkd.report.build import ReportResult, build_report

__all__ = ["ReportResult", "build_report"]
