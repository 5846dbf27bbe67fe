"""The shape of the code base, checked statically (ast and text; nothing is imported or run).

- no module in trtcal/ over MAX_MODULE_LINES lines, no function over MAX_FUNCTION_LINES lines,
  except the entries of the allow-lists below, each with its reason;
- no import cycle among trtcal modules (imports inside functions and under TYPE_CHECKING count:
  a cycle there still means two modules that cannot be understood apart);
- no file in the repository cites a Markdown document that the repository does not hold.

An allow-list entry that no longer applies (the module got shorter, the function moved) fails too,
so the lists only shrink.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = REPO_ROOT / "trtcal"
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80  # def line to last line, docstring included; nested functions count apart

# path (relative to the repository) -> why it may be longer for now
LONG_MODULES: dict[str, str] = {
    "trtcal/storage/store.py": "845 lines: publish, verify, gc and leases of one CacheStore; layout.py took the paths, the rest is not split yet",
    "trtcal/workers/sources.py": "no move of issue 14 splits it yet (866 lines: one class per source kind)",
}

# "path::Qualified.name" -> why it may be longer for now
LONG_FUNCTIONS: dict[str, str] = {
    "trtcal/orchestrator/jobs.py::submit_job": "being split by issue 14 move 1 (one config tree)",
    "trtcal/runners/tensorrt/engine.py::build_engine": "a 45-line body under a docstring that documents each build stage",
    "trtcal/cli/cmd_engine.py::run_build": "being split by issue 14 move 1 (pass the config, not its fields)",
    "trtcal/cli/cmd_eval.py::run_eval": "grew to 82 lines with `eval --target-sqnr/--output-kind` (9e2d5a8); to split",
    "trtcal/export/qdq.py::plan_qdq": "no move of issue 14 splits it yet (one pass over the graph's nodes)",
    "trtcal/export/qdq.py::apply_plan": "no move of issue 14 splits it yet (one pass over the graph's nodes)",
    "trtcal/export/sensitivity.py::fallback_auto": "no move of issue 14 splits it yet (the search loop)",
}

# modules of one cycle -> why the cycle exists for now
IMPORT_CYCLES: dict[frozenset[str], str] = {
}


@functools.lru_cache(maxsize=1)
def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _relative(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


# --- size ------------------------------------------------------------------------------------------


@functools.cache
def _parse(path: Path) -> tuple[str, ast.Module]:
    text = path.read_text()
    return text, ast.parse(text)


def _module_lengths() -> dict[str, int]:
    return {_relative(path): len(_parse(path)[0].splitlines()) for path in _modules().values()}


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """(qualified name, lines) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + node.name
            yield name, node.end_lineno - node.lineno + 1  # type: ignore[operator]
            yield from _functions(node, name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")
        else:
            yield from _functions(node, prefix)


def _function_lengths() -> dict[str, int]:
    lengths = {}
    for path in _modules().values():
        for name, lines in _functions(_parse(path)[1]):
            lengths[f"{_relative(path)}::{name}"] = lines
    return lengths


def test_no_module_is_over_the_limit_unless_allowed() -> None:
    too_long = {path: n for path, n in _module_lengths().items() if n > MAX_MODULE_LINES}
    unexplained = {path: n for path, n in too_long.items() if path not in LONG_MODULES}
    assert not unexplained, f"modules over {MAX_MODULE_LINES} lines: {unexplained}; split them"


def test_no_function_is_over_the_limit_unless_allowed() -> None:
    too_long = {name: n for name, n in _function_lengths().items() if n > MAX_FUNCTION_LINES}
    unexplained = {name: n for name, n in too_long.items() if name not in LONG_FUNCTIONS}
    assert not unexplained, f"functions over {MAX_FUNCTION_LINES} lines: {unexplained}; split them"


def test_the_size_allow_lists_hold_only_what_is_still_too_long() -> None:
    modules, functions = _module_lengths(), _function_lengths()
    stale = [path for path in LONG_MODULES if modules.get(path, 0) <= MAX_MODULE_LINES]
    stale += [name for name in LONG_FUNCTIONS if functions.get(name, 0) <= MAX_FUNCTION_LINES]
    assert not stale, f"remove these allow-list entries (gone or short enough now): {stale}"


# --- import cycles ---------------------------------------------------------------------------------


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """trtcal modules `module` imports anywhere in its file (functions and TYPE_CHECKING included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(_parse(path)[1]):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:  # `from pkg import submodule`
                    found.add(f"{source}.{alias.name}")
                elif source in modules:
                    found.add(source)
    found.discard(module)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(frozenset(component))
    return components


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [frozenset({"a", "b", "c"})]


def test_no_import_cycle_among_trtcal_modules_unless_allowed() -> None:
    modules = _modules()
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    cycles = _cycles(graph)
    unexplained = [sorted(cycle) for cycle in cycles if cycle not in IMPORT_CYCLES]
    assert not unexplained, f"import cycles: {unexplained}; move the shared part into a module both import"
    stale = [sorted(cycle) for cycle in IMPORT_CYCLES if cycle not in cycles]
    assert not stale, f"remove these allow-list entries (the cycle is gone): {stale}"


# --- citations -------------------------------------------------------------------------------------

_SKIP_DIRS = {".git", ".venv", ".cache", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "build",
              "dist", "out"}  # fmt: skip
_TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".txt", ".cfg", ".ini", ".json", ""}
# A Markdown file name (ending in .md), bare or with a relative or absolute path. Not a path built from a
# variable (under $out): that is an output, not a citation.
_MD_REFERENCE = re.compile(r"(?<![\w./$}-])(/?(?:\.{1,2}/)*[\w][\w./-]*\.md)\b")
_URL = re.compile(r"\w+://\S+")
_OPTION_VALUE = re.compile(r"(?<![\w-])-{1,2}[a-zA-Z][\w-]*[ =]\S+")  # `--write report.md`: an output the command writes


def _repository_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git), or a walk that skips build outputs."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO_ROOT, capture_output=True, check=True,
        ).stdout.decode()  # fmt: skip
        return [REPO_ROOT / name for name in listing.split("\0") if name and (REPO_ROOT / name).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for directory, subdirs, names in os.walk(REPO_ROOT):
            subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            files += [Path(directory) / name for name in names]
        return files


def _md_references(text: str) -> Iterator[str]:
    for line in text.splitlines():
        line = _OPTION_VALUE.sub(" ", _URL.sub(" ", line))  # web addresses are public, not ours
        yield from _MD_REFERENCE.findall(line)


def _resolves(reference: str, citing: Path, markdown: set[Path]) -> bool:
    if reference.startswith("/tmp/"):  # where a command writes its output, e.g. `--write /tmp/x.md`
        return True
    if "/" not in reference:  # a bare name: some document of that name, anywhere in the repository
        return any(path.name == reference for path in markdown)
    candidates = (citing.parent / reference, REPO_ROOT / reference)
    return any(candidate.resolve() in markdown for candidate in candidates)


def test_md_reference_pattern() -> None:
    md = ".md"  # spelled apart so this file cites nothing itself
    text = f"see docs/a{md} §2, (../up/B{md}), `c-d{md}` and /abs/E{md}; https://h.org/o/r/F{md} is a " \
           f"web address, *{md} a glob, $out/G{md} and `--write H{md}` outputs"  # fmt: skip
    assert list(_md_references(text)) == [f"docs/a{md}", f"../up/B{md}", f"c-d{md}", f"/abs/E{md}"]


def test_every_cited_markdown_document_is_in_the_repository() -> None:
    files = [path for path in _repository_files() if path.suffix in _TEXT_SUFFIXES]
    markdown = {path.resolve() for path in files if path.suffix == ".md"}
    missing = []
    for path in files:
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        missing += [f"{_relative(path)}: {ref}" for ref in _md_references(text) if not _resolves(ref, path, markdown)]
    assert not missing, "documents cited but not in the repository (write the fact into docs/):\n" + "\n".join(
        missing
    )
