"""The serving runtime is lean and never imports the offline toolchain (recsvc/offline) or the CLI.

Two checks: what a fresh interpreter holds after importing the serving entry points (what a worker
process pays for), and every import statement of the runtime's source, including the ones inside
functions that only run on some paths.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_the_cli_parser_loads_no_model_code() -> None:
    # Every `recsvc` command builds the whole parser: `recsvc recommend` must not pay for training.
    code = "import json, sys, recsvc.cli\nrecsvc.cli._parser()\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded = json.loads(out.stdout)
    assert [m for m in loaded if m.split(".")[0] in (*HEAVY, "faiss", "onnxruntime", "grpc")] == []


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_runtime_module_imports_the_offline_side_even_lazily() -> None:
    runtime = [p for p in PACKAGE.rglob("*.py")
               if p.relative_to(PACKAGE).parts[0] not in ("offline", "cli", "v1")]  # fmt: skip
    assert len(runtime) > 40
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.startswith(OFFLINE_SIDE))
                 for p in runtime}  # fmt: skip
    assert {k: v for k, v in offenders.items() if v} == {}


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
    assert "recsvc[train,triton,bench]" in extras["dev"]       # scripts/setup installs .[dev]: everything


def test_an_offline_command_without_its_extra_names_the_extra(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from recsvc.cli import main

    monkeypatch.setitem(sys.modules, "pandas", None)      # as on a serving image: import pandas fails
    # Modules other tests already imported would not import pandas again: forget them for this test.
    for name in [m for m in sys.modules if m == "recsvc.offline.data" or m.startswith("recsvc.offline.data.")]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["train", "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert err == "recsvc train: needs pandas, which this install lacks: pip install 'recsvc[train]'\n"
