from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from recsvc.bundle import PADDING_SCORE
from recsvc.errors import ConfigError
from recsvc.offline.data import Dataset
from recsvc.offline.models import RankerNet, RetrievalNet
from recsvc.offline.models.export import export_query_encoder, export_ranker
from recsvc.offline.models.train import TrainConfig, Trained, history_matrix, train, write_bundle
from tests.conftest import TINY_CONFIG


def test_history_matrix_left_pads_and_keeps_newest() -> None:
    flat = np.array([5, 6, 7, 8, 9])
    got = history_matrix(flat, np.array([0, 2, 4]), np.array([2, 5, 4]), 3)
    assert got.tolist() == [[-1, 5, 6], [7, 8, 9], [-1, -1, -1]]


def test_padding_does_not_change_query() -> None:
    torch.manual_seed(0)
    net = RetrievalNet(num_items=20, dim=8, history_len=6).eval()
    a = net(torch.tensor([[-1, -1, -1, 3, 4, 5]]))
    # Same items, different padding length is impossible at fixed L; instead check that padding slots
    # are ignored: changing the (masked) padded ids must not move the query.
    b = net(torch.tensor([[-1, -1, -1, 3, 4, 5]]).where(torch.tensor([[False] * 3 + [True] * 3]), torch.tensor(-1)))
    torch.testing.assert_close(a, b)
    empty = net(torch.full((2, 6), -1))
    torch.testing.assert_close(empty, net.empty_query.expand(2, -1))


def test_ranker_scores_padding_low_and_is_per_candidate() -> None:
    torch.manual_seed(0)
    net = RankerNet(RetrievalNet(num_items=20, dim=8, history_len=4), dim=8, hidden=16).eval()
    hist = torch.tensor([[-1, 2, 3, 4]])
    together = net(hist, torch.tensor([[5, 6, -1]]))
    alone = net(hist, torch.tensor([[6]]))
    assert together[0, 2].item() == PADDING_SCORE
    torch.testing.assert_close(together[0, 1], alone[0, 0])      # a candidate's score ignores the others


def test_onnx_exports_equal_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    retrieval = RetrievalNet(num_items=30, dim=8, history_len=5).eval()
    ranker = RankerNet(retrieval, dim=8, hidden=16)
    for p in ranker.parameters():     # move off the zero-residual init so the export is really tested
        torch.nn.init.normal_(p, std=0.1) if p.requires_grad else None
    ranker.eval()
    export_query_encoder(retrieval, tmp_path / "q.onnx")
    export_ranker(ranker, 5, 4, tmp_path / "r.onnx")
    hist = np.array([[-1, -1, 1, 2, 3], [-1, -1, -1, -1, -1], [4, 5, 6, 7, 8]], dtype=np.int64)
    cand = np.array([[9, 10, 11, -1, 12, 13, 14]] * 3, dtype=np.int64)   # C differs from export: dynamic
    q_onnx = ort.InferenceSession(str(tmp_path / "q.onnx")).run(["QUERY"], {"HISTORY": hist})[0]
    s_onnx = ort.InferenceSession(str(tmp_path / "r.onnx")).run(["SCORES"], {"HISTORY": hist, "CANDIDATES": cand})[0]
    with torch.no_grad():
        np.testing.assert_allclose(q_onnx, retrieval(torch.from_numpy(hist)).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s_onnx, ranker(torch.from_numpy(hist), torch.from_numpy(cand)).numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_training_learns_the_synthetic_structure(tiny_dataset: Dataset, tiny_trained: Trained) -> None:
    # The synthetic users shop in few categories: after training, a user's query must score items of
    # the category they browsed most above items of other categories.
    ds = tiny_dataset
    cats = ds.categories[ds.items]
    wins = 0
    users = range(min(100, ds.num_users))
    for u in users:
        mask = ds.users == u
        items = ds.items[mask][-tiny_trained.config.history_len:]
        hist = torch.full((1, tiny_trained.config.history_len), -1, dtype=torch.int64)
        hist[0, -len(items):] = torch.from_numpy(items.astype(np.int64))
        with torch.no_grad():
            scores = (tiny_trained.retrieval(hist) @ tiny_trained.retrieval.item_vectors().T)[0].numpy()
        values, counts = np.unique(cats[mask], return_counts=True)
        favourite = values[np.argmax(counts)]
        in_fav = ds.categories == favourite
        wins += scores[in_fav].mean() > scores[~in_fav].mean()
    assert wins / len(users) > 0.8


def test_untrained_ranker_reproduces_retrieval_order() -> None:
    torch.manual_seed(0)
    retrieval = RetrievalNet(num_items=40, dim=8, history_len=5).eval()
    ranker = RankerNet(retrieval, dim=8, hidden=16).eval()
    hist = torch.tensor([[-1, 3, 4, 5, 6]])
    cand = torch.arange(40).view(1, 40)
    with torch.no_grad():
        expected = retrieval(hist) @ retrieval.item_vectors().T
        torch.testing.assert_close(ranker(hist, cand), expected)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_num_candidates_must_be_a_positive_integer(bad: Any) -> None:
    with pytest.raises(ConfigError, match="num_candidates must be a positive integer"):
        TrainConfig(num_candidates=bad)


def test_num_candidates_may_be_the_whole_catalog_but_no_more(tiny_dataset: Dataset, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"num_candidates \(121\) cannot exceed the catalog's 120 items"):
        train(tiny_dataset, replace(TINY_CONFIG, num_candidates=121), progress=False)
    config = replace(TINY_CONFIG, num_candidates=120, retrieval_epochs=1, ranker_epochs=1)
    manifest = write_bundle(train(tiny_dataset, config, progress=False), tiny_dataset, tmp_path)
    assert manifest.num_candidates == 120
    with np.load(tmp_path / "samples.npz") as samples:
        assert samples["CANDIDATES"].shape[1] == 120


def test_the_blend_learns_from_a_sample_of_validation_users_and_the_bundle_records_its_stage(
    tiny_dataset: Dataset, tmp_path: Path
) -> None:
    from tests.conftest import TINY_BLEND_CONFIG

    trained = train(tiny_dataset, replace(TINY_BLEND_CONFIG, blend_max_users=40, blend_epochs=5), progress=False)
    assert trained.blend is not None and trained.item2item is not None and trained.item2item_method == "ease"
    manifest = write_bundle(trained, tiny_dataset, tmp_path)
    assert {"item2item.npz", "blend.onnx", "item_stats.npy"} <= set(manifest.files)
    assert manifest.extra["sources"]["item2item"]["first"] == TINY_BLEND_CONFIG.i2i_candidates
    for bad in ({"blend_max_users": 0}, {"validation_per_user": -1}, {"validation_fraction": 1.0},
                {"i2i_neighbours": 0}):  # fmt: skip
        with pytest.raises(ConfigError):
            replace(TINY_BLEND_CONFIG, **bad)
