"""Datasets on any fsspec URL: folders of images, file lists, Parquet with image bytes, .npy/.npz.

A dataset URL names one of:

* a folder or prefix (``./images/``, ``s3://bucket/imagenet/train/``): every JPEG, PNG, WebP or
  BMP file below it (ImageNet's ``train/<wnid>/*.JPEG`` included), or every Parquet / .npy /
  .npz file below it. Hidden names (``.*``) and other extensions are ignored (and counted);
* a list file (``.txt``/``.lst``: one path per line, ``#`` comments; ``.csv``: a ``path`` column
  and an optional ``label`` column, or path[,label] rows without a header); paths are relative to
  the list's folder or absolute on the same filesystem;
* one Parquet, .npy or .npz file, or one image.

Listing is sharded: the root is listed one level at a time (``ls``) until there are enough
prefixes, then each prefix is listed on its own (`list_shard`, run in Ray tasks by the build),
never the whole dataset in one call. Shards are ordered so that concatenating their sorted
entries gives the global order (`trtcal.workers.selection.path_sort_key`): the selection does
not depend on how the listing was split.

Local folder datasets refuse symlinks that resolve outside the dataset root (and do not follow
symlinked folders); list files name their files explicitly and are not restricted.

Container rows: Parquet rows hold encoded images (a binary column, or a struct with a ``bytes``
field as Hugging Face datasets write); .npy files hold ``[rows, ...]`` arrays for one input;
.npz files hold one ``[rows, ...]`` array per input name (a ``sample_id`` member is ignored).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import posixpath
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from trtcal.errors import ConfigError, DataError, StorageError
from trtcal.workers.preprocess import InputRejected
from trtcal.workers.selection import make_sample_id, path_sort_key

__all__ = [
    "IMAGE_EXTENSIONS",
    "Dataset",
    "Shard",
    "ShardPlan",
    "ShardListing",
    "SampleRef",
    "open_dataset",
    "storage_options_for",
    "plan_shards",
    "list_shard",
    "resolve_selection",
    "read_image_bytes",
    "read_images",
    "read_container_rows",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PARQUET_EXTENSIONS = (".parquet", ".pq")
NPY_EXTENSIONS = (".npy",)
NPZ_EXTENSIONS = (".npz",)
LIST_EXTENSIONS = (".txt", ".lst", ".csv")
# Below this many prefixes the planner lists one level deeper (at most MAX_PLAN_DEPTH levels).
TARGET_SHARDS = 64
# A .npz member is deflate-compressed: reaching a row means inflating everything before it. These
# bound what one read may inflate and hold (a 2.3 MB zip bomb once inflated to many GB and got the
# worker OOM-killed). Store big tensor datasets as .npy (random access) or split them.
MAX_ROW_BYTES = 256 << 20  # one sample of one input (3x4096x4096 float32 is 192 MiB)
MAX_NPZ_INFLATE_BYTES = 2 << 30  # inflated (and at most held) per read of one .npz file
MAX_PLAN_DEPTH = 3
FILES_PER_SHARD = 2048
_PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "image_path", "filepath")
_LABEL_COLUMNS = ("label", "class", "category", "target")
_PARQUET_IMAGE_COLUMNS = ("image", "img", "image_bytes", "bytes", "jpg", "jpeg", "png", "webp")
_LOCAL_PROTOCOLS = frozenset({"file", "local"})


def kind_of(name: str) -> str | None:
    """"image", "parquet", "npy", "npz" or None (not a dataset file), from the extension."""
    lower = name.lower()
    for kind, extensions in (
        ("image", IMAGE_EXTENSIONS),
        ("parquet", PARQUET_EXTENSIONS),
        ("npy", NPY_EXTENSIONS),
        ("npz", NPZ_EXTENSIONS),
    ):
        if lower.endswith(extensions):
            return kind
    return None


def _family(kind: str) -> str:
    return "image" if kind in ("image", "parquet") else "tensor"


def _redact(url: str) -> str:
    from trtcal.storage._redact import redact_url

    return redact_url(url)


# ---------------------------------------------------------------------------------------------
# The dataset


@dataclass(frozen=True)
class Dataset:
    """A dataset URL resolved to a filesystem, a root and a layout. Picklable (sent to Ray tasks).

    Attributes:
        url: the URL as given (credentials redacted in messages).
        protocol: fsspec protocol ("file", "s3", ...).
        root: path on the filesystem that sample ids are relative to.
        target: the path the URL names (the root folder, a list file, or one data file).
        layout: "folder", "list" or "file".
    """

    url: str
    protocol: str
    root: str
    target: str
    layout: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_local(self) -> bool:
        return self.protocol in _LOCAL_PROTOCOLS

    @property
    def display_url(self) -> str:
        return _redact(self.url)

    def filesystem(self) -> Any:
        import fsspec

        return fsspec.filesystem(self.protocol, **dict(self.storage_options))

    def join(self, relpath: str) -> str:
        return f"{self.root}/{relpath}" if self.root not in ("", "/") else f"{self.root}{relpath}"

    def relative(self, path: str) -> str:
        prefix = self.root.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise StorageError(f"listing returned {path!r}, which is not below {self.root!r}", url=self.display_url)
        return path[len(prefix) :]


def storage_options_for(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """fsspec options for a URL: S3 listings uncached, the endpoint from AWS_ENDPOINT_URL(_S3) if unset."""
    import fsspec

    protocol = fsspec.core.split_protocol(url)[0] or "file"
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        # Datasets change; a listing must not come from a cache kept by a long-lived process.
        options.setdefault("use_listings_cache", False)
        client_kwargs = options.get("client_kwargs") or {}
        if "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                options["endpoint_url"] = endpoint
    return options


def open_dataset(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Dataset:
    """Resolve a dataset URL (checks that it exists and says what it is).

    Raises:
        DataError: nothing there, or a file that is not a dataset.  StorageError: cannot be reached.
    """
    import fsspec

    text = os.fspath(url)
    if not text:
        raise ConfigError("data: give a dataset URL or path")
    from trtcal._secrets import Scrubber, refuse_url_credentials, secret_values

    refuse_url_credentials(text, "dataset")
    options = storage_options_for(text, storage_options)
    scrub = Scrubber(secret_values(options))
    try:
        fs, path = fsspec.core.url_to_fs(text, **options)
    except ImportError as exc:
        raise StorageError(f"cannot open {_redact(text)}: {exc} (for s3:// install trtcal[s3])", url=_redact(text)) from None
    except Exception as exc:  # fsspec raises many things for bad URLs
        raise StorageError(f"cannot open {_redact(text)}: {scrub(exc)}", url=_redact(text)) from None
    fs_protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if fs_protocol in _LOCAL_PROTOCOLS:
        fs_protocol = "file"
        path = os.path.abspath(path)
    path = path.rstrip("/") or "/"
    try:
        if fs.isdir(path):
            return Dataset(url=text, protocol=fs_protocol, root=path, target=path, layout="folder", storage_options=options)
        exists = fs.isfile(path)
    except OSError as exc:
        raise StorageError(f"cannot reach dataset {_redact(text)}: {scrub(exc)}", url=_redact(text)) from None
    if not exists:
        raise DataError(f"dataset {_redact(text)} does not exist (no such file, folder or prefix)")
    parent = posixpath.dirname(path) if not fs_protocol == "file" else os.path.dirname(path)
    name = posixpath.basename(path)
    if name.lower().endswith(LIST_EXTENSIONS):
        layout = "list"
    elif kind_of(name) is not None:
        layout = "file"
    else:
        raise DataError(
            f"dataset {_redact(text)} is a file of unknown type; give a folder/prefix, a .txt/.csv list, "
            "a Parquet file, a .npy/.npz file or an image"
        )
    return Dataset(url=text, protocol=fs_protocol, root=parent, target=path, layout=layout, storage_options=options)


# ---------------------------------------------------------------------------------------------
# Shard planning (driver): a few `ls` calls, one prefix at a time


@dataclass(frozen=True)
class Shard:
    """One unit of listing: every file below `prefix` ("find"), explicit files ("files"), or a list file ("list")."""

    kind: str
    prefix: str = ""
    files: tuple[str, ...] = ()

    @property
    def sort_key(self) -> tuple[str, ...]:
        return path_sort_key(self.prefix if self.kind == "find" else (self.files[0] if self.files else ""))


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _ls(dataset: Dataset, fs: Any, relprefix: str) -> tuple[list[str], list[str], list[tuple[str, str]], int]:
    """(subfolders, files, refused, hidden) directly below a prefix, as paths relative to the root."""
    directory = dataset.join(relprefix) if relprefix else dataset.root
    folders: list[str] = []
    files: list[str] = []
    refused: list[tuple[str, str]] = []
    hidden = 0
    if dataset.is_local:
        root_real = os.path.realpath(dataset.root)
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            raise StorageError(f"cannot list {directory!r}: {exc}", url=dataset.display_url) from None
        for entry in entries:
            rel = f"{relprefix}/{entry.name}" if relprefix else entry.name
            if _hidden(entry.name):
                hidden += 1
                continue
            if entry.is_symlink():
                verdict = _check_local_link(entry.path, root_real)
                if verdict is not None:
                    refused.append((rel, verdict))
                    continue
                if entry.is_dir():
                    logger.info("not following symlinked folder %s (its target is listed where it lives)", rel)
                    continue
            if entry.is_dir(follow_symlinks=False):
                folders.append(rel)
            elif entry.is_file():
                files.append(rel)
        return folders, files, refused, hidden
    try:
        entries = fs.ls(directory, detail=True)
    except FileNotFoundError:
        return [], [], [], 0
    except OSError as exc:
        raise StorageError(f"cannot list {_redact(dataset.url)} at {relprefix!r}: {exc}", url=dataset.display_url) from None
    for entry in entries:
        name = str(entry["name"]).rstrip("/")
        if name == directory.rstrip("/"):
            continue
        rel = dataset.relative(name)
        if _hidden(posixpath.basename(rel)):
            hidden += 1
            continue
        if entry.get("type") == "directory":
            folders.append(rel)
        else:
            files.append(rel)
    return folders, files, refused, hidden


def _check_local_link(path: str, root_real: str) -> str | None:
    """None if a symlink may be followed; else why not."""
    target = os.path.realpath(path)
    if os.path.commonpath([target, root_real]) != root_real:
        return f"outside-root: symlink resolves to {target!r}, outside the dataset root {root_real!r}"
    return None


@dataclass(frozen=True)
class ShardPlan:
    """The shards of a dataset in global order, and what planning refused or ignored."""

    shards: list[Shard]
    refused: list[tuple[str, str]]
    ignored: int


def plan_shards(dataset: Dataset, *, target_shards: int = TARGET_SHARDS) -> ShardPlan:
    """The shards of a dataset, in global order.

    Lists the root, then one level deeper while there are fewer than `target_shards` folders (at
    most MAX_PLAN_DEPTH levels); each `ls` covers one prefix. Files met on the way are grouped into
    "files" shards. Neither choice changes the selection: shards concatenate in global order.
    """
    if dataset.layout == "list":
        return ShardPlan([Shard(kind="list", files=(posixpath.basename(dataset.target),))], [], 0)
    if dataset.layout == "file":
        return ShardPlan([Shard(kind="files", files=(posixpath.basename(dataset.target),))], [], 0)
    fs = dataset.filesystem()
    refused: list[tuple[str, str]] = []
    ignored = 0
    # An ordered frontier of ("folder", rel) / ("file", rel) items, in global order.
    frontier: list[tuple[str, str]] = [("folder", "")]
    for _depth in range(MAX_PLAN_DEPTH):
        folders = [rel for kind, rel in frontier if kind == "folder"]
        if not folders or len(folders) >= target_shards:
            break
        expanded: list[tuple[str, str]] = []
        for kind, rel in frontier:
            if kind != "folder":
                expanded.append((kind, rel))
                continue
            sub_folders, files, sub_refused, hidden = _ls(dataset, fs, rel)
            refused.extend(sub_refused)
            ignored += hidden
            children = [("folder", f) for f in sub_folders] + [("file", f) for f in files]
            expanded.extend(sorted(children, key=lambda item: path_sort_key(item[1])))
        frontier = expanded
    shards: list[Shard] = []
    run: list[str] = []
    for kind, rel in frontier:
        if kind == "file":
            run.append(rel)
            if len(run) >= FILES_PER_SHARD:
                shards.append(Shard(kind="files", files=tuple(run)))
                run = []
            continue
        if run:
            shards.append(Shard(kind="files", files=tuple(run)))
            run = []
        shards.append(Shard(kind="find", prefix=rel))
    if run:
        shards.append(Shard(kind="files", files=tuple(run)))
    return ShardPlan(shards, sorted(refused, key=lambda item: path_sort_key(item[0])), ignored)


# ---------------------------------------------------------------------------------------------
# Listing one shard (a Ray task in the build)


@dataclass
class ShardListing:
    """The sorted entries of one shard.

    Attributes:
        relpaths: file paths (relative to the root, or as written in a list file), sorted.
        paths: the filesystem path to open for each entry.
        rows: rows per file for containers (1 per image file).
        labels: class of each file (first path component, or the list's label column).
        kind: "image", "parquet", "npy", "npz", or "" when the shard holds no dataset file.
        refused: (entry, reason) for entries that cannot be used (outside-root links, unreadable
            containers, duplicates in a list).
        ignored: files skipped for their extension or a hidden name.
        inputs: for tensor containers, input name -> (per-row shape, dtype); checked across files.
    """

    relpaths: list[str]
    paths: list[str]
    rows: list[int]
    labels: list[str]
    kind: str
    refused: list[tuple[str, str]]
    ignored: int
    inputs: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)

    def class_counts(self, stratify: bool) -> dict[str, int]:
        counts: dict[str, int] = {}
        for label, rows in zip(self.labels, self.rows):
            key = label if stratify else ""
            counts[key] = counts.get(key, 0) + rows
        return counts


def _first_component(relpath: str) -> str:
    head, sep, _tail = relpath.partition("/")
    return head if sep else ""


def _walk_local(dataset: Dataset, relprefix: str) -> tuple[list[str], list[tuple[str, str]], int]:
    """Every file below a local prefix (no symlinked folders; links outside the root refused)."""
    root_real = os.path.realpath(dataset.root)
    files: list[str] = []
    refused: list[tuple[str, str]] = []
    hidden = 0
    stack = [relprefix]
    while stack:
        rel_dir = stack.pop()
        directory = dataset.join(rel_dir) if rel_dir else dataset.root
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            refused.append((rel_dir, f"unreadable: cannot list folder ({exc.strerror or exc})"))
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if _hidden(entry.name):
                hidden += 1
                continue
            try:
                if entry.is_symlink():
                    verdict = _check_local_link(entry.path, root_real)
                    if verdict is not None:
                        refused.append((rel, verdict))
                        continue
                    if entry.is_dir():
                        continue  # not followed: its target is inside the root and listed there
                    files.append(rel)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
                elif entry.is_file(follow_symlinks=False):
                    files.append(rel)
            except OSError as exc:
                refused.append((rel, f"unreadable: {exc.strerror or exc}"))
    return files, refused, hidden


def _find_remote(dataset: Dataset, fs: Any, relprefix: str) -> tuple[list[str], int]:
    base = dataset.join(relprefix) if relprefix else dataset.root
    try:
        names = fs.find(base, withdirs=False)
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise StorageError(f"cannot list {dataset.display_url} under {relprefix!r}: {exc}", url=dataset.display_url) from None
    files: list[str] = []
    hidden = 0
    for name in names:
        if name.endswith("/"):
            continue  # a "folder" marker object
        rel = dataset.relative(name)
        if any(_hidden(part) for part in rel.split("/")):
            hidden += 1
            continue
        files.append(rel)
    return files, hidden


def _read_list(dataset: Dataset, fs: Any) -> tuple[list[str], list[str], list[str], list[tuple[str, str]]]:
    """(entries as written, paths to open, labels, refused) of a .txt/.lst/.csv list file."""
    try:
        with fs.open(dataset.target, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read list file {dataset.display_url}: {exc}") from None
    raw: list[tuple[str, str]] = []
    if dataset.target.lower().endswith(".csv"):
        rows = list(csv.reader(io.StringIO(text)))
        path_col, label_col, start = 0, 1, 0
        if rows:
            header = [cell.strip().lower() for cell in rows[0]]
            named = [i for i, cell in enumerate(header) if cell in _PATH_COLUMNS]
            if named:
                path_col = named[0]
                label_cols = [i for i, cell in enumerate(header) if cell in _LABEL_COLUMNS]
                label_col = label_cols[0] if label_cols else -1
                start = 1
        for row in rows[start:]:
            if not row or not row[path_col].strip():
                continue
            label = row[label_col] if 0 <= label_col < len(row) else ""
            raw.append((row[path_col], label))
    else:
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            raw.append((line, ""))
    entries: list[str] = []
    paths: list[str] = []
    labels: list[str] = []
    refused: list[tuple[str, str]] = []
    seen: set[str] = set()
    list_dir = dataset.root
    for entry, label in raw:
        if "://" in entry:
            protocol, _, rest = entry.partition("://")
            if protocol not in (dataset.protocol, "file" if dataset.is_local else dataset.protocol):
                refused.append((entry, f"unreadable: protocol {protocol!r} differs from the list's {dataset.protocol!r}"))
                continue
            path, written = rest, entry
        elif entry.startswith("/"):
            path, written = entry, entry
        else:
            normalised = posixpath.normpath(entry)
            path = posixpath.normpath(posixpath.join(list_dir, normalised))
            written = normalised
        if dataset.is_local:
            path = os.path.abspath(path)
        if written in seen:
            refused.append((written, "duplicate: listed more than once"))
            continue
        seen.add(written)
        entries.append(written)
        paths.append(path)
        labels.append(label or _first_component(written))
    return entries, paths, labels, refused


def list_shard(dataset: Dataset, shard: Shard) -> ShardListing:
    """List one shard: its dataset files, sorted, with row counts for container files.

    Raises:
        DataError: the shard mixes images with tensor files, or tensor files disagree on inputs.
    """
    fs = dataset.filesystem()
    refused: list[tuple[str, str]] = []
    ignored = 0
    labels: list[str] | None = None
    if shard.kind == "list":
        relpaths, paths, labels, refused = _read_list(dataset, fs)
    else:
        if shard.kind == "files":
            candidates = list(shard.files)
        elif dataset.is_local:
            candidates, refused, ignored = _walk_local(dataset, shard.prefix)
        else:
            candidates, ignored = _find_remote(dataset, fs, shard.prefix)
        relpaths = candidates
        paths = [dataset.join(rel) for rel in candidates]
    keep = [i for i, rel in enumerate(relpaths) if kind_of(rel) is not None]
    ignored += len(relpaths) - len(keep)
    order = sorted(keep, key=lambda i: path_sort_key(relpaths[i]))
    relpaths_sorted = [relpaths[i] for i in order]
    paths_sorted = [paths[i] for i in order]
    labels_sorted = [labels[i] for i in order] if labels is not None else [_first_component(r) for r in relpaths_sorted]
    kinds = {kind_of(rel) for rel in relpaths_sorted}
    families = {_family(k) for k in kinds if k is not None}
    if len(families) > 1:
        raise DataError(
            f"dataset {dataset.display_url} mixes images with tensor files (.npy/.npz) under {shard.prefix or 'its root'!r}; "
            "a calibration batch needs one kind of data"
        )
    if len(kinds) > 1 and "image" not in kinds:
        raise DataError(f"dataset {dataset.display_url} mixes {sorted(k for k in kinds if k)} files; use one kind")
    kind = "parquet" if "parquet" in kinds else (kinds.pop() if len(kinds) == 1 else "")
    listing = ShardListing(
        relpaths=relpaths_sorted, paths=paths_sorted, rows=[1] * len(relpaths_sorted), labels=labels_sorted,
        kind=kind or "", refused=list(refused), ignored=ignored,
    )
    if kind in ("parquet", "npy", "npz"):
        _count_rows(dataset, fs, listing)
    return listing


def _count_rows(dataset: Dataset, fs: Any, listing: ShardListing) -> None:
    """Fill rows (and inputs) from container metadata; unreadable containers move to `refused`."""
    kept: list[int] = []
    for i, (rel, path) in enumerate(zip(listing.relpaths, listing.paths)):
        kind = kind_of(rel)
        try:
            if kind == "parquet":
                rows = _parquet_rows(fs, path)
            elif kind == "image":
                rows = 1
            else:
                rows, inputs = _tensor_file_info(fs, path, kind or "")
                for name, signature in inputs.items():
                    previous = listing.inputs.setdefault(name, signature)
                    if previous != signature:
                        raise DataError(
                            f"{rel}: input {name!r} has rows of shape {signature[0]} {signature[1]}, but other files "
                            f"have {previous[0]} {previous[1]}"
                        )
                if listing.inputs and set(inputs) != set(listing.inputs):
                    raise DataError(f"{rel}: holds inputs {sorted(inputs)}, other files hold {sorted(listing.inputs)}")
        except InputRejected as exc:
            listing.refused.append((rel, f"{exc.reason}: {exc.detail}"))
            continue
        listing.rows[i] = rows
        if rows > 0:
            kept.append(i)
    listing.relpaths = [listing.relpaths[i] for i in kept]
    listing.paths = [listing.paths[i] for i in kept]
    listing.rows = [listing.rows[i] for i in kept]
    listing.labels = [listing.labels[i] for i in kept]


def _parquet_rows(fs: Any, path: str) -> int:
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            _parquet_image_column(parquet.schema_arrow, path)
            return int(parquet.metadata.num_rows)
    except InputRejected:
        raise
    except FileNotFoundError as exc:
        raise InputRejected("unreadable", f"{exc}") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for damaged files
        raise InputRejected("corrupt", f"not a readable Parquet file ({type(exc).__name__}: {exc})") from None


def _parquet_image_column(schema: Any, path: str) -> tuple[str, bool]:
    """(column name, is a struct with a 'bytes' field) holding the encoded images."""
    import pyarrow as pa

    def usable(t: Any) -> tuple[bool, bool]:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True, False
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            inner = t.field("bytes").type
            return (pa.types.is_binary(inner) or pa.types.is_large_binary(inner)), True
        return False, False

    candidates = [(f.name, *usable(f.type)) for f in schema]
    by_name = {name.lower(): (name, nested) for name, ok, nested in candidates if ok}
    for preferred in _PARQUET_IMAGE_COLUMNS:
        if preferred in by_name:
            return by_name[preferred]
    usable_columns = [(name, nested) for name, ok, nested in candidates if ok]
    if len(usable_columns) == 1:
        return usable_columns[0]
    raise InputRejected(
        "non-image",
        f"no image-bytes column (binary, or a struct with a 'bytes' field) among {[f.name for f in schema]}"
        if not usable_columns
        else f"several binary columns {[n for n, _ in usable_columns]}; name the image column 'image'",
    )


def _npy_header(f: Any, where: str) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """(shape, dtype, data offset) of a .npy stream positioned at its start."""
    try:
        major, _minor = np.lib.format.read_magic(f)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif major in (2, 3):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {major}")
    except (ValueError, EOFError, OSError) as exc:
        raise InputRejected("corrupt", f"{where}: not a valid .npy array ({exc})") from None
    if dtype.hasobject or dtype.kind not in "fiub" or dtype.fields is not None:
        raise InputRejected("non-image", f"{where}: holds {dtype}; tensors must be numeric arrays")
    if fortran and len(shape) > 1:
        raise InputRejected("corrupt", f"{where}: Fortran-ordered arrays are not supported; save it C-ordered")
    if len(shape) < 1:
        raise InputRejected("corrupt", f"{where}: a scalar, not an array of rows")
    return tuple(int(d) for d in shape), dtype, int(f.tell())


def _tensor_file_info(fs: Any, path: str, kind: str) -> tuple[int, dict[str, tuple[tuple[int, ...], str]]]:
    """(rows, {input name: (row shape, dtype)}) of a .npy (input "") or .npz file."""
    try:
        with fs.open(path, "rb") as f:
            if kind == "npy":
                shape, dtype, _ = _npy_header(f, path)
                return shape[0], {"": (shape[1:], dtype.name)}
            with zipfile.ZipFile(f) as archive:
                inputs: dict[str, tuple[tuple[int, ...], str]] = {}
                rows: set[int] = set()
                for member in sorted(archive.namelist()):
                    if not member.endswith(".npy"):
                        continue
                    name = member[: -len(".npy")]
                    if name == "sample_id":
                        continue
                    with archive.open(member) as stream:
                        shape, dtype, offset = _npy_header(stream, f"{path}:{member}")
                    _check_npz_member(archive.getinfo(member), shape, dtype, offset, f"{path}:{member}")
                    inputs[name] = (shape[1:], dtype.name)
                    rows.add(shape[0])
                if not inputs:
                    raise InputRejected("corrupt", f"{path}: the .npz holds no arrays")
                if len(rows) != 1:
                    raise InputRejected("corrupt", f"{path}: its arrays have different row counts {sorted(rows)}")
                return rows.pop(), inputs
    except InputRejected:
        raise
    except FileNotFoundError as exc:
        raise InputRejected("unreadable", str(exc)) from None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise InputRejected("corrupt", f"{path}: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# From a selection to sample references


@dataclass(frozen=True)
class SampleRef:
    """One selected sample: its id, where to read it, and which row of a container file."""

    sample_id: str
    path: str
    kind: str
    row: int | None = None


def resolve_selection(listing: ShardListing, chosen: Mapping[str, npt.NDArray[np.int64]], stratify: bool) -> list[SampleRef]:
    """The SampleRefs for positions chosen per class (see `trtcal.workers.selection.Selection`)."""
    refs: list[SampleRef] = []
    container = listing.kind in ("parquet", "npy", "npz")
    for cls, positions in chosen.items():
        if len(positions) == 0:
            continue
        members = [i for i, label in enumerate(listing.labels) if not stratify or label == cls]
        rows = np.asarray([listing.rows[i] for i in members], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(rows)))
        which = np.searchsorted(starts, positions, side="right") - 1
        for position, k in zip(positions.tolist(), which.tolist()):
            i = members[k]
            rel = listing.relpaths[i]
            kind = kind_of(rel) or ""
            if container and kind != "image":
                row = int(position - starts[k])
                refs.append(SampleRef(make_sample_id(rel, row), listing.paths[i], kind, row))
            else:
                refs.append(SampleRef(make_sample_id(rel), listing.paths[i], kind, None))
    return refs


# ---------------------------------------------------------------------------------------------
# Reading samples (in the preprocessing tasks)


def read_image_bytes(dataset: Dataset, fs: Any, ref: SampleRef) -> bytes:
    """The encoded bytes of one image file.

    Raises:
        InputRejected: "outside-root" (a local link that now escapes the root) or "unreadable".
    """
    if dataset.is_local and dataset.layout == "folder":
        verdict = _check_local_link(ref.path, os.path.realpath(dataset.root))
        if verdict is not None:
            raise InputRejected("outside-root", verdict.partition(": ")[2])
    try:
        if dataset.is_local:
            with open(ref.path, "rb") as f:
                return f.read()
        return bytes(fs.cat_file(ref.path))
    except IsADirectoryError:
        raise InputRejected("unreadable", "is a folder, not a file") from None
    except OSError as exc:
        raise InputRejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None


def read_images(dataset: Dataset, fs: Any, refs: Sequence[SampleRef]) -> dict[str, bytes | InputRejected]:
    """sample id -> encoded bytes (or the reason it cannot be read) for image files.

    Remote files are fetched concurrently (fsspec `cat` of the whole list); local ones in turn.
    """
    if not refs:
        return {}
    if dataset.is_local:
        out: dict[str, bytes | InputRejected] = {}
        for ref in refs:
            try:
                out[ref.sample_id] = read_image_bytes(dataset, fs, ref)
            except InputRejected as exc:
                out[ref.sample_id] = exc
        return out
    try:
        fetched = fs.cat([ref.path for ref in refs], on_error="return")
    except OSError as exc:  # the whole request failed: every file is unreadable
        fetched = {ref.path: exc for ref in refs}
    result: dict[str, bytes | InputRejected] = {}
    for ref in refs:
        value = fetched.get(ref.path) if isinstance(fetched, dict) else fetched
        if isinstance(value, (bytes, bytearray, memoryview)):
            result[ref.sample_id] = bytes(value)
        elif isinstance(value, BaseException):
            result[ref.sample_id] = InputRejected("unreadable", f"{type(value).__name__}: {value}")
        else:
            result[ref.sample_id] = InputRejected("unreadable", "no data returned")
    return result


def read_container_rows(fs: Any, path: str, kind: str, rows: Sequence[int], input_name: str) -> Iterator[tuple[int, Any]]:
    """Yield (row, value) for the requested rows of a container file, in the given order.

    Values: encoded image bytes (Parquet), or {input name: row array} (.npy/.npz). Reads only the
    needed row groups / row byte ranges.

    Raises:
        InputRejected: the file cannot be read (it applies to every requested row).
    """
    try:
        with fs.open(path, "rb") as f:
            if kind == "parquet":
                yield from _parquet_rows_read(f, path, rows)
            elif kind == "npy":
                shape, dtype, offset = _npy_header(f, path)
                for row in rows:
                    yield row, {input_name: _read_row(f, shape, dtype, offset, row, path)}
            else:
                yield from _npz_rows_read(f, path, rows)
    except InputRejected:
        raise
    except FileNotFoundError as exc:
        raise InputRejected("unreadable", str(exc)) from None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise InputRejected("corrupt", f"{type(exc).__name__}: {exc}") from None


def _check_npz_member(info: zipfile.ZipInfo, shape: tuple[int, ...], dtype: np.dtype[Any], offset: int, where: str) -> None:
    """The member's header must agree with its declared size, and one row must be of sane size."""
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    if row_bytes > MAX_ROW_BYTES:
        raise InputRejected(
            "corrupt", f"{where}: one row of {shape[1:]} {dtype} is {row_bytes} bytes, over the {MAX_ROW_BYTES}-byte limit per sample"
        )
    if offset + shape[0] * row_bytes != info.file_size:
        raise InputRejected(
            "corrupt",
            f"{where}: its header describes {shape[0]} rows of {row_bytes} bytes, but the member inflates to {info.file_size} "
            "bytes (a damaged or forged archive)",
        )


def _npz_rows_read(f: Any, path: str, rows: Sequence[int]) -> Iterator[tuple[int, Any]]:
    """The requested rows of every array of an .npz, inflating each member once, only up to the
    last requested row, within MAX_NPZ_INFLATE_BYTES; yielded in the requested order."""
    with zipfile.ZipFile(f) as archive:
        members = [m for m in sorted(archive.namelist()) if m.endswith(".npy") and m != "sample_id.npy"]
        values: dict[int, dict[str, npt.NDArray[Any]]] = {row: {} for row in rows}
        inflated = 0
        for member in members:
            where = f"{path}:{member}"
            with archive.open(member) as stream:
                shape, dtype, offset = _npy_header(stream, where)
                _check_npz_member(archive.getinfo(member), shape, dtype, offset, where)
                row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                last = max(rows, default=-1)
                inflated += offset + (last + 1) * row_bytes
                if inflated > MAX_NPZ_INFLATE_BYTES:
                    raise InputRejected(
                        "corrupt",
                        f"{path}: reaching row {last} means inflating {inflated} bytes, over the {MAX_NPZ_INFLATE_BYTES}-byte "
                        "limit per .npz; store it as .npy (random access) or split it into smaller .npz files",
                    )
                for row in sorted(set(rows)):  # forward only: a backward seek would inflate from the start again
                    values[row][member[: -len(".npy")]] = _read_row(stream, shape, dtype, offset, row, where)
    for row in rows:
        yield row, values[row]


def _read_row(f: Any, shape: tuple[int, ...], dtype: np.dtype[Any], offset: int, row: int, where: str) -> npt.NDArray[Any]:
    if not 0 <= row < shape[0]:
        raise InputRejected("corrupt", f"{where}: row {row} is outside its {shape[0]} rows (changed since listing?)")
    count = int(np.prod(shape[1:], dtype=np.int64))
    nbytes = count * dtype.itemsize
    f.seek(offset + row * nbytes)
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise InputRejected("truncated", f"{where}: row {row} ends early ({len(data)} of {nbytes} bytes)")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape[1:]).astype(dtype.newbyteorder("="), copy=False)


def _parquet_rows_read(f: Any, path: str, rows: Sequence[int]) -> Iterator[tuple[int, bytes]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(f)
        column, nested = _parquet_image_column(parquet.schema_arrow, path)
        metadata = parquet.metadata
        group_starts = np.concatenate(([0], np.cumsum([metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])))
    except InputRejected:
        raise
    except Exception as exc:
        raise InputRejected("corrupt", f"not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    by_group: dict[int, list[int]] = {}
    for row in rows:
        group = int(np.searchsorted(group_starts, row, side="right") - 1)
        if not 0 <= row < int(group_starts[-1]):
            raise InputRejected("corrupt", f"row {row} is outside the file's {int(group_starts[-1])} rows")
        by_group.setdefault(group, []).append(row)
    values: dict[int, bytes | None] = {}
    for group, group_rows in sorted(by_group.items()):
        try:
            table = parquet.read_row_group(group, columns=[column])
        except Exception as exc:
            raise InputRejected("corrupt", f"row group {group} unreadable ({type(exc).__name__}: {exc})") from None
        data = table.column(0)
        if nested:
            data = data.combine_chunks().field("bytes")
        for row in group_rows:
            values[row] = data[row - int(group_starts[group])].as_py()
    for row in rows:
        value = values[row]
        yield row, (b"" if value is None else bytes(value))
