"""The whole service over a real channel: real Triton, real server process, real FAISS and SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recsvc.bundle import read_manifest
from recsvc.offline.data import generate_synthetic, time_split
from recsvc.offline.models.blend import source_candidates
from recsvc.offline.models.train import TrainConfig, train, write_bundle
from recsvc.ranking.blend import Blender, i2i_first, load_item_stats
from recsvc.retrieval.item2item import ItemToItem
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

from .conftest import Stack, running_stack, start_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.RecommenderStub:
    return pb_grpc.RecommenderStub(channel)


def recommend(stub: pb_grpc.RecommenderStub, user: str, k: int = 10, **kw: list[str]) -> pb.RecommendResponse:
    return stub.Recommend(pb.RecommendRequest(user_id=user, k=k, **kw), timeout=10)


def view(user: str, item: str) -> pb.Event:
    return pb.Event(user_id=user, item_id=item, type=pb.EVENT_TYPE_VIEW)


@pytest.mark.parametrize("service", ["", "recsvc.v1.Recommender"])
def test_health_is_serving(channel: grpc.Channel, service: str) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_api(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [reply] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"recsvc.v1.Recommender", "grpc.health.v1.Health"} <= names


def test_known_user_gets_k_ranked_unseen_items(stack: Stack, stub: pb_grpc.RecommenderStub) -> None:
    tr = stack.split.train
    user = 16                                        # MovieLens user "17": 358 training ratings
    seen = set(tr.item_ids[tr.items[tr.users == user]].tolist())
    assert tr.user_ids[user] == "17" and len(seen) < 1000     # all of them within the kept history
    r = recommend(stub, str(tr.user_ids[user]), 10)
    ids = [i.item_id for i in r.items]
    assert len(ids) == 10 and len(set(ids)) == 10
    assert not set(ids) & seen
    assert all(stack.catalog.title(i) for i in ids)              # real movies with titles
    scores = [i.score for i in r.items]
    assert scores == sorted(scores, reverse=True)
    assert (r.model_version, r.degraded, r.degraded_reason) == ("1", False, "")
    assert len(r.index_version) == 12


def test_unknown_user_gets_k_items(stub: pb_grpc.RecommenderStub) -> None:
    r = recommend(stub, "never-seen-before", 7)
    assert len(r.items) == 7 and not r.degraded


def test_context_and_exclusions_are_honoured(stack: Stack, stub: pb_grpc.RecommenderStub) -> None:
    first = [i.item_id for i in recommend(stub, "ctx-user", 10).items]
    excluded = first[:5]
    context = ["1", "2355"]                           # Toy Story, A Bug's Life: on screen
    r = recommend(stub, "ctx-user", 10, exclude_item_ids=[*excluded, "not-a-sku"], context_item_ids=context)
    ids = [i.item_id for i in r.items]
    assert len(ids) == 10 and not set(ids) & set(excluded + context)
    assert ids != first[5:15]                         # the context moved the answer, not just the filter


def offline_top_k(stack: Stack, history_skus: list[str], k: int) -> list[str]:
    """The bundle's own files run in-process on a history: the oracle for what the server must say.

    The served path of a blend bundle: ANN and item-to-item candidates merged, ranked, then blended.
    """
    bundle = stack.bundle
    manifest = read_manifest(bundle)
    ids = stack.catalog.dense(history_skus)
    hist = np.full((1, manifest.history_len), -1, dtype=np.int64)
    hist[0, -len(ids) :] = ids
    query = ort.InferenceSession(str(bundle / "query_encoder.onnx")).run(None, {"HISTORY": hist})[0]
    i2i = ItemToItem.load(bundle / "item2item.npz")
    first = i2i_first(manifest)
    sources = source_candidates([np.array(ids, dtype=np.int64)], query, np.load(bundle / "item_embeddings.npy"),
                                i2i, manifest.num_candidates, first)  # fmt: skip
    ranked = ort.InferenceSession(str(bundle / "ranker.onnx")).run(
        None, {"HISTORY": hist, "CANDIDATES": sources.candidates})[0]
    stats = load_item_stats(bundle / "item_stats.npy", i2i.num_items)
    blended = Blender(bundle / "blend.onnx").score_sync(sources.features(ranked, stats))[0]
    order = np.argsort(-np.where(sources.candidates[0] >= 0, blended, -np.inf), kind="stable")[:k]
    return [stack.catalog.sku(int(i)) for i in sources.candidates[0][order]]


def test_events_change_later_recommendations(stack: Stack, stub: pb_grpc.RecommenderStub) -> None:
    user = "e2e-new-user"
    before = [i.item_id for i in recommend(stub, user, 10).items]
    watched = ["1", "364", "588", "595", "2355"]      # Toy Story, Lion King, Aladdin, Beauty and the Beast, Bug's Life
    reply = stub.RecordEvents(pb.RecordEventsRequest(events=[view(user, s) for s in watched]), timeout=10)
    assert reply.accepted == 5
    after = [i.item_id for i in recommend(stub, user, 10).items]
    assert after != before
    assert not set(after) & set(watched)              # what was just watched is not recommended
    assert after == offline_top_k(stack, watched, 10)  # exactly what the models say for that history


def test_invalid_event_batch_stores_nothing(stack: Stack, stub: pb_grpc.RecommenderStub) -> None:
    user = "atomic-batch-user"
    top = recommend(stub, user, 1).items[0].item_id
    bad = pb.RecordEventsRequest(events=[view(user, top), pb.Event(user_id=user, item_id="x")])
    with pytest.raises(grpc.RpcError) as info:
        stub.RecordEvents(bad, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("events[1].type:")
    # The valid first event was not stored: the item is still recommended (it would be excluded if seen).
    assert recommend(stub, user, 1).items[0].item_id == top


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"user_id": "", "k": 5}, "user_id"),
        ({"user_id": "u", "k": -1}, "k"),
        ({"user_id": "u", "k": 101}, "k"),
        ({"user_id": "u", "k": 5, "exclude_item_ids": [f"s{i}" for i in range(501)]}, "exclude_item_ids"),
        ({"user_id": "u" * 129, "k": 5}, "user_id"),
        ({"user_id": "u", "k": 5, "exclude_item_ids": ["x" * 129]}, "exclude_item_ids[0]"),
        ({"user_id": "u", "k": 5, "context_item_ids": ["c"] * 51}, "context_item_ids"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    stub: pb_grpc.RecommenderStub, request_kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(pb.RecommendRequest(**request_kwargs), timeout=10)  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}: ")


def test_server_keeps_serving_after_bad_requests(stub: pb_grpc.RecommenderStub) -> None:
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            stub.Recommend(pb.RecommendRequest(user_id="", k=1), timeout=10)
    assert len(recommend(stub, "still-fine", 3).items) == 3


def test_sigterm_drains_and_exits_cleanly(stack: Stack) -> None:
    # A second server process on the same store and Triton: it must serve, then stop on SIGTERM with
    # status 0 within the grace period (what Kubernetes does on every rollout).
    server, target = start_server(stack.env, stack.tmp, name="second-server")
    try:
        with grpc.insecure_channel(target) as ch:
            r = pb_grpc.RecommenderStub(ch).Recommend(pb.RecommendRequest(user_id="17", k=3), timeout=10)
            assert len(r.items) == 3 and not r.degraded
    finally:
        status = server.stop(timeout=15)
    assert status == 0, server.tail()
    assert "shutting down" in server.tail()


def test_a_bundle_trained_for_200_candidates_serves_200_ranked_items(tmp_path: Path) -> None:
    # Tiny and fast (a second or two of training), with more items than candidates.
    split = time_split(generate_synthetic(200, 250, num_categories=6, seed=7))
    config = TrainConfig(dim=16, history_len=10, num_candidates=200, retrieval_epochs=2, ranker_epochs=1,
                         batch_size=128, lr=1e-2, ranker_dim=8, ranker_negatives=7, seed=0)  # fmt: skip
    bundle = tmp_path / "bundle"
    write_bundle(train(split.train, config, progress=False), split.train, bundle)
    assert read_manifest(bundle).num_candidates == 200
    tr = split.train
    user = int(np.bincount(tr.users).argmin())           # the fewest seen items: 200 unseen are left
    seen = set(tr.item_ids[tr.items[tr.users == user]].tolist())
    assert len(seen) <= 250 - 200
    # RECSVC_NUM_CANDIDATES unset: the service retrieves and ranks the bundle's 200 (Triton, CPU python
    # backend, warm-up shaped for 200); max_k lets one answer show all of them.
    with running_stack(tmp_path, split, bundle, RECSVC_MAX_K="200") as stack, \
            grpc.insecure_channel(stack.target) as channel:  # fmt: skip
        r = recommend(pb_grpc.RecommenderStub(channel), str(tr.user_ids[user]), 200)
        stack.server.check_alive()
    ids = [i.item_id for i in r.items]
    assert (r.model_version, r.degraded, r.degraded_reason) == ("1", False, ""), r.degraded_reason
    assert len(ids) == 200 and len(set(ids)) == 200 and not set(ids) & seen
    scores = [i.score for i in r.items]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
