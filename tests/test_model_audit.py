"""Audit of Mult-VAE / Mult-DAE against Liang et al. (WWW 2018) and the authors' notebook.

Every expected value here is computed from scratch (float64, plain tensor algebra on the
model's own weights), never through the library's loss or layer code: the architecture, the
initialization, the training objective on every speed path (dense, sparse first layer, padded
logits, bf16 autocast), the epoch loop (short last batch, beta annealing per update step, the
noise stream) and the selection / early-stopping bookkeeping.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from recvae.config import MultDAEConfig, MultVAEConfig, RunOptions
from recvae.data import Interactions
from recvae.model import MultDAE, MultVAE, SparseBatch, anneal_beta, build_model
from recvae.training import Trainer, beta_schedule

CPU = RunOptions(device="cpu", progress=False)


# ----------------------------------------------------------------------------- from scratch
def _weights(model: nn.Module) -> dict[str, Tensor]:
    """The state dict in float64 (``nn.Linear`` layout: weight is ``(out, in)``)."""
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def _reference_forward(
    w: dict[str, Tensor],
    x: Tensor,
    *,
    variational: bool,
    n_encoder: int,
    n_decoder: int,
    input_mask: Tensor | None = None,
    eps: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The notebook's network: l2-normalize, dropout (a given dense mask), tanh between
    layers; the VAE's last encoder layer is split into mu | logvar, z = mu + exp(lv/2) eps
    (mu when ``eps`` is None); the DAE's code layer is tanh'd; the decoder ends linear."""
    x = x.double()
    norms = x.pow(2).sum(dim=1, keepdim=True).sqrt()
    h = torch.where(norms > 0, x / norms.clamp_min(1e-300), torch.zeros_like(x))
    if input_mask is not None:
        h = h * input_mask.double()
    for i in range(n_encoder):
        h = h @ w[f"encoder.{i}.weight"].T + w[f"encoder.{i}.bias"]
        if i < n_encoder - 1 or not variational:
            h = torch.tanh(h)
    logvar: Tensor | None = None
    if variational:
        latent = h.shape[1] // 2
        mu, logvar = h[:, :latent], h[:, latent:]
        z = mu if eps is None else mu + torch.exp(0.5 * logvar) * eps.double()
    else:
        mu = z = h
    for i in range(n_decoder):
        z = z @ w[f"decoder.{i}.weight"].T + w[f"decoder.{i}.bias"]
        if i < n_decoder - 1:
            z = torch.tanh(z)
    return z, mu, logvar


def _reference_objective(
    model: nn.Module,
    x: Tensor,
    *,
    beta: float,
    weight_decay: float,
    input_mask: Tensor | None,
    eps: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The notebook's loss, ``mean_u[-sum_i x_ui log softmax(f_u)_i] + beta * mean_u KL_u +
    lambda * sum ||W||^2`` (weights, not biases), and its gradient for every parameter in the
    ``nn.Linear`` layout, all in float64 by autograd on plain tensor ops."""
    w = {k: v.clone().requires_grad_(True) for k, v in _weights(model).items()}
    n_encoder = sum(1 for k in w if k.startswith("encoder.") and k.endswith(".weight"))
    n_decoder = sum(1 for k in w if k.startswith("decoder.") and k.endswith(".weight"))
    variational = isinstance(model, MultVAE)
    logits, mu, logvar = _reference_forward(
        w,
        x,
        variational=variational,
        n_encoder=n_encoder,
        n_decoder=n_decoder,
        input_mask=input_mask,
        eps=eps,
    )
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    loss = -(log_p * x.double()).sum(dim=1).mean()
    if variational:
        assert logvar is not None
        kl = 0.5 * (-logvar + torch.exp(logvar) + mu.pow(2) - 1.0).sum(dim=1)
        loss = loss + beta * kl.mean()
    loss = loss + weight_decay * sum(v.pow(2).sum() for k, v in w.items() if k.endswith("weight"))
    grads = torch.autograd.grad(loss, list(w.values()))
    return loss.detach(), dict(zip(w, grads, strict=True))


def _linear_grads(model: nn.Module) -> dict[str, Tensor]:
    """Parameter gradients under the state-dict names and layout (``item_weight`` -> weight.T)."""
    out: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        if name.endswith("item_weight"):
            out[name.removesuffix("item_weight") + "weight"] = param.grad.detach().double().T
        else:
            out[name] = param.grad.detach().double()
    return out


def _histories(rng: np.random.Generator, n_users: int, n_items: int) -> sp.csr_array:
    """Random histories with the edge cases: an empty user, one-item users, weighted values."""
    dense = (rng.random((n_users, n_items)) < 0.25).astype(np.float32)
    dense[0] = 0.0
    dense[1] = 0.0
    dense[1, n_items - 1] = 1.0  # one item, in the last (padded-block) column
    dense[2] = 0.0
    dense[2, 0] = 2.5  # one weighted item
    dense[3:] *= rng.choice([1.0, 0.5, 3.0], size=dense[3:].shape).astype(np.float32)
    return sp.csr_array(dense)


class _FixedDropout(nn.Module):
    """Stands in for ``nn.Dropout`` on the dense path: multiplies by a given mask."""

    def __init__(self, mask: Tensor, p: float) -> None:
        super().__init__()
        self.mask = mask
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


# ----------------------------------------------------------------------------- architecture
def test_vae_is_the_papers_network_computed_from_scratch() -> None:
    torch.manual_seed(0)
    n_items = 37
    model = MultVAE(MultVAEConfig(), n_items)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "encoder.0.weight": (600, n_items),
        "encoder.0.bias": (600,),
        "encoder.1.weight": (400, 600),  # mu and logvar side by side
        "encoder.1.bias": (400,),
        "decoder.0.weight": (600, 200),
        "decoder.0.bias": (600,),
        "decoder.1.weight": (n_items, 600),
        "decoder.1.bias": (n_items,),
    }
    x = torch.from_numpy(_histories(np.random.default_rng(0), 6, n_items).toarray())
    model.eval()  # z = mu, no dropout
    with torch.no_grad():
        logits, mu, logvar = model(x)
    ref_logits, ref_mu, ref_logvar = _reference_forward(
        _weights(model), x, variational=True, n_encoder=2, n_decoder=2
    )
    assert ref_logvar is not None
    torch.testing.assert_close(logits.double(), ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mu.double(), ref_mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logvar.double(), ref_logvar, rtol=1e-5, atol=1e-6)


def test_dae_is_the_papers_network_with_a_tanh_code() -> None:
    torch.manual_seed(0)
    n_items = 29
    model = MultDAE(MultDAEConfig(), n_items)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "encoder.0.weight": (200, n_items),
        "encoder.0.bias": (200,),
        "decoder.0.weight": (n_items, 200),
        "decoder.0.bias": (n_items,),
    }
    x = torch.from_numpy(_histories(np.random.default_rng(1), 5, n_items).toarray())
    model.eval()
    with torch.no_grad():
        logits, code, logvar = model(x)
    ref_logits, ref_code, _ = _reference_forward(
        _weights(model), x, variational=False, n_encoder=1, n_decoder=1
    )
    assert logvar is None
    torch.testing.assert_close(logits.double(), ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(code.double(), ref_code, rtol=1e-5, atol=1e-6)


def test_init_weights_are_glorot_uniform() -> None:
    # The notebook: xavier_initializer(), i.e. U(-b, b) with b = sqrt(6 / (fan_in + fan_out)).
    torch.manual_seed(0)
    model = MultVAE(MultVAEConfig(), 3000)
    weights = {k: v for k, v in model.state_dict().items() if k.endswith("weight")}
    assert len(weights) == 4
    for name, w in weights.items():
        fan_out, fan_in = w.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert float(w.abs().max()) <= bound, name
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3.0), rel=0.02), name


@pytest.mark.parametrize("path", ["dense", "sparse", "padded", "bf16", "bf16-padded"])
@pytest.mark.parametrize(
    "config",
    [
        MultVAEConfig(hidden_dims=(12,), latent_dim=5, dropout=0.5, weight_decay=0.03, seed=1),
        MultDAEConfig(latent_dim=6, dropout=0.5, weight_decay=0.01, seed=2),
    ],
    ids=["vae", "dae"],
)
def test_every_training_path_gives_the_papers_loss_and_gradients(
    config: MultVAEConfig | MultDAEConfig, path: str
) -> None:
    n_users, n_items = 7, 70  # 70 items: padding to 64 adds 58 columns of -inf
    rng = np.random.default_rng(11)
    matrix = _histories(rng, n_users, n_items)
    x = torch.from_numpy(matrix.toarray())
    data = Interactions(
        matrix=matrix.astype(np.float32),
        user_ids=np.arange(n_users),
        item_ids=np.arange(n_items),
    )
    options = RunOptions(
        device="cpu",
        progress=False,
        item_multiple=64 if path.endswith("padded") else 1,
        precision="bf16" if path.startswith("bf16") else "fp32",
    )
    trainer = Trainer(data, config.replace(batch_size=n_users), options=options)
    model = trainer.model
    model.train()
    batch = SparseBatch.from_scipy(matrix)
    keep = torch.from_numpy(rng.random(batch.indices.shape[0]) >= 0.5).float() * 2.0
    dense_mask = torch.zeros_like(x)
    dense_mask[batch.row_of, batch.indices] = keep
    eps = torch.randn(n_users, config.latent_dim) if isinstance(model, MultVAE) else None
    beta = 0.137
    expected, expected_grads = _reference_objective(
        model, x, beta=beta, weight_decay=config.weight_decay, input_mask=dense_mask, eps=eps
    )

    inputs: Tensor | SparseBatch
    if path == "dense":
        model.drop = _FixedDropout(dense_mask, 0.5)
        if eps is not None:
            fixed = eps

            def reparameterize(mu: Tensor, logvar: Tensor, _: Any = None) -> Tensor:
                return mu + torch.exp(0.5 * logvar) * fixed

            model.reparameterize = reparameterize  # type: ignore[method-assign]
        inputs = x
    else:
        inputs = batch.with_noise(dropout_mask=keep, eps=eps)
    loss, _, _ = trainer._loss(inputs, beta)
    loss.backward()
    grads = _linear_grads(model)

    tol = {"rtol": 3e-2, "atol": 3e-2} if path.startswith("bf16") else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(loss.double(), expected, **tol)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        scale = float(expected_grads[name].abs().max())
        torch.testing.assert_close(
            grad / scale, expected_grads[name] / scale, msg=name, rtol=0, atol=tol["atol"] * 3
        )


# ----------------------------------------------------------------------------- the epoch loop
@pytest.mark.parametrize("item_multiple", [1, 64])
def test_epoch_loop_is_the_notebooks_loop(item_multiple: int) -> None:
    """Two epochs of 11 users in batches of 4, 4, 3 against a float64 loop written from the
    notebook: a fresh permutation per epoch, per-batch means (the short batch divides by 3),
    beta = min(cap, update_count / anneal_steps) before each update, Adam(lr)."""
    n_users, n_items = 11, 70
    matrix = _histories(np.random.default_rng(5), n_users, n_items)
    data = Interactions(
        matrix=matrix.astype(np.float32),
        user_ids=np.arange(n_users),
        item_ids=np.arange(n_items),
    )
    config = MultVAEConfig(
        hidden_dims=(9,), latent_dim=4, epochs=2, batch_size=4, learning_rate=3e-3,
        dropout=0.5, seed=3, anneal_steps=4, beta_max=0.3, weight_decay=0.02,
    )  # fmt: skip
    options = RunOptions(device="cpu", progress=False, item_multiple=item_multiple)
    trainer = Trainer(data, config, options=options)
    w0 = {k: v.clone().requires_grad_(True) for k, v in _weights(trainer.model).items()}
    rng_after_init = torch.get_rng_state()
    trainer.fit()

    torch.set_rng_state(rng_after_init)
    optimizer = torch.optim.Adam(list(w0.values()), lr=config.learning_rate)
    update_count = 0
    dense = torch.from_numpy(data.matrix.toarray()).double()  # binarized by Interactions
    for epoch in (1, 2):
        perm = np.random.default_rng([config.seed, epoch]).permutation(n_users)
        for start in range(0, n_users, config.batch_size):
            rows = perm[start : start + config.batch_size]
            x = dense[rows]
            nnz = int((x != 0).sum())
            # The trainer's noise stream: uniforms for the nonzeros (row-major), then normals.
            keep = (torch.rand(nnz) >= config.dropout).double() / (1 - config.dropout)
            mask = torch.zeros_like(x)
            mask[x != 0] = keep
            eps = torch.randn(len(rows), config.latent_dim).double()
            beta = min(config.beta_max, update_count / 4)
            logits, mu, logvar = _reference_forward(
                w0, x, variational=True, n_encoder=2, n_decoder=2, input_mask=mask, eps=eps
            )
            assert logvar is not None
            log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
            kl = 0.5 * (-logvar + torch.exp(logvar) + mu.pow(2) - 1.0).sum(dim=1)
            l2 = sum(v.pow(2).sum() for k, v in w0.items() if k.endswith("weight"))
            loss = -(log_p * x).sum(dim=1).mean() + beta * kl.mean() + config.weight_decay * l2
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            update_count += 1
    assert update_count == trainer.state.step == 6
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value.double(), w0[name].detach(), rtol=1e-4, atol=1e-5)


def test_absolute_anneal_schedule_on_a_short_run_stays_below_the_cap() -> None:
    # The paper's 200,000 steps on a 6-step run: beta is update_count / 200000, never the cap.
    config = MultVAEConfig(anneal_steps=200_000)
    assert beta_schedule(config, 6) == (0.2, 200_000.0)
    betas = [anneal_beta(s, beta_max=0.2, anneal_steps=200_000.0) for s in range(6)]
    assert betas == [s / 200_000 for s in range(6)]
    # Relative: the cap at anneal_cap_fraction of the run, whatever its length.
    cap, steps = beta_schedule(MultVAEConfig(), 1000)
    assert anneal_beta(859, beta_max=cap, anneal_steps=steps) < 0.2
    assert anneal_beta(860, beta_max=cap, anneal_steps=steps) == pytest.approx(0.2)
    assert anneal_beta(0, beta_max=cap, anneal_steps=steps) == 0.0
    # Mult-DAE: no KL term, beta 0.
    assert beta_schedule(MultDAEConfig(), 1000)[0] == 0.0


# ----------------------------------------------------------------------------- selection
def _scripted_run(
    scores: dict[int, float],
    *,
    patience: int | None,
    validate_every: int,
    epochs: int,
    checkpoint_dir: str | None = None,
    stop_after: int | None = None,
) -> tuple[Any, dict[int, dict[str, Tensor]], list[int]]:
    """A small Mult-VAE run whose validation score at epoch ``e`` is ``scores[e]``; returns the
    recommender, the weights after each epoch and the validated epochs. ``stop_after`` raises
    out of the run after that epoch (its checkpoint written)."""
    from recvae.data import planted_interactions
    from recvae.split import split_users

    data = planted_interactions(n_users=120, n_items=30, seed=3)
    split = split_users(data, n_heldout=20, seed=0)
    config = MultVAEConfig(
        hidden_dims=(6,), latent_dim=3, epochs=epochs, batch_size=40, patience=patience
    )
    options = RunOptions(
        device="cpu", progress=False, validate_every=validate_every, checkpoint_dir=checkpoint_dir
    )
    snapshots: dict[int, dict[str, Tensor]] = {}
    validated: list[int] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        snapshots[epoch] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        if epoch == stop_after:
            raise KeyboardInterrupt

    trainer = Trainer(
        split.train, config, validation=split.validation, options=options, on_epoch=on_epoch
    )

    def validate() -> dict[str, float]:
        epoch = trainer.state.epoch + 1  # the epoch being validated
        validated.append(epoch)
        return {"val_ndcg@100": scores[epoch], "val_recall@20": 0.0, "val_recall@50": 0.0}

    trainer.validate = validate  # type: ignore[method-assign]
    return trainer.fit(), snapshots, validated


def test_selection_keeps_the_first_best_epoch_and_patience_counts_validations() -> None:
    # Validations at epochs 2, 4, 6, 8, 10: the best (0.5) at epoch 4, a tie at 6 is no
    # improvement, then two more without: patience 3 stops after epoch 10.
    scores = {2: 0.2, 4: 0.5, 6: 0.5, 8: 0.4, 10: 0.49, 12: 0.9}
    rec, snapshots, validated = _scripted_run(scores, patience=3, validate_every=2, epochs=20)
    assert validated == [2, 4, 6, 8, 10]
    assert rec.meta["best_epoch"] == 4 and rec.meta["epochs_run"] == 10
    assert rec.meta["stopped_early"]
    for name, value in rec.model.state_dict().items():
        assert torch.equal(value, snapshots[4][name]), name


def test_without_patience_the_best_validation_epoch_is_returned() -> None:
    scores = {1: 0.1, 2: 0.3, 3: 0.2, 4: 0.25}
    rec, snapshots, validated = _scripted_run(scores, patience=None, validate_every=1, epochs=4)
    assert validated == [1, 2, 3, 4]
    assert rec.meta["best_epoch"] == 2 and not rec.meta["stopped_early"]
    for name, value in rec.model.state_dict().items():
        assert torch.equal(value, snapshots[2][name]), name


def test_resume_mid_patience_stops_where_the_uninterrupted_run_stops(tmp_path: Any) -> None:
    # Interrupted after epoch 4 (one validation without improvement already counted): the
    # resumed run must carry the count, stop after epoch 5 and return epoch 2's weights.
    scores = {1: 0.1, 2: 0.3, 3: 0.2, 4: 0.2, 5: 0.1, 6: 0.9, 7: 0.9}
    full, full_snapshots, _ = _scripted_run(scores, patience=3, validate_every=1, epochs=7)
    assert full.meta["epochs_run"] == 5 and full.meta["best_epoch"] == 2
    with pytest.raises(KeyboardInterrupt):
        _scripted_run(
            scores, patience=3, validate_every=1, epochs=7, checkpoint_dir=str(tmp_path),
            stop_after=4,
        )  # fmt: skip
    resumed, snapshots, validated = _scripted_run(
        scores, patience=3, validate_every=1, epochs=7, checkpoint_dir=str(tmp_path)
    )
    assert validated == [5]
    assert resumed.meta["epochs_run"] == 5 and resumed.meta["best_epoch"] == 2
    assert resumed.meta["stopped_early"]
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    for name, value in full_snapshots[5].items():  # the last epoch's weights too
        assert torch.equal(value, snapshots[5][name]), name


def test_a_built_model_in_eval_mode_scores_with_the_mean() -> None:
    torch.manual_seed(0)
    model = build_model(MultVAEConfig(hidden_dims=(8,), latent_dim=4), 12)
    x = (torch.rand(3, 12) > 0.5).float()
    model.eval()
    with torch.no_grad():
        a, mu, _ = model(x)
        b, _, _ = model(SparseBatch.from_scipy(sp.csr_array(x.numpy())))
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, model.decode(mu))  # type: ignore[operator]
