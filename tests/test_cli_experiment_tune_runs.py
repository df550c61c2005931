"""Command-line errors of ``recvae experiment``, ``recvae tune`` and ``recvae runs``: one line on
stderr and exit code 2, found before any data is loaded or model trained where possible, and
never a store created or changed by a listing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import pipelines.experiment as experiment
from pipelines.cli import main
from pipelines.settings import JobSettings
from pipelines.train_job import PreparedData
from recvae.data import planted_interactions
from recvae.split import split_users
from tests.conftest import write_interactions_csv

EASE_TUNE = {
    "tune": {
        "model": "ease",
        "sampler": "random",
        "n_trials": 1,
        "seed": 3,
        "space": {"regularization": {"low": 0.5, "high": 500.0, "log": True}},
    }
}


def _job() -> JobSettings:
    return JobSettings(run={"device": "cpu", "progress": False})


def _prepared(split_seed: int) -> PreparedData:
    data = planted_interactions(n_users=200, n_items=40, n_clusters=4, p_in=0.35, seed=5)
    split = split_users(data, n_heldout=30, seed=split_seed)
    return PreparedData(split=split, name="planted", fingerprint=data.fingerprint())


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("recvae: error: ")
    return err


@pytest.fixture
def no_experiment(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replaces ``run_experiment``: a test fails if the command gets as far as running it."""
    calls: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        raise AssertionError("the experiment ran although its arguments are invalid")

    monkeypatch.setattr(experiment, "run_experiment", refuse)
    return calls


# ------------------------------------------------------------------------------ runs
def test_runs_rejects_a_bare_path_or_unknown_scheme_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("mlflow")
    missing = tmp_path / "mlflow.db"
    assert main(["runs", "--tracking-uri", str(missing)]) == 2
    assert "no MLflow store" in _one_line_error(capsys)
    assert not missing.exists()
    existing = tmp_path / "store.db"
    existing.write_bytes(b"")
    assert main(["runs", "--tracking-uri", str(existing)]) == 2
    assert f"sqlite:///{existing}" in _one_line_error(capsys)
    assert existing.read_bytes() == b""
    assert main(["runs", "--tracking-uri", "foo://bar"]) == 2
    assert "foo://bar" in _one_line_error(capsys)
    assert main(["runs", "--tracking-uri", "sqlite://"]) == 2
    assert "in-memory" in _one_line_error(capsys)


@pytest.mark.parametrize("content", [b"", b"x = 1\n"], ids=["empty", "toml"])
def test_runs_leaves_a_file_that_is_not_an_mlflow_store_untouched(
    content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("mlflow")
    path = tmp_path / "afile"
    path.write_bytes(content)
    assert main(["runs", "--tracking-uri", f"sqlite:///{path}"]) == 2
    assert f"{path} is not an MLflow store" in _one_line_error(capsys)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_runs_limit_is_checked_against_mlflows_maximum(
    mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD

    from pipelines.commands.runs import MAX_LIMIT

    assert MAX_LIMIT == SEARCH_MAX_RESULTS_THRESHOLD
    assert main(["runs", "--tracking-uri", mlflow_uri, "--limit", "100000000"]) == 2
    assert f"between 1 and {MAX_LIMIT}" in _one_line_error(capsys)
    assert main(["runs", "--tracking-uri", mlflow_uri, "--limit", str(MAX_LIMIT)]) == 0
    assert "no runs" in capsys.readouterr().out


# ------------------------------------------------------------------------------ experiment
def test_experiment_output_that_is_a_file_is_refused_up_front(
    tmp_path: Path, no_experiment: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    argv = ["experiment", "--models", "popularity", "--no-track", "-o", str(afile)]
    assert main(argv) == 2
    assert "is an existing file, not a directory" in _one_line_error(capsys)
    assert main([*argv[:-1], str(afile / "sub")]) == 2
    assert f"{afile} is a file" in _one_line_error(capsys)
    assert no_experiment == []


def test_run_experiment_checks_its_output_before_loading_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_prepare(job: JobSettings) -> PreparedData:
        raise AssertionError("data loaded before the output was checked")

    monkeypatch.setattr(experiment, "prepare", no_prepare)
    afile = tmp_path / "afile"
    afile.write_text("")
    settings = experiment.experiment_from_dict({}).with_models(["popularity"])
    with pytest.raises(NotADirectoryError, match="is an existing file"):
        experiment.run_experiment(_job(), settings, output_dir=afile)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--registered-model", "bad/name"], "cannot contain '/' or ':'"),
        (["--registered-model", ".."], "would resolve to"),
        (["--registered-model", "ok", "--alias", "bad alias!"], "invalid alias 'bad alias!'"),
        (["--registered-model", "ok", "--alias", "latest"], "reserved"),
        (["--registered-model", "ok", "--alias", "v2"], "reserved"),
    ],
)
def test_experiment_checks_registry_names_before_training(
    flags: list[str],
    message: str,
    no_experiment: list[Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["experiment", "--models", "multvae", "--no-track", *flags]) == 2
    assert message in _one_line_error(capsys)
    assert no_experiment == []


def test_registry_name_rules_accept_what_mlflow_accepts() -> None:
    from pipelines.experiment import check_alias, check_registered_model_name

    check_registered_model_name("recvae-ml-1m")
    check_registered_model_name("My model v2.1")
    check_alias("staging")
    check_alias("champion_2-b")
    with pytest.raises(ValueError, match="non-empty"):
        check_registered_model_name("  ")
    with pytest.raises(ValueError, match="non-empty"):
        check_alias("")


def test_experiment_registered_model_without_tracking_is_an_error(
    no_experiment: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["experiment", "--models", "multvae", "--no-track", "--registered-model", "X"]
    assert main(argv) == 2
    assert "needs MLflow tracking" in _one_line_error(capsys)
    assert main(["experiment", "--models", "multvae", "--no-track", "--alias", "champ"]) == 2
    assert "needs MLflow tracking" in _one_line_error(capsys)
    assert no_experiment == []


def test_experiment_registered_model_needs_a_model_to_register(
    mlflow_uri: str, no_experiment: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["experiment", "--models", "popularity", "--tracking-uri", mlflow_uri]
    assert main([*argv, "--registered-model", "X"]) == 2
    assert "not among the models run (popularity)" in _one_line_error(capsys)
    # A config whose register model is a baseline: it has no bundle to register.
    raw = {"experiment": {"register": "pop"}, "models": {"pop": {"model": "popularity"}}}
    settings = experiment.experiment_from_dict(raw)
    settings = experiment.dataclasses.replace(settings, registered_model="X")
    problem = experiment.registration_problem(settings)
    assert problem is not None and "no bundle to register" in problem
    assert no_experiment == []


@pytest.mark.parametrize("models", ["", ",", " , "])
def test_experiment_empty_models_list_is_an_error(
    models: str, no_experiment: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["experiment", "--models", models, "--no-track"]) == 2
    assert "--models needs at least one model label" in _one_line_error(capsys)
    assert no_experiment == []


# ------------------------------------------------------------------------------ tune
def test_tune_output_that_is_a_file_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("optuna")
    import pipelines.tune as tune

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the search ran although its output is a file")

    monkeypatch.setattr(tune, "run_tune", refuse)
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["tune", "--model", "ease", "--no-track", "-o", str(afile)]) == 2
    assert "is an existing file, not a directory" in _one_line_error(capsys)


def test_run_tune_refuses_an_output_file(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from pipelines.tune import run_tune, tune_from_dict

    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(NotADirectoryError, match="is an existing file"):
        run_tune(_job(), tune_from_dict(EASE_TUNE), output_dir=afile, prepared=_prepared(2))


def test_tune_unknown_model_lists_every_accepted_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("optuna")
    from pipelines.tune import tune_from_dict

    with pytest.raises(ValueError, match="unknown model 'nope'") as caught:
        tune_from_dict(EASE_TUNE, model="nope")
    for name in ("multvae", "multdae", "recvae", "popularity", "ease", "als", "bpr", "itemknn"):
        assert name in str(caught.value)
    assert main(["tune", "--model", "nope", "--no-track"]) == 2
    err = _one_line_error(capsys)
    assert "ease" in err and "als" in err and "itemknn" in err


def test_tune_refuses_to_resume_a_study_on_another_split(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from pipelines.tune import run_tune, tune_from_dict

    settings = tune_from_dict(EASE_TUNE)
    run_tune(_job(), settings, output_dir=tmp_path, prepared=_prepared(2))
    # The same data split with another seed: other validation users score the trials.
    with pytest.raises(ValueError, match=r"split seed \(--seed\) 2 -> 7") as caught:
        run_tune(_job(), settings, output_dir=tmp_path, prepared=_prepared(7))
    assert "another --output" in str(caught.value)
    # The same split resumes.
    more = tune_from_dict({"tune": {**EASE_TUNE["tune"], "n_trials": 2}})
    result = run_tune(_job(), more, output_dir=tmp_path, prepared=_prepared(2))
    assert result.n_new_trials == 1


def test_tune_corrupt_study_file_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("optuna")
    data = planted_interactions(n_users=120, n_items=30, n_clusters=3, seed=4)
    csv_path = write_interactions_csv(data, tmp_path / "log.csv")
    study = tmp_path / "study"
    study.mkdir()
    (study / "optuna.db").write_text("garbage\n")
    argv = ["tune", "--model", "ease", "--data", str(csv_path), "--n-heldout", "15"]
    argv += ["--n-trials", "1", "--no-track", "-o", str(study)]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert f"{study / 'optuna.db'} is not an optuna study" in err
    assert (study / "optuna.db").read_text() == "garbage\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--registered-model", "a:b"], "cannot contain '/' or ':'"),
        (["--registered-model", "ok", "--alias", "no way"], "invalid alias"),
        (["--registered-model", "ok"], "no bundle to register"),
    ],
)
def test_tune_checks_registration_before_searching(
    flags: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("optuna")
    import pipelines.tune as tune

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the search ran although its arguments are invalid")

    monkeypatch.setattr(tune, "run_tune", refuse)
    assert main(["tune", "--model", "ease", "--no-track", *flags]) == 2
    assert message in _one_line_error(capsys)


def test_experiment_rerun_with_fewer_models_warns_about_the_earlier_results(
    tmp_path: Path,
) -> None:
    prepared = _prepared(split_seed=1)
    said: list[str] = []
    both = experiment.experiment_from_dict({}).with_models(["popularity", "itemknn"])
    experiment.run_experiment(
        _job(), both, output_dir=tmp_path, prepared=prepared, report=said.append
    )
    assert not any(line.startswith("warning:") for line in said)
    said.clear()
    one = experiment.experiment_from_dict({}).with_models(["popularity"])
    result = experiment.run_experiment(
        _job(), one, output_dir=tmp_path, prepared=prepared, report=said.append
    )
    warnings = [line for line in said if line.startswith("warning:")]
    assert len(warnings) == 1 and "itemknn, which this one does not run" in warnings[0]
    assert (tmp_path / "itemknn").is_dir()  # left as it was
    assert [r.label for r in result.results] == ["popularity"]


def test_runs_points_at_the_servers_own_ui_for_a_tracking_server() -> None:
    from pipelines.commands.runs import details_hint

    assert (
        details_hint("http://mlflow.internal:5000")
        == "open http://mlflow.internal:5000 in a browser"
    )
    assert (
        details_hint("sqlite:///mlflow.db") == "mlflow ui --backend-store-uri sqlite:///mlflow.db"
    )


def test_runs_table_names_the_parent_of_a_child_listed_without_it() -> None:
    from pipelines.commands.runs import format_runs
    from recvae.tracking import RunSummary

    def run(run_id: str, name: str, parent: str | None, start: int) -> RunSummary:
        return RunSummary(
            run_id=run_id,
            experiment="e",
            name=name,
            status="FINISHED",
            start_time=start,
            end_time=start + 1000,
            parent_run_id=parent,
            metrics={},
            params={},
            tags={},
        )

    parent = run("p" * 32, "experiment", None, 0)
    first, second = run("a" * 32, "multvae", "p" * 32, 1), run("b" * 32, "ease", "p" * 32, 2)
    table = format_runs([second, first, parent])
    assert "└ multvae" in table and "(child of" not in table
    cut = format_runs([second, first])  # --limit left the parent out
    assert "ease (child of pppppppp)" in cut and "multvae (child of pppppppp)" in cut
