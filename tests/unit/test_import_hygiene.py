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
