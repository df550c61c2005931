"""Tests for recvae.evaluation: each metric against a brute-force twin, properties, hand cases."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from numpy.typing import NDArray

from recvae.evaluation import (
    EvaluationResult,
    Ranker,
    catalog_coverage_at_k,
    evaluate,
    gini_index,
    hit_rate_at_k,
    mask_history,
    mean_popularity_rank,
    mrr_at_k,
    ndcg_at_k,
    paper_metrics,
    precision_at_k,
    recall_at_k,
    topk_indices,
)

# ---------------------------------------------------------------------------------------------
# Brute-force references: a Python loop per user with a full stable sort.


def ref_top_k(row_scores: NDArray[np.float64], k: int) -> list[int]:
    """Top-k items of one user: score descending, then item index ascending, -inf dropped."""
    order = sorted(range(len(row_scores)), key=lambda item: (-row_scores[item], item))
    return [item for item in order[:k] if row_scores[item] != -math.inf]


def ref_metric(name: str, row_scores: NDArray[np.float64], row_targets: set[int], k: int) -> float:
    n_targets = len(row_targets)
    if n_targets == 0:
        return math.nan
    top = ref_top_k(row_scores, k)
    rel = [1 if item in row_targets else 0 for item in top]
    hits = sum(rel)
    if name == "recall":
        return hits / min(k, n_targets)
    if name == "recall_plain":
        return hits / n_targets
    if name == "precision":
        return hits / k
    if name == "hit_rate":
        return 1.0 if hits else 0.0
    if name == "mrr":
        for rank, r in enumerate(rel, start=1):
            if r:
                return 1.0 / rank
        return 0.0
    if name == "ndcg":
        dcg = sum(r / math.log2(rank + 1) for rank, r in enumerate(rel, start=1))
        idcg = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, n_targets) + 1))
        return dcg / idcg
    raise AssertionError(name)


def ref_metric_matrix(
    name: str, scores: NDArray[np.float64], targets: sp.csr_array, k: int
) -> NDArray[np.float64]:
    dense = targets.toarray()
    return np.array(
        [
            ref_metric(name, scores[user], set(np.flatnonzero(dense[user]).tolist()), k)
            for user in range(scores.shape[0])
        ]
    )


MetricFn = Callable[[Any, Any, int], NDArray[np.float64]]

METRICS: dict[str, MetricFn] = {
    "recall": recall_at_k,
    "recall_plain": lambda s, t, k: recall_at_k(s, t, k, normalized=False),
    "ndcg": ndcg_at_k,
    "hit_rate": hit_rate_at_k,
    "mrr": mrr_at_k,
    "precision": precision_at_k,
}


def random_case(
    rng: np.random.Generator,
    n_users: int,
    n_items: int,
    *,
    integer_scores: bool = True,
    inf_fraction: float = 0.2,
) -> tuple[NDArray[np.float64], sp.csr_array]:
    """Scores with ties and -inf entries; targets with empty users and users with many targets."""
    if integer_scores:
        scores = rng.integers(0, 5, size=(n_users, n_items)).astype(np.float64)
    else:
        scores = rng.standard_normal((n_users, n_items))
    scores[rng.random((n_users, n_items)) < inf_fraction] = -np.inf
    # Per-user target density from 0 (no targets) to 0.9 (more targets than k).
    density = rng.choice([0.0, 0.05, 0.3, 0.9], size=(n_users, 1))
    targets = sp.csr_array((rng.random((n_users, n_items)) < density).astype(np.float32))
    return scores, targets


SHAPES = [(1, 1), (3, 2), (5, 8), (13, 40), (64, 300)]
KS = [1, 3, 10, 50]


# ---------------------------------------------------------------------------------------------
# Per-user metrics against the reference


@pytest.mark.parametrize("name", list(METRICS))
@pytest.mark.parametrize("shape", SHAPES)
def test_metric_matches_brute_force(name: str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng([list(METRICS).index(name), *shape])
    for integer_scores in (True, False):
        scores, targets = random_case(rng, *shape, integer_scores=integer_scores)
        for k in KS:
            expected = ref_metric_matrix(name, scores, targets, k)
            got = METRICS[name](scores, targets, k)
            assert got.dtype == np.float64
            assert got.shape == (shape[0],)
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("name", list(METRICS))
def test_metric_accepts_torch_and_dense_targets(name: str, rng: np.random.Generator) -> None:
    scores, targets = random_case(rng, 20, 30)
    expected = METRICS[name](scores, targets, 5)
    dense = torch.as_tensor(targets.toarray() > 0)
    for scores_in in (torch.as_tensor(scores), torch.as_tensor(scores, dtype=torch.float32)):
        for targets_in in (targets, dense, dense.numpy()):
            got = METRICS[name](scores_in, targets_in, 5)
            np.testing.assert_allclose(got, expected, equal_nan=True)


def test_topk_indices_matches_brute_force_with_boundary_ties(rng: np.random.Generator) -> None:
    # Few distinct values: nearly every row has a tie straddling the k-th position.
    scores = rng.integers(0, 4, size=(50, 1000)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    for k in (1, 10, 300):
        got = topk_indices(scores, k).numpy()
        for user in range(scores.shape[0]):
            expected = ref_top_k(scores[user].astype(np.float64), k)
            expected += [-1] * (k - len(expected))
            assert got[user].tolist() == expected


def test_topk_indices_hand_cases() -> None:
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [0.0, -math.inf, 3.0, -math.inf, -math.inf]])
    assert topk_indices(scores, 2).tolist() == [[1, 2], [2, 0]]
    # Excluded items and positions past n_items are -1.
    assert topk_indices(scores, 4).tolist() == [[1, 2, 3, 0], [2, 0, -1, -1]]
    assert topk_indices(scores, 7).tolist() == [[1, 2, 3, 0, 4, -1, -1], [2, 0, -1, -1, -1, -1, -1]]


def test_topk_indices_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k must be"):
        topk_indices(np.zeros((2, 3)), 0)
    with pytest.raises(ValueError, match="NaN"):
        topk_indices(np.array([[0.0, np.nan]]), 1)
    with pytest.raises(ValueError, match="2-D"):
        topk_indices(np.zeros(3), 1)


def test_metric_rejects_shape_mismatch() -> None:
    targets = sp.csr_array(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 4\)"):
        ndcg_at_k(np.zeros((3, 4)), targets, 2)
    with pytest.raises(ValueError, match="targets shape"):
        recall_at_k(np.zeros((3, 4)), torch.zeros((3, 3), dtype=torch.bool), 2)


# ---------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("name", list(METRICS))
def test_values_in_unit_interval_and_nan_only_without_targets(
    name: str, rng: np.random.Generator
) -> None:
    scores, targets = random_case(rng, 40, 60)
    no_targets = np.diff(targets.indptr) == 0
    assert no_targets.any() and not no_targets.all()
    for k in KS:
        values = METRICS[name](scores, targets, k)
        assert np.array_equal(np.isnan(values), no_targets)
        finite = values[~no_targets]
        assert ((finite >= 0.0) & (finite <= 1.0)).all()


def test_perfect_ranking(rng: np.random.Generator) -> None:
    _, targets = random_case(rng, 40, 60)
    dense = targets.toarray()
    # Targets first (tied among themselves), everything else after.
    scores = dense + 0.1 * rng.random(dense.shape)
    n_targets = dense.sum(axis=1)
    has = n_targets > 0
    for k in KS:
        for name in ("recall", "ndcg", "hit_rate", "mrr"):
            np.testing.assert_allclose(METRICS[name](scores, targets, k)[has], 1.0)
        np.testing.assert_allclose(
            recall_at_k(scores, targets, k, normalized=False)[has],
            np.minimum(k, n_targets[has]) / n_targets[has],
        )
        np.testing.assert_allclose(
            precision_at_k(scores, targets, k)[has], np.minimum(k, n_targets[has]) / k
        )


@pytest.mark.parametrize("name", list(METRICS))
def test_strictly_increasing_transform_changes_nothing(name: str, rng: np.random.Generator) -> None:
    scores, targets = random_case(rng, 30, 50)  # integer scores: ties and -inf must survive
    transformed = scores**3 + 5.0 * scores - 7.0  # strictly increasing, maps -inf to -inf
    for k in KS:
        np.testing.assert_array_equal(
            METRICS[name](transformed, targets, k), METRICS[name](scores, targets, k)
        )


@pytest.mark.parametrize("name", list(METRICS))
def test_permuting_items_changes_nothing(name: str, rng: np.random.Generator) -> None:
    scores, targets = random_case(rng, 30, 50, integer_scores=False, inf_fraction=0.0)
    permutation = rng.permutation(scores.shape[1])
    permuted_targets = sp.csr_array(targets.toarray()[:, permutation])
    for k in KS:
        np.testing.assert_allclose(
            METRICS[name](scores[:, permutation], permuted_targets, k),
            METRICS[name](scores, targets, k),
            rtol=1e-12,
            equal_nan=True,
        )


# ---------------------------------------------------------------------------------------------
# Tiny cases worked by hand


def one_user(scores: list[float], target_items: list[int]) -> tuple[NDArray[Any], sp.csr_array]:
    row = np.zeros((1, len(scores)), dtype=np.float32)
    row[0, target_items] = 1.0
    return np.array([scores]), sp.csr_array(row)


def test_hand_case_hits_at_ranks_1_and_3() -> None:
    scores, targets = one_user([0.9, 0.8, 0.7, 0.1], [0, 2])
    assert ndcg_at_k(scores, targets, 3)[0] == pytest.approx(
        (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    )
    assert ndcg_at_k(scores, targets, 1)[0] == pytest.approx(1.0)
    assert ndcg_at_k(scores, targets, 2)[0] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert recall_at_k(scores, targets, 2)[0] == pytest.approx(1 / 2)
    assert recall_at_k(scores, targets, 1)[0] == pytest.approx(1 / 1)
    assert precision_at_k(scores, targets, 3)[0] == pytest.approx(2 / 3)
    assert mrr_at_k(scores, targets, 3)[0] == pytest.approx(1.0)
    assert hit_rate_at_k(scores, targets, 1)[0] == 1.0


def test_hand_case_recall_normalized_vs_plain() -> None:
    # 3 targets, one of them in the top 2.
    scores, targets = one_user([0.9, 0.8, 0.7, 0.6, 0.5], [1, 3, 4])
    assert recall_at_k(scores, targets, 2)[0] == pytest.approx(1 / min(2, 3))
    assert recall_at_k(scores, targets, 2, normalized=False)[0] == pytest.approx(1 / 3)
    assert mrr_at_k(scores, targets, 2)[0] == pytest.approx(1 / 2)
    # Ranks 2, 4, 5 of 3 targets, k = 5.
    assert ndcg_at_k(scores, targets, 5)[0] == pytest.approx(
        (1 / math.log2(3) + 1 / math.log2(5) + 1 / math.log2(6))
        / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    )


def test_hand_case_ties_break_by_item_index() -> None:
    scores, targets = one_user([1.0, 1.0, 1.0, 0.0], [2])
    # Top 2 is items 0 and 1: no hit; top 3 reaches item 2 at rank 3.
    assert recall_at_k(scores, targets, 2)[0] == 0.0
    assert mrr_at_k(scores, targets, 2)[0] == 0.0
    assert mrr_at_k(scores, targets, 3)[0] == pytest.approx(1 / 3)
    assert ndcg_at_k(scores, targets, 3)[0] == pytest.approx((1 / math.log2(4)) / 1.0)


def test_hand_case_excluded_items_never_count() -> None:
    scores, targets = one_user([1.0, -math.inf, -math.inf], [1])
    for name in ("recall", "recall_plain", "ndcg", "hit_rate", "mrr", "precision"):
        assert METRICS[name](scores, targets, 3)[0] == 0.0
    # Fewer finite items than k: precision keeps k as denominator.
    scores, targets = one_user([1.0, -math.inf], [0])
    assert precision_at_k(scores, targets, 2)[0] == pytest.approx(1 / 2)
    assert recall_at_k(scores, targets, 2)[0] == 1.0


def test_hand_case_no_targets_gives_nan() -> None:
    scores, targets = one_user([1.0, 0.5], [])
    for name in METRICS:
        assert math.isnan(METRICS[name](scores, targets, 1)[0])


# ---------------------------------------------------------------------------------------------
# Aggregates


def test_catalog_coverage_hand_case() -> None:
    assert catalog_coverage_at_k(np.array([[0, 1], [1, 2]]), 5) == pytest.approx(3 / 5)
    assert catalog_coverage_at_k(torch.tensor([[0, -1], [0, -1]]), 4) == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="out of range"):
        catalog_coverage_at_k(np.array([[5]]), 5)


def ref_gini(counts: list[int]) -> float:
    """Gini as mean absolute difference over all ordered pairs / (2 * mean)."""
    n = len(counts)
    mean = sum(counts) / n
    total = sum(abs(a - b) for a in counts for b in counts)
    return total / (2 * n * n * mean)


def test_gini_hand_cases(rng: np.random.Generator) -> None:
    # Counts over 5 items: [1, 2, 1, 0, 0]; sorted [0, 0, 1, 1, 2]:
    # sum (2i - n - 1) c_(i) / (n * sum c) = (0*1 + 2*1 + 4*2) / (5 * 4) = 0.5.
    assert gini_index(np.array([[0, 1], [1, 2]]), 5) == pytest.approx(10 / 20)
    # Every item recommended equally often.
    assert gini_index(np.array([[0, 1, 2], [2, 1, 0]]), 3) == pytest.approx(0.0)
    # All recommendations on one item of n = 4: (n - 1) / n.
    assert gini_index(np.array([[3], [3], [3]]), 4) == pytest.approx(3 / 4)
    assert math.isnan(gini_index(np.full((2, 2), -1), 4))
    topk = rng.integers(-1, 20, size=(30, 5))
    counts = np.bincount(topk[topk >= 0], minlength=20).tolist()
    assert gini_index(topk, 20) == pytest.approx(ref_gini(counts))


def test_mean_popularity_rank_hand_case() -> None:
    # Popularity ranks: item 0 -> 1, items 1 and 2 tie -> (2 + 3) / 2, item 3 -> 4.
    popularity = np.array([10, 5, 5, 1])
    topk = np.array([[0, 3], [1, -1]])
    assert mean_popularity_rank(topk, popularity) == pytest.approx((1 + 4 + 2.5) / 3)
    assert mean_popularity_rank(np.array([[0], [0]]), popularity) == pytest.approx(1.0)
    assert mean_popularity_rank(np.array([[2, 1]]), popularity) == pytest.approx(2.5)


# ---------------------------------------------------------------------------------------------
# mask_history


def test_mask_history_in_place_numpy_and_torch() -> None:
    history = sp.csr_array(np.array([[1, 0, 1], [0, 0, 0]], dtype=np.float32))
    array = np.ones((2, 3))
    assert mask_history(array, history) is array
    assert array.tolist() == [[-np.inf, 1.0, -np.inf], [1.0, 1.0, 1.0]]
    tensor = torch.ones((2, 3))
    assert mask_history(tensor, history) is tensor
    assert torch.isinf(tensor).sum().item() == 2
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        mask_history(torch.ones((2, 4)), history)


# ---------------------------------------------------------------------------------------------
# evaluate()


class FixedRanker:
    """Gives every user the same score vector, as an expanded view (must not be masked)."""

    def __init__(self, item_scores: NDArray[Any]) -> None:
        self.item_scores = torch.as_tensor(item_scores, dtype=torch.float32)
        self.n_items = int(self.item_scores.numel())

    def score(self, histories: sp.csr_array) -> torch.Tensor:
        return self.item_scores.expand(histories.shape[0], -1)


class ItemItemRanker:
    """Scores = histories @ W for a fixed random W (a per-user, history-dependent ranker)."""

    def __init__(self, weights: NDArray[np.float64]) -> None:
        self.weights = weights
        self._n_items = weights.shape[0]

    @property
    def n_items(self) -> int:
        return self._n_items

    def score(self, histories: sp.csr_array) -> NDArray[np.float64]:
        return np.asarray(histories @ self.weights)


def random_split(
    rng: np.random.Generator, n_users: int, n_items: int
) -> tuple[sp.csr_array, sp.csr_array]:
    interactions = rng.random((n_users, n_items)) < 0.15
    is_target = rng.random((n_users, n_items)) < 0.25
    fold_in = sp.csr_array((interactions & ~is_target).astype(np.float32))
    targets_dense = interactions & is_target
    targets_dense[rng.random(n_users) < 0.2] = False  # some users without targets
    return fold_in, sp.csr_array(targets_dense.astype(np.float32))


def test_rankers_satisfy_protocol(rng: np.random.Generator) -> None:
    assert isinstance(FixedRanker(np.zeros(3)), Ranker)
    assert isinstance(ItemItemRanker(rng.random((3, 3))), Ranker)


def test_a_fold_in_item_that_is_also_a_target_is_refused() -> None:
    # The user's fold-in item 0 is also (wrongly) a target: masked as seen, it could never be a
    # hit, so the split is refused instead of scored low (fold-in masking itself is tested by
    # test_ranker_scoring_fold_in_highest_gets_correct_results).
    ranker = FixedRanker(np.array([10.0, 1.0, 2.0]))
    fold_in = sp.csr_array(np.array([[1, 0, 0]], dtype=np.float32))
    targets = sp.csr_array(np.array([[1, 0, 0]], dtype=np.float32))
    with pytest.raises(ValueError, match="overlap"):
        evaluate(ranker, fold_in, targets, ks=(1, 3))
    # The ranker's own tensor is left untouched.
    assert torch.isfinite(ranker.item_scores).all()


def test_ranker_scoring_fold_in_highest_gets_correct_results(rng: np.random.Generator) -> None:
    n_users, n_items = 25, 40
    fold_in, targets = random_split(rng, n_users, n_items)
    base = rng.standard_normal((n_users, n_items))

    class HistoryFirstRanker:
        n_items = 40

        def score(self, histories: sp.csr_array) -> NDArray[np.float64]:
            # Fold-in items get huge scores; rows are identified by their history pattern.
            rows = [
                next(u for u in range(n_users) if (fold_in[[u]] != histories[[i]]).nnz == 0)
                for i in range(histories.shape[0])
            ]
            return base[rows] + 1e6 * histories.toarray()

    result = evaluate(HistoryFirstRanker(), fold_in, targets, ks=(5, 20))
    masked = mask_history(base.copy(), fold_in)
    for k in (5, 20):
        for name in METRICS:
            np.testing.assert_allclose(
                result.per_user[f"{name}@{k}"],
                ref_metric_matrix(name, masked, targets, k),
                equal_nan=True,
            )


def test_evaluate_matches_metric_functions_and_batching(rng: np.random.Generator) -> None:
    n_users, n_items = 53, 70
    fold_in, targets = random_split(rng, n_users, n_items)
    # Rounded weights give tied scores, so the tie rule is exercised across batches.
    ranker = ItemItemRanker(np.round(rng.random((n_items, n_items)), 1))
    popularity = np.asarray(fold_in.sum(axis=0)).ravel()
    ks = (1, 7, 20, 100)
    results = [
        evaluate(ranker, fold_in, targets, ks=ks, batch_size=b, item_popularity=popularity)
        for b in (1, 7, 1000)
    ]
    for other in results[1:]:
        assert other.per_user.keys() == results[0].per_user.keys()
        for name, values in results[0].per_user.items():
            np.testing.assert_array_equal(other.per_user[name], values)
        assert other.aggregate == pytest.approx(results[0].aggregate, nan_ok=True)
        assert other.n_users == results[0].n_users

    result = results[0]
    masked = mask_history(np.asarray(fold_in @ ranker.weights), fold_in)
    has = np.diff(targets.indptr) > 0
    assert result.n_users == int(has.sum())
    np.testing.assert_array_equal(result.user_has_targets, has)
    for k in ks:
        for name, fn in METRICS.items():
            np.testing.assert_allclose(
                result.per_user[f"{name}@{k}"], fn(masked, targets, k), equal_nan=True
            )
        topk = topk_indices(masked, k).numpy()[has]
        assert result.aggregate[f"coverage@{k}"] == pytest.approx(
            catalog_coverage_at_k(topk, n_items)
        )
        assert result.aggregate[f"gini@{k}"] == pytest.approx(gini_index(topk, n_items))
        assert result.aggregate[f"popularity_rank@{k}"] == pytest.approx(
            mean_popularity_rank(topk, popularity)
        )


def test_evaluate_hand_worked_aggregates() -> None:
    # Scores [3, 2, 1, 0]; user 0 has seen item 0, user 1 item 1; both have a target.
    ranker = FixedRanker(np.array([3.0, 2.0, 1.0, 0.0]))
    fold_in = sp.csr_array(np.array([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32))
    targets = sp.csr_array(np.array([[0, 0, 0, 1], [0, 0, 0, 1]], dtype=np.float32))
    popularity = np.array([4, 3, 2, 1])
    result = evaluate(ranker, fold_in, targets, ks=(2,), item_popularity=popularity)
    # Top-2 lists: [1, 2] and [0, 2]; counts [1, 1, 2, 0].
    assert result.aggregate["coverage@2"] == pytest.approx(3 / 4)
    # Sorted counts [0, 1, 1, 2]: (-3*0 - 1*1 + 1*1 + 3*2) / (4 * 4).
    assert result.aggregate["gini@2"] == pytest.approx(6 / 16)
    # Popularity ranks of items 1, 2, 0, 2: (2 + 3 + 1 + 3) / 4.
    assert result.aggregate["popularity_rank@2"] == pytest.approx(9 / 4)
    assert result.mean("recall@2") == 0.0


def test_evaluate_metric_selection_and_errors(rng: np.random.Generator) -> None:
    fold_in, targets = random_split(rng, 10, 12)
    ranker = FixedRanker(rng.standard_normal(12))
    result = evaluate(ranker, fold_in, targets, ks=(5,), metrics=["ndcg", "coverage"])
    assert set(result.per_user) == {"ndcg@5"}
    assert set(result.aggregate) == {"coverage@5"}
    default = evaluate(ranker, fold_in, targets)
    assert set(paper_metrics) <= set(default.per_user)
    assert "popularity_rank@20" not in default.aggregate

    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(ranker, fold_in, targets, metrics=["auc"])
    with pytest.raises(ValueError, match="item_popularity"):
        evaluate(ranker, fold_in, targets, metrics=["popularity_rank"])
    with pytest.raises(ValueError, match=r"\(10, 12\).*\(9, 12\)"):
        evaluate(ranker, fold_in, targets[:9])
    with pytest.raises(ValueError, match=r"n_items=13.*\(10, 12\)"):
        evaluate(FixedRanker(np.zeros(13)), fold_in, targets)
    with pytest.raises(ValueError, match=r"item_popularity shape \(3,\)"):
        evaluate(ranker, fold_in, targets, item_popularity=np.ones(3))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(ranker, fold_in, targets, batch_size=0)
    with pytest.raises(ValueError, match="k must be"):
        evaluate(ranker, fold_in, targets, ks=(0,))

    class WrongShapeRanker:
        n_items = 12

        def score(self, histories: sp.csr_array) -> NDArray[np.float64]:
            return np.zeros((histories.shape[0], 11))

    with pytest.raises(ValueError, match=r"returned shape \(10, 11\)"):
        evaluate(WrongShapeRanker(), fold_in, targets)


# ---------------------------------------------------------------------------------------------
# EvaluationResult


def make_result(values: NDArray[np.float64]) -> EvaluationResult:
    has = ~np.isnan(values)
    return EvaluationResult(
        per_user={"ndcg@10": values},
        aggregate={"coverage@10": 0.25},
        n_users=int(has.sum()),
        user_has_targets=has,
    )


def test_mean_and_stderr_match_numpy(rng: np.random.Generator) -> None:
    values = rng.random(50)
    values[[3, 17, 30]] = np.nan
    result = make_result(values)
    kept = values[~np.isnan(values)]
    assert result.mean("ndcg@10") == pytest.approx(kept.mean())
    assert result.stderr("ndcg@10") == pytest.approx(np.std(kept, ddof=1) / np.sqrt(kept.size))
    assert result.mean("coverage@10") == 0.25
    summary = result.summary()
    assert summary == pytest.approx(
        {
            "ndcg@10": kept.mean(),
            "ndcg@10_se": np.std(kept, ddof=1) / np.sqrt(kept.size),
            "coverage@10": 0.25,
        }
    )
    with pytest.raises(ValueError, match="unknown"):
        result.mean("ndcg@11")
    with pytest.raises(ValueError, match="unknown"):
        result.stderr("coverage@10")


def test_by_segment_quartiles() -> None:
    values = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, np.nan])
    lengths = np.array([1, 2, 3, 4, 5, 6, 7, 8, 100])  # the last user has no targets
    segments = make_result(values).by_segment("ndcg@10", lengths)
    assert [s["n_users"] for s in segments] == [2, 2, 2, 2]
    assert [s["mean"] for s in segments] == pytest.approx([0.15, 0.35, 0.55, 0.75])
    assert segments[0]["se"] == pytest.approx(np.std([0.1, 0.2], ddof=1) / np.sqrt(2))
    # Quantiles of 1..8: 1, 2.75, 4.5, 6.25, 8.
    assert [s["lower"] for s in segments] == pytest.approx([1, 2.75, 4.5, 6.25])
    assert segments[-1]["upper"] == 8
    with pytest.raises(ValueError, match="history_lengths"):
        make_result(values).by_segment("ndcg@10", lengths[:-1])


def test_tables() -> None:
    result = make_result(np.array([0.5, 1.0]))
    markdown = result.to_markdown()
    assert markdown.splitlines() == [
        "| metric | mean | se |",
        "|---|---:|---:|",
        "| ndcg@10 | 0.7500 | 0.2500 |",
        "| coverage@10 | 0.2500 |  |",
    ]
    table = result.format_table(["ndcg@10"]).splitlines()
    assert table[0].split() == ["metric", "mean", "se"]
    assert table[1].split() == ["ndcg@10", "0.7500", "0.2500"]


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree(rng: np.random.Generator) -> None:
    scores, targets = random_case(rng, 64, 300)
    cuda_scores = torch.as_tensor(scores, device="cuda")
    for k in KS:
        assert torch.equal(topk_indices(cuda_scores, k).cpu(), topk_indices(scores, k))
        for fn in METRICS.values():
            np.testing.assert_allclose(
                fn(cuda_scores, targets, k), fn(scores, targets, k), equal_nan=True
            )
    fold_in, eval_targets = random_split(rng, 40, 50)
    ranker = ItemItemRanker(np.round(rng.random((50, 50)), 1))
    on_cpu = evaluate(ranker, fold_in, eval_targets, batch_size=16)
    on_cuda = evaluate(ranker, fold_in, eval_targets, batch_size=16, device="cuda")
    assert on_cuda.summary() == pytest.approx(on_cpu.summary(), nan_ok=True)
