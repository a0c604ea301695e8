"""The classical peers the served pipeline is measured against in `recsvc evaluate`: EASE^R and implicit ALS.

Both learn from the training interactions alone (binary: a user interacted with an item or not, repeats
counted once) and score every item for a user; the evaluation then excludes the user's training items
and takes the top k, exactly as for recsvc's own methods. Popularity lives in recsvc.offline.data.

- EASE^R (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): the item-item weight
  matrix B = I - P / diag(P) with P = (X^T X + lambda I)^-1, zero diagonal; a user's scores are x_u B.
  Closed form, one dense items x items inverse in float64: the Gram matrix and its inverse are alive
  together, about 16 x items^2 bytes (6.4 GB at 20,000 items), so it is refused above ``EASE_MAX_ITEMS``.
- implicit ALS (Hu, Koren, Volinsky, ICDM 2008) through the ``implicit`` library's CPU solver (conjugate
  gradient), confidence 1 + alpha for every interaction; scores are user factors . item factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from recsvc.errors import ConfigError
from recsvc.offline.data import Dataset

__all__ = ["EASE_MAX_ITEMS", "Scorer", "fit_als", "fit_ease", "interaction_matrix"]

EASE_MAX_ITEMS = 20_000


class Scorer(Protocol):
    """A fitted baseline: scores of every item for some training users."""

    @property
    def name(self) -> str:
        """The method's name in reports and manifest metrics."""
        ...

    @property
    def params(self) -> str:
        """How it was fitted, for people."""
        ...

    def scores(self, users: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """[len(users), num_items] scores, higher is better (training items not excluded here)."""
        ...


def interaction_matrix(train: Dataset) -> Any:
    """Users x items CSR matrix of float32 ones (repeats counted once)."""
    from scipy.sparse import csr_matrix

    x = csr_matrix((np.ones(train.num_interactions, dtype=np.float32), (train.users, train.items)),
                   shape=(train.num_users, train.num_items))  # fmt: skip
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


@dataclass(frozen=True)
class _Ease:
    name: str
    params: str
    x: Any                                  # users x items CSR
    weights: npt.NDArray[np.float32]        # items x items, zero diagonal

    def scores(self, users: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        return np.asarray(self.x[users] @ self.weights, dtype=np.float32)


def fit_ease(train: Dataset, lam: float = 300.0) -> Scorer:
    """EASE^R with L2 weight ``lam`` (the paper's lambda; 300 suits MovieLens-sized data)."""
    if lam <= 0:
        raise ConfigError(f"EASE lambda must be > 0, got {lam}")
    if train.num_items > EASE_MAX_ITEMS:
        raise ConfigError(f"EASE^R needs a dense {train.num_items:,} x {train.num_items:,} inverse; it is "
                          f"offered up to {EASE_MAX_ITEMS:,} items")  # fmt: skip
    x = interaction_matrix(train)
    x64 = x.astype(np.float64)
    gram = (x64.T @ x64).toarray()
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    del gram, x64
    p /= -np.diag(p).copy()             # B = -P / diag(P), column by column, in place
    np.fill_diagonal(p, 0.0)
    return _Ease("EASE^R", f"lambda {lam:g}", x, p.astype(np.float32))


@dataclass(frozen=True)
class _Als:
    name: str
    params: str
    users: npt.NDArray[np.float32]
    items: npt.NDArray[np.float32]

    def scores(self, users: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        return np.asarray(self.users[users] @ self.items.T, dtype=np.float32)


def fit_als(
    train: Dataset, *, factors: int = 64, regularization: float = 0.01, alpha: float = 1.0,
    iterations: int = 15, seed: int = 0, threads: int = 0,
) -> Scorer:  # fmt: skip
    """ALS from the ``implicit`` library (its defaults but ``factors``), seeded; ``threads`` 0: all cores."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    # implicit parallelises over users itself; BLAS threads inside each solve only oversubscribe the cores
    # (it warns about them when the model is made).
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha,
                                        iterations=iterations, random_state=seed, num_threads=threads)  # fmt: skip
        model.fit(interaction_matrix(train), show_progress=False)
    params = f"{factors} factors, regularization {regularization:g}, alpha {alpha:g}, {iterations} iterations"
    return _Als("implicit ALS", params, np.asarray(model.user_factors), np.asarray(model.item_factors))
