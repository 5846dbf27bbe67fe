"""Deterministic sample selection and sample ids (numpy and the standard library only).

The same dataset, `num_samples` and `seed` select the same samples whatever order the storage
listed them in: every shard's entries are sorted (`path_sort_key`), shards come in sorted order,
and the choice is a seeded draw (numpy ``Generator(PCG64(seed))``) over positions in that order.

With stratification the draw is per class: `num_samples` is split evenly over the classes (the
remainder goes to classes drawn with the same generator; a class with too few samples gives its
share to the others), then each class draws its own samples. Without it, the whole dataset is one
class named "".

A sample id is the path relative to the dataset root (``train/n01440764/x.JPEG``), with a
``#<row>`` suffix for rows of container files (Parquet, .npy, .npz). Names that cannot be stored
as printable UTF-8 are escaped injectively (`make_sample_id`).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from trtcal.config import check_seed, parse_num_samples
from trtcal.errors import ConfigError, DataError

__all__ = [
    "ALL",
    "Selection",
    "select_samples",
    "allocate_per_class",
    "make_sample_id",
    "path_sort_key",
    "parse_num_samples",
    "MAX_SAMPLE_ID_BYTES",
]

ALL = None  # num_samples=None means every sample
MAX_SAMPLE_ID_BYTES = 1024  # the batch format's limit
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
ROW_WIDTH = 9


def path_sort_key(relpath: str) -> tuple[str, ...]:
    """Sort key of a relative path: by components, so a folder's files stay together
    (``a/x`` < ``a-b/y``, unlike plain string order) and shard-by-shard order equals global order."""
    return tuple(relpath.split("/"))


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def make_sample_id(relpath: str, row: int | None = None) -> str:
    """The sample id of a file (or of row `row` of a container file), relative to the dataset root.

    Backslashes are doubled and control, format, unassigned and undecodable characters become
    ``\\xNN`` / ``\\uNNNN`` escapes, so ids are printable UTF-8 and distinct paths never share an id.
    Ids longer than MAX_SAMPLE_ID_BYTES keep a prefix plus a sha256 of the whole id.
    """
    parts: list[str] = []
    for ch in relpath:
        if ch == "\\":
            parts.append("\\\\")
        elif unicodedata.category(ch) in _ESCAPED_CATEGORIES:
            parts.append(_escape_char(ch))
        else:
            parts.append(ch)
    sample_id = "".join(parts)
    if row is not None:
        sample_id = f"{sample_id}#{row:0{ROW_WIDTH}d}"
    encoded = sample_id.encode("utf-8")
    if len(encoded) > MAX_SAMPLE_ID_BYTES:
        digest = hashlib.sha256(encoded).hexdigest()
        prefix = encoded[: MAX_SAMPLE_ID_BYTES - 80].decode("utf-8", "ignore")
        sample_id = f"{prefix}...sha256:{digest}"
    return sample_id


@dataclass(frozen=True)
class Selection:
    """What was selected, per shard and class: sorted positions among that shard's entries of that class.

    Attributes:
        per_shard: one mapping per shard (input order): class -> sorted int64 positions within
            the shard's entries of that class (class "" = all the shard's entries).
        num_requested: the asked-for count (None for all).
        num_candidates: how many samples the dataset holds.
        num_selected: how many were selected (less than asked only when allowed).
    """

    per_shard: tuple[Mapping[str, npt.NDArray[np.int64]], ...]
    num_requested: int | None
    num_candidates: int
    num_selected: int

    @property
    def shortfall(self) -> int:
        return 0 if self.num_requested is None else self.num_requested - self.num_selected


def allocate_per_class(
    class_counts: Sequence[int], num_samples: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """How many samples each class gives: an even split, the remainder to classes drawn by `rng`,
    and the share a small class cannot give passed to the others. Sums to min(num_samples, total)."""
    capacity = np.asarray(class_counts, dtype=np.int64)
    allocation = np.zeros_like(capacity)
    remaining = int(min(num_samples, int(capacity.sum())))
    while remaining > 0:
        open_classes = np.flatnonzero(allocation < capacity)
        share = remaining // len(open_classes)
        if share == 0:
            picked = np.sort(rng.choice(len(open_classes), size=remaining, replace=False))
            allocation[open_classes[picked]] += 1
            break
        add = np.minimum(share, capacity[open_classes] - allocation[open_classes])
        allocation[open_classes] += add
        remaining -= int(add.sum())
    return allocation


def select_samples(
    counts: Sequence[Mapping[str, int]],
    *,
    num_samples: int | None,
    seed: int,
    allow_fewer: bool = False,
) -> Selection:
    """Choose samples from shards whose entries are counted per class.

    Args:
        counts: per shard (in sorted shard order), class -> number of entries of that class.
            Give one class ("") per shard for a plain, unstratified draw.
        num_samples: how many to choose; None for all.
        seed: seeds ``np.random.Generator(np.random.PCG64(seed))``.
        allow_fewer: when the dataset holds fewer than `num_samples`, select them all instead of
            raising.

    Raises:
        ConfigError: bad num_samples or seed.  DataError: no samples, or too few (unless allowed).
    """
    check_seed(seed)  # the rules are trtcal.config's; a direct caller gets the same errors
    if num_samples is not None and (isinstance(num_samples, bool) or parse_num_samples(num_samples) != num_samples):
        raise ConfigError(f"num_samples must be a positive integer or None (all), got {num_samples!r}")
    classes = sorted({c for shard in counts for c in shard})
    per_class_counts = np.array([[int(shard.get(c, 0)) for c in classes] for shard in counts], dtype=np.int64).reshape(
        len(counts), len(classes)
    )
    if (per_class_counts < 0).any():
        raise ConfigError("counts must not be negative")
    class_totals = per_class_counts.sum(axis=0)
    total = int(class_totals.sum())
    if total == 0:
        raise DataError("the dataset holds no samples (no image, Parquet, .npy or .npz entries were found)")
    if num_samples is not None and num_samples > total and not allow_fewer:
        raise DataError(
            f"asked for {num_samples} samples but the dataset holds only {total}; pass num_samples <= {total} "
            "or 'all'"
        )
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    if num_samples is None or num_samples >= total:
        allocation = class_totals.copy()
    else:
        allocation = allocate_per_class(class_totals, num_samples, rng)

    per_shard: list[dict[str, npt.NDArray[np.int64]]] = [{} for _ in counts]
    for k, cls in enumerate(classes):
        n_class, n_take = int(class_totals[k]), int(allocation[k])
        if n_take == 0:
            continue
        if n_take == n_class:
            chosen = np.arange(n_class, dtype=np.int64)
        else:
            chosen = np.sort(rng.choice(n_class, size=n_take, replace=False, shuffle=False)).astype(np.int64)
        # Positions within the class, laid end to end over the shards -> (shard, local position).
        starts = np.concatenate(([0], np.cumsum(per_class_counts[:, k])))
        shard_of = np.searchsorted(starts, chosen, side="right") - 1
        for shard in np.unique(shard_of):
            local = chosen[shard_of == shard] - starts[shard]
            per_shard[int(shard)][cls] = local
    selected = int(allocation.sum())
    return Selection(
        per_shard=tuple(per_shard), num_requested=num_samples, num_candidates=total, num_selected=selected
    )
