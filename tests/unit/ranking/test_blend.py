"""The blend stage's batch functions against plain per-row references, and the blend model file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsvc.errors import BundleError
from recsvc.ranking.blend import FEATURES, Blender, _ranks, features, merge

Case = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int, int]     # ann, i2i, n, i2i_first


def _lists(draw: st.DrawFn, rows: int, width: int, items: int) -> npt.NDArray[np.int64]:
    """[rows, width] unique ids per row, left-packed, -1 padded (what each source returns)."""
    out = np.full((rows, width), -1, dtype=np.int64)
    for r in range(rows):
        ids = draw(st.lists(st.integers(0, items - 1), max_size=width, unique=True))
        out[r, : len(ids)] = ids
    return out


@st.composite
def sources(draw: st.DrawFn) -> Case:
    rows, width = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    items = draw(st.integers(1, 20))
    return _lists(draw, rows, width, items), _lists(draw, rows, width, items), width, draw(st.integers(0, width))


@settings(max_examples=200, deadline=None)
@given(sources())
def test_merge_and_ranks_match_a_per_row_reference(case: Case) -> None:
    ann, i2i, n, first = case
    merged = merge(ann, i2i, n, first)
    ranks = _ranks(merged, i2i)
    for row in range(len(ann)):
        order = [*i2i[row, :first], *ann[row], *i2i[row, first:]]
        expected = list(dict.fromkeys(i for i in order if i >= 0))[:n]
        assert merged[row].tolist() == expected + [-1] * (n - len(expected))
        where = {int(i): p for p, i in enumerate(i2i[row]) if i >= 0}
        assert ranks[row].tolist() == [where.get(int(c), n) if c >= 0 else n for c in merged[row]]


def test_features_standardise_within_the_users_candidates_and_zero_padding() -> None:
    cand = np.array([[4, 2, 7, -1]])
    ann = np.array([[2, 4, -1, -1]])
    i2i = np.array([[7, 4, -1, -1]])
    i2i_scores = np.array([[2.0, 0.0, 4.0, 0.0]], dtype=np.float32)
    ranker = np.array([[1.0, 2.0, 3.0, 99.0]], dtype=np.float32)
    stats = np.arange(3 * 10, dtype=np.float32).reshape(3, 10)
    f = features(cand, ann, i2i, i2i_scores, i2i_scores, ranker, stats, np.array([5]))
    assert f.shape == (1, 4, len(FEATURES)) and (f[0, 3] == 0).all()
    col = {name: f[0, :3, i] for i, name in enumerate(FEATURES)}
    np.testing.assert_allclose(col["i2i_z"], [0, -1.2247, 1.2247], atol=1e-3)
    np.testing.assert_allclose(col["ranker"], [1, 2, 3])
    np.testing.assert_allclose(col["log_i2i_rank"], np.log1p([1, 4, 0]))      # 2 is not in the i2i list
    np.testing.assert_allclose(col["log_ann_rank"], np.log1p([1, 0, 4]))
    np.testing.assert_allclose(col["log_popularity"], [4, 2, 7])
    np.testing.assert_allclose(col["log_age_days"], [24, 22, 27])
    np.testing.assert_allclose(col["log_history"], np.log1p(5))
    # Items added after training are looked up by their proxy's model id.
    g = features(cand, ann, i2i, i2i_scores, i2i_scores, ranker, stats, np.array([5]), np.array([[4, 2, 1, -1]]))
    assert g[0, 2, FEATURES.index("log_popularity")] == 1


def test_a_file_that_is_not_a_blend_model_is_a_bundle_error(tmp_path: Path, tiny_blend_bundle: Path) -> None:
    good = Blender(tiny_blend_bundle / "blend.onnx")
    assert good.score_sync(np.zeros((2, 3, len(FEATURES)), np.float32)).shape == (2, 3)
    (tmp_path / "blend.onnx").write_bytes(b"garbage")
    with pytest.raises(BundleError, match=r"blend\.onnx"):
        Blender(tmp_path / "blend.onnx")
    # The ranker is an ONNX file too, but with other tensors.
    with pytest.raises(BundleError, match=r"ranker\.onnx"):
        Blender(tiny_blend_bundle / "ranker.onnx")
