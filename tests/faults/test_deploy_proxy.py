"""Row "SIGTERM under load", as the Helm chart's server pods do it: recsvc behind its shedding proxy.

Each "pod" is what the chart renders for a server pod, run as real processes: HAProxy with the rendered
sidecar's command, config and environment (the listen address moved to a free local port), and
`recsvc serve` on the upstream port with the rendered drain delay relation (the proxy's + 1 s). Clients
balance per request over the two pods' proxies (round_robin, as through the headless Service) and retry
nothing (gRPC's transparent retry of unsent calls aside): stricter than the README's retry policy, which
would hide a cut call. A pod is terminated the way the kubelet does it: the proxy's preStop hook
(files/proxy-drain.sh) and SIGTERM to recsvc at the same moment, SIGTERM to HAProxy when the hook has
returned. Then it is started again, and the other one terminated. No request may fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from recsvc.offline.data import Dataset
from tests.deploy.chart import CHART, container, env_of, manifests_for
from tests.faults.harness import FaultStack, LoadGen, fault_stack, record
from tests.processes import Proc, start, wait_until
from tests.redis_fixture import start_redis
from tests.support import free_port

# Callers with one call each in flight: at most the proxy's slots of the one pod left while the other
# terminates (4 per worker, one worker), so what is measured is the handover, not shedding.
CLIENTS = 4
DRAIN_S = 1                 # recsvc.drainDelaySeconds (the chart's default is 5; 1 keeps the test short)
GRACE_S = 10
HOOK_LIMIT_S = DRAIN_S + GRACE_S + 5


@dataclass
class Pod:
    proxy: subprocess.Popen[bytes]
    server: Proc
    front: int
    upstream: int
    pidfile: Path


def _rendered() -> tuple[dict[str, Any], dict[str, str], dict[str, str], list[str]]:
    """The chart's server pod: the proxy's command and env, recsvc's RECSVC_* env, the preStop hook."""
    m = manifests_for({"recsvc": {"drainDelaySeconds": DRAIN_S, "graceSeconds": GRACE_S}})
    deployment = m.component("server")
    proxy, server = container(deployment, "shed"), container(deployment, "recsvc")
    proxy_env = {k: v for k, v in env_of(proxy).items() if isinstance(v, str)}
    server_env = {k: v for k, v in env_of(server).items() if k in ("RECSVC_DRAIN_DELAY_S", "RECSVC_GRACE_S")}
    return proxy, proxy_env, server_env, proxy["lifecycle"]["preStop"]["exec"]["command"]


def _local(arg: str) -> str:
    """A path inside the pod (the scripts ConfigMap's mount) -> the chart's file here."""
    return str(CHART / "files" / Path(arg).name) if arg.startswith("/opt/recsvc-deploy/") else arg


def _popen(command: list[str], env: dict[str, str], log: Path | None) -> subprocess.Popen[bytes]:
    if log is None:
        return subprocess.Popen(command, env=env)
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def _start_pod(stack: FaultStack, name: str, front: int, upstream: int) -> Pod:
    proxy, proxy_env, server_env, _ = _rendered()
    pidfile = stack.tmp / f"{name}.haproxy.pid"
    env = {**os.environ, **proxy_env, "PIDFILE": str(pidfile), "SHED_BIND": f"127.0.0.1:{front}",
           "SHED_UPSTREAM": proxy_env["SHED_UPSTREAM"].rsplit(":", 1)[0] + f":{upstream}"}  # fmt: skip
    command = [_local(a.replace("$(PIDFILE)", str(pidfile))) for a in proxy["command"]]
    command[0] = shutil.which(command[0]) or command[0]
    port_file = stack.tmp / f"{name}.port"
    port_file.unlink(missing_ok=True)
    server = start(name, ["--log-format", "json", "serve", "--port", str(upstream), "--port-file", str(port_file)],
                   {**stack.env, **server_env}, stack.tmp / f"{name}.log")  # fmt: skip
    stack.extra.append(server)
    popen = await asyncio.to_thread(_popen, command, env, stack.tmp / f"{name}.haproxy.log")
    await asyncio.to_thread(wait_until, server, port_file.exists, 120, name)
    return Pod(popen, server, front, upstream, pidfile)


async def _terminate(pod: Pod) -> dict[str, float | int | None]:
    """What the kubelet does: the proxy's preStop hook and SIGTERM to recsvc at once; SIGTERM to HAProxy
    when the hook returns (HAProxy should be gone by then)."""
    _, proxy_env, _, hook = _rendered()
    env = {**os.environ, **proxy_env, "PIDFILE": str(pod.pidfile)}
    t0 = time.monotonic()
    hook_proc = await asyncio.to_thread(_popen, [_local(a) for a in hook], env, None)
    os.kill(pod.server.popen.pid, signal.SIGTERM)
    # Reaped as it exits, as a container's PID 1 is (the hook polls its PID: a zombie would look alive).
    proxy_exit = asyncio.ensure_future(asyncio.to_thread(pod.proxy.wait, HOOK_LIMIT_S))
    hook_rc = await asyncio.to_thread(hook_proc.wait, HOOK_LIMIT_S)
    hook_s = time.monotonic() - t0
    await asyncio.sleep(0.1)
    proxy_alive_after_hook = not proxy_exit.done()
    await proxy_exit
    with contextlib.suppress(ProcessLookupError):
        pod.proxy.send_signal(signal.SIGTERM)
    proxy_rc = await asyncio.to_thread(pod.proxy.wait, 10)
    server_rc = await asyncio.to_thread(pod.server.popen.wait, HOOK_LIMIT_S)
    return {"hook_rc": hook_rc, "hook_s": round(hook_s, 3), "proxy_alive_after_hook": int(proxy_alive_after_hook),
            "proxy_rc": proxy_rc, "server_rc": server_rc, "server_exit_s": round(time.monotonic() - t0, 3)}  # fmt: skip


async def test_rolling_restarts_of_chart_pods_behind_the_shedding_proxy_fail_no_request(
    tmp_path: Path, fault_data: tuple[Path, Dataset]
) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy; scripts/setup does it as root)")
    _, _, server_env, _ = _rendered()
    assert float(server_env["RECSVC_DRAIN_DELAY_S"]) == DRAIN_S + 1    # the chart's handover second
    redis = start_redis(tmp_path / "redis")
    pods: list[Pod] = []
    try:
        async with fault_stack(tmp_path, *fault_data, start_recsvc=False, RECSVC_HISTORY_STORE="redis",
                               RECSVC_REDIS_URL=redis.url) as stack:  # fmt: skip
            ports = [(free_port(), free_port()) for _ in range(2)]
            pods = [await _start_pod(stack, f"{'ab'[i]}-1", *ports[i]) for i in range(2)]
            target = "ipv4:" + ",".join(f"127.0.0.1:{front}" for front, _ in ports)
            gen = LoadGen(target, stack.users, clients=CLIENTS, deadline_s=3.0, retry=False,
                          options=(("grpc.lb_policy_name", "round_robin"),))  # fmt: skip
            terminations = []
            async with gen.background(max_s=60) as tally:
                await asyncio.sleep(1.0)
                for n, which in enumerate([0, 1, 0], start=2):
                    before = tally.ok
                    terminations.append(await _terminate(pods[which]))
                    assert tally.ok > before, "no request was answered while a pod terminated"
                    pods[which] = await _start_pod(stack, f"{'ab'[which]}-{n}", *ports[which])
                    await asyncio.sleep(1.5)
            logs = "".join(p.tail(10**7) for p in stack.extra)
        record("SIGTERM under load through the chart's shedding proxy (2 pods of HAProxy + recsvc as rendered, "
               f"{CLIENTS} round_robin clients without retries, 3 terminations and restarts)",
               "test_deploy_proxy",
               "0 failed requests; the proxy forwards through the drain delay, then stops softly (GOAWAY) before "
               "recsvc stops accepting; both exit within the grace", tally,
               drain_delay_s=DRAIN_S, grace_s=GRACE_S, terminations=terminations)  # fmt: skip
    finally:
        for pod in pods:
            if pod.proxy.poll() is None:
                pod.proxy.kill()
                pod.proxy.wait(5)
        with contextlib.suppress(Exception):
            redis.stop()

    assert tally.sent > 500
    assert tally.failed_total == 0, (tally.failed, terminations)
    for t in terminations:
        assert t["hook_rc"] == 0 and t["proxy_alive_after_hook"] == 0, terminations   # a soft stop, done
        assert t["proxy_rc"] == 0 and t["server_rc"] == 0, terminations
        assert t["server_exit_s"] < DRAIN_S + 1 + GRACE_S, terminations
    assert "Traceback" not in logs
