"""`auto` on EfficientNet-Lite0: its search time against the statistics collection, and its held-out quality.

In one run, on one calibration batch (N seeded views of the 11 calibration photos of
bench_accuracy.py, written as an .arrow batch):

1. the anchor: `trtcal.calibrate(..., algorithms=["entropy2"])`, both passes (statistics +
   histograms), timed by the pipeline's own stage timings;
2. `auto_and_verdict` on the same histograms and batch: the auto search (setup, local layer-wise
   matching, global start, coordinate descent) and the verdict on the held-out slice, timed apart;
3. held-out quality on OTHER photos: every candidate method's and auto's Q/DQ model on views of the
   7 evaluation photos (disjoint from the calibration photos), exactly simulated (ORT_DISABLE_ALL):
   logit SQNR, cosine, top-1 agreement with FP32.

Run:  .venv/bin/python bench/bench_auto.py [--calib 500] [--eval 200] [--write FILE.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=500, help="calibration views (N)")
    parser.add_argument("--eval", type=int, default=200, help="evaluation views of other photos")
    parser.add_argument("--model", default="", help="an ONNX model (default: EfficientNet-Lite0 from PyPI, as the tests get it)")
    parser.add_argument("--write", default="", help="also write the Markdown result here")
    args = parser.parse_args()
    if not args.model:
        from tests.fixtures.data import efficientnet_model_path

        args.model = str(efficientnet_model_path())

    import numpy as np
    from bench_accuracy import CALIBRATION_PHOTOS, EVALUATION_PHOTOS, views

    from trtcal.batch import open_batch, write_batch
    from trtcal.core.output_metrics import compare_output
    from trtcal.export.auto import AutoSimulator
    from trtcal.export.auto_calibration import auto_and_verdict, candidate_tables, verdict_lines
    from trtcal.orchestrator.calibrate import calibrate

    calib = views(CALIBRATION_PHOTOS, args.calib, seed=1)
    evalset = views(EVALUATION_PHOTOS, args.eval, seed=2)
    ids = [f"view/{k:05d}" for k in range(len(calib))]
    with tempfile.TemporaryDirectory(prefix="bench-auto-") as tmp:
        batch_path = Path(tmp) / "calib.arrow"
        write_batch(batch_path, {"input": calib}, ids, spec={"bench": "bench_auto", "seed": 1})
        del calib

        result = calibrate(args.model, str(batch_path), algorithms=["entropy2"])
        stats_s = result.timings["statistics"] + result.timings["histograms"]
        print(f"statistics collection (both passes, N={args.calib}): {stats_s:.1f} s  {result.timings}", flush=True)

        with open_batch(str(batch_path)) as batch:
            t0 = time.perf_counter()
            outcome = auto_and_verdict(
                args.model, result.tensor_names, result.histograms, batch.sample_ids, {"input": batch.array("input")},
                {"entropy2": result.amax["entropy2"]}, run_auto=True, default="auto",
            )
            wall = time.perf_counter() - t0
    auto_s = outcome.timings["auto_setup"] + outcome.timings["auto_search"]
    print(f"auto search: {auto_s:.1f} s = {auto_s / stats_s:.2f}x the statistics; verdict {outcome.timings['verdict']:.1f} s; "
          f"{outcome.timings}; total {wall:.1f} s", flush=True)
    print("\n".join(verdict_lines(outcome.verdict)))

    tables = candidate_tables(result.tensor_names, result.histograms, {})
    tables = {"auto": outcome.auto_amax or {}, **tables}
    sim = AutoSimulator(args.model, result.tensor_names, micro_batch=16)
    reference = sim.reference({"input": evalset})
    rows = []
    for label, amax in tables.items():
        m = compare_output(reference[0], sim.quantized({"input": evalset}, amax)[0])
        q = {"sqnr_db": m.sqnr_db, "cosine": m.cosine, "argmax_agreement": m.top1_agreement}
        rows.append((label, q))
        print(f"held-out (other photos) {label}: SQNR {q['sqnr_db']:.2f} dB, cosine {q['cosine']:.4f}, "
              f"top-1 agreement {q['argmax_agreement']:.3f}", flush=True)
    best_single = max((r for r in rows if r[0] != "auto"), key=lambda r: r[1]["sqnr_db"])
    search = outcome.search or {}
    from collections import Counter

    chosen = Counter(info["chosen"] for info in outcome.tensors.values() if info["searched"])
    lines = [
        f"Command: `.venv/bin/python bench/bench_auto.py --calib {args.calib} --eval {args.eval}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs while measured), Python "
        f"{platform.python_version()}. Calibration: {args.calib} seeded views of {len(CALIBRATION_PHOTOS)} photos; "
        f"held-out evaluation: {args.eval} views of {len(EVALUATION_PHOTOS)} OTHER photos.",
        "",
        "| what | seconds | ratio to statistics |",
        "|---|---|---|",
        f"| statistics collection, both passes (anchor, same run) | {stats_s:.1f} | 1.00x |",
        f"| auto search (sessions, local matching, global start, descent, cross-fit) | {auto_s:.1f} | {auto_s / stats_s:.2f}x |",
        f"| quality verdict ({len(outcome.verdict['rows'])} Q/DQ models on the verdict slice) | {outcome.timings['verdict']:.1f} | "
        f"{outcome.timings['verdict'] / stats_s:.2f}x |",
        "",
        f"Search: {search.get('global_evals')} whole-model runs on {len(search.get('search_ids', []))} search rows, start "
        f"{search.get('start')!r}, changed by the descent: {len(search.get('changed_by_descent', []))} tensors; "
        f"cross-fit (held-out half, mean dB): {search.get('cross_fit', {}).get('mean_held_out_sqnr_db')}, written: "
        f"{search.get('procedure')!r}; "
        f"chosen per tensor: {dict(chosen)}.",
        "",
        "| method | held-out logit SQNR (dB) | cosine | top-1 agreement with FP32 |",
        "|---|---|---|---|",
    ]
    lines += [f"| {label} | {q['sqnr_db']:.2f} | {q['cosine']:.4f} | {q['argmax_agreement']:.3f} |" for label, q in rows]
    auto_q = rows[0][1]
    lines += ["", f"auto - best single method ({best_single[0]}): {auto_q['sqnr_db'] - best_single[1]['sqnr_db']:+.2f} dB"]
    text = "\n".join(lines)
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n", encoding="utf-8")
    np.seterr(all="ignore")


if __name__ == "__main__":
    main()
