"""TLS end to end with real processes: the bundled tritonserver with mutual TLS on its gRPC port, and
`recsvc serve` with mutual TLS, a write token, a plaintext health port, and Triton reached over mTLS.

Certificates are made in the test by the openssl CLI (tests/tls_certs.py).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsvc.domain import Event, EventType
from recsvc.errors import Unavailable
from recsvc.offline.triton_server import TritonOptions, TritonServer
from recsvc.ranking import TritonRanker
from recsvc.ranking.tiny import reference_scores
from recsvc.ranking.triton_ranker import TritonTls
from recsvc.repository import publish
from recsvc.repository.tiny_bundle import write_tiny_bundle
from recsvc.server.client import RecsvcClient
from tests.processes import Proc, stack_env, start_server
from tests.support import free_port, free_ports
from tests.tls_certs import Issued, TestCA

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

TOKEN = "t-0123456789abcdef0123456789abcdef"
L, C, ITEMS = 50, 100, 300


class Pki:
    def __init__(self, root: Path) -> None:
        self.ca = TestCA.create(root / "ca")
        self.triton = self.ca.issue("triton", dns=["localhost"], ips=["127.0.0.1"])
        self.server = self.ca.issue("recsvc", dns=["localhost"], ips=["127.0.0.1"])
        self.client = self.ca.issue("backend-1")
        self.other_ca = TestCA.create(root / "other-ca", name="rotated CA")
        self.rotated = self.other_ca.issue("recsvc", dns=["localhost"], ips=["127.0.0.1"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def pki(workdir: Path) -> Pki:
    return Pki(workdir / "pki")


@pytest.fixture(scope="module")
def repository(workdir: Path) -> tuple[Path, np.ndarray]:
    bundle = workdir / "bundle"
    write_tiny_bundle(bundle, num_items=ITEMS, dim=16, history_len=L, num_candidates=C, seed=3)
    assert publish(bundle, workdir / "repo") == 1
    return workdir / "repo", np.load(bundle / "item_embeddings.npy")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def triton(workdir: Path, pki: Pki, repository: tuple[Path, np.ndarray]) -> AsyncIterator[TritonServer]:
    """tritonserver whose gRPC port requires TLS and a client certificate from our CA."""
    grpc_port, http_port, metrics_port = free_ports(3)
    options = TritonOptions(
        model_repository=repository[0], log_path=workdir / "tritonserver.log", grpc_port=grpc_port,
        http_port=http_port, metrics_port=metrics_port, startup_timeout_s=120.0, exit_timeout_s=2.0,
        extra_args=("--grpc-use-ssl=true", f"--grpc-server-cert={pki.triton.cert}",
                    f"--grpc-server-key={pki.triton.key}", f"--grpc-root-cert={pki.ca.cert}",
                    "--grpc-use-ssl-mutual=true"),
    )  # fmt: skip
    server = TritonServer(options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_triton_over_mutual_tls(triton: TritonServer, pki: Pki, repository: tuple[Path, np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    history = rng.integers(0, ITEMS, size=(4, L)).astype(np.int64)
    candidates = rng.integers(0, ITEMS, size=(4, C)).astype(np.int64)
    ranker = TritonRanker(triton.grpc_url, timeout_s=10.0,
                          tls=TritonTls(ca=pki.ca.cert, cert=pki.client.cert, key=pki.client.key))  # fmt: skip
    try:
        assert await ranker.is_model_ready("1")
        scores = await ranker.score(history, candidates, version="1")
        np.testing.assert_allclose(scores, reference_scores(repository[1], history, candidates), rtol=1e-5, atol=1e-5)
    finally:
        await ranker.close()
    # Plaintext, and TLS without a client certificate, get nowhere.
    for tls in (None, TritonTls(ca=pki.ca.cert)):
        refused = TritonRanker(triton.grpc_url, timeout_s=5.0, tls=tls)
        try:
            assert not await refused.is_server_ready()
        finally:
            await refused.close()


@pytest.fixture(scope="module")
def live_certs(workdir: Path, pki: Pki) -> Path:
    """The server's certificate files at fixed paths, to be rotated in place."""
    live = workdir / "live"
    live.mkdir()
    shutil.copyfile(pki.server.cert, live / "tls.crt")
    shutil.copyfile(pki.server.key, live / "tls.key")
    return live


@pytest.fixture(scope="module")
def secure_server(workdir: Path, pki: Pki, triton: TritonServer, repository: tuple[Path, np.ndarray],
                  live_certs: Path) -> Iterator[tuple[str, dict[str, str], Proc]]:  # fmt: skip
    token_file = workdir / "write-token"
    token_file.write_text(TOKEN + "\n")
    env = stack_env(workdir, triton.options.grpc_port)
    env.update(
        RECSVC_MODEL_REPOSITORY=str(repository[0]), RECSVC_TRITON_HTTP_PORT=str(triton.options.http_port),
        RECSVC_TRITON_METRICS_PORT=str(triton.options.metrics_port), RECSVC_TRITON_TIMEOUT_S="5",
        RECSVC_TRITON_TLS="true", RECSVC_TRITON_CA=str(pki.ca.cert), RECSVC_TRITON_CERT=str(pki.client.cert),
        RECSVC_TRITON_KEY=str(pki.client.key),
        RECSVC_TLS_CERT=str(live_certs / "tls.crt"), RECSVC_TLS_KEY=str(live_certs / "tls.key"),
        RECSVC_TLS_CLIENT_CA=str(pki.ca.cert), RECSVC_TLS_REQUIRE_CLIENT_CERT="true",
        RECSVC_WRITE_TOKEN_FILE=str(token_file), RECSVC_HEALTH_PORT=str(free_port()), RECSVC_SECRET_POLL_S="0.2",
        RECSVC_WARM_USERS="0", RECSVC_MAX_K="10", RECSVC_NUM_CANDIDATES=str(C),
    )  # fmt: skip
    proc, target = start_server(env, workdir)
    try:
        yield target, env, proc
    finally:
        proc.stop()


def _client(target: str, pki: Pki, *, ca: Path | None = None, token: str | None = TOKEN,
            client: Issued | None = None) -> RecsvcClient:  # fmt: skip
    client = client or pki.client
    return RecsvcClient(target, ca=ca or pki.ca.cert, cert=client.cert, key=client.key, token=token, timeout_s=10)


async def test_served_over_mutual_tls_with_ranking_through_triton_tls(
    secure_server: tuple[str, dict[str, str], Proc], pki: Pki
) -> None:
    target, _, proc = secure_server
    async with _client(target, pki) as client:
        rec = await client.recommend("new-user", 5)
        # Ranked by Triton, reached over mutual TLS: not the degraded retrieval-order answer.
        assert len(rec.items) == 5 and not rec.degraded, (rec.degraded_reason, proc.tail())
        assert await client.record([Event("u-1", rec.items[0].item_id, EventType.VIEW, time.time())]) == 1
    # Without the token: Recommend still answers, RecordEvents is refused.
    async with _client(target, pki, token=None) as client:
        assert len((await client.recommend("u-1", 3)).items) == 3
        with pytest.raises(Unavailable, match="UNAUTHENTICATED: authentication required"):
            await client.record([Event("u-1", "x", EventType.VIEW, time.time())])
    # Without a client certificate there is no connection at all.
    async with RecsvcClient(target, ca=pki.ca.cert, token=TOKEN, timeout_s=5) as client:
        with pytest.raises(Unavailable, match="UNAVAILABLE"):
            await client.recommend("u-1", 3)


async def test_plaintext_health_port_answers_probes(secure_server: tuple[str, dict[str, str], Proc]) -> None:
    _, env, _ = secure_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{env['RECSVC_HEALTH_PORT']}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "recsvc.v1.Recommender"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "recsvc.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


async def test_cli_client_with_tls_and_token(secure_server: tuple[str, dict[str, str], Proc], pki: Pki,
                                             workdir: Path) -> None:  # fmt: skip
    target, env, _ = secure_server
    tls = ["--target", target, "--ca", str(pki.ca.cert), "--cert", str(pki.client.cert), "--key", str(pki.client.key)]
    token = ["--token-file", str(workdir / "write-token")]
    ok = await asyncio.to_thread(_cli, env, "record", "u-2", "SKU-1", *tls, *token)
    assert ok.returncode == 0 and "accepted 1 event(s)" in ok.stdout, ok.stderr
    from_env = await asyncio.to_thread(_cli, {**env, "RECOMMENDER_TOKEN": TOKEN}, "record", "u-2", "SKU-2", *tls)
    assert from_env.returncode == 0, from_env.stderr
    refused = await asyncio.to_thread(_cli, env, "record", "u-2", "SKU-3", *tls)
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr
    shown = await asyncio.to_thread(_cli, env, "recommend", "u-2", "--k", "3", *tls)
    assert shown.returncode == 0 and "Recommend(user_id='u-2')" in shown.stdout, shown.stderr


async def test_rotated_certificate_reaches_new_connections_without_restart(
    secure_server: tuple[str, dict[str, str], Proc], pki: Pki, live_certs: Path
) -> None:
    target, _, proc = secure_server
    # A client that trusts only the rotated CA cannot connect yet.
    async with _client(target, pki, ca=pki.other_ca.cert) as client:
        with pytest.raises(Unavailable):
            await client.recommend("u-1", 3)
    shutil.copyfile(pki.rotated.cert, live_certs / "tls.crt.new")
    shutil.copyfile(pki.rotated.key, live_certs / "tls.key.new")
    (live_certs / "tls.key.new").replace(live_certs / "tls.key")
    (live_certs / "tls.crt.new").replace(live_certs / "tls.crt")
    deadline = time.monotonic() + 30          # secret_poll_s is 0.2: generous for a loaded machine
    while True:
        try:
            async with _client(target, pki, ca=pki.other_ca.cert) as client:
                assert len((await client.recommend("u-1", 3)).items) == 3
            break
        except Unavailable:
            if time.monotonic() > deadline:
                pytest.fail(f"rotated certificate not served within 30 s:\n{proc.tail()}")
            await asyncio.sleep(0.2)
    assert proc.popen.poll() is None          # the same process, never restarted
    async with _client(target, pki) as client:   # trusts the old CA only: refused now
        with pytest.raises(Unavailable):
            await client.recommend("u-1", 3)


async def test_bad_certificate_is_one_line_at_start_up(workdir: Path, pki: Pki) -> None:
    env = stack_env(workdir, free_port())
    env.update(RECSVC_TLS_CERT=str(workdir / "missing.crt"), RECSVC_TLS_KEY=str(pki.server.key))
    result = await asyncio.to_thread(_cli, env, "serve", "--port", "0")
    assert result.returncode == 2
    assert "recsvc serve: server TLS certificate: cannot read" in result.stderr and "missing.crt" in result.stderr
    assert "Traceback" not in result.stderr
