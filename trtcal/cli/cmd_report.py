"""`trtcal report RESULT_DIR -o report.html`: a self-contained HTML page of a calibration result.

Reads ranges.json (and histograms.npz, evaluation.json, sensitivity.json, fallback.json,
qdq_report.json when present; `trtcal eval -o RESULT_DIR` writes the last four).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="an HTML report of a calibration result",
        description=(
            "Render per-tensor |x| histograms with each method's threshold, amax and SQNR per method, the "
            "evaluation table and the sensitivity ranking into one self-contained HTML file."
        ),
    )
    p.add_argument("result", metavar="RESULT_DIR", help="a `trtcal calibrate` output directory")
    p.add_argument("-o", "--output", required=True, metavar="HTML", help="where to write the page")
    p.add_argument("--title", help="page title")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from trtcal.export.report import load_report_data, write_report

    data = load_report_data(args.result, title=args.title)
    path = write_report(data, args.output)
    print(f"wrote {path} ({len(data.tensors)} tensors)", file=sys.stderr)
    return 0
