from __future__ import annotations

import math

import pytest
import torch

from recvae.config import MultDAEConfig, MultVAEConfig, config_from_dict
from recvae.model import (
    MultDAE,
    MultVAE,
    anneal_beta,
    elbo_loss,
    gaussian_kl,
    l2_penalty,
    multinomial_nll,
)


def test_vae_shapes_follow_the_paper_architecture() -> None:
    model = MultVAE(MultVAEConfig(), n_items=50)
    assert [tuple(layer.weight.shape) for layer in model.encoder] == [(600, 50), (400, 600)]
    assert [tuple(layer.weight.shape) for layer in model.decoder] == [(600, 200), (50, 600)]
    x = (torch.rand(7, 50) > 0.7).float()
    logits, mu, logvar = model(x)
    assert logits.shape == (7, 50)
    assert mu.shape == logvar.shape == (7, 200)


def test_dae_shapes_and_no_variance() -> None:
    model = MultDAE(MultDAEConfig(), n_items=30)
    logits, code, logvar = model((torch.rand(4, 30) > 0.5).float())
    assert logits.shape == (4, 30) and code.shape == (4, 200) and logvar is None


def test_eval_mode_uses_the_mean_and_is_deterministic() -> None:
    torch.manual_seed(0)
    model = MultVAE(MultVAEConfig(hidden_dims=(8,), latent_dim=4), n_items=12).eval()
    x = (torch.rand(3, 12) > 0.5).float()
    a, mu, _ = model(x)
    b, _, _ = model(x)
    assert torch.equal(a, b)
    assert torch.allclose(a, model.decode(mu))


def test_training_mode_samples() -> None:
    torch.manual_seed(0)
    model = MultVAE(MultVAEConfig(hidden_dims=(8,), latent_dim=4, dropout=0.0), n_items=12)
    x = (torch.rand(3, 12) > 0.5).float()
    a, _, _ = model(x)
    b, _, _ = model(x)
    assert not torch.equal(a, b)


def test_multinomial_nll_matches_hand_computation() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [1/4, 3/4]
    x = torch.tensor([[1.0, 1.0]])
    expected = -(math.log(0.25) + math.log(0.75))
    assert multinomial_nll(logits, x).item() == pytest.approx(expected)


def test_kl_is_zero_at_the_prior_and_matches_formula() -> None:
    assert gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).item() == pytest.approx(0.0)
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    expected = 0.5 * ((1 + 1 - 1 - 0) + (2 + 0 - 1 - math.log(2.0)))
    assert gaussian_kl(mu, logvar).item() == pytest.approx(expected)


def test_elbo_combines_terms_with_beta() -> None:
    torch.manual_seed(1)
    logits, x = torch.randn(4, 6), (torch.rand(4, 6) > 0.5).float()
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    total = elbo_loss(logits, x, mu, logvar, beta=0.3)
    assert total.item() == pytest.approx(
        (multinomial_nll(logits, x) + 0.3 * gaussian_kl(mu, logvar)).item()
    )


def test_anneal_schedule() -> None:
    assert anneal_beta(0, beta_max=0.2, anneal_steps=100) == 0.0
    assert anneal_beta(10, beta_max=0.2, anneal_steps=100) == pytest.approx(0.1)
    assert anneal_beta(1000, beta_max=0.2, anneal_steps=100) == 0.2


def test_l2_penalty_counts_weights_not_biases() -> None:
    model = MultDAE(MultDAEConfig(latent_dim=2), n_items=3)
    expected = sum(p.pow(2).sum() for n, p in model.named_parameters() if n.endswith("weight"))
    assert l2_penalty(model).item() == pytest.approx(expected.item())


def test_config_round_trip_and_validation() -> None:
    cfg = MultVAEConfig(hidden_dims=(300, 100), latent_dim=50, beta_max=0.3)
    assert config_from_dict(cfg.to_dict()) == cfg
    import json

    assert config_from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="dropout"):
        MultVAEConfig(dropout=1.5)
    with pytest.raises(ValueError, match="latent_dim"):
        MultVAEConfig(latent_dim=0)
    with pytest.raises(ValueError, match="bogus"):
        config_from_dict({"model": "multvae", "bogus": 1})
    with pytest.raises(ValueError, match="unknown model"):
        config_from_dict({"model": "nope"})
    with pytest.raises(ValueError, match="batch_size"):
        MultDAEConfig(batch_size=0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_threads", "2", "integer >= 1 or unset"),
        ("num_threads", 0, "integer >= 1 or unset"),
        ("eval_batch_size", 2.5, "integer >= 1"),
        ("validate_every", True, "integer >= 1"),
        ("checkpoint_every", 0, "integer >= 1"),
        ("item_multiple", 2.5, "integer >= 1"),
        ("item_multiple", "64", "integer >= 1"),
        ("item_multiple", 0, "integer >= 1"),
        ("compile", "yes", "true or false"),
        ("progress", 1, "true or false"),
        ("distributed", None, "true or false"),
        ("device", 0, "auto, cpu, cuda"),
        ("device", "tpu", "auto, cpu, cuda"),
        ("checkpoint_dir", 3, "path"),
    ],
)
def test_run_options_reject_wrong_types_and_values(field: str, value: object, message: str) -> None:
    # A TOML [run] table can hold any type; each must fail with the field's name.
    from recvae.config import RunOptions

    with pytest.raises(ValueError, match=f"'{field}'.*{message}"):
        RunOptions(**{field: value})  # type: ignore[arg-type]


def test_run_options_accept_their_types() -> None:
    from pathlib import Path

    from recvae.config import RunOptions

    options = RunOptions(
        device="cuda:1", num_threads=3, item_multiple=1, checkpoint_dir=Path("x"), compile=True
    )
    assert options.item_multiple == 1 and options.num_threads == 3
    assert RunOptions().item_multiple is None  # automatic


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("learning_rate", "1e-3", "must be a number, got '1e-3'"),
        ("dropout", "0.5", "must be a number"),
        ("beta_max", None, "must be a number"),
        ("beta_search", "no", "must be true or false"),  # was accepted: a truthy string
        ("anneal_steps", 2.5, "must be an integer or unset"),
        ("hidden_dims", ("600",), "must be a list of integers"),
        ("activation", "gelu", "must be one of tanh, relu, sigmoid, silu"),
        ("select_metric", 100, "must be a string"),
    ],
)
def test_model_configs_name_a_wrongly_typed_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"invalid config field '{field}': {message}"):
        MultVAEConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"'{field}'"):
        config_from_dict({"model": "multvae", field: value})


@pytest.mark.parametrize("value", [math.inf, math.nan, 0.0, -1e-3])
def test_learning_rate_must_be_finite_and_positive(value: float) -> None:
    with pytest.raises(ValueError, match="learning_rate.*must be finite and > 0"):
        MultVAEConfig(learning_rate=value)


def test_config_lists_become_tuples_and_numbers_stay_numbers() -> None:
    cfg = MultVAEConfig(hidden_dims=[300, 100], learning_rate=1)  # type: ignore[arg-type]
    assert cfg.hidden_dims == (300, 100) and hash(cfg)
    assert cfg == MultVAEConfig(hidden_dims=(300, 100), learning_rate=1.0)
    from recvae.recvae_model import RecVAEConfig

    with pytest.raises(ValueError, match="'gamma': must be a number"):
        RecVAEConfig(gamma="0.005")  # type: ignore[arg-type]


def test_baseline_configs_name_a_wrongly_typed_field() -> None:
    from recvae.baselines import ALSConfig, EASEConfig

    with pytest.raises(ValueError, match="'regularization': must be a number, got '0.1'"):
        ALSConfig(regularization="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'regularization'"):
        EASEConfig.from_dict({"regularization": True})
