"""The classical baselines of `recsvc evaluate`: EASE^R and implicit ALS, on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.errors import ConfigError
from recsvc.offline.data import Dataset
from recsvc.offline.models import baselines
from recsvc.offline.models.baselines import fit_als, fit_ease, interaction_matrix


def two_tastes(users_per_group: int = 40) -> Dataset:
    """Users of group A interact with items 0-4, group B with 5-9; the last user of each group saw one item."""
    rng = np.random.default_rng(3)
    rows: list[tuple[int, int]] = []
    for group, items in ((0, range(0, 5)), (1, range(5, 10))):
        for j in range(users_per_group):
            user = group * users_per_group + j
            chosen = [items[0]] if j == users_per_group - 1 else rng.choice(list(items), size=3, replace=False)
            rows += [(user, int(i)) for i in chosen]
    rows.append((0, 0))                       # a repeat: counted once
    rows.sort()
    users, items = (np.array(c) for c in zip(*rows, strict=True))
    n_users = 2 * users_per_group
    return Dataset(
        name="two-tastes", user_ids=np.array([f"u{u}" for u in range(n_users)], dtype=object),
        item_ids=np.array([f"i{i}" for i in range(10)], dtype=object), titles=np.array([""] * 10, dtype=object),
        categories=np.array([""] * 10, dtype=object), users=users.astype(np.int32), items=items.astype(np.int32),
        timestamps=np.arange(len(rows), dtype=np.int64), event_types=np.ones(len(rows), dtype=np.int8),
    )  # fmt: skip


def test_interaction_matrix_is_binary() -> None:
    x = interaction_matrix(two_tastes())
    assert x.shape == (80, 10) and set(x.data.tolist()) == {1.0} and x[0, 0] == 1.0


@pytest.mark.parametrize("fit", [lambda ds: fit_ease(ds, 10.0),
                                 lambda ds: fit_als(ds, factors=2, seed=1, iterations=30, regularization=0.1)])
def test_a_user_who_saw_one_item_gets_the_items_of_its_taste(fit: object) -> None:
    ds = two_tastes()
    model = fit(ds)  # type: ignore[operator]
    scores = model.scores(np.array([39, 79], dtype=np.int64))     # saw item 0 / item 5 only
    assert scores.shape == (2, 10) and scores.dtype == np.float32
    scores[0, 0] = scores[1, 5] = -np.inf                            # as the evaluation excludes seen items
    top = np.argsort(-scores, axis=1)[:, :4]
    assert set(top[0].tolist()) == {1, 2, 3, 4} and set(top[1].tolist()) == {6, 7, 8, 9}


def test_ease_has_no_self_weight_and_refuses_what_it_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = two_tastes()
    model = fit_ease(ds, 10.0)
    assert (model.name, model.params) == ("EASE^R", "lambda 10")
    assert not np.diag(model.weights).any()                          # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="lambda must be > 0"):
        fit_ease(ds, 0.0)
    monkeypatch.setattr(baselines, "EASE_MAX_ITEMS", 9)
    with pytest.raises(ConfigError, match="dense 10 x 10 inverse; it is offered up to 9 items"):
        fit_ease(ds)


def test_als_is_seeded() -> None:
    ds = two_tastes()
    users = np.arange(80, dtype=np.int64)
    first, again = fit_als(ds, factors=4, seed=5), fit_als(ds, factors=4, seed=5)
    assert np.allclose(first.scores(users), again.scores(users))
    assert first.name == "implicit ALS" and first.params.startswith("4 factors")
