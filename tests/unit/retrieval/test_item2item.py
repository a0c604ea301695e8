"""The item-to-item source: sparse lookups against a dense reference, filtering, files and the builders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.errors import BundleError
from recsvc.offline.data import Dataset
from recsvc.offline.models.baselines import fit_ease, interaction_matrix
from recsvc.offline.models.item2item import build_item2item
from recsvc.retrieval.item2item import ItemToItem


def _random_lists(n: int = 30, seed: int = 0) -> ItemToItem:
    rng = np.random.default_rng(seed)
    dense = rng.random((n, n)).astype(np.float32) * (rng.random((n, n)) < 0.2)
    np.fill_diagonal(dense, 0)
    return ItemToItem(sp.csr_matrix(dense), recent=3)


def test_scores_are_the_sum_of_the_users_items_rows() -> None:
    i2i = _random_lists()
    dense = i2i.weights.toarray()
    seen = [np.array([1, 4, 7, 4]), np.array([], dtype=np.int64), np.array([2, 99, -1])]   # repeat, empty, unknown
    recent = [np.array([9, 1, 4, 7]), np.array([], dtype=np.int64), np.array([2])]
    full, newest = i2i.scores(seen, recent)
    np.testing.assert_allclose(full.toarray()[0], dense[[1, 4, 7]].sum(0), rtol=1e-6)
    np.testing.assert_allclose(full.toarray()[1], 0)
    np.testing.assert_allclose(full.toarray()[2], dense[2], rtol=1e-6)
    np.testing.assert_allclose(newest.toarray()[0], dense[[1, 4, 7]].sum(0), rtol=1e-6)  # the newest 3


def test_top_excludes_filters_orders_and_pads() -> None:
    i2i = _random_lists()
    full, _ = i2i.scores([np.array([1, 4, 7])], [np.array([7])])
    row = full.toarray()[0]
    allowed = np.ones(30, dtype=bool)
    allowed[np.argmax(row)] = False                          # the best item is denied
    excluded = np.sort(np.argsort(-row)[1:3])                # the next two are excluded for the user
    top = ItemToItem.top(full, [excluded], allowed, 40)[0]
    expected = [i for i in np.argsort(-row, kind="stable") if row[i] > 0 and allowed[i] and i not in excluded]
    got = top[top >= 0]
    assert got.tolist() == expected
    assert (top[len(got):] == -1).all()
    gathered = ItemToItem.gather(full, np.array([[got[0], -1, 29]]))[0]
    assert gathered[0] == pytest.approx(row[got[0]]) and gathered[1] == 0 and gathered[2] == pytest.approx(row[29])


def test_files_round_trip_and_damage_is_a_bundle_error(tmp_path: Path) -> None:
    i2i = _random_lists()
    i2i.save(tmp_path / "i2i.npz")
    back = ItemToItem.load(tmp_path / "i2i.npz")
    assert back.recent == 3 and (back.weights != i2i.weights).nnz == 0
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(BundleError, match=r"bad\.npz"):
        ItemToItem.load(tmp_path / "bad.npz")
    w = i2i.weights
    np.savez(tmp_path / "oob.npz", indptr=w.indptr, indices=w.indices + 100, data=w.data, recent=np.int64(3))
    with pytest.raises(BundleError, match=r"oob\.npz"):
        ItemToItem.load(tmp_path / "oob.npz")


def test_ease_lists_are_eases_strongest_weights(tiny_dataset: Dataset) -> None:
    i2i, method = build_item2item(tiny_dataset, method="ease", neighbours=5)
    assert method == "ease"
    dense = fit_ease(tiny_dataset).weights      # type: ignore[attr-defined]
    for item in (0, 17, 63):
        lo, hi = i2i.weights.indptr[item], i2i.weights.indptr[item + 1]
        expected = set(np.argsort(-dense[item])[:5].tolist())
        assert set(i2i.weights.indices[lo:hi].tolist()) == expected
        np.testing.assert_allclose(np.sort(i2i.weights.data[lo:hi]), np.sort(dense[item][list(expected)]), rtol=1e-5)


def test_cooccurrence_lists_are_cosine_neighbours_in_any_block_size(tiny_dataset: Dataset) -> None:
    x = interaction_matrix(tiny_dataset).toarray()
    co = x.T @ x
    counts = np.diag(co).copy()
    np.fill_diagonal(co, 0)
    cosine = co / np.sqrt(np.outer(counts, counts).clip(min=1))
    small, method = build_item2item(tiny_dataset, method="cooccurrence", neighbours=4, block_rows=7)
    whole, _ = build_item2item(tiny_dataset, method="cooccurrence", neighbours=4)
    assert method == "cooccurrence" and (small.weights != whole.weights).nnz == 0
    for item in range(0, tiny_dataset.num_items, 11):
        lo, hi = small.weights.indptr[item], small.weights.indptr[item + 1]
        got = np.sort(small.weights.data[lo:hi])[::-1]
        np.testing.assert_allclose(got, np.sort(cosine[item][cosine[item] > 0])[::-1][:4], rtol=1e-5)
        assert item not in small.weights.indices[lo:hi]


def test_gather_reads_unsorted_rows_like_a_dense_lookup() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        dense = (rng.random((4, 50)) * (rng.random((4, 50)) < 0.3)).astype(np.float32)
        m = sp.csr_matrix(dense)
        for row in range(4):                    # scramble each row's order, as a sparse product leaves it
            lo, hi = m.indptr[row], m.indptr[row + 1]
            perm = lo + rng.permutation(hi - lo)
            m.indices[lo:hi], m.data[lo:hi] = m.indices[perm].copy(), m.data[perm].copy()
        m.has_sorted_indices = False
        candidates = np.stack([rng.choice(np.arange(-1, 60), 12, replace=False) for _ in range(4)])
        got = ItemToItem.gather(m, candidates)
        inside = (candidates >= 0) & (candidates < 50)
        expected = np.where(inside, dense[np.arange(4)[:, None], candidates.clip(0, 49)], 0)
        np.testing.assert_array_equal(got, expected)
