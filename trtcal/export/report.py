"""A self-contained HTML report of a calibration: what quantization does to the model.

One page, no scripts, no external resources: per-tensor |x| histograms on a log scale with each
method's threshold marked (inline SVG drawn here, so no plotting dependency), amax per method
with the activation SQNR each threshold gives (estimated from the histogram), the evaluation
table, the sensitivity ranking and the fallback. Same data, same bytes.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from trtcal._version import __version__
from trtcal.errors import ConfigError
from trtcal.export.evaluate import EvaluationResult
from trtcal.export.qdq import write_bytes_atomic
from trtcal.export.sensitivity import SensitivityResult

__all__ = [
    "TensorReport",
    "ReportData",
    "activation_sqnr_db",
    "histogram_svg",
    "render_report",
    "write_report",
    "load_report_data",
]

# One colour per method, fixed so the same method looks the same in every chart.
_PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")
_SVG_BARS = 256  # histograms are drawn with at most this many bars (bins are summed in groups)


@dataclass(frozen=True)
class TensorReport:
    """One calibrated tensor: its |x| histogram over [0, hist_amax] and each method's amax."""

    name: str
    amax_by_method: Mapping[str, float]
    counts: npt.NDArray[np.int64] | None = None
    hist_amax: float | None = None


@dataclass(frozen=True)
class ReportData:
    title: str
    tensors: Sequence[TensorReport] = ()
    evaluation: EvaluationResult | None = None
    sensitivity: SensitivityResult | None = None
    fallback: Mapping[str, Any] | None = None
    qdq: Mapping[str, Any] | None = None  # QdqReport.to_dict()
    notes: Sequence[str] = field(default_factory=tuple)
    verdict: Mapping[str, Any] | None = None  # the manifest's "verdict" (trtcal.export.auto.verdict)
    auto: Mapping[str, Mapping[str, Any]] | None = None  # tensor -> ranges.json's per-tensor "auto" entry


def activation_sqnr_db(counts: npt.ArrayLike, hist_amax: float, amax: float) -> float:
    """SQNR (dB) of symmetric int8 quantization of |x| with threshold `amax`, from the histogram.

    Every value is taken at its bin centre: inside the threshold it gets rounding noise step²/12
    (step = amax/127), beyond it the clipping error (x − amax)².
    """
    h = np.asarray(counts, dtype=np.float64)
    if h.ndim != 1 or h.size == 0 or hist_amax <= 0 or amax <= 0:
        return math.inf if amax > 0 and (h.size == 0 or not h.any()) else math.nan
    centres = (np.arange(h.size) + 0.5) * (hist_amax / h.size)
    signal = float(np.sum(h * centres**2))
    step = amax / 127.0
    inside = centres <= amax
    noise = float(np.sum(h[inside]) * step * step / 12.0 + np.sum(h[~inside] * (centres[~inside] - amax) ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.6g}"


def _db(x: Any) -> str:
    if isinstance(x, str):
        return "∞" if x == "inf" else html.escape(x)
    if x is None or not isinstance(x, (int, float)) or math.isnan(x):
        return "–"
    return "∞" if math.isinf(x) else f"{x:.2f}"


def _ratio(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "–"


def _method_colours(methods: Sequence[str]) -> dict[str, str]:
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(methods)}


def histogram_svg(
    counts: npt.ArrayLike,
    hist_amax: float,
    thresholds: Mapping[str, float],
    colours: Mapping[str, str],
    *,
    width: int = 640,
    height: int = 200,
    title: str = "",
) -> str:
    """An inline SVG: log10(1 + count) per |x| bin, with a vertical line per method's threshold."""
    h = np.asarray(counts, dtype=np.int64)
    group = max(1, math.ceil(h.size / _SVG_BARS))
    padded = np.concatenate([h, np.zeros((-h.size) % group, dtype=np.int64)])
    bars = padded.reshape(-1, group).sum(axis=1)
    left, right, top, bottom = 48, 12, 10, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    x_max = max([hist_amax, *[t for t in thresholds.values() if math.isfinite(t)]] or [1.0]) or 1.0
    logs = np.log10(1.0 + bars.astype(np.float64))
    y_top = max(1.0, math.ceil(float(logs.max()) if logs.size else 1.0))
    bar_w = hist_amax / bars.size if bars.size else 0.0

    def sx(v: float) -> float:
        return left + plot_w * v / x_max

    def sy(v: float) -> float:
        return top + plot_h * (1.0 - v / y_top)

    points = [f"{sx(0):.1f},{sy(0):.1f}"]
    for k, v in enumerate(logs):
        y = sy(float(v))
        points.append(f"{sx(k * bar_w):.1f},{y:.1f}")
        points.append(f"{sx((k + 1) * bar_w):.1f},{y:.1f}")
    points.append(f"{sx(hist_amax):.1f},{sy(0):.1f}")
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>',
        f'<polygon points="{" ".join(points)}" fill="#9ecae1" stroke="#3182bd" stroke-width="0.6"/>',
    ]
    for decade in range(0, int(y_top) + 1):
        y = sy(decade)
        parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#666"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">1e{decade}</text>')
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = sx(x_max * frac)
        parts.append(f'<line x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" y2="{top + plot_h + 4}" stroke="#666"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 15}" font-size="10" text-anchor="middle">{x_max * frac:.4g}</text>')
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 3}" font-size="10" text-anchor="middle">|x| '
        "(count axis: log10(1 + count))</text>"
    )
    for k, (method, t) in enumerate(thresholds.items()):
        if not math.isfinite(t):
            continue
        x = sx(t)
        colour = colours.get(method, "#000")
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="{colour}" stroke-width="1.5" '
            f'stroke-dasharray="{3 + k % 3},2"><title>{html.escape(method)}: {t:.6g}</title></line>'
        )
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:14px;margin:18px 0 4px;font-family:monospace}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left;font-family:monospace}tr.best td{background:#e8f5e9;font-weight:600}
tr.fused td{color:#888;font-style:italic}.legend span{display:inline-block;margin-right:14px;font-size:12px}
.sw{display:inline-block;width:14px;height:3px;vertical-align:middle;margin-right:4px}.note{color:#555;font-size:13px}
.bar{display:inline-block;height:9px;background:#e6550d}.warn{color:#8a1c00;background:#fff3e0;padding:6px;font-size:13px}
"""


def _opt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _evaluation_section(evaluation: EvaluationResult) -> list[str]:
    best = evaluation.best().label if any(r.simulated for r in evaluation.rows) else None
    has_acc = any(r.metrics.accuracy is not None for r in evaluation.rows)
    out = [
        "<h2>INT8 vs FP32 evaluation</h2>",
        f'<p class="note">{evaluation.num_inputs} inputs. INT8 is simulated exactly: the Q/DQ model runs in ONNX '
        "Runtime with graph optimisations off, so every QuantizeLinear/DequantizeLinear executes as written. "
        "Rows in grey italics, if any, went through ONNX Runtime's fused int8 CPU kernels, which saturate on CPUs "
        "without VNNI: they measure that runtime, not the calibration."
        + (f" FP32 top-1 accuracy: {evaluation.fp32_accuracy:.4f}." if evaluation.fp32_accuracy is not None else "")
        + "</p>",
        "<table><tr><th class='l'>method</th><th>top-1 agreement</th><th>top-5 overlap</th><th>output SQNR (dB)</th>"
        "<th>mean KL</th>" + ("<th>accuracy</th>" if has_acc else "") + "</tr>",
    ]
    for r in evaluation.rows:
        m = r.metrics
        cls = "best" if r.label == best else ("fused" if not r.simulated else "")
        cells = [_opt(m.top1_agreement, 4), _opt(m.top5_overlap, 4), _db(m.sqnr_db), _opt(m.mean_kl, 5)]
        if has_acc:
            cells.append("–" if m.accuracy is None else f"{m.accuracy:.4f}")
        out.append(
            f"<tr class='{cls}'><td class='l'>{html.escape(r.label)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
        )
    out.append("</table>")
    return out


def _verdict_section(verdict: Mapping[str, Any]) -> list[str]:
    rows = verdict.get("rows") or {}
    order = sorted(rows, key=lambda label: (-float(rows[label].get("mean_sqnr_db", -math.inf)), label))
    outputs: list[str] = []
    for label in order:
        for name in rows[label].get("outputs", {}):
            if name not in outputs:
                outputs.append(name)
    out = [
        "<h2>Quality verdict</h2>",
        f"<p class='note'>Each method's Q/DQ model on the held-out verdict slice ({len(verdict.get('verdict_ids', []))} "
        "samples of the calibration batch chosen by sample id, never seen by the auto search), simulated exactly "
        "(ONNX Runtime, optimisations off). Best first; argmax agreement only where an output has a class axis.</p>",
    ]
    if verdict.get("warning"):
        out.append(f"<p class='warn'><b>Warning:</b> {html.escape(str(verdict['warning']))}</p>")
    head = "".join(f"<th>{html.escape(o)} SQNR (dB)</th><th>cosine</th><th>agreement</th>" for o in outputs)
    out.append(f"<table><tr><th class='l'>method</th><th>mean SQNR (dB)</th>{head}</tr>")
    for label in order:
        row = rows[label]
        cells = [_db(row.get("mean_sqnr_db"))]
        for o in outputs:
            q = row.get("outputs", {}).get(o, {})
            agreement = q.get("argmax_agreement")
            cosine = q.get("cosine")
            cells += [_db(q.get("sqnr_db")), "–" if cosine is None else f"{cosine:.4f}", "–" if agreement is None else f"{agreement:.3f}"]
        cls = "best" if label == verdict.get("best") else ""
        mark = " (written)" if label == verdict.get("default") else ""
        out.append(f"<tr class='{cls}'><td class='l'>{html.escape(label + mark)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return out


def _auto_section(auto: Mapping[str, Mapping[str, Any]], top: int) -> list[str]:
    searched = {t: e for t, e in auto.items() if e.get("searched")}
    if not searched:
        return []
    candidates: list[str] = []
    for e in searched.values():
        for c in e.get("local_noise_db", {}):
            if c not in candidates:
                candidates.append(c)

    def chosen_db(entry: Mapping[str, Any]) -> float:
        value = entry.get("local_noise_db", {}).get(entry.get("chosen"))
        return math.inf if value is None else float(value)

    worst = sorted(searched, key=lambda t: (chosen_db(searched[t]), t))[:top]
    out = [
        "<h2>auto: per-tensor choice, worst tensors first</h2>",
        "<p class='note'>SQNR (dB) of each quantized tensor's consuming layers' outputs for each candidate range "
        "(layer-wise output matching on the search slice); the chosen candidate is marked. Tensors with the lowest "
        f"SQNR at their choice come first ({len(worst)} of {len(searched)}).</p>",
        "<table><tr><th class='l'>tensor</th><th class='l'>chosen</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in candidates) + "</tr>",
    ]
    for t in worst:
        e = searched[t]
        scores = e.get("local_noise_db", {})
        cells = []
        for c in candidates:
            text = _db(scores.get(c))
            cells.append(f"<td><b>{text}</b></td>" if c == e.get("chosen") else f"<td>{text}</td>")
        out.append(f"<tr><td class='l'>{html.escape(t)}</td><td class='l'>{html.escape(str(e.get('chosen')))}</td>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return out


def _sensitivity_section(sensitivity: SensitivityResult, fallback: Mapping[str, Any] | None, top: int) -> list[str]:
    rows = sensitivity.ranking[:top]
    worst = max((r.noise_ratio for r in rows if math.isfinite(r.noise_ratio)), default=0.0) or 1.0
    out = [
        "<h2>Sensitivity ranking</h2>",
        f'<p class="note">Method: {html.escape(sensitivity.method)}, on {sensitivity.num_inputs} inputs. '
        "Noise = Σ(fp32 − out)² / Σ fp32² of the output with only that block quantized; most harmful first.</p>",
        "<table><tr><th>#</th><th class='l'>layer</th><th class='l'>op</th><th>noise</th><th>SQNR alone (dB)</th>"
        "<th>agreement alone</th><th class='l'></th></tr>",
    ]
    for k, r in enumerate(rows, start=1):
        width = 0 if not math.isfinite(r.noise_ratio) else int(200 * r.noise_ratio / worst)
        out.append(
            f"<tr><td>{k}</td><td class='l'>{html.escape(r.node)}</td><td class='l'>{html.escape(r.op_type)}</td>"
            f"<td>{r.noise_ratio:.3e}</td><td>{_db(r.sqnr_db)}</td><td>{_opt(r.top1_agreement, 4)}</td>"
            f"<td class='l'><span class='bar' style='width:{width}px'></span></td></tr>"
        )
    out.append("</table>")
    if len(sensitivity.ranking) > top:
        out.append(f'<p class="note">{len(sensitivity.ranking) - top} more layers not shown.</p>')
    if fallback:
        before, after = fallback.get("before", {}), fallback.get("after", {})
        share = fallback.get("float_mac_fraction")
        out.append("<h3>Automatic float fallback</h3>")
        out.append(
            "<p class='note'>"
            f"Target {fallback.get('target', fallback.get('target_agreement'))}: {'met' if fallback.get('met') else 'NOT met'}. "
            + (html.escape(str(fallback['reason'])) + " " if fallback.get("reason") else "")
            +
            f"{len(fallback.get('float_nodes', []))} of {fallback.get('quantized_layers')} quantized layers kept in float"
            + (f" ({100 * share:.1f}% of their MACs)" if isinstance(share, (int, float)) else "")
            + f". Agreement {_ratio(before.get('top1_agreement'))} → {_ratio(after.get('top1_agreement'))}, SQNR "
            f"{_db(before.get('sqnr_db'))} → {_db(after.get('sqnr_db'))} dB.</p>"
        )
        if fallback.get("float_nodes"):
            out.append("<p class='note'>Float layers: " + ", ".join(f"<code>{html.escape(n)}</code>" for n in fallback["float_nodes"]) + "</p>")
    return out


def _tensor_sections(tensors: Sequence[TensorReport], methods: Sequence[str], colours: Mapping[str, str]) -> list[str]:
    out = ["<h2>Per-tensor ranges</h2>"]
    out.append(
        '<p class="note">|x| histogram of each calibrated activation (log scale), with each method\'s threshold '
        "(amax) marked. SQNR is the activation's signal-to-quantization-noise ratio for that threshold, estimated "
        "from the histogram (rounding noise inside the range, clipping error beyond it).</p>"
    )
    out.append(
        "<p class='legend'>"
        + "".join(f"<span><span class='sw' style='background:{colours[m]}'></span>{html.escape(m)}</span>" for m in methods)
        + "</p>"
    )
    out.append("<table><tr><th class='l'>tensor</th>" + "".join(f"<th>{html.escape(m)} amax</th>" for m in methods) + "</tr>")
    for t in tensors:
        out.append(
            f"<tr><td class='l'><a href='#t{id_of(t.name)}'>{html.escape(t.name)}</a></td>"
            + "".join(f"<td>{_fmt(t.amax_by_method.get(m, math.nan))}</td>" for m in methods)
            + "</tr>"
        )
    out.append("</table>")
    for t in tensors:
        out.append(f"<h3 id='t{id_of(t.name)}'>{html.escape(t.name)}</h3>")
        if t.counts is not None and t.hist_amax is not None and t.hist_amax > 0:
            out.append(
                histogram_svg(
                    t.counts,
                    t.hist_amax,
                    {m: t.amax_by_method[m] for m in methods if m in t.amax_by_method},
                    colours,
                    title=f"|x| histogram of {t.name}",
                )
            )
        else:
            out.append("<p class='note'>No histogram recorded for this tensor.</p>")
        cells = []
        for m in methods:
            if m not in t.amax_by_method:
                continue
            a = t.amax_by_method[m]
            sqnr = activation_sqnr_db(t.counts, t.hist_amax, a) if t.counts is not None and t.hist_amax else math.nan
            cells.append(f"<tr><td class='l'>{html.escape(m)}</td><td>{_fmt(a)}</td><td>{_db(sqnr)}</td></tr>")
        out.append("<table><tr><th class='l'>method</th><th>amax</th><th>activation SQNR (dB)</th></tr>" + "".join(cells) + "</table>")
    return out


def id_of(name: str) -> str:
    # A stable anchor id for any tensor name (HTML ids cannot hold every character).
    import hashlib

    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]


def render_report(data: ReportData, *, top_layers: int = 40) -> str:
    """The HTML page (a str). Deterministic: the same data gives the same text."""
    if not isinstance(data, ReportData):
        raise ConfigError(f"render_report needs ReportData, got {type(data).__name__}")
    methods: list[str] = []
    for t in data.tensors:
        for m in t.amax_by_method:
            if m not in methods:
                methods.append(m)
    colours = _method_colours(methods)
    body = [f"<h1>{html.escape(data.title)}</h1>"]
    summary = [f"{len(data.tensors)} calibrated tensors", f"methods: {', '.join(methods) or 'none'}"]
    body.append(f"<p class='note'>{html.escape('; '.join(summary))}. Generated by trtcal {html.escape(__version__)}.</p>")
    for note in data.notes:
        body.append(f"<p class='note'>{html.escape(note)}</p>")
    if data.verdict:
        body += _verdict_section(data.verdict)
    if data.auto:
        body += _auto_section(data.auto, top_layers)
    if data.evaluation is not None:
        body += _evaluation_section(data.evaluation)
    if data.sensitivity is not None:
        body += _sensitivity_section(data.sensitivity, data.fallback, top_layers)
    if data.qdq:
        q = data.qdq
        body.append("<h2>Q/DQ export</h2><p class='note'>")
        body.append(
            html.escape(
                f"{len(q.get('quantized_nodes', []))} layers quantized, {len(q.get('residual_adds', []))} residual Adds, "
                f"kept float by the noise-reduction rule: {', '.join(q.get('kept_float_nodes', [])) or 'none'}; "
                f"excluded: {', '.join(q.get('excluded_nodes', [])) or 'none'}; "
                f"tensors without a range (left float): {', '.join(q.get('missing_tensors', [])) or 'none'}."
            )
        )
        body.append("</p>")
    if data.tensors:
        body += _tensor_sections(data.tensors, methods, colours)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(data.title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_report(data: ReportData, path: str | os.PathLike[str]) -> Path:
    """Render and write atomically (a reader never sees half a page)."""
    return write_bytes_atomic(path, render_report(data).encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Loading a result directory


def _read_json(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is not readable JSON ({exc})") from None


def _histograms(root: Path, ranges: Any) -> dict[str, tuple[np.ndarray, float]]:
    """{tensor: (counts, hist_amax)} from `trtcal.calibrate`'s histograms.npy and ranges.json.

    histograms.npy holds the int64 counts, one row per tensor of ranges.json["histogram_tensors"];
    each tensor's ranges.json entry gives its "histogram": {"row", "hist_amax", ...}.
    """
    if not isinstance(ranges, dict) or not ranges.get("histogram_file"):
        return {}
    path = root / str(ranges["histogram_file"])
    if not path.is_file():
        return {}
    try:
        counts = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable histogram file ({exc})") from None
    tensors: dict[str, Any] = ranges["tensors"] if isinstance(ranges.get("tensors"), dict) else {}
    out: dict[str, tuple[np.ndarray, float]] = {}
    for name in ranges.get("histogram_tensors") or []:
        summary = tensors.get(name, {}).get("histogram") if isinstance(tensors.get(name), dict) else None
        if not isinstance(summary, dict) or "row" not in summary or "hist_amax" not in summary:
            continue
        row = int(summary["row"])
        if counts.ndim != 2 or not 0 <= row < counts.shape[0]:
            raise ConfigError(f"{path}: row {row} of tensor {name!r} is outside the file's shape {counts.shape}")
        out[str(name)] = (np.array(counts[row], dtype=np.int64), float(summary["hist_amax"]))
    return out


def load_report_data(result_dir: str | os.PathLike[str], *, title: str | None = None) -> ReportData:
    """ReportData from a `trtcal calibrate` output directory: ranges.json (required) and
    histograms.npy, then evaluation.json, sensitivity.json, fallback.json and qdq_report.json when
    present (`trtcal eval` writes them)."""
    from trtcal.export.qdq import read_ranges

    root = Path(result_dir)
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        raise ConfigError(f"result directory {str(root)!r} {problem}; give the output directory of `trtcal calibrate`")
    ranges_path = root / "ranges.json"
    if not ranges_path.is_file():
        raise ConfigError(f"{root} has no ranges.json; give the output directory of `trtcal calibrate`")
    table = read_ranges(ranges_path)
    histograms = _histograms(root, _read_json(ranges_path))
    names: list[str] = []
    for by_tensor in table.values():
        for name in by_tensor:
            if name not in names:
                names.append(name)
    tensors = [
        TensorReport(
            name=name,
            amax_by_method={m: table[m][name] for m in table if name in table[m]},
            counts=histograms.get(name, (None, None))[0],
            hist_amax=histograms.get(name, (None, None))[1],
        )
        for name in names
    ]
    evaluation = sensitivity = fallback = qdq = None
    if (root / "evaluation.json").is_file():
        evaluation = EvaluationResult.from_dict(_read_json(root / "evaluation.json"))
    if (root / "sensitivity.json").is_file():
        sensitivity = SensitivityResult.from_dict(_read_json(root / "sensitivity.json"))
    if (root / "fallback.json").is_file():
        fallback = _read_json(root / "fallback.json")
    if (root / "qdq_report.json").is_file():
        qdq = _read_json(root / "qdq_report.json")
    notes = [] if histograms else ["No histograms were found in this result directory (histograms.npy)."]
    manifest = _read_json(root / "manifest.json") if (root / "manifest.json").is_file() else {}
    smoothing = manifest.get("smoothing") if isinstance(manifest, dict) else None
    if isinstance(smoothing, dict):  # which model these ranges belong to (docs/qdq.md, "Smoothing")
        notes.append(
            f"Smoothed (SmoothQuant, alpha {smoothing.get('alpha')}, {len(smoothing.get('sites') or {})} normalisation "
            f"outputs): the ranges, caches and model.qdq.onnx belong to {smoothing.get('model')} (sha256 "
            f"{str(smoothing.get('model_sha256'))[:12]}…), not to the original model."
        )
    raw_ranges = _read_json(ranges_path)
    raw_tensors = raw_ranges.get("tensors") if isinstance(raw_ranges, dict) else None
    auto = (
        {str(n): e["auto"] for n, e in raw_tensors.items() if isinstance(e, dict) and isinstance(e.get("auto"), dict)}
        if isinstance(raw_tensors, dict) else {}
    )
    return ReportData(
        verdict=manifest.get("verdict") if isinstance(manifest, dict) and isinstance(manifest.get("verdict"), dict) else None,
        auto=auto or None,
        title=title or f"trtcal calibration report: {root.resolve().name}",
        tensors=tuple(tensors),
        evaluation=evaluation,
        sensitivity=sensitivity,
        fallback=fallback,
        qdq=qdq,
        notes=tuple(notes),
    )
