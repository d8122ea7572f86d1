"""``python -m vlm_sweep.report``: write a sweep's report and print its table."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from vlm_sweep.report import ReportError, load_sweep, render_table, write_report
from vlm_sweep.report.markdown import best_line


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_sweep.report",
        description="Table + plots for a Hydra sweep, from its multirun dir or from MLflow.")
    parser.add_argument("source", nargs="?",
                        help="sweep dir (outputs/<exp>/multirun/<date>/<time>) or MLflow experiment name/id")
    parser.add_argument("--metric", default="val_loss",
                        help="ranks finished jobs: val_loss, loss, tokens_per_s, mfu, tflops, device_hours "
                             "or an eval metric (eval/ted_accuracy); default val_loss")
    parser.add_argument("--mode", choices=("min", "max"), default="min",
                        help="min if lower is better (default), max for accuracies and throughput")
    parser.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///outputs/mlflow.db)")
    parser.add_argument("--parent-run-id", help="report this MLflow parent run instead of the latest")
    parser.add_argument("--output", help="output dir (default: the sweep dir, or ./report_<parent run id>)")
    args = parser.parse_args(argv)
    if not args.source and not args.parent_run_id:
        parser.error("give a sweep dir, an MLflow experiment, or --parent-run-id")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        sweep = load_sweep(args.source, args.tracking_uri, args.parent_run_id)
        path = write_report(sweep, args.metric, args.mode, args.output)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(render_table(sweep, args.metric, args.mode))
    print(f"\n{best_line(sweep, args.metric, args.mode)}\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
