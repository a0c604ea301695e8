"""A synthetic e-commerce interaction generator with real structure, vectorised for 10^6 users x 10^6 items.

The model, in the order it is generated:

* **Catalog.** ``num_categories`` categories with skewed sizes (weights ``1/(c+1)^0.8``, so ``cat-000``
  is the largest); every category gets at least one item. Item ids are a random permutation over the
  category blocks, so an SKU's number says nothing about its category.
* **Popularity.** Within its category an item's weight is ``1/rank^zipf_alpha`` (rank 1 = the
  category's head). A category's share of traffic follows its size weight.
* **Users.** Each user prefers 1-3 categories (probabilities 0.5/0.3/0.2; drawn by category
  popularity, with replacement, so a user may end up with fewer distinct ones). Activity is
  ``1 + Poisson(lambda)`` events with ``lambda`` lognormal (sigma 1), so the mean is
  ``events_per_user_mean`` (lambda is capped at 50x its mean, which almost never binds); heavy tail.
* **Sessions.** Each event after a user's first starts a new session with probability
  ``1/session_length_mean``. A session picks one of its user's preferred categories uniformly, or with
  probability ``explore_prob`` a category by popularity; all its items come from that category, drawn
  by popularity.
* **Funnel.** A session's first event is a view; later ones are view/cart/purchase with probabilities
  0.85/0.10/0.05. (Carts and purchases do not re-use items viewed earlier: kept simple and vectorised.)
* **Time.** A user's session starts are spread uniformly over the 30 days after ``SYNTHETIC_EPOCH``,
  at least ``SESSION_GAP_S`` apart; events inside a session are 1 s to 20 min apart. So "a new
  session starts after 30 idle minutes" recovers the sessions exactly, and timestamps strictly
  increase per user.

Everything is a handful of whole-array numpy operations (``repeat``, ``cumsum``, ``searchsorted``);
the only Python loops format the id and title strings, which the Dataset stores as Python ``str``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from recsvc.domain import EventType
from recsvc.errors import InvalidArgument
from recsvc.offline.data._dataset import Dataset

__all__ = ["SESSION_GAP_S", "SYNTHETIC_EPOCH", "generate_synthetic"]

SYNTHETIC_EPOCH = 1_700_000_000   # 2023-11-14T22:13:20Z: fixed, so a seed fully determines the output
SESSION_GAP_S = 1800              # the usual analytics session timeout: 30 minutes of inactivity
_WINDOW_S = 30 * 86_400           # a user's sessions spread over about this long
_IN_SESSION_GAP_MEAN_S = 60.0
_IN_SESSION_GAP_MAX_S = 1200      # < SESSION_GAP_S, so sessions stay separable by the timeout
_CATEGORY_ALPHA = 0.8             # skew of category sizes and traffic
_PREFS_P = (0.5, 0.3, 0.2)        # P(user prefers 1, 2, 3 categories)
_CART_P = 0.10
_PURCHASE_P = 0.05
_ACTIVITY_SIGMA = 1.0
_ACTIVITY_CAP = 50.0              # lambda <= cap * mean: bounds the largest user (and memory)


def generate_synthetic(
    num_users: int,
    num_items: int,
    *,
    num_categories: int | None = None,
    events_per_user_mean: float = 20.0,
    zipf_alpha: float = 1.0,
    session_length_mean: float = 4.0,
    explore_prob: float = 0.1,
    seed: int | np.random.Generator,
) -> Dataset:
    """Generate a synthetic e-commerce Dataset; the same arguments and integer seed give the same data.

    ``num_categories`` defaults to ``round(sqrt(num_items))`` clamped to [1, 1000]. Ids look like
    ``U-0000042`` / ``SKU-0000123``, categories ``cat-007``, titles ``"cat-007 item 123"``. See the
    module docstring for the generative model. Expect about ``num_users * events_per_user_mean``
    interactions; 10^6 users x 10^6 items at the default mean (2x10^7 events) takes about 10 s and
    under 1 GB peak on two cores.
    """
    _require(num_users >= 1, "num_users", f"must be >= 1, got {num_users}")
    _require(num_items >= 1, "num_items", f"must be >= 1, got {num_items}")
    if num_categories is None:
        num_categories = int(min(1000, max(1, round(num_items**0.5))))
    _require(
        1 <= num_categories <= num_items,
        "num_categories",
        f"must be in [1, num_items={num_items}], got {num_categories}",
    )
    _require(events_per_user_mean >= 1, "events_per_user_mean", f"must be >= 1, got {events_per_user_mean}")
    _require(zipf_alpha >= 0, "zipf_alpha", f"must be >= 0, got {zipf_alpha}")
    _require(session_length_mean >= 1, "session_length_mean", f"must be >= 1, got {session_length_mean}")
    _require(0 <= explore_prob <= 1, "explore_prob", f"must be in [0, 1], got {explore_prob}")
    rng = np.random.default_rng(seed)
    n_cat = num_categories

    # --- catalog: category blocks of "slots", Zipf weights inside each block ---
    cat_p = 1.0 / np.arange(1, n_cat + 1, dtype=np.float64) ** _CATEGORY_ALPHA
    cat_p /= cat_p.sum()
    cat_cdf = np.cumsum(cat_p)
    cat_cdf[-1] = 1.0
    sizes = 1 + rng.multinomial(num_items - n_cat, cat_p)
    block_start = np.cumsum(sizes) - sizes
    slot_cat = np.repeat(np.arange(n_cat, dtype=np.int32), sizes)
    rank = np.arange(num_items, dtype=np.float64) - block_start[slot_cat] + 1.0
    weight = rank**-zipf_alpha
    weight /= np.bincount(slot_cat, weights=weight, minlength=n_cat)[slot_cat]
    # Cumulative weights where category c occupies exactly [c, c+1]: a draw "c + U[0,1)" then lands in
    # category c's block by construction. Pinning block ends to c+1 and clamping removes float drift
    # (min/max with non-decreasing steps keeps the array sorted, which searchsorted needs).
    cum = np.cumsum(weight)
    del weight, rank
    cum[np.cumsum(sizes) - 1] = np.arange(1, n_cat + 1, dtype=np.float64)
    np.minimum(cum, slot_cat + 1.0, out=cum)
    np.maximum(cum, slot_cat.astype(np.float64), out=cum)
    slot_item = rng.permutation(num_items).astype(np.int32)
    item_cat = np.empty(num_items, dtype=np.int32)
    item_cat[slot_item] = slot_cat
    del slot_cat

    # --- users: preferred categories and activity ---
    num_prefs = 1 + rng.choice(len(_PREFS_P), size=num_users, p=_PREFS_P)
    prefs = _draw_categories(rng, cat_cdf, (num_users, len(_PREFS_P)))
    lam_mean = events_per_user_mean - 1.0
    if lam_mean > 0:
        mu = np.log(lam_mean) - _ACTIVITY_SIGMA**2 / 2
        lam = np.minimum(rng.lognormal(mu, _ACTIVITY_SIGMA, num_users), _ACTIVITY_CAP * lam_mean)
        counts = 1 + rng.poisson(lam)
        del lam
    else:
        counts = np.ones(num_users, dtype=np.int64)
    num_events = int(counts.sum())
    users = np.repeat(np.arange(num_users, dtype=np.int32), counts)
    user_first = np.cumsum(counts) - counts

    # --- sessions: a start flag per event; session s of the whole data set ---
    starts = rng.random(num_events, dtype=np.float32) < np.float32(1.0 / session_length_mean)
    starts[user_first] = True
    session_of_event = (np.cumsum(starts, dtype=np.int64) - 1).astype(np.int32)
    session_user = users[starts]
    num_sessions = len(session_user)
    pick = (rng.random(num_sessions) * num_prefs[session_user]).astype(np.int64)
    session_cat = prefs[session_user, pick]
    explore = rng.random(num_sessions) < explore_prob
    session_cat[explore] = _draw_categories(rng, cat_cdf, (int(explore.sum()),))
    del pick, explore, prefs

    # --- items: inverse-CDF draw inside the session's category ---
    event_cat = session_cat[session_of_event]
    del session_of_event
    slots = np.searchsorted(cum, event_cat + rng.random(num_events), side="right")
    del event_cat
    items = slot_item[slots]
    del slots

    # --- funnel ---
    r = rng.random(num_events, dtype=np.float32)
    event_types = (
        int(EventType.VIEW)
        + (r < np.float32(_CART_P + _PURCHASE_P)).astype(np.int8)
        + (r < np.float32(_PURCHASE_P)).astype(np.int8)
    ).astype(np.int8)
    del r
    event_types[starts] = EventType.VIEW

    # --- time: per-user cumulative sums of positive gaps, so timestamps strictly increase ---
    in_session = rng.standard_exponential(num_events, dtype=np.float32) * np.float32(_IN_SESSION_GAP_MEAN_S)
    gaps = np.minimum(1 + in_session.astype(np.int64), _IN_SESSION_GAP_MAX_S)
    del in_session
    # Session starts as sorted uniform points over the window (normalised exponential spacings: the
    # order statistics of s uniforms, no sort needed), each gap padded to at least SESSION_GAP_S.
    sessions_per_user = np.bincount(session_user, minlength=num_users)
    spacing = rng.standard_exponential(num_sessions)
    after_last = rng.standard_exponential(num_users)  # the spacing between a user's last session and the end
    total = np.bincount(session_user, weights=spacing, minlength=num_users) + after_last
    usable = np.maximum(_WINDOW_S - sessions_per_user * SESSION_GAP_S, 0) / total
    gaps[starts] = SESSION_GAP_S + (spacing * usable[session_user]).astype(np.int64)
    del spacing, after_last, usable, total, starts, session_user
    timestamps = np.cumsum(gaps)
    offsets = timestamps[user_first] - gaps[user_first] - SYNTHETIC_EPOCH
    del gaps
    timestamps -= np.repeat(offsets, counts)

    return Dataset(
        name="synthetic",
        user_ids=_ids("U-", num_users),
        item_ids=_ids("SKU-", num_items),
        titles=_titles(item_cat, n_cat),
        categories=_category_names(n_cat)[item_cat],
        users=users,
        items=items,
        timestamps=timestamps,
        event_types=event_types,
    )


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidArgument(field, message)


def _draw_categories(
    rng: np.random.Generator, cat_cdf: npt.NDArray[np.float64], shape: tuple[int, ...]
) -> npt.NDArray[np.int32]:
    """Categories drawn by popularity (inverse CDF), as int32 of the given shape."""
    idx = np.searchsorted(cat_cdf, rng.random(shape), side="right")
    return np.minimum(idx, len(cat_cdf) - 1).astype(np.int32)


def _width(n: int, minimum: int) -> int:
    return max(minimum, len(str(n - 1)))


def _ids(prefix: str, n: int) -> npt.NDArray[np.object_]:
    width = _width(n, 7)
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)


def _category_names(n_cat: int) -> npt.NDArray[np.object_]:
    width = _width(n_cat, 3)
    return np.array([f"cat-{c:0{width}d}" for c in range(n_cat)], dtype=object)


def _titles(item_cat: npt.NDArray[np.int32], n_cat: int) -> npt.NDArray[np.object_]:
    names = _category_names(n_cat).tolist()
    return np.array(
        [f"{names[c]} item {i}" for i, c in enumerate(item_cat.tolist())], dtype=object
    )
