"""RecVAE: densities and loss by hand, the alternation, training, the bundle and serving."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from recvae.config import RunOptions, config_from_dict
from recvae.model import build_model
from recvae.recommender import Recommender
from recvae.recvae_model import (
    CompositePrior,
    RecVAE,
    RecVAEConfig,
    RecVAETrainer,
    composite_log_prior,
    gaussian_log_density,
    per_user_beta,
    recvae_loss,
)
from recvae.training import CheckpointMismatchError, train
from tests.conftest import interrupt_training, make_checkerboard, write_csv

CPU = RunOptions(device="cpu", progress=False)


def _small(**kw: object) -> RecVAEConfig:
    base: dict[str, object] = dict(
        hidden_dim=16,
        latent_dim=8,
        epochs=6,
        batch_size=30,
        learning_rate=1e-2,
        dropout=0.2,
        seed=1,
    )
    base.update(kw)
    return RecVAEConfig(**base)  # type: ignore[arg-type]


def _normal_pdf(z: float, mu: float, var: float) -> float:
    return math.exp(-((z - mu) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny matrices: one thread avoids OpenMP overhead on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained() -> tuple[Recommender, np.ndarray, list[float]]:
    data, withheld = make_checkerboard()
    losses: list[float] = []
    rec = train(data, _small(), options=CPU, on_epoch=lambda e, m: losses.append(m["loss"]))
    return rec, withheld, losses


# ---------------------------------------------------------------------------- config
def test_defaults_are_the_papers_and_round_trip() -> None:
    cfg = RecVAEConfig()
    assert (cfg.hidden_dim, cfg.latent_dim, cfg.gamma) == (600, 200, 0.005)
    assert cfg.prior_weights == (0.15, 0.75, 0.10) and cfg.prior_broad_logvar == 10.0
    assert (cfg.encoder_epochs, cfg.decoder_epochs, cfg.dropout) == (3, 1, 0.5)
    assert (cfg.learning_rate, cfg.batch_size, cfg.epochs) == (5e-4, 500, 50)
    again = config_from_dict(cfg.to_dict())
    assert isinstance(again, RecVAEConfig) and again == cfg


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"prior_weights": (0.5, 0.4, 0.2)}, "prior_weights"),
        ({"prior_weights": (0.0, 1.0, 0.0)}, "prior_weights"),
        ({"gamma": -0.1}, "gamma"),
        ({"encoder_epochs": 0}, "encoder_epochs"),
        ({"decoder_epochs": 0}, "decoder_epochs"),
        ({"prior_mixture": "sum"}, "prior_mixture"),
        ({"n_layers": 0}, "n_layers"),
    ],
)
def test_bad_values_name_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RecVAEConfig(**changes)  # type: ignore[arg-type]


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ValueError, match="beta_max"):
        config_from_dict({"model": "recvae", "beta_max": 0.2})


# ---------------------------------------------------------------------------- densities and loss
def test_gaussian_log_density_matches_formula() -> None:
    z, mu, var = 0.3, -0.5, 2.5
    got = gaussian_log_density(
        torch.tensor([[z]], dtype=torch.float64),
        torch.tensor([[mu]], dtype=torch.float64),
        torch.tensor([[math.log(var)]], dtype=torch.float64),
    )
    assert got.item() == pytest.approx(math.log(_normal_pdf(z, mu, var)), rel=1e-12)


def test_composite_prior_matches_hand_computation() -> None:
    z = [0.5, -1.0]
    old_mu = [1.0, 0.0]
    old_var = [1.0, 4.0]
    w = (0.15, 0.75, 0.10)
    broad = math.exp(10.0)
    per_dim = sum(
        math.log(
            w[0] * _normal_pdf(z[d], 0.0, 1.0)
            + w[1] * _normal_pdf(z[d], old_mu[d], old_var[d])
            + w[2] * _normal_pdf(z[d], 0.0, broad)
        )
        for d in range(2)
    )
    joint = math.log(
        w[0] * _normal_pdf(z[0], 0, 1) * _normal_pdf(z[1], 0, 1)
        + w[1] * _normal_pdf(z[0], old_mu[0], old_var[0]) * _normal_pdf(z[1], old_mu[1], old_var[1])
        + w[2] * _normal_pdf(z[0], 0, broad) * _normal_pdf(z[1], 0, broad)
    )
    args = (
        torch.tensor([z], dtype=torch.float64),
        torch.tensor([old_mu], dtype=torch.float64),
        torch.tensor([[math.log(v) for v in old_var]], dtype=torch.float64),
    )
    got = composite_log_prior(*args, weights=w, broad_logvar=10.0, mixture="per_dim")
    assert got.shape == (1,)
    assert got.item() == pytest.approx(per_dim, rel=1e-12)
    got = composite_log_prior(*args, weights=w, broad_logvar=10.0, mixture="joint")
    assert got.item() == pytest.approx(joint, rel=1e-12)
    # A zero weight drops its component: only the standard normal is left.
    only_standard = composite_log_prior(*args, weights=(1.0, 0.0, 0.0), mixture="joint")
    expected = math.log(_normal_pdf(z[0], 0, 1) * _normal_pdf(z[1], 0, 1))
    assert only_standard.item() == pytest.approx(expected, rel=1e-12)


def test_composite_prior_module_uses_the_frozen_copy_without_dropout() -> None:
    torch.manual_seed(0)
    cfg = _small(dropout=0.9)
    model = RecVAE(cfg, n_items=12)
    prior = CompositePrior(model.encoder, cfg)
    assert not any(p.requires_grad for p in prior.encoder.parameters())
    x = (torch.rand(4, 12) > 0.5).float()
    z = torch.randn(4, 8)
    prior.train()
    a, b = prior.log_prob(z, x), prior.log_prob(z, x)
    assert torch.equal(a, b)  # no dropout: deterministic even in training mode
    model.eval()
    mu, logvar = model.encode(x)
    torch.testing.assert_close(
        a, composite_log_prior(z, mu, logvar, weights=cfg.prior_weights, broad_logvar=10.0)
    )
    with torch.no_grad():
        model.encoder.mu.weight.add_(1.0)
    assert torch.equal(prior.log_prob(z, x), a)  # a copy, not a reference
    prior.update(model.encoder)
    assert not torch.equal(prior.log_prob(z, x), a)


def test_per_user_beta_scales_with_history_size() -> None:
    x = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(per_user_beta(x, 0.005), torch.tensor([0.015, 0.005, 0.0]))


def test_loss_matches_hand_computation() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0]], dtype=torch.float64)
    x = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    z = torch.tensor([[0.2], [-0.4]], dtype=torch.float64)
    mu = torch.tensor([[0.0], [0.1]], dtype=torch.float64)
    logvar = torch.tensor([[0.0], [math.log(0.5)]], dtype=torch.float64)
    log_prior = torch.tensor([-1.5, -2.0], dtype=torch.float64)
    gamma = 0.3
    nll = [-(math.log(1 / 4) + math.log(3 / 4)), -math.log(1 / 3)]
    log_q = [math.log(_normal_pdf(0.2, 0.0, 1.0)), math.log(_normal_pdf(-0.4, 0.1, 0.5))]
    kl = [log_q[0] + 1.5, log_q[1] + 2.0]
    beta = [gamma * 2, gamma * 1]
    expected = sum(n + b * k for n, b, k in zip(nll, beta, kl, strict=True)) / 2
    loss, mean_nll, mean_kl = recvae_loss(logits, x, z, mu, logvar, log_prior, gamma)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert mean_nll.item() == pytest.approx(sum(nll) / 2, rel=1e-12)
    assert mean_kl.item() == pytest.approx(sum(kl) / 2, rel=1e-12)


def test_sparse_histories_give_the_same_loss_and_beta() -> None:
    torch.manual_seed(5)
    x = (torch.rand(5, 9) > 0.6).float()
    x[1] = 0.0
    logits = torch.randn(5, 9)
    z, mu, logvar = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    log_prior = torch.randn(5)
    dense = recvae_loss(logits, x, z, mu, logvar, log_prior, 0.01)
    for sparse in (x.to_sparse(), x.to_sparse_csr()):
        torch.testing.assert_close(per_user_beta(sparse, 0.01), per_user_beta(x, 0.01))
        got = recvae_loss(logits, sparse, z, mu, logvar, log_prior, 0.01)
        for a, b in zip(got, dense, strict=True):
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- the model
def test_architecture_and_interface() -> None:
    model = build_model(RecVAEConfig(), n_items=50)
    assert isinstance(model, RecVAE)
    enc = model.encoder
    assert tuple(enc.input.weight.shape) == (50, 600)
    assert [tuple(layer.weight.shape) for layer in enc.layers] == [(600, 600)] * 4
    assert len(enc.norms) == 5 and all(norm.eps == 0.1 for norm in enc.norms)
    assert tuple(model.decoder.weight.shape) == (50, 200)
    assert tuple(model.item_embeddings().shape) == (50, 200)
    x = (torch.rand(7, 50) > 0.7).float()
    logits, mu, logvar = model(x)
    assert logits.shape == (7, 50) and mu.shape == logvar.shape == (7, 200)
    model.eval()
    a, mu, _ = model(x)
    torch.testing.assert_close(a, model.decode(mu))


def test_sparse_and_dense_inputs_give_the_same_posterior() -> None:
    torch.manual_seed(3)
    model = RecVAE(_small(), n_items=30)
    x = (torch.rand(6, 30) > 0.6).float()
    x[2] = 0.0  # an empty history stays finite
    for mode in (model.eval, model.train):
        mode()
        dense = model.encode(x, dropout=False)
        for sparse in (x.to_sparse(), x.to_sparse_csr()):
            got = model.encode(sparse, dropout=False)
            torch.testing.assert_close(got[0], dense[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[1], dense[1], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(dense[0]).all()


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_encoder_phase_leaves_decoder_alone_and_vice_versa() -> None:
    data, _ = make_checkerboard()
    trainer = RecVAETrainer(data, _small(), options=CPU)
    model = trainer.recvae
    dropout_flags: list[bool] = []
    encode = model.encode

    def spy(x: torch.Tensor, *, dropout: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        dropout_flags.append(dropout)
        return encode(x, dropout=dropout)

    model.encode = spy  # type: ignore[method-assign]
    enc0, dec0 = _params(model.encoder), _params(model.decoder)
    trainer._pass(1, "encoder", 0)
    enc1, dec1 = _params(model.encoder), _params(model.decoder)
    assert _same(dec0, dec1) and not _same(enc0, enc1)
    assert dropout_flags and all(dropout_flags)
    dropout_flags.clear()
    trainer._pass(1, "decoder", 0)
    enc2, dec2 = _params(model.encoder), _params(model.decoder)
    assert _same(enc1, enc2) and not _same(dec1, dec2)
    assert dropout_flags and not any(dropout_flags)  # decoder passes: no input dropout
    # A whole epoch ends with the prior holding the encoder of this epoch.
    trainer._run_epoch(2)
    assert _same(_params(trainer.prior.encoder), _params(model.encoder))
    assert trainer.state.step == 2 * 2 + 4 * 2  # 2 batches per pass; 2 + 3 + 1 passes


def test_trains_on_checkerboard_and_ranks_the_withheld_item_first(
    trained: tuple[Recommender, np.ndarray, list[float]],
) -> None:
    rec, withheld, losses = trained
    assert isinstance(rec.model, RecVAE)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert "decoder_nll" in rec.meta["history"][-1]
    top = rec.recommend(rec.user_ids.tolist(), k=1)
    np.testing.assert_array_equal(top.item_idx[:, 0], withheld)


def test_same_seed_gives_identical_weights() -> None:
    data, _ = make_checkerboard()
    a = train(data, _small(epochs=1), options=CPU)
    b = train(data, _small(epochs=1), options=CPU)
    c = train(data, _small(epochs=1, seed=2), options=CPU)
    sa, sb, sc = (r.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path) -> None:
    data, _ = make_checkerboard()
    config = _small(epochs=3)
    full = RecVAETrainer(data, config, options=CPU)
    full_rec = full.fit()
    opts = interrupt_training(data, config, tmp_path, after_epoch=2)
    epochs: list[int] = []
    resumed = RecVAETrainer(data, config, options=opts, on_epoch=lambda e, m: epochs.append(e))
    resumed_rec = resumed.fit()
    assert epochs == [3]
    for p, q in zip(
        full_rec.model.state_dict().values(), resumed_rec.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert _same(_params(full.prior.encoder), _params(resumed.prior.encoder))
    pairs = [
        (full.optimizer, resumed.optimizer),
        (full.decoder_optimizer, resumed.decoder_optimizer),
    ]
    for a, b in pairs:
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key]["exp_avg"], sb[key]["exp_avg"], rtol=0, atol=0)


def test_a_multvae_checkpoint_is_refused(tmp_path: Path) -> None:
    from recvae.config import MultVAEConfig

    data, _ = make_checkerboard()
    opts = RunOptions(device="cpu", progress=False, checkpoint_dir=str(tmp_path))
    train(
        data, MultVAEConfig(hidden_dims=(8,), latent_dim=4, epochs=1, batch_size=30), options=opts
    )
    with pytest.raises(CheckpointMismatchError):
        train(data, _small(epochs=1), options=opts)


# ---------------------------------------------------------------------------- serving and bundle
def test_history_fold_in_matches_recommend_and_batches_match_single_calls(
    trained: tuple[Recommender, np.ndarray, list[float]],
) -> None:
    rec = trained[0]
    users = rec.user_ids[:5].tolist()
    batch = rec.recommend(users, k=4)
    for row, user in enumerate(users):
        single = rec.recommend([user], k=4)
        np.testing.assert_array_equal(single.item_ids[0], batch.item_ids[row])
        np.testing.assert_allclose(single.scores[0], batch.scores[row], rtol=1e-5, atol=1e-5)
        folded = rec.recommend_from_history(rec.user_history(user).tolist(), k=4)
        np.testing.assert_array_equal(folded.item_ids[0], batch.item_ids[row])
        np.testing.assert_allclose(folded.scores[0], batch.scores[row], rtol=1e-5, atol=1e-5)


def test_exclude_seen_never_returns_a_seen_item(
    trained: tuple[Recommender, np.ndarray, list[float]],
) -> None:
    rec = trained[0]
    users = rec.user_ids.tolist()
    top = rec.recommend(users, k=8)
    for row, user in enumerate(users):
        assert not set(top.item_ids[row].tolist()) & set(rec.user_history(user).tolist())


def test_save_load_gives_identical_scores_in_a_fresh_process(
    trained: tuple[Recommender, np.ndarray, list[float]], tmp_path: Path
) -> None:
    rec = trained[0]
    path = rec.save(tmp_path / "bundle")
    loaded = Recommender.load(path)
    assert isinstance(loaded.config, RecVAEConfig) and loaded.config == rec.config
    histories = rec.train_matrix[:10]
    torch.testing.assert_close(loaded.score(histories), rec.score(histories), rtol=0, atol=0)
    # A fresh interpreter that never imported recvae.recvae_model finds it from config.json.
    expected = rec.recommend(rec.user_ids[:3].tolist(), k=3).item_ids.tolist()
    code = (
        "import sys; from recvae.recommender import Recommender; "
        f"r = Recommender.load({str(path)!r}); "
        "assert 'recvae.recvae_model' in sys.modules; "
        f"print(r.recommend({rec.user_ids[:3].tolist()!r}, k=3).item_ids.tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    assert out.stdout.strip() == str(expected)


def test_cli_trains_recvae(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main

    rng = np.random.default_rng(0)
    rows = [
        (u, (u % 2) + 2 * (i // 2))
        for u in range(40)
        for i in rng.choice(20, size=6, replace=False)
    ]
    data = write_csv(tmp_path / "log.csv", "user_id,item_id", rows)
    argv = [
        "train",
        "--data",
        str(data),
        "--model",
        "recvae",
        "--epochs",
        "1",
        "--latent-dim",
        "4",
        "--n-heldout",
        "4",
        "--no-progress",
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "r"),
    ]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0
    assert "recvae" in out
    loaded = Recommender.load(tmp_path / "r" / "bundle")
    assert isinstance(loaded.model, RecVAE)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"precision": "bf16"}, "runs in float32: precision 'bf16' is not supported"),
        ({"compile": True}, "torch.compile does not apply to: compile is not supported"),
    ],
    ids=["bf16", "compile"],
)
def test_options_recvaes_own_loop_would_ignore_are_refused(
    option: dict[str, object], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # RecVAE's epoch loop runs eagerly in float32: bf16 and compile used to be ignored silently.
    from pipelines.cli import main
    from recvae.training import check_run_options

    data, _ = make_checkerboard()
    config = config_from_dict({"model": "recvae", "latent_dim": 4, "epochs": 1})
    options = RunOptions(device="cpu", progress=False, **option)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        train(data, config, options=options)
    with pytest.raises(ValueError, match=message):
        check_run_options(config, options)
    check_run_options(config, RunOptions())  # fp32, eager: fine
    with pytest.raises(ValueError, match="does not support distributed training"):
        check_run_options(config, RunOptions(distributed=True))
    check_run_options(config_from_dict({"model": "multvae"}), options)  # Mult-VAE takes both

    rows = [(u, i) for u in range(40) for i in range(20) if (u + i) % 3 == 0]
    csv_path = write_csv(tmp_path / "log.csv", "user_id,item_id", rows)
    flag = ["--precision", "bf16"] if "precision" in option else ["--compile"]
    out = tmp_path / "out"
    argv = ["train", "--data", str(csv_path), "--model", "recvae", "--epochs", "1", *flag]
    assert main([*argv, "--no-track", "--no-progress", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "bundle").exists()
