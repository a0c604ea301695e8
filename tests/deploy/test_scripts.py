"""The chart's scripts (deploy/helm/recsvc/files/), run for real against temporary repositories.

publish.sh, commit-version.sh and rollout.py run the real `recsvc publish`, `recsvc rollout` and
`recsvc rollback` against an in-process Triton stand-in (tests/deploy/fake_triton.py: the gRPC calls the
rollout makes, inference through ONNX Runtime); object-store.sh runs against a stand-in rclone that maps a
remote onto a local directory; build-engines.sh against a stand-in trtexec that records its arguments.
What cannot run here is the real rclone, Triton, TensorRT and a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from recsvc.bundle import read_manifest
from recsvc.repository import config_template, list_versions
from recsvc.repository.publishing import config_for_bundle
from recsvc.repository.rollout import read_serving
from recsvc.repository.tiny_bundle import write_tiny_bundle
from tests.broken_models import broken_bundle
from tests.deploy.fake_triton import serve

FILES = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "recsvc" / "files"
VENV_BIN = str(Path(sys.executable).parent)  # where the `recsvc` console script is

# rclone, as far as the chart's scripts use it: "store:" paths live under $FAKE_REMOTE_ROOT.
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
elif cmd in ("copyto", "cat"):
    src = local(args[0])
    if not src.is_file():
        sys.exit(4)  # rclone: file not found
    if cmd == "cat":
        sys.stdout.write(src.read_text())
    else:
        dst = local(args[1])
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".partial")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)  # like rclone: the object appears whole
elif cmd == "copy":
    shutil.copytree(local(args[0]), local(args[1]), dirs_exist_ok=True)
elif cmd == "deletefile":
    local(args[0]).unlink(missing_ok=True)
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


def _command(script: str, *args: str) -> list[str]:
    if script.endswith(".py"):
        return [sys.executable, str(FILES / script), *args]
    shell = "bash" if (FILES / script).read_text().startswith("#!/bin/bash") else "sh"
    return [shell, str(FILES / script), *args]


def _env(env: dict[str, str]) -> dict[str, str]:
    env = dict(env)
    return {"PATH": f"{env.pop('EXTRA_PATH', '')}:{VENV_BIN}:/usr/bin:/bin", "HOME": env.get("WORK", "/tmp"), **env}


def _run(script: str, *args: str, env: dict[str, str], check: bool = True, timeout: float = 120) -> str:
    proc = subprocess.run(_command(script, *args), env=_env(env), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{script} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr if check else f"rc={proc.returncode}\n{proc.stdout}{proc.stderr}"


def _jobs(model_dir: Path) -> list[list[str]]:
    """.chart-jobs as (key, state, version) rows."""
    path = model_dir / ".chart-jobs"
    return [line.split()[:3] for line in path.read_text().splitlines()] if path.exists() else []


def _serving(repo: Path) -> tuple[int, int | None, tuple[int, ...]]:
    state = read_serving(repo, "ranker")
    assert state is not None
    return state.version, state.previous, state.loaded


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("bundles")
    for seed in (1, 2, 3):
        write_tiny_bundle(root / f"b{seed}", num_items=40, history_len=10, num_candidates=20, seed=seed)
    return root / "b1", root / "b2", root / "b3"


@pytest.fixture
def fake_rclone(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rclone").write_text(FAKE_RCLONE)
    (bin_dir / "rclone").chmod(0o755)
    return bin_dir


def _rollout_env(repo: Path, triton_url: str, work: Path) -> dict[str, str]:
    """What the chart gives the steps that roll out (tests/deploy/test_chart.py checks the rendered Job)."""
    return {"RECSVC_MODEL_REPOSITORY": str(repo), "RECSVC_TRITON_MODEL": "ranker", "RECSVC_TRITON_URL": triton_url,
            "RECSVC_ROLLOUT_DRAIN_S": "0", "RECSVC_ROLLOUT_READY_TIMEOUT_S": "20", "TRITON_WAIT_S": "20",
            "RECSVC_DATA_DIR": str(work / "data"), "WORK": str(work)}  # fmt: skip


def test_scripts_parse() -> None:
    for script in FILES.glob("*.sh"):
        subprocess.run([*_command(script.name)[:1], "-n", str(script)], check=True)
    for script in FILES.glob("*.py"):
        compile(script.read_text(), str(script), "exec")


# ------------------------------------------------------------------------------------- shared volume
def test_publish_direct_rolls_each_bundle_out_once(tmp_path: Path, bundles: tuple[Path, Path, Path]) -> None:
    """cpu target on a volume: `recsvc publish BUNDLE` (rollout included); running again changes nothing."""
    b1, b2, _ = bundles
    repo, work = tmp_path / "repository", tmp_path / "work"
    with serve(repo) as (triton, url):
        env = {**_rollout_env(repo, url, work), "MODEL": "ranker", "FLAVOUR": "cpu", "REPOSITORY": str(repo)}
        out = _run("publish.sh", "direct", env={**env, "BUNDLE_DIR": str(b1)})
        assert "$ recsvc publish" in out and "ranker version 1 is serving" in out
        assert list_versions(repo) == [1] and _serving(repo) == (1, None, (1,))
        assert (repo / "ranker" / "config.pbtxt").read_text() == config_for_bundle("cpu", read_manifest(b1))
        # The same bundle again (helm upgrade re-running the Job): nothing new.
        out = _run("publish.sh", "direct", env={**env, "BUNDLE_DIR": str(b1)})
        assert "already published as version 1 and was rolled out" in out and list_versions(repo) == [1]
        assert (work / "SKIP").exists()
        _run("publish.sh", "direct", env={**env, "BUNDLE_DIR": str(b2)})
        assert list_versions(repo) == [1, 2] and _serving(repo) == (2, 1, (2,))
        assert triton.loaded == {2} and [1, 2] in triton.loads  # loaded beside, then the old one unloaded
        # Running the Job for an older bundle again is no rollback any more (rollback requests are).
        out = _run("publish.sh", "direct", env={**env, "BUNDLE_DIR": str(b1)})
        assert "already published as version 1 and was rolled out" in out and _serving(repo)[0] == 2
        # Bootstrap training happens only while nothing is published.
        out = _run("publish.sh", "direct", env={**env, "TRAIN_IF_EMPTY": "1"})
        assert "not training" in out and list_versions(repo) == [1, 2]
        # A repository set up for the other Triton target is refused before anything is written.
        out = _run("publish.sh", "direct", env={**env, "FLAVOUR": "gpu", "BUNDLE_DIR": str(b2)}, check=False)
        assert out.startswith("rc=1") and "is not a gpu model config" in out
    assert _jobs(repo / "ranker") == [["publish-1", "done", "1"], ["publish-2", "done", "2"]]


def test_a_rollout_that_never_happened_is_finished_and_a_refusal_is_final(
    tmp_path: Path, bundles: tuple[Path, Path, Path]
) -> None:
    b1, b2, b3 = bundles
    repo, work = tmp_path / "repository", tmp_path / "work"

    def publish_only(bundle: Path) -> None:  # the plain CLI, or a Job that lost Triton after publishing
        subprocess.run([f"{VENV_BIN}/recsvc", "publish", "--no-rollout", "--model-repository", str(repo),
                        str(bundle)], check=True, capture_output=True)  # fmt: skip

    publish_only(b1)
    publish_only(b3)
    with serve(repo) as (_, url):
        env = {**_rollout_env(repo, url, work), "MODEL": "ranker", "FLAVOUR": "cpu", "REPOSITORY": str(repo)}
        # An older version is never rolled out as a side effect of a publish Job.
        out = _run("publish.sh", "direct", env={**env, "BUNDLE_DIR": str(b1)})
        assert "already published as version 1 (the newest is 2)" in out and "rollback.toVersion=1" in out
        assert read_serving(repo, "ranker") is None
        # Nothing was ever rolled out: the bootstrap Job of a first install finishes the job.
        out = _run("publish.sh", "direct", env={**env, "TRAIN_IF_EMPTY": "1"})
        assert "nothing was ever rolled out: rolling it out" in out and "$ recsvc rollout 2" in out
        assert list_versions(repo) == [1, 2] and _serving(repo) == (2, 1, (2,))
        # A broken model: refused, recorded, and the Job fails again (saying why) whenever it runs again.
        broken = broken_bundle(b2, tmp_path / "broken")
        out = _run("publish.sh", "direct", env={**env, "BUNDLE_DIR": str(broken)}, check=False)
        assert out.startswith("rc=1") and "version 3 was refused; version 2 keeps serving" in out, out
        state = read_serving(repo, "ranker")
        assert state is not None and state.version == 2 and state.refused == (3,)
        out = _run("publish.sh", "direct", env={**env, "BUNDLE_DIR": str(broken)}, check=False)
        assert out.startswith("rc=1") and "whose rollout was refused" in out and list_versions(repo) == [1, 2, 3]
    # Triton unreachable: nothing is recorded, the step fails, and a retry rolls the version out.
    publish_only(b2)
    dead = {**_rollout_env(repo, "127.0.0.1:9", work), "TRITON_WAIT_S": "1"}
    out = _run("rollout.py", "rollout", "4", env=dead, check=False)
    assert out.startswith("rc=1") and "did not answer within 1 s" in out
    with serve(repo) as (_, url):
        _run("rollout.py", "rollout", "4", env=_rollout_env(repo, url, work))
        assert _serving(repo) == (4, 2, (4,))
    assert _jobs(repo / "ranker") == [["publish-2", "done", "2"], ["publish-3", "refused", "3"],
                                      ["publish-4", "done", "4"]]  # fmt: skip


def test_rollback_requests_run_once(tmp_path: Path, bundles: tuple[Path, Path, Path]) -> None:
    """`recsvc rollback --to V`, V resolved once per request: re-running a request never rolls back twice."""
    b1, b2, b3 = bundles
    repo, work = tmp_path / "repository", tmp_path / "work"
    with serve(repo) as (_, url):
        env = {**_rollout_env(repo, url, work), "MODEL": "ranker", "FLAVOUR": "cpu", "REPOSITORY": str(repo)}
        for bundle in (b1, b2):
            _run("publish.sh", "direct", env={**env, "BUNDLE_DIR": str(bundle)})
        assert _serving(repo) == (2, 1, (2,))
        request = {**_rollout_env(repo, url, work), "ROLLBACK_REQUEST": "r1", "ROLLBACK_TO": "0"}
        out = _run("rollout.py", "rollback", env=request)
        assert "$ recsvc rollback --to 1" in out and _serving(repo) == (1, 2, (1,))
        # The same request again (a retry, helm upgrade --reuse-values): nothing, even after a new publish.
        assert "was carried out (version 1)" in _run("rollout.py", "rollback", env=request)
        _run("publish.sh", "direct", env={**env, "BUNDLE_DIR": str(b3)})
        _run("rollout.py", "rollback", env=request)
        assert _serving(repo) == (3, 1, (3,))
        # A new request to a given version.
        _run("rollout.py", "rollback", env={**request, "ROLLBACK_REQUEST": "r2", "ROLLBACK_TO": "2"})
        assert _serving(repo) == (2, 3, (2,))
        # A request an earlier attempt started goes to the version it chose then, not to today's previous.
        with open(repo / "ranker" / ".chart-jobs", "a") as fh:
            fh.write("rollback-r3 started 1 2026-01-01T00:00:00+00:00\n")
        _run("rollout.py", "rollback", env={**request, "ROLLBACK_REQUEST": "r3"})
        assert _serving(repo) == (1, 2, (1,))
        out = _run("rollout.py", "rollback", env={**request, "ROLLBACK_REQUEST": "r4", "ROLLBACK_TO": "9"},
                   check=False)  # fmt: skip
        assert out.startswith("rc=1") and "version 9 is not in the repository" in out
    assert _jobs(repo / "ranker")[2:] == [
        ["rollback-r1", "started", "1"], ["rollback-r1", "done", "1"], ["publish-3", "done", "3"],
        ["rollback-r2", "started", "2"], ["rollback-r2", "done", "2"], ["rollback-r3", "started", "1"],
        ["rollback-r3", "done", "1"],
    ]  # fmt: skip


def test_stage_commit_then_rollout(tmp_path: Path, bundles: tuple[Path, Path, Path]) -> None:
    """gpu target: `recsvc publish --no-rollout` into a scratch repository, engine, commit, `recsvc rollout N`."""
    b1, _, _ = bundles
    repo, work = tmp_path / "repository", tmp_path / "work"
    (repo / "ranker" / "5").mkdir(parents=True)  # a number Triton may have seen is never reused
    env = {"MODEL": "ranker", "FLAVOUR": "gpu", "WORK": str(work), "REPOSITORY": str(repo)}
    out = _run("publish.sh", "stage", env={**env, "BUNDLE_DIR": str(b1)})
    assert (work / "VERSION").read_text().strip() == "6"
    staged = work / "repository" / "ranker" / "6"
    assert list_versions(repo) == []  # nothing visible before the engine exists
    out = _run("commit-version.sh", env=dict(env), check=False)
    assert out.startswith("rc=1") and "no model.plan" in out
    (staged / "model.plan").write_bytes(b"engine")  # what build-engines.sh adds
    (repo / "ranker" / "6").mkdir()  # another publisher took 6 meanwhile
    _run("commit-version.sh", env=dict(env))
    assert list_versions(repo) == [7] and (work / "VERSION").read_text().strip() == "7"
    assert (repo / "ranker" / "7" / "model.plan").read_bytes() == b"engine"
    assert (repo / "ranker" / "config.pbtxt").read_text() == config_for_bundle("gpu", read_manifest(b1))
    assert not list((repo / "ranker").glob(".staging-*"))
    assert read_serving(repo, "ranker") is None  # committed is not serving
    with serve(repo) as (triton, url):
        out = _run("rollout.py", "rollout", env=_rollout_env(repo, url, work))
        assert "$ recsvc rollout 7" in out and _serving(repo) == (7, None, (7,)) and triton.loaded == {7}
        # The Job again: the stage step finds the bundle rolled out, and the rollout step has nothing to do.
        out = _run("publish.sh", "stage", env={**env, "BUNDLE_DIR": str(b1)})
        assert "already published as version 7 and was rolled out" in out and (work / "SKIP").exists()
        _run("commit-version.sh", env=dict(env))
        assert "nothing was published" in _run("rollout.py", "rollout", env=_rollout_env(repo, url, work))


# ------------------------------------------------------------------------------------ object storage
class Bucket:
    """The stand-in remote, the env the chart gives rclone steps, and the steps of the Jobs."""

    def __init__(self, tmp: Path, bin_dir: Path) -> None:
        self.root = tmp / "remote"
        self.model_dir = self.root / "recsvc" / "repository" / "ranker"
        self.tmp = tmp
        self.base = {"REMOTE": "store:recsvc", "MODEL": "ranker", "FAKE_REMOTE_ROOT": str(self.root),
                     "EXTRA_PATH": str(bin_dir), "KEEP_VERSIONS": "3"}  # fmt: skip

    def add_bundle(self, bundle: Path) -> None:
        shutil.copytree(bundle, self.root / "recsvc" / "bundles" / bundle.name, dirs_exist_ok=True)

    def job_env(self, work: Path, url: str) -> dict[str, str]:
        # The rollout step's env: the scratch repository, the copied rclone, the bucket.
        return {**self.base, **_rollout_env(work / "repository", url, work), "RCLONE": str(work / "bin" / "rclone"),
                "ACK_MAX_AGE_S": "5"}  # fmt: skip

    def publish(self, bundle: str, url: str, *, rollout: bool = True) -> str:
        work = self.tmp / f"work-{bundle}-{time.monotonic_ns()}"
        env = {**self.base, "WORK": str(work), "BUNDLE": bundle}
        out = _run("object-store.sh", "fetch", env=dict(env))
        out += _run("publish.sh", "stage", env={**env, "FLAVOUR": "cpu", "BUNDLE_DIR": str(work / "bundle")})
        out += _run("object-store.sh", "upload", env=dict(env))
        return out + (_run("rollout.py", "rollout", env=self.job_env(work, url)) if rollout else "")

    def rollback(self, request: str, to: int, url: str) -> str:
        work = self.tmp / f"work-{request}-{time.monotonic_ns()}"
        out = _run("object-store.sh", "fetch", env={**self.base, "WORK": str(work)})
        return out + _run("rollout.py", "rollback", env={**self.job_env(work, url), "ROLLBACK_REQUEST": request,
                                                         "ROLLBACK_TO": str(to)})  # fmt: skip


@contextmanager
def pod_sync(bucket: Bucket, copy: Path, *, ack: str | None = None, keep: int = 3) -> Iterator[subprocess.Popen[str]]:
    """A pod's sync sidecar (object-store.sh loop) keeping ``copy`` current; with ``ack``, a Triton pod's."""
    env = {**bucket.base, "KEEP_VERSIONS": str(keep), "REPOSITORY": str(copy), "POLL_SECONDS": "1",
           "SERVING_POLL_SECONDS": "0.2", "ACK_SECONDS": "1", "TMPDIR": str(copy.parent)}  # fmt: skip
    if ack:
        env["ACK_NAME"] = ack
    copy.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(_command("object-store.sh", "loop"), env=_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _until(predicate: Callable[[], bool], what: str, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_object_store_publish_rollout_and_rollback(tmp_path: Path, bundles: tuple[Path, Path, Path],
                                                   fake_rclone: Path) -> None:  # fmt: skip
    """Publish and roll back with the repository in a bucket: every pod follows serving.json."""
    b1, b2, _ = bundles
    bucket = Bucket(tmp_path, fake_rclone)
    for bundle in (b1, b2):
        bucket.add_bundle(bundle)
    triton_copy, server_copy = tmp_path / "triton-pod" / "repository", tmp_path / "server-pod" / "repository"
    with serve(triton_copy) as (triton, url), pod_sync(bucket, triton_copy, ack="triton-0"):
        out = bucket.publish("b1", url)
        # The rollout waited for the Triton pod's copy, then loaded the version there.
        assert "every Triton pod holds version 1: triton-0" in out and "ranker version 1 is serving" in out, out
        assert triton.loaded == {1}
        assert "already published as version 1 and was rolled out" in bucket.publish("b1", url)  # idempotent
        # A Job that uploaded version 2 and lost its rollout step: running it again rolls 2 out, downloading
        # it into the scratch copy for the canary.
        bucket.publish("b2", url, rollout=False)
        out = bucket.publish("b2", url)
        assert "never rolled out by this chart: rolling it out" in out and "downloading version 2" in out
        assert _serving(bucket.model_dir.parent) == (2, 1, (2,)) and triton.loaded == {2}
        # The Triton pod's copy follows serving.json (what its triton-sync reads), versions first.
        _until(lambda: (triton_copy / "ranker" / "serving.json").exists()
               and _serving(triton_copy) == (2, 1, (2,)), "the Triton pod's serving.json")  # fmt: skip
        # A recsvc pod starting now: its init container copies the versions, then serving.json.
        _run("object-store.sh", "once", env={**bucket.base, "REPOSITORY": str(server_copy)})
        assert list_versions(server_copy) == [1, 2] and _serving(server_copy) == (2, 1, (2,))
        assert (server_copy / "ranker" / "config.pbtxt").read_text() == config_for_bundle("cpu", read_manifest(b1))
        assert not list((server_copy / "ranker").glob(".sync-*"))
        # A rollback request: the Job downloads the previous version, recsvc rolls back, the pods follow.
        out = bucket.rollback("r1", 0, url)
        assert "$ recsvc rollback --to 1" in out and triton.loaded == {1}
        assert _serving(bucket.model_dir.parent) == (1, 2, (1,))
        _until(lambda: _serving(triton_copy) == (1, 2, (1,)), "the Triton pod following the rollback")
        assert "was carried out" in bucket.rollback("r1", 0, url)
        beat = (bucket.model_dir / ".pods" / "triton-0").read_text().split()
        assert int(beat[0]) > time.time() - 10 and beat[1:] == ["1", "2"]
    # A pod that stops takes its heartbeat with it, so no Job waits for it.
    assert not (bucket.model_dir / ".pods" / "triton-0").exists()
    stored = sorted(p.name for p in bucket.model_dir.iterdir() if p.is_file())
    assert stored == [".chart-jobs", "1.manifest.json", "1.tar", "2.manifest.json", "2.tar", "config.pbtxt",
                      "serving.json"]  # fmt: skip
    assert _jobs(bucket.model_dir) == [["publish-1", "done", "1"], ["publish-2", "done", "2"],
                                       ["rollback-r1", "started", "1"], ["rollback-r1", "done", "1"]]  # fmt: skip


def test_rollout_waits_for_every_triton_pod_copy(tmp_path: Path, bundles: tuple[Path, Path, Path],
                                                 fake_rclone: Path) -> None:  # fmt: skip
    """A version is rolled out only once every live Triton pod holds it; silent pods do not count."""
    bucket = Bucket(tmp_path, fake_rclone)
    bucket.add_bundle(bundles[0])
    work = tmp_path / "work"
    env = {**bucket.base, "WORK": str(work), "BUNDLE": "b1"}
    _run("object-store.sh", "fetch", env=dict(env))
    _run("publish.sh", "stage", env={**env, "FLAVOUR": "cpu", "BUNDLE_DIR": str(work / "bundle")})
    _run("object-store.sh", "upload", env=dict(env))
    pods = bucket.model_dir / ".pods"
    pods.mkdir()
    (pods / "gone").write_text(f"{int(time.time()) - 600} \n")  # a pod that died long ago: ignored
    (pods / "triton-1").write_text(f"{int(time.time())} \n")  # alive, still downloading
    job = {**bucket.job_env(work, "127.0.0.1:9"), "TRITON_WAIT_S": "2"}
    out = _run("rollout.py", "rollout", env=job, check=False)
    assert out.startswith("rc=1") and "did not copy version 1 within 2 s (waiting for triton-1)" in out, out
    assert not (bucket.model_dir / ".chart-jobs").exists()  # nothing happened: a retry tries again
    # A version the pods do not keep is refused at once, with what to change.
    (work / "remote" / "versions").write_text("1\n2\n3\n4\n5\n")
    out = _run("rollout.py", "rollout", "1", env=job, check=False)
    assert out.startswith("rc=1") and "raise modelRepository.objectStorage.keepVersions" in out


def test_pod_copies_keep_what_serving_json_names(tmp_path: Path, bundles: tuple[Path, Path, Path],
                                                 fake_rclone: Path) -> None:  # fmt: skip
    """The newest keepVersions plus serving.json's versions; serving.json only once its versions are there."""
    bucket = Bucket(tmp_path, fake_rclone)
    bucket.model_dir.mkdir(parents=True)
    version = tmp_path / "v" / "0"
    shutil.copytree(bundles[0], version / "bundle")
    shutil.copyfile(bundles[0] / "ranker.onnx", version / "model.onnx")
    for n in range(1, 6):
        version = version.rename(version.parent / str(n))
        subprocess.run(["tar", "-C", str(version.parent), "-cf", str(bucket.model_dir / f"{n}.tar"), str(n)],
                       check=True)  # fmt: skip
    (bucket.model_dir / "config.pbtxt").write_text(config_template("cpu"))
    # Compact JSON, as another writer might produce it: a rollback to 1 with 5 still loaded.
    (bucket.model_dir / "serving.json").write_text(
        json.dumps({"version": 1, "loaded": [1, 5], "previous": 5, "refused": [4], "updated_at": "2026-12-01T10:20:30"})
    )
    copy = tmp_path / "pod" / "repository"
    env = {**bucket.base, "REPOSITORY": str(copy), "KEEP_VERSIONS": "2"}
    _run("object-store.sh", "once", env=dict(env))
    assert list_versions(copy) == [1, 4, 5] and _serving(copy) == (1, 5, (1, 5))
    # Nothing re-downloaded and nothing removed when nothing changed.
    assert "copied" not in _run("object-store.sh", "once", env=dict(env))
    # The rollout moves on; versions no one needs are dropped, and a serving.json naming a version the
    # bucket lacks is not installed (recsvc would find no such version).
    (bucket.model_dir / "serving.json").write_text(json.dumps({"version": 5, "loaded": [5], "previous": 1}, indent=2))
    with pod_sync(bucket, copy, keep=2) as proc:
        _until(lambda: _serving(copy) == (5, 1, (5,)), "serving.json")
        _until(lambda: list_versions(copy) == [1, 4, 5], "the copy")
        (bucket.model_dir / "serving.json").write_text(json.dumps({"version": 9, "loaded": [5, 9], "previous": 5}))
        time.sleep(1.5)
        assert _serving(copy) == (5, 1, (5,))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "serving.json names version 9, which is not copied yet" in out


def test_build_engines_uses_the_bundle_shapes(tmp_path: Path, bundles: tuple[Path, Path, Path]) -> None:
    b1, _, _ = bundles
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
    _run("build-engines.sh", env=env)
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


def test_wait_for_model_returns_once_a_version_exists(tmp_path: Path, bundles: tuple[Path, Path, Path]) -> None:
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
