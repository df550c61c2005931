"""The CPU training runtime: heap reuse and the BLAS choice for the logits product."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from recvae import cpu_runtime, model
from recvae.config import MultVAEConfig
from recvae.model import OutputLinear, SparseBatch, build_model, sparse_multinomial_nll

needs_glibc = pytest.mark.skipif(
    cpu_runtime._glibc() is None, reason="heap reuse needs glibc (Linux)"
)
needs_numpy_blas = pytest.mark.skipif(
    cpu_runtime._numpy_blas() is None, reason="NumPy's OpenBLAS not found (or no threadpoolctl)"
)


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """NumPy's BLAS is considered only when torch runs on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def forced_choice(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Set the BLAS choice for a shape without timing anything."""
    choices: dict[tuple[str, int, int], str] = {}
    monkeypatch.setattr(cpu_runtime, "_choices", choices)

    def force(n_in: int, n_out: int, which: str) -> None:
        for product in ("forward", "grad_input", "grad_weight"):
            choices[(product, n_in, n_out)] = which

    return force


@needs_numpy_blas
@pytest.mark.parametrize("which", ["numpy", "torch"])
def test_linear_matches_f_linear_and_its_gradients(forced_choice, which: str) -> None:  # type: ignore[no-untyped-def]
    forced_choice(48, 1500, which)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70, 48, generator=gen)
    weight = torch.randn(1500, 48, generator=gen)
    bias = torch.randn(1500, generator=gen)
    upstream = torch.randn(70, 1500, generator=gen)
    inputs = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    expected_inputs = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    out = cpu_runtime.linear(*inputs)
    expected = F.linear(*expected_inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for got, want in zip(inputs, expected_inputs, strict=True):
        assert got.grad is not None and want.grad is not None
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-3)
    # Without autograd (scoring), and without a bias.
    with torch.inference_mode():
        torch.testing.assert_close(
            cpu_runtime.linear(x, weight), x @ weight.T, rtol=1e-5, atol=1e-4
        )


@needs_numpy_blas
def test_linear_times_both_once_per_shape_and_keeps_the_choice(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cpu_runtime, "_choices", {})
    x, weight = torch.randn(64, 16), torch.randn(1024, 16)
    out = cpu_runtime.linear(x, weight)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-4)
    choices = cpu_runtime.blas_choices()
    assert list(choices) == [("forward", 16, 1024)]  # no gradient products yet
    assert choices[("forward", 16, 1024)] in ("numpy", "torch")
    # Training times the two gradient products on the first backward pass.
    w = weight.clone().requires_grad_(True)
    cpu_runtime.linear(x.clone().requires_grad_(True), w).sum().backward()
    assert set(cpu_runtime.blas_choices()) == {
        (product, 16, 1024) for product in ("forward", "grad_input", "grad_weight")
    }
    expected_grad = x.sum(0).expand(1024, 16)
    assert w.grad is not None
    torch.testing.assert_close(w.grad, expected_grad, rtol=1e-5, atol=1e-4)
    calls: list[str] = []

    def timed(*args: object) -> str:
        calls.append("timed")
        return "torch"

    monkeypatch.setattr(cpu_runtime.time, "perf_counter", timed)
    cpu_runtime.linear(x, weight)
    cpu_runtime.linear(x.clone().requires_grad_(True), w).sum().backward()
    assert calls == []  # decided once


@needs_numpy_blas
@pytest.mark.parametrize("pinned", ["torch", "numpy", " NumPy "])
def test_recvae_cpu_blas_pins_the_choice_without_timing(
    monkeypatch: pytest.MonkeyPatch, pinned: str
) -> None:
    # Timing picks per process: two runs of a seed on one thread could take different BLAS
    # and differ in rounding. The variable pins the choice, so such runs repeat bit for bit.
    monkeypatch.setattr(cpu_runtime, "_choices", {})
    monkeypatch.setenv("RECVAE_CPU_BLAS", pinned)

    def no_timing() -> float:
        raise AssertionError("a pinned choice is not timed")

    monkeypatch.setattr(cpu_runtime.time, "perf_counter", no_timing)
    x = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(1024, 16, requires_grad=True)
    runs = []
    for _ in range(2):
        w.grad = x.grad = None
        out = cpu_runtime.linear(x, w)
        out.square().sum().backward()
        runs.append((out.detach(), w.grad.clone(), x.grad.clone()))
    assert set(cpu_runtime.blas_choices().values()) == {pinned.strip().lower()}
    assert len(cpu_runtime.blas_choices()) == 3
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    torch.testing.assert_close(runs[0][0], F.linear(x.detach(), w.detach()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("value", ["", "auto", "AUTO"])
def test_recvae_cpu_blas_auto_times_and_other_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("RECVAE_CPU_BLAS", value)
    assert cpu_runtime.pinned_blas() is None
    monkeypatch.setenv("RECVAE_CPU_BLAS", "mkl")
    with pytest.raises(ValueError, match="RECVAE_CPU_BLAS must be auto, torch or numpy, got 'mkl'"):
        cpu_runtime.pinned_blas()
    from recvae.config import RunOptions
    from recvae.data import planted_interactions
    from recvae.training import Trainer

    data = planted_interactions(n_users=40, n_items=30, n_clusters=2, seed=0)
    with pytest.raises(ValueError, match="RECVAE_CPU_BLAS"):  # before any training
        Trainer(data, MultVAEConfig(latent_dim=4), options=RunOptions(device="cpu"))


def test_small_or_foreign_products_are_plain_f_linear(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cpu_runtime, "_choices", {})
    monkeypatch.setattr(cpu_runtime, "_choose", lambda *a: pytest.fail("timed a small product"))
    torch.set_num_threads(2)  # several threads: torch's BLAS only
    x, weight = torch.randn(100, 8), torch.randn(5000, 8)
    torch.testing.assert_close(cpu_runtime.linear(x, weight), F.linear(x, weight))
    torch.set_num_threads(1)
    for x, weight in [
        (torch.randn(10, 8), torch.randn(5000, 8)),  # few rows
        (torch.randn(100, 8), torch.randn(50, 8)),  # few outputs
        (torch.randn(100, 8, dtype=torch.float64), torch.randn(5000, 8, dtype=torch.float64)),
        (torch.randn(8, 100).T, torch.randn(5000, 8)),  # not contiguous
    ]:
        torch.testing.assert_close(cpu_runtime.linear(x, weight), F.linear(x, weight))
    assert cpu_runtime.blas_choices() == {}


def test_output_layer_is_a_linear_with_the_same_state_and_initialization() -> None:
    torch.manual_seed(3)
    plain = torch.nn.Linear(20, 3000)
    torch.manual_seed(3)
    out = OutputLinear(20, 3000)
    assert out.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(out.weight, plain.weight)
    vae = build_model(MultVAEConfig(hidden_dims=(8,), latent_dim=4), n_items=3000)
    decoder = vae.decoder
    assert isinstance(decoder, torch.nn.ModuleList) and isinstance(decoder[-1], OutputLinear)
    hits: list[tuple[int, ...]] = []
    decoder[-1].register_forward_hook(lambda m, a, o: hits.append(tuple(o.shape)))
    vae.eval()
    with torch.no_grad():
        vae(torch.zeros(2, 3000))
    assert hits == [(2, 3000)]  # a module: hooks see its output


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_softmax_and_logsumexp_equal_torch(dtype: torch.dtype) -> None:
    logits = torch.randn(9, 31, dtype=torch.float64) * 30  # the shift by the maximum matters
    logits[3] += 500.0
    logits[5] = 0.0  # all equal: lse = log(31)
    logits[6, 7] = 1e4  # one item takes all the mass; the others underflow to 0
    logits = logits.to(dtype)
    probs, lse = model._softmax_rows(logits)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    assert probs.dtype == lse.dtype == wide  # bf16 logits (CPU autocast) give float32
    torch.testing.assert_close(probs, torch.softmax(logits.to(wide), dim=1))
    torch.testing.assert_close(lse, torch.logsumexp(logits.to(wide), dim=1))
    assert torch.isfinite(lse).all()
    logits = logits.float()
    # The likelihood and its gradient through the CPU path, against the dense formula.
    matrix = sp.random_array((9, 31), density=0.3, random_state=1, format="csr")
    matrix.data[:] = 1.0
    batch = SparseBatch.from_scipy(matrix.astype(np.float32))
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    sparse_multinomial_nll(a, batch).backward()
    x = torch.from_numpy(matrix.toarray().astype(np.float32))
    (-(F.log_softmax(b, dim=1) * x).sum(dim=1).mean()).backward()
    torch.testing.assert_close(a.grad, b.grad)


def _faults_per_step(n_bytes: int, *, warm: int = 10, measured: int = 5) -> float:
    """Mean minor page faults of a step that allocates, fills and frees a large tensor.

    Like a training step, each also makes small allocations while the large one lives, freed
    with it at the end of the step; the first ``warm`` steps (the heap finding its steady
    state) are not counted.
    """
    faults = []
    for i in range(warm + measured):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        big = torch.empty(n_bytes // 4).fill_(1.0)
        small = [bytearray(1000 + i), torch.empty(300 + i)]
        del big, small
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return float(np.mean(faults[warm:]))


@needs_glibc
def test_reuse_freed_memory_stops_page_faults_on_large_blocks() -> None:
    size = 96 * 1024 * 1024  # above glibc's largest mmap threshold (32 MiB)
    pages = size // resource.getpagesize()
    assert _faults_per_step(size, warm=2) > pages // 2  # default: fresh pages every step
    with cpu_runtime.reuse_freed_memory("cpu") as active:
        assert active
        with cpu_runtime.reuse_freed_memory("cpu") as nested:  # re-entrant
            assert nested
        assert cpu_runtime._heap_depth == 1
        assert _faults_per_step(size) < pages // 10  # freed blocks are reused
    assert cpu_runtime._heap_depth == 0
    assert _faults_per_step(size, warm=2) > pages // 2  # restored on exit


def test_reuse_freed_memory_does_nothing_off_the_cpu() -> None:
    with cpu_runtime.reuse_freed_memory(torch.device("cuda")) as active:
        assert not active
    assert cpu_runtime._heap_depth == 0


def test_bf16_support_reads_the_cpus_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_runtime.bf16_support({"avx2", "avx512f", "avx512bw", "avx512_bf16"}) == "native"
    assert cpu_runtime.bf16_support({"avx2", "amx_bf16", "amx_tile"}) == "native"
    onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    # AVX-512 without bf16 units: emulated where oneDNN takes bf16; AVX2 alone: neither
    assert cpu_runtime.bf16_support({"avx2", "avx512f", "avx512bw"}) == (
        "emulated" if onednn else "none"
    )
    assert cpu_runtime.bf16_support({"avx2", "fma"}) == "none"

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert cpu_runtime._cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    assert cpu_runtime._cpu_flags(str(cpuinfo.with_name("missing"))) is None
    (cpuinfo.with_name("empty")).write_text("processor\t: 0\n")
    assert cpu_runtime._cpu_flags(str(cpuinfo.with_name("empty"))) is None
    # No flags to read (not Linux): oneDNN's own check decides between emulated and none
    monkeypatch.setattr(cpu_runtime, "_cpu_flags", lambda path="": None)
    assert cpu_runtime.bf16_support() == ("emulated" if onednn else "none")
    # This machine's answer agrees with its flags
    monkeypatch.undo()
    flags = cpu_runtime._cpu_flags()
    if flags is not None:
        assert (cpu_runtime.bf16_support() == "native") == bool(flags & set(cpu_runtime.BF16_FLAGS))
