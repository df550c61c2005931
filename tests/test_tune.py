"""``recvae tune``: the search space, selection on validation only, one test scoring, resuming."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

optuna = pytest.importorskip("optuna")

import pipelines.tune as tune  # noqa: E402
from pipelines.cli import main  # noqa: E402
from pipelines.settings import CONFIG_DIR, JobSettings, read_toml  # noqa: E402
from pipelines.train_job import PreparedData  # noqa: E402
from pipelines.tune import ParamSpace, TuneSettings, run_tune, tune_from_dict  # noqa: E402
from recvae.baselines import EASE, EASEConfig  # noqa: E402
from recvae.data import planted_interactions  # noqa: E402
from recvae.evaluation import evaluate  # noqa: E402
from recvae.split import split_users  # noqa: E402
from tests.conftest import write_interactions_csv  # noqa: E402

EASE_TUNE = {
    "tune": {
        "model": "ease",
        "sampler": "random",
        "n_trials": 3,
        "seed": 3,
        "space": {"regularization": {"low": 0.5, "high": 500.0, "log": True}},
    }
}


@pytest.fixture(scope="module")
def prepared() -> PreparedData:
    data = planted_interactions(n_users=200, n_items=40, n_clusters=4, p_in=0.35, seed=5)
    split = split_users(data, n_heldout=30, seed=2)
    return PreparedData(split=split, name="planted", fingerprint=data.fingerprint())


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch, prepared: PreparedData) -> list[str]:
    """Records which held-out part every evaluation of the tuner scores."""
    calls: list[str] = []
    real = tune._evaluate
    split = prepared.split

    def recording(ranker, part, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("test" if part is split.test else "validation")
        assert part is split.test or part is split.validation
        return real(ranker, part, **kwargs)

    monkeypatch.setattr(tune, "_evaluate", recording)
    return calls


def _job() -> JobSettings:
    return JobSettings(run={"device": "cpu", "progress": False})


# ------------------------------------------------------------------------------ settings
def test_presets_have_valid_spaces() -> None:
    for path in sorted(CONFIG_DIR.glob("*.toml")):
        raw = read_toml(path)
        if "tune" not in raw:
            continue
        settings = tune_from_dict(raw)
        assert settings.spec.model == raw["tune"]["model"] and settings.space
        for label in raw["tune"].get("spaces", {}):
            assert tune_from_dict(raw, model=label).spec.model == label


def test_recvae_lastfm_preset_tunes_recvae_with_its_fixed_settings() -> None:
    settings = tune_from_dict(read_toml(CONFIG_DIR / "recvae-lastfm.toml"))
    assert settings.spec.model == "recvae"
    assert settings.spec.config.epochs == 150 and settings.spec.config.patience == 15
    assert {"gamma", "dropout", "hidden_dim", "n_layers"} <= {p.name for p in settings.space}


def test_tuning_recvae_in_bf16_fails_before_any_trial(
    prepared: PreparedData, tmp_path: Path
) -> None:
    settings = tune_from_dict(read_toml(CONFIG_DIR / "recvae-lastfm.toml"))
    job = JobSettings(run={"device": "cpu", "progress": False, "precision": "bf16"})
    with pytest.raises(ValueError, match=r"precision 'bf16' is not supported \(use fp32\)"):
        run_tune(job, settings, output_dir=tmp_path / "study", prepared=prepared)
    assert not (tmp_path / "study").exists()


def test_space_and_settings_errors() -> None:
    with pytest.raises(ValueError, match="low must be <= high"):
        ParamSpace.from_dict("dropout", {"low": 0.7, "high": 0.2})
    with pytest.raises(ValueError, match="log range needs low > 0"):
        ParamSpace.from_dict("beta_max", {"low": 0.0, "high": 1.0, "log": True})
    with pytest.raises(ValueError, match="unknown key"):
        ParamSpace.from_dict("dropout", {"min": 0.1})
    with pytest.raises(ValueError, match="either choices or low/high"):
        ParamSpace.from_dict("latent_dim", {"choices": [1], "low": 1})
    with pytest.raises(ValueError, match="not a field of ease"):
        tune_from_dict({"tune": {"model": "ease", "space": {"dropout": {"low": 0, "high": 1}}}})
    with pytest.raises(ValueError, match="no search space for 'als'"):
        tune_from_dict(EASE_TUNE, model="als")
    with pytest.raises(ValueError, match="sampler"):
        tune_from_dict({"tune": {**EASE_TUNE["tune"], "sampler": "grid"}})
    with pytest.raises(ValueError, match=r"\[tune\] model is missing"):
        tune_from_dict({"tune": {}})
    space = ParamSpace.from_dict("hidden_dims", {"choices": [[8], [16, 8]]})
    assert space.choices == ((8,), (16, 8)) and space.to_dict() == {"choices": [[8], [16, 8]]}
    assert ParamSpace.from_dict("epochs", {"low": 2, "high": 6, "step": 2}).is_int


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"choices": "abc"}, "latent_dim: choices must be a list, got 'abc'"),
        ({"choices": 5}, "latent_dim: choices must be a list, got 5"),
        ({"low": 1, "high": 5, "step": "x"}, "latent_dim: step must be a number > 0, got 'x'"),
        ({"low": 1, "high": 5, "step": True}, "latent_dim: step must be a number > 0, got True"),
        ({"low": 1, "high": float("inf")}, "latent_dim: low and high must be finite numbers"),
        ({"low": -1, "high": 5, "log": "no"}, "latent_dim: log must be true or false"),
    ],
)
def test_wrongly_typed_space_names_the_parameter(space: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        ParamSpace.from_dict("latent_dim", space)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tune": 3}, "[tune] must be a table, got tune = 3"),
        ({"tune": {**EASE_TUNE["tune"], "timeout_minutes": True}}, "timeout_minutes must be > 0"),
        ({"tune": {**EASE_TUNE["tune"], "output_dir": 3}}, "[tune] output_dir must be a path"),
        ({**EASE_TUNE, "models": {"ease": 3}}, "[models.ease] must be a table"),
        ({"tune": {**EASE_TUNE["tune"], "model": 3}}, "[tune] model must be a model label"),
        (
            {"tune": {"model": "ease", "n_trials": 2, "spaces": {"ease": {"x": 3}}}},
            "[tune.spaces.ease] x must be a table",
        ),
        (
            {"tune": {"model": "ease", "n_trials": 2, "spaces": {"ease": {"x": {"low": 2}}}}},
            "[tune.spaces.ease] x: give low and high",
        ),
    ],
)
def test_wrongly_typed_tune_values_name_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        tune_from_dict(raw)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("mlflow", "message"),
    [("mlflow = 3", "[mlflow] must be a table"), ("[mlflow]\nexperiment = 3", "must be a string")],
)
def test_tune_rejects_a_bad_mlflow_table(
    mlflow: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tune.toml"
    config.write_text(
        f'{mlflow}\n[tune]\nmodel = "ease"\nn_trials = 1\n'
        "[tune.space]\nregularization = { low = 1.0, high = 10.0 }\n"
    )
    out = tmp_path / "study"
    code = main(["tune", "--config", str(config), "--no-track", "-o", str(out)])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------ search


def test_selection_uses_validation_only_and_scores_test_once(
    prepared: PreparedData, spy: list[str], tmp_path: Path, mlflow_uri: str
) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking_hooks import Tracker

    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="tune")
    settings = tune_from_dict(EASE_TUNE)
    result = run_tune(_job(), settings, tracker=tracker, output_dir=tmp_path, prepared=prepared)
    # Three trials, each scored on validation; then the test users exactly once.
    assert spy == ["validation"] * 3 + ["test"]
    assert result.n_new_trials == 3 and not result.test_reused
    values = {t["number"]: t["value"] for t in result.trials}
    assert result.best_trial == max(values, key=lambda n: values[n])
    split = prepared.split
    for trial in result.trials:  # a trial's value is its validation NDCG@100
        model = EASE(EASEConfig(regularization=trial["params"]["regularization"]))
        model.fit(split.train)
        validation = evaluate(
            model, split.validation.fold_in.matrix, split.validation.targets.matrix
        )
        assert trial["value"] == pytest.approx(validation.mean("ndcg@100"))
    best = EASE(EASEConfig(**result.best_params)).fit(split.train)
    test = evaluate(best, split.test.fold_in.matrix, split.test.targets.matrix)
    assert result.test["test_ndcg@100"] == pytest.approx(test.mean("ndcg@100"))
    record = json.loads((tmp_path / "best.json").read_text())
    assert record["trial"] == result.best_trial and record["test"] == result.test
    # MLflow: the tuning run with one child per trial and the chosen config's test metrics.
    client = MlflowClient()
    parent = client.get_run(result.run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == [f"trial-{i}" for i in range(3)]
    assert all("validation_ndcg_at_100" in r.data.metrics for r in children)
    assert not any("test_ndcg_at_100" in r.data.metrics for r in children)
    assert parent.data.metrics["test_ndcg_at_100"] == pytest.approx(test.mean("ndcg@100"))
    assert parent.data.metrics["best_trial"] == result.best_trial

    # Resuming with a larger budget runs only the missing trials, in the same parent run; the
    # test users are scored again only if the choice changed.
    spy.clear()
    more = run_tune(
        _job(),
        tune_from_dict({"tune": {**EASE_TUNE["tune"], "n_trials": 5}}),
        tracker=tracker,
        output_dir=tmp_path,
        prepared=prepared,
    )
    assert more.n_new_trials == 2 and len(more.trials) == 5 and more.run_id == result.run_id
    changed = more.best_trial != result.best_trial
    assert spy == ["validation"] * 2 + (["test"] if changed else [])
    assert more.test_reused is not changed
    # The budget is spent: nothing runs and nothing is scored.
    spy.clear()
    again = run_tune(
        _job(),
        tune_from_dict({"tune": {**EASE_TUNE["tune"], "n_trials": 5}}),
        output_dir=tmp_path,
        prepared=prepared,
    )
    assert spy == [] and again.n_new_trials == 0 and again.test_reused
    assert again.test == more.test


def test_an_interrupted_trial_runs_again_on_resume(
    prepared: PreparedData, spy: list[str], tmp_path: Path
) -> None:
    settings = tune_from_dict({"tune": {**EASE_TUNE["tune"], "n_trials": 1}})
    run_tune(_job(), settings, output_dir=tmp_path, prepared=prepared)
    # A process killed mid-trial leaves the trial RUNNING in the storage.
    study = optuna.load_study(study_name=tune.STUDY_NAME, storage=f"sqlite:///{tmp_path}/optuna.db")
    study.enqueue_trial({"regularization": 7.0})
    stale = study.ask()  # the objective draws its params first, then trains
    assert stale.suggest_float("regularization", 0.5, 500.0, log=True) == 7.0
    spy.clear()
    lines: list[str] = []
    result = run_tune(
        _job(),
        tune_from_dict({"tune": {**EASE_TUNE["tune"], "n_trials": 2}}),
        output_dir=tmp_path,
        prepared=prepared,
        report=lines.append,
    )
    assert "1 interrupted one(s) queued again" in lines[0]
    states = {t["number"]: t["state"] for t in result.trials}
    assert states[stale.number] == "FAIL"
    rerun = [t for t in result.trials if t["number"] > stale.number]
    assert len(rerun) == 1 and rerun[0]["params"] == {"regularization": 7.0}
    assert rerun[0]["state"] == "COMPLETE" and result.n_new_trials == 1


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_study_draws_new_params_and_stays_reproducible(
    sampler: str, prepared: PreparedData, tmp_path: Path
) -> None:
    def search(out: Path) -> list[dict[str, Any]]:
        for n_trials in (2, 4):  # a study, then resumed with a larger budget
            raw = {"tune": {**EASE_TUNE["tune"], "sampler": sampler, "n_trials": n_trials}}
            result = run_tune(_job(), tune_from_dict(raw), output_dir=out, prepared=prepared)
        return [t["params"] for t in sorted(result.trials, key=lambda t: t["number"])]

    params = search(tmp_path / "a")
    # A continuous log range: only a restarted random stream draws the same value twice.
    values = [p["regularization"] for p in params]
    assert len(values) == 4 and len(set(values)) == 4, values
    assert search(tmp_path / "b") == params  # the same seed and runs draw the same params


def _interrupt_fit(monkeypatch: pytest.MonkeyPatch, *, on_call: int) -> list[int]:
    """Make the tuner's ``on_call``-th training (1-based) raise KeyboardInterrupt (Ctrl-C)."""
    real = tune._fit
    calls: list[int] = []

    def fit(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == on_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tune, "_fit", fit)
    return calls


def test_ctrl_c_in_a_trial_stops_cleanly_and_the_resume_retries_it_once(
    prepared: PreparedData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = tune_from_dict({"tune": {**EASE_TUNE["tune"], "n_trials": 3}})
    with monkeypatch.context() as patch:
        _interrupt_fit(patch, on_call=2)
        patch.setattr(logging.getLogger("optuna"), "propagate", True)  # optuna's log to caplog
        with pytest.raises(KeyboardInterrupt):
            run_tune(_job(), settings, output_dir=tmp_path, prepared=prepared)
    # optuna's "Trial 1 failed" warning and its traceback are not shown.
    assert not [r for r in caplog.records if r.exc_info or "Trial 1 failed" in r.getMessage()]
    storage = f"sqlite:///{tmp_path}/optuna.db"
    cut = optuna.load_study(study_name=tune.STUDY_NAME, storage=storage).trials[1]
    assert cut.state.name == "FAIL" and cut.user_attrs["interrupted"]

    lines: list[str] = []
    result = run_tune(_job(), settings, output_dir=tmp_path, prepared=prepared, report=lines.append)
    assert "1 trial(s) complete, 1 interrupted one(s) queued again; 2 to run" in lines[0]
    complete = [t for t in result.trials if t["state"] == "COMPLETE"]
    assert len(complete) == 3 and result.n_new_trials == 2  # the budget counts completed trials
    assert [t["params"] for t in complete if t["number"] > 1][0] == cut.params  # retried first
    # Retried once: a further resumption queues nothing and runs nothing.
    lines.clear()
    again = run_tune(_job(), settings, output_dir=tmp_path, prepared=prepared, report=lines.append)
    assert "queued again" not in lines[0] and again.n_new_trials == 0
    assert len(again.trials) == 4


def test_a_kill_retried_by_an_earlier_version_is_not_queued_again(
    prepared: PreparedData, tmp_path: Path
) -> None:
    settings = tune_from_dict({"tune": {**EASE_TUNE["tune"], "n_trials": 1}})
    run_tune(_job(), settings, output_dir=tmp_path, prepared=prepared)
    # What earlier versions left after a kill: the trial failed and marked, its params queued
    # again without a retry_of mark.
    study = optuna.load_study(study_name=tune.STUDY_NAME, storage=f"sqlite:///{tmp_path}/optuna.db")
    study.enqueue_trial({"regularization": 7.0})
    killed = study.ask()
    killed.suggest_float("regularization", 0.5, 500.0, log=True)
    study._storage.set_trial_user_attr(killed._trial_id, "interrupted", True)
    study._storage.set_trial_state_values(killed._trial_id, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial({"regularization": 7.0})
    lines: list[str] = []
    two = tune_from_dict({"tune": {**EASE_TUNE["tune"], "n_trials": 2}})
    result = run_tune(_job(), two, output_dir=tmp_path, prepared=prepared, report=lines.append)
    assert "queued again" not in lines[0]
    retries = [t for t in result.trials if t["params"] == {"regularization": 7.0}]
    assert [t["state"] for t in retries] == ["FAIL", "COMPLETE"] and len(result.trials) == 3


def test_ctrl_c_ends_the_tune_command_with_exit_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = planted_interactions(n_users=120, n_items=30, n_clusters=3, seed=4)
    csv_path = write_interactions_csv(data, tmp_path / "log.csv")
    config = tmp_path / "tune.toml"
    config.write_text(
        '[tune]\nmodel = "ease"\nsampler = "random"\n[tune.space]\n'
        "regularization = { low = 1.0, high = 100.0, log = true }\n"
    )
    argv = ["tune", "--config", str(config), "--data", str(csv_path), "--n-heldout", "15"]
    argv += ["--n-trials", "2", "--no-track", "-o", str(tmp_path / "study")]
    with monkeypatch.context() as patch:
        _interrupt_fit(patch, on_call=1)  # Ctrl-C during the first trial
        assert main(argv) == 130
    captured = capsys.readouterr()
    assert "recvae: interrupted" in captured.err and "Traceback" not in captured.err
    assert "trial 0: interrupted" in captured.out
    assert main(argv) == 0  # the resume retries trial 0's params and completes the budget
    assert "2 new trial(s)" in capsys.readouterr().out


def test_a_resumed_study_that_finds_a_new_best_updates_the_tuning_runs_best(
    prepared: PreparedData, tmp_path: Path, mlflow_uri: str
) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking_hooks import Tracker

    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="tune")
    study = optuna.create_study(
        study_name=tune.STUDY_NAME, storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize"
    )
    # Validation NDCG@100 on this split: 0.504 with regularization 0.5, 0.551 with 20.
    study.enqueue_trial({"regularization": 0.5})
    one = {"tune": {**EASE_TUNE["tune"], "n_trials": 1}}
    first = run_tune(
        _job(), tune_from_dict(one), tracker=tracker, output_dir=tmp_path, prepared=prepared
    )
    study.enqueue_trial({"regularization": 20.0})
    two = {"tune": {**EASE_TUNE["tune"], "n_trials": 2}}
    more = run_tune(
        _job(), tune_from_dict(two), tracker=tracker, output_dir=tmp_path, prepared=prepared
    )
    assert (first.best_trial, more.best_trial) == (0, 1) and more.run_id == first.run_id
    assert more.tracking_errors == []
    record = json.loads((tmp_path / "best.json").read_text())
    parent = MlflowClient().get_run(more.run_id).data
    best = {k: v for k, v in parent.tags.items() if k.startswith("best.")}
    assert best == {f"best.{k}": str(v) for k, v in record["params"].items()}
    assert best == {"best.regularization": "20.0"}
    assert parent.metrics["best_trial"] == record["trial"] == 1


def test_a_resumed_tuning_run_records_the_current_best_over_an_older_runs_best_params(
    prepared: PreparedData, tmp_path: Path, mlflow_uri: str
) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking_hooks import Tracker

    other = tmp_path / "other"  # an empty store for the end of the test
    other.mkdir()
    shutil.copyfile(mlflow_uri[len("sqlite:///") :], other / "mlflow.db")
    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="tune")
    study = optuna.create_study(
        study_name=tune.STUDY_NAME, storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize"
    )
    # Validation NDCG@100 on this split: 0.504 with regularization 0.5, 0.551 with 20.
    study.enqueue_trial({"regularization": 0.5})
    one = {"tune": {**EASE_TUNE["tune"], "n_trials": 1}}
    first = run_tune(
        _job(), tune_from_dict(one), tracker=tracker, output_dir=tmp_path, prepared=prepared
    )
    client = MlflowClient()
    # A tuning run written by an older recvae, which logged the best as (immutable) params.
    client.log_param(first.run_id, "best.regularization", "0.5")
    study.enqueue_trial({"regularization": 20.0})
    two = {"tune": {**EASE_TUNE["tune"], "n_trials": 2}}
    more = run_tune(
        _job(), tune_from_dict(two), tracker=tracker, output_dir=tmp_path, prepared=prepared
    )
    assert (first.best_trial, more.best_trial) == (0, 1) and more.run_id == first.run_id
    assert more.tracking_errors == []  # the old params do not make the resumption fail
    parent = client.get_run(more.run_id).data
    assert parent.tags["best.regularization"] == "20.0"
    assert parent.params["best.regularization"] == "0.5"  # MLflow cannot change it
    # The best so far, by completed trials: the latest value is the current best.
    values = [t["value"] for t in more.trials]
    history = client.get_metric_history(more.run_id, "best_validation_ndcg_at_100")
    assert [(m.step, m.value) for m in history] == [(1, values[0]), (2, values[1])]
    history = client.get_metric_history(more.run_id, "best_trial")
    assert [(m.step, m.value) for m in history] == [(1, 0.0), (2, 1.0)]
    assert parent.metrics["test_ndcg_at_100"] == pytest.approx(more.test["test_ndcg@100"])
    (artifact,) = client.list_artifacts(more.run_id)
    logged = json.loads(Path(client.download_artifacts(more.run_id, artifact.path)).read_text())
    assert artifact.path == "best.json" and logged["trial"] == 1

    # A rerun into another store starts a new tuning run; the best was scored before and is
    # not scored again, and the new run records it all the same.
    elsewhere = Tracker(enabled=True, tracking_uri=f"sqlite:///{other / 'mlflow.db'}")
    again = run_tune(
        _job(), tune_from_dict(two), tracker=elsewhere, output_dir=tmp_path, prepared=prepared
    )
    assert again.test_reused and again.run_id != more.run_id and again.tracking_errors == []
    moved = MlflowClient().get_run(again.run_id).data
    assert {k: v for k, v in moved.tags.items() if k.startswith("best.")} == {
        "best.regularization": "20.0"
    }
    assert moved.metrics["best_trial"] == 1 and moved.metrics["test_ndcg_at_100"] == pytest.approx(
        more.test["test_ndcg@100"]
    )
    assert [a.path for a in MlflowClient().list_artifacts(again.run_id)] == ["best.json"]


def test_a_tuning_run_records_the_best_autoencoders_best_toml(
    prepared: PreparedData, tmp_path: Path, mlflow_uri: str
) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking_hooks import Tracker

    raw = {
        "models": {
            "vae": {"model": "multvae", "hidden_dims": [8], "latent_dim": 4, "batch_size": 64}
        },
        "tune": {
            "model": "vae",
            "sampler": "random",
            "n_trials": 1,
            "space": {"epochs": {"low": 1, "high": 2}},
        },
    }
    settings = tune_from_dict(raw)
    run_tune(_job(), settings, output_dir=tmp_path, prepared=prepared)  # tracking off
    # The resumption (nothing left to run) records the best on its new tuning run.
    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="tune-vae")
    again = run_tune(_job(), settings, tracker=tracker, output_dir=tmp_path, prepared=prepared)
    assert again.test_reused and again.tracking_errors == []
    client = MlflowClient()
    assert sorted(a.path for a in client.list_artifacts(again.run_id)) == ["best.json", "best.toml"]
    logged = Path(client.download_artifacts(again.run_id, "best.toml")).read_text()
    assert logged == (tmp_path / "best.toml").read_text()
    tags = client.get_run(again.run_id).data.tags
    assert tags["best.epochs"] == str(again.best_params["epochs"])


def test_tune_help_names_the_default_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["tune", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    default = "<[mlflow] experiment of the config, else recvae-<dataset>>-tune"
    assert f"MLflow experiment (default: {default}" in text


def test_a_study_cannot_resume_with_other_settings(prepared: PreparedData, tmp_path: Path) -> None:
    run_tune(
        _job(),
        tune_from_dict({"tune": {**EASE_TUNE["tune"], "n_trials": 1}}),
        output_dir=tmp_path,
        prepared=prepared,
    )
    other = {"tune": {**EASE_TUNE["tune"], "space": {"regularization": {"low": 1, "high": 9}}}}
    with pytest.raises(ValueError, match="holds a study of other settings"):
        run_tune(_job(), tune_from_dict(other), output_dir=tmp_path, prepared=prepared)


@pytest.mark.slow
def test_autoencoder_search_keeps_only_the_best_checkpoint(
    prepared: PreparedData, spy: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = {
        "models": {
            "vae": {"model": "multvae", "hidden_dims": [16], "latent_dim": 8, "batch_size": 64}
        },
        "tune": {
            "model": "vae",
            "sampler": "random",
            "n_trials": 2,
            "space": {
                "epochs": {"low": 2, "high": 4, "step": 2},
                "hidden_dims": {"choices": [[16], [8]]},
            },
        },
    }
    settings = tune_from_dict(raw)
    assert isinstance(settings, TuneSettings)
    result = run_tune(_job(), settings, output_dir=tmp_path, prepared=prepared)
    assert spy == ["validation", "validation", "test"]
    checkpoints = list((tmp_path / "trials").iterdir())
    assert len(checkpoints) == 1  # the best trial's, from which the final model was loaded
    assert isinstance(result.best_params["hidden_dims"], list)
    assert result.best_config["hidden_dims"] == result.best_params["hidden_dims"]
    meta = json.loads((tmp_path / "best" / "bundle" / "meta.json").read_text())
    assert meta["epochs_run"] == result.best_params["epochs"]
    # What `recvae evaluate` needs to re-create the split, as `recvae train` records it.
    assert meta["dataset"] == prepared.name and meta["data_fingerprint"] == prepared.fingerprint
    assert meta["split"] == prepared.split.summary()
    assert meta["job"] == _job().to_dict()
    # `recvae train --config <output>/best.toml` retrains exactly that model on that split.
    from pipelines.settings import job_from_dict, read_toml
    from recvae.config import config_from_dict

    retrain = job_from_dict(read_toml(tmp_path / "best.toml"))
    assert retrain.model_config() == config_from_dict(result.best_config)
    assert (retrain.data, retrain.protocol) == (_job().data, _job().protocol)
    assert retrain.model_config().hidden_dims == tuple(result.best_params["hidden_dims"])


def test_tune_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = planted_interactions(n_users=120, n_items=30, n_clusters=3, seed=4)
    csv_path = write_interactions_csv(data, tmp_path / "log.csv")
    config = tmp_path / "tune.toml"
    config.write_text(
        '[tune]\nmodel = "ease"\nn_trials = 5\n[tune.space]\n'
        "regularization = { low = 1.0, high = 100.0, log = true }\n"
        "[tune.spaces.itemknn]\nneighbours = { low = 5, high = 20 }\n"
    )
    argv = ["tune", "--config", str(config), "--data", str(csv_path), "--n-heldout", "15"]
    argv += ["--n-trials", "2", "--no-track", "-o", str(tmp_path / "study")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "best trial" in out and "(scored once)" in out and "2 new trial(s)" in out
    assert main(argv) == 0  # resumed: nothing to do, the test score is reused
    assert "(scored before; reused)" in capsys.readouterr().out
    assert main([*argv[:-2], "-o", str(tmp_path / "x"), "--model", "bpr"]) == 2
    assert "no search space for 'bpr'" in capsys.readouterr().err


def test_a_killed_trials_mlflow_run_is_ended_killed_on_resume(
    prepared: PreparedData, tmp_path: Path, mlflow_uri: str
) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking_hooks import Tracker

    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="tune-killed")
    one = {"tune": {**EASE_TUNE["tune"], "n_trials": 1}}
    first = run_tune(
        _job(), tune_from_dict(one), tracker=tracker, output_dir=tmp_path, prepared=prepared
    )
    # What kill -9 mid-trial leaves: the trial RUNNING in the study, its child run RUNNING.
    client = MlflowClient()
    child = client.create_run(
        tracker.experiment_id, tags={"mlflow.parentRunId": str(first.run_id)}
    ).info.run_id
    study = optuna.load_study(study_name=tune.STUDY_NAME, storage=f"sqlite:///{tmp_path}/optuna.db")
    stale = study.ask()
    stale.suggest_float("regularization", 0.5, 500.0, log=True)
    study._storage.set_trial_user_attr(stale._trial_id, "mlflow_run_id", child)
    assert client.get_run(child).info.status == "RUNNING"
    two = {"tune": {**EASE_TUNE["tune"], "n_trials": 2}}
    run_tune(_job(), tune_from_dict(two), tracker=tracker, output_dir=tmp_path, prepared=prepared)
    assert client.get_run(child).info.status == "KILLED"
    trials = optuna.load_study(
        study_name=tune.STUDY_NAME, storage=f"sqlite:///{tmp_path}/optuna.db"
    ).get_trials()
    assert all("mlflow_run_id" in t.user_attrs for t in trials)  # every trial names its run
