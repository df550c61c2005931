"""Baselines: closed forms against plain references, fold-in correctness, lambda selection."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recvae.baselines import (
    EASE,
    ALSConfig,
    BPRConfig,
    EASEConfig,
    ItemKNNConfig,
    Popularity,
    PopularityConfig,
    baseline_config_from_dict,
    ease_weights,
    select_ease_lambda,
)
from recvae.data import Interactions
from recvae.evaluation import evaluate, mask_history, topk_indices
from recvae.split import HeldOut, split_users


def _random_interactions(
    rng: np.random.Generator, n_users: int, n_items: int, density: float
) -> Interactions:
    dense = rng.random((n_users, n_items)) < density
    dense[np.arange(n_users), rng.integers(0, n_items, n_users)] = True  # no empty user
    return Interactions(
        sp.csr_array(dense.astype(np.float32)), np.arange(n_users), np.arange(n_items)
    )


def _ease_reference(x: np.ndarray, regularization: float) -> np.ndarray:
    """Steck (2019), written as in the paper: B = I - P diagMat(1 / diag(P)), diag(B) = 0."""
    gram = x.T @ x + regularization * np.eye(x.shape[1])
    p = np.linalg.inv(gram)
    b = np.eye(x.shape[1]) - p @ np.diag(1.0 / np.diag(p))
    np.fill_diagonal(b, 0.0)
    return b


def _withheld_rank(ranker, data: Interactions, withheld: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Rank (0 = first) of each user's withheld item among the items not in its history."""
    raw = ranker.score(data.matrix)
    scores = torch.as_tensor(np.asarray(raw, dtype=np.float64)).clone()
    mask_history(scores, data.matrix)
    top = topk_indices(scores, data.n_items).numpy()
    return np.asarray(
        [int(np.flatnonzero(row == w)[0]) for row, w in zip(top, withheld, strict=True)]
    )


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    "config",
    [
        PopularityConfig(),
        EASEConfig(regularization=250.0, dtype="float32"),
        ALSConfig(factors=32, regularization=0.5, alpha=2.0, iterations=3, use_cg=False, seed=3),
        BPRConfig(factors=16, learning_rate=0.05, iterations=10, fold_in_steps=50),
        ItemKNNConfig(similarity="bm25", neighbours=50, bm25_k1=1.0, bm25_b=0.5),
    ],
)
def test_config_round_trip(config) -> None:  # type: ignore[no-untyped-def]
    data = config.to_dict()
    assert data["model"] == config.model
    assert baseline_config_from_dict(data) == config


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"model": "ease", "regularization": 0}, "regularization"),
        ({"model": "ease", "regularization": float("nan")}, "regularization"),
        ({"model": "ease", "dtype": "float16"}, "dtype"),
        ({"model": "als", "factors": 0}, "factors"),
        ({"model": "als", "iterations": 2.5}, "iterations"),
        ({"model": "bpr", "learning_rate": -1.0}, "learning_rate"),
        ({"model": "itemknn", "similarity": "jaccard"}, "similarity"),
        ({"model": "itemknn", "bm25_b": 2.0}, "bm25_b"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(data: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=f"'{field}'"):
        baseline_config_from_dict(data)


def test_config_rejects_unknown_keys_and_models() -> None:
    with pytest.raises(ValueError, match="lambda_"):
        baseline_config_from_dict({"model": "ease", "lambda_": 3})
    with pytest.raises(ValueError, match="unknown baseline 'svd'"):
        baseline_config_from_dict({"model": "svd"})
    with pytest.raises(ValueError, match="not 'ease'"):
        EASEConfig.from_dict({"model": "als"})


# ------------------------------------------------------------------------------ popularity
def test_popularity_scores_are_training_counts(rng: np.random.Generator) -> None:
    train = _random_interactions(rng, 40, 12, 0.3)
    model = Popularity().fit(train)
    histories = _random_interactions(rng, 5, 12, 0.2).matrix
    scores = np.asarray(model.score(histories))
    assert scores.shape == (5, 12)
    counts = train.matrix.sum(axis=0)
    np.testing.assert_array_equal(scores, np.broadcast_to(counts, (5, 12)))
    # Ordering: most popular first, ties by lower item index, history items left out.
    top = topk_indices(mask_history(torch.as_tensor(scores).clone(), histories), 12).numpy()
    for row, history in zip(top, histories.toarray(), strict=True):
        expected = sorted(np.flatnonzero(history == 0), key=lambda i: (-counts[i], i))
        assert row[: len(expected)].tolist() == expected


def test_unfitted_and_wrong_width_errors(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="not fitted"):
        Popularity().score(sp.csr_array((1, 3)))
    with pytest.raises(ValueError, match="not fitted"):
        EASE().score(sp.csr_array((1, 3)))
    model = EASE(EASEConfig(regularization=1.0)).fit(_random_interactions(rng, 10, 6, 0.4))
    with pytest.raises(ValueError, match=r"shape \(n, 6\)"):
        model.score(sp.csr_array((2, 5)))
    empty = Interactions(sp.csr_array((3, 4), dtype=np.float32), np.arange(3), np.arange(4))
    with pytest.raises(ValueError, match="empty"):
        EASE().fit(empty)


# ------------------------------------------------------------------------------ EASE
@pytest.mark.parametrize(("n_users", "n_items", "regularization"), [(30, 7, 0.5), (50, 23, 10.0)])
def test_ease_matches_dense_reference(
    rng: np.random.Generator, n_users: int, n_items: int, regularization: float
) -> None:
    train = _random_interactions(rng, n_users, n_items, 0.3)
    expected = _ease_reference(train.matrix.toarray().astype(np.float64), regularization)
    model = EASE(EASEConfig(regularization=regularization, dtype="float64")).fit(train)
    assert isinstance(model.weights, np.ndarray)
    np.testing.assert_allclose(model.weights, expected, atol=1e-10)
    assert np.all(np.diag(model.weights) == 0.0)
    histories = _random_interactions(rng, 6, n_items, 0.3).matrix
    np.testing.assert_allclose(model.score(histories), histories.toarray() @ expected, atol=1e-10)
    # float32 in place agrees to single precision; torch (the CUDA path, run on the CPU) too.
    single = EASE(EASEConfig(regularization=regularization, dtype="float32")).fit(train)
    assert single.weights.dtype == np.float32
    np.testing.assert_allclose(single.weights, expected, atol=2e-4)
    from recvae.baselines import _ease_weights_torch, _sparse_gram

    gram = _sparse_gram(train.matrix, np.dtype(np.float64))
    weights = _ease_weights_torch(gram, regularization, torch.device("cpu"), torch.float64)
    np.testing.assert_allclose(weights.numpy(), expected, atol=1e-10)


def test_ease_in_place_symmetrization_across_blocks(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import recvae.baselines as baselines

    monkeypatch.setattr(baselines, "_SYMMETRIZE_BLOCK", 4)  # 4 blocks for 15 items
    train = _random_interactions(rng, 60, 15, 0.3)
    x = train.matrix.toarray().astype(np.float64)
    gram = x.T @ x
    weights = ease_weights(gram.copy(), 3.0, dtype=np.float64)
    np.testing.assert_allclose(weights, _ease_reference(x, 3.0), atol=1e-10)
    # A dense C-ordered input of the right dtype is overwritten and returned (no copy).
    buffer = gram.copy()
    assert ease_weights(buffer, 3.0, dtype=np.float64) is buffer
    with pytest.raises(ValueError, match="regularization"):
        ease_weights(gram, 0.0)
    with pytest.raises(ValueError, match="square"):
        ease_weights(np.zeros((2, 3)), 1.0)
    bad = gram.copy()
    bad[0, 0] = -1e6
    with pytest.raises(ValueError, match="positive definite"):
        ease_weights(bad, 1.0)


def test_ease_ranks_the_withheld_checkerboard_item_first(checkerboard) -> None:  # type: ignore[no-untyped-def]
    data, withheld = checkerboard
    model = EASE(EASEConfig(regularization=1.0)).fit(data)
    assert np.all(_withheld_rank(model, data, withheld) == 0)


def test_lambda_selection_uses_validation_only(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import recvae.baselines as baselines

    data = _random_interactions(rng, 160, 30, 0.25)
    split = split_users(data, n_heldout=30, seed=5)
    lambdas = [0.5, 5.0, 50.0, 500.0]
    seen: list[sp.csr_array] = []
    real_evaluate = baselines.evaluate

    def spy(ranker, fold_in, targets, **kwargs):  # type: ignore[no-untyped-def]
        seen.extend([fold_in, targets])
        return real_evaluate(ranker, fold_in, targets, **kwargs)

    monkeypatch.setattr(baselines, "evaluate", spy)
    selection = select_ease_lambda(split.train, split.validation, lambdas)
    # Only the validation matrices were ever scored.
    allowed = {id(split.validation.fold_in.matrix), id(split.validation.targets.matrix)}
    assert seen and {id(m) for m in seen} <= allowed
    # The scores are the validation NDCG@100 of each lambda, and the best is their argmax.
    for value in lambdas:
        model = EASE(EASEConfig(regularization=value)).fit(split.train)
        expected = real_evaluate(
            model, split.validation.fold_in.matrix, split.validation.targets.matrix, ks=(100,)
        ).mean("ndcg@100")
        assert selection.scores[value] == pytest.approx(expected, abs=1e-12)
    assert selection.best == max(lambdas, key=lambda v: (selection.scores[v], -lambdas.index(v)))
    assert selection.model.config.regularization == selection.best
    assert selection.metric == "ndcg@100"


def test_lambda_selection_follows_the_validation_targets(rng: np.random.Generator) -> None:
    # The same training data and fold-in; two different target sets pick different lambdas,
    # which shows the choice is driven by the validation users handed in.
    train = _random_interactions(rng, 120, 25, 0.3)
    fold_in = _random_interactions(rng, 40, 25, 0.2)
    lambdas = [0.1, 1000.0]
    scores = {
        value: EASE(EASEConfig(regularization=value)).fit(train).score(fold_in.matrix)
        for value in lambdas
    }
    picks = set()
    for favoured in lambdas:
        masked = mask_history(np.array(scores[favoured]), fold_in.matrix)
        top = topk_indices(masked, 3).numpy()
        rows = np.repeat(np.arange(40), 3)
        targets = sp.csr_array(
            (np.ones(rows.size, dtype=np.float32), (rows, top.ravel())), shape=(40, 25)
        )
        held = HeldOut(fold_in, Interactions(targets, fold_in.user_ids, fold_in.item_ids))
        picks.add(select_ease_lambda(train, held, lambdas).best)
    assert picks == set(lambdas)


def test_lambda_selection_rejects_bad_candidates(rng: np.random.Generator) -> None:
    split = split_users(_random_interactions(rng, 60, 10, 0.4), n_heldout=10, seed=1)
    with pytest.raises(ValueError, match="at least one"):
        select_ease_lambda(split.train, split.validation, [])
    with pytest.raises(ValueError, match="> 0"):
        select_ease_lambda(split.train, split.validation, [10.0, -1.0])
    with pytest.raises(ValueError, match="metric"):
        select_ease_lambda(split.train, split.validation, [1.0], metric="ndcg")


# ------------------------------------------------------------------------------ implicit
implicit_baselines = pytest.importorskip("recvae.baselines_implicit")


def test_als_fold_in_recovers_the_trained_user_factors(rng: np.random.Generator) -> None:
    train = _random_interactions(rng, 80, 30, 0.2)
    config = ALSConfig(factors=6, regularization=1.0, iterations=60, use_cg=False, seed=2)
    model = implicit_baselines.ALS(config).fit(train)
    folded = model.user_factors(train.matrix)
    trained = model.model.user_factors
    # Training's last user step used the item factors of the step before; at convergence the
    # exact fold-in solve gives the same factors.
    np.testing.assert_allclose(folded, trained, rtol=0, atol=2e-3 * np.abs(trained).max())
    scores = model.score(train.matrix[:7])
    np.testing.assert_allclose(scores, folded[:7] @ model.model.item_factors.T, rtol=1e-5)


def test_implicit_baselines_rank_the_withheld_checkerboard_item_first(checkerboard) -> None:  # type: ignore[no-untyped-def]
    data, withheld = checkerboard
    als = implicit_baselines.ALS(ALSConfig(factors=4, regularization=0.1, iterations=20)).fit(data)
    knn = implicit_baselines.ItemKNN(ItemKNNConfig(neighbours=20)).fit(data)
    bpr = implicit_baselines.BPR(
        BPRConfig(factors=8, learning_rate=0.05, iterations=200, fold_in_steps=100)
    ).fit(data)
    assert np.all(_withheld_rank(als, data, withheld) == 0)
    assert np.all(_withheld_rank(knn, data, withheld) == 0)
    # BPR's bias term can put another same-parity item ahead; the withheld one is near the top.
    assert np.mean(_withheld_rank(bpr, data, withheld) < 3) >= 0.9


@pytest.mark.filterwarnings("ignore::implicit.utils.ParameterWarning")
@pytest.mark.parametrize("similarity", ["cosine", "bm25", "tfidf"])
def test_item_knn_scores_match_implicit_recommend(
    rng: np.random.Generator, similarity: str
) -> None:
    train = _random_interactions(rng, 60, 20, 0.25)
    model = implicit_baselines.ItemKNN(ItemKNNConfig(similarity=similarity, neighbours=5)).fit(
        train
    )
    histories = _random_interactions(rng, 4, 20, 0.2).matrix
    scores = model.score(histories)
    ours = mask_history(np.array(scores, dtype=np.float64), histories)
    rows = sp.csr_matrix(histories)
    ids, values = _implicit_knn(similarity, train, rows)
    history = histories.toarray() > 0
    for u in range(4):
        # implicit pads its list with id -1; the history items it lists score 0 there.
        listed = ids[u][ids[u] >= 0]
        scored = values[u][ids[u] >= 0]
        fresh = ~history[u, listed]
        np.testing.assert_allclose(ours[u, listed[fresh]], scored[fresh], rtol=1e-5)
        assert np.all(np.isinf(ours[u, history[u]]))
        assert np.all(ours[u, np.setdiff1d(np.arange(20), listed)] == 0.0)


def _implicit_knn(similarity: str, train: Interactions, rows: sp.csr_matrix):  # type: ignore[no-untyped-def]
    import implicit.nearest_neighbours as nn

    cls = {"cosine": nn.CosineRecommender, "bm25": nn.BM25Recommender, "tfidf": nn.TFIDFRecommender}
    model = cls[similarity](K=5, num_threads=1)
    model.fit(sp.csr_matrix(train.matrix), show_progress=False)
    return model.recommend(np.arange(rows.shape[0]), rows, N=20)


def test_bpr_fold_in_is_deterministic_and_batch_independent(rng: np.random.Generator) -> None:
    train = _random_interactions(rng, 80, 25, 0.2)
    model = implicit_baselines.BPR(BPRConfig(factors=6, iterations=20, fold_in_steps=30)).fit(train)
    histories = _random_interactions(rng, 6, 25, 0.2).matrix
    batch = model.score(histories)
    np.testing.assert_array_equal(batch, model.score(histories))
    for u in (0, 3, 5):
        np.testing.assert_allclose(model.score(histories[[u]])[0], batch[u], rtol=1e-5, atol=1e-7)
    # An empty history keeps w = 0: its scores are the item biases.
    empty = model.score(sp.csr_array((1, 25), dtype=np.float32))
    np.testing.assert_allclose(empty[0], model.model.item_factors[:, -1], rtol=1e-6)


def test_bpr_fold_in_maximizes_the_bpr_objective(rng: np.random.Generator) -> None:
    # With the item side frozen, the folded-in vector should do at least as well on the BPR
    # objective of a training user as the vector SGD training left for that user.
    train = _random_interactions(rng, 80, 25, 0.2)
    config = BPRConfig(factors=6, learning_rate=0.05, iterations=30, fold_in_steps=200)
    model = implicit_baselines.BPR(config).fit(train)
    items, bias = model.model.item_factors[:, :-1], model.model.item_factors[:, -1]

    def objective(w: np.ndarray, history: np.ndarray) -> float:
        scores = items @ w + bias
        margin = scores[history][:, None] - scores[~history][None, :]
        return float(np.mean(-np.logaddexp(0.0, -margin)) - config.regularization * w @ w / 2)

    folded = model.user_factors(train.matrix)
    gains = []
    for u in range(train.n_users):
        history = train.matrix[[u]].toarray()[0] > 0
        trained = model.model.user_factors[u, :-1]
        gains.append(objective(folded[u], history) - objective(trained, history))
        assert objective(folded[u], history) > objective(np.zeros(6), history)
    assert np.median(gains) > -1e-3


def test_implicit_baselines_score_on_the_shared_evaluation(rng: np.random.Generator) -> None:
    data = _random_interactions(rng, 150, 40, 0.2)
    split = split_users(data, n_heldout=20, seed=3)
    for model in (
        implicit_baselines.ALS(ALSConfig(factors=8, iterations=5)),
        implicit_baselines.BPR(BPRConfig(factors=8, iterations=10, fold_in_steps=20)),
        implicit_baselines.ItemKNN(ItemKNNConfig(neighbours=10)),
    ):
        model.fit(split.train)
        assert model.fit_seconds is not None and model.n_items == split.train.n_items
        result = evaluate(model, split.test.fold_in.matrix, split.test.targets.matrix)
        assert 0.0 <= result.mean("ndcg@100") <= 1.0
        with pytest.raises(ValueError, match="shape"):
            model.score(sp.csr_array((1, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="num_threads"):
        implicit_baselines.ALS(num_threads=0)
