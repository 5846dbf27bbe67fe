"""Text and token datasets -> ONE calibration batch with one fixed_shape_tensor column per model input.

Sources (a file, or a folder/prefix holding such files; docs/inputs.md):

* JSONL (``.jsonl``/``.ndjson``): one JSON object per line; token-id columns (``"input_ids":
  [101, 2023, ...]``) or, with a tokenizer, a raw-text field (``text_field``, default "text");
* Parquet (``.parquet``/``.pq``) with list-of-integer (or number) columns, or a text column;
* ``.txt`` with a tokenizer: one text per non-empty line.

A tokenizer is ``package.module:function`` (called with one string, returns a mapping column ->
sequence of token ids) or a Hugging Face ``tokenizer.json`` (the `tokenizers` library, extra
``trtcal[text]``: columns ``input_ids``, ``attention_mask``, ``token_type_ids``). Every data input
must be declared (`trtcal.config.InputSpec`); ``length`` pads (``pad_value``; a mask input pads
with 0 and is derived from the unpadded length when the data lacks it) or truncates the last axis.

Determinism as for images: rows are counted per file in sorted path order, the draw is
`select_samples` (seeded PCG64), each row's arrays are a pure function of the row, and the batch
is written sorted by sample id (``relpath#row``): the same bytes for any number of workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trtcal.config import BatchConfig, InputSpec, input_specs_to_dict
from trtcal.errors import BackendUnavailableError, ConfigError, DataError
from trtcal.workers.preprocess import InputRejected, load_function
from trtcal.workers.selection import make_sample_id, path_sort_key, select_samples

if TYPE_CHECKING:
    from trtcal.workers.build_base import BuildReport, _Build
    from trtcal.workers.sources import Dataset

__all__ = [
    "JSONL_EXTENSIONS", "TokenizerRef", "is_text_request", "list_text_files", "encode_record", "load_tokenizer",
    "tokenizer_ref", "build_text", "text_document",
]

logger = logging.getLogger(__name__)

JSONL_EXTENSIONS = (".jsonl", ".ndjson")
PARQUET_EXTENSIONS = (".parquet", ".pq")
LINES_EXTENSIONS = (".txt",)
_ROWS_PER_TASK = 256


def _kind(name: str, tokenizer: bool) -> str | None:
    lower = name.lower()
    if lower.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    if lower.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    if tokenizer and lower.endswith(LINES_EXTENSIONS):
        return "lines"
    return None


def is_text_request(dataset: Dataset, config: BatchConfig) -> bool:
    """Whether `build_batch` takes the text path: a tokenizer is given, the data is JSONL, or data inputs
    are declared and the data is Parquet (image Parquet has no declared inputs)."""
    if config.tokenizer is not None:
        return True
    declared = any(not s.is_constant for s in config.inputs)
    if dataset.layout != "folder":
        kind = _kind(dataset.target, tokenizer=False)
        return kind == "jsonl" or (kind == "parquet" and declared)
    if not declared:
        return False
    kinds = {_kind(rel, tokenizer=False) for rel, _ in list_text_files(dataset, tokenizer=False, strict=False)}
    return bool(kinds - {None})


def open_text_dataset(url: str, storage_options: Mapping[str, Any] | None = None) -> Dataset:
    """`sources.open_dataset` for one JSONL file (which the image/tensor opener does not know)."""
    import os
    import posixpath

    import fsspec

    from trtcal.errors import StorageError
    from trtcal.workers.sources import Dataset, storage_options_for

    options = storage_options_for(url, storage_options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if protocol in ("file", "local"):
            protocol, path = "file", os.path.abspath(path)
        exists = fs.isfile(path)
    except (ImportError, OSError, ValueError) as exc:
        raise StorageError(f"cannot open {url}: {exc}", url=url) from None
    if not exists:
        raise DataError(f"dataset {url} does not exist (no such file)")
    return Dataset(url=url, protocol=protocol, root=posixpath.dirname(path) if protocol != "file" else os.path.dirname(path),
                   target=path, layout="file", storage_options=options)


def is_jsonl_url(url: str) -> bool:
    return url.split("?")[0].lower().endswith(JSONL_EXTENSIONS)


def list_text_files(dataset: Dataset, *, tokenizer: bool, strict: bool = True) -> list[tuple[str, str]]:
    """(relpath, path) of the text/token files of a dataset, in global sorted order (one `find`: text
    calibration sets are small). Hidden names are skipped; with `strict`, other dataset files refuse."""
    import posixpath

    if dataset.layout != "folder":
        name = posixpath.basename(dataset.target)
        if strict and _kind(name, tokenizer) is None:
            raise DataError(f"dataset {dataset.display_url}: {name!r} is not a .jsonl, .parquet or (with a tokenizer) .txt file")
        return [(name, dataset.target)]
    fs = dataset.filesystem()
    found = []
    for path in fs.find(dataset.root):
        rel = dataset.relative(path) if not dataset.is_local else path[len(dataset.root.rstrip("/")) + 1 :]
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if _kind(rel, tokenizer) is not None:
            found.append((rel, path))
    if strict and not found:
        raise DataError(f"dataset {dataset.display_url} holds no .jsonl, .parquet or (with a tokenizer) .txt files")
    return sorted(found, key=lambda item: path_sort_key(item[0]))


# ---------------------------------------------------------------------------------------------
# Reading records


def _lines(fs: Any, path: str) -> list[str]:
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputRejected("corrupt", f"not UTF-8 text ({exc})") from None
    return [line for line in text.splitlines() if line.strip()]


def count_rows(fs: Any, path: str, kind: str) -> int:
    """Records in one file (non-empty lines; Parquet rows from the metadata)."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            return int(pq.ParquetFile(f).metadata.num_rows)
    return len(_lines(fs, path))


def read_records(fs: Any, path: str, kind: str, rows: Sequence[int], text_field: str) -> dict[int, Any]:
    """row -> record (a mapping column -> value) for the requested rows of one file."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        return {row: {name: table.column(name)[row].as_py() for name in table.column_names} for row in rows}
    lines = _lines(fs, path)
    out: dict[int, Any] = {}
    for row in rows:
        if not 0 <= row < len(lines):
            raise InputRejected("corrupt", f"row {row} is outside the file's {len(lines)} records (changed since listing?)")
        if kind == "lines":
            out[row] = {text_field: lines[row]}
            continue
        try:
            out[row] = json.loads(lines[row])
        except json.JSONDecodeError as exc:
            out[row] = InputRejected("corrupt", f"line {row + 1} is not JSON ({exc})")
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizers


@dataclass(frozen=True)
class TokenizerRef:
    """What the tasks get: a function path, or the content of a tokenizer.json (nodes need not see the file)."""

    function: str | None = None
    json_text: str | None = None

    @property
    def sha256(self) -> str | None:
        return None if self.json_text is None else hashlib.sha256(self.json_text.encode("utf-8")).hexdigest()


def tokenizer_ref(tokenizer: str | None) -> TokenizerRef | None:
    """Resolve `BatchConfig.tokenizer` on the driver: a path to tokenizer.json is read here."""
    if tokenizer is None:
        return None
    if tokenizer.endswith(".json"):
        try:
            with open(tokenizer, encoding="utf-8") as f:
                return TokenizerRef(json_text=f.read())
        except OSError as exc:
            raise ConfigError(f"tokenizer: cannot read {tokenizer!r} ({exc})") from None
    load_function(tokenizer)  # fail early, on the driver, for a bad name
    return TokenizerRef(function=tokenizer)


_loaded: dict[Any, Callable[[str], Mapping[str, Any]]] = {}


def load_tokenizer(ref: TokenizerRef) -> Callable[[str], Mapping[str, Any]]:
    """text -> {column: token ids}; cached per process."""
    key = ref.function or ref.sha256
    if key in _loaded:
        return _loaded[key]
    if ref.function is not None:
        fn: Callable[[str], Mapping[str, Any]] = load_function(ref.function)
    else:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BackendUnavailableError("a tokenizer.json needs the tokenizers library: pip install 'trtcal[text]'") from None
        try:
            hf = Tokenizer.from_str(ref.json_text or "")
        except Exception as exc:
            raise ConfigError(f"tokenizer: not a valid tokenizer.json ({exc})") from None

        def fn(text: str) -> Mapping[str, Any]:
            encoding = hf.encode(text)
            return {"input_ids": encoding.ids, "attention_mask": encoding.attention_mask, "token_type_ids": encoding.type_ids}

    _loaded[key] = fn
    return fn


# ---------------------------------------------------------------------------------------------
# One record -> model inputs


def _fit(values: npt.NDArray[Any], length: int | None, pad_value: float) -> npt.NDArray[Any]:
    """Truncate or pad the last axis to `length`."""
    if length is None or values.ndim == 0:
        return values
    have = values.shape[-1]
    if have >= length:
        return values[..., :length]
    padding = [(0, 0)] * (values.ndim - 1) + [(0, length - have)]
    return np.pad(values, padding, constant_values=pad_value)


def encode_record(
    record: Mapping[str, Any], specs: Sequence[InputSpec], tokenize: Callable[[str], Mapping[str, Any]] | None,
    text_field: str,
) -> dict[str, npt.NDArray[Any]]:
    """One record -> {input name: array} for the declared data inputs. InputRejected naming the column."""
    if not isinstance(record, Mapping):
        raise InputRejected("corrupt", f"a record must be a JSON object, got {type(record).__name__}")
    columns: Mapping[str, Any] = record
    if tokenize is not None:
        text = record.get(text_field)
        if not isinstance(text, str):
            raise InputRejected("corrupt", f"field {text_field!r} is missing or not a string (keys: {sorted(record)[:10]})")
        try:
            columns = tokenize(text)
        except Exception as exc:
            raise InputRejected("function-error", f"the tokenizer raised {type(exc).__name__}: {exc}") from None
        if not isinstance(columns, Mapping):
            raise InputRejected("bad-output", f"the tokenizer returned a {type(columns).__name__}, not a mapping column -> ids")
    out: dict[str, npt.NDArray[Any]] = {}
    unpadded = None
    for spec in specs:
        if spec.is_constant or spec.source_column not in columns:
            continue
        try:
            values = np.asarray(columns[spec.source_column])
        except (TypeError, ValueError):
            values = np.asarray(None)
        if values.dtype.kind not in "biuf" or values.size == 0:
            raise InputRejected("bad-output", f"column {spec.source_column!r}: expected numbers, got {str(columns[spec.source_column])[:60]}")
        if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
            raise InputRejected("bad-output", f"column {spec.source_column!r}: NaN or Inf")
        if unpadded is None and not spec.mask:
            unpadded = values.shape[-1] if values.ndim else 1
        dtype = spec.dtype or ("float32" if values.dtype.kind == "f" else "int64")
        out[spec.name] = _fit(values, spec.length, 0 if spec.mask else spec.pad_value).astype(dtype)
    for spec in specs:
        if spec.is_constant or spec.name in out:
            continue
        if not spec.mask or unpadded is None:
            where = "the tokenizer's output" if tokenize is not None else "the record"
            raise InputRejected("bad-output", f"{where} has no column {spec.source_column!r} for input {spec.name!r} (has {sorted(columns)[:10]})")
        out[spec.name] = _fit(np.ones(unpadded, dtype=spec.dtype or "int64"), spec.length, 0)
    return out


# ---------------------------------------------------------------------------------------------
# The Ray task and the driver


@dataclass(frozen=True)
class _TextRef:
    sample_id: str
    path: str
    kind: str
    row: int


def _text_task(
    dataset: Dataset, refs: Sequence[_TextRef], specs: Sequence[InputSpec], tokenizer: TokenizerRef | None, text_field: str
) -> tuple[list[tuple[str, dict[str, npt.NDArray[Any]]]], list[tuple[str, str, str, str]], float]:
    """Encode a chunk of records: ([(id, arrays)], [(id, path, reason, detail)], seconds)."""
    t0 = time.perf_counter()
    fs = dataset.filesystem()
    tokenize = load_tokenizer(tokenizer) if tokenizer is not None else None
    rows: list[tuple[str, dict[str, npt.NDArray[Any]]]] = []
    rejected: list[tuple[str, str, str, str]] = []
    by_file: dict[str, list[_TextRef]] = {}
    for ref in refs:
        by_file.setdefault(ref.path, []).append(ref)
    for path, file_refs in by_file.items():
        try:
            records = read_records(fs, path, file_refs[0].kind, [r.row for r in file_refs], text_field)
        except InputRejected as exc:
            rejected.extend((r.sample_id, r.path, exc.reason, exc.detail) for r in file_refs)
            continue
        except (OSError, ValueError) as exc:
            rejected.extend((r.sample_id, r.path, "unreadable", f"{type(exc).__name__}: {exc}") for r in file_refs)
            continue
        for ref in file_refs:
            try:
                record = records[ref.row]
                if isinstance(record, InputRejected):
                    raise record
                rows.append((ref.sample_id, encode_record(record, specs, tokenize, text_field)))
            except InputRejected as exc:
                rejected.append((ref.sample_id, ref.path, exc.reason, f"row {ref.row}: {exc.detail}"))
    return rows, rejected, time.perf_counter() - t0


def _select_text_refs(b: _Build, tokenizer: Any, wall: dict[str, float]) -> tuple[list[_TextRef], Any, list[str]]:
    """List the text files, count their records and draw the seeded selection, sorted by sample id."""
    config, dataset = b.config, b.dataset
    t0 = time.perf_counter()
    files = list_text_files(dataset, tokenizer=tokenizer is not None)
    fs = dataset.filesystem()
    counts = []
    for rel, path in files:
        try:
            counts.append(count_rows(fs, path, _kind(rel, tokenizer is not None) or ""))
        except (OSError, ValueError, InputRejected) as exc:
            raise DataError(f"dataset {dataset.display_url}: cannot read {rel!r} ({exc})") from None
    wall["list"] = time.perf_counter() - t0
    selection = select_samples([{"": n} for n in counts], num_samples=config.num_samples, seed=config.seed,
                               allow_fewer=b.skip)
    warnings: list[str] = []
    if selection.shortfall > 0:
        warnings.append(f"asked for {selection.num_requested} samples but the dataset holds only {selection.num_candidates}; using all of them")
    refs = sorted(
        (_TextRef(make_sample_id(rel, int(row)), path, _kind(rel, tokenizer is not None) or "", int(row))
         for (rel, path), chosen in zip(files, selection.per_shard) for row in chosen.get("", ())),
        key=lambda r: r.sample_id,
    )
    return refs, selection, warnings


def build_text(b: _Build, started: float) -> BuildReport:
    """`build_batch` for text/token data: count, draw, encode in Ray tasks, write sorted by id."""
    from trtcal.batch import write_batch
    from trtcal.workers.build_base import (
        BadInput,
        BuildReport,
        _bad_input_message,
        _location,
        refuse_access_failures,
    )

    config, dataset = b.config, b.dataset
    specs = config.inputs
    if not any(not s.is_constant for s in specs):
        raise ConfigError(
            "text data: declare the model inputs it feeds and their lengths with --inputs, e.g. "
            "'{\"input_ids\": {\"length\": 128}, \"attention_mask\": {\"mask\": true, \"length\": 128}}' (docs/inputs.md)"
        )
    wall: dict[str, float] = {}
    tokenizer = tokenizer_ref(config.tokenizer)
    refs, selection, warnings = _select_text_refs(b, tokenizer, wall)
    t0 = time.perf_counter()
    task = b.run.task(_text_task)
    size = config.chunk_size or _ROWS_PER_TASK
    chunks = [refs[i : i + size] for i in range(0, len(refs), size)]
    encoded: list[tuple[str, dict[str, npt.NDArray[Any]]]] = []
    bad: list[BadInput] = []
    seconds = {"transform": 0.0}
    b.progress.start("preprocess", total=len(refs), unit="text")

    def on_result(chunk: list[_TextRef], result: Any) -> None:
        rows, rejected, spent = result
        encoded.extend(rows)
        rejected_inputs = [BadInput(s, _location(dataset, p), reason, detail) for s, p, reason, detail in rejected]
        refuse_access_failures(dataset, rejected_inputs)  # missing credentials: one error, never skipped rows
        bad.extend(rejected_inputs)
        seconds["transform"] += spent
        b.progress.advance("preprocess", len(chunk))

    b.run.map_unordered(lambda chunk: task.remote(dataset, chunk, specs, tokenizer, config.text_field), chunks, on_result)
    b.progress.finish("preprocess")
    wall["process"] = time.perf_counter() - t0
    encoded.sort(key=lambda item: item[0])
    if encoded:
        first = _signature(encoded[0][1])
        mismatched = [(s, a) for s, a in encoded if _signature(a) != first]
        paths = {r.sample_id: r.path for r in refs}
        for sample_id, arrays in mismatched:
            detail = f"{_signature(arrays)} differs from the batch's {first}; declare a length for each input"
            bad.append(BadInput(sample_id, _location(dataset, paths[sample_id]), "shape-mismatch", detail))
        encoded = [(s, a) for s, a in encoded if _signature(a) == first]
    bad.sort(key=lambda x: x.sample_id)
    if bad and not b.skip:
        raise DataError(_bad_input_message(
            f"cannot build a calibration batch from {dataset.display_url}", bad,
            "Fix or remove these records, or pass on_bad_input='skip' (--on-bad-input skip) to leave them out.",
        ))
    if not encoded:
        raise DataError(_bad_input_message(f"no valid records remain in {dataset.display_url}", bad, "Check the data and --inputs."))
    if bad:
        warnings.append(f"{len(bad)} of {len(refs)} selected records were skipped; the batch holds {len(encoded)}")
    document = text_document(config, tokenizer, skipped=len(bad))
    t0 = time.perf_counter()
    names = sorted(encoded[0][1])
    arrays = {n: np.stack([a[n] for _, a in encoded]) for n in names}
    info = write_batch(b.output_url, arrays, [s for s, _ in encoded], spec=document, **dict(b.out_options))
    wall["write"] = time.perf_counter() - t0
    wall["total"] = time.perf_counter() - started
    for message in warnings:
        logger.warning("%s", message)
    return BuildReport(
        output_url=info.path, fingerprint=info.fingerprint, num_rows=info.num_rows, inputs=info.inputs,
        nbytes=info.nbytes, spec=document, num_requested=config.num_samples, num_candidates=selection.num_candidates,
        num_selected=len(refs), skipped=tuple(bad), refused=(), ignored_files=0, workers=b.workers,
        wall_seconds=wall, worker_seconds=seconds, warnings=tuple(warnings),
    )


def text_document(config: BatchConfig, tokenizer: TokenizerRef | None, *, skipped: int) -> dict[str, Any]:
    """The batch's spec document for a text batch (the input specs, how text was tokenized)."""
    text: dict[str, Any] = {"text_field": config.text_field}
    if tokenizer is not None:
        text["tokenizer"] = tokenizer.function if tokenizer.function else "tokenizer.json"
        if tokenizer.sha256:
            text["tokenizer_sha256"] = tokenizer.sha256
    return {"inputs": input_specs_to_dict(config.inputs), "text": text, "skipped_inputs": skipped, "refused_entries": 0}


def _signature(arrays: Mapping[str, npt.NDArray[Any]]) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    return tuple((n, tuple(int(d) for d in a.shape), a.dtype.name) for n, a in sorted(arrays.items()))
