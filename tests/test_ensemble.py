"""The ensemble of rankers: the combination by hand, validation of its inputs, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import recvae
from recvae.ensemble import Ensemble
from recvae.evaluation import Ranker, evaluate


class Fixed:
    """A ranker that returns the same score row for every user (tensor or numpy)."""

    def __init__(self, row: list[float], *, as_numpy: bool = False) -> None:
        self.row = np.asarray(row, dtype=np.float32)
        self.as_numpy = as_numpy

    @property
    def n_items(self) -> int:
        return int(self.row.shape[0])

    def score(self, histories: sp.csr_array) -> torch.Tensor | np.ndarray:
        out = np.tile(self.row, (histories.shape[0], 1))
        return out if self.as_numpy else torch.from_numpy(out)


def _histories(n_users: int, n_items: int) -> sp.csr_array:
    return sp.csr_array(np.eye(n_users, n_items, dtype=np.float32))


def _log_softmax(row: list[float]) -> np.ndarray:
    x = np.asarray(row, dtype=np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def test_mean_log_probability_by_hand_with_weights() -> None:
    a, b = [0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 1.0]
    ensemble = Ensemble([Fixed(a), Fixed(b, as_numpy=True)], weights=[1.0, 3.0])
    got = ensemble.score(_histories(2, 4)).numpy()
    want = 0.25 * _log_softmax(a) + 0.75 * _log_softmax(b)
    assert got.shape == (2, 4)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[0], want, rtol=1e-6)
    np.testing.assert_allclose(got[1], want, rtol=1e-6)


def test_probability_mixture_by_hand_and_equal_default_weights() -> None:
    a, b = [1.0, 5.0, 0.0], [3.0, -1.0, 2.0]
    ensemble = Ensemble([Fixed(a), Fixed(b)], combine="softmax")
    want = np.log(0.5 * np.exp(_log_softmax(a)) + 0.5 * np.exp(_log_softmax(b)))
    np.testing.assert_allclose(ensemble.score(_histories(1, 3)).numpy()[0], want, rtol=1e-6)
    assert ensemble.weights == [0.5, 0.5]
    assert len(ensemble) == 2
    assert ensemble.n_items == 3
    assert isinstance(ensemble, Ranker)
    assert recvae.Ensemble is Ensemble


def test_log_softmax_ranks_as_the_mean_logit_and_the_mixture_can_differ() -> None:
    # Member logits shifted by different constants: the mean log-probability ranks exactly as
    # the mean logit. Member 1 is sure of item 0, member 2 of item 2, both give item 1 ~0.1:
    # the geometric mean (log_softmax) prefers the compromise, the mixture (softmax) item 0.
    a = np.log([0.9, 0.099, 0.001]) + 7.0
    b = np.log([0.001, 0.1, 0.899]) - 3.0
    logp = Ensemble([Fixed(list(a)), Fixed(list(b))]).score(_histories(1, 3))[0].numpy()
    assert np.argsort(-logp).tolist() == np.argsort(-(a + b)).tolist()
    assert int(np.argmax(logp)) == 1
    mix = Ensemble([Fixed(list(a)), Fixed(list(b))], combine="softmax").score(_histories(1, 3))
    assert int(torch.argmax(mix[0])) == 0
    # The mixture's scores are log-probabilities: they sum to 1 over the items.
    assert float(torch.exp(mix[0]).sum()) == pytest.approx(1.0, abs=1e-6)


def test_minus_infinity_stays_excluded_unless_its_member_has_no_weight() -> None:
    a = [0.0, -math.inf, 1.0]
    b = [2.0, 1.0, 0.0]
    got = Ensemble([Fixed(a), Fixed(b)]).score(_histories(1, 3))[0]
    assert torch.isneginf(got[1])
    assert torch.isfinite(got[[0, 2]]).all()
    zero = Ensemble([Fixed(a), Fixed(b)], weights=[0.0, 1.0]).score(_histories(1, 3))[0]
    np.testing.assert_allclose(zero.numpy(), _log_softmax(b), rtol=1e-6)
    mix = Ensemble([Fixed(a), Fixed(b)], combine="softmax").score(_histories(1, 3))[0]
    assert torch.isfinite(mix).all()  # a mixture keeps an item the other member allows


@pytest.mark.parametrize(
    ("members", "kwargs", "message"),
    [
        ([], {}, "at least one member"),
        ([Fixed([1.0, 2.0]), Fixed([1.0, 2.0, 3.0])], {}, "different item sets"),
        ([Fixed([1.0])], {"weights": [1.0, 2.0]}, "2 weights given for 1 members"),
        ([Fixed([1.0]), Fixed([2.0])], {"weights": [1.0, -1.0]}, "non-negative"),
        ([Fixed([1.0]), Fixed([2.0])], {"weights": [0.0, 0.0]}, "not all 0"),
        ([Fixed([1.0])], {"weights": [math.nan]}, "finite"),
        ([Fixed([1.0])], {"combine": "max"}, "combine must be"),
    ],
)
def test_bad_arguments_name_the_problem(
    members: list[Fixed], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Ensemble(members, **kwargs)  # type: ignore[arg-type]


def test_a_member_returning_the_wrong_shape_is_named() -> None:
    class Broken(Fixed):
        def score(self, histories: sp.csr_array) -> torch.Tensor:
            return torch.zeros(histories.shape[0], 2)

    with pytest.raises(ValueError, match=r"Broken returned scores of shape \(1, 2\)"):
        Ensemble([Fixed([1.0, 2.0, 3.0]), Broken([0.0, 0.0, 0.0])]).score(_histories(1, 3))


def test_evaluate_an_ensemble_of_trained_vaes(checkerboard) -> None:  # type: ignore[no-untyped-def]
    from conftest import small_vae_config

    from recvae.config import RunOptions
    from recvae.training import train

    data, withheld = checkerboard
    options = RunOptions(device="cpu", progress=False)
    members = [
        train(data, small_vae_config(epochs=5, seed=seed), options=options) for seed in (1, 2)
    ]
    fold_in = data.matrix
    n_users = fold_in.shape[0]
    targets = sp.csr_array(
        (np.ones(n_users, dtype=np.float32), (np.arange(n_users), withheld)), shape=fold_in.shape
    )
    single = evaluate(members[0], fold_in, targets, ks=(5,))
    # The same member twice ranks exactly as the member alone.
    twice = evaluate(Ensemble([members[0], members[0]]), fold_in, targets, ks=(5,))
    np.testing.assert_array_equal(twice.per_user["ndcg@5"], single.per_user["ndcg@5"])
    both = Ensemble(members).score(fold_in)
    want = 0.5 * (
        torch.log_softmax(members[0].score(fold_in), -1)
        + torch.log_softmax(members[1].score(fold_in), -1)
    )
    torch.testing.assert_close(both, want)
    assert evaluate(Ensemble(members), fold_in, targets, ks=(5,)).mean("ndcg@5") > 0
