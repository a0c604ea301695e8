"""scripts/install-torch: the CPU build of torch from pip's configured sources, else from PyTorch's CPU index.

Run for real with pip (``--dry-run --report``, so nothing is installed) against stand-ins: a file:// index
playing PyPI, holding only ``torch==X`` (PyPI's Linux wheels are the CUDA build); a local HTTP server playing
https://download.pytorch.org/whl/cpu, holding ``torch==X+cpu`` and recording what pip asks it; and a wheel
directory playing this machine's ``find-links``. pip's own configuration files are switched off
(PIP_CONFIG_FILE=/dev/null), so the machine's pip.conf plays no part. The wheels are tiny stand-ins with
torch's names and versions. What this cannot check: the real PyTorch index (not reachable from here).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install-torch"
VERSION = re.search(r'"torch==([0-9][0-9A-Za-z.]*)', (ROOT / "pyproject.toml").read_text()).group(1)  # type: ignore[union-attr]


def _wheel(directory: Path, version: str) -> Path:
    """A minimal pure-Python wheel named torch ``version`` (pip reads its metadata to resolve)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("torch/__init__.py", "")
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def _index(root: Path, *wheels: Path) -> Path:
    """A PEP 503 simple index under ``root``/simple listing ``wheels`` for torch."""
    page = root / "simple" / "torch"
    page.mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="../../files/{w.name}">{w.name}</a>\n' for w in wheels)
    (page / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    for w in wheels:
        (root / "files").mkdir(exist_ok=True)
        (root / "files" / w.name).write_bytes(w.read_bytes())
    return root / "simple"


class _Recorder(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def cpu_index(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """PyTorch's CPU index stand-in over HTTP: its URL and the paths pip asked for."""
    root = tmp_path / "pytorch"
    _index(root, _wheel(tmp_path / "build-cpu", f"{VERSION}+cpu"))
    requests: list[str] = []
    handler = type("Handler", (_Recorder,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def public_index(tmp_path: Path) -> str:
    """PyPI stand-in: only the plain (on Linux: CUDA) build of the pinned version."""
    return _index(tmp_path / "pypi", _wheel(tmp_path / "build-cuda", VERSION)).as_uri()


def _run(tmp_path: Path, cpu_index_url: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    report = tmp_path / "report.json"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    base.update(PIP_CONFIG_FILE=os.devnull, PIP_CACHE_DIR=str(tmp_path / "pip-cache"),
                PIP_DISABLE_PIP_VERSION_CHECK="1", TORCH_CPU_INDEX=cpu_index_url, **env)  # fmt: skip
    proc = subprocess.run(
        [str(SCRIPT), sys.executable, "--dry-run", "--ignore-installed", "--retries", "0", "--timeout", "5",
         "--report", str(report)],
        env=base, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    chosen = []
    if proc.returncode == 0:
        installs = json.loads(report.read_text())["install"]
        chosen = [f"{i['metadata']['version']} {i['download_info']['url']}" for i in installs]
    return proc, chosen


def test_public_index_only_gets_the_cpu_build_from_pytorchs_index(
    tmp_path: Path, public_index: str, cpu_index: tuple[str, list[str]]
) -> None:
    url, requests = cpu_index
    proc, chosen = _run(tmp_path, url, PIP_INDEX_URL=public_index)
    assert proc.returncode == 0, proc.stderr
    assert len(chosen) == 1 and chosen[0].startswith(f"{VERSION}+cpu http://127.0.0.1"), chosen
    assert "/simple/torch/" in requests
    assert "trying PyTorch's CPU index" in proc.stderr


def test_configured_sources_with_the_cpu_wheel_never_contact_pytorchs_index(
    tmp_path: Path, public_index: str, cpu_index: tuple[str, list[str]]
) -> None:
    url, requests = cpu_index
    local = tmp_path / "wheels"
    _wheel(local, f"{VERSION}+cpu")
    proc, chosen = _run(tmp_path, url, PIP_INDEX_URL=public_index, PIP_FIND_LINKS=str(local))
    assert proc.returncode == 0, proc.stderr
    assert chosen == [f"{VERSION}+cpu {(local / f'torch-{VERSION}+cpu-py3-none-any.whl').as_uri().replace('+', '%2B')}"]
    assert requests == []


def test_unreachable_cpu_index_fails_instead_of_taking_the_cuda_build(tmp_path: Path, public_index: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}/simple"
    proc, _ = _run(tmp_path, closed, PIP_INDEX_URL=public_index)
    assert proc.returncode != 0
    assert f"torch=={VERSION}+cpu" in proc.stderr
    assert closed in proc.stderr


def test_setup_installs_torch_through_the_script() -> None:
    setup = (ROOT / "scripts" / "setup").read_text()
    assert "scripts/install-torch" in setup
    assert not re.search(r"pip install[^\n]*torch==", setup), "setup must not pip install torch directly"
