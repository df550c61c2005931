"""The lean training path computes the same thing as the dense one.

Sparse first layer vs dense first layer, sparse vs dense likelihood (values and gradients), the
device-resident shuffled batches vs SciPy row slicing, a few lean training steps vs a plain dense
loop, validation on sparse histories vs the Recommender, bf16 autocast, and exact resume.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from recvae.config import MultDAEConfig, MultVAEConfig, RunOptions
from recvae.model import (
    MultDAE,
    MultVAE,
    SparseBatch,
    anneal_beta,
    build_model,
    gaussian_kl,
    l2_penalty,
    multinomial_nll,
    padded_output,
    sparse_multinomial_nll,
)
from recvae.training import Trainer, _batch_tensor, _DeviceMatrix, train
from tests.conftest import interrupt_training, make_checkerboard, small_vae_config

CPU = RunOptions(device="cpu", progress=False)


def _random_histories(
    rng: np.random.Generator, n_users: int, n_items: int, *, weighted: bool
) -> sp.csr_array:
    dense = (rng.random((n_users, n_items)) < 0.3).astype(np.float32)
    if weighted:
        dense *= rng.uniform(0.5, 3.0, size=dense.shape).astype(np.float32)
    dense[1] = 0.0  # an empty history
    return sp.csr_array(dense)


def _params_and_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "config",
    [
        MultVAEConfig(hidden_dims=(12,), latent_dim=5, dropout=0.5),
        MultVAEConfig(hidden_dims=(), latent_dim=5, dropout=0.5),
        MultDAEConfig(hidden_dims=(7,), latent_dim=5, dropout=0.5),
    ],
    ids=["vae", "vae-no-hidden", "dae"],
)
@pytest.mark.parametrize("weighted", [False, True], ids=["binary", "weighted"])
def test_sparse_first_layer_equals_dense_forward_and_gradients(config, weighted) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    matrix = _random_histories(rng, 9, 23, weighted=weighted)
    batch = SparseBatch.from_scipy(matrix)
    x = torch.from_numpy(matrix.toarray())
    torch.manual_seed(0)
    model = build_model(config, 23)
    # Training mode with one pre-drawn dropout mask on the nonzeros, and its dense twin.
    p = config.dropout
    keep = torch.from_numpy(rng.random(batch.indices.shape[0]) >= p).float() / (1 - p)
    dense_mask = torch.zeros_like(x)
    dense_mask[batch.row_of, batch.indices] = keep
    eps = torch.randn(9, 5)
    projection = torch.randn(9, 23)

    model.train()
    logits_s, mu_s, _ = model(batch.with_noise(dropout_mask=keep, eps=eps))
    (logits_s * projection).sum().backward()
    grads_s = _params_and_grads(model)
    model.zero_grad(set_to_none=True)

    # The dense reference: normalize, the same mask, the dense layers.
    model.drop.p = 0.0
    original = model._input_layer
    model._input_layer = lambda t: model.encoder[0](F.normalize(t, dim=1) * dense_mask)  # type: ignore[method-assign]
    if isinstance(model, MultVAE):
        mu_d, logvar_d = model.encode(x)
        logits_d = model.decode(model.reparameterize(mu_d, logvar_d, eps))
    else:
        logits_d, mu_d, _ = model(x)
    model._input_layer = original  # type: ignore[method-assign]
    (logits_d * projection).sum().backward()
    grads_d = _params_and_grads(model)

    torch.testing.assert_close(logits_s, logits_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mu_s, mu_d, rtol=1e-5, atol=1e-5)
    assert grads_s.keys() == grads_d.keys() == dict(model.named_parameters()).keys()
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-5)

    # Eval mode: the public dense encode (serving) and the sparse encode agree.
    model.drop.p = p
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(batch)[0], model.encode(x)[0])


def test_cpu_first_layer_backward_is_torchs_embedding_bag_gradient() -> None:
    # The CPU path's weight gradient is a bag sum over the transposed batch (_ItemBag): the
    # same as F.embedding_bag's own backward up to rounding, with empty rows and unseen items
    # (whose gradient rows must be exact zeros), and right by finite differences in float64.
    # The forward pass is torch's, float for float.
    from recvae.model import _ItemBag

    rng = np.random.default_rng(5)
    matrix = _random_histories(rng, 40, 300, weighted=True)
    matrix[:, 250:] = 0.0  # items 250.. unseen in this batch
    matrix.eliminate_zeros()
    batch = SparseBatch.from_scipy(matrix)
    weights = (
        batch.weights * torch.from_numpy(rng.uniform(0.0, 2.0, batch.weights.shape[0])).float()
    )
    weight = torch.randn(300, 17, requires_grad=True)
    upstream = torch.randn(40, 17)
    assert _ItemBag.applies(weight, weights)
    grads = []
    for fast in (True, False):
        weight.grad = None
        if fast:
            h = _ItemBag.apply(batch.indices, weight, batch.offsets, weights, batch.row_of)
            assert type(h.grad_fn).__name__ == "_ItemBagBackward"
        else:
            h = F.embedding_bag(
                batch.indices,
                weight,
                batch.offsets,
                mode="sum",
                per_sample_weights=weights,
                include_last_offset=True,
            )
        (h * upstream).sum().backward()
        grads.append((h.detach(), weight.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-6)
    assert not grads[0][1][250:].any()

    weight64 = torch.randn(300, 3, dtype=torch.float64, requires_grad=True)
    weights64 = weights.double()

    def bag(w: torch.Tensor) -> torch.Tensor:
        return _ItemBag.apply(batch.indices, w, batch.offsets, weights64, batch.row_of)

    assert torch.autograd.gradcheck(bag, (weight64,))
    with torch.no_grad():
        assert not _ItemBag.applies(weight, weights)  # inference keeps F.embedding_bag
    assert not _ItemBag.applies(weight, weights.requires_grad_())  # its gradient is not computed


def test_training_uses_the_cpu_first_layer_backward() -> None:
    model = build_model(MultVAEConfig(hidden_dims=(8,), latent_dim=4), 23)
    batch = SparseBatch.from_scipy(
        _random_histories(np.random.default_rng(0), 6, 23, weighted=False)
    )
    model.train()
    assert (
        type(model._input_layer(batch).grad_fn.next_functions[0][0]).__name__ == "_ItemBagBackward"
    )
    model.eval()
    with torch.no_grad():
        assert model._input_layer(batch).grad_fn is None


@pytest.mark.parametrize("weighted", [False, True], ids=["binary", "weighted"])
def test_sparse_nll_equals_dense_nll_and_its_gradient(weighted: bool) -> None:
    rng = np.random.default_rng(5)
    matrix = _random_histories(rng, 11, 31, weighted=weighted)
    batch = SparseBatch.from_scipy(matrix)
    x = torch.from_numpy(matrix.toarray())
    logits = torch.randn(11, 31, dtype=torch.float32) * 3
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    sparse = sparse_multinomial_nll(a, batch)
    dense = multinomial_nll(b, x)
    torch.testing.assert_close(sparse, dense)
    sparse.backward()
    dense.backward()
    torch.testing.assert_close(a.grad, b.grad)
    per_user = sparse_multinomial_nll(logits, batch, reduction="none")
    torch.testing.assert_close(per_user, multinomial_nll(logits, x, reduction="none"))
    assert per_user[1] == 0.0  # the empty history
    if not weighted:  # the binary form: n_u * logsumexp - sum of the user's logits
        n_u = x.sum(dim=1)
        expected = n_u * torch.logsumexp(logits, dim=1) - (logits * x).sum(dim=1)
        torch.testing.assert_close(per_user, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        sparse_multinomial_nll(logits, batch, reduction="sum"), per_user.sum()
    )
    with pytest.raises(ValueError, match="reduction"):
        sparse_multinomial_nll(logits, batch, reduction="max")  # type: ignore[arg-type]


def test_sparse_nll_backward_passes_gradcheck() -> None:
    # The hand-written backward against finite differences, in float64.
    matrix = _random_histories(np.random.default_rng(2), 4, 6, weighted=True)
    batch = SparseBatch.from_scipy(matrix)
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, dtype=torch.float64)  # a non-uniform upstream gradient
    assert torch.autograd.gradcheck(
        lambda f: sparse_multinomial_nll(f, batch, reduction="none") * upstream, (logits,)
    )


def test_bf16_logits_give_a_float32_likelihood() -> None:
    batch = SparseBatch.from_scipy(sp.csr_array(np.eye(3, 8, dtype=np.float32)))
    logits = torch.randn(3, 8)
    bf16 = logits.bfloat16().requires_grad_(True)
    nll = sparse_multinomial_nll(bf16, batch)
    assert nll.dtype == torch.float32
    nll.backward()
    assert bf16.grad is not None and bf16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(nll, sparse_multinomial_nll(logits, batch), rtol=2e-2, atol=2e-2)


def test_sparse_batch_round_trips_and_normalizes() -> None:
    matrix = sp.csr_array(np.array([[0, 3, 4, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=np.float32))
    batch = SparseBatch.from_scipy(matrix)
    assert batch.n_rows == 3
    np.testing.assert_array_equal(batch.to_dense().numpy(), matrix.toarray())
    torch.testing.assert_close(batch.weights, torch.tensor([0.6, 0.8, 1.0]))
    torch.testing.assert_close(batch.row_sums(), torch.tensor([7.0, 0.0, 1.0]))
    # Duplicates in a non-canonical matrix are summed, as the dense matrix would have them.
    dup = sp.csr_array(
        (np.array([1.0, 2.0], dtype=np.float32), np.array([1, 1]), np.array([0, 2])),
        shape=(1, 3),
    )
    np.testing.assert_array_equal(SparseBatch.from_scipy(dup).to_dense().numpy(), [[0, 3, 0]])


def test_shuffled_device_batches_equal_scipy_row_slices() -> None:
    rng = np.random.default_rng(8)
    matrix = _random_histories(rng, 37, 19, weighted=True)
    device_matrix = _DeviceMatrix(matrix, torch.device("cpu"))
    perm = rng.permutation(37)
    shuffled = device_matrix.shuffled(perm)
    for start, stop in [(0, 10), (10, 20), (20, 37), (5, 5)]:
        batch = shuffled.batch(start, stop)
        expected = matrix[perm[start:stop]]
        np.testing.assert_array_equal(batch.to_dense().numpy(), expected.toarray())
        reference = SparseBatch.from_scipy(expected)
        torch.testing.assert_close(batch.weights, reference.weights)
        torch.testing.assert_close(batch.offsets, reference.offsets)


def test_first_layer_layout_keeps_state_dict_keys_shapes_and_loads_plain_weights() -> None:
    config = MultVAEConfig(hidden_dims=(6,), latent_dim=3)
    torch.manual_seed(0)
    model = MultVAE(config, 10)
    assert list(model.state_dict()) == [
        "encoder.0.weight",
        "encoder.0.bias",
        "encoder.1.weight",
        "encoder.1.bias",
        "decoder.0.weight",
        "decoder.0.bias",
        "decoder.1.weight",
        "decoder.1.bias",
    ]
    first = model.encoder[0]
    assert first.weight.shape == model.state_dict()["encoder.0.weight"].shape == (6, 10)
    assert first.item_weight.shape == (10, 6) and first.item_weight.is_contiguous()
    assert torch.equal(first.weight, first.item_weight.t())
    # Same initial values as plain nn.Linear layers built and initialized in the same order.
    torch.manual_seed(0)
    layers = [torch.nn.Linear(a, b) for a, b in [(10, 6), (6, 6), (3, 6), (6, 10)]]
    for layer in layers:
        torch.nn.init.xavier_uniform_(layer.weight)
        torch.nn.init.normal_(layer.bias, mean=0.0, std=0.001)
    plain = layers[0]
    assert torch.equal(first.weight, plain.weight) and torch.equal(first.bias, plain.bias)
    assert torch.equal(model.decoder[1].weight, layers[3].weight)
    x = torch.rand(4, 10)
    torch.testing.assert_close(first(x), plain(x))
    # A state dict saved with a plain nn.Linear first layer loads, and ours loads into one.
    other = {k: v.contiguous() for k, v in MultVAE(config, 10).state_dict().items()}
    buffer = io.BytesIO()
    torch.save(other, buffer)
    buffer.seek(0)
    model.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(model.encoder[0].weight, other["encoder.0.weight"])
    assert model.encoder[0].item_weight.is_contiguous()
    plain.load_state_dict({"weight": model.state_dict()["encoder.0.weight"], "bias": first.bias})
    assert torch.equal(plain.weight, first.weight)
    dae = MultDAE(MultDAEConfig(latent_dim=4), 10)
    assert dae.encoder[0].item_weight.is_contiguous()


def _dense_reference_run(data, config, steps: int) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The original data path: SciPy row slices, dense input and target, plain Adam."""
    from recvae.training import beta_schedule

    torch.manual_seed(config.seed)
    model = build_model(config, data.n_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    steps_per_epoch = -(-data.n_users // config.batch_size)
    beta_max, anneal_steps = beta_schedule(config, steps_per_epoch * config.epochs)
    model.train()
    step = 0
    for epoch in range(1, config.epochs + 1):
        perm = np.random.default_rng([config.seed, epoch]).permutation(data.n_users)
        for b in range(steps_per_epoch):
            if step == steps:
                return {k: v.detach().clone() for k, v in model.state_dict().items()}
            rows = perm[b * config.batch_size : (b + 1) * config.batch_size]
            x = _batch_tensor(data.matrix, rows, torch.device("cpu"))
            beta = anneal_beta(step, beta_max=beta_max, anneal_steps=anneal_steps)
            logits, mu, logvar = model(x)
            loss = multinomial_nll(logits, x)
            if logvar is not None:
                loss = loss + beta * gaussian_kl(mu, logvar)
            if config.weight_decay > 0:
                loss = loss + config.weight_decay * l2_penalty(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "config",
    [
        MultVAEConfig(
            hidden_dims=(16,), latent_dim=8, epochs=2, batch_size=14, learning_rate=1e-2,
            dropout=0.0, seed=4, anneal_cap_fraction=0.5,
        ),
        MultDAEConfig(latent_dim=8, epochs=2, batch_size=14, learning_rate=1e-2, dropout=0.0),
    ],
    ids=["vae", "dae"],
)  # fmt: skip
def test_lean_training_matches_the_dense_path(config) -> None:  # type: ignore[no-untyped-def]
    # Dropout 0 and the same seed: the VAE's noise is the same stream of normals in both paths.
    data, _ = make_checkerboard()  # 60 users: batches of 14, 14, 14, 14, 4
    lean = train(data, config, options=CPU)
    dense = _dense_reference_run(data, config, steps=10)
    for name, value in lean.model.state_dict().items():
        torch.testing.assert_close(value, dense[name], rtol=1e-5, atol=1e-6, msg=name)


def test_validation_on_sparse_histories_matches_the_recommender() -> None:
    from recvae.data import planted_interactions
    from recvae.evaluation import evaluate
    from recvae.recommender import Recommender
    from recvae.split import split_users

    data = planted_interactions(n_users=300, n_items=40, seed=1)
    split = split_users(data, n_heldout=50, seed=0)
    config = MultVAEConfig(hidden_dims=(16,), latent_dim=8, epochs=2, batch_size=32, seed=1)
    trainer = Trainer(split.train, config, validation=split.validation, options=CPU)
    trainer.fit()
    got = trainer.validate()
    result = evaluate(
        Recommender(trainer.model, config, split.train.item_ids),
        split.validation.fold_in.matrix,
        split.validation.targets.matrix,
    )
    assert set(got) == {"val_ndcg@100", "val_recall@20", "val_recall@50"}
    for name, value in got.items():
        assert value == pytest.approx(result.mean(name[4:]), abs=1e-6)


def test_bf16_autocast_runs_on_cpu_and_is_used() -> None:
    data, withheld = make_checkerboard()
    config = small_vae_config(epochs=12, batch_size=20)
    losses: list[float] = []
    trainer = Trainer(
        data,
        config,
        options=RunOptions(device="cpu", progress=False, precision="bf16"),
        on_epoch=lambda e, m: losses.append(m["loss"]),
    )
    dtypes: set[torch.dtype] = set()
    trainer.model.decoder[-1].register_forward_hook(
        lambda module, args, out: dtypes.add(out.dtype) if module.training else None
    )
    rec = trainer.fit()
    assert dtypes == {torch.bfloat16}
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    fp32 = train(data, config.replace(epochs=1), options=CPU)
    assert not torch.equal(fp32.model.encoder[0].weight, rec.model.encoder[0].weight)
    assert rec.model.encoder[0].weight.dtype == torch.float32  # weights stay float32
    # Scoring (eval) runs in float32 and still finds the withheld items.
    top = rec.recommend(data.user_ids.tolist(), k=1)
    assert (top.item_idx[:, 0] == withheld).mean() > 0.9
    with pytest.raises(ValueError, match="precision"):
        RunOptions(precision="fp8")


def test_resume_is_exact_with_dropout_sampling_and_sparse_validation(tmp_path: Path) -> None:
    from recvae.data import planted_interactions
    from recvae.split import split_users

    data = planted_interactions(n_users=120, n_items=30, seed=3)
    split = split_users(data, n_heldout=20, seed=0)
    config = MultVAEConfig(
        hidden_dims=(16,), latent_dim=8, epochs=4, batch_size=32, learning_rate=1e-2,
        dropout=0.5, seed=7,
    )  # fmt: skip
    options = RunOptions(device="cpu", progress=False, validate_every=2)
    full = train(split.train, config, validation=split.validation, options=options)
    resumable = interrupt_training(
        split.train, config, tmp_path, after_epoch=3, validation=split.validation, validate_every=2
    )
    resumed = train(split.train, config, validation=split.validation, options=resumable)
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    timing = {"epoch_seconds", "users_per_second"}

    def untimed(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in h.items() if k not in timing} for h in history]

    assert untimed(resumed.meta["history"]) == untimed(full.meta["history"])
    assert resumed.meta["best_epoch"] == full.meta["best_epoch"]


def test_distributed_option_needs_a_process_group() -> None:
    data, _ = make_checkerboard()
    with pytest.raises(ValueError, match="torchrun"):
        Trainer(
            data,
            MultVAEConfig(epochs=1),
            options=RunOptions(device="cpu", progress=False, distributed=True),
        )


@pytest.mark.gpu
def test_cuda_lean_path_matches_cpu_and_bf16_trains() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    data, withheld = make_checkerboard()
    config = small_vae_config(epochs=3, dropout=0.0)
    # With dropout 0 the only noise is the reparameterization: feed both runs the same normals
    # by comparing the deterministic Mult-DAE, and check the VAE trains on the GPU.
    dae = MultDAEConfig(latent_dim=8, epochs=3, batch_size=16, learning_rate=1e-2, dropout=0.0)
    cpu = train(data, dae, options=CPU)
    gpu = train(data, dae, options=RunOptions(device="cuda", progress=False))
    for name, value in cpu.model.state_dict().items():
        # Different summation orders only; Adam keeps such differences small over 12 steps.
        torch.testing.assert_close(gpu.model.state_dict()[name].cpu(), value, rtol=1e-3, atol=1e-3)
    rec = train(
        data,
        config.replace(epochs=30, dropout=0.2),
        options=RunOptions(device="cuda", progress=False, precision="bf16"),
    )
    assert rec.device.type == "cuda"
    top = rec.recommend(data.user_ids.tolist(), k=1)
    np.testing.assert_array_equal(top.item_idx[:, 0], withheld)


@pytest.mark.slow
def test_compiled_forward_matches_eager() -> None:
    data, _ = make_checkerboard()
    config = MultDAEConfig(latent_dim=8, epochs=2, batch_size=16, learning_rate=1e-2, dropout=0.3)
    eager = train(data, config, options=CPU)
    compiled = train(data, config, options=RunOptions(device="cpu", progress=False, compile=True))
    for name, value in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_resume_from_a_format_1_checkpoint_transposes_the_first_layer_moments(
    tmp_path: Path,
) -> None:
    # Checkpoints written before the first layer was stored item-major hold its Adam moments in
    # nn.Linear's (out, n_items) layout; resuming one must continue exactly.
    data, _ = make_checkerboard()
    config = small_vae_config(epochs=4)
    full = train(data, config, options=CPU)
    options = interrupt_training(data, config, tmp_path, after_epoch=2)
    path = tmp_path / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    names = [name for name, _ in build_model(config, data.n_items).named_parameters()]
    state = checkpoint["optimizer"]["state"][names.index("encoder.0.item_weight")]
    for key in ("exp_avg", "exp_avg_sq"):
        state[key] = state[key].t().contiguous()  # (16, n_items), the old layout
    checkpoint["format"] = 1
    torch.save(checkpoint, path)
    resumed = train(data, config, options=options)
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


# ---------------------------------------------------------------- logits padded to aligned rows
def test_padded_output_is_the_layer_with_minus_inf_columns() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 37)
    h = torch.randn(5, 6)
    out = padded_output(layer, h, 16)
    assert out.shape == (5, 48)
    torch.testing.assert_close(out[:, :37], layer(h))
    assert torch.isneginf(out[:, 37:]).all()
    torch.testing.assert_close(padded_output(layer, h, 1), layer(h))  # no padding
    aligned = torch.nn.Linear(6, 32)
    assert padded_output(aligned, h, 16).shape == (5, 32)  # already a multiple


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_cpu_padded_output_writes_in_place_and_has_the_layers_gradients(bias: bool) -> None:
    # On the CPU the product goes into a view of the padded output, and the backward pass reads
    # only the layer's columns of the gradient: checked against finite differences (float64)
    # and against the zero-padded weight it replaces (float32).
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 37, bias=bias).double()
    h = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    out = padded_output(layer, h, 16)
    assert type(out.grad_fn).__name__ == "_PaddedLinearBackward"
    assert torch.isneginf(out[:, 37:]).all()

    def first_columns(h: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return padded_output(layer, h, 16)[:, :37]

    params = tuple(layer.parameters())
    assert torch.autograd.gradcheck(first_columns, (h, *params))

    layer32 = torch.nn.Linear(6, 37, bias=bias)
    x = torch.randn(5, 6, requires_grad=True)
    upstream = torch.randn(5, 48)
    upstream[:, 37:] = 0.0  # what a softmax's gradient is at -inf logits
    grads = []
    for use_fast_path in (True, False):
        layer32.zero_grad(set_to_none=True)
        x.grad = None
        if use_fast_path:
            out32 = padded_output(layer32, x, 16)
        else:
            weight = F.pad(layer32.weight, (0, 0, 0, 11))  # zero rows
            b = layer32.bias if bias else torch.zeros(37)
            out32 = F.linear(x, weight, torch.cat([b, torch.full((11,), -math.inf)]))
        (out32[:, :37] * upstream[:, :37]).sum().backward()
        grads.append([x.grad] + [p.grad for p in layer32.parameters()])
    for fast, plain in zip(*grads, strict=True):
        torch.testing.assert_close(fast, plain)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_cpu_bf16_padded_output_is_autocasts_product_written_in_place(bias: bool) -> None:
    # Under CPU bf16 autocast the padded layer keeps the in-place product (_PaddedLinear, in
    # bfloat16): the same logits and gradients as autocast's own product over a zero-padded
    # weight, the logits in bf16, the gradients in the parameters' float32.
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 100, bias=bias)
    x = torch.randn(9, 24, requires_grad=True)
    upstream = torch.randn(9, 128).bfloat16()
    upstream[:, 100:] = 0.0  # a softmax's gradient at the -inf columns
    results = []
    for fast in (True, False):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fast:
                out = padded_output(layer, x, 64)
                assert type(out.grad_fn).__name__ == "_PaddedLinearBackward"
            else:
                b = layer.bias if bias else torch.zeros(100)
                padded_bias = torch.cat([b, torch.full((28,), -math.inf)])
                out = F.linear(x, F.pad(layer.weight, (0, 0, 0, 28)), padded_bias)
        assert out.dtype == torch.bfloat16 and out.shape == (9, 128)
        assert torch.isneginf(out[:, 100:]).all()
        out.backward(upstream)
        grads = [x.grad] + [p.grad for p in layer.parameters()]
        assert all(g is not None and g.dtype == torch.float32 for g in grads)
        results.append((out.detach().float(), grads))
    (fast_out, fast_grads), (plain_out, plain_grads) = results
    torch.testing.assert_close(fast_out[:, :100], plain_out[:, :100], rtol=1e-2, atol=1e-2)
    for fast, plain in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-2, atol=1e-2)
    # float64 parameters under bf16 autocast keep autocast's own product
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out64 = padded_output(layer.double(), x.double(), 64)
    assert type(out64.grad_fn).__name__ != "_PaddedLinearBackward"


def test_cpu_first_layer_backward_under_bf16_autocast_is_the_float32_one() -> None:
    # CPU bf16 autocast leaves the bag sums in float32, so _ItemBag runs under it too and gives
    # the same output and weight gradient as without autocast.
    from recvae.model import _ItemBag

    rng = np.random.default_rng(8)
    batch = SparseBatch.from_scipy(_random_histories(rng, 30, 200, weighted=True))
    weight = torch.randn(200, 16, requires_grad=True)
    upstream = torch.randn(30, 16)
    results = []
    for autocast in (True, False):
        weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert _ItemBag.applies(weight, batch.weights)
            h = _ItemBag.apply(batch.indices, weight, batch.offsets, batch.weights, batch.row_of)
        assert h.dtype == torch.float32
        (h * upstream).sum().backward()
        results.append((h.detach(), weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    with torch.autocast("cpu", dtype=torch.float16):
        assert not _ItemBag.applies(weight, batch.weights)  # only bf16's is known to keep float32


def test_cpu_bf16_training_takes_the_in_place_padded_logits_and_the_bag_sum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under CPU bf16 autocast the trainer's steps keep both CPU paths (they used to fall back
    # to autocast's padded-weight product and F.embedding_bag's backward).
    from recvae import model as model_module

    data, _ = make_checkerboard(n_items=70)
    options = RunOptions(device="cpu", progress=False, precision="bf16", item_multiple=64)
    trainer = Trainer(data, small_vae_config(epochs=1, batch_size=20), options=options)
    seen: set[str] = set()

    def record(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        if module.training and out.grad_fn is not None:
            seen.add(type(out.grad_fn).__name__)

    trainer.model.decoder[-1].register_forward_hook(record)
    applies = model_module._ItemBag.applies
    calls: list[bool] = []

    def counting(weight: torch.Tensor, per_sample_weights: torch.Tensor) -> bool:
        calls.append(applies(weight, per_sample_weights))
        return calls[-1]

    monkeypatch.setattr(model_module._ItemBag, "applies", staticmethod(counting))
    trainer.fit()
    assert seen == {"_PaddedLinearBackward"}
    assert calls and all(calls)


def test_bf16_on_a_cpu_without_bf16_units_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from recvae import cpu_runtime

    data, _ = make_checkerboard()
    config = small_vae_config(epochs=1)
    bf16 = RunOptions(device="cpu", progress=False, precision="bf16")
    for support, warned in (("none", True), ("emulated", True), ("native", False)):
        monkeypatch.setattr(cpu_runtime, "bf16_support", lambda support=support: support)
        caplog.clear()
        with caplog.at_level("WARNING", logger="recvae.training"):
            Trainer(data, config, options=bf16)
            Trainer(data, config, options=CPU)  # fp32: never
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == int(warned), (support, messages)
        if warned:
            assert "precision bf16 on a CPU without bf16 units" in messages[0]
            assert "use precision fp32" in messages[0]


@pytest.mark.parametrize(
    ("n_users", "n_items", "threads", "precision"),
    [(9, 37, None, "fp32"), (70, 1030, 1, "fp32"), (70, 1030, 2, "fp32"), (9, 37, None, "bf16")],
    ids=["small", "cpu-blas-1-thread", "cpu-blas-2-threads", "bf16"],
)
def test_padded_logits_give_the_same_likelihood_and_gradients(
    n_users: int, n_items: int, threads: int | None, precision: str
) -> None:
    # The large cases go through recvae.cpu_runtime.linear's own products (>= 64 rows,
    # >= 1,024 outputs); one thread may pick NumPy's BLAS for them.
    rng = np.random.default_rng(3)
    batch = SparseBatch.from_scipy(_random_histories(rng, n_users, n_items, weighted=False))
    torch.manual_seed(1)
    model = MultVAE(MultVAEConfig(hidden_dims=(24,), latent_dim=6, dropout=0.5), n_items)
    model.train()
    noisy = batch.with_noise(
        dropout_mask=(torch.rand(batch.indices.shape[0]) >= 0.5).float() * 2.0,
        eps=torch.randn(n_users, 6),
    )
    before = torch.get_num_threads()
    results = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for multiple in (1, 64):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits, mu, logvar = model(noisy, item_multiple=multiple)
            assert logits.shape == (n_users, -(-n_items // multiple) * multiple)
            loss = sparse_multinomial_nll(logits, noisy) + 0.3 * gaussian_kl(mu, logvar)
            loss.backward()
            results.append((loss.detach(), _params_and_grads(model)))
    finally:
        torch.set_num_threads(before)
    (loss_plain, grads_plain), (loss_padded, grads_padded) = results
    torch.testing.assert_close(loss_padded, loss_plain, rtol=1e-5, atol=1e-5)
    assert grads_padded.keys() == grads_plain.keys() == dict(model.named_parameters()).keys()
    # Under bf16 the padded layer's products are _PaddedLinear's, the plain ones autocast's:
    # the same bf16 products over differently laid out operands, which round differently.
    tol = {"rtol": 2e-2, "atol": 1e-3} if precision == "bf16" else {"rtol": 1e-4, "atol": 1e-6}
    for name, grad in grads_plain.items():
        assert grads_padded[name].shape == grad.shape
        torch.testing.assert_close(grads_padded[name], grad, **tol, msg=name)


@pytest.mark.parametrize(
    "config",
    [small_vae_config(epochs=2), MultDAEConfig(latent_dim=8, epochs=2, batch_size=16)],
    ids=["vae", "dae"],
)
def test_training_with_padded_logits_matches_training_without(
    config: MultVAEConfig | MultDAEConfig,
) -> None:
    data, _ = make_checkerboard(n_items=21)
    plain = train(data, config, options=RunOptions(device="cpu", progress=False, item_multiple=1))
    padded = train(data, config, options=RunOptions(device="cpu", progress=False, item_multiple=8))
    assert padded.model.decoder[-1].weight.shape == (21, 16 if config.model == "multvae" else 8)
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(padded.model.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_item_multiple_is_automatic_and_validated() -> None:
    data, _ = make_checkerboard()
    config = small_vae_config(epochs=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert Trainer(data, config, options=CPU).item_multiple == 1
        torch.set_num_threads(2)
        assert Trainer(data, config, options=CPU).item_multiple == 64
        chosen = RunOptions(device="cpu", progress=False, item_multiple=16)
        assert Trainer(data, config, options=chosen).item_multiple == 16
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="item_multiple"):
        RunOptions(item_multiple=0)


def test_models_without_item_padding_train_unpadded() -> None:
    # A sparse-input model whose forward takes no item_multiple keeps the plain logits.
    data, _ = make_checkerboard()
    trainer = Trainer(data, small_vae_config(epochs=1), options=CPU)
    trainer.model.supports_item_padding = False  # type: ignore[assignment]
    assert trainer._item_multiple() == 1
