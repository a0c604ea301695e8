"""The chart's scripts (deploy/helm/recsvc/files/), run for real against temporary repositories.

publish.sh and commit-version.sh run the real `recsvc publish`; object-store.sh runs against a stand-in
rclone that maps a remote onto a local directory; build-engines.sh against a stand-in trtexec that
records its arguments. What cannot run here is the real rclone, TensorRT and a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recsvc.repository import config_template, list_versions
from recsvc.repository.tiny_bundle import write_tiny_bundle

FILES = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "recsvc" / "files"
VENV_BIN = str(Path(sys.executable).parent)  # where the `recsvc` console script is

# rclone, as far as object-store.sh uses it: "store:" paths live under $FAKE_REMOTE_ROOT.
FAKE_RCLONE = r"""#!/usr/bin/env python3
import os, shutil, sys
from pathlib import Path

def local(path):
    if path.startswith("store:"):
        return Path(os.environ["FAKE_REMOTE_ROOT"]) / path[len("store:"):].lstrip("/")
    return Path(path)

cmd, args = sys.argv[1], [a for a in sys.argv[2:] if not a.startswith("--")]
if cmd == "lsf":
    d = local(args[0])
    if not d.is_dir():
        sys.exit(3)  # rclone: directory not found
    for p in sorted(d.iterdir()):
        if p.is_file():
            print(p.name)
elif cmd == "copyto":
    src, dst = local(args[0]), local(args[1])
    if not src.is_file():
        sys.exit(4)  # rclone: file not found
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
elif cmd == "copy":
    shutil.copytree(local(args[0]), local(args[1]), dirs_exist_ok=True)
else:
    sys.exit(f"fake rclone: {cmd} not supported")
"""

FAKE_TRTEXEC = r"""#!/bin/sh
# Records its arguments as the "engine".
for a in "$@"; do
    case $a in --saveEngine=*) out=${a#--saveEngine=} ;; esac
done
printf '%s\n' "$@" >"$out"
"""


def _run(script: str, *args: str, env: dict[str, str], shell: str = "sh", check: bool = True) -> str:
    proc = subprocess.run(
        [shell, str(FILES / script), *args],
        env={"PATH": f"{env.pop('EXTRA_PATH', '')}:{VENV_BIN}:/usr/bin:/bin", "HOME": env.get("WORK", "/tmp"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert proc.returncode == 0, f"{script} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr if check else f"rc={proc.returncode}\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bundles")
    write_tiny_bundle(root / "b1", num_items=40, history_len=10, num_candidates=20, seed=1)
    write_tiny_bundle(root / "b2", num_items=40, history_len=10, num_candidates=20, seed=2)
    return root / "b1", root / "b2"


def test_scripts_parse() -> None:
    for script in FILES.glob("*.sh"):
        shell = "bash" if script.read_text().startswith("#!/bin/bash") else "sh"
        subprocess.run([shell, "-n", str(script)], check=True)
    for script in FILES.glob("*.py"):
        compile(script.read_text(), str(script), "exec")


def test_publish_direct_is_idempotent(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    b1, b2 = bundles
    repo = tmp_path / "repository"
    env = {"MODEL": "ranker", "FLAVOUR": "cpu", "WORK": str(tmp_path / "work"), "REPOSITORY": str(repo)}
    _run("publish.sh", "direct", env={**env, "BUNDLE_DIR": str(b1)})
    assert list_versions(repo) == [1]
    assert (repo / "ranker" / "config.pbtxt").read_text() == config_template("cpu")
    # The same bundle again (helm upgrade re-running the Job): nothing new.
    out = _run("publish.sh", "direct", env={**env, "BUNDLE_DIR": str(b1)})
    assert "already the newest published version" in out and list_versions(repo) == [1]
    assert (tmp_path / "work" / "SKIP").exists()
    _run("publish.sh", "direct", env={**env, "BUNDLE_DIR": str(b2)})
    assert list_versions(repo) == [1, 2]
    # An older bundle again is a roll-back: it becomes the newest version.
    _run("publish.sh", "direct", env={**env, "BUNDLE_DIR": str(b1)})
    assert list_versions(repo) == [1, 2, 3]
    assert (repo / "ranker" / "3" / "bundle" / "manifest.json").read_bytes() == (b1 / "manifest.json").read_bytes()
    # Bootstrap training happens only while nothing is published.
    out = _run("publish.sh", "direct", env={**env, "TRAIN_IF_EMPTY": "1"})
    assert "not training" in out and list_versions(repo) == [1, 2, 3]
    # A repository set up for the other Triton target is refused before anything is written.
    out = _run("publish.sh", "direct", env={**env, "FLAVOUR": "gpu", "BUNDLE_DIR": str(b2)}, check=False)
    assert out.startswith("rc=1") and "is not a gpu model config" in out


def test_stage_then_commit_numbers_after_every_taken_version(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    b1, _ = bundles
    repo, work = tmp_path / "repository", tmp_path / "work"
    (repo / "ranker" / "5").mkdir(parents=True)  # a number Triton may have seen is never reused
    env = {"MODEL": "ranker", "FLAVOUR": "gpu", "WORK": str(work), "REPOSITORY": str(repo)}
    _run("publish.sh", "stage", env={**env, "BUNDLE_DIR": str(b1)})
    assert (work / "VERSION").read_text().strip() == "6"
    staged = work / "repository" / "ranker" / "6"
    assert list_versions(repo) == []  # nothing visible before the engine exists
    out = _run("commit-version.sh", env=dict(env), check=False)
    assert out.startswith("rc=1") and "no model.plan" in out
    (staged / "model.plan").write_bytes(b"engine")  # what build-engines.sh adds
    (repo / "ranker" / "6").mkdir()  # another publisher took 6 meanwhile
    _run("commit-version.sh", env=dict(env))
    assert list_versions(repo) == [7]
    assert (repo / "ranker" / "7" / "model.plan").read_bytes() == b"engine"
    assert (repo / "ranker" / "config.pbtxt").read_text() == config_template("gpu")
    assert not list((repo / "ranker").glob(".staging-*"))


def test_object_store_publish_and_sync(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    b1, b2 = bundles
    remote = tmp_path / "remote"
    shutil.copytree(b1, remote / "recsvc" / "bundles" / "b1")
    shutil.copytree(b2, remote / "recsvc" / "bundles" / "b2")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rclone").write_text(FAKE_RCLONE)
    (bin_dir / "rclone").chmod(0o755)
    base = {"REMOTE": "store:recsvc", "MODEL": "ranker", "FAKE_REMOTE_ROOT": str(remote), "EXTRA_PATH": str(bin_dir)}

    def publish(bundle: str) -> str:
        work = tmp_path / f"work-{bundle}"
        shutil.rmtree(work, ignore_errors=True)
        env = {**base, "WORK": str(work), "BUNDLE": bundle}
        _run("object-store.sh", "fetch", env=dict(env))
        out = _run("publish.sh", "stage", env={**env, "FLAVOUR": "cpu", "BUNDLE_DIR": str(work / "bundle")})
        return out + _run("object-store.sh", "upload", env=dict(env))

    publish("b1")
    assert "already the newest" in publish("b1")  # idempotent against the bucket too
    publish("b2")
    stored = remote / "recsvc" / "repository" / "ranker"
    assert sorted(p.name for p in stored.iterdir()) == [
        "1.manifest.json", "1.tar", "2.manifest.json", "2.tar", "config.pbtxt",
    ]  # fmt: skip
    # A pod's copy: versions appear whole, with the config, and the pod's copy serves as a repository.
    local = tmp_path / "pod" / "repository"
    _run("object-store.sh", "once", env={**base, "REPOSITORY": str(local)})
    assert list_versions(local) == [1, 2]
    assert (local / "ranker" / "config.pbtxt").read_text() == config_template("cpu")
    assert (local / "ranker" / "2" / "bundle" / "manifest.json").read_bytes() == (b2 / "manifest.json").read_bytes()
    assert not list((local / "ranker").glob(".sync-*"))


def test_build_engines_uses_the_bundle_shapes(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    b1, _ = bundles
    repo = tmp_path / "repository"
    for n in (1, 2, 3):
        version = repo / "ranker" / str(n)
        shutil.copytree(b1, version / "bundle")
        shutil.copyfile(b1 / "ranker.onnx", version / "model.onnx")
    builder = "nvcr.io/nvidia/tensorrt:24.10-py3"
    (repo / "ranker" / "3" / "model.plan").write_text("already built")
    (repo / "ranker" / "3" / "model.plan.builder").write_text(builder + "\n")
    # Built by an older TensorRT: Triton 24.10 could not deserialise it.
    (repo / "ranker" / "2" / "model.plan").write_text("old engine")
    (repo / "ranker" / "2" / "model.plan.builder").write_text("nvcr.io/nvidia/tensorrt:24.01-py3\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text(FAKE_TRTEXEC)
    (bin_dir / "trtexec").chmod(0o755)
    env = {"REPOSITORY": str(repo), "MODEL": "ranker", "LATEST": "2", "MAX_BATCH": "64", "OPT_BATCH": "16",
           "FP16": "1", "BUILDER": builder, "EXTRA_PATH": str(bin_dir)}  # fmt: skip
    _run("build-engines.sh", env=env, shell="bash")
    # Only the newest two versions are Triton's to load; version 3 kept its engine, version 2's was rebuilt.
    assert not (repo / "ranker" / "1" / "model.plan").exists()
    assert (repo / "ranker" / "3" / "model.plan").read_text() == "already built"
    assert (repo / "ranker" / "2" / "model.plan.builder").read_text().strip() == builder
    args = (repo / "ranker" / "2" / "model.plan").read_text().split()
    manifest = json.loads((b1 / "manifest.json").read_text())
    length, candidates = manifest["history_len"], manifest["num_candidates"]
    assert f"--minShapes=HISTORY:1x{length},CANDIDATES:1x{candidates}" in args
    assert f"--optShapes=HISTORY:16x{length},CANDIDATES:16x{candidates}" in args
    assert f"--maxShapes=HISTORY:64x{length},CANDIDATES:64x{candidates}" in args
    assert "--fp16" in args and "--skipInference" in args
    assert not list((repo / "ranker" / "2").glob(".model.plan.*"))


def test_wait_for_model_returns_once_a_version_exists(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    from recsvc.repository import publish

    publish(bundles[0], tmp_path / "repository")
    proc = subprocess.run(
        [sys.executable, str(FILES / "wait_for_model.py")],
        env={**os.environ, "RECSVC_MODEL_REPOSITORY": str(tmp_path / "repository")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "found ranker version 1" in proc.stderr
