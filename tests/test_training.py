from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recvae.config import MultDAEConfig, MultVAEConfig, RunOptions
from recvae.split import split_users
from recvae.training import CheckpointMismatchError, Trainer, beta_schedule, train
from tests.conftest import interrupt_training, make_checkerboard, small_vae_config

CPU = RunOptions(device="cpu", progress=False)


@pytest.mark.parametrize(
    "config",
    [
        small_vae_config(),
        MultDAEConfig(
            latent_dim=8, epochs=30, batch_size=16, learning_rate=1e-2, dropout=0.2, seed=1
        ),
    ],
)
def test_loss_falls_and_withheld_item_ranks_first(config) -> None:  # type: ignore[no-untyped-def]
    data, withheld = make_checkerboard()
    seen: list[float] = []
    rec = train(data, config, options=CPU, on_epoch=lambda e, m: seen.append(m["loss"]))
    assert all(np.isfinite(seen))
    assert seen[-1] < seen[0]
    top = rec.recommend(data.user_ids.tolist(), k=1)
    np.testing.assert_array_equal(top.item_idx[:, 0], withheld)


def test_same_seed_gives_identical_weights() -> None:
    data, _ = make_checkerboard()
    a = train(data, small_vae_config(epochs=3), options=CPU)
    b = train(data, small_vae_config(epochs=3), options=CPU)
    c = train(data, small_vae_config(epochs=3, seed=2), options=CPU)
    for (name, p), q in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    assert any(
        not torch.equal(p, r)
        for p, r in zip(a.model.state_dict().values(), c.model.state_dict().values(), strict=True)
    )


def test_learns_planted_structure_and_selects_on_validation() -> None:
    from recvae.data import planted_interactions
    from recvae.evaluation import evaluate

    data = planted_interactions(n_users=400, n_items=60, n_clusters=3, seed=0)
    split = split_users(data, n_heldout=60, seed=0)
    rec = train(
        split.train,
        small_vae_config(epochs=15, batch_size=64),
        validation=split.validation,
        options=CPU,
    )
    test = split.test
    result = evaluate(rec, test.fold_in.matrix, test.targets.matrix)

    class Fixed:
        """Scores every user's items with a fixed function of (user cluster, item cluster)."""

        n_items = split.train.n_items

        def __init__(self, oracle: bool) -> None:
            self.oracle = oracle

        def score(self, histories):  # type: ignore[no-untyped-def]
            users = np.asarray(test.fold_in.user_ids, dtype=np.int64)[: histories.shape[0]]
            items = np.asarray(split.train.item_ids, dtype=np.int64)
            if self.oracle:  # the planted truth: same cluster first
                return ((users[:, None] % 3) == (items[None, :] % 3)).astype(np.float32)
            return np.random.default_rng(0).random((histories.shape[0], self.n_items))

    oracle = evaluate(
        Fixed(True), test.fold_in.matrix, test.targets.matrix, batch_size=test.n_users
    )
    random = evaluate(
        Fixed(False), test.fold_in.matrix, test.targets.matrix, batch_size=test.n_users
    )
    assert result.mean("ndcg@20") > random.mean("ndcg@20") + 0.1
    assert result.mean("ndcg@20") > 0.9 * oracle.mean("ndcg@20")
    assert 1 <= rec.meta["best_epoch"] <= 15
    history = rec.meta["history"]
    best = max(history, key=lambda h: h["val_ndcg@100"])
    assert int(best["epoch"]) == rec.meta["best_epoch"]


def test_early_stopping_stops() -> None:
    from recvae.data import planted_interactions

    data = planted_interactions(n_users=300, n_items=40, seed=1)
    split = split_users(data, n_heldout=50, seed=0)
    rec = train(
        split.train,
        small_vae_config(epochs=200, patience=2, learning_rate=5e-2),
        validation=split.validation,
        options=CPU,
    )
    assert rec.meta["stopped_early"] and rec.meta["epochs_run"] < 200
    assert rec.meta["epochs_run"] == rec.meta["best_epoch"] + 2


def test_relative_and_absolute_anneal_schedules() -> None:
    cap, steps = beta_schedule(MultVAEConfig(beta_max=0.2, anneal_cap_fraction=0.86), 1000)
    assert cap == 0.2 and steps == pytest.approx(0.86 * 1000 / 0.2)
    assert beta_schedule(MultVAEConfig(anneal_steps=200000), 1000) == (0.2, 200000.0)
    assert beta_schedule(MultVAEConfig(beta_search=True), 1000) == (1.0, 1000.0)


def test_beta_reaches_cap_near_86_percent_of_training() -> None:
    data, _ = make_checkerboard()
    betas: list[float] = []
    train(
        data,
        small_vae_config(epochs=50, batch_size=60),
        options=CPU,
        on_epoch=lambda e, m: betas.append(m["beta"]),
    )
    first_cap = next(i for i, b in enumerate(betas) if b >= 0.2 - 1e-9) + 1
    assert 0.80 * 50 <= first_cap <= 0.90 * 50


def test_beta_search_reports_best_beta() -> None:
    from recvae.data import planted_interactions

    data = planted_interactions(n_users=300, n_items=40, seed=2)
    split = split_users(data, n_heldout=50, seed=0)
    rec = train(
        split.train,
        small_vae_config(epochs=8, beta_search=True),
        validation=split.validation,
        options=CPU,
    )
    history = rec.meta["history"]
    assert history[-1]["beta"] == pytest.approx(1.0, abs=0.2)
    best = max(history, key=lambda h: h["val_ndcg@100"])
    assert rec.meta["best_beta"] == best["beta"]


def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path) -> None:
    data, _ = make_checkerboard()
    config = small_vae_config(epochs=6)
    full = train(data, config, options=CPU)
    opts = interrupt_training(data, config, tmp_path, after_epoch=3)
    epochs: list[int] = []
    resumed = train(data, config, options=opts, on_epoch=lambda e, m: epochs.append(e))
    assert epochs == [4, 5, 6]
    for p, q in zip(
        full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert len(resumed.meta["history"]) == 6


def test_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    data, _ = make_checkerboard()
    opts = RunOptions(device="cpu", progress=False, checkpoint_dir=str(tmp_path))
    train(data, small_vae_config(epochs=1), options=opts)
    with pytest.raises(CheckpointMismatchError, match="another config"):
        train(data, small_vae_config(epochs=2, latent_dim=4), options=opts)


def test_the_checkpoint_is_on_the_disk_before_it_takes_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import record_fsyncs

    data, _ = make_checkerboard()
    opts = RunOptions(device="cpu", progress=False, checkpoint_dir=str(tmp_path))
    events = record_fsyncs(monkeypatch)
    train(data, small_vae_config(epochs=1), options=opts)
    target = str((tmp_path / "checkpoint.pt").resolve())
    tmp = str((tmp_path / "checkpoint.tmp").resolve())
    assert events == [("fsync", tmp), ("rename", target), ("fsync", str(tmp_path.resolve()))]


def test_a_garbage_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    data, _ = make_checkerboard()
    opts = RunOptions(device="cpu", progress=False, checkpoint_dir=str(tmp_path))
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage\n")
    with pytest.raises(CheckpointMismatchError) as info:
        train(data, small_vae_config(epochs=1), options=opts)
    message = str(info.value)
    assert "not a recvae checkpoint" in message and "remove it to start over" in message
    assert "weights_only" not in message and "\n" not in message


def test_empty_data_and_bad_device_are_rejected() -> None:
    from recvae.data import Interactions

    empty = Interactions.from_pairs(
        np.array([], dtype=int), np.array([], dtype=int), n_users=3, n_items=4
    )
    with pytest.raises(ValueError, match="empty"):
        Trainer(empty, small_vae_config(), options=CPU)
    if not torch.cuda.is_available():
        data, _ = make_checkerboard()
        with pytest.raises(ValueError, match="CUDA is not available"):
            train(
                data, small_vae_config(epochs=1), options=RunOptions(device="cuda", progress=False)
            )


@pytest.mark.gpu
def test_trains_on_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    data, withheld = make_checkerboard()
    rec = train(data, small_vae_config(), options=RunOptions(device="cuda", progress=False))
    assert rec.device.type == "cuda"
    top = rec.recommend(data.user_ids.tolist(), k=1)
    np.testing.assert_array_equal(top.item_idx[:, 0], withheld)
