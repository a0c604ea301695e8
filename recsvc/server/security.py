"""Transport security and access control: TLS / mutual TLS, a health-only port, bearer tokens.

* TLS: ``tls_cert`` + ``tls_key`` make the gRPC port speak TLS only; ``tls_client_ca`` with
  ``tls_require_client_cert`` makes it mutual. The files are re-read when they change (cert-manager
  rotates them in place; a Kubernetes Secret volume swaps a symlink): gRPC asks ``ServerTls.fetch`` before
  every new connection's handshake, so new connections get the new certificate, open ones keep theirs.
* ``health_port``: a second, plaintext server with grpc.health.v1 only, because Kubernetes' native gRPC
  probes cannot speak TLS. It shares the main server's HealthServicer, so it turns NOT_SERVING with it.
* ``AuthInterceptor``: RecordEvents and Prefetch (every Recommender method but Recommend) need a bearer
  token from ``write_token_file`` or a client certificate named in ``write_allowed_identities``;
  Recommend needs a read or write token only when ``read_token_file`` is set. Health and reflection
  stay open. Refusals say nothing about why beyond the status code.

Errors: a missing, unreadable or inconsistent file at start-up is one ``ConfigError`` naming the
setting and the file. A rotation that leaves broken files (a key that does not match its certificate,
an empty token file) keeps the last good files and logs why, once per change.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc

from recsvc.config import Settings
from recsvc.errors import ConfigError
from recsvc.server.names import SERVICE_NAME

__all__ = [
    "AuthInterceptor",
    "ReloadingFiles",
    "ServerTls",
    "bind",
    "channel_credentials",
    "check_files",
    "check_port_free",
    "read_token",
    "start_health_port",
    "token_metadata",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

_MAX_FILE_BYTES = 1 << 20   # certificates, keys and token lists are small; anything bigger is a mistake
_MIN_TOKEN_LEN = 16
_TOKEN = re.compile(r"[\x21-\x7e]+")  # what an HTTP/2 header value carries without escaping
_READ_METHODS = frozenset({f"/{SERVICE_NAME}/Recommend"})
_IDENTITY_KEYS = ("x509_common_name", "x509_subject_alternative_name")


# ---------------------------------------------------------------------------------------- file reload
class ReloadingFiles(Generic[T]):
    """A value parsed from a set of files, parsed again when one of them changes.

    ``get()`` stats the files at most once per ``poll_s`` of ``clock``; a change of inode, size or mtime
    (a Secret volume's symlink swap changes the inode) with new contents is parsed as one consistent set,
    then replaces the value and bumps ``generation``. Files read while they were being replaced (their stat
    changed during the read) are read again on the next check. Safe to call from any thread: gRPC calls
    the TLS fetcher from its own.
    """

    def __init__(
        self, what: str, paths: Sequence[Path], parse: Callable[[Sequence[bytes]], T], *, poll_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.what = what
        self.paths = tuple(paths)
        self._parse = parse
        self._poll_s = poll_s
        self._clock = clock
        self._lock = threading.Lock()
        self.generation = 0
        try:
            self._signature = self._stat()
            self._data = self._read()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {exc.filename or ', '.join(map(str, paths))}: "
                              f"{exc.strerror or exc}") from exc  # fmt: skip
        self._value = parse(self._data)
        self._next_check = clock() + poll_s

    def get(self) -> T:
        """The current value (the last good one when the files changed into something unusable).

        Called on the event loop (the token check of every guarded RPC) and on gRPC's handshake thread
        (the TLS fetcher). Between checks it is a lock and a clock read; the stat (and, only after a
        change, the read and parse) happens at most once per ``poll_s``, a few small files, so doing it
        inline is cheaper than handing it to a thread.
        """
        with self._lock:
            now = self._clock()
            if now >= self._next_check:
                self._next_check = now + self._poll_s
                self._check()
            return self._value

    def _check(self) -> None:
        try:
            signature = self._stat()
            if signature == self._signature:
                return
            data = self._read()
            if self._stat() != signature:
                return          # replaced while we read: try again at the next check
        except OSError as exc:
            if self._signature is not None:     # once, not at every check while the files are away
                log.warning("%s: cannot read %s (%s); keeping the previous files", self.what, exc.filename,
                            exc.strerror)  # fmt: skip
            self._signature = None      # so the files are read again once they are back
            return
        self._signature = signature
        if data == self._data:
            return              # touched, or rewritten with the same bytes: nothing to do
        try:
            value = self._parse(data)
        except ConfigError as exc:
            log.error("%s changed into something unusable; keeping the previous files: %s", self.what, exc)
            return
        try:
            changed = self._stat() != signature
        except OSError:
            changed = True
        if changed:
            # Replaced after the read: what was parsed is consistent in itself (parse checks the bytes in
            # hand), but it is not what the files hold now; forget the signature so they are read again.
            self._signature = None
            return
        self._data, self._value = data, value
        self.generation += 1
        log.info("%s reloaded from %s", self.what, ", ".join(map(str, self.paths)))

    def _stat(self) -> tuple[tuple[int, int, int, int], ...] | None:
        stats = [os.stat(p) for p in self.paths]     # follows symlinks: the file a Secret volume points at
        return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _read(self) -> tuple[bytes, ...]:
        out = []
        for path in self.paths:
            with open(path, "rb") as fh:
                data = fh.read(_MAX_FILE_BYTES + 1)
            if len(data) > _MAX_FILE_BYTES:
                raise OSError(0, f"larger than {_MAX_FILE_BYTES} bytes", str(path))
            out.append(data)
        return tuple(out)


# ------------------------------------------------------------------------------------------ server TLS
def _check_pem(what: str, data: bytes, marker: bytes) -> None:
    if b"-----BEGIN " + marker not in data:
        raise ConfigError(f"{what} holds no PEM {marker.decode()}")


def _check_ca(what: str, data: bytes) -> None:
    _check_pem(what, data, b"CERTIFICATE")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{what} is not a PEM certificate bundle: {exc}") from exc


def _check_pair(cert: Path, key: Path, cert_data: bytes, key_data: bytes) -> None:
    _check_pem(f"tls_cert {cert}", cert_data, b"CERTIFICATE")
    _check_pem(f"tls_key {key}", key_data, b"")
    if b"ENCRYPTED" in key_data:
        raise ConfigError(f"tls_key {key} is encrypted; recsvc needs an unencrypted PEM key (as cert-manager writes)")
    # OpenSSL checks that both parse and that the key belongs to the certificate. It only reads files, and
    # the configured paths may have changed since they were read (a rotation writing the certificate and
    # the key one after the other), so it gets exactly the bytes in hand, in a private temporary copy.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        with tempfile.TemporaryDirectory(prefix="recsvc-tls-") as tmp:     # mode 0700
            cert_copy, key_copy = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            for path, data in ((cert_copy, cert_data), (key_copy, key_data)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            context.load_cert_chain(cert_copy, key_copy, password=b"")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls_cert {cert} and tls_key {key} are not a usable certificate and key: {exc}") from exc


class ServerTls:
    """The server's TLS credentials from ``tls_cert``/``tls_key``/``tls_client_ca``, reloaded on change."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        if settings.tls_cert is None or settings.tls_key is None:
            raise ConfigError("TLS needs tls_cert and tls_key")
        self._cert, self._key, self._ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
        self.require_client_cert = settings.tls_require_client_cert
        paths = [self._cert, self._key] + ([self._ca] if self._ca is not None else [])
        self.files = ReloadingFiles("server TLS certificate", paths, self._parse, poll_s=settings.secret_poll_s,
                                    clock=clock)  # fmt: skip
        self._served = self.files.generation

    def _parse(self, data: Sequence[bytes]) -> grpc.ServerCertificateConfiguration:
        cert, key, *ca = data
        _check_pair(self._cert, self._key, cert, key)
        if ca:
            _check_ca(f"tls_client_ca {self._ca}", ca[0])
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca[0] if ca else None)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port`` whose certificate follows the files."""
        return grpc.dynamic_ssl_server_credentials(
            self.files.get(), self.fetch, require_client_authentication=self.require_client_cert  # type: ignore[arg-type]
        )  # (the stub says the fetcher may not return None; gRPC documents None as "unchanged")

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The certificate fetcher gRPC calls before each new connection's handshake: None means "unchanged"."""
        config = self.files.get()
        if self.files.generation == self._served:
            return None
        self._served = self.files.generation
        return config


def bind(server: grpc.aio.Server, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> int:
    """Add the service port to ``server``: TLS when ``tls_cert`` is set, else plaintext. Returns the port."""
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert is None:
        return _add_port(lambda: server.add_insecure_port(address), address, "--port or RECSVC_PORT")
    tls = ServerTls(settings, clock=clock)
    return _add_port(lambda: server.add_secure_port(address, tls.credentials()), address, "--port or RECSVC_PORT")


def check_port_free(settings: Settings) -> None:
    """ConfigError at once when something already listens on the service port (unless ``reuse_port``).

    Checked before anything loads, so a taken port costs no bundle or index load (minutes at scale) and
    gRPC's own bind error line never shows. The probe binds like gRPC does (SO_REUSEADDR, so connections
    of an earlier run in TIME_WAIT do not count) but without SO_REUSEPORT, so a listener that shares its
    port (another recsvc's workers) is found too.
    """
    if settings.port == 0 or settings.reuse_port:
        return
    host = settings.host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, settings.port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]  # fmt: skip
    except OSError:
        return                      # an address this machine cannot resolve: bind() says so, later
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: the port is in use (another "
                              "recsvc?); choose another with --port or RECSVC_PORT") from exc


def _add_port(add: Callable[[], int], address: str, setting: str) -> int:
    """``add()``'s port, or one ConfigError naming the address when it cannot be bound."""
    try:
        port = add()
    except RuntimeError:            # grpc's "Failed to bind to address ...": no errno, nothing more to say
        port = 0
    if port == 0:                   # older grpc versions return 0 instead of raising
        raise ConfigError(f"cannot listen on {address}: the port is in use (another recsvc?) or the address "
                          f"is not this machine's; choose another with {setting}")  # fmt: skip
    return port


def check_files(settings: Settings) -> None:
    """Read and check every certificate and token file the settings name; raise one ConfigError if any is bad.

    Called before anything else starts (and by the worker supervisor before its workers), so a bad file
    stops the start-up at once instead of a crash-and-restart loop.
    """
    if settings.tls_cert is not None:
        ServerTls(settings)
    AuthInterceptor.from_settings(settings)


async def start_health_port(settings: Settings, health: Any) -> grpc.aio.Server | None:
    """A plaintext server on ``health_port`` with only ``health`` (a HealthServicer) on it, or None (port 0).

    Kubernetes' gRPC probes speak plaintext only; this port tells whether the process is serving and
    nothing else (no Recommender, no reflection).
    """
    if not settings.health_port:
        return None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if settings.reuse_port else 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{settings.host}:{settings.health_port}"
    _add_port(lambda: server.add_insecure_port(address), address, "RECSVC_HEALTH_PORT")
    await server.start()
    log.info("plaintext health port on %s:%d", settings.host, settings.health_port)
    return server


# ------------------------------------------------------------------------------------------- tokens
def _parse_tokens(what: str) -> Callable[[Sequence[bytes]], frozenset[bytes]]:
    def parse(data: Sequence[bytes]) -> frozenset[bytes]:
        # One token per line, so a rotation can accept the old and the new token for a while.
        try:
            lines = data[0].decode("ascii").splitlines()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{what} holds non-ASCII bytes") from exc
        tokens = [line.strip() for line in lines if line.strip()]
        if not tokens:
            raise ConfigError(f"{what} holds no token")
        for token in tokens:
            if len(token) < _MIN_TOKEN_LEN or not _TOKEN.fullmatch(token):
                raise ConfigError(f"{what}: tokens must be at least {_MIN_TOKEN_LEN} printable ASCII characters "
                                  "without spaces, one per line")  # fmt: skip
        return frozenset(t.encode() for t in tokens)

    return parse


def _tokens(setting: str, path: Path | None, settings: Settings,
            clock: Callable[[], float]) -> ReloadingFiles[frozenset[bytes]] | None:  # fmt: skip
    if path is None:
        return None
    return ReloadingFiles(setting, [path], _parse_tokens(f"{setting} {path}"), poll_s=settings.secret_poll_s,
                          clock=clock)  # fmt: skip


def _matches(token: bytes, tokens: frozenset[bytes]) -> bool:
    # Compared with every token, in constant time each: how many characters matched never shows in timing.
    found = False
    for candidate in tokens:
        found |= hmac.compare_digest(token, candidate)
    return found


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip().encode("latin-1") if scheme.lower() == "bearer" else b""
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens / mTLS identities for the Recommender methods; everything else passes untouched.

    Codes: no credentials, or a token nobody issued -> UNAUTHENTICATED; a read token on a write method,
    or a client certificate whose identity may not write -> PERMISSION_DENIED. Details are fixed strings.
    ``rejected`` counts refusals by (method, code).
    """

    def __init__(
        self, *, write_tokens: ReloadingFiles[frozenset[bytes]] | None = None,
        read_tokens: ReloadingFiles[frozenset[bytes]] | None = None, write_identities: frozenset[str] = frozenset(),
    ) -> None:  # fmt: skip
        self._write_tokens = write_tokens
        self._read_tokens = read_tokens
        self._write_identities = write_identities
        self.rejected: Counter[tuple[str, str]] = Counter()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, clock: Callable[[], float] = time.monotonic
    ) -> AuthInterceptor | None:
        """The interceptor the settings ask for, or None when every method is open."""
        identities = frozenset(i.strip() for i in settings.write_allowed_identities.split(",") if i.strip())
        write = _tokens("write_token_file", settings.write_token_file, settings, clock)
        read = _tokens("read_token_file", settings.read_token_file, settings, clock)
        if write is None and read is None and not identities:
            return None
        if write is not None and settings.tls_cert is None:
            log.warning("bearer tokens are required but the port is plaintext: tokens can be read off the wire "
                        "(set tls_cert and tls_key)")  # fmt: skip
        return cls(write_tokens=write, read_tokens=read, write_identities=identities)

    def _rule(self, method: str) -> str | None:
        """Which credentials ``method`` needs: "read", "write", or None (open)."""
        if not method.startswith(f"/{SERVICE_NAME}/"):
            return None                         # health, reflection: open
        if method in _READ_METHODS:
            return "read" if self._read_tokens is not None else None
        return "write"                          # RecordEvents, Prefetch and any method added later

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:  # fmt: skip
        """Wrap the handler of a guarded method in the credentials check."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        rule = self._rule(method)
        if handler is None or rule is None:
            return handler
        if handler.unary_unary is None:
            # Every Recommender method is unary; a streaming one must get its own guard, never none.
            raise TypeError(f"AuthInterceptor cannot guard streaming method {method}")
        inner: Callable[..., Any] = handler.unary_unary

        async def guarded(request: Any, context: Context) -> Any:
            await self._check(rule, method, context)
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )  # fmt: skip

    async def _check(self, rule: str, method: str, context: Context) -> None:
        code = self._verdict(rule, context)
        if code is None:
            return
        self.rejected[(method.rsplit("/", 1)[-1], code.name)] += 1
        log.debug("refused %s from %s: %s", method, context.peer(), code.name)
        details = "authentication required" if code == grpc.StatusCode.UNAUTHENTICATED else "permission denied"
        await context.abort(code, details)

    def _verdict(self, rule: str, context: Context) -> grpc.StatusCode | None:
        write = self._write_tokens.get() if self._write_tokens is not None else frozenset()
        read = self._read_tokens.get() if self._read_tokens is not None else frozenset()
        token = _bearer(context.invocation_metadata())
        if token and _matches(token, write):
            return None                         # a writer may also read
        if token and rule == "read" and _matches(token, read):
            return None
        if self._write_identities:
            names = self._identities(context)
            if names & self._write_identities:
                return None
            if names and token is None:
                return grpc.StatusCode.PERMISSION_DENIED     # a verified certificate, not allowed to write
        if token and _matches(token, read):
            return grpc.StatusCode.PERMISSION_DENIED         # a read token on a write method
        if rule == "write" and not write and not self._write_identities:
            return None                         # writes are open (only reads are guarded)
        return grpc.StatusCode.UNAUTHENTICATED

    @staticmethod
    def _identities(context: Context) -> frozenset[str]:
        # Present only when the peer's certificate was verified against tls_client_ca (mutual TLS).
        auth = context.auth_context()
        return frozenset(v.decode("utf-8", "replace") for key in _IDENTITY_KEYS for v in auth.get(key, ()))


# ---------------------------------------------------------------------------------------- client side
def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting} {path}: {exc.strerror or exc}") from exc


def channel_credentials(
    *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials for a client channel: ``ca`` (default: the system's roots), ``cert``/``key`` for mTLS."""
    if (cert is None) != (key is None):
        raise ConfigError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=_read("CA", ca) if ca is not None else None,
        private_key=_read("client key", key) if key is not None else None,
        certificate_chain=_read("client certificate", cert) if cert is not None else None,
    )


def read_token(path: Path) -> str:
    """The first token in a token file (what a client sends)."""
    tokens = [line.strip() for line in _read("token file", path).decode("ascii", "replace").splitlines()]
    found = next((t for t in tokens if t), None)
    if found is None:
        raise ConfigError(f"token file {path} holds no token")
    return found


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries ``token`` as a bearer token (empty without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()
