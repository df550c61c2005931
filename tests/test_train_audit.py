"""Regression tests from an audit of ``recvae train`` and its TOML configs: settings that would
be ignored are errors, typos get a suggestion, a run checks what it can before loading data, and
an output folder holding another run is never silently replaced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import pipelines.train_job as train_job
from pipelines.cli import build_parser, parse_args
from pipelines.commands.train import train_job_from_args
from pipelines.settings import JobSettings, job_from_dict, read_toml
from recvae.config import config_from_dict
from recvae.data import planted_interactions
from tests.conftest import run_cli, write_interactions_csv


def _one_line_error(err: str) -> str:
    text = err.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert text.startswith("recvae: error: "), text
    return text


def _train_job(*argv: str) -> JobSettings:
    return train_job_from_args(parse_args(build_parser(), ["train", *argv]))


@pytest.fixture
def no_data_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading the data fail loudly: what is checked before it must not get there."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the data was loaded before the bad setting was refused")

    monkeypatch.setattr(train_job, "load_data", refuse)


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small planted interaction file (120 users, 30 items): a training epoch takes no time."""
    data = planted_interactions(n_users=120, n_items=30, n_clusters=3, p_in=0.4, seed=3)
    return write_interactions_csv(data, tmp_path_factory.mktemp("log") / "log.csv")


def _train_argv(log_csv: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(log_csv),
        "--n-heldout",
        "10",
        "--epochs",
        "1",
        "--latent-dim",
        "8",
        "--no-progress",
        "--device",
        "cpu",
        "--no-track",
        "-o",
        str(out),
        *extra,
    ]


# ------------------------------------------------------------------------------ config files
def test_model_flag_for_another_model_replaces_the_configs_model_table() -> None:
    # `--config ml-latest-small --model multdae` failed: the preset's Mult-VAE fields
    # (beta_max, anneal_cap_fraction) were kept and rejected by the Mult-DAE config.
    job = _train_job("--config", "ml-latest-small", "--model", "multdae", "--epochs", "3")
    assert job.model == {"model": "multdae", "epochs": 3}
    assert job.model_config().to_dict()["model"] == "multdae"
    job = _train_job("--config", "recvae-ml-1m", "--model", "multvae")
    assert job.model_config().to_dict()["model"] == "multvae"


def test_model_flag_naming_the_configs_own_model_keeps_its_settings(tmp_path: Path) -> None:
    # A [model] table without a `model` key is Mult-VAE's: --model multvae keeps it.
    config = tmp_path / "c.toml"
    config.write_text("[model]\nepochs = 3\nlatent_dim = 8\n")
    model = _train_job("--config", str(config), "--model", "multvae").model_config().to_dict()
    assert (model["model"], model["epochs"], model["latent_dim"]) == ("multvae", 3, 8)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"model": "multvae", "epoch": 2}}, "epoch; did you mean 'epochs'?"),
        ({"run": {"threads": 2}}, "[run]: threads; did you mean 'num_threads'?"),
        ({"data": {"datset": "ml-1m"}}, "[data]: datset; did you mean 'dataset'?"),
        ({"protocol": {"n_held_out": 3}}, "n_held_out; did you mean 'n_heldout'?"),
        ({"modle": {"epochs": 2}}, "in config: modle; did you mean 'model'?"),
    ],
)
def test_a_mistyped_config_key_is_named_with_the_nearest_valid_one(
    raw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        job_from_dict(raw).model_config()
    assert message in str(info.value)


def test_an_unknown_key_close_to_nothing_gets_no_suggestion() -> None:
    with pytest.raises(ValueError, match=r"unknown config field\(s\) for multvae: zzz \(valid:"):
        config_from_dict({"model": "multvae", "zzz": 1})


def test_a_preset_name_is_found_beside_a_folder_of_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run from a data folder holding ml-1m/, `--config ml-1m` said "is a folder".
    (tmp_path / "ml-1m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert read_toml("ml-1m")["data"]["dataset"] == "ml-1m"


def test_a_config_that_cannot_be_read_is_a_value_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "locked.toml"
    config.write_text("[model]\nepochs = 1\n")

    def denied(self: Path, *args: Any, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ValueError, match=f"config file {config} cannot be read: Permission denied"):
        read_toml(config)


# ------------------------------------------------------------------ settings that do nothing
@pytest.mark.parametrize(
    ("config", "flags", "message"),
    [
        ("", ["--beta-search", "--beta-max", "0.3"], "--beta-max has no effect with a beta search"),
        ("beta_search = true\n", ["--beta-max", "0.3"], "--beta-max has no effect"),
        ("", ["--beta-search", "--anneal-steps", "100"], "anneal_steps (--anneal-steps) has no"),
        ("beta_search = true\nanneal_steps = 100\n", [], "anneal_steps (--anneal-steps) has no"),
    ],
)
def test_beta_settings_that_a_beta_search_ignores_are_refused(
    config: str,
    flags: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_data_loading: None,
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[model]\nepochs = 1\n" + config)
    code, _, err = run_cli(["train", "--config", str(path), *flags, "-o", str(tmp_path)], capsys)
    assert code == 2
    assert message in _one_line_error(err)


def test_a_checkpoint_dir_in_the_run_table_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_data_loading: None
) -> None:
    # It was silently replaced by <--output>/checkpoints.
    path = tmp_path / "c.toml"
    path.write_text('[run]\ncheckpoint_dir = "elsewhere"\n')
    code, _, err = run_cli(["train", "--config", str(path), "-o", str(tmp_path / "r")], capsys)
    assert code == 2
    assert "[run] checkpoint_dir is not used by `recvae train`" in _one_line_error(err)


# ----------------------------------------------------------------- checked before the data
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--threads", "0"], "invalid config field 'num_threads'"),
        (["--model", "multdae", "--beta-max", "0.3"], "unknown config field(s) for multdae"),
        (["--device", "cuda:7"], "'cuda:7' was requested but this machine has 1 CUDA device"),
    ],
)
def test_bad_run_settings_are_refused_before_the_data_is_loaded(
    flags: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_data_loading: None,
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, cuda:0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = run_cli(["train", *flags, "--no-track", "-o", str(tmp_path / "r")], capsys)
    assert code == 2
    assert message in _one_line_error(err)


def test_an_unwritable_default_run_folder_is_refused_before_the_data_is_loaded(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_data_loading: None,
) -> None:
    # Without --output the run folder (runs/...) was not checked: the run failed when it wrote
    # its first checkpoint, after an epoch.
    import errno
    import os

    monkeypatch.chdir(tmp_path)
    real_mkdir = os.mkdir

    def read_only_cwd(path: Any, *args: Any, **kwargs: Any) -> None:
        # As a read-only folder or mount: root passes permission bits, so refuse the entry.
        if Path(os.fsdecode(path)).parent in (Path("."), tmp_path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_cwd)
    code, _, err = run_cli(["train", "--epochs", "1", "--no-track"], capsys)
    assert code == 2
    assert "is not writable" in _one_line_error(err)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize(
    "command", [["train", "--epochs", "1"], ["experiment", "--models", "popularity"]]
)
def test_an_output_in_a_folder_that_cannot_be_created_is_refused_before_the_data_is_loaded(
    command: list[str],
    capsys: pytest.CaptureFixture[str],
    no_data_loading: None,
) -> None:
    # /proc passes os.access for root but takes no new folder: the run failed only when it
    # created its output, after the data was loaded.
    code, _, err = run_cli([*command, "--no-track", "-o", "/proc/nope/run"], capsys)
    assert code == 2
    message = _one_line_error(err)
    assert "/proc/nope/run: the folder /proc/nope does not exist" in message, message


# ------------------------------------------------------------- an output holding another run
def test_an_output_holding_another_runs_bundle_is_refused_unless_overwrite(
    log_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_bundle: Path
) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_bundle, out / "bundle")
    before = (out / "bundle" / "meta.json").read_text()
    code, _, err = run_cli(_train_argv(log_csv, out), capsys)
    assert code == 2
    assert f"--output {out} already holds a bundle" in _one_line_error(err)
    assert "--overwrite" in err
    assert (out / "bundle" / "meta.json").read_text() == before  # untouched
    code, _, _ = run_cli(_train_argv(log_csv, out, "--overwrite"), capsys)
    assert code == 0
    assert json.loads((out / "bundle" / "meta.json").read_text())["dataset"] == "log"


def test_an_output_bundle_slot_that_is_no_bundle_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_data_loading: None
) -> None:
    # The bundle could never be written there: the run failed at its very end.
    out = tmp_path / "run"
    out.mkdir()
    (out / "bundle").write_text("notes")
    code, _, err = run_cli(["train", "--no-track", "-o", str(out)], capsys)
    assert code == 2
    assert "exists and is not a recvae bundle" in _one_line_error(err)


def test_a_rerun_with_other_settings_names_them_and_overwrite_starts_over(
    log_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert run_cli(_train_argv(log_csv, out), capsys)[0] == 0
    code, _, err = run_cli(_train_argv(log_csv, out, "--epochs", "2"), capsys)
    assert code == 2
    line = _one_line_error(err)
    assert f"--output {out} holds the checkpoint of a run with other settings" in line
    assert "epochs 1 -> 2" in line and "--overwrite" in line
    assert "the training data" not in line  # the same file and split
    code, out_text, _ = run_cli(_train_argv(log_csv, out, "--epochs", "2", "--overwrite"), capsys)
    assert code == 0 and "best epoch" in out_text and "of 2" in out_text
    assert "resumed" not in out_text  # started over
    # The same command again resumes its own (finished) checkpoint: no refusal, and it says so.
    code, out_text, _ = run_cli(_train_argv(log_csv, out, "--epochs", "2"), capsys)
    assert code == 0 and "resumed      from the checkpoint after epoch 2" in out_text


def test_an_io_error_during_the_run_is_one_line_that_says_a_rerun_resumes(
    log_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from recvae.recommender import Recommender

    def disk_full(self: Recommender, path: Any, **kwargs: Any) -> Path:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(Recommender, "save", disk_full)
    out = tmp_path / "run"
    code, _, err = run_cli(_train_argv(log_csv, out), capsys)
    assert code == 1
    line = _one_line_error(err)
    assert "No space left on device" in line and str(out / "bundle") in line
    assert "rerun the same command to resume" in line
    assert (out / "checkpoints" / "checkpoint.pt").is_file()


def test_overwrite_is_refused_in_distributed_training() -> None:
    # The torchrun path does not clear the run folder: the flag would be ignored.
    args = parse_args(build_parser(), ["train", "--overwrite", "-o", "x"])
    with pytest.raises(ValueError, match="--overwrite is not supported in distributed"):
        train_job_from_args(args, distributed=True)


def test_train_on_other_data_does_not_use_the_configs_mlflow_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `recvae train --config ml-latest-small --data log.csv` logged to recvae-ml-latest-small
    # and moved models:/recvae-ml-latest-small@staging to a bundle of log.csv's items.
    import types

    import pipelines.tracking_hooks as tracking_hooks
    from pipelines.commands.train import train_tracking

    seen: dict[str, Any] = {}

    def tracker(**kwargs: Any) -> Any:
        seen["experiment"] = kwargs["experiment"]
        return types.SimpleNamespace(enabled=True)

    monkeypatch.setattr(tracking_hooks, "make_tracker", tracker)
    data = planted_interactions(n_users=60, n_items=20, n_clusters=2, seed=4)
    path = write_interactions_csv(data, tmp_path / "log.csv")
    parser = build_parser()
    for argv, experiment, registered in (
        (["--data", str(path)], "recvae-log", None),
        ([], "recvae-ml-latest-small", "recvae-ml-latest-small"),
        (["--data", str(path), "--registered-model", "mine"], "recvae-log", "mine"),
    ):
        args = parse_args(parser, ["train", "--config", "ml-latest-small", *argv])
        tracking = train_tracking(args, train_job_from_args(args))
        assert (seen["experiment"], tracking.registered_model) == (experiment, registered)
        note = capsys.readouterr().err
        assert ("not used" in note) == (argv[:2] == ["--data", str(path)])


def test_a_killed_trains_mlflow_run_is_ended_killed_by_the_rerun(
    tmp_path: Path, mlflow_uri: str
) -> None:
    # `kill -9` left the run RUNNING forever beside the rerun's new run.
    from mlflow.tracking import MlflowClient

    from pipelines.experiment import tracked_train
    from pipelines.tracking_hooks import Tracker

    data = planted_interactions(n_users=80, n_items=20, n_clusters=2, seed=6)
    path = write_interactions_csv(data, tmp_path / "log.csv")
    job = job_from_dict(
        {
            "data": {"path": str(path)},
            "protocol": {"n_heldout": 8},
            "model": {"model": "multvae", "hidden_dims": [8], "latent_dim": 4, "epochs": 1},
            "run": {"device": "cpu", "progress": False},
        }
    )
    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="train-killed")
    out = tmp_path / "run"
    tracked_train(job, tracker=tracker, output_dir=out)
    first = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient()
    assert client.get_run(first).info.status == "FINISHED"
    # What kill -9 leaves: the run that wrote into `out` still RUNNING.
    killed = client.create_run(tracker.experiment_id).info.run_id
    (out / "mlflow_run.json").write_text(json.dumps({"run_id": killed}))
    tracked_train(job, tracker=tracker, output_dir=out)
    assert client.get_run(killed).info.status == "KILLED"
    second = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert second not in (first, killed)
    assert client.get_run(second).info.status == "FINISHED"
    assert client.get_run(first).info.status == "FINISHED"  # an ended run is left alone
