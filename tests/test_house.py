"""The house in pipeline order (docs: house.md): read from the source with ast, every oatoplan module imports only
modules listed before it in ORDER, imports oatoplan modules at its top (never inside a function), defers a
third-party import into a function only where ALLOWED_IN_FUNCTIONS says why, and stays small."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "oatoplan"

# Bottom to top: a module may import only modules before it.
ORDER = [
    "errors", "units", "paths", "files",    # every OatoError; units; package-data and user dirs; the safe writer
    "schema",                               # artifact dataclasses
    "artifacts",                            # strict JSON in and out, profile validation
    "ggml",                                 # ctypes bindings to the libggml that llama-cpp-python loaded
    "inventory",                            # what is in a GGUF
    "graph",                                # placement units, roles, crossings
    "names",                                # llama.cpp's names: -ot patterns, devices, the layer split
    "machine",                              # device registry, machine and build identity
    "rpc",                                  # RPC servers: probing, registering, the rpc-server binary
    "build",                                # tool beside the pipeline: builds the patched llama-cpp-python
    "memory",                               # VRAM terms and the budget rule
    "cost",                                 # the time model
    "segments",                             # the segment KV cache in plans: candidate, environment, note
    "solve", "streaming", "baselines",      # the integer program; weight streaming's layers and slots; named placements
    "plan",                                 # plan semantics and flags
    "split_search", "split_cost", "split",  # over several devices (GPUs, RPC): the search over layer splits; the
                                            # prices of a placement; the program, llama.cpp's own splits, the Plan
    "load",                                 # loading with a plan
    "serve",                                # the OpenAI-compatible server, on top of load
    "measure",                              # the timing harness
    "profile_moe",                          # mixture-of-experts and host memory measurements, for profile
    "profile", "profile_devices",           # the stage that measures the machine, and more accelerators (RPC)
    "calibrate", "bench", "bench_split",    # the stages that measure real runs (bench_split: over several devices)
    "report",                               # tables and charts
    "doctor",                               # tool beside the pipeline: what this installation can do
    "testing",                              # helpers for tests and benchmarks/
    "__init__",                             # the public API: oatoplan.load
    "cli", "__main__",
]
# Third-party imports that may wait inside a function, and why.
ALLOWED_IN_FUNCTIONS = {
    ("report", "matplotlib"): "optional for the PNG, and slow to import",
    ("report", "matplotlib.pyplot"): "the same",
    ("build", "json"): "only the sdist download needs it (build.py is owned by the packaging work)",
    ("build", "urllib.request"): "the same",
}
# At most this many lines of a module are neither blank nor comment-only.
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def _imports(path: Path) -> list[tuple[str, bool, bool]]:
    """(module, is oatoplan's, inside a function?) for every import of `path`; oatoplan's modules by short name."""
    found: list[tuple[str, bool, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level == 0 and not module.startswith("oatoplan"):
                    found.append((module, False, inside))
                elif module.removeprefix("oatoplan").lstrip("."):
                    found.append((module.removeprefix("oatoplan").lstrip("."), True, inside))
                else:    # from . import x: a module, or a name the package's __init__ defines
                    found.extend((a.name if (PACKAGE / f"{a.name}.py").exists() else "__init__", True, inside)
                                 for a in child.names)
            elif isinstance(child, ast.Import):
                found.extend((a.name.removeprefix("oatoplan."), a.name.startswith("oatoplan"), inside)
                             for a in child.names)
            visit(child, inside)
    visit(ast.parse(path.read_text()), False)
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.stem)
def test_module_imports_only_modules_below_it(path):
    assert path.stem in ORDER, f"{path.name} is not placed in ORDER"
    below = ORDER[:ORDER.index(path.stem)]
    for name, own, _ in _imports(path):
        if own:
            assert name in below, f"{path.name} imports {name}, which is not below it in ORDER"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.stem)
def test_imports_are_at_the_top(path):
    for name, own, inside in _imports(path):
        if inside:
            assert not own, f"{path.name} imports oatoplan's {name} inside a function"
            assert (path.stem, name) in ALLOWED_IN_FUNCTIONS, f"{path.name} imports {name} inside a function"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.stem)
def test_module_is_small(path):
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(lines) <= MAX_LINES, f"{path.name} has {len(lines)} lines that are neither blank nor comments"


def test_the_checks_see_imports():
    """The parser finds what the rules are about (a check that finds nothing would pass anything)."""
    cli = {name for name, own, _ in _imports(PACKAGE / "cli.py") if own}
    assert {"load", "plan", "profile", "report", "__init__"} <= cli
    assert ("matplotlib", False, True) in _imports(PACKAGE / "report.py")
    assert ("graph", True, False) in _imports(PACKAGE / "memory.py")
    assert ("ggml", True, False) in _imports(PACKAGE / "machine.py")
