"""Roll a version out with recsvc, as the last step of the chart's publish and rollback Jobs.

    rollout.py publish BUNDLE   `recsvc publish BUNDLE`: the next version, rolled out at once (cpu, volume)
    rollout.py rollout [N]      `recsvc rollout N`; N: the argument, else $WORK/ROLLOUT, else the version the
                                steps before published ($WORK/VERSION; nothing when they wrote $WORK/SKIP)
    rollout.py rollback         `recsvc rollback --to V`; V: $ROLLBACK_TO, else the previous serving version

recsvc does the rollout itself (recsvc/repository/rollout.py: load beside the serving version, ready,
canary, switch, drain, unload; a refused version never serves). Around it this adds what a Job needs:

* It waits up to TRITON_WAIT_S for Triton to answer at RECSVC_TRITON_URL (the chart's admin Service, which
  reaches Triton pods before they are Ready): on a first install Triton starts beside the Job.
* It records each outcome in <repository>/<model>/.chart-jobs, one line per event
  ("publish-7 done 7 <time>", "rollback-<request> started 5 <time>"). A Job that runs again (a retry, or a
  new Job after an unrelated `helm upgrade`) reads it: a version the publish Job rolled out (or saw refused)
  is not rolled out again, and a rollback request is carried out once, to the version it first resolved,
  so re-running never repeats a rollout nor undoes a later one.
* With the repository in object storage (REMOTE and RCLONE set) it works on the scratch copy the fetch step
  made (RECSVC_MODEL_REPOSITORY=/work/repository: every version as a stub), into which it downloads the
  version it rolls out (the canary runs on it). Before rolling out it waits until every live Triton pod's
  copy holds the version (their heartbeats under .pods/, newer than ACK_MAX_AGE_S), since the rollout loads
  it on one of them at once. While recsvc runs it uploads serving.json whenever recsvc rewrites it, so every
  pod follows the rollout step by step, and it uploads .chart-jobs.

Exit status: 0 when the version serves (or there was nothing to do); 1 when it was refused (recorded, so
running the Job again fails again, saying so) or could not be rolled out (not recorded: a retry tries again).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from recsvc.repository import list_versions
from recsvc.repository.rollout import ServingState, read_serving

log = logging.getLogger("rollout")

JOBS_FILE = ".chart-jobs"


class Remote:
    """The bucket, through the rclone binary the fetch step copied (object storage only)."""

    def __init__(self, rclone: str, remote: str, model: str, work: Path) -> None:
        self.rclone = rclone
        self.base = f"{remote}/repository/{model}"
        self.work = work

    def put(self, local: Path, name: str) -> bool:
        """Upload a snapshot of ``local`` as ``name`` (a file recsvc may replace meanwhile is copied first)."""
        snapshot = self.work / f".upload-{name.lstrip('.')}"
        shutil.copyfile(local, snapshot)
        proc = subprocess.run([self.rclone, "copyto", str(snapshot), f"{self.base}/{name}"], check=False)
        if proc.returncode != 0:
            log.warning("could not upload %s (rclone exited %d); retrying", name, proc.returncode)
        return proc.returncode == 0

    def download(self, version: int, model_dir: Path) -> None:
        """Replace the stub of ``version`` in ``model_dir`` with the whole version (one tar object)."""
        archive = self.work / f"{version}.tar"
        subprocess.run([self.rclone, "copyto", f"{self.base}/{version}.tar", str(archive)], check=True)
        unpacked = model_dir / f".sync-{version}"
        shutil.rmtree(unpacked, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        archive.unlink()
        if not (unpacked / str(version) / "bundle" / "manifest.json").is_file():
            raise RuntimeError(f"{version}.tar does not hold a complete version {version}")
        shutil.rmtree(model_dir / str(version), ignore_errors=True)
        (unpacked / str(version)).rename(model_dir / str(version))
        shutil.rmtree(unpacked)

    def heartbeats(self) -> dict[str, tuple[float, set[int]]]:
        """Triton pod -> (time of its heartbeat, versions its copy holds)."""
        listing = subprocess.run([self.rclone, "lsf", "--files-only", f"{self.base}/.pods/"],
                                 capture_output=True, text=True, check=False)  # fmt: skip
        if listing.returncode == 3:  # no heartbeat yet
            return {}
        listing.check_returncode()
        beats = {}
        for name in listing.stdout.split():
            got = subprocess.run([self.rclone, "cat", f"{self.base}/.pods/{name}"],
                                 capture_output=True, text=True, check=False)  # fmt: skip
            fields = got.stdout.split()
            if got.returncode == 0 and fields and fields[0].isdigit():
                beats[name] = (float(fields[0]), {int(v) for v in fields[1:] if v.isdigit()})
        return beats


class Job:
    """One run of a Job step; settings come from the environment the chart sets."""

    def __init__(self) -> None:
        self.repository = Path(os.environ["RECSVC_MODEL_REPOSITORY"])
        self.model = os.environ.get("RECSVC_TRITON_MODEL", "ranker")
        self.work = Path(os.environ.get("WORK", "/work"))
        self.triton_url = os.environ.get("RECSVC_TRITON_URL", "127.0.0.1:8001")
        self.wait_s = float(os.environ.get("TRITON_WAIT_S", "600"))
        rclone, remote = os.environ.get("RCLONE"), os.environ.get("REMOTE")
        self.remote = Remote(rclone, remote, self.model, self.work) if rclone and remote else None
        self.model_dir = self.repository / self.model

    # ------------------------------------------------------------------------------------ the record
    def recorded(self, key: str) -> tuple[str, int] | None:
        """The last (state, version) recorded for ``key``."""
        last = None
        try:
            lines = (self.model_dir / JOBS_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return None
        for line in lines:
            fields = line.split()
            if len(fields) >= 3 and fields[0] == key and fields[2].isdigit():
                last = (fields[1], int(fields[2]))
        return last

    def record(self, key: str, state: str, version: int) -> None:
        """Append an event (atomically: write, fsync, rename) and upload the record to the bucket."""
        path = self.model_dir / JOBS_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        tmp = self.model_dir / f"{JOBS_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(f"{text}{key} {state} {version} {stamp}\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
        if self.remote is not None:
            for _ in range(5):
                if self.remote.put(path, JOBS_FILE):
                    break
                time.sleep(2)

    def serving(self) -> ServingState | None:
        """serving.json, as recsvc reads it."""
        return read_serving(self.repository, self.model)

    # ----------------------------------------------------------------------------------- waiting
    def wait_for_triton(self) -> bool:
        """Whether Triton answered within TRITON_WAIT_S."""
        from tritonclient.grpc import InferenceServerClient

        from recsvc.config import load_settings
        from recsvc.ranking.triton_channel import TritonChannel

        # TLS to Triton as recsvc itself dials it (RECSVC_TRITON_TLS*, the chart's triton.tls).
        tls = TritonChannel.from_settings(load_settings()).tls
        deadline, last = time.monotonic() + self.wait_s, "no answer"
        announced = False
        while True:
            client = InferenceServerClient(self.triton_url, **(tls.client_args() if tls is not None else {}))
            try:
                if client.is_server_ready(client_timeout=5):
                    return True
                last = "not ready"
            except Exception as exc:  # noqa: BLE001  (tritonclient raises its own and gRPC's errors)
                last = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            finally:
                client.close()
            if time.monotonic() >= deadline:
                log.error("Triton at %s did not answer within %.0f s (%s)", self.triton_url, self.wait_s, last)
                return False
            if not announced:
                log.info("waiting for Triton at %s (%s)", self.triton_url, last)
                announced = True
            time.sleep(2)

    def wait_for_pods(self, version: int) -> bool:
        """Object storage: whether every live Triton pod's copy holds ``version`` within TRITON_WAIT_S."""
        assert self.remote is not None
        keep = int(os.environ.get("KEEP_VERSIONS", "3"))
        max_age = float(os.environ.get("ACK_MAX_AGE_S", "35"))
        remote_versions = sorted(int(v) for v in (self.work / "remote" / "versions").read_text().split())
        state = self.serving()
        named = {state.version, state.previous, *state.loaded} if state else set()
        if version not in set(remote_versions[-keep:]) | named:
            log.error("the pods' copies hold only the newest %d versions and those serving.json names, not "
                      "version %d: raise modelRepository.objectStorage.keepVersions", keep, version)  # fmt: skip
            return False
        deadline, announced = time.monotonic() + self.wait_s, ""
        while True:
            now = time.time()
            live = {pod: versions for pod, (at, versions) in self.remote.heartbeats().items() if now - at <= max_age}
            lacking = sorted(pod for pod, versions in live.items() if version not in versions)
            if live and not lacking:
                log.info("every Triton pod holds version %d: %s", version, " ".join(sorted(live)))
                return True
            why = f"waiting for {' '.join(lacking)}" if lacking else "no Triton pod has reported yet"
            if time.monotonic() >= deadline:
                log.error("Triton pods did not copy version %d within %.0f s (%s)", version, self.wait_s, why)
                return False
            if why != announced:
                log.info("version %d: %s", version, why)
                announced = why
            time.sleep(3)

    # ---------------------------------------------------------------------------------- recsvc
    def run_recsvc(self, *args: str) -> int:
        """Run ``recsvc ARGS``; with a bucket, upload serving.json each time recsvc rewrites it."""
        log.info("$ recsvc %s", " ".join(args))
        proc = subprocess.Popen(["recsvc", *args])
        if self.remote is None:
            return proc.wait()
        serving = self.model_dir / "serving.json"
        uploaded = serving.read_bytes() if serving.exists() else b""

        def push() -> None:
            nonlocal uploaded
            try:
                data = serving.read_bytes()
            except FileNotFoundError:
                return
            if data != uploaded and self.remote is not None and self.remote.put(serving, "serving.json"):
                uploaded = data

        while proc.poll() is None:
            push()
            time.sleep(0.5)
        push()
        return proc.returncode

    def roll(self, key: str, version: int, *args: str) -> int:
        """Wait for the pods and Triton, run recsvc, then record and report the outcome."""
        if self.remote is not None:
            if not self.wait_for_pods(version):
                return 1
            if not (self.model_dir / str(version) / "model.onnx").is_file():
                log.info("downloading version %d (the canary runs on it)", version)
                self.remote.download(version, self.model_dir)
        if not self.wait_for_triton():
            return 1
        state = self.serving()
        refused_before = state.refused.count(version) if state else 0
        return self.conclude(key, version, self.run_recsvc(*args), refused_before)

    def conclude(self, key: str, version: int, rc: int, refused_before: int = 0) -> int:
        """Record ``done`` or ``refused`` for ``key`` from serving.json; the exit status of the step."""
        state = self.serving()
        if state is not None and state.version == version:
            self.record(key, "done", version)
            if rc:
                log.warning("recsvc exited %d after the switch; the previous version may still be loaded", rc)
            log.info("%s version %d is serving (previous: %s)", self.model, version, state.previous)
            return 0
        if state is not None and state.refused.count(version) > refused_before:
            self.record(key, "refused", version)
            log.error("version %d was refused; version %d keeps serving", version, state.version)
            return 1
        current = state.version if state else "the newest published version"
        log.error("version %d was not rolled out (recsvc exited %d); %s keeps serving; a retry of this Job "
                  "tries again", version, rc, current)  # fmt: skip
        return rc or 1

    # -------------------------------------------------------------------------------- commands
    def publish(self, bundle: Path) -> int:
        """`recsvc publish BUNDLE` (publish, then roll out)."""
        if not self.wait_for_triton():
            return 1  # nothing written: a retry publishes
        rc = self.run_recsvc("publish", str(bundle))
        manifest = (bundle / "manifest.json").read_bytes()
        same = [v for v in list_versions(self.repository, self.model)
                if (self.model_dir / str(v) / "bundle" / "manifest.json").read_bytes() == manifest]  # fmt: skip
        if not same:
            log.error("recsvc publish %s published nothing (exit %d)", bundle, rc)
            return rc or 1
        return self.conclude(f"publish-{same[-1]}", same[-1], rc)

    def rollout(self, version: int | None) -> int:
        """`recsvc rollout N` for the version the publish steps before published."""
        if version is None:
            if (self.work / "ROLLOUT").is_file():
                version = int((self.work / "ROLLOUT").read_text())
            elif (self.work / "SKIP").exists():
                log.info("nothing was published; nothing to roll out")
                return 0
            else:
                version = int((self.work / "VERSION").read_text())
        key = f"publish-{version}"
        match self.recorded(key):
            case ("done", _):
                log.info("version %d was rolled out before; nothing to do", version)
                return 0
            case ("refused", _):
                log.error("version %d was refused before; not rolling it out again", version)
                return 1
        return self.roll(key, version, "rollout", str(version))

    def rollback(self) -> int:
        """`recsvc rollback --to V`, once per ROLLBACK_REQUEST."""
        request = os.environ["ROLLBACK_REQUEST"]
        key = f"rollback-{request}"
        match self.recorded(key):
            case ("done", version):
                log.info("rollback request %s was carried out (version %d); nothing to do", request, version)
                return 0
            case ("refused", version):
                log.error("rollback request %s: version %d was refused; make a new request", request, version)
                return 1
            case ("started", version):
                log.info("rollback request %s: resuming, to version %d", request, version)
                target = version
            case _:
                state = self.serving()
                to = int(os.environ.get("ROLLBACK_TO") or 0)
                if to:
                    target = to
                elif state is not None and state.previous is not None:
                    target = state.previous
                else:
                    log.error("nothing to roll back to: %s names no previous version; set rollback.toVersion",
                              self.model_dir / "serving.json")  # fmt: skip
                    return 1
                if target not in list_versions(self.repository, self.model):
                    log.error("version %d is not in the repository %s", target, self.model_dir)
                    return 1
                log.info("rollback request %s: to version %d (serving now: %s)", request, target,
                         state.version if state else "the newest")  # fmt: skip
                self.record(key, "started", target)
        return self.roll(key, target, "rollback", "--to", str(target))


def main(argv: list[str]) -> int:
    """Entry point: rollout.py publish BUNDLE | rollout [N] | rollback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rollout.py %(levelname)s %(message)s")
    job = Job()
    match argv:
        case ["publish", bundle]:
            return job.publish(Path(bundle))
        case ["rollout"]:
            return job.rollout(None)
        case ["rollout", version]:
            return job.rollout(int(version))
        case ["rollback"]:
            return job.rollback()
    log.error("usage: rollout.py publish BUNDLE | rollout [N] | rollback")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
