"""Evaluation: metrics (`reward`, `text`, `bertscore`, `policy`), `alignkit eval` (`evaluate`) and the report.

    from alignkit.eval import evaluate_policy, write_report, summary_table

The names are imported on first use, so importing this package (or `alignkit`) stays fast.
"""

_API = {"evaluate_policy": "alignkit.eval.evaluate", "write_report": "alignkit.eval.report",
        "summary_table": "alignkit.eval.report", "load_run": "alignkit.eval.report"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'alignkit.eval' has no attribute '{name}'")
