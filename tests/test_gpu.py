"""GPU correctness: every CUDA path against its CPU twin (run with ``pytest -m gpu``).

CI has no GPU, so these are marked ``gpu`` (deselected by default) and skip without CUDA. Each
test computes the same thing on the CPU and on the accelerator and compares, so a GPU-only bug
(device placement, dtype, masking, a kernel's different summation order beyond rounding) fails
here. ``RECVAE_TEST_ACCEL=cpu`` runs them with the CPU standing in for the accelerator, which
checks the tests themselves on a machine without one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recvae.baselines import EASE, EASEConfig
from recvae.blend import Blend
from recvae.config import MultVAEConfig, RunOptions, config_from_dict
from recvae.evaluation import evaluate
from recvae.model import (
    SparseBatch,
    build_model,
    gaussian_kl,
    multinomial_nll,
    sparse_multinomial_nll,
)
from recvae.recommender import Recommender
from recvae.split import split_users
from recvae.training import train
from tests.conftest import make_checkerboard, small_vae_config

ACCEL = os.environ.get("RECVAE_TEST_ACCEL", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        ACCEL == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]


def _random_histories(rng: np.random.Generator, n_users: int, n_items: int) -> sp.csr_array:
    dense = (rng.random((n_users, n_items)) < 0.15).astype(np.float32)
    dense[np.arange(n_users), rng.integers(0, n_items, n_users)] = 1.0  # no empty row
    return sp.csr_array(dense)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out64).all()
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64))


def test_sparse_likelihood_and_its_gradient_match_the_dense_float64_reference() -> None:
    rng = np.random.default_rng(0)
    x = _random_histories(rng, 64, 300)
    logits64 = torch.from_numpy(rng.normal(size=(64, 300)) * 3)
    ref_logits = logits64.clone().requires_grad_(True)
    ref = multinomial_nll(ref_logits, torch.from_numpy(x.toarray()).double(), reduction="none")
    ref.sum().backward()
    batch = SparseBatch.from_scipy(x, device=ACCEL)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        logits = logits64.to(ACCEL, dtype).requires_grad_(True)
        out = sparse_multinomial_nll(logits, batch, reduction="none")
        out.sum().backward()
        assert out.dtype == torch.float32  # computed in float32 whatever the logits' dtype
        assert _rel_err(out, ref) < tolerance
        assert logits.grad is not None and ref_logits.grad is not None
        assert _rel_err(logits.grad, ref_logits.grad) < tolerance * 10


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_padded_logits_give_the_cpu_loss_and_gradients_on_the_accelerator(precision: str) -> None:
    # Training's default on CUDA: logits padded to 64 items with -inf columns (300 -> 320),
    # through bf16 autocast and the compiled dense passes; against the unpadded float32 CPU run.
    rng = np.random.default_rng(4)
    x = _random_histories(rng, 48, 300)
    torch.manual_seed(2)
    cpu_model = build_model(MultVAEConfig(hidden_dims=(64,), latent_dim=16), 300).train()
    model = build_model(MultVAEConfig(hidden_dims=(64,), latent_dim=16), 300).to(ACCEL).train()
    model.load_state_dict({k: v.to(ACCEL) for k, v in cpu_model.state_dict().items()})
    cpu_batch = SparseBatch.from_scipy(x)
    mask = (torch.rand(cpu_batch.indices.shape[0]) >= 0.5).float() * 2.0
    eps = torch.randn(48, 16)
    results = []
    for net, device, multiple, bf16 in (
        (cpu_model, "cpu", 1, False),
        (model, ACCEL, 64, precision == "bf16"),
    ):
        batch = SparseBatch.from_scipy(x, device=device).with_noise(
            dropout_mask=mask.to(device), eps=eps.to(device)
        )
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            logits, mu, logvar = net(batch, item_multiple=multiple)
        assert logits.shape == (48, 300 if multiple == 1 else 320)
        loss = sparse_multinomial_nll(logits, batch) + 0.2 * gaussian_kl(mu.float(), logvar.float())
        loss.backward()
        grads = {k: p.grad.detach().cpu().float() for k, p in net.named_parameters()}
        results.append((loss.detach().cpu(), grads))
    (cpu_loss, cpu_grads), (loss, grads) = results
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    assert _rel_err(loss, cpu_loss) < tolerance
    for name, grad in cpu_grads.items():
        assert grads[name].shape == grad.shape, name
        assert _rel_err(grads[name], grad) < tolerance * 10, name


def test_sparse_and_dense_forward_agree_on_the_accelerator() -> None:
    rng = np.random.default_rng(1)
    x = _random_histories(rng, 32, 200)
    torch.manual_seed(0)
    model = build_model(MultVAEConfig(hidden_dims=(64,), latent_dim=16), 200).to(ACCEL).eval()
    with torch.inference_mode():
        dense_logits, dense_mu, _ = model(torch.from_numpy(x.toarray()).to(ACCEL))
        sparse_logits, sparse_mu, _ = model(SparseBatch.from_scipy(x, device=ACCEL))
        cpu_model = build_model(MultVAEConfig(hidden_dims=(64,), latent_dim=16), 200).eval()
        cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        cpu_logits, _, _ = cpu_model(torch.from_numpy(x.toarray()))
    assert _rel_err(sparse_logits, dense_logits) < 1e-5
    assert _rel_err(sparse_mu, dense_mu) < 1e-5
    assert _rel_err(dense_logits, cpu_logits) < 1e-5


@pytest.mark.parametrize("model", ["multvae", "multdae", "recvae"])
def test_model_trained_on_the_accelerator_learns_and_serves_the_same_on_the_cpu(
    model: str, tmp_path: Path
) -> None:
    data, withheld = make_checkerboard()
    fields: dict[str, object] = {"model": model, "latent_dim": 8, "epochs": 30, "seed": 1}
    if model == "recvae":
        fields.update(hidden_dim=16, epochs=8, batch_size=30, learning_rate=1e-2, dropout=0.2)
    else:
        fields.update(hidden_dims=(16,), batch_size=16, learning_rate=1e-2, dropout=0.2)
    config = config_from_dict(fields)
    rec = train(data, config, options=RunOptions(device=ACCEL, progress=False))
    assert rec.device.type == torch.device(ACCEL).type
    top = rec.recommend(data.user_ids.tolist(), k=1)
    np.testing.assert_array_equal(top.item_idx[:, 0], withheld)
    on_cpu = Recommender.load(rec.save(tmp_path / "bundle"), device="cpu")
    assert _rel_err(on_cpu.score(data.matrix), rec.score(data.matrix)) < 1e-5
    again = on_cpu.recommend(data.user_ids.tolist(), k=3)
    np.testing.assert_array_equal(
        again.item_idx, rec.recommend(data.user_ids.tolist(), k=3).item_idx
    )


def test_bf16_training_on_the_accelerator_learns_the_pattern() -> None:
    if torch.device(ACCEL).type != "cuda":
        pytest.skip("bf16 autocast is a CUDA path")
    data, withheld = make_checkerboard()
    config = small_vae_config()
    rec = train(data, config, options=RunOptions(device=ACCEL, progress=False, precision="bf16"))
    top = rec.recommend(data.user_ids.tolist(), k=1)
    np.testing.assert_array_equal(top.item_idx[:, 0], withheld)


def test_evaluation_of_a_recommender_on_the_accelerator_equals_the_cpu() -> None:
    data, _ = make_checkerboard(n_users=120, n_items=30)
    split = split_users(data, n_heldout=20, seed=3)
    config = MultVAEConfig(hidden_dims=(16,), latent_dim=8, epochs=5, batch_size=16, seed=2)
    rec = train(split.train, config, options=RunOptions(device="cpu", progress=False))
    fold_in, targets = split.test.fold_in.matrix, split.test.targets.matrix
    on_cpu = evaluate(rec, fold_in, targets, batch_size=7)
    on_accel = evaluate(rec.to(ACCEL), fold_in, targets, batch_size=7, device=ACCEL)
    assert on_accel.summary() == pytest.approx(on_cpu.summary(), rel=1e-5, nan_ok=True)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ease_on_the_accelerator_matches_the_cpu(dtype: str) -> None:
    data, _ = make_checkerboard(n_users=200, n_items=60)
    config = EASEConfig(regularization=5.0, dtype=dtype)  # type: ignore[arg-type]
    cpu = EASE(config).fit(data)
    accel = EASE(config, device=ACCEL).fit(data)
    ref = torch.as_tensor(np.asarray(cpu.weights))
    out = (
        accel.weights if isinstance(accel.weights, torch.Tensor) else torch.as_tensor(accel.weights)
    )
    assert _rel_err(out, ref) < (1e-10 if dtype == "float64" else 1e-4)
    scores_cpu = torch.as_tensor(np.asarray(cpu.score(data.matrix)))
    scores_accel = accel.score(data.matrix)
    scores_accel = (
        torch.as_tensor(scores_accel)
        if not isinstance(scores_accel, torch.Tensor)
        else scores_accel
    )
    assert _rel_err(scores_accel, scores_cpu) < (1e-10 if dtype == "float64" else 1e-4)


def test_blend_and_vae_tools_on_the_accelerator_match_the_cpu(tmp_path: Path) -> None:
    data, _ = make_checkerboard(n_users=100, n_items=30)
    config = MultVAEConfig(hidden_dims=(16,), latent_dim=8, epochs=5, batch_size=16, seed=4)
    cpu = train(data, config, options=RunOptions(device="cpu", progress=False))
    accel = Recommender.load(cpu.save(tmp_path / "bundle"), device=ACCEL)
    # Blend with EASE: the same normalized mixture wherever it is computed.
    blend_cpu = Blend(cpu, EASE(EASEConfig(regularization=5.0)).fit(data), 0.4)
    blend_accel = Blend(accel, EASE(EASEConfig(regularization=5.0), device=ACCEL).fit(data), 0.4)
    assert _rel_err(blend_accel.score(data.matrix), blend_cpu.score(data.matrix)) < 1e-4
    # Anomaly scores (ELBO terms) and confidence (posterior spread).
    a_cpu = cpu.anomaly_scores(data.matrix, reference="training")
    a_accel = accel.anomaly_scores(data.matrix, reference="training")
    np.testing.assert_allclose(a_accel.scores, a_cpu.scores, rtol=1e-4)
    np.testing.assert_allclose(a_accel.percentiles, a_cpu.percentiles, atol=2.0)
    np.testing.assert_allclose(
        accel.confidence(data.matrix), cpu.confidence(data.matrix), atol=1e-5
    )
    # Exploration: reproducible with a seed on the accelerator, and temperature 0 = the mean.
    first = accel.score_sampled(data.matrix, temperature=1.0, seed=7)
    assert torch.equal(first, accel.score_sampled(data.matrix, temperature=1.0, seed=7))
    assert not torch.equal(first, accel.score_sampled(data.matrix, temperature=1.0, seed=8))
    assert (
        _rel_err(
            accel.score_sampled(data.matrix, temperature=0.0, seed=7), accel.score(data.matrix)
        )
        < 1e-6
    )
