"""The restricted PyTorch checkpoint reader: reads both layouts, refuses every non-allowlisted global.

Checkpoints are written here byte by byte (pickle opcodes + zip/legacy framing), exactly as PyTorch
lays them out, so the tests need no PyTorch and control every field an attacker could.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trtcal.demo._pth import read_state_dict
from trtcal.errors import ModelError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# --- a minimal protocol-2 pickle writer -----------------------------------------------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _ordered_dict() -> bytes:
    return _global("collections", "OrderedDict") + b")R"


def _storage_pid(storage_type: str, key: str, numel: int, *, legacy: bool) -> bytes:
    fields = [_str("storage"), _global("torch", storage_type), _str(key), _str("cpu"), _int(numel)]
    if legacy:
        fields.append(b"N")  # view_metadata
    return _tuple(*fields) + b"Q"  # BINPERSID


def _tensor(pid: bytes, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    args = _tuple(
        pid, _int(offset), _tuple(*map(_int, shape)), _tuple(*map(_int, stride)), b"\x89", _ordered_dict()
    )
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _state_dict_pickle(entries: list[tuple[str, bytes]]) -> bytes:
    return b"\x80\x02" + _ordered_dict() + b"".join(_str(k) + v + b"s" for k, v in entries) + b"."


# --- checkpoint framing ---------------------------------------------------------------------------


def _zip_checkpoint(data_pkl: bytes, storages: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            archive.writestr(f"archive/data/{key}", raw)
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def _legacy_checkpoint(main_pickle: bytes, storages: dict[str, tuple[int, bytes]]) -> bytes:
    sys_info = {
        "protocol_version": 1001,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    parts = [pickle.dumps(LEGACY_MAGIC, 2), pickle.dumps(1001, 2), pickle.dumps(sys_info, 2), main_pickle]
    parts.append(pickle.dumps(list(storages), 2))
    for numel, raw in storages.values():
        parts.append(struct.pack("<q", numel) + raw)
    return b"".join(parts)


def _example(legacy: bool) -> tuple[bytes, dict[str, np.ndarray]]:
    """Three tensors like a real state dict: two views of one float storage (one transposed, one at
    an offset) and an int64 scalar counter."""
    floats = np.arange(20, dtype=np.float32) * 0.5 - 3.0
    counter = np.array([7], dtype=np.int64)
    pid_floats = _storage_pid("FloatStorage", "0", 20, legacy=legacy)
    pid_counter = _storage_pid("LongStorage", "1", 1, legacy=legacy)
    main = _state_dict_pickle(
        [
            ("conv.weight", _tensor(pid_floats, 0, (3, 4), (1, 3))),  # 4x3 block, transposed
            ("conv.bias", _tensor(pid_floats, 12, (2, 2, 2), (4, 2, 1))),
            ("bn.num_batches_tracked", _tensor(pid_counter, 0, (), ())),
        ]
    )
    expected = {
        "conv.weight": floats[:12].reshape(4, 3).T,
        "conv.bias": floats[12:20].reshape(2, 2, 2),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }
    raw = {"0": floats.tobytes(), "1": counter.tobytes()}
    if legacy:
        return _legacy_checkpoint(main, {"0": (20, raw["0"]), "1": (1, raw["1"])}), expected
    return _zip_checkpoint(main, raw), expected


# --- reading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reads_tensors_with_offsets_strides_and_shared_storage(legacy: bool, tmp_path) -> None:
    checkpoint, expected = _example(legacy)
    path = tmp_path / "model.pth"
    path.write_bytes(checkpoint)

    for source in (path, str(path), checkpoint):
        state = read_state_dict(source)
        assert list(state) == list(expected)
        for name, array in expected.items():
            assert state[name].dtype == array.dtype
            assert state[name].shape == array.shape
            assert state[name].flags.c_contiguous
            np.testing.assert_array_equal(state[name], array)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_arrays_do_not_alias_one_another(legacy: bool) -> None:
    checkpoint, _ = _example(legacy)
    state = read_state_dict(checkpoint)
    state["conv.weight"][...] = 0
    assert state["conv.bias"].any()


# --- refusing code --------------------------------------------------------------------------------


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_refuses_a_pickle_that_calls_os_system(legacy: bool, protocol: int, tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"w": _RunsShell(f"touch {marker}")}, protocol=protocol)  # a real pickler's output
    checkpoint = _legacy_checkpoint(evil, {}) if legacy else _zip_checkpoint(evil, {})

    # protocol 2+ reaches the global and is refused by name; protocols 0-1 write text opcodes that
    # no state dict uses, refused before any object is built
    with pytest.raises(
        ModelError, match=r"references (posix|os|nt)\.system|opcode \w+ at byte \d+ .*refusing"
    ):
        read_state_dict(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("body", "opcode"),
    [
        (b"(" + b"cos\nsystem\n" + _str("true") + b"o.", "OBJ"),
        (b"(ios\nsystem\nS'true'\n.", "INST"),
        (_global("collections", "OrderedDict") + b")\x81.", "NEWOBJ"),
        (b"\x82\x01.", "EXT1"),  # copyreg extension registry
        (b"B\x04\x00\x00\x00abcd.", "BINBYTES"),
        (b"\x96" + struct.pack("<Q", 4) + b"abcd.", "BYTEARRAY8"),
    ],
)
def test_refuses_opcodes_a_state_dict_never_uses(body: bytes, opcode: str) -> None:
    with pytest.raises(ModelError, match=f"opcode {opcode} at byte"):
        read_state_dict(_zip_checkpoint(b"\x80\x02" + body, {}))


def test_refuses_a_length_beyond_the_file_without_allocating_it() -> None:
    main = b"\x80\x02X" + struct.pack("<I", 0xFFFFFFF0) + b"abc."  # BINUNICODE claiming 4 GiB
    with pytest.raises(ModelError, match="malformed"):
        read_state_dict(_zip_checkpoint(main, {}))


def test_refuses_a_memo_index_that_would_claim_gigabytes() -> None:
    main = b"\x80\x02" + _ordered_dict() + b"r" + struct.pack("<I", 0xFFFFFFF0) + b"."  # LONG_BINPUT
    with pytest.raises(ModelError, match="memo index 4294967280"):
        read_state_dict(_zip_checkpoint(main, {}))


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("builtins", "getattr"),
        ("builtins", "__import__"),
        ("subprocess", "Popen"),
        ("numpy", "frombuffer"),
        ("torch", "load"),
        ("torch._utils", "_rebuild_parameter"),  # a real torch global, but not on the allowlist
        ("collections", "OrderedDict.fromkeys"),  # dotted lookups on an allowed class are refused too
        ("collections", "namedtuple"),
    ],
)
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_refuses_any_global_off_the_allowlist(module: str, name: str, legacy: bool) -> None:
    main = b"\x80\x02" + _global(module, name) + _tuple(_str("x")) + b"R."
    checkpoint = _legacy_checkpoint(main, {}) if legacy else _zip_checkpoint(main, {})
    with pytest.raises(ModelError, match=f"references {module}.{name}"):
        read_state_dict(checkpoint)


def test_refuses_an_unknown_storage_type() -> None:
    pid = _storage_pid("BFloat16Storage", "0", 4, legacy=False)
    main = _state_dict_pickle([("w", _tensor(pid, 0, (4,), (1,)))])
    with pytest.raises(ModelError, match="torch.BFloat16Storage"):
        read_state_dict(_zip_checkpoint(main, {"0": bytes(8)}))


# --- malformed files ------------------------------------------------------------------------------


def test_refuses_a_file_that_is_not_a_checkpoint() -> None:
    with pytest.raises(ModelError, match="not a PyTorch checkpoint"):
        read_state_dict(b"\x89PNG\r\n\x1a\n" + bytes(100))


def test_missing_file_is_a_model_error(tmp_path) -> None:
    with pytest.raises(ModelError, match="missing.pth"):
        read_state_dict(tmp_path / "missing.pth")


def test_refuses_a_top_level_that_is_not_a_state_dict() -> None:
    main = b"\x80\x02" + _ordered_dict() + _str("epoch") + _int(3) + b"s."
    with pytest.raises(ModelError, match="'epoch' is a int, not a tensor"):
        read_state_dict(_zip_checkpoint(main, {}))


def test_refuses_a_tensor_that_reaches_past_its_storage() -> None:
    pid = _storage_pid("FloatStorage", "0", 4, legacy=False)
    main = _state_dict_pickle([("w", _tensor(pid, 2, (2, 2), (2, 1)))])  # needs element 5 of 4
    with pytest.raises(ModelError, match="reaches element 5 of a storage of 4"):
        read_state_dict(_zip_checkpoint(main, {"0": bytes(16)}))


def test_refuses_a_tensor_larger_than_its_storage() -> None:
    # stride 0 would stay in bounds yet make us allocate 10**9 elements
    pid = _storage_pid("FloatStorage", "0", 1, legacy=False)
    main = _state_dict_pickle([("w", _tensor(pid, 0, (10**9,), (0,)))])
    with pytest.raises(ModelError, match="has 1000000000 elements"):
        read_state_dict(_zip_checkpoint(main, {"0": bytes(4)}))


def test_refuses_a_truncated_legacy_checkpoint() -> None:
    checkpoint, _ = _example(legacy=True)
    with pytest.raises(ModelError, match="truncated"):
        read_state_dict(checkpoint[:-3])


def test_refuses_a_zip_storage_of_the_wrong_size() -> None:
    pid = _storage_pid("FloatStorage", "0", 4, legacy=False)
    main = _state_dict_pickle([("w", _tensor(pid, 0, (4,), (1,)))])
    with pytest.raises(ModelError, match="holds 12 bytes, expected 16"):
        read_state_dict(_zip_checkpoint(main, {"0": bytes(12)}))


def test_refuses_a_missing_zip_storage() -> None:
    pid = _storage_pid("FloatStorage", "7", 4, legacy=False)
    main = _state_dict_pickle([("w", _tensor(pid, 0, (4,), (1,)))])
    with pytest.raises(ModelError, match="storage '7' is missing"):
        read_state_dict(_zip_checkpoint(main, {}))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_checkpoints_give_a_model_error_or_arrays(legacy: bool, data: st.DataObject) -> None:
    """Flip, drop or overwrite bytes anywhere: the reader returns arrays or raises ModelError, nothing else."""
    checkpoint, _ = _example(legacy)
    position = data.draw(st.integers(0, len(checkpoint) - 1))
    mutation = data.draw(st.sampled_from(["flip", "truncate", "overwrite"]))
    if mutation == "flip":
        corrupted = bytearray(checkpoint)
        corrupted[position] ^= data.draw(st.integers(1, 255))
        corrupted = bytes(corrupted)
    elif mutation == "truncate":
        corrupted = checkpoint[:position]
    else:
        patch = data.draw(st.binary(min_size=1, max_size=8))
        corrupted = checkpoint[:position] + patch + checkpoint[position + len(patch) :]
    try:
        state = read_state_dict(corrupted)
    except ModelError:
        return
    assert all(isinstance(v, np.ndarray) for v in state.values())
