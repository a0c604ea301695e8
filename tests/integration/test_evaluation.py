"""The served pipeline, queried over gRPC for every MovieLens test user, beats popularity."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from recsvc.offline.data import popularity_ranking, recall_at_k
from recsvc.offline.models.evaluate import evaluate_bundle
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

from .conftest import Stack

pytestmark = pytest.mark.integration


def test_served_recall_beats_popularity_and_matches_offline(stack: Stack) -> None:
    train, test = stack.split
    users = sorted(u for u, items in test.items() if len(items))
    with grpc.insecure_channel(stack.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)

        def served(u: int) -> list[str]:
            r = stub.Recommend(pb.RecommendRequest(user_id=str(train.user_ids[u]), k=10), timeout=30)
            assert not r.degraded, r.degraded_reason
            return [i.item_id for i in r.items]

        with ThreadPoolExecutor(8) as pool:
            answers = dict(zip(users, pool.map(served, users), strict=True))

    sku = train.item_ids
    served_recall = np.mean([recall_at_k(answers[u], set(sku[test[u]].tolist()), 10) for u in users])
    popular = popularity_ranking(train)
    pop_recall = []
    for u in users:
        seen = set(train.items[train.users == u].tolist())
        top = [i for i in popular[: 10 + len(seen)].tolist() if i not in seen][:10]
        pop_recall.append(recall_at_k(top, test[u], 10))
    offline = evaluate_bundle(stack.bundle, train, test, k=10)
    print(f"\nMovieLens recall@10 over {len(users)} users: served {served_recall:.4f}, "
          f"popularity {np.mean(pop_recall):.4f}, offline retrieval+ranking {offline.recall['retrieval+ranking']:.4f}")
    assert np.mean(pop_recall) == pytest.approx(offline.recall["popularity"])
    assert served_recall > 1.15 * np.mean(pop_recall)
    # Same bundle, same exclusions: the service must reproduce the offline figure (the store keeps the
    # newest 1000 events per user, so the two users with more can differ slightly).
    assert served_recall == pytest.approx(offline.recall["retrieval+ranking"], abs=0.005)
