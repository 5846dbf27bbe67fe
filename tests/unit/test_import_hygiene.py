"""trtcal.core imports numpy only; `import trtcal` and the CLI parser stay light."""

import subprocess
import sys

HEAVY = ["ray", "onnx", "onnxruntime", "pyarrow", "fsspec", "tensorrt", "torch", "s3fs", "scipy", "PIL"]


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_core_imports_numpy_only():
    loaded = _loaded_after("import trtcal.core")
    assert "numpy" in loaded
    assert not [m for m in HEAVY if m in loaded]


def test_top_level_package_is_light():
    loaded = _loaded_after("import trtcal")
    assert not [m for m in HEAVY if m in loaded]


def test_cli_parser_is_light():
    loaded = _loaded_after("from trtcal.cli import build_parser; build_parser()")
    assert not [m for m in HEAVY if m in loaded]


def test_batch_export_and_runners_never_import_ray():
    # Every module of these packages (found on disk, so new ones are covered): they run inside Ray
    # workers and actors, and in plain processes that must not pay for Ray; the TensorRT adapter
    # imports TensorRT only when it is used.
    code = (
        "import importlib, importlib.util, pkgutil\n"
        "for package in ('trtcal.batch', 'trtcal.export', 'trtcal.runners'):\n"
        "    root = importlib.import_module(package)\n"
        "    for info in pkgutil.walk_packages(root.__path__, package + '.'):\n"
        "        importlib.import_module(info.name)"
    )
    loaded = _loaded_after(f"exec({code!r})")
    assert "trtcal.export.qdq" in loaded and "trtcal.runners.onnxruntime" in loaded
    assert "ray" not in loaded
    assert "tensorrt" not in loaded


def test_batch_package_is_pyarrow_free_until_a_file_is_read():
    loaded = _loaded_after("import trtcal.batch, trtcal.model")
    assert not [m for m in ("ray", "pyarrow", "fsspec", "onnx", "onnxruntime", "torch") if m in loaded]
