"""The committed generated code matches the proto, and the proto documents the enforced limits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from recsvc.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "protos", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", "protos/recsvc/v1/recommender.proto"],
        cwd=ROOT, check=True,
    )  # fmt: skip
    for name in ("recommender_pb2.py", "recommender_pb2.pyi", "recommender_pb2_grpc.py"):
        fresh = (tmp_path / "recsvc" / "v1" / name).read_text()
        assert fresh == (ROOT / "recsvc" / "v1" / name).read_text(), f"{name} is stale: run `make protos`"


def test_proto_documents_the_default_limits() -> None:
    text = (ROOT / "protos/recsvc/v1/recommender.proto").read_text()
    s = Settings()
    assert f"1..{s.max_k}" in text
    assert f"at most {s.max_exclude}" in text and f"at most {s.max_context}" in text
    assert f"1..{s.max_id_len} bytes" in text and f"1..{s.max_events_per_call} events" in text


def test_proto_documents_the_id_grammar_and_message_size() -> None:
    text = (ROOT / "protos/recsvc/v1/recommender.proto").read_text()
    s = Settings()
    assert f"at most 4 MiB ({s.max_message_bytes} bytes, RECSVC_MAX_MESSAGE_BYTES)" in text
    assert "no\n// control character" in text and "neither start nor end with whitespace" in text
    assert "x-request-id" in text and "internal error (request id X)" in text


def test_proto_documents_the_default_k_timestamps_and_enum_names() -> None:
    text = (ROOT / "protos/recsvc/v1/recommender.proto").read_text()
    s = Settings()
    assert f"means the default: {s.default_k} (RECSVC_DEFAULT_K). Negative values are INVALID_ARGUMENT" in text
    assert f"(0 or unset: {s.default_k}), got -1" in text
    assert 'RFC 3339 string: "2026-12-04T13:15:00Z"' in text and "google.protobuf.Timestamp" in text
    assert '"EVENT_TYPE_VIEW"' in text and "grpc.reflection.v1 " in text and "protos/README.md" in text
