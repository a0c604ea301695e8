"""Real certificates for TLS tests, made with the openssl CLI: a CA and leaf certificates it signs.

    ca = TestCA.create(tmp_path / "ca")
    server = ca.issue("server", dns=["localhost"], ips=["127.0.0.1"])   # -> Issued(cert, key)
    client = ca.issue("writer-1")                                       # CN=writer-1, usable as a client

Keys are P-256 (fast to make); every leaf is good for both server and client authentication.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Issued", "TestCA"]


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key on disk."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class TestCA:
    """A self-signed CA in ``dir`` that issues leaf certificates."""

    __test__ = False  # not a pytest class

    dir: Path
    cert: Path
    key: Path

    @classmethod
    def create(cls, dir: Path, name: str = "recsvc test CA") -> TestCA:
        dir.mkdir(parents=True, exist_ok=True)
        cert, key = dir / "ca.crt", dir / "ca.key"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", key, "-out", cert, "-subj", f"/CN={name}", "-days", "3",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
        return cls(dir, cert, key)

    def issue(
        self, name: str, *, dns: Sequence[str] = (), ips: Sequence[str] = (), out: Path | None = None
    ) -> Issued:
        """A leaf certificate with CN ``name`` and the given SANs, signed by this CA."""
        out = out or self.dir / name
        out.mkdir(parents=True, exist_ok=True)
        cert, key, csr, ext = out / "tls.crt", out / "tls.key", out / "tls.csr", out / "ext.cnf"
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", key, "-out", csr, "-subj", f"/CN={name}")  # fmt: skip
        sans = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        lines = ["basicConstraints=CA:FALSE", "extendedKeyUsage=serverAuth,clientAuth"]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key, "-CAcreateserial",
                 "-out", cert, "-days", "2", "-extfile", ext)  # fmt: skip
        return Issued(cert, key)
