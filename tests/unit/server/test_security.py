"""TLS, mutual TLS, certificate rotation, the health-only port and bearer tokens, over real gRPC channels.

A real grpc.aio server on port 0 with a small Recommender servicer (the pipeline is not the point here),
real certificates from the openssl CLI (tests/tls_certs.py), and an injected clock for the file checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from recsvc.config import Settings, load_settings
from recsvc.errors import ConfigError
from recsvc.ranking import TritonRanker, TritonTls
from recsvc.server import app
from recsvc.server.client import RecsvcClient
from recsvc.server.security import AuthInterceptor, ReloadingFiles, ServerTls, bind, check_files, start_health_port
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc
from tests.support import FakeClock, free_port
from tests.tls_certs import Issued, TestCA

SERVICE = "recsvc.v1.Recommender"
WRITE_TOKEN = "w-0123456789abcdef0123456789abcdef"
READ_TOKEN = "r-0123456789abcdef0123456789abcdef"


class Echo(pb_grpc.RecommenderServicer):
    """Answers every method at once; counts what reached it (a refused call must never get here)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def Recommend(self, request: pb.RecommendRequest, context: Any) -> pb.RecommendResponse:
        self.calls.append("Recommend")
        return pb.RecommendResponse(items=[pb.RecommendedItem(item_id="sku-1", score=1.0)], model_version="1")

    async def RecordEvents(self, request: pb.RecordEventsRequest, context: Any) -> pb.RecordEventsResponse:
        self.calls.append("RecordEvents")
        return pb.RecordEventsResponse(accepted=len(request.events))

    async def Prefetch(self, request: pb.PrefetchRequest, context: Any) -> pb.PrefetchResponse:
        self.calls.append("Prefetch")
        return pb.PrefetchResponse(queued=len(request.user_ids))


class Pki:
    """A CA, a server certificate for localhost/127.0.0.1, client certificates, and a second CA."""

    def __init__(self, root: Path) -> None:
        self.ca = TestCA.create(root / "ca")
        self.server = self.ca.issue("server", dns=["localhost"], ips=["127.0.0.1"])
        self.writer = self.ca.issue("writer-1")
        self.stranger = self.ca.issue("stranger")
        self.other_ca = TestCA.create(root / "other-ca", name="another CA")
        self.other_server = self.other_ca.issue("server", dns=["localhost"], ips=["127.0.0.1"])
        self.other_client = self.other_ca.issue("writer-1")      # the right name, from the wrong CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _settings(**kw: Any) -> Settings:
    return Settings(host="127.0.0.1", port=0, **kw)


@contextlib.asynccontextmanager
async def serving(settings: Settings, clock: Callable[[], float] | None = None) -> AsyncIterator[tuple[int, Echo]]:
    """Run the Recommender (Echo), health and reflection behind the settings' TLS and auth on a free port."""
    clock = clock or FakeClock()
    auth = AuthInterceptor.from_settings(settings, clock=clock)
    server = grpc.aio.server(interceptors=[auth] if auth is not None else None)
    echo = Echo()
    pb_grpc.add_RecommenderServicer_to_server(echo, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), server)
    port = bind(server, settings, clock=clock)
    await server.start()
    try:
        yield port, echo
    finally:
        await server.stop(None)


def _channel(port: int, *, ca: Path | None = None, client: Issued | None = None, plaintext: bool = False
             ) -> grpc.aio.Channel:  # fmt: skip
    # A channel of its own (no subchannel shared with earlier channels): each one makes a new handshake.
    options = [("grpc.use_local_subchannel_pool", 1)]
    target = f"127.0.0.1:{port}"
    if plaintext:
        return grpc.aio.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    return grpc.aio.secure_channel(target, creds, options=options)


async def _recommend(channel: grpc.aio.Channel, token: str | None = None) -> pb.RecommendResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
    reply: pb.RecommendResponse = await stub.Recommend(pb.RecommendRequest(user_id="u", k=1), timeout=10,
                                                       metadata=metadata)  # fmt: skip
    return reply


async def _call(channel: grpc.aio.Channel, method: str, metadata: Any = None) -> grpc.StatusCode:
    """Call ``method``; return its status code (OK or the error's)."""
    stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
    request: Any = {
        "Recommend": pb.RecommendRequest(user_id="u", k=1),
        "RecordEvents": pb.RecordEventsRequest(events=[pb.Event(user_id="u", item_id="i", type=1)]),
        "Prefetch": pb.PrefetchRequest(user_ids=["u"]),
    }[method]
    try:
        await getattr(stub, method)(request, timeout=10, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _refusal(channel: grpc.aio.Channel, method: str, metadata: Any = None) -> tuple[grpc.StatusCode, str]:
    stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
    request = pb.PrefetchRequest(user_ids=["u"]) if method == "Prefetch" else pb.RecordEventsRequest()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, method)(request, timeout=10, metadata=metadata)
    return caught.value.code(), caught.value.details() or ""


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TLS_CERT": "c.pem"}, "'tls_cert' and 'tls_key' go together"),
        ({"TLS_KEY": "k.pem"}, "'tls_cert' and 'tls_key' go together"),
        ({"TLS_CLIENT_CA": "ca.pem"}, "'tls_client_ca' needs TLS"),
        ({"TLS_CERT": "c", "TLS_KEY": "k", "TLS_CLIENT_CA": "ca"}, "go together (mutual TLS)"),
        ({"TLS_CERT": "c", "TLS_KEY": "k", "TLS_REQUIRE_CLIENT_CERT": "true"}, "go together (mutual TLS)"),
        ({"WRITE_ALLOWED_IDENTITIES": "writer-1"}, "needs mutual TLS"),
        ({"READ_TOKEN_FILE": "r"}, "needs writes protected too"),
        ({"HEALTH_PORT": "50051"}, "'health_port'"),
        ({"HEALTH_PORT": "70000"}, "'health_port'"),
        ({"SECRET_POLL_S": "0"}, "'secret_poll_s'"),
        ({"SECRET_POLL_S": "inf"}, "'secret_poll_s'"),
        ({"TRITON_CA": "ca"}, "need triton_tls=true"),
        ({"TRITON_TLS": "1", "TRITON_CERT": "c"}, "'triton_cert' and 'triton_key' go together"),
    ],
)
def test_half_configured_security_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings({f"RECSVC_{k}": v for k, v in env.items()})


def test_security_settings_from_the_environment(pki: Pki) -> None:
    s = load_settings({"RECSVC_TLS_CERT": str(pki.server.cert), "RECSVC_TLS_KEY": str(pki.server.key),
                       "RECSVC_TLS_CLIENT_CA": str(pki.ca.cert), "RECSVC_TLS_REQUIRE_CLIENT_CERT": "true",
                       "RECSVC_WRITE_ALLOWED_IDENTITIES": "writer-1, svc.example", "RECSVC_HEALTH_PORT": "8081",
                       "RECSVC_TRITON_TLS": "true", "RECSVC_TRITON_CA": str(pki.ca.cert)})  # fmt: skip
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == (pki.server.cert, pki.server.key, pki.ca.cert)
    assert s.tls_require_client_cert and s.health_port == 8081 and s.triton_tls and s.triton_ca == pki.ca.cert
    check_files(s)


# ----------------------------------------------------------------------------------- start-up errors
def test_bad_certificate_files_are_one_config_error_at_start_up(pki: Pki, tmp_path: Path) -> None:
    missing = _settings(tls_cert=tmp_path / "nope.crt", tls_key=pki.server.key)
    with pytest.raises(ConfigError, match=r"server TLS certificate: cannot read .*nope\.crt"):
        check_files(missing)
    mismatched = _settings(tls_cert=pki.server.cert, tls_key=pki.writer.key)
    with pytest.raises(ConfigError, match=r"not a usable certificate and key: .*KEY_VALUES_MISMATCH"):
        check_files(mismatched)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"tls_cert .*garbage\.pem holds no PEM CERTIFICATE"):
        check_files(_settings(tls_cert=garbage, tls_key=pki.server.key))
    with pytest.raises(ConfigError, match=r"tls_client_ca .*garbage\.pem holds no PEM CERTIFICATE"):
        check_files(_settings(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=garbage,
                              tls_require_client_cert=True))  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "holds no token"), ("\n  \n", "holds no token"), ("short\n", "at least 16"),
     ("has a space in it 0123456789\n", "at least 16"), ("tökén-0123456789abcdef\n", "non-ASCII")],
)  # fmt: skip
def test_bad_token_files_are_refused_at_start_up(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"write_token_file {path}.*{message}"):
        check_files(_settings(write_token_file=path))
    with pytest.raises(ConfigError, match=r"write_token_file: cannot read .*absent"):
        check_files(_settings(write_token_file=tmp_path / "absent"))


# --------------------------------------------------------------------------------------------- TLS
async def test_tls_server_and_client(pki: Pki) -> None:
    settings = _settings(tls_cert=pki.server.cert, tls_key=pki.server.key)
    async with serving(settings) as (port, echo):
        async with _channel(port, ca=pki.ca.cert) as channel:
            assert (await _recommend(channel)).items[0].item_id == "sku-1"
        # recsvc's own client, the way `recsvc recommend --ca` uses it.
        async with RecsvcClient(f"127.0.0.1:{port}", ca=pki.ca.cert) as client:
            assert [i.item_id for i in (await client.recommend("u", 1)).items] == ["sku-1"]
            assert await client.serving()
        # A plaintext client gets no answer from a TLS port, and a client that trusts another CA neither.
        async with _channel(port, plaintext=True) as channel:
            assert await _call(channel, "Recommend") == grpc.StatusCode.UNAVAILABLE
        async with _channel(port, ca=pki.other_ca.cert) as channel:
            assert await _call(channel, "Recommend") == grpc.StatusCode.UNAVAILABLE
        assert echo.calls == ["Recommend", "Recommend"]


async def test_mutual_tls_accepts_client_certificates_from_the_ca_only(pki: Pki) -> None:
    settings = _settings(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert,
                         tls_require_client_cert=True)  # fmt: skip
    async with serving(settings) as (port, echo):
        async with _channel(port, ca=pki.ca.cert, client=pki.writer) as channel:
            assert await _call(channel, "Recommend") == grpc.StatusCode.OK
        async with _channel(port, ca=pki.ca.cert) as channel:          # no client certificate
            assert await _call(channel, "Recommend") == grpc.StatusCode.UNAVAILABLE
        async with _channel(port, ca=pki.ca.cert, client=pki.other_client) as channel:  # signed by another CA
            assert await _call(channel, "Recommend") == grpc.StatusCode.UNAVAILABLE
        async with RecsvcClient(f"127.0.0.1:{port}", ca=pki.ca.cert, cert=pki.writer.cert,
                                key=pki.writer.key) as client:  # fmt: skip
            assert await client.record([]) == 0
        assert echo.calls == ["Recommend", "RecordEvents"]


def _install(src: Issued, dst_dir: Path) -> None:
    """Replace dst_dir/tls.{crt,key} in place (new bytes, same paths), as a plain file write would."""
    shutil.copyfile(src.cert, dst_dir / "tls.crt")
    shutil.copyfile(src.key, dst_dir / "tls.key")


async def test_a_certificate_rotated_in_place_reaches_new_connections(pki: Pki, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    _install(pki.server, live)
    clock = FakeClock()
    settings = _settings(tls_cert=live / "tls.crt", tls_key=live / "tls.key", secret_poll_s=5.0)
    async with serving(settings, clock) as (port, _):
        old = _channel(port, ca=pki.ca.cert)
        assert await _call(old, "Recommend") == grpc.StatusCode.OK
        _install(pki.other_server, live)
        # Not checked again before secret_poll_s has passed: still the first certificate.
        async with _channel(port, ca=pki.other_ca.cert) as channel:
            assert await _call(channel, "Recommend") == grpc.StatusCode.UNAVAILABLE
        clock.tick(5.0)
        async with _channel(port, ca=pki.other_ca.cert) as channel:
            assert await _call(channel, "Recommend") == grpc.StatusCode.OK
        async with _channel(port, ca=pki.ca.cert) as channel:
            assert await _call(channel, "Recommend") == grpc.StatusCode.UNAVAILABLE
        # A connection made before the rotation keeps its session.
        assert await _call(old, "Recommend") == grpc.StatusCode.OK
        await old.close()


def test_a_key_replaced_after_the_read_never_installs_a_mismatched_pair(pki: Pki, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A rotation writing the certificate, then the key, as two files. The check reads the new certificate
    # and the old key; the new key lands just after the read (past the stat that follows it). The pair in
    # hand does not match: it must be refused, even though the files on disk match by then.
    live = tmp_path / "live"
    live.mkdir()
    _install(pki.server, live)
    clock = FakeClock()
    tls = ServerTls(_settings(tls_cert=live / "tls.crt", tls_key=live / "tls.key", secret_poll_s=1.0), clock=clock)
    files = tls.files
    real_stat = files._stat
    stats = 0

    def stat_then_rotate_key() -> Any:
        nonlocal stats
        stats += 1
        signature = real_stat()
        if stats == 2:                  # the stat right after the read: the key is replaced now
            shutil.copyfile(pki.other_server.key, live / "tls.key")
        return signature

    monkeypatch.setattr(files, "_stat", stat_then_rotate_key)
    shutil.copyfile(pki.other_server.cert, live / "tls.crt")
    clock.tick(1.0)
    files.get()
    assert stats >= 2
    mismatched = (pki.other_server.cert.read_bytes(), pki.server.key.read_bytes())
    assert files._data != mismatched and files.generation == 0      # still the first, good pair
    clock.tick(1.0)
    files.get()                     # the next check reads the finished rotation
    assert files._data == (pki.other_server.cert.read_bytes(), pki.other_server.key.read_bytes())
    assert files.generation == 1


def test_files_replaced_while_being_parsed_are_read_again_before_anything_is_installed(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    _install(pki.server, live)
    clock = FakeClock()
    tls = ServerTls(_settings(tls_cert=live / "tls.crt", tls_key=live / "tls.key", secret_poll_s=1.0), clock=clock)
    files = tls.files
    real_parse = files._parse

    def parse_during_a_rotation(data: Any) -> Any:
        value = real_parse(data)
        _install(pki.server, live)      # rotated back (a consistent pair) while the previous one was parsed
        return value

    monkeypatch.setattr(files, "_parse", parse_during_a_rotation)
    _install(pki.other_server, live)
    clock.tick(1.0)
    files.get()
    assert files.generation == 0        # what was parsed is no longer on disk: not installed
    clock.tick(1.0)
    files.get()
    assert files._data == (pki.server.cert.read_bytes(), pki.server.key.read_bytes())


def _secret_volume(root: Path, src: Issued, version: str) -> None:
    """What the kubelet does to a Secret volume: files in a new ..<version> dir, then one symlink swap."""
    data = root / f"..{version}"
    data.mkdir()
    shutil.copyfile(src.cert, data / "tls.crt")
    shutil.copyfile(src.key, data / "tls.key")
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(data.name)
    os.replace(tmp_link, root / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")


async def test_a_secret_volume_swap_is_picked_up_and_a_broken_one_is_not(pki: Pki, tmp_path: Path) -> None:
    volume = tmp_path / "secret"
    volume.mkdir()
    _secret_volume(volume, pki.server, "v1")
    clock = FakeClock()
    settings = _settings(tls_cert=volume / "tls.crt", tls_key=volume / "tls.key", secret_poll_s=1.0)
    async with serving(settings, clock) as (port, _):
        _secret_volume(volume, pki.other_server, "v2")
        clock.tick(1.0)
        async with _channel(port, ca=pki.other_ca.cert) as channel:
            assert await _call(channel, "Recommend") == grpc.StatusCode.OK
        # A rotation gone wrong (a key that does not belong to the certificate) keeps the last good pair.
        broken = Issued(pki.server.cert, pki.other_server.key)
        _secret_volume(volume, broken, "v3")
        clock.tick(1.0)
        async with _channel(port, ca=pki.other_ca.cert) as channel:
            assert await _call(channel, "Recommend") == grpc.StatusCode.OK
        # Repaired: picked up again.
        _secret_volume(volume, pki.server, "v4")
        clock.tick(1.0)
        async with _channel(port, ca=pki.ca.cert) as channel:
            assert await _call(channel, "Recommend") == grpc.StatusCode.OK


def test_reloading_files_checks_only_once_per_poll_and_only_rereads_on_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one")
    parsed: list[bytes] = []

    def parse(data: Any) -> bytes:
        parsed.append(data[0])
        if data[0] == b"bad":
            raise ConfigError("bad contents")
        return bytes(data[0])

    clock = FakeClock()
    files = ReloadingFiles("f", [path], parse, poll_s=2.0, clock=clock)
    assert files.get() == b"one" and files.generation == 0
    path.write_bytes(b"two!")
    assert files.get() == b"one"                 # within the poll interval: not even looked at
    clock.tick(2.0)
    assert files.get() == b"two!" and files.generation == 1
    os.utime(path, ns=(1, 1))                    # touched, same bytes: not parsed again
    clock.tick(2.0)
    assert files.get() == b"two!" and files.generation == 1
    path.write_bytes(b"bad")
    clock.tick(2.0)
    assert files.get() == b"two!" and files.generation == 1
    path.unlink()
    for _ in range(3):
        clock.tick(2.0)
        assert files.get() == b"two!"            # gone: the last good value stays
    assert len([r for r in caplog.records if "cannot read" in r.getMessage()]) == 1   # said once, not per check
    path.write_bytes(b"three")
    clock.tick(2.0)
    assert files.get() == b"three" and files.generation == 2
    assert parsed == [b"one", b"two!", b"bad", b"three"]


# ----------------------------------------------------------------------------------- health port
async def test_health_port_serves_health_only_in_plaintext(pki: Pki) -> None:
    settings = _settings(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert,
                         tls_require_client_cert=True, health_port=free_port())  # fmt: skip
    servicer = health.aio.HealthServicer()
    await servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    server = await start_health_port(settings, servicer)
    assert server is not None
    try:
        async with _channel(settings.health_port, plaintext=True) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            reply = await check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            await servicer.enter_graceful_shutdown()
            reply = await check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Nothing else is served there.
            assert await _call(channel, "Recommend") == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)
    assert await start_health_port(_settings(), servicer) is None


async def test_a_health_port_that_cannot_be_bound_stops_the_main_server(tmp_path: Path) -> None:
    # Something else (not a gRPC server: no SO_REUSEPORT) already listens on health_port.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    main_port = free_port()
    settings = Settings(host="127.0.0.1", port=main_port, health_port=taken.getsockname()[1])
    server = grpc.aio.server()
    with taken, pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{settings.health_port}: the port is "
                                                 "in use .* RECSVC_HEALTH_PORT"):
        await app._run_grpc(server, cast(Any, Echo()), settings, None, asyncio.Event())
    # The main server was started before the health port failed: it must be stopped, its port free again.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", main_port))


# ------------------------------------------------------------------------------------------ tokens
@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "write-token"
    path.write_text(WRITE_TOKEN + "\n")
    return path


@pytest.mark.parametrize("method", ["RecordEvents", "Prefetch"])
async def test_writes_need_the_write_token(token_file: Path, method: str) -> None:
    async with serving(_settings(write_token_file=token_file)) as (port, echo):
        async with _channel(port, plaintext=True) as channel:
            assert await _refusal(channel, method) == (grpc.StatusCode.UNAUTHENTICATED, "authentication required")
            wrong = _bearer("w-0123456789abcdef0123456789abcdeX")
            assert await _refusal(channel, method, wrong) == (grpc.StatusCode.UNAUTHENTICATED,
                                                              "authentication required")  # fmt: skip
            basic = (("authorization", f"Basic {WRITE_TOKEN}"),)
            assert (await _refusal(channel, method, basic))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert echo.calls == []              # nothing refused reached the servicer
            assert await _call(channel, method, _bearer(WRITE_TOKEN)) == grpc.StatusCode.OK
            assert await _call(channel, method, (("authorization", f"bearer  {WRITE_TOKEN}"),)) == grpc.StatusCode.OK
            # Recommend stays open, and so do health and reflection.
            assert await _call(channel, "Recommend") == grpc.StatusCode.OK
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)  # fmt: skip
            names = [s.name async for reply in listing for s in reply.list_services_response.service]
            assert SERVICE in names
        assert echo.calls == [method, method, "Recommend"]


async def test_read_token_guards_recommend(tmp_path: Path, token_file: Path) -> None:
    read = tmp_path / "read-token"
    read.write_text(READ_TOKEN + "\n")
    async with serving(_settings(write_token_file=token_file, read_token_file=read)) as (port, echo):
        async with _channel(port, plaintext=True) as channel:
            assert await _call(channel, "Recommend") == grpc.StatusCode.UNAUTHENTICATED
            assert await _call(channel, "Recommend", _bearer("r-" + "0" * 32)) == grpc.StatusCode.UNAUTHENTICATED
            assert await _call(channel, "Recommend", _bearer(READ_TOKEN)) == grpc.StatusCode.OK
            assert await _call(channel, "Recommend", _bearer(WRITE_TOKEN)) == grpc.StatusCode.OK  # writers may read
            # A read token is a valid credential, but not for writing.
            assert await _refusal(channel, "RecordEvents", _bearer(READ_TOKEN)) == (
                grpc.StatusCode.PERMISSION_DENIED, "permission denied")  # fmt: skip
            assert await _call(channel, "RecordEvents", _bearer(WRITE_TOKEN)) == grpc.StatusCode.OK
        async with RecsvcClient(f"127.0.0.1:{port}", token=READ_TOKEN) as client:
            assert len((await client.recommend("u", 1)).items) == 1
    assert echo.calls == ["Recommend", "Recommend", "RecordEvents", "Recommend"]


async def test_a_rotated_token_file_takes_effect_without_restart(token_file: Path) -> None:
    clock = FakeClock()
    new = "w-new-0123456789abcdef0123456789ab"
    async with serving(_settings(write_token_file=token_file, secret_poll_s=1.0), clock) as (port, _):
        async with _channel(port, plaintext=True) as channel:
            # The overlap: both tokens valid while clients move over.
            await asyncio.to_thread(token_file.write_text, f"{WRITE_TOKEN}\n{new}\n")
            clock.tick(1.0)
            assert await _call(channel, "RecordEvents", _bearer(WRITE_TOKEN)) == grpc.StatusCode.OK
            assert await _call(channel, "RecordEvents", _bearer(new)) == grpc.StatusCode.OK
            await asyncio.to_thread(token_file.write_text, f"{new}\n")
            clock.tick(1.0)
            assert await _call(channel, "RecordEvents", _bearer(WRITE_TOKEN)) == grpc.StatusCode.UNAUTHENTICATED
            assert await _call(channel, "RecordEvents", _bearer(new)) == grpc.StatusCode.OK
            # Emptied by mistake: the last good tokens stay (an empty file would otherwise lock out every writer).
            await asyncio.to_thread(token_file.write_text, "")
            clock.tick(1.0)
            assert await _call(channel, "RecordEvents", _bearer(new)) == grpc.StatusCode.OK


async def test_mtls_identities_may_write(pki: Pki, token_file: Path) -> None:
    settings = _settings(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert,
                         tls_require_client_cert=True, write_allowed_identities="writer-1, backend.example",
                         write_token_file=token_file)  # fmt: skip
    async with serving(settings) as (port, echo):
        async with _channel(port, ca=pki.ca.cert, client=pki.writer) as channel:
            assert await _call(channel, "RecordEvents") == grpc.StatusCode.OK
            assert await _call(channel, "Prefetch") == grpc.StatusCode.OK
        async with _channel(port, ca=pki.ca.cert, client=pki.stranger) as channel:
            assert await _refusal(channel, "RecordEvents") == (grpc.StatusCode.PERMISSION_DENIED, "permission denied")
            assert await _call(channel, "Recommend") == grpc.StatusCode.OK      # reads stay open
            # The token still works for a certificate that is not on the list.
            assert await _call(channel, "RecordEvents", _bearer(WRITE_TOKEN)) == grpc.StatusCode.OK
        assert echo.calls == ["RecordEvents", "Prefetch", "Recommend", "RecordEvents"]


def test_no_interceptor_when_everything_is_open() -> None:
    assert AuthInterceptor.from_settings(_settings()) is None


# ----------------------------------------------------------------------------------- Triton client
def test_triton_tls_from_settings(pki: Pki, tmp_path: Path) -> None:
    plain = TritonRanker.from_settings(_settings())
    assert plain.channel.tls is None
    s = _settings(triton_tls=True, triton_ca=pki.ca.cert, triton_cert=pki.writer.cert, triton_key=pki.writer.key)
    ranker = TritonRanker.from_settings(s, timeout_s=7.0)
    assert ranker.channel.tls == TritonTls(ca=pki.ca.cert, cert=pki.writer.cert, key=pki.writer.key)
    assert ranker.timeout_s == 7.0
    assert ranker.channel.tls.client_args() == {"ssl": True, "root_certificates": str(pki.ca.cert),
                                        "private_key": str(pki.writer.key),
                                        "certificate_chain": str(pki.writer.cert)}  # fmt: skip
    with pytest.raises(ConfigError, match=r"triton_ca .*absent\.pem"):
        TritonRanker.from_settings(_settings(triton_tls=True, triton_ca=tmp_path / "absent.pem"))
    (tmp_path / "junk").write_text("junk")
    with pytest.raises(ConfigError, match=r"triton_cert .*junk is not a PEM file"):
        TritonTls(cert=tmp_path / "junk", key=pki.writer.key)
