"""`calibrate_dataset`: the end-to-end job behind `trtcal calibrate MODEL --data URL`.

Flow (each step skipped when the store already holds its result; keys in `orchestrator.keys`):

    key the batch request  ──hit──►  batch fingerprint  ──►  key the calibration ──hit──► copy out, done
          │ miss                                                   │ miss
          ▼                                                        ▼
    Ray workers build ONE Arrow batch ──► publish it ──►  calibration actor (GPU if any) ──► publish ──► copy out

`calibrate_dataset` is the named steps of a `Job`; each step but `obtain_batch` and the actor
runs without Ray. Artifacts are copied to `output` file by file (`trtcal._io.publish_dir`: each
file atomic, the manifest last; the user's files and evaluation.json stay).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trtcal._version import __version__
from trtcal.config import JobConfig
from trtcal.errors import BackendUnavailableError, ModelError, StorageError
from trtcal.export.artifacts import DEFAULT_CACHE, MANIFEST, OWNED_BY, cache_name, is_artifact_name
from trtcal.orchestrator.actor import (
    RUN_RECORD,
    ActorRequest,
    ActorResult,
    BatchSource,
    model_inputs,
    open_given_batch,
    resolve_device,
    run_actor,
)
from trtcal.orchestrator.keys import (
    batch_key_inputs,
    calibration_key_inputs,
    hit_runner_devices,
    model_input_spec,
    runner_id,
    smoothing_key,
)
from trtcal.progress import NO_PROGRESS, ProgressCallback

__all__ = ["DatasetResult", "Job", "calibrate_dataset", "STAGE_LABELS"]

logger = logging.getLogger(__name__)

BATCH_ARTIFACT = "batch.arrow"
ENTRY_RECORD = "entry.json"
GIVEN_BATCH_SUFFIXES = (".arrow", ".npy", ".npz")  # a prepared batch: no preprocessing
# (timing key, what the user reads), in the order the stages run.
STAGE_LABELS = (
    ("list_dataset", "list dataset"),
    ("start_ray", "start Ray"),
    ("preprocess", "preprocess"),
    ("publish_batch", "store batch"),
    ("calibrate.load_model", "load model"),
    ("calibrate.smoothing", "smoothing (channel max)"),
    ("calibrate.statistics", "pass 1 (max |x|)"),
    ("calibrate.histograms", "pass 2 (histograms)"),
    ("calibrate.scales", "scale search"),
    ("calibrate.auto_search", "auto search"),
    ("calibrate.verdict", "quality verdict"),
    ("calibrate.export_qdq", "Q/DQ export"),
    ("publish", "publish"),
    ("total", "total"),
)


@dataclass(frozen=True)
class DatasetResult:
    """What a job did: the key, where the artifacts are, and what it cost.

    `found_in` is the store that holds the entry (a read-from store on a read-through hit; empty when
    the result was not stored). `timings` has seconds per internal step; `stage_seconds` the same for
    the stages a user sees.
    """

    key: str
    batch_key: str
    store_url: str
    entry_url: str
    cache_hit: bool
    batch_reused: bool
    output_dir: Path | None
    artifacts: tuple[str, ...]
    num_tensors: int
    num_samples: int
    algorithms: tuple[str, ...]
    runner: str
    timings: Mapping[str, float]
    amax: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    published: bool = True
    warnings: tuple[str, ...] = ()
    found_in: str = ""
    verdict: Mapping[str, Any] | None = None  # held-out quality per method (trtcal.export.auto.verdict)
    smoothing: Mapping[str, Any] | None = None  # the manifest's "smoothing": the artifacts are of model.smoothed.onnx

    @property
    def stage_seconds(self) -> dict[str, float]:
        """Seconds per user-facing stage, in the order they ran (the table's and --json's `stages_s`)."""
        return {label: self.timings[name] for name, label in STAGE_LABELS if name in self.timings}

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "batch_key": self.batch_key,
            "store": self.store_url,
            "entry": self.entry_url,
            "cache_hit": self.cache_hit,
            "batch_reused": self.batch_reused,
            "output_dir": str(self.output_dir) if self.output_dir else None,
            "artifacts": list(self.artifacts),
            "tensors": self.num_tensors,
            "samples": self.num_samples,
            "algorithms": list(self.algorithms),
            "runner": self.runner,
            "published": self.published,
            "found_in": self.found_in or None,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "stages_s": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "warnings": list(self.warnings),
            "verdict": self.verdict,
            "smoothing": self.smoothing,
        }


def calibrate_dataset(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    config: JobConfig | None = None,
    progress: ProgressCallback = NO_PROGRESS,
    **options: Any,
) -> DatasetResult:
    """Calibrate `model` on a dataset URL end to end (see the module docstring for the flow).

    Args:
        model: path or fsspec URL of the FP32 ONNX model.
        data: dataset URL (image folder/prefix, list file, Parquet, .npy/.npz) or an `.arrow` batch.
        config: a JobConfig; keyword `options` replace its fields (`JobConfig.with_options`: a part
            such as ``calibration=``, or a part's field such as ``num_samples=``, ``store="s3://…"``).
        progress: receives, in order, "list dataset" (the listing digest of the batch key), "start Ray",
            "list" (shards), "preprocess" (images), "write" (the batch),
            "store batch", then from the calibration actor (relayed to this process) "statistics"
            (pass 1, samples), "histograms" (pass 2, samples), "search", "export", and "publish".
            Only the stages a run needs are reported (a cache hit reports only "list dataset").

    Raises:
        ConfigError, DataError, ModelError, StorageError, WorkerError, BackendUnavailableError.
    """
    from trtcal._io import sweep_stale_temp_dirs
    from trtcal.storage import compute_cache_key
    from trtcal.workers.ray_runtime import ray_session

    for stale in sweep_stale_temp_dirs():  # a killed run's temp dirs (also a hit sweeps them)
        logger.info("removed %s, left by an earlier run that was killed", stale)
    job = Job.open(model, data, (config or JobConfig()).with_options(**options), progress)
    if hit := job.lookup([runner_id(d, job.cfg.backend) for d in hit_runner_devices(job.cfg)]):
        logger.info("cache hit %s: no preprocessing, no inference", hit.key)
        return job.finish(hit)
    t0 = time.perf_counter()
    progress.start("start Ray", None, "")
    with ray_session(job.cfg.cluster.address, num_cpus=job.cfg.batch.workers) as session:
        import ray

        job.timings["start_ray"] = time.perf_counter() - t0
        progress.finish("start Ray")
        device = job.actor_device(ray)
        runner = runner_id("cuda" if device == "gpu" else "cpu", job.cfg.backend)
        with _owned_tempdir("job") as tmp:
            looked_up = job.fingerprint is not None
            source = job.obtain_batch(session, Path(tmp), progress)
            if not looked_up and (hit := job.lookup([runner])):  # someone calibrated this batch content already
                return job.finish(hit, batch_reused=not job.built_batch)
            # Concurrent jobs on this key compute once: the others wait for the entry (a store lease).
            key = compute_cache_key(job.key_inputs(runner)) if job.cfg.backend != "tensorrt" else None
            with job.store.compute_once(key) if key else contextlib.nullcontext() as existing:
                if existing is not None:
                    return job.finish(_Hit(existing, key, runner))
                t0 = time.perf_counter()
                result = run_actor(ray, device, job.actor_request(), source, progress)
                job.timings["calibrate"] = time.perf_counter() - t0
                entry = job.publish(result, runner, progress)
            return job.finish(entry, amax=result.amax)


@dataclass
class _Hit:
    """A store entry this job can finish with, and the key and runner it was found under."""

    entry: Any
    key: str
    runner: tuple[str, str]
    cache_hit: bool = True


class Job:
    """One `calibrate_dataset` run: its inputs, the batch it uses, and what each step measured."""

    def __init__(self, cfg: JobConfig, model_bytes: bytes, data: str, store: Any, model_sha: str | None = None) -> None:
        self.cfg = cfg
        self.model_bytes = model_bytes
        self.model_sha = model_sha or hashlib.sha256(model_bytes).hexdigest()
        self.data = data
        self.store = store
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []
        self.started = time.perf_counter()
        self.given_batch = Path(data.split("?")[0]).suffix.lower() in GIVEN_BATCH_SUFFIXES
        self.built_batch = False
        self.batch_entry: Any = None
        self.batch_inputs: dict[str, Any] = {}
        self.model_label = ""
        self.model_input: dict[str, Any] = {}
        self.smoothing: dict[str, Any] | None = None  # the key's smoothing record (orchestrator.keys.smoothing_key)
        self.spec: dict[str, Any]
        self.batch_key: str
        self.fingerprint: str | None

    @classmethod
    def open(
        cls, model: str | os.PathLike[str], data: str | os.PathLike[str], cfg: JobConfig, progress: ProgressCallback = NO_PROGRESS
    ) -> Job:
        """Read the model, open the store, key the batch (a given batch is its own key)."""
        from trtcal.storage import CacheStore, compute_cache_key

        store = CacheStore(
            cfg.store.resolved_url(), namespace=cfg.store.namespace, read_only=cfg.store.read_only,
            read_from=cfg.store.read_from, on_corrupt=cfg.store.on_corrupt, **dict(cfg.storage_options),
        )
        if not cfg.store.read_only:
            store.check_can_publish()  # before any work, not after it (issue 15 item 7)
        model_bytes, model_sha = _read_model(model, cfg.storage_options)
        job = cls(cfg, model_bytes, os.fspath(data), store, model_sha)
        job.model_label = os.fspath(model)
        job.smoothing = smoothing_key(model_bytes, cfg.calibration, cfg.backend, model=job.model_label)
        if job.given_batch:
            batch = open_given_batch(job.data, job.model_bytes, cfg.storage_options, job.declared_inputs())
            if cfg.backend != "tensorrt":  # TensorRT's calibrator reads the batch its own way
                _check_batch_fits_model(batch, job.model_bytes, job.model_label)
            job.spec, job.batch_key, job.fingerprint = dict(batch.spec), batch.fingerprint, batch.fingerprint
        else:
            from trtcal.config import BatchConfig
            from trtcal.workers.listing_digest import listing_digest
            from trtcal.workers.sources import open_dataset

            if cfg.batch.inputs or cfg.batch.tokenizer is not None:  # text: the batch feeds every declared input
                job.model_input = {"inputs": model_inputs(job.model_bytes)}
            else:
                job.model_input = model_input_spec(
                    job.model_bytes, cfg.batch.input_name, model=job.model_label, default=BatchConfig().input_name
                )
            t0 = time.perf_counter()
            progress.start("list dataset", None, "")
            listing = listing_digest(open_dataset(job.data, cfg.storage_options))
            progress.finish("list dataset")
            job.timings["list_dataset"] = time.perf_counter() - t0
            job.spec = cfg.batch.preprocess.to_dict()
            job.batch_inputs = batch_key_inputs(
                job.data, cfg.batch, listing_sha256=listing.sha256, listing_files=listing.files, model_input=job.model_input
            )
            job.batch_key = compute_cache_key(job.batch_inputs)
            job.batch_entry = store.get(job.batch_key, lazy=True)
            job.fingerprint = job.batch_entry.extra.get("fingerprint") if job.batch_entry is not None else None
        return job

    def key_inputs(self, runner: tuple[str, str]) -> Any:
        return calibration_key_inputs(
            self.model_sha, str(self.fingerprint), self.spec, self.cfg.calibration, runner, smoothing=self.smoothing
        )

    def lookup(self, runners: list[tuple[str, str]]) -> _Hit | None:
        """The stored calibration of this batch content by one of `runners`, if any (needs no Ray)."""
        from trtcal.storage import compute_cache_key

        if self.fingerprint is None:
            return None
        for runner in runners:
            key = compute_cache_key(self.key_inputs(runner))
            entry = self.store.get(key)
            if entry is not None:
                return _Hit(entry, key, runner)
        return None

    def actor_device(self, ray: Any) -> str:
        """"cpu" or "gpu" for the calibration actor; a TensorRT job without a GPU fails here."""
        if self.cfg.backend == "tensorrt" and float(ray.cluster_resources().get("GPU", 0.0)) < 1:
            raise BackendUnavailableError(
                "--backend tensorrt runs TensorRT 10's calibrator on a GPU, but the Ray cluster has no GPU; "
                "use the default onnxruntime backend, or run on a cluster with a GPU node that has TensorRT 10"
            )
        return resolve_device(ray, "gpu" if self.cfg.backend == "tensorrt" else self.cfg.cluster.device)

    def obtain_batch(self, session: Any, tmp: Path, progress: ProgressCallback) -> BatchSource:
        """The given batch, the stored one, or one built now on Ray (and published unless read-only)."""
        if self.given_batch:
            return BatchSource.at(self.data)
        if self.batch_entry is not None:
            return BatchSource.at(_local_or_remote(self.batch_entry, tmp))
        # Concurrent jobs on one dataset build the batch once; the others wait for it (a store lease).
        with self.store.compute_once(self.batch_key) as existing:
            if existing is not None:
                self.batch_entry = existing
                self.fingerprint = existing.extra.get("fingerprint")
                return BatchSource.at(_local_or_remote(existing, tmp))
            return self._build_and_store_batch(session, tmp, progress)

    def _build_and_store_batch(self, session: Any, tmp: Path, progress: ProgressCallback) -> BatchSource:
        from trtcal.workers.build import build_batch_on

        t0 = time.perf_counter()
        local_batch = tmp / BATCH_ARTIFACT
        batch_cfg = replace(self.cfg.batch, input_name=self.model_input.get("name", self.cfg.batch.input_name))
        report = build_batch_on(
            session, self.data, str(local_batch), batch_cfg, progress=progress, storage_options=self.cfg.storage_options,
        )
        self.built_batch = True
        self.warnings.extend(report.warnings)
        self.timings["preprocess"] = time.perf_counter() - t0
        self.fingerprint = report.fingerprint
        source = BatchSource(local_path=str(local_batch))
        if self.store.read_only:
            return source
        t0 = time.perf_counter()
        progress.start("store batch", None, "")
        stored = self.store.publish(
            self.batch_key, {BATCH_ARTIFACT: local_batch}, key_inputs=self.batch_inputs,
            extra={"fingerprint": report.fingerprint, "num_rows": report.num_rows,
                   "skipped": len(report.skipped), "build": _build_summary(report)},
        )
        progress.finish("store batch")
        self.timings["publish_batch"] = time.perf_counter() - t0
        # An actor on another node reads the stored copy (s3://…) rather than this node's file.
        return replace(source, shared_url=BatchSource.at(stored.artifact_url(BATCH_ARTIFACT)).shared_url)

    def actor_request(self) -> ActorRequest:
        cfg = self.cfg
        return ActorRequest(
            model_bytes=self.model_bytes, batch_url="", calibration=cfg.calibration,
            storage_options=dict(cfg.storage_options), export_qdq=cfg.export_qdq, backend=cfg.backend,
            model_label=self.model_label, inputs=self.declared_inputs(),
        )

    def declared_inputs(self) -> dict[str, Any]:
        """--inputs in JSON form ({} when none): a given .npy/.npz batch is fed as they declare."""
        from trtcal.config import input_specs_to_dict

        return input_specs_to_dict(self.cfg.batch.inputs) if self.cfg.batch.inputs else {}

    def publish(self, result: ActorResult, runner: tuple[str, str], progress: ProgressCallback) -> _Hit:
        """Store the actor's artifacts under their key (TensorRT: keyed by the version that really ran)."""
        from trtcal.storage import compute_cache_key

        if self.cfg.backend == "tensorrt":
            runner = result.runner_id
        key_inputs = self.key_inputs(runner)
        key = compute_cache_key(key_inputs)
        for stage, seconds in result.timings.items():
            self.timings[f"calibrate.{stage}"] = seconds
        self.warnings.extend(result.warnings)
        extra = {
            "trtcal_version": __version__, "runner": result.runner, "num_samples": result.num_samples,
            "num_tensors": result.num_tensors, "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "batch_key": self.batch_key, "verdict": result.verdict,
        }
        if (result.smoothing is None) != (self.smoothing is None):  # the key must say what the actor did
            from trtcal.errors import InternalError

            raise InternalError(f"the key expected smoothing {self.smoothing} but the actor smoothed {result.smoothing}")
        if result.smoothing is not None:
            extra["smoothing"] = result.smoothing
        progress.start("publish", None, "")
        t0 = time.perf_counter()
        if self.store.read_only:
            entry: Any = _MemoryEntry(key, result.files, key_inputs, extra)
            self.warnings.append("read-only store: the result was computed but not published")
        else:
            entry = self.store.publish(key, result.files, key_inputs=key_inputs, extra=extra)
        self.timings["publish"] = time.perf_counter() - t0
        progress.finish("publish")
        return _Hit(entry, key, runner, cache_hit=False)

    def finish(
        self, hit: _Hit, *, batch_reused: bool = True, amax: Mapping[str, Mapping[str, float]] | None = None
    ) -> DatasetResult:
        """Copy the artifacts out (with `output`) and describe the run."""
        self.timings["total"] = time.perf_counter() - self.started
        entry, cfg = hit.entry, self.cfg
        verdict = _checked_verdict(hit.key, entry.extra, cfg.calibration.min_sqnr)
        if verdict is not None and verdict.get("warning"):
            self.warnings.append(str(verdict["warning"]))
        output = Path(cfg.output).expanduser().resolve() if cfg.output else None
        names: tuple[str, ...] = tuple(n for n in entry.names if n != BATCH_ARTIFACT)
        if output is not None:
            names = _copy_out(entry, output, cfg)
        extra = entry.extra
        return DatasetResult(
            key=hit.key, batch_key=self.batch_key, store_url=self.store.url, entry_url=getattr(entry, "url", ""),
            cache_hit=hit.cache_hit, batch_reused=batch_reused if hit.cache_hit else (self.given_batch or not self.built_batch),
            output_dir=output, artifacts=names, num_tensors=int(extra.get("num_tensors", 0)),
            num_samples=int(extra.get("num_samples", 0)), algorithms=cfg.calibration.algorithms,
            runner=f"{hit.runner[0]} {hit.runner[1]}", timings=dict(self.timings), amax=dict(amax or {}),
            published=not isinstance(entry, _MemoryEntry), warnings=tuple(self.warnings),
            found_in=str(getattr(entry, "store_url", "")), verdict=verdict,
            smoothing=extra.get("smoothing") if isinstance(extra.get("smoothing"), Mapping) else None,
        )


@contextlib.contextmanager
def _owned_tempdir(kind: str) -> Iterator[str]:
    """A temp dir a later run can sweep if this one is killed (`trtcal._io.sweep_stale_temp_dirs`)."""
    from trtcal._io import owned_temp_dir

    path = owned_temp_dir(kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _checked_verdict(key: str, extra: Mapping[str, Any], min_sqnr: float | None) -> Mapping[str, Any] | None:
    """The entry's recorded verdict; a stored result must meet --min-sqnr too (checked before copying out)."""
    verdict = extra.get("verdict") if isinstance(extra.get("verdict"), Mapping) else None
    if min_sqnr is not None:
        from trtcal.export.auto_calibration import QualityError, check_min_sqnr

        if verdict is None:
            raise QualityError(
                f"--min-sqnr: the stored result {key} records no quality verdict (written by an older trtcal); "
                "recalibrate into another store or namespace to judge it"
            )
        check_min_sqnr(verdict, min_sqnr)
    return verdict


def _read_model(model: str | os.PathLike[str], storage_options: Mapping[str, Any]) -> tuple[bytes, str]:
    """(the model as bytes the actor can load alone, its sha256 as keyed).

    A local model with external data (weights in files beside the .onnx) is loaded with them —
    validated and hashed by `trtcal.model.load_model`, as the library does — and sent embedded:
    only the .onnx file used to reach the actor, which then failed on the missing weights."""
    from trtcal._io import read_url_bytes

    text = os.fspath(model)
    try:
        data = read_url_bytes(text, storage_options)
    except FileNotFoundError:
        raise ModelError(f"ONNX model {text!r} does not exist; give the path or URL of an ONNX file") from None
    except IsADirectoryError:
        raise ModelError(f"model {text!r} is a directory; give the path of an ONNX file") from None
    except OSError as exc:
        raise ModelError(f"cannot read model {text!r}: {exc}") from None
    if b"location" not in data or not _has_external_data(data):
        return data, hashlib.sha256(data).hexdigest()
    if "://" in text and not text.startswith("file://"):
        raise ModelError(f"model {text!r} keeps its weights in external data files; give a local path to it (with them beside it)")
    from trtcal.model import load_model

    loaded = load_model(text.removeprefix("file://"))
    for init in loaded.proto.graph.initializer:  # now embedded: the same bytes as a model saved that way
        if init.HasField("data_location") and init.data_location == init.DEFAULT:
            init.ClearField("data_location")
    try:
        embedded = loaded.proto.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GB limit
        raise ModelError(f"model {text!r} with its external data is over 2 GB ({exc}); not supported by `trtcal calibrate` yet") from None
    return embedded, loaded.sha256


def _check_batch_fits_model(batch: Any, model_bytes: bytes, model_label: str) -> None:
    """A given batch against the model's inputs (names, ranks, declared batch axes, dtypes) before Ray
    starts: the DataError the calibration actor would raise (`trtcal.runners.base.batch_layout`), in
    a second instead of after Ray's start-up."""
    import onnx

    from trtcal.model import model_inputs as graph_inputs
    from trtcal.runners.base import batch_layout

    try:
        proto = onnx.load_from_string(model_bytes)
    except Exception:  # judged, with the user's path in the message, by the actor's load
        return
    batch_layout(graph_inputs(proto), batch, model_label)


def _has_external_data(data: bytes) -> bool:
    import onnx

    try:
        graph = onnx.load_from_string(data).graph
    except Exception:  # judged (with the user's path in the message) by model_input_spec
        return False
    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in graph.initializer)


def _build_summary(report: Any) -> dict[str, Any]:
    return {
        "num_candidates": report.num_candidates,
        "num_selected": report.num_selected,
        "skipped": [b.to_dict() for b in report.skipped][:1000],
        "workers": report.workers,
        "wall_seconds": {k: round(v, 3) for k, v in report.wall_seconds.items()},
    }


def _local_or_remote(entry: Any, tmp: Path) -> str:
    url = str(entry.artifact_url(BATCH_ARTIFACT))
    if url.startswith("memory://"):
        return str(entry.download(BATCH_ARTIFACT, tmp / BATCH_ARTIFACT))
    return url


def _copy_out(entry: Any, output: Path, cfg: JobConfig) -> tuple[str, ...]:
    """The entry's artifacts into `output`, file by file (only trtcal's own names are touched).

    Caches get the header of the asked TensorRT version; the calibration's manifest (stored as
    run.json) becomes manifest.json again, and the store entry's manifest is entry.json.
    """
    from trtcal._io import publish_dir
    from trtcal.core.cache_format import retarget_trt_cache

    cal = cfg.calibration
    cache_method = {cache_name(m): m for m in cal.algorithms}
    cache_method[DEFAULT_CACHE] = cal.algorithms[0]
    files: dict[str, bytes] = {}
    for name in entry.names:
        if name == BATCH_ARTIFACT:
            continue
        data = entry.read(name)
        if name in cache_method:
            data = retarget_trt_cache(data, trt_version=cal.trt_version, algorithm=cache_method[name])
        files[MANIFEST if name == RUN_RECORD else name] = data
    files[ENTRY_RECORD] = (json.dumps(entry.manifest, sort_keys=True, indent=2) + "\n").encode("utf-8")
    try:
        publish_dir(output, files, owned_by=OWNED_BY, is_own_name=is_artifact_name, force=cfg.force)
    except OSError as exc:
        raise StorageError(
            f"cannot write the artifacts to --output {str(output)!r} ({exc.strerror or exc}); the store entry is "
            "complete — free space (or fix permissions) and rerun, which copies it out without recomputing",
            url=str(output),
        ) from exc
    return tuple(sorted(files))


@dataclass
class _MemoryEntry:
    """A computed but unpublished result (read-only stores), shaped like a store Entry for copying out."""

    key: str
    files: dict[str, bytes]
    key_inputs: Any
    extra_data: dict[str, Any]
    url: str = "(not published: read-only store)"

    @property
    def names(self) -> list[str]:
        return sorted(self.files)

    @property
    def extra(self) -> dict[str, Any]:
        return self.extra_data

    @property
    def manifest(self) -> dict[str, Any]:
        from trtcal.storage.keys import key_inputs_dict

        return {"key": self.key, "key_inputs": key_inputs_dict(self.key_inputs), "extra": self.extra_data, "published": False}

    def read(self, name: str) -> bytes:
        return self.files[name]
