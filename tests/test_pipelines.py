"""The ``recvae`` command line, run in-process and as the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main
from tests.conftest import run_cli as _run
from tests.conftest import write_csv


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--epochs", "3", "--no-progress", "--device", "cpu", "-o", str(out)])
    assert code == 0
    return out


def test_train_writes_bundle_and_metrics(trained: Path) -> None:
    assert (trained / "bundle" / "meta.json").is_file()
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["dataset"] == "ml-latest-small"
    for name in ("recall@20", "recall@50", "ndcg@100"):
        assert 0.0 <= metrics["test"][name] <= 1.0
        assert metrics["test"][f"{name}_se"] > 0
    meta = json.loads((trained / "bundle" / "meta.json").read_text())
    assert meta["split"]["n_test_users"] == 100


def test_train_output_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        [
            "train",
            "--epochs",
            "1",
            "--no-progress",
            "-o",
            str(tmp_path / "r"),
            "--model",
            "multdae",
        ],
        capsys,
    )
    assert code == 0
    assert "recall@20" in out and "ndcg@100" in out and "±" in out
    assert str(tmp_path / "r" / "bundle") in out


def test_rerun_resumes_from_checkpoint(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Same output dir and config: the checkpoint says all 3 epochs are done, nothing retrains.
    code, out, _ = _run(["train", "--epochs", "3", "--no-progress", "-o", str(trained)], capsys)
    assert code == 0 and "of 3" in out


def test_evaluate_and_recommend(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["evaluate", str(trained / "bundle")], capsys)
    assert code == 0 and "ndcg@100" in out and "| recall@20 |" in out
    code, out, _ = _run(
        ["recommend", str(trained / "bundle"), "1", "2", "3", "no-such", "-k", "4", "--json"],
        capsys,
    )
    assert code == 0
    payload = json.loads(out)
    assert len(payload["items"]) == 4 and payload["unknown_items"] == ["no-such"]
    assert not {1, 2, 3} & {item["item_id"] for item in payload["items"]}


def test_datasets_lists_loaders(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["datasets"], capsys)
    assert code == 0
    for name in ("ml-latest-small", "ml-1m", "gowalla", "lastfm", "ml-100k"):
        assert name in out


@pytest.mark.parametrize(
    ("table", "line", "message"),
    [
        ("run", 'num_threads = "2"', "'num_threads': must be an integer"),
        ("run", "item_multiple = 2.5", "'item_multiple': must be an integer"),
        ("run", 'compile = "yes"', "'compile': must be true or false"),
        ("run", 'precision = "fp8"', "'precision': must be fp32 or bf16"),
        ("model", 'learning_rate = "1e-3"', "'learning_rate': must be a number"),
        ("model", 'beta_search = "no"', "'beta_search': must be true or false"),
    ],
)
def test_wrongly_typed_config_values_give_message_and_nonzero_exit(
    table: str, line: str, message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tables = {"model": 'model = "multvae"\nepochs = 1', "run": "progress = false"}
    tables[table] += "\n" + line
    config = tmp_path / "job.toml"
    config.write_text("".join(f"[{name}]\n{body}\n" for name, body in tables.items()))
    out = tmp_path / "run"
    code, _, err = _run(["train", "--config", str(config), "-o", str(out)], capsys)
    assert code == 2
    assert message in err and err.startswith("recvae: error:")
    assert not out.exists()  # rejected before anything is written


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("run = 3", "[run] must be a table, got run = 3"),
        ('data = "ml-1m"', "[data] must be a table"),
        ("[run]\nthreds = 2", "unknown key(s) in [run]: threds"),
        ("[protocol]\nseed = 1.5", "[protocol]: invalid config field 'seed': must be an integer"),
        ("[protocol]\nn_heldout = true", "'n_heldout': must be an integer or unset, got True"),
        ("[protocol]\nmin_user_count = 2.5", "'min_user_count': must be an integer"),
        ('[protocol]\nholdout_fraction = "0.2"', "'holdout_fraction': must be a number"),
        ("[protocol]\nn_heldout = -3", "[protocol] n_heldout (--n-heldout) must be >= 1, got -3"),
        ("[protocol]\nholdout_fraction = 2.0", "(--holdout-fraction) must be in (0, 1), got 2.0"),
        ("[protocol]\nmin_user_count = -1", "(--min-user-count) must be >= 0, got -1"),
        ('[data]\nthreshold = "x"', "[data]: invalid config field 'threshold'"),
        ("[data]\ndataset = 3", "'dataset': must be a string or unset, got 3"),
    ],
)
def test_bad_config_tables_give_message_and_nonzero_exit(
    document: str, message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "job.toml"
    # epochs = 1: a value taken silently would let the run finish quickly (and the test fail).
    config.write_text(f"{document}\n[model]\nepochs = 1\n")
    out = tmp_path / "run"
    code, _, err = _run(["train", "--config", str(config), "--no-progress", "-o", str(out)], capsys)
    assert code == 2
    assert message in err and err.startswith("recvae: error:")
    assert not out.exists()  # rejected before anything is written


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--threshold", "4.9"], "--threshold only applies to an interaction file (--data)"),
        (["--user-col", "u", "--separator", ";"], "--user-col, --separator only apply to"),
        (["--data", "{csv}", "--threshold", "4"], "--threshold needs --rating-col"),
        (["--data", "{csv}", "--dataset", "ml-100k"], "give either --dataset"),
        (["--data-dir", "/no/such/folder"], "--data-dir /no/such/folder: no such folder"),
        (["--data", "{csv}", "--rating-col", "r", "--threshold", "nan"], "must be a finite"),
    ],
)
def test_data_flags_that_would_be_ignored_are_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    csv = tmp_path / "ratings.csv"
    csv.write_text(
        "user_id,item_id,r\n" + "".join(f"{u},{i},5\n" for u in range(9) for i in range(9))
    )
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", "--no-progress", "-o", str(out)]
    code, _, err = _run([*argv, *(f.format(csv=csv) for f in flags)], capsys)
    assert code == 2
    assert message in err and err.startswith("recvae: error:")
    assert not out.exists()


def test_config_files_that_cannot_be_read_name_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    latin = tmp_path / "latin.toml"
    latin.write_bytes("[model]\n# caf\xe9\nepochs = 1\n".encode("latin-1"))
    for config, message in (
        (latin, f"config file {latin} is not UTF-8 text"),
        (tmp_path, f"config file {tmp_path} is a folder"),
    ):
        code, _, err = _run(["train", "--config", str(config), "-o", str(tmp_path / "r")], capsys)
        assert code == 2
        assert message in err and "Traceback" not in err


def test_a_model_too_large_for_memory_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["train", "--epochs", "1", "--latent-dim", "1000000000", "--no-track", "--no-progress"]
    code, _, err = _run([*argv, "-o", str(tmp_path / "run")], capsys)
    assert code == 1
    assert err.startswith("recvae: error: out of memory (") and "--latent-dim" in err


def test_train_output_that_is_a_file_is_refused_before_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    code, _, err = _run(["train", "--epochs", "1", "--no-track", "-o", str(taken)], capsys)
    assert code == 2
    assert f"--output {taken} is an existing file, not a directory" in err
    assert taken.read_text() == "not a folder"


def test_a_diverging_run_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # A learning rate this large makes the weights non-finite in the first epoch: the run stops
    # there with the reason (it used to fail later, in evaluation, with "scores contain NaN").
    argv = ["train", "--epochs", "3", "--learning-rate", "1e30", "--no-progress", "--no-track"]
    code, _, err = _run([*argv, "-o", str(tmp_path / "run")], capsys)
    assert code == 1
    assert err.strip().startswith("recvae: error: training diverged at epoch 1")
    assert "lower learning_rate" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "gpu"], "device 'gpu' is not a device: use auto, cpu, cuda or cuda:N"),
        (["--ks", "x,20"], "--ks must be positive integers, got 'x,20'"),
    ],
)
def test_bad_evaluate_flags_give_message(
    flags: list[str], message: str, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["evaluate", str(trained / "bundle"), *flags], capsys)
    assert code == 2
    assert err.strip() == f"recvae: error: {message}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "/no/such/file.csv"], "/no/such/file.csv"),
        (["train", "--dataset", "nope"], "nope"),
        (["train", "--epochs", "0"], "epochs"),
        (["train", "--device", "cudax"], "device 'cudax' is not a device"),
        (["train", "--n-heldout", "400"], "no training users"),
        (["train", "--config", "/no/such.toml"], "config file not found"),
        (["evaluate", "/no/bundle"], "no model bundle"),
        (["recommend", "/no/bundle", "1"], "no model bundle"),
    ],
)
def test_bad_input_gives_message_and_nonzero_exit(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = _run(
        [*argv, *(["-o", str(tmp_path / "x")] if argv[0] == "train" else [])], capsys
    )
    assert code != 0
    assert message in err and err.startswith("recvae: error:")


def test_train_on_a_csv_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    rows = [
        (f"user{u}", f"item{i}", rng.integers(1, 6))
        for u in range(60)
        for i in rng.choice(30, size=8, replace=False)
    ]
    path = write_csv(tmp_path / "log.csv", "uid,iid,stars", rows)
    code, out, err = _run(
        [
            "train",
            "--data",
            str(path),
            "--user-col",
            "uid",
            "--item-col",
            "iid",
            "--rating-col",
            "stars",
            "--threshold",
            "0",
            "--epochs",
            "2",
            "--no-progress",
            "--n-heldout",
            "5",
            "-o",
            str(tmp_path / "r"),
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = _run(
        [
            "train",
            "--data",
            str(path),
            "--user-col",
            "who",
            "--epochs",
            "1",
            "-o",
            str(tmp_path / "r2"),
        ],
        capsys,
    )
    assert code == 2 and "who" in err


def test_console_script_help_and_config_preset(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "recvae"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "evaluate", "recommend", "datasets"):
        assert command in result.stdout
    bad = subprocess.run(
        [str(exe), "train", "--epochs", "-3", "-o", str(tmp_path)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "epochs" in bad.stderr


def test_sigterm_stops_a_command_like_ctrl_c(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal

    import pipelines.commands.datasets as datasets_command

    closed: list[str] = []

    def terminated_while_running(args: object) -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
            return 0
        finally:
            closed.append("cleanup ran")  # finally blocks (MLflow runs, locks) still run

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(datasets_command, "run_command", terminated_while_running)
    code, _, err = _run(["datasets"], capsys)
    assert code == 143 and err.strip() == "recvae: terminated (SIGTERM)"
    assert closed == ["cleanup ran"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


@pytest.mark.slow
def test_sigterm_during_training_ends_the_mlflow_run_killed(tmp_path: Path) -> None:
    import os
    import signal
    import time

    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    argv = [sys.executable, "-c", "from pipelines.cli import main; raise SystemExit(main())"]
    store = f"sqlite:///{tmp_path / 'm.db'}"
    process = subprocess.Popen(
        [*argv, "train", "--epochs", "300", "--tracking-uri", store, "-o", str(tmp_path / "r")],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = tmp_path / "r" / "checkpoints"
    deadline = time.monotonic() + 120
    while not any(checkpoints.glob("*.pt")) and time.monotonic() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-2000:]
    assert "recvae: terminated (SIGTERM)" in err
    import mlflow

    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["KILLED"]


def test_train_logs_and_registers_where_the_config_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    store = f"sqlite:///{tmp_path / 'custom.db'}"
    artifacts = (tmp_path / "custom-artifacts").as_uri()
    config = tmp_path / "c.toml"
    config.write_text(
        "[model]\nepochs = 1\nlatent_dim = 8\nhidden_dims = [16]\n"
        f'[mlflow]\ntracking_uri = "{store}"\nexperiment = "custom-exp"\n'
        f'artifact_location = "{artifacts}"\nregistered_model = "custom-model"\n'
    )
    argv = ["train", "--config", str(config), "--no-progress", "-o", str(tmp_path / "run")]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert f"mlflow       {store}, experiment 'custom-exp'" in out
    assert "registered   models:/custom-model@staging (version 1)" in out
    mlflow.set_tracking_uri(store)
    experiment = mlflow.get_experiment_by_name("custom-exp")
    assert experiment.artifact_location == artifacts
    version = mlflow.MlflowClient().get_model_version_by_alias("custom-model", "staging")
    assert version.version in (1, "1")
    # Flags win over the config; registering asked for with tracking off is refused up front.
    code, out, err = _run([*argv, "--alias", "candidate"], capsys)
    assert code == 0, err
    assert "registered   models:/custom-model@candidate (version 2)" in out
    code, _, err = _run(["train", "--alias", "prod", "--no-track"], capsys)
    assert code == 2 and "--alias needs a registered model" in err
    code, _, err = _run(["train", "--registered-model", "m", "--no-track"], capsys)
    assert code == 2 and "registering needs MLflow tracking, which is off" in err


def test_a_file_without_a_header_is_read_by_column_position(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import random

    rng = random.Random(1)
    lines = [
        f"{u}::{i}::{rng.choice([2, 4, 5])}::{978300000 + u}"
        for u in range(1, 121)
        for i in rng.sample(range(1, 60), 10)
    ]
    data = tmp_path / "ratings.dat"
    data.write_text("\n".join(lines) + "\n")
    positives = {(u, i) for u, i, r, _ in (line.split("::") for line in lines) if int(r) > 3.5}
    argv = ["train", "--data", str(data), "--separator", "::", "--no-header", "--epochs", "1"]
    argv += ["--no-track", "--no-progress", "--n-heldout", "10", "--min-user-count", "1"]
    run = tmp_path / "run"
    code, out, err = _run(
        [*argv, "--user-col", "0", "--item-col", "1", "--rating-col", "2", "-o", str(run)], capsys
    )
    assert code == 0, err
    meta = json.loads((run / "bundle" / "meta.json").read_text())
    assert meta["job"]["data"]["has_header"] is False
    # Every line is data: the first one is not taken as a header.
    n_users = len({u for u, _ in positives})
    assert f"{n_users - 20} train users" in out
    code, _, err = _run([*argv, "-o", str(tmp_path / "named")], capsys)
    assert code == 2 and "name its columns by 0-based position, e.g. --user-col 0" in err
    code, _, err = _run(["train", "--dataset", "ml-latest-small", "--no-header"], capsys)
    assert code == 2 and "--no-header only applies to an interaction file" in err
