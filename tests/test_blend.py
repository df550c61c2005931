"""The blend of two rankers: normalization by hand, the combination and the weight selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recvae.blend import Blend, normalize_scores, select_blend_weight
from recvae.data import Interactions
from recvae.evaluation import Ranker, evaluate
from recvae.split import HeldOut


class Linear:
    """A toy item-item ranker: ``scores = history @ M`` (EASE-shaped)."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights.astype(np.float32)

    @property
    def n_items(self) -> int:
        return int(self.weights.shape[0])

    def score(self, histories: sp.csr_array) -> np.ndarray:
        return np.asarray(histories @ self.weights, dtype=np.float32)


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_array:
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return sp.csr_array(
        (np.ones(len(r), dtype=np.float32), (r, c)), shape=(len(rows), n_items), dtype=np.float32
    )


def _held_out(fold_in: list[list[int]], targets: list[list[int]], n_items: int) -> HeldOut:
    users = np.arange(len(fold_in))
    items = np.arange(n_items)
    return HeldOut(
        fold_in=Interactions(_csr(fold_in, n_items), users, items),
        targets=Interactions(_csr(targets, n_items), users, items),
    )


def _two_experts(n_items: int = 8) -> tuple[Linear, Linear, HeldOut]:
    # Users of kind A have item 0 and want item 7; kind B have item 1 and want item 6. The first
    # ranker only knows 0 -> 7, the second only 1 -> 6: each alone serves half of the users.
    first = np.zeros((n_items, n_items))
    first[0, 7] = 1.0
    second = np.zeros((n_items, n_items))
    second[1, 6] = 1.0
    validation = _held_out([[0], [1], [0], [1]], [[7], [6], [7], [6]], n_items)
    return Linear(first), Linear(second), validation


def test_zscore_and_minmax_by_hand_ignore_history_items() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0, 40.0], [5.0, 5.0, 5.0, 5.0]])
    history = _csr([[3], []], 4)
    z = normalize_scores(scores, history, "zscore")
    std = math.sqrt(2.0 / 3.0)  # population std of 1, 2, 3
    expected = torch.tensor([[-1 / std, 0.0, 1 / std, 38 / std], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(z, expected)
    m = normalize_scores(scores, history, "minmax")
    torch.testing.assert_close(m, torch.tensor([[0.0, 0.5, 1.0, 19.5], [0.0, 0.0, 0.0, 0.0]]))


def test_normalization_keeps_minus_inf_and_rejects_bad_input() -> None:
    scores = np.array([[-np.inf, 1.0, 3.0]], dtype=np.float32)
    out = normalize_scores(scores, _csr([[]], 3), "minmax")
    assert out[0, 0].item() == -math.inf
    torch.testing.assert_close(out[0, 1:], torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        normalize_scores(np.array([[np.nan, 1.0, 2.0]]), _csr([[]], 3))
    with pytest.raises(ValueError, match="shape"):
        normalize_scores(np.zeros((2, 3)), _csr([[]], 3))
    with pytest.raises(ValueError, match="normalization"):
        normalize_scores(np.zeros((1, 3)), _csr([[]], 3), "rank")  # type: ignore[arg-type]


def test_blend_is_a_ranker_and_matches_the_formula() -> None:
    first, second, validation = _two_experts()
    blend = Blend(first, second, 0.3)
    assert isinstance(blend, Ranker) and blend.n_items == 8
    histories = validation.fold_in.matrix
    expected = 0.3 * normalize_scores(first.score(histories), histories) + 0.7 * normalize_scores(
        second.score(histories), histories
    )
    torch.testing.assert_close(blend.score(histories), expected)
    result = evaluate(blend, histories, validation.targets.matrix, ks=(3,))
    assert result.mean("ndcg@3") == pytest.approx(1.0)


@pytest.mark.parametrize(("weight", "expected"), [(1.0, 0.5), (0.0, 0.5), (0.5, 1.0)])
def test_end_weights_reduce_to_one_ranker(weight: float, expected: float) -> None:
    first, second, validation = _two_experts()
    blend = Blend(first, second, weight)
    result = evaluate(blend, validation.fold_in.matrix, validation.targets.matrix, ks=(3,))
    assert result.mean("ndcg@3") == pytest.approx(expected)


def test_selection_finds_an_interior_weight_on_validation() -> None:
    first, second, validation = _two_experts()
    selection = select_blend_weight(first, second, validation, metric="ndcg@3")
    assert selection.scores[0.0] == pytest.approx(0.5)
    assert selection.scores[1.0] == pytest.approx(0.5)
    assert selection.scores[0.5] == pytest.approx(1.0)
    assert selection.best == 0.05  # ties go to the first candidate tried
    assert selection.blend.weight == selection.best
    assert list(selection.scores) == sorted(selection.scores)


def test_selection_prefers_the_better_ranker_alone() -> None:
    first, second, validation = _two_experts()
    # Validation users of kind A only: the first ranker alone is perfect, the second useless.
    only_a = _held_out([[0], [0]], [[7], [7]], 8)
    selection = select_blend_weight(
        first, second, only_a, weights=[0.0, 1.0], metric="recall@1", batch_size=1
    )
    assert selection.best == 1.0 and selection.scores == {0.0: 0.0, 1.0: 1.0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": []}, "at least one"),
        ({"weights": [0.5, 1.5]}, r"\[0, 1\]"),
        ({"metric": "auc@10"}, "metric"),
        ({"metric": "ndcg"}, "metric"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_selection_arguments(kwargs: dict[str, object], message: str) -> None:
    first, second, validation = _two_experts()
    with pytest.raises(ValueError, match=message):
        select_blend_weight(first, second, validation, **kwargs)  # type: ignore[arg-type]


def test_blend_rejects_mismatched_rankers_and_bad_weight() -> None:
    first, _, _ = _two_experts()
    with pytest.raises(ValueError, match="different item sets"):
        Blend(first, Linear(np.zeros((5, 5))), 0.5)
    with pytest.raises(ValueError, match="weight"):
        Blend(first, first, 1.5)
    with pytest.raises(ValueError, match="histories"):
        Blend(first, first, 0.5).score(_csr([[0]], 5))
