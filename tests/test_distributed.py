"""DDP on the CPU (gloo, two processes) gives the single-process result.

The global batches are sharded unevenly across the ranks (odd batch size, short last batch), the
input dropout and the reparameterization noise are on, and the loss has an L2 penalty: each of
these breaks the equivalence if handled naively (per-rank means, per-rank noise, a penalty counted
once per rank), so the comparison checks the real thing, not a special case.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from recvae.config import ModelConfig, MultDAEConfig, MultVAEConfig, RunOptions
from recvae.distributed import shard_range

REPO = Path(__file__).resolve().parents[1]
CONFIGS: dict[str, ModelConfig] = {
    # 90 training users, batch 17: five batches split 8/9 and a last one of 5 split 2/3.
    "vae": MultVAEConfig(
        hidden_dims=(16,), latent_dim=8, epochs=2, batch_size=17, learning_rate=1e-2,
        dropout=0.5, weight_decay=1e-3, seed=11,
    ),
    "dae": MultDAEConfig(latent_dim=8, epochs=1, batch_size=17, learning_rate=1e-2, seed=12),
    # Batches of 89 and 1 users: on the last step rank 0's shard is empty.
    "empty-shard": MultVAEConfig(
        hidden_dims=(16,), latent_dim=8, epochs=1, batch_size=89, learning_rate=1e-2, seed=13,
    ),
}  # fmt: skip


def _split():  # type: ignore[no-untyped-def]
    from recvae.data import planted_interactions
    from recvae.split import split_users

    data = planted_interactions(n_users=130, n_items=40, n_clusters=3, seed=5)
    return split_users(data, n_heldout=20, seed=0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _untimed(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [
        {k: v for k, v in h.items() if k not in ("epoch_seconds", "users_per_second")}
        for h in history
    ]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    # A crash in C++ (gloo) prints where each thread was instead of a bare signal name.
    faulthandler.enable()
    from recvae import distributed as dist_utils
    from recvae.training import Trainer

    context = dist_utils.init_from_env(device="cpu")
    assert context.backend == "gloo" and context.world_size == world_size
    try:
        split = _split()
        for name, config in CONFIGS.items():
            options = RunOptions(
                device="cpu",
                progress=False,
                distributed=True,
                # One directory per rank here, to see which ranks write (a real run shares one).
                checkpoint_dir=str(Path(out_dir) / f"{name}-rank{rank}"),
            )
            trainer = Trainer(split.train, config, validation=split.validation, options=options)
            rec = trainer.fit()
            if rank == 0:
                torch.save(rec.model.state_dict(), Path(out_dir) / f"{name}.pt")
                (Path(out_dir) / f"{name}.json").write_text(
                    json.dumps({"history": _untimed(rec.meta["history"])})
                )
            # The DDP wrapper holds the process group: release it before the group goes.
            del trainer, rec
        # As pipelines.train_ddp: the ranks leave together (rank 0 was still writing files
        # while rank 1 tore its group down; CI once saw rank 1 abort in gloo there).
        dist_utils.barrier()
    finally:
        dist_utils.destroy()


def test_two_gloo_ranks_match_a_single_process_run(tmp_path: Path) -> None:
    from recvae.training import Trainer

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    split = _split()
    for name, config in CONFIGS.items():
        single = Trainer(
            split.train, config, validation=split.validation, options=RunOptions(
                device="cpu", progress=False)
        ).fit()  # fmt: skip
        ddp_state = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        for key, value in single.model.state_dict().items():
            torch.testing.assert_close(ddp_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
        ddp_history = json.loads((tmp_path / f"{name}.json").read_text())["history"]
        single_history = _untimed(single.meta["history"])
        assert len(ddp_history) == len(single_history) == config.epochs
        for got, expected in zip(ddp_history, single_history, strict=True):
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        # Checkpoints come from rank 0 only.
        assert (tmp_path / f"{name}-rank0" / "checkpoint.pt").is_file()
        assert not (tmp_path / f"{name}-rank1").exists()


def test_shard_range_covers_everything_once() -> None:
    for n in (0, 1, 5, 17, 100):
        for world_size in (1, 2, 3, 8):
            parts = [shard_range(n, r, world_size) for r in range(world_size)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
            sizes = np.diff([p[0] for p in parts] + [n])
            assert sizes.max() - sizes.min() <= 1
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


def test_init_outside_torchrun_names_the_missing_variables(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from recvae.distributed import init_from_env

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.*torchrun"):
        init_from_env()


@pytest.mark.slow
def test_torchrun_entry_point_trains_and_saves_a_bundle(tmp_path: Path) -> None:
    from recvae.data import planted_interactions
    from recvae.recommender import Recommender

    data = planted_interactions(n_users=300, n_items=40, seed=9)
    rows, cols = data.matrix.nonzero()
    csv = tmp_path / "log.csv"
    lines = ["user_id,item_id"] + [f"u{r},i{c}" for r, c in zip(rows, cols, strict=True)]
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RECVAE_TRACKING": "off"}
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "pipelines.train_ddp",
        "--data", str(csv), "--n-heldout", "30", "--epochs", "3", "--batch-size", "33",
        "--latent-dim", "8", "--device", "cpu", "--threads", "1", "--output", str(out),
        "--tracking-uri", store, "--registered-model", "ddp-model",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test metrics" in done.stdout and done.stdout.count("bundle ") == 1
    assert "registered   models:/ddp-model@staging (version 1)" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and 0 < metrics["test"]["ndcg@100"] <= 1
    rec = Recommender.load(out / "bundle")
    assert rec.meta["epochs_run"] == 3
    # Rank 0 logged one run, like `recvae train`: per-epoch curves and the final metrics.
    import mlflow

    mlflow.set_tracking_uri(store)
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert abs(run.data.metrics["test_ndcg_at_100"] - metrics["test"]["ndcg@100"]) < 1e-9
    # Not under torchrun: a clear error and a non-zero exit.
    bare = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.train_ddp", "--data", str(csv), "--device", "cpu"],
        cwd=REPO, env=bare, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "torchrun" in done.stderr


def test_torchrun_refuses_an_output_holding_another_runs_bundle_before_joining(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As `recvae train`: the bundle there has no checkpoint this run would resume, so the
    # run would replace it. Refused on rank 0 before the group forms (no rank waits for it).
    import shutil

    from pipelines import train_ddp
    from recvae import distributed as dist_utils

    out = tmp_path / "run"
    shutil.copytree(tiny_bundle, out / "bundle")
    monkeypatch.setenv("RANK", "0")

    def no_group(*args: object, **kwargs: object) -> None:
        raise AssertionError("the process group was joined before the output was checked")

    monkeypatch.setattr(dist_utils, "init_from_env", no_group)
    args = train_ddp.build_parser().parse_args(["train", "--epochs", "1", "-o", str(out)])
    with pytest.raises(ValueError, match="already holds a bundle"):
        train_ddp.run_distributed(args)


def test_torchrun_entry_point_takes_a_negative_number_after_a_flag() -> None:
    # As `recvae train`: `--threshold -1e3` is a value, not an unknown option "-1e3".
    from pipelines import train_ddp

    args = train_ddp.build_parser().parse_args(["train", "--threshold", "-1e3", "--epochs", "1"])
    assert args.threshold == -1000.0


def _planted_csv(tmp_path: Path) -> Path:
    from recvae.data import planted_interactions

    data = planted_interactions(n_users=300, n_items=40, seed=9)
    rows, cols = data.matrix.nonzero()
    csv = tmp_path / "log.csv"
    lines = ["user_id,item_id"] + [f"u{r},i{c}" for r, c in zip(rows, cols, strict=True)]
    csv.write_text("\n".join(lines) + "\n")
    return csv


def test_sigterm_to_torchrun_ends_the_run_killed_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    # A scheduler stops the launcher; torchrun passes SIGTERM on to its workers. Rank 0 ends
    # the MLflow run KILLED (it was left RUNNING: the workers died mid-run) and each rank says
    # why it stopped; the checkpoint rank 0 wrote is whole, and no bundle was written.
    import signal
    import time

    import mlflow

    csv = _planted_csv(tmp_path)
    out = tmp_path / "run"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "pipelines.train_ddp",
        "--data", str(csv), "--n-heldout", "30", "--epochs", "100000", "--batch-size", "33",
        "--latent-dim", "8", "--device", "cpu", "--threads", "1", "--no-progress",
        "--output", str(out), "--tracking-uri", store,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        checkpoint = out / "checkpoints" / "checkpoint.pt"
        deadline = time.monotonic() + 60
        while not checkpoint.is_file() and time.monotonic() < deadline:
            if process.poll() is not None:
                break
            time.sleep(0.2)
        assert checkpoint.is_file(), process.communicate(timeout=30)[1][-3000:]
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode != 0
    assert err.count("recvae train (distributed): terminated (SIGTERM)") == 2, err[-3000:]
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] >= 1
    assert not (out / "bundle").exists()
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["KILLED"]


def test_a_rerun_with_other_settings_is_refused_naming_them_before_a_run_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Under torchrun as under `recvae train`: the differences are named, and the output is
    # left as it is (checkpoint, the marker of its MLflow run), with no new (FAILED) run.
    import mlflow

    from pipelines import cli, train_ddp

    csv = _planted_csv(tmp_path)
    out = tmp_path / "run"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [
        "--data", str(csv), "--n-heldout", "30", "--epochs", "2", "--latent-dim", "8",
        "--device", "cpu", "--no-progress", "--output", str(out), "--tracking-uri", store,
    ]  # fmt: skip
    assert cli.main(["train", *argv, "--batch-size", "33"]) == 0
    checkpoint = out / "checkpoints" / "checkpoint.pt"
    marker = out / "mlflow_run.json"
    before = (checkpoint.read_bytes(), marker.read_text())
    capsys.readouterr()
    # A one-process group, as `torchrun --nproc_per_node=1` makes.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert train_ddp.main([*argv, "--batch-size", "40"]) == 2
    err = capsys.readouterr().err
    assert "holds the checkpoint of a run with other settings" in err
    assert "batch_size 33 -> 40" in err and "delete" in err
    assert cli.main(["train", *argv, "--batch-size", "40"]) == 2
    assert "batch_size 33 -> 40" in capsys.readouterr().err
    assert (checkpoint.read_bytes(), marker.read_text()) == before
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_the_distributed_summary_says_when_it_resumed(capsys: pytest.CaptureFixture[str]) -> None:
    # The summary of `recvae train` says a run resumed from its checkpoint; rank 0's summary
    # under torchrun did not. Both print it through one function.
    import inspect
    import types

    from pipelines import train_ddp
    from pipelines.commands.train import print_resumed

    assert "print_resumed(rec)" in inspect.getsource(train_ddp.run_distributed)
    print_resumed(types.SimpleNamespace(meta={"resumed_from_epoch": 7}))
    print_resumed(types.SimpleNamespace(meta={}))
    out = capsys.readouterr().out
    assert out == (
        "resumed      from the checkpoint after epoch 7 (the seconds above are this run's)\n"
    )
