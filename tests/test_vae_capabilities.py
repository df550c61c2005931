"""Anomaly scores, posterior confidence and exploration (recvae.vae_tools and the Recommender)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipelines.cli import main
from recvae.config import MultDAEConfig, MultVAEConfig, RunOptions
from recvae.data import Interactions
from recvae.model import build_model
from recvae.recommender import Recommender
from recvae.vae_tools import (
    LENGTH_BIN_EDGES,
    N_QUANTILES,
    AnomalyReference,
    anomalous_users,
    intra_list_diversity,
    length_bins,
    posterior_confidence,
    reference_histories,
    sample_latent,
)
from tests.conftest import make_checkerboard


@pytest.fixture(scope="module")
def rec(tiny_bundle: Path) -> Recommender:
    return Recommender.load(tiny_bundle)


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_array:
    r = np.repeat(np.arange(len(rows)), [len(x) for x in rows])
    c = np.concatenate([np.asarray(x, dtype=np.int64) for x in rows]) if rows else []
    return sp.csr_array(
        (np.ones(len(r), dtype=np.float32), (r, c)), shape=(len(rows), n_items), dtype=np.float32
    )


def _roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    # Probability that a random positive outranks a random negative (ties count half).
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def _tiny_untrained(model_name: str) -> Recommender:
    torch.manual_seed(3)
    if model_name == "multvae":
        config = MultVAEConfig(hidden_dims=(5,), latent_dim=3, dropout=0.5)
    else:
        config = MultDAEConfig(hidden_dims=(), latent_dim=3, dropout=0.5)
    n_items = 7
    model = build_model(config, n_items)
    with torch.no_grad():  # larger weights than the init, so every term matters
        for param in model.parameters():
            param.normal_(0.0, 0.7)
    train = _csr([[0, 1, 2], [3, 4], [5, 6, 0, 1], [2, 4, 6]], n_items)
    return Recommender(
        model, config, np.arange(n_items) * 10, user_ids=np.arange(4), train_matrix=train
    )


def _numpy_negative_elbo(rec: Recommender, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The negative ELBO written out by hand from the weights, in float64."""
    state = {k: v.double().numpy() for k, v in rec.model.state_dict().items()}
    enc = sorted({k.split(".")[1] for k in state if k.startswith("encoder.")})
    dec = sorted({k.split(".")[1] for k in state if k.startswith("decoder.")})
    h = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    for j, layer in enumerate(enc):
        h = h @ state[f"encoder.{layer}.weight"].T + state[f"encoder.{layer}.bias"]
        variational = rec.config.model == "multvae"
        if not (variational and j == len(enc) - 1):
            h = np.tanh(h)
    if rec.config.model == "multvae":
        latent = h.shape[1] // 2
        mu, logvar = h[:, :latent], h[:, latent:]
        kl = 0.5 * (np.exp(logvar) + mu**2 - 1.0 - logvar).sum(axis=1)
    else:
        mu, kl = h, np.zeros(len(x))
    h = mu
    for j, layer in enumerate(dec):
        h = h @ state[f"decoder.{layer}.weight"].T + state[f"decoder.{layer}.bias"]
        if j < len(dec) - 1:
            h = np.tanh(h)
    log_softmax = h - h.max(axis=1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(axis=1, keepdims=True))
    return -(x * log_softmax).sum(axis=1), kl


# ------------------------------------------------------------------------------- anomaly scores
@pytest.mark.parametrize("model_name", ["multvae", "multdae"])
def test_anomaly_score_equals_hand_computed_negative_elbo(model_name: str) -> None:
    rec = _tiny_untrained(model_name)
    histories = _csr([[0], [1, 2, 3], [0, 2, 4, 5, 6], [6, 5]], rec.n_items)
    x = histories.toarray().astype(np.float64)
    nll, kl = _numpy_negative_elbo(rec, x)
    result = rec.anomaly_scores(histories)
    np.testing.assert_allclose(result.reconstruction, nll, rtol=1e-5)
    np.testing.assert_allclose(result.kl, kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.scores, (nll + kl) / x.sum(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(result.history_lengths, [1, 3, 5, 2])
    if model_name == "multdae":
        assert np.all(result.kl == 0)  # no posterior: the normalized reconstruction NLL
    else:
        assert np.all(result.kl > 0)
    # Percentiles: the reference is the 4 training users plus one sub-history each; with so
    # few histories every length bin pools all 8 of them.
    ref_histories, n_users = reference_histories(rec.train_matrix, seed=0)
    assert n_users == 4 and ref_histories.shape[0] == 8
    ref_nll, ref_kl = _numpy_negative_elbo(rec, ref_histories.toarray().astype(np.float64))
    ref_scores = (ref_nll + ref_kl) / ref_histories.toarray().sum(axis=1)
    quantiles = np.quantile(ref_scores, np.linspace(0, 1, N_QUANTILES))
    expected = np.interp((nll + kl) / x.sum(axis=1), quantiles, np.linspace(0, 100, N_QUANTILES))
    np.testing.assert_allclose(result.percentiles, expected, rtol=1e-4, atol=1e-3)
    reference = rec.anomaly_reference()
    assert reference.source == "training" and reference.n_users == 4
    assert reference.counts.sum() == 8


def test_percentile_is_monotone_bounded_and_hand_checked(rng: np.random.Generator) -> None:
    lengths = rng.integers(1, 600, size=3000)
    reference = AnomalyReference.from_scores(
        rng.normal(size=3000) + 10 / lengths, lengths, source="training", n_users=1500
    )
    scores = np.sort(rng.normal(scale=3.0, size=500))
    for length in (1, 4, 30, 700):
        pct = reference.percentiles(scores, np.full(500, length))
        assert np.all(np.diff(pct) >= 0)  # monotone in the score for a fixed length
        assert pct.min() >= 0 and pct.max() <= 100
        extremes = reference.percentiles(np.array([-1e3, 1e3]), np.full(2, length))
        np.testing.assert_array_equal(extremes, [0.0, 100.0])
    tiny = AnomalyReference.from_scores(
        np.array([1.0, 2.0, 3.0, 4.0]), np.full(4, 5), source="held-out", n_users=4
    )
    np.testing.assert_allclose(
        tiny.percentiles(np.array([0.5, 1.0, 2.5, 4.0, 9.0, np.nan]), np.full(6, 5)),
        [0.0, 0.0, 50.0, 100.0, 100.0, np.nan],
    )
    # Every length bin pools all four histories: a length-1 query sees the same reference.
    np.testing.assert_allclose(tiny.percentiles(np.array([2.5]), np.array([1])), [50.0])
    assert np.isnan(tiny.percentiles(np.array([2.5]), np.array([0]))[0])
    with pytest.raises(ValueError, match="empty"):
        AnomalyReference.from_scores(np.array([np.nan]), np.array([3]), source="x", n_users=1)


def test_percentiles_are_stratified_by_history_length(rng: np.random.Generator) -> None:
    # Short histories score about 20, long ones about 7 (as the KL term makes them do).
    lengths = np.concatenate([np.full(300, 1), np.full(300, 40), np.full(10, 300)])
    scores = np.concatenate([rng.normal(20, 1, 300), rng.normal(7, 1, 300), rng.normal(7, 1, 10)])
    reference = AnomalyReference.from_scores(scores, lengths, source="training", n_users=610)
    pct = reference.percentiles(np.array([10.0, 10.0, 20.0, 20.0]), np.array([1, 40, 1, 40]))
    assert pct[0] < 1 and pct[1] > 99 and 30 < pct[2] < 70 and pct[3] == 100
    np.testing.assert_array_equal(
        reference.counts[length_bins(np.array([1, 40, 300]))], [300, 300, 10]
    )
    # The 257-512 bin holds 10 histories: it pools its neighbours until it has 50.
    assert reference.percentiles(np.array([7.0]), np.array([300]))[0] > 0
    np.testing.assert_array_equal(
        length_bins(np.array([0, 1, 2, 3, 4, 5, 8, 9, 513, 10_000])),
        [-1, 0, 1, 2, 2, 3, 3, 4, 10, 10],
    )
    assert len(LENGTH_BIN_EDGES) == reference.quantiles.shape[0]
    again = AnomalyReference.from_dict(json.loads(json.dumps(reference.to_dict())))
    np.testing.assert_allclose(again.quantiles, reference.quantiles, rtol=1e-5)
    assert (again.source, again.n_users) == ("training", 610)
    bad = reference.to_dict()
    bad["quantiles"] = bad["quantiles"][:3]
    for broken in (bad, {"quantiles": "bad"}, {**reference.to_dict(), "length_bin_edges": [1]}):
        with pytest.raises(ValueError, match="malformed"):
            AnomalyReference.from_dict(broken)


def test_reference_histories_add_one_sub_history_per_user(rng: np.random.Generator) -> None:
    rows = [list(rng.choice(50, n, replace=False)) for n in rng.integers(1, 40, size=30)]
    matrix = _csr([*rows, []], 50)  # the empty last user is skipped
    histories, n_users = reference_histories(matrix, seed=3)
    assert n_users == 30 and histories.shape == (60, 50)
    np.testing.assert_array_equal(histories[:30].toarray(), matrix[:30].toarray())
    for u in range(30):
        full, sub = set(histories[[u]].indices), set(histories[[30 + u]].indices)
        assert sub and sub <= full
    again, _ = reference_histories(matrix, seed=3)
    assert (again != histories).nnz == 0
    capped, n_capped = reference_histories(matrix, seed=3, max_users=7)
    assert n_capped == 7 and capped.shape == (14, 50)


def test_short_normal_histories_are_not_all_flagged(
    rec: Recommender, rng: np.random.Generator
) -> None:
    data, _ = make_checkerboard()
    for n in (1, 2, 4):
        rows = [list(rng.choice(data.history(u), n, replace=False)) for u in range(60)]
        pct = rec.anomaly_scores(_csr(rows, rec.n_items)).percentiles
        assert np.median(pct) < 90, (n, np.median(pct))


def test_recommender_percentiles_follow_scores(rec: Recommender, rng: np.random.Generator) -> None:
    rows = [list(rng.choice(rec.n_items, 6, replace=False)) for _ in range(60)]
    result = rec.anomaly_scores(_csr(rows, rec.n_items))
    order = np.argsort(result.scores, kind="stable")
    assert np.all(np.diff(result.percentiles[order]) >= 0)
    top = result.most_unusual(3)
    assert result.percentiles[top[0]] == result.percentiles.max()
    assert np.all(np.diff(result.percentiles[result.most_unusual()]) <= 0)


def test_injected_anomalies_score_higher_on_the_checkerboard(
    rec: Recommender, rng: np.random.Generator
) -> None:
    data, _ = make_checkerboard()
    normal = rec.anomaly_scores(data.matrix).scores
    n_items, lengths = data.n_items, data.user_counts()
    # Random histories with the same length distribution, and halves of two unrelated users
    # (even users share no item with odd ones).
    random_rows = [list(rng.choice(n_items, n, replace=False)) for n in rng.choice(lengths, 60)]
    mixed_rows = []
    for _ in range(60):
        even, odd = 2 * rng.integers(0, 30), 2 * rng.integers(0, 30) + 1
        a, b = data.history(int(even)), data.history(int(odd))
        mixed_rows.append(
            [*rng.choice(a, len(a) // 2, replace=False), *rng.choice(b, len(b) // 2, replace=False)]
        )
    # Bots: the same few items, of both parities, over and over.
    bot_rows = [[0, 1, 2, 3]] * 20
    for rows in (random_rows, mixed_rows, bot_rows):
        anomalies = rec.anomaly_scores(_csr(rows, n_items))
        assert _roc_auc(anomalies.scores, normal) > 0.9
        assert np.median(anomalies.percentiles) > 90


def test_anomaly_scores_from_item_ids(rec: Recommender) -> None:
    ids = rec.item_ids
    result = rec.anomaly_scores([[ids[0], ids[2], "nope"], [], ["nope"], [ids[4]]])
    np.testing.assert_array_equal(result.history_lengths, [2, 0, 0, 1])
    assert result.unknown_items == (("nope",), (), ("nope",), ())
    assert np.isnan(result.scores[1]) and np.isnan(result.percentiles[2])
    assert np.isfinite(result.scores[[0, 3]]).all()
    same = rec.anomaly_scores(_csr([[0, 2]], rec.n_items))
    np.testing.assert_allclose(result.scores[0], same.scores[0], rtol=1e-6)  # float32
    assert list(result.most_unusual()[-2:]) == [1, 2]  # empty histories last


def test_anomaly_scores_rejects_malformed_input(rec: Recommender) -> None:
    with pytest.raises(ValueError, match="shape"):
        rec.anomaly_scores(sp.csr_array((2, rec.n_items + 1), dtype=np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        rec.anomaly_scores(-_csr([[1]], rec.n_items))
    with pytest.raises(ValueError, match="sequence of item ids"):
        rec.anomaly_scores([10, 20])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="batch_size"):
        rec.anomaly_scores([[10]], batch_size=0)
    no_users = Recommender(rec.model, rec.config, rec.item_ids)
    with pytest.raises(ValueError, match="training users"):
        no_users.anomaly_scores([[10]])


def test_anomalous_users_mask(rec: Recommender) -> None:
    data, _ = make_checkerboard()
    percentiles = rec.anomaly_scores(data.matrix).percentiles
    for threshold in (0.0, 50.0, 90.0, 100.0):
        mask = anomalous_users(rec, data.matrix, threshold)
        np.testing.assert_array_equal(mask, percentiles > threshold)
    assert not anomalous_users(rec, data.matrix, 100).any()
    # Interactions are aligned by item id: reversed columns give the same answer.
    order = np.arange(data.n_items)[::-1]
    shuffled = Interactions(
        sp.csr_array(data.matrix[:, order]), data.user_ids, data.item_ids[order]
    )
    np.testing.assert_array_equal(
        anomalous_users(rec, shuffled, 50.0), anomalous_users(rec, data.matrix, 50.0)
    )
    for bad in (-1, 100.5, float("nan"), True):
        with pytest.raises(ValueError, match="percentile"):
            anomalous_users(rec, data.matrix, bad)  # type: ignore[arg-type]


def test_held_out_calibration_is_saved_and_used(rec: Recommender, tmp_path: Path) -> None:
    data, _ = make_checkerboard()
    bundle = _save_copy(rec, tmp_path / "b")
    fresh = Recommender.load(bundle)
    assert fresh.anomaly_reference_source() == "training"
    with pytest.raises(ValueError, match="calibrate_anomalies"):
        fresh.anomaly_scores(data.matrix, reference="held-out")
    with pytest.raises(ValueError, match="reference"):
        fresh.anomaly_scores(data.matrix, reference="everyone")
    with pytest.raises(ValueError, match="at least 20"):
        fresh.calibrate_anomalies(data.matrix[:10])
    # Calibrate on half the users (as if held out): percentiles then compare with them.
    held = data.matrix[::2]
    fresh.calibrate_anomalies(held)
    stored = fresh.meta["anomaly_reference"]
    assert stored["source"] == "held-out" and stored["n_users"] == 30
    assert np.asarray(stored["quantiles"]).shape == (len(LENGTH_BIN_EDGES), N_QUANTILES)
    assert len(json.dumps(stored)) < 40_000
    held_scores = fresh.anomaly_scores(held, reference="training").scores
    assert min(min(row) for row in stored["quantiles"]) <= held_scores.min() + 1e-4
    auto = fresh.anomaly_scores(data.matrix)
    assert auto.reference == "held-out"
    np.testing.assert_allclose(
        auto.percentiles,
        AnomalyReference.from_dict(stored).percentiles(auto.scores, auto.history_lengths),
    )
    training = fresh.anomaly_scores(data.matrix, reference="training")
    assert training.reference == "training"
    np.testing.assert_allclose(training.scores, auto.scores)
    # The calibration travels with the bundle (meta.json), the format is unchanged.
    fresh.save(bundle, overwrite=True)
    loaded = Recommender.load(bundle)
    assert loaded.anomaly_reference_source() == "held-out"
    np.testing.assert_allclose(loaded.anomaly_scores(data.matrix).percentiles, auto.percentiles)
    np.testing.assert_array_equal(
        anomalous_users(loaded, data.matrix, 90.0), training.percentiles > 90.0
    )
    np.testing.assert_array_equal(
        anomalous_users(loaded, data.matrix, 90.0, reference="auto"), auto.percentiles > 90.0
    )
    loaded.meta["anomaly_reference"] = {"quantiles": "bad"}
    with pytest.raises(ValueError, match="malformed|quantiles"):
        loaded.anomaly_scores(data.matrix)


def _save_copy(rec: Recommender, path: Path) -> Path:
    return Recommender(
        rec.model, rec.config, rec.item_ids, user_ids=rec.user_ids, train_matrix=rec.train_matrix
    ).save(path)


# ------------------------------------------------------------------------------- confidence
def _ring(n_users: int, seed: int, n_items: int = 60, max_len: int = 40) -> Interactions:
    """Items on a circle, each user a random angle: more items pin the angle down better."""
    rng = np.random.default_rng(seed)
    theta = 2 * np.pi * np.arange(n_items) / n_items
    rows: list[list[int]] = []
    for _ in range(n_users):
        p = np.exp(4.0 * np.cos(theta - rng.uniform(0, 2 * np.pi)))
        n = int(np.exp(rng.uniform(0, np.log(max_len))))
        rows.append(list(rng.choice(n_items, n, replace=False, p=p / p.sum())))
    return Interactions(_csr(rows, n_items), np.arange(n_users), np.arange(n_items))


def test_confidence_grows_with_more_history_on_a_trained_toy() -> None:
    from recvae.training import train

    config = MultVAEConfig(
        hidden_dims=(32,),
        latent_dim=4,
        epochs=10,
        batch_size=32,
        learning_rate=1e-2,
        dropout=0.2,
        beta_max=1.0,
        seed=1,
    )
    toy = train(_ring(300, seed=0), config, options=RunOptions(device="cpu", progress=False))
    held_out = _ring(200, seed=5)
    rng = np.random.default_rng(0)
    long_users = [h for u in range(200) if len(h := held_out.history(u)) >= 16]
    assert len(long_users) >= 10
    prefixes = [rng.permutation(h) for h in long_users]
    means = [
        float(toy.confidence(_csr([list(p[:n]) for p in prefixes], toy.n_items)).mean())
        for n in (1, 2, 4, 8, 16)
    ]
    assert all(b > a for a, b in zip(means, means[1:], strict=False)), means
    assert means[-1] - means[0] > 0.05, means


def test_recommendations_carry_confidence(rec: Recommender) -> None:
    users = [0, 1, 2]
    result = rec.recommend(users, k=3)
    assert result.confidence is not None and result.confidence.shape == (3,)
    assert result.confidence.dtype == np.float32
    assert np.all((result.confidence >= 0) & (result.confidence <= 1))
    np.testing.assert_allclose(
        result.confidence, rec.confidence(rec.train_matrix[np.asarray(users)]), rtol=1e-6
    )
    histories = [list(rec.user_history(u)) for u in users]
    by_history = rec.recommend_histories(histories, k=3)
    np.testing.assert_allclose(by_history.confidence, result.confidence, rtol=1e-6)
    np.testing.assert_allclose(rec.confidence(histories), result.confidence, rtol=1e-6)
    _, sigma = rec.encode(rec.train_matrix[np.asarray(users)])
    np.testing.assert_allclose(result.confidence, 1 - np.minimum(sigma, 1).mean(axis=1), rtol=1e-5)


def test_posterior_confidence_edges() -> None:
    logvar = torch.tensor([[0.0, 0.0], [2.0, 4.0], [-np.inf, -np.inf], [0.0, -2 * np.log(2)]])
    np.testing.assert_allclose(posterior_confidence(logvar).numpy(), [0.0, 0.0, 1.0, 0.25])


def test_dae_has_no_posterior_confidence_or_exploration() -> None:
    dae = _tiny_untrained("multdae")
    assert dae.recommend([0, 1], k=2).confidence is None
    assert dae.recommend_from_history([10], k=2).confidence is None
    with pytest.raises(ValueError, match="posterior"):
        dae.confidence([[10]])
    with pytest.raises(ValueError, match="posterior"):
        dae.recommend([0], k=2, explore=True, seed=1)


# ------------------------------------------------------------------------------- exploration
def test_explore_is_deterministic_with_a_seed_and_differs_across_seeds(rec: Recommender) -> None:
    users = list(range(12))
    first = rec.recommend(users, k=8, explore=True, temperature=1.0, seed=7)
    again = rec.recommend(users, k=8, explore=True, temperature=1.0, seed=7)
    np.testing.assert_array_equal(first.item_idx, again.item_idx)
    np.testing.assert_array_equal(first.scores, again.scores)
    others = [rec.recommend(users, k=8, explore=True, seed=s).scores for s in (8, 9)]
    assert not np.array_equal(first.scores, others[0])
    assert not np.array_equal(others[0], others[1])
    unseeded = [rec.recommend(users, k=8, explore=True).scores for _ in range(2)]
    assert not np.array_equal(*unseeded)
    # Exploration changes the ranking, never the confidence or the seen-item exclusion.
    plain = rec.recommend(users, k=8)
    np.testing.assert_allclose(first.confidence, plain.confidence)
    for row, user in enumerate(users):
        assert not set(first.item_idx[row]) & set(rec.vocab.history(user).tolist())
    torch.testing.assert_close(
        rec.score_sampled(rec.train_matrix[:12], seed=7),
        rec.score_sampled(rec.train_matrix[:12], seed=7),
    )


def test_explore_sample_spreads_with_temperature(rec: Recommender) -> None:
    histories = rec.train_matrix[:20]
    base = rec.score(histories)
    gaps = [
        float((rec.score_sampled(histories, temperature=t, seed=3) - base).abs().mean())
        for t in (0.5, 1.0, 4.0)
    ]
    assert 0 < gaps[0] < gaps[1] < gaps[2]


def test_temperature_zero_equals_the_deterministic_ranking(rec: Recommender) -> None:
    users = list(range(20))
    plain = rec.recommend(users, k=10)
    zero = rec.recommend(users, k=10, explore=True, temperature=0.0, seed=5)
    np.testing.assert_array_equal(zero.item_idx, plain.item_idx)
    np.testing.assert_array_equal(zero.scores, plain.scores)
    history = list(rec.user_history(3))
    np.testing.assert_array_equal(
        rec.recommend_from_history(history, 5, explore=True, temperature=0).item_idx,
        rec.recommend_from_history(history, 5).item_idx,
    )
    torch.testing.assert_close(
        rec.score_sampled(rec.train_matrix[:5], temperature=0), rec.score(rec.train_matrix[:5])
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_explore_rejects_bad_arguments(rec: Recommender, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rec.recommend([0], k=3, explore=True, **kwargs)
    with pytest.raises(ValueError, match=message):
        rec.recommend_histories([[10]], k=3, explore=True, **kwargs)


def test_sample_latent_is_device_independent_and_scaled() -> None:
    mu, logvar = torch.zeros(4, 3), torch.full((4, 3), np.log(4.0))
    gen = torch.Generator().manual_seed(0)
    z = sample_latent(mu, logvar, temperature=0.5, generator=gen)
    eps = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, 0.5 * 2.0 * eps)


def test_intra_list_diversity_matches_brute_force(rng: np.random.Generator) -> None:
    emb = rng.normal(size=(15, 4))
    emb[3] = 0.0  # a zero embedding counts as orthogonal to every item
    idx = rng.integers(0, 15, size=(6, 5))
    idx[1, 3:] = -1  # padding is ignored
    idx[2, 1:] = -1  # one item: undefined
    got = intra_list_diversity(idx, emb)

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))

    for u, row in enumerate(idx):
        items = [i for i in row if i >= 0]
        pairs = [(a, b) for n, a in enumerate(items) for b in items[n + 1 :]]
        if not pairs:
            assert np.isnan(got[u])
            continue
        expected = np.mean([1 - cosine(emb[a], emb[b]) for a, b in pairs])
        np.testing.assert_allclose(got[u], expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(intra_list_diversity([[0, 0]], emb), [0.0], atol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        intra_list_diversity([[0, 15]], emb)


# ------------------------------------------------------------------------------- command line
def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_anomalies_ranks_an_injected_user_first(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _ = make_checkerboard()
    coo = sp.coo_array(data.matrix)
    lines = ["user_id,item_id"]
    lines += [
        f"{data.user_ids[u]},{data.item_ids[i]}" for u, i in zip(coo.row, coo.col, strict=True)
    ]
    # A user mixing both halves of the checkerboard, plus an item the model never saw.
    lines += [f"999,{item}" for item in (0, 10, 20, 30, 40, 50, 60, 70, 12345)]
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    code, out, _ = _run(
        ["anomalies", str(tiny_bundle), "--data", str(path), "--top", "3", "--json"], capsys
    )
    assert code == 0
    payload = json.loads(out)
    assert payload["n_users"] == 61 and len(payload["users"]) == 3
    top = payload["users"][0]
    assert top["user_id"] == 999 and top["history_length"] == 8 and top["unknown_items"] == 1
    assert top["percentile"] == 100.0
    scores = [u["score"] for u in payload["users"]]
    assert scores == sorted(scores, reverse=True)
    code, out, _ = _run(
        [
            "anomalies",
            str(tiny_bundle),
            "--data",
            str(path),
            "--above-percentile",
            "99.9",
            "--json",
        ],
        capsys,
    )
    listed = json.loads(out)["users"]
    assert code == 0 and listed[0]["user_id"] == 999
    assert all(u["percentile"] > 99.9 for u in listed)
    assert payload["reference"] == "training"  # the tiny bundle has no held-out calibration
    code, _, err = _run(
        ["anomalies", str(tiny_bundle), "--data", str(path), "--reference", "held-out"], capsys
    )
    assert code != 0 and "calibrate_anomalies" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["anomalies", "/no/bundle"], "no model bundle"),
        (["anomalies", "BUNDLE", "--top", "0"], "--top"),
        (["anomalies", "BUNDLE", "--above-percentile", "101"], "--above-percentile"),
        (["recommend", "BUNDLE", "10", "--seed", "1"], "only with --explore"),
        (["recommend", "BUNDLE", "10", "--explore", "--temperature", "-1"], "temperature"),
    ],
)
def test_cli_bad_input_gives_message_and_nonzero_exit(
    argv: list[str], message: str, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tiny_bundle) if a == "BUNDLE" else a for a in argv]
    code, _, err = _run(argv, capsys)
    assert code != 0 and message in err and err.startswith("recvae: error:")


def test_cli_recommend_explore(tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["recommend", str(tiny_bundle), "0", "20", "-k", "6", "--json"]

    def items(extra: list[str]) -> tuple[list[int], float]:
        code, out, _ = _run([*base, *extra], capsys)
        assert code == 0
        payload = json.loads(out)
        return [i["item_id"] for i in payload["items"]], payload["confidence"]

    plain, confidence = items([])
    assert 0 <= confidence <= 1
    assert items(["--explore", "--temperature", "0"])[0] == plain
    seeded = items(["--explore", "--temperature", "3", "--seed", "4"])[0]
    assert seeded == items(["--explore", "--temperature", "3", "--seed", "4"])[0]
    assert (
        len(
            {
                tuple(items(["--explore", "--temperature", "3", "--seed", str(s)])[0])
                for s in range(6)
            }
        )
        > 1
    )
    code, out, _ = _run(["recommend", str(tiny_bundle), "0", "20", "-k", "2"], capsys)
    assert code == 0 and "confidence" in out
