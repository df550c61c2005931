"""Audit of the VAE tools, RecVAE, ensembles and blends: independent math and edge inputs.

Each regression test is named for the behaviour it protects; the math checks recompute the
library's formulas from scratch in float64 NumPy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recvae.blend import Blend, normalize_scores
from recvae.ensemble import Ensemble
from recvae.recommender import Recommender
from recvae.recvae_model import RecVAE, RecVAEConfig, composite_log_prior
from recvae.vae_tools import (
    LENGTH_BIN_EDGES,
    AnomalyReference,
    AnomalyScores,
    make_generator,
    negative_elbo_terms,
    posterior_confidence,
    reference_histories,
    sample_latent,
)


class _Fixed:
    """A ranker that returns the same score rows for any histories."""

    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = torch.tensor(rows, dtype=torch.float32)
        self.n_items = int(self.rows.shape[1])

    def score(self, histories: sp.csr_array) -> torch.Tensor:
        return self.rows[: histories.shape[0]].clone()


def _empty(n_users: int, n_items: int) -> sp.csr_array:
    return sp.csr_array((n_users, n_items), dtype=np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _tiny_recvae(seed: int = 0, n_items: int = 7) -> RecVAE:
    torch.manual_seed(seed)
    model = RecVAE(RecVAEConfig(hidden_dim=6, latent_dim=3, n_layers=3, batch_size=4), n_items)
    with torch.no_grad():  # larger weights than the init, so every term matters
        for param in model.parameters():
            param.normal_(0.0, 0.7)
    return model.eval()


def _norm_logpdf(z: np.ndarray, mu: np.ndarray | float, var: np.ndarray | float) -> np.ndarray:
    return -0.5 * (np.log(2 * np.pi * var) + (z - mu) ** 2 / var)


# ------------------------------------------------------------------------------ RecVAE
def test_recvae_encoder_keeps_the_direction_of_huge_weights() -> None:
    # Regression: F.normalize squared 1e20 weights to inf in float32, so the encoder saw an
    # empty history (both the dense and the sparse input paths).
    model = _tiny_recvae()
    x = torch.tensor([[1.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]])
    with torch.no_grad():
        mu, logvar = model.encode(x)
        for big in (x * 1e20, (x * 1e20).to_sparse_csr(), (x * 1e-30).to_sparse()):
            mu_big, logvar_big = model.encode(big)
            torch.testing.assert_close(mu_big, mu, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logvar_big, logvar, rtol=1e-5, atol=1e-5)
        # A binary history is untouched by the rescaling: bit-for-bit the same code.
        binary = (x > 0).float()
        ref = model.encoder.input.weight[[0, 1, 4]].sum(0) / math.sqrt(3) + model.encoder.input.bias
        torch.testing.assert_close(model.encoder.input(binary[:1])[0], ref)


def test_recvae_anomaly_terms_and_confidence_match_a_float64_forward_pass() -> None:
    model = _tiny_recvae(seed=1)
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    x = np.array(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1],
            [0, 2, 0, 0, 1, 0, 0],
        ],
        dtype=np.float64,
    )

    def layer_norm(h: np.ndarray, i: int) -> np.ndarray:
        centred = h - h.mean(1, keepdims=True)
        scaled = centred / np.sqrt(h.var(1, keepdims=True) + 0.1)
        return scaled * state[f"encoder.norms.{i}.weight"] + state[f"encoder.norms.{i}.bias"]

    def swish(a: np.ndarray) -> np.ndarray:
        return a / (1.0 + np.exp(-a))

    h = x / np.linalg.norm(x, axis=1, keepdims=True)
    h = layer_norm(swish(h @ state["encoder.input.weight"] + state["encoder.input.bias"]), 0)
    running = h
    for i in range(2):
        w, b = state[f"encoder.layers.{i}.weight"], state[f"encoder.layers.{i}.bias"]
        h = layer_norm(swish(h @ w.T + b + running), i + 1)
        running = running + h
    mu = h @ state["encoder.mu.weight"].T + state["encoder.mu.bias"]
    logvar = h @ state["encoder.logvar.weight"].T + state["encoder.logvar.bias"]
    logits = mu @ state["decoder.weight"].T + state["decoder.bias"]
    nll = -(x * _log_softmax(logits)).sum(1)
    kl = 0.5 * (np.exp(logvar) + mu**2 - 1.0 - logvar).sum(1)
    with torch.no_grad():
        rec_t, kl_t = negative_elbo_terms(model, torch.from_numpy(x).float())
        _, logvar_t = model.encode(torch.from_numpy(x).float())
    np.testing.assert_allclose(rec_t.numpy(), nll, rtol=1e-5)
    np.testing.assert_allclose(kl_t.numpy(), kl, rtol=1e-5)
    confidence = 1.0 - np.minimum(np.exp(0.5 * logvar), 1.0).mean(1)
    np.testing.assert_allclose(posterior_confidence(logvar_t).numpy(), confidence, atol=1e-6)


@pytest.mark.parametrize("mixture", ["per_dim", "joint"])
def test_composite_prior_matches_a_numpy_mixture(mixture: str) -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=gen, dtype=torch.float64) * 3
    old_mu = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    old_logvar = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    weights = (0.15, 0.75, 0.10)
    zn, mn, vn = z.numpy(), old_mu.numpy(), np.exp(old_logvar.numpy())
    parts = [_norm_logpdf(zn, 0.0, 1.0), _norm_logpdf(zn, mn, vn), _norm_logpdf(zn, 0.0, np.e**10)]
    if mixture == "per_dim":
        expected = np.log(sum(w * np.exp(p) for w, p in zip(weights, parts, strict=True))).sum(1)
    else:
        expected = np.log(sum(w * np.exp(p.sum(1)) for w, p in zip(weights, parts, strict=True)))
    got = composite_log_prior(z, old_mu, old_logvar, weights=weights, mixture=mixture)  # type: ignore[arg-type]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


# ------------------------------------------------------------------------------ exploration
def test_seeded_posterior_samples_have_the_posterior_moments() -> None:
    mu = torch.tensor([1.0, -2.0, 0.5]).repeat(40_000, 1)
    logvar = torch.tensor([0.0, math.log(4.0), math.log(0.25)]).repeat(40_000, 1)
    z = sample_latent(mu, logvar, temperature=1.5, generator=make_generator(3))
    again = sample_latent(mu, logvar, temperature=1.5, generator=make_generator(3))
    assert torch.equal(z, again)
    np.testing.assert_allclose(z.mean(0).numpy(), [1.0, -2.0, 0.5], atol=0.03)
    np.testing.assert_allclose(z.std(0).numpy(), [1.5, 3.0, 0.75], rtol=0.02)
    assert sample_latent(mu, logvar, temperature=0.0, generator=make_generator(3)) is mu


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5, "1"])
def test_sample_latent_rejects_a_bad_temperature(temperature: object) -> None:
    # Regression: NaN or inf gave NaN/inf codes and -0.5 a silently flipped sample.
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        sample_latent(mu, logvar, temperature=temperature, generator=make_generator(0))  # type: ignore[arg-type]


def test_sample_latent_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        sample_latent(
            torch.zeros(2, 3), torch.zeros(2, 4), temperature=1.0, generator=make_generator(0)
        )


@pytest.mark.parametrize("seed", [1.5, True, -1, 2**63, "7"])
def test_make_generator_refuses_seeds_outside_the_documented_range(seed: object) -> None:
    # Regression: 1.5 raised torch's RuntimeError, True and -1 were silently accepted.
    with pytest.raises(ValueError, match="seed"):
        make_generator(seed)  # type: ignore[arg-type]
    assert make_generator(2**63 - 1).initial_seed() == 2**63 - 1


# ------------------------------------------------------------------------------ anomaly reference
def test_percentiles_match_the_empirical_distribution_of_the_reference() -> None:
    rng = np.random.default_rng(0)
    reference_scores = rng.normal(size=4000)
    reference = AnomalyReference.from_scores(
        reference_scores, np.full(4000, 10), source="training", n_users=4000
    )
    queries = np.linspace(-2.5, 2.5, 11)
    empirical = 100.0 * (reference_scores[None, :] < queries[:, None]).mean(1)
    got = reference.percentiles(queries, np.full(11, 10))
    np.testing.assert_allclose(got, empirical, atol=0.3)
    assert reference.percentiles(np.array([-9.0, 9.0]), np.array([10, 10])).tolist() == [0, 100]


def test_anomaly_reference_rejects_mismatched_scores_and_lengths() -> None:
    # Regression: NumPy's "operands could not be broadcast" instead of a message naming both.
    reference = AnomalyReference.from_scores(
        np.arange(60.0), np.full(60, 3), source="training", n_users=60
    )
    with pytest.raises(ValueError, match="same shape"):
        reference.percentiles(np.zeros(4), np.ones(3, dtype=np.int64))
    with pytest.raises(ValueError, match="same shape"):
        AnomalyReference.from_scores(np.zeros(4), np.ones(3), source="training", n_users=4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"counts": [1, 2]}, "counts"),
        ({"counts": [-1] * len(LENGTH_BIN_EDGES)}, "counts"),
        ({"source": "validation"}, "source"),
        ({"n_users": -3}, "n_users"),
        ({"median_score": float("nan")}, "median_score"),
    ],
)
def test_stored_anomaly_reference_with_a_bad_field_is_refused(
    change: dict[str, object], message: str
) -> None:
    # Regression: these malformed fields were accepted silently.
    reference = AnomalyReference.from_scores(
        np.arange(60.0), np.full(60, 3), source="held-out", n_users=60
    )
    stored = reference.to_dict()
    assert AnomalyReference.from_dict(stored).source == "held-out"
    with pytest.raises(ValueError, match=f"malformed: {message}"):
        AnomalyReference.from_dict({**stored, **change})


def test_reference_histories_ignore_explicitly_stored_zeros() -> None:
    # Regression: a stored 0 counted as a history item (length bin) and could be drawn into
    # the sub-history, sometimes making it empty.
    data = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0], dtype=np.float32)
    indices = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    matrix = sp.csr_array((data, indices, np.array([0, 4, 8])), shape=(2, 8))
    assert matrix.nnz == 8  # the zeros are stored
    for seed in range(20):
        histories, n_users = reference_histories(matrix, seed=seed)
        assert n_users == 2
        assert np.all(histories.data != 0)
        np.testing.assert_array_equal(np.diff(histories.indptr)[:2], [2, 2])
        assert np.all(np.diff(histories.indptr)[2:] >= 1)


@pytest.mark.parametrize("n", [True, 1.5, -1])
def test_most_unusual_rejects_a_count_that_is_not_a_non_negative_int(n: object) -> None:
    # Regression: True returned one row, 1.5 raised NumPy's TypeError.
    result = AnomalyScores(
        scores=np.array([1.0, 3.0, 2.0]),
        percentiles=np.array([10.0, 90.0, 50.0]),
        history_lengths=np.array([2, 2, 2]),
        reconstruction=np.zeros(3),
        kl=np.zeros(3),
    )
    assert result.most_unusual(2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="n must be"):
        result.most_unusual(n)  # type: ignore[arg-type]


def test_calibrated_recvae_bundle_round_trips(tmp_path: Path) -> None:
    model = _tiny_recvae(seed=2)
    rows = [[0, 1, 2], [3, 4], [0, 1, 5, 6], [2, 4, 6], [1, 3, 5]] * 6
    train = sp.csr_array(
        (
            np.ones(sum(map(len, rows)), dtype=np.float32),
            (np.repeat(np.arange(len(rows)), [len(r) for r in rows]), np.concatenate(rows)),
        ),
        shape=(len(rows), 7),
    )
    rec = Recommender(
        model, model.config, np.arange(7) * 10, user_ids=np.arange(len(rows)), train_matrix=train
    )
    rec.calibrate_anomalies(train)
    loaded = Recommender.load(rec.save(tmp_path / "bundle"))
    histories = train[:5]
    before, after = rec.anomaly_scores(histories), loaded.anomaly_scores(histories)
    assert before.reference == after.reference == "held-out"
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.percentiles, after.percentiles)
    np.testing.assert_array_equal(rec.confidence(histories), loaded.confidence(histories))
    torch.testing.assert_close(
        rec.score_sampled(histories, seed=4), loaded.score_sampled(histories, seed=4)
    )
    # Huge weights give the history's direction, not an empty history (see the encoder test).
    np.testing.assert_allclose(
        rec.confidence(sp.csr_array(histories * 1e20)), rec.confidence(histories), rtol=1e-5
    )


# ------------------------------------------------------------------------------ ensemble
def test_softmax_ensemble_keeps_items_far_below_the_top_finite() -> None:
    # Regression: exp(log p) underflowed to 0 in float32 below about e^-104, so the mixture
    # scored such items -inf (excluded) instead of their log-probability.
    a, b = [[0.0, -200.0, -50.0]], [[0.0, -150.0, -60.0]]
    got = Ensemble([_Fixed(a), _Fixed(b)], combine="softmax").score(_empty(1, 3))
    la, lb = _log_softmax(np.array(a, dtype=np.float64)), _log_softmax(np.array(b))
    expected = np.log(0.5 * np.exp(la) + 0.5 * np.exp(lb))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_ensemble_normalizes_huge_weights() -> None:
    # Regression: the sum of the weights overflowed to inf, every weight became 0 and score()
    # failed with a bare AssertionError.
    members = [_Fixed([[0.0, 1.0, 2.0]]), _Fixed([[2.0, 1.0, 0.0]])]
    huge = Ensemble(members, weights=[1e308, 1e308])
    assert huge.weights == [0.5, 0.5]
    torch.testing.assert_close(huge.score(_empty(1, 3)), Ensemble(members).score(_empty(1, 3)))


@pytest.mark.parametrize("combine", ["log_softmax", "softmax"])
def test_ensemble_member_excluding_a_whole_row_gives_no_nan(combine: str) -> None:
    # Regression: log_softmax of an all -inf row is NaN, which poisoned the whole row.
    members = [_Fixed([[0.0, 1.0, 2.0]]), _Fixed([[-math.inf] * 3])]
    got = Ensemble(members, combine=combine).score(_empty(1, 3))  # type: ignore[arg-type]
    assert not torch.isnan(got).any()
    if combine == "log_softmax":
        assert torch.isneginf(got).all()
    else:  # the other member's half of the mixture
        expected = np.log(0.5) + _log_softmax(np.array([[0.0, 1.0, 2.0]]))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_ensemble_rejects_a_member_with_the_wrong_number_of_rows() -> None:
    # Regression: a member's single row was broadcast over every history silently.
    members = [_Fixed([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0]]), _Fixed([[2.0, 1.0, 0.0]])]
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        Ensemble(members).score(_empty(2, 3))


# ------------------------------------------------------------------------------ blend
@pytest.mark.parametrize("method", ["zscore", "minmax"])
@pytest.mark.parametrize("factor", [1e30, 1e-30])
def test_normalized_scores_do_not_depend_on_the_scale(method: str, factor: float) -> None:
    # Regression: the float32 squares overflowed (1e30) or underflowed (1e-30): every z-score
    # became 0, and the blend fell back on the other ranker alone.
    scores = torch.tensor([[1.0, 2.0, 3.0, 0.0, 5.0], [4.0, -1.0, 2.0, 2.0, 0.5]])
    histories = sp.csr_array(np.array([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=np.float32))
    base = normalize_scores(scores, histories, method)  # type: ignore[arg-type]
    scaled = normalize_scores(scores * factor, histories, method)  # type: ignore[arg-type]
    torch.testing.assert_close(scaled, base, rtol=1e-5, atol=1e-5)


def test_normalized_scores_accept_float64_beyond_float32_range() -> None:
    # Regression: 1e300 became inf in float32 and was then treated as excluded (-inf).
    scores = np.array([[1e300, 2e300, 0.0]])
    got = normalize_scores(scores, _empty(1, 3))
    np.testing.assert_allclose(got.numpy(), [[0.0, math.sqrt(1.5), -math.sqrt(1.5)]], rtol=1e-6)


def test_blend_with_huge_scores_still_uses_both_rankers() -> None:
    first = _Fixed([[3e30, 1e30, 2e30]])
    second = _Fixed([[0.0, 1.0, 0.5]])
    blended = Blend(first, second, 0.9).score(_empty(1, 3))
    assert int(torch.argmax(blended)) == 0
