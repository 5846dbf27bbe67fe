"""What the image build (`build.py`) and the text build (`text.py`) share: one build's state, the
Ray task runner, bad-input records and the build report. Its own module so neither build imports the other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trtcal._secrets import driver_env, forwarded_env
from trtcal.config import BatchConfig
from trtcal.errors import StorageError, TrtcalError, WorkerError
from trtcal.progress import ProgressCallback
from trtcal.workers.sources import Dataset
from trtcal.workers.tasks import _list_task, _process_task, _resolve_task

_MAX_LISTED_IN_ERROR = 100


@dataclass(frozen=True)
class BadInput:
    """A file (or row) that could not be used, and why (`reason` is one of preprocess.REJECT_REASONS)."""

    sample_id: str
    location: str
    reason: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"sample_id": self.sample_id, "location": self.location, "reason": self.reason, "detail": self.detail}

    def __str__(self) -> str:
        return f"{self.location}: {self.reason} ({self.detail})"


@dataclass(frozen=True)
class BuildReport:
    """What `build_batch` published.

    Attributes:
        output_url, fingerprint, num_rows, inputs (name, shape, dtype), nbytes: the batch.
        spec: the document stored as the batch's spec (``preprocess`` + ``skipped_inputs`` +
            ``refused_entries``).
        num_requested (None = all), num_candidates (samples in the dataset), num_selected.
        skipped: selected inputs left out (on_bad_input="skip").
        refused: entries refused while listing (links outside the root, unreadable containers, ...).
        ignored_files: files ignored for their extension or a hidden name.
        workers: tasks in flight at once.
        wall_seconds: list / select / process / write / total, on the driver's clock.
        worker_seconds: read / decode / transform, summed over tasks.
        warnings: what the caller should be told (fewer samples than asked, ...).
    """

    output_url: str
    fingerprint: str
    num_rows: int
    inputs: tuple[Any, ...]
    nbytes: int
    spec: Mapping[str, Any]
    num_requested: int | None
    num_candidates: int
    num_selected: int
    skipped: tuple[BadInput, ...]
    refused: tuple[BadInput, ...]
    ignored_files: int
    workers: int
    wall_seconds: Mapping[str, float]
    worker_seconds: Mapping[str, float]
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_url": self.output_url,
            "fingerprint": self.fingerprint,
            "num_rows": self.num_rows,
            "inputs": [i.to_dict() for i in self.inputs],
            "nbytes": self.nbytes,
            "spec": dict(self.spec),
            "num_requested": self.num_requested,
            "num_candidates": self.num_candidates,
            "num_selected": self.num_selected,
            "skipped": [b.to_dict() for b in self.skipped],
            "refused": [b.to_dict() for b in self.refused],
            "ignored_files": self.ignored_files,
            "workers": self.workers,
            "wall_seconds": dict(self.wall_seconds),
            "worker_seconds": dict(self.worker_seconds),
            "warnings": list(self.warnings),
        }


def _with_env(env: Mapping[str, str], body: Callable[..., Any], *args: Any) -> Any:
    """The remote function of every build task: `body(*args)` with the driver's credentials set."""
    with forwarded_env(env):
        return body(*args)


class _Task:
    """`task.remote(*args)` runs `body(*args)` on Ray with the driver's credentials (`driver_env`)."""

    def __init__(self, ray: Any, body: Callable[..., Any], env: Mapping[str, str], options: Mapping[str, Any]) -> None:
        self._remote = ray.remote(_with_env).options(name=body.__name__, **options)
        self._body = body
        self._env = dict(env)

    def remote(self, *args: Any) -> Any:
        return self._remote.remote(self._env, self._body, *args)


class _Runner:
    """Runs task bodies on Ray with at most `workers` in flight, results consumed as they finish.

    The driver's storage credentials from its environment (`trtcal._secrets.driver_env`) go with every
    task as an argument, so workers on other nodes read what the driver can read.
    """

    def __init__(self, ray: Any, workers: int, max_retries: int, runtime_env: Mapping[str, Any] | None) -> None:
        self.ray = ray
        self.workers = workers
        self.options: dict[str, Any] = {"num_cpus": 1, "max_retries": max_retries, "retry_exceptions": False}
        if runtime_env:
            self.options["runtime_env"] = dict(runtime_env)
        self.env = driver_env()
        self.list_task = self.task(_list_task, num_returns=2)
        self.resolve_task = self.task(_resolve_task)
        self.process_task = self.task(_process_task)
        try:
            self.node_id: str | None = ray.get_runtime_context().get_node_id()
        except Exception:  # pragma: no cover - a driver outside any node: rows travel back
            self.node_id = None

    def task(self, body: Callable[..., Any], **options: Any) -> _Task:
        return _Task(self.ray, body, self.env, {**self.options, **options})

    def map_unordered(
        self, submit: Callable[[Any], Any], items: Iterable[Any], on_result: Callable[[Any, Any], None],
        *, in_flight: int | None = None,
    ) -> None:
        """submit(item) -> ObjectRef for each item, at most `in_flight` (default `workers`) pending;
        on_result(item, value)."""
        limit = in_flight or self.workers
        pending: dict[Any, Any] = {}
        queue = iter(items)
        exhausted = False

        def refill() -> None:
            nonlocal exhausted
            while not exhausted and len(pending) < limit:
                try:
                    item = next(queue)
                except StopIteration:
                    exhausted = True
                    return
                pending[submit(item)] = item

        try:
            refill()
            while pending:
                ready, _ = self.ray.wait(list(pending), num_returns=1)
                done = [(ref, pending.pop(ref)) for ref in ready]
                refill()  # keep the workers busy while the driver handles what came back
                for ref, item in done:
                    on_result(item, self.get(ref))
        except BaseException:
            for ref in pending:
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # best effort: it may have finished meanwhile
                    pass
            raise

    def get(self, ref: Any) -> Any:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, TrtcalError):
                raise cause from None
            raise WorkerError(f"a trtcal task failed: {cause!r}" if cause is not None else f"a trtcal task failed: {exc}") from exc
        except ray.exceptions.RayError as exc:
            raise WorkerError(
                f"a trtcal task was lost even after Ray's retries ({type(exc).__name__}: {exc}); "
                "check worker memory and node health"
            ) from exc


def _location(dataset: Dataset, path_or_rel: str) -> str:
    if dataset.is_local:
        return path_or_rel if os.path.isabs(path_or_rel) else os.path.join(dataset.root, path_or_rel)
    full = path_or_rel if path_or_rel.startswith(dataset.root) else dataset.join(path_or_rel)
    return f"{dataset.protocol}://{full}"


# What an object store answers a reader whose credentials are missing or refused (botocore, gcsfs, adlfs).
_ACCESS_ERRORS = (
    "NoCredentialsError", "PartialCredentialsError", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "Forbidden", "AuthorizationFailure", "AuthenticationFailed",
)


def refuse_access_failures(dataset: Dataset, bad: Iterable[BadInput]) -> None:
    """One StorageError when a worker could not read the dataset for want of credentials.

    That is never a bad input to skip: the nodes without credentials would leave out every sample
    they drew, silently. Names the dataset URL, never a credential.
    """
    for item in bad:
        if item.reason == "unreadable" and any(name in item.detail for name in _ACCESS_ERRORS):
            raise StorageError(
                f"Ray workers cannot read {dataset.display_url} ({item.detail.splitlines()[0][:200]}): the credentials "
                "they read it with are missing or refused on their node. Give them to the driver's environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN: trtcal hands them to its Ray "
                "tasks) or as --storage-option key=... secret=..., or to the cluster's nodes (an instance role, "
                "a Kubernetes Secret). Nothing was published.",
                url=dataset.display_url,
            )


def _bad_input_message(what: str, bad: Sequence[BadInput], advice: str) -> str:
    counts: dict[str, int] = {}
    for b in bad:
        counts[b.reason] = counts.get(b.reason, 0) + 1
    summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
    lines = [f"  {b}" for b in bad[:_MAX_LISTED_IN_ERROR]]
    if len(bad) > _MAX_LISTED_IN_ERROR:
        lines.append(f"  ... and {len(bad) - _MAX_LISTED_IN_ERROR} more")
    return f"{what}: {len(bad)} bad input(s) ({summary}):\n" + "\n".join(lines) + f"\n{advice}"


@dataclass(frozen=True)
class _Build:
    """What every stage of one build needs (the dataset, where the batch goes, how, and the task runner)."""

    run: _Runner
    dataset: Dataset
    output_url: str
    out_options: Mapping[str, Any]
    config: BatchConfig
    workers: int
    progress: ProgressCallback

    @property
    def skip(self) -> bool:
        return self.config.on_bad_input == "skip"
