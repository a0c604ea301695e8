"""TritonServer's command line, environment and checks, without starting the server."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

import recsvc.offline.triton_server as ts
from recsvc.config import Settings
from recsvc.errors import ConfigError
from recsvc.offline.triton_server import TritonOptions, TritonServer, find_tritonserver, options_from_settings


def fake_distribution(root: Path) -> ts.TritonDistribution:
    dist = ts.TritonDistribution(
        binary=root / "bin" / "tritonserver",
        backends=root / "backends",
        caches=root / "caches",
        libs=root / "libs",
        stubs=root / "stubs",
    )
    (dist.backends / "python").mkdir(parents=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    (dist.stubs / version).mkdir(parents=True)
    (dist.stubs / version / "triton_python_backend_stub").write_bytes(b"stub for " + version.encode())
    return dist


def test_the_bundled_server_is_found() -> None:
    dist = find_tritonserver()
    assert os.access(dist.binary, os.X_OK)
    assert (dist.backends / "python" / "libtriton_python.so").is_file()
    assert dist.stub_for((sys.version_info.major, sys.version_info.minor)).is_file()


def test_missing_pytriton_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="install nvidia-pytriton"):
        find_tritonserver()


def test_stub_for_our_python_is_installed_once_and_replaced_when_different(tmp_path: Path) -> None:
    dist = fake_distribution(tmp_path)
    target = ts.install_stub(dist)
    assert target == dist.backends / "python" / "triton_python_backend_stub"
    assert target.read_bytes().startswith(b"stub for 3.")
    mtime = target.stat().st_mtime_ns
    assert ts.install_stub(dist) == target and target.stat().st_mtime_ns == mtime  # identical: untouched
    target.write_bytes(b"stub for another python")
    ts.install_stub(dist)
    assert target.read_bytes().startswith(b"stub for 3.")
    with pytest.raises(ConfigError, match=r"no python-backend stub for Python 2\.7"):
        ts.install_stub(dist, (2, 7))


def test_command_uses_explicit_model_control_and_loads_the_models(tmp_path: Path) -> None:
    dist = fake_distribution(tmp_path)
    options = TritonOptions(
        model_repository=tmp_path / "repo", log_path=tmp_path / "t.log", models=("ranker", "other"),
        grpc_port=1001, http_port=1000, metrics_port=1002, extra_args=("--log-info=false",),
    )  # fmt: skip
    argv = TritonServer(options, distribution=dist).command()
    assert argv[0] == str(dist.binary)
    for arg in [
        f"--model-repository={(tmp_path / 'repo').resolve()}",
        f"--backend-directory={dist.backends}",
        "--model-control-mode=explicit",
        "--load-model=ranker",
        "--load-model=other",
        "--exit-on-error=true",
        "--disable-auto-complete-config",
        "--grpc-port=1001",
        "--http-port=1000",
        "--metrics-port=1002",
        "--grpc-address=127.0.0.1",
        "--log-info=false",
    ]:
        assert arg in argv


def test_environment_lets_the_stub_find_this_interpreter_and_its_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/keep")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "8")
    dist = fake_distribution(tmp_path)
    options = TritonOptions(model_repository=tmp_path, log_path=tmp_path / "t.log", env={"EXTRA": "1"})
    env = TritonServer(options, distribution=dist).environment()
    path = env["PATH"].split(os.pathsep)
    assert path[0] == str(Path(sys.executable).parent) and path.count(path[0]) == 1
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert str(dist.libs) in libs and libs[-1] == "/opt/keep"
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    assert env["EXTRA"] == "1"


def test_urls_and_options_from_settings(tmp_path: Path) -> None:
    settings = Settings(
        triton_url="0.0.0.0:9001", triton_http_port=9000, triton_metrics_port=9002, model_repository=tmp_path,
        data_dir=tmp_path / "var", triton_model="rk", grace_s=3.0,
    )  # fmt: skip
    options = options_from_settings(settings)
    assert (options.host, options.grpc_port, options.http_port, options.metrics_port) == ("0.0.0.0", 9001, 9000, 9002)
    assert options.models == ("rk",) and options.exit_timeout_s == 3.0
    assert options.log_path == tmp_path / "var" / "tritonserver.log"
    server = TritonServer(options)
    assert server.grpc_url == "127.0.0.1:9001"  # a wildcard bind is reached on loopback
    assert server.http_url == "http://127.0.0.1:9000"
    with pytest.raises(ConfigError, match="host:port"):
        options_from_settings(Settings(triton_url="localhost"))


async def test_start_refuses_a_missing_repository(tmp_path: Path) -> None:
    server = TritonServer(TritonOptions(model_repository=tmp_path / "nope", log_path=tmp_path / "t.log"))
    with pytest.raises(ConfigError, match="does not exist"):
        await server.start()
    assert server.pid is None and await server.stop() is None
