"""Library inputs of training, evaluation, splits, baselines, ensembles and blends: wrong item
orders, empty validation, overlapping fold-in and targets, bad seeds, metrics, types, devices
and NumPy numbers are refused at the entry point with a message that names the argument."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recvae.baselines import (
    EASE,
    ALSConfig,
    BPRConfig,
    EASEConfig,
    Popularity,
    select_ease_lambda,
)
from recvae.blend import Blend, select_blend_weight
from recvae.config import MultDAEConfig, MultVAEConfig, RunOptions
from recvae.ensemble import Ensemble
from recvae.evaluation import evaluate, topk_indices
from recvae.recommender import Recommender
from recvae.split import HeldOut, Split, split_users
from recvae.training import Trainer, train
from tests.conftest import make_checkerboard, small_vae_config

OPTIONS = RunOptions(device="cpu", progress=False)


@pytest.fixture(scope="module")
def split() -> Split:
    data, _ = make_checkerboard(80, 20)
    return split_users(data, n_heldout=10, seed=3, min_target_user_count=2)


@pytest.fixture(scope="module")
def rec(split: Split) -> Recommender:
    return train(split.train, small_vae_config(epochs=1), options=OPTIONS)


@pytest.fixture(scope="module")
def ease(split: Split) -> EASE:
    return EASE(EASEConfig(regularization=10.0)).fit(split.train)


def _reversed_items(held_out: HeldOut) -> HeldOut:
    order = np.arange(held_out.fold_in.n_items)[::-1]
    return HeldOut(held_out.fold_in.subset_items(order), held_out.targets.subset_items(order))


def _without_targets() -> Split:
    data, _ = make_checkerboard(80, 20)
    return split_users(data, n_heldout=10, seed=3, min_target_user_count=10**6)


# ------------------------------------------------------------------ item vocabulary (item 4)
def test_train_rejects_validation_with_the_same_items_in_another_order(split: Split) -> None:
    with pytest.raises(ValueError, match="another order"):
        train(
            split.train,
            small_vae_config(epochs=1),
            validation=_reversed_items(split.validation),
            options=OPTIONS,
        )
    with pytest.raises(ValueError, match="validation.*the training data"):
        Trainer(
            split.train, small_vae_config(epochs=1), validation=_reversed_items(split.validation)
        )


def test_train_accepts_validation_over_the_training_items(split: Split) -> None:
    result = train(
        split.train, small_vae_config(epochs=1), validation=split.validation, options=OPTIONS
    )
    assert math.isfinite(result.meta["val_ndcg@100"])


def test_ensemble_and_blend_reject_members_over_items_in_another_order(
    split: Split, rec: Recommender, ease: EASE
) -> None:
    order = np.arange(split.train.n_items)[::-1]
    other = EASE(EASEConfig(regularization=10.0)).fit(split.train.subset_items(order))
    with pytest.raises(ValueError, match=r"members\[1\] and members\[0\].*another order"):
        Ensemble([rec, other])
    with pytest.raises(ValueError, match="first ranker and the second ranker.*another order"):
        Blend(rec, other, 0.5)
    popularity = Popularity().fit(split.train.subset_items(order))
    with pytest.raises(ValueError, match="another order"):
        Ensemble([ease, popularity])
    Ensemble([rec, ease])  # the same items in the same order are fine
    Blend(rec, ease, 0.5)


def test_selections_reject_validation_over_items_in_another_order(
    split: Split, rec: Recommender, ease: EASE
) -> None:
    reversed_validation = _reversed_items(split.validation)
    with pytest.raises(ValueError, match="validation and the first ranker.*another order"):
        select_blend_weight(rec, ease, reversed_validation, weights=[0.0, 1.0])
    with pytest.raises(ValueError, match="validation and the training data.*another order"):
        select_ease_lambda(split.train, reversed_validation, [10.0])


# ------------------------------------------------------------------ no validation target (5)
def test_split_users_warns_when_held_out_users_have_no_target(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="recvae.split"):
        result = _without_targets()
    assert result.validation.n_users_with_targets == 0
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("validation set has no user with targets" in m for m in messages)
    assert any("test set has no user with targets" in m for m in messages)


def test_split_users_does_not_warn_when_held_out_users_have_targets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data, _ = make_checkerboard(80, 20)
    with caplog.at_level(logging.WARNING, logger="recvae.split"):
        split_users(data, n_heldout=10, seed=3, min_target_user_count=2)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_train_and_selections_refuse_validation_without_targets() -> None:
    empty = _without_targets()
    with pytest.raises(ValueError, match="validation has no user with targets"):
        train(
            empty.train,
            small_vae_config(epochs=3, patience=1),
            validation=empty.validation,
            options=OPTIONS,
        )
    model = EASE(EASEConfig(regularization=10.0)).fit(empty.train)
    with pytest.raises(ValueError, match="validation has no user with targets"):
        select_blend_weight(model, model, empty.validation, weights=[0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="validation has no user with targets"):
        select_ease_lambda(empty.train, empty.validation, [10.0, 100.0])


# ------------------------------------------------------------------ fold-in vs targets (6)
def test_evaluate_refuses_overlapping_fold_in_and_targets(split: Split, rec: Recommender) -> None:
    fold_in, targets = split.test.fold_in.matrix, split.test.targets.matrix
    with pytest.raises(ValueError, match=f"overlap in {fold_in.nnz} \\(user, item\\) pairs"):
        evaluate(rec, fold_in, fold_in)
    both = sp.csr_array(fold_in + targets)
    with pytest.raises(ValueError, match=f"overlap in {targets.nnz} "):
        evaluate(rec, both, targets)
    result = evaluate(rec, fold_in, targets, ks=(5,))
    assert math.isfinite(result.mean("ndcg@5"))


def test_evaluate_ignores_stored_zeros_when_checking_overlap(rec: Recommender) -> None:
    n_items = rec.n_items
    fold_in = sp.csr_array(
        (np.array([1.0, 0.0], dtype=np.float32), (np.array([0, 0]), np.array([0, 2]))),
        shape=(1, n_items),
    )
    targets = sp.csr_array(
        (np.array([1.0], dtype=np.float32), (np.array([0]), np.array([2]))), shape=(1, n_items)
    )
    evaluate(rec, fold_in, targets, ks=(3,))  # the stored zero is not a fold-in item


# ------------------------------------------------------------------ +inf ties (8)
def test_topk_breaks_ties_of_plus_infinity_by_lower_index() -> None:
    assert topk_indices(torch.full((1, 10), math.inf), 5).tolist() == [[0, 1, 2, 3, 4]]
    scores = torch.zeros(1, 1000)
    scores[0, ::7] = math.inf
    assert topk_indices(scores, 3).tolist() == [[0, 7, 14]]
    mixed = torch.tensor([[0.0, math.inf, 1.0, math.inf, math.inf, -math.inf]])
    assert topk_indices(mixed, 2).tolist() == [[1, 3]]
    assert topk_indices(mixed, 4).tolist() == [[1, 3, 4, 2]]


# ------------------------------------------------------------------ seeds (12)
@pytest.mark.parametrize("seed", [-1, 2**63, 2**70, 1.5, "1", None, True])
def test_configs_reject_seeds_outside_int64(seed: Any) -> None:
    with pytest.raises(ValueError, match="invalid config field 'seed'"):
        MultVAEConfig(seed=seed)
    with pytest.raises(ValueError, match="invalid config field 'seed'"):
        ALSConfig(seed=seed)
    with pytest.raises(ValueError, match="invalid config field 'seed'"):
        BPRConfig(seed=seed)


def test_configs_accept_the_largest_seed() -> None:
    assert MultVAEConfig(seed=2**63 - 1).seed == 2**63 - 1
    assert MultDAEConfig(seed=np.uint64(5)).seed == 5


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "a", None, True])
def test_split_users_rejects_bad_seeds(seed: Any) -> None:
    data, _ = make_checkerboard(40, 10)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        split_users(data, n_heldout=5, seed=seed)


def test_split_users_accepts_numpy_seeds() -> None:
    data, _ = make_checkerboard(40, 10)
    split = split_users(data, n_heldout=5, seed=np.int64(7))
    assert split.seed == 7 and type(split.seed) is int


# ------------------------------------------------------------------ select_metric (13)
@pytest.mark.parametrize("metric", ["foo@bar", "ndcg@0", "auc@10", "ndcg", "@5", "ndcg@-1"])
def test_config_rejects_bad_select_metric(metric: str) -> None:
    with pytest.raises(ValueError, match="invalid config field 'select_metric'"):
        MultVAEConfig(select_metric=metric)


@pytest.mark.parametrize("metric", ["ndcg@100", "recall@20", "recall_plain@5", "mrr@1"])
def test_config_accepts_metrics_that_validation_computes(metric: str) -> None:
    assert MultVAEConfig(select_metric=metric).select_metric == metric


def test_select_ease_lambda_checks_the_metric_before_the_gram_matrix(
    split: Split, monkeypatch: pytest.MonkeyPatch
) -> None:
    import recvae.baselines

    def no_gram(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the Gram matrix was computed before the metric was checked")

    monkeypatch.setattr(recvae.baselines, "_sparse_gram", no_gram)
    for metric in ("auc@10", "coverage@10", "ndcg@x"):
        with pytest.raises(ValueError, match="metric must look like 'ndcg@100'"):
            select_ease_lambda(split.train, split.validation, [10.0], metric=metric)


# ------------------------------------------------------------------ object types (14)
def test_train_names_wrong_argument_types(split: Split) -> None:
    config = small_vae_config(epochs=1)
    with pytest.raises(TypeError, match="split.train"):
        train(split, config, options=OPTIONS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be a model config.*dict"):
        train(split.train, {"model": "multvae"}, options=OPTIONS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="options must be a RunOptions, got dict"):
        train(split.train, config, options={"device": "cpu"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="validation must be a HeldOut.*Interactions"):
        train(
            split.train,
            config,
            validation=split.validation.fold_in,  # type: ignore[arg-type]
            options=OPTIONS,
        )
    with pytest.raises(TypeError, match="split.validation"):
        train(split.train, config, validation=split, options=OPTIONS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_epoch must be callable"):
        train(split.train, config, options=OPTIONS, on_epoch=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="split.train"):
        Trainer(split, config)  # type: ignore[arg-type]


def test_baselines_name_wrong_argument_types(split: Split, rec: Recommender, ease: EASE) -> None:
    with pytest.raises(TypeError, match="train must be an Interactions.*csr_array"):
        EASE().fit(split.train.matrix)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="split.train"):
        EASE().fit(split)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="split.train"):
        Popularity().fit(split)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be EASEConfig.*dict"):
        EASE({"regularization": 10})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be EASEConfig.*MultVAEConfig"):
        EASE(MultVAEConfig())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="split.validation"):
        select_blend_weight(rec, ease, split)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="split.validation"):
        select_ease_lambda(split.train, split, [10.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"members\[1\] must be a Ranker.*int"):
        Ensemble([rec, 5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="second must be a Ranker"):
        Blend(rec, "ease", 0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ranker must be a Ranker"):
        evaluate(
            "model",  # type: ignore[arg-type]
            split.test.fold_in.matrix,
            split.test.targets.matrix,
        )


# ------------------------------------------------------------------ devices (16)
def test_device_strings_give_the_friendly_message(
    split: Split, rec: Recommender, ease: EASE
) -> None:
    fold_in, targets = split.test.fold_in.matrix, split.test.targets.matrix
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        evaluate(rec, fold_in, targets, device="gpu")
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        Ensemble([rec], device="gpu")
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        Blend(rec, ease, 0.5, device="gpu")
    assert evaluate(rec, fold_in, targets, ks=(5,), device=torch.device("cpu")).n_users > 0


@pytest.mark.parametrize("device", ["cudaX", "gpu", "cuda:", "cuda:x", "CPU"])
def test_run_options_reject_malformed_devices(device: str) -> None:
    with pytest.raises(ValueError, match="invalid config field 'device'"):
        RunOptions(device=device)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_run_options_accept_device_names(device: str) -> None:
    assert RunOptions(device=device).device == device


# ------------------------------------------------------------------ numbers as strings (17)
def test_split_users_names_numbers_given_as_strings() -> None:
    data, _ = make_checkerboard(40, 10)
    with pytest.raises(TypeError, match="holdout_fraction must be a number"):
        split_users(data, n_heldout=5, holdout_fraction="0.2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="min_target_user_count must be an int"):
        split_users(data, n_heldout=5, min_target_user_count="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="min_target_user_count must be an int"):
        split_users(data, n_heldout=5, min_target_user_count=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="data must be an Interactions"):
        split_users(data.matrix, n_heldout=5)  # type: ignore[arg-type]


def test_evaluate_names_wrongly_typed_arguments(split: Split, rec: Recommender) -> None:
    fold_in, targets = split.test.fold_in.matrix, split.test.targets.matrix
    with pytest.raises(TypeError, match="batch_size must be an int, got 10.5"):
        evaluate(rec, fold_in, targets, batch_size=10.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="batch_size must be an int, got '10'"):
        evaluate(rec, fold_in, targets, batch_size="10")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"metrics must be a sequence of names such as \['ndcg'\]"):
        evaluate(rec, fold_in, targets, metrics="ndcg")
    with pytest.raises(TypeError, match="ks must be a sequence"):
        evaluate(rec, fold_in, targets, ks=20)  # type: ignore[arg-type]
    result = evaluate(rec, fold_in, targets, ks=(5,), batch_size=np.int64(3), metrics=["ndcg"])
    assert list(result.per_user) == ["ndcg@5"]


def test_selections_name_wrongly_typed_candidates(
    split: Split, rec: Recommender, ease: EASE
) -> None:
    with pytest.raises(TypeError, match="weights must be a sequence of numbers"):
        select_blend_weight(rec, ease, split.validation, weights="0.5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="every entry of weights must be a number"):
        select_blend_weight(rec, ease, split.validation, weights=["0.5"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="lambdas must be a sequence of numbers"):
        select_ease_lambda(split.train, split.validation, 100)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="every lambda must be a number"):
        select_ease_lambda(split.train, split.validation, ["100"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="every entry of weights must be a number"):
        Ensemble([rec, ease], weights=["1", "1"])  # type: ignore[list-item]
    selection = select_blend_weight(rec, ease, split.validation, weights=np.array([0.0, 0.5]))
    assert selection.best in (0.0, 0.5)


# ------------------------------------------------------------------ NumPy numbers (22)
def test_configs_accept_numpy_numbers_and_store_python_ones() -> None:
    config = MultVAEConfig(
        epochs=np.int64(2),
        latent_dim=np.int32(8),
        hidden_dims=(np.int64(16),),
        batch_size=np.int64(4),
        learning_rate=np.float32(1e-3),
        dropout=np.float32(0.5),
        beta_max=np.float32(0.2),
        patience=np.int64(2),
        seed=np.int64(3),
    )
    for name in ("epochs", "latent_dim", "batch_size", "patience", "seed"):
        assert type(getattr(config, name)) is int, name
    for name in ("learning_rate", "dropout", "beta_max"):
        assert type(getattr(config, name)) is float, name
    assert config.hidden_dims == (16,) and type(config.hidden_dims[0]) is int
    assert MultVAEConfig.from_dict(config.to_dict()) == config
    assert config.to_json()  # JSON-ready: no NumPy scalars left
    grid = [MultVAEConfig(latent_dim=d) for d in np.arange(4, 12, 4)]
    assert [c.latent_dim for c in grid] == [4, 8]
    ease = EASEConfig(regularization=np.float32(10.0))
    assert ease.regularization == 10.0 and type(ease.regularization) is float
    assert ALSConfig(factors=np.int64(4)).factors == 4
    options = RunOptions(eval_batch_size=np.int64(64), num_threads=np.int32(1))
    assert type(options.eval_batch_size) is int and type(options.num_threads) is int


def test_configs_still_reject_bools_and_strings_for_numbers() -> None:
    with pytest.raises(ValueError, match="invalid config field 'epochs'"):
        MultVAEConfig(epochs=True)
    with pytest.raises(ValueError, match="invalid config field 'learning_rate'"):
        MultVAEConfig(learning_rate="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid config field 'latent_dim'"):
        MultVAEConfig(latent_dim=np.float64(8.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid config field 'dropout'"):
        MultVAEConfig(dropout=np.bool_(True))  # type: ignore[arg-type]


def test_blend_accepts_a_numpy_weight(rec: Recommender, ease: EASE) -> None:
    blend = Blend(rec, ease, np.float32(0.5))  # type: ignore[arg-type]
    assert blend.weight == 0.5 and type(blend.weight) is float
    with pytest.raises(ValueError, match="weight must be a number"):
        Blend(rec, ease, True)


def test_item_ids_are_recorded_by_fitted_baselines(split: Split) -> None:
    model = EASE(EASEConfig(regularization=10.0)).fit(split.train)
    assert model.item_ids is not None
    np.testing.assert_array_equal(model.item_ids, split.train.item_ids)
    chosen = select_ease_lambda(split.train, split.validation, [10.0, 100.0]).model
    assert chosen.item_ids is not None
    np.testing.assert_array_equal(chosen.item_ids, split.train.item_ids)


def test_patience_without_validation_is_refused_not_ignored() -> None:
    # Early stopping watches the validation users: without them it silently never stopped.
    data, _ = make_checkerboard()
    with pytest.raises(ValueError, match=r"patience=3 .* needs validation"):
        train(data, small_vae_config(epochs=2, patience=3), options=OPTIONS)
    with pytest.raises(ValueError, match="needs validation"):
        Trainer(data, small_vae_config(epochs=2, patience=3), options=OPTIONS)
    assert train(data, small_vae_config(epochs=1), options=OPTIONS).meta["epochs_run"] == 1
