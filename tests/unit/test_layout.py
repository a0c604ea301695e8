"""The serving runtime is lean and never imports the offline toolchain (recsvc/offline) or the CLI.

Two checks: what a fresh interpreter holds after importing the serving entry points (what a worker
process pays for), and every import statement of the runtime's source, including the ones inside
functions that only run on some paths.
"""

from __future__ import annotations

import ast
import graphlib
import json
import re
import subprocess
import sys
from pathlib import Path

import recsvc

PACKAGE = Path(recsvc.__file__).parent
# What a request or an event touches; the worker supervisor starts each worker through `recsvc serve`.
SERVING_ENTRY_POINTS = (
    "recsvc.server.app", "recsvc.server.workers", "recsvc.pipeline", "recsvc.history", "recsvc.retrieval",
    "recsvc.ranking", "recsvc.versions", "recsvc.deny", "recsvc.config", "recsvc.repository",
)  # fmt: skip
HEAVY = ("torch", "matplotlib", "pytriton", "pandas")
OFFLINE_SIDE = ("recsvc.offline", "recsvc.cli")


def _loaded_after_importing(modules: tuple[str, ...]) -> list[str]:
    code = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded: list[str] = json.loads(out.stdout)
    return loaded


def test_the_serving_runtime_loads_neither_torch_nor_matplotlib_nor_pytriton_nor_the_offline_side() -> None:
    loaded = _loaded_after_importing(SERVING_ENTRY_POINTS)
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    offline = [m for m in loaded if m.startswith(OFFLINE_SIDE)]
    assert heavy == [] and offline == [], (heavy[:10], offline)
    assert "recsvc.server.app" in loaded       # the check did import something
    assert "onnx" not in loaded                # only publish reads ONNX graphs (ONNX Runtime runs them)


def test_the_cli_parser_loads_no_model_code() -> None:
    # Every `recsvc` command builds the whole parser: `recsvc recommend` must not pay for training.
    code = "import json, sys, recsvc.cli\nrecsvc.cli._parser()\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded = json.loads(out.stdout)
    assert [m for m in loaded if m.split(".")[0] in (*HEAVY, "faiss", "onnxruntime", "grpc")] == []


def _parse(source: str) -> ast.AST:
    # Under CPython 3.11.7, in the full unit run only (never in this file alone), ast.parse of an ordinary
    # module once failed with "SystemError: AST constructor recursion depth mismatch", an interpreter-state
    # check, not a property of the source; parsing again succeeds.
    for _ in range(4):
        try:
            return ast.parse(source)
        except SystemError:
            continue
    return ast.parse(source)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(_parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _runtime_modules() -> list[Path]:
    runtime = [p for p in PACKAGE.rglob("*.py")
               if p.relative_to(PACKAGE).parts[0] not in ("offline", "cli", "v1")]  # fmt: skip
    assert len(runtime) > 40
    return runtime


def test_no_runtime_module_imports_the_offline_side_even_lazily() -> None:
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.startswith(OFFLINE_SIDE))
                 for p in _runtime_modules()}  # fmt: skip
    assert {k: v for k, v in offenders.items() if v} == {}


def test_heavy_packages_appear_in_the_runtime_only_where_they_are_known_to_be_safe() -> None:
    # model_torch.py runs inside Triton's python stub (publish copies it into a version), never in recsvc;
    # the torch search backend is opt-in (index_device=torch, the gpu extra) and checks torch is there.
    allowed = {"repository/model_torch.py": ["torch"], "retrieval/backends.py": ["torch"]}
    found = {str(p.relative_to(PACKAGE)): sorted({n.split(".")[0] for n in _imports(p)} & set(HEAVY))
             for p in _runtime_modules()}  # fmt: skip
    assert {k: v for k, v in found.items() if v} == allowed


def test_no_import_circles_in_the_package_even_through_lazy_imports() -> None:
    # Circles such as bench/compression <-> cli or engines <-> publishing only ever worked because one
    # side imported lazily; graphlib raises CycleError, naming the circle, if one comes back.
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}  # fmt: skip

    def module_of(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {name: {m for n in _imports(path) if (m := module_of(n)) not in (None, name)}
             for name, path in modules.items()}  # fmt: skip
    assert graph["recsvc.offline.bench.compression"] and graph["recsvc.offline.engines"]   # the graph is real
    graphlib.TopologicalSorter(graph).prepare()


def test_the_import_check_sees_a_lazy_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from recsvc.offline.models import train\n    import recsvc.cli\n")
    assert {"recsvc.offline.models", "recsvc.offline.models.train", "recsvc.cli"} <= _imports(module)


def test_the_base_install_is_the_serving_runtime_and_extras_carry_the_rest() -> None:
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert base.isdisjoint({"torch", "matplotlib", "nvidia-pytriton", "pandas"}), base
    extras = project["optional-dependencies"]
    assert any(d.startswith("torch==") for d in extras["train"])
    assert any(d.startswith("nvidia-pytriton") for d in extras["triton"])
    assert any(d.startswith("matplotlib") for d in extras["bench"])
    assert extras["gpu"] == [d for d in extras["train"] if d.startswith("torch==")]   # one torch pin
    # scripts/setup installs .[dev]: everything
    assert f"recsvc[{','.join(e for e in extras if e != 'dev')}]" in extras["dev"]


def test_an_offline_command_without_its_extra_names_the_extra() -> None:
    # A fresh interpreter where `import pandas` fails, as on a serving image.
    code = ("import sys; sys.modules['pandas'] = None; from recsvc.cli import main; "
            "sys.exit(main(['train', '--dataset', 'synthetic']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr) == (
        2, "recsvc train: needs pandas, which this install lacks: pip install 'recsvc[train]'\n")
