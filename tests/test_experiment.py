"""``recvae experiment``: config parsing, a tiny run end to end, tracking, failures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.experiment import (
    ExperimentSettings,
    check_requirements,
    comparison_table,
    experiment_from_dict,
    model_spec,
    run_experiment,
)
from pipelines.settings import CONFIG_DIR, JobSettings, read_toml
from pipelines.train_job import PreparedData
from recvae.data import planted_interactions
from recvae.evaluation import evaluate
from recvae.split import split_users
from tests.conftest import write_interactions_csv

SMALL_VAE = {"hidden_dims": [16], "latent_dim": 8, "epochs": 3, "batch_size": 32}
TINY_MODELS = {
    "multvae": {"model": "multvae", **SMALL_VAE, "learning_rate": 0.01},
    "multdae": {"model": "multdae", "latent_dim": 8, "epochs": 2, "batch_size": 32},
    "ease": {"lambdas": [1.0, 10.0, 100.0]},
    "als": {"factors": 8, "iterations": 3},
    "bpr": {"factors": 8, "iterations": 5, "fold_in_steps": 10},
    "itemknn": {"neighbours": 10},
    "popularity": {},
}


@pytest.fixture(scope="module")
def prepared() -> PreparedData:
    data = planted_interactions(n_users=220, n_items=48, n_clusters=4, p_in=0.4, seed=7)
    split = split_users(data, n_heldout=30, seed=11)
    return PreparedData(split=split, name="planted", fingerprint=data.fingerprint())


def _job() -> JobSettings:
    return JobSettings(run={"device": "cpu", "progress": False})


def _settings(**changes: object) -> ExperimentSettings:
    raw = {"models": TINY_MODELS, "experiment": {"ks": [5, 20]}}
    settings = experiment_from_dict(raw)
    import dataclasses

    return dataclasses.replace(settings, **changes)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
def test_every_preset_with_models_parses(preset: str) -> None:
    raw = read_toml(preset)
    if "experiment" not in raw:
        pytest.skip(f"{preset} has no [experiment]")
    settings = experiment_from_dict(raw)
    labels = [spec.label for spec in settings.models]
    assert labels == ["multvae", "multdae", "ease", "als", "bpr", "itemknn", "popularity"]
    ease = next(spec for spec in settings.models if spec.model == "ease")
    assert ease.lambdas and settings.registered_model and settings.alias == "staging"
    vae = settings.models[0]
    assert vae.config.epochs == 200 and vae.config.beta_max == 0.2  # the paper's settings


def test_settings_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"\[models.vae\].*unknown model 'vea'"):
        experiment_from_dict({"models": {"vae": {"model": "vea"}}})
    with pytest.raises(ValueError, match=r"\[models.ease\].*regularization"):
        experiment_from_dict({"models": {"ease": {"regularization": -1}}})
    with pytest.raises(ValueError, match="'lambdas' applies to EASE only"):
        experiment_from_dict({"models": {"als": {"lambdas": [1.0]}}})
    with pytest.raises(ValueError, match="every lambda must be > 0"):
        experiment_from_dict({"models": {"ease": {"lambdas": [1.0, 0.0]}}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) in \[experiment\]: model"):
        experiment_from_dict({"experiment": {"model": "x"}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) in \[mlflow\]: uri"):
        experiment_from_dict({"mlflow": {"uri": "x"}})
    with pytest.raises(ValueError, match="unknown model 'svd'"):
        experiment_from_dict({"experiment": {"models": ["svd"]}})
    with pytest.raises(ValueError, match="fairness_k"):
        experiment_from_dict({"experiment": {"fairness_k": 0}})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"experiment": 3}, "[experiment] must be a table, got experiment = 3"),
        ({"mlflow": "x"}, "[mlflow] must be a table"),
        ({"experiment": {"ks": 5}}, "[experiment] ks must be a list of positive ints, got 5"),
        ({"experiment": {"ks": [True, 10]}}, "[experiment] ks must be positive ints"),
        ({"experiment": {"threads": True}}, "[experiment] threads must be an int >= 1, got True"),
        ({"experiment": {"fairness_k": True}}, "[experiment] fairness_k must be an int >= 1"),
        ({"experiment": {"output_dir": 3}}, "[experiment] output_dir must be a string, got 3"),
        ({"experiment": {"device": "gpu"}}, "[experiment] device must be auto, cpu, cuda"),
        ({"experiment": {"register": "multvea"}}, "register: 'multvea' is not one of the models"),
        ({"mlflow": {"experiment": 3}}, "[mlflow] experiment must be a string, got 3"),
        ({"mlflow": {"registered_model": True}}, "[mlflow] registered_model must be a string"),
    ],
)
def test_wrongly_typed_experiment_values_name_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        experiment_from_dict(raw)
    assert message in str(info.value)


def test_model_selection_and_epoch_override() -> None:
    settings = experiment_from_dict({"models": TINY_MODELS})
    chosen = settings.with_models(["ease", "multvae", "als"])
    assert [s.label for s in chosen.models] == ["ease", "multvae", "als"]
    # A type without a table gets its defaults.
    assert experiment_from_dict({}).with_models(["bpr"]).models[0].config.factors == 100
    longer = chosen.with_epochs(7)
    assert longer.models[1].config.epochs == 7 and longer.models[0] == chosen.models[0]
    with pytest.raises(ValueError, match="epochs"):
        chosen.with_epochs(0)
    assert settings.eval_ks == (5, 10, 20, 50, 100)
    spec = model_spec("ease-small", {"model": "ease", "regularization": 5.0})
    assert spec.params() == {
        "label": "ease-small",
        "model": "ease",
        "regularization": 5.0,
        "dtype": "auto",
    }


# ------------------------------------------------------------------------------ running
@pytest.mark.slow
def test_tiny_experiment_end_to_end(
    prepared: PreparedData, tmp_path: Path, mlflow_uri: str
) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking_hooks import Tracker

    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="tiny")
    labels = ["multvae", "ease", "popularity"]
    settings = _settings(registered_model="recvae-tiny", alias="staging").with_models(labels)
    lines: list[str] = []
    outcome = run_experiment(
        _job(),
        settings,
        tracker=tracker,
        output_dir=tmp_path / "run",
        prepared=prepared,
        report=lines.append,
    )
    assert [r.label for r in outcome.results] == labels and not outcome.failures
    assert outcome.tracking_errors == []
    # The table holds every model with mean ± se, the fairness columns and the choices.
    table = outcome.table
    for label in labels:
        assert f"| {label} |" in table
    assert "coverage@20" in table and "Gini@20" in table and "Q4 (most active)" in table
    ease = next(r for r in outcome.results if r.label == "ease")
    assert (
        ease.notes["lambda"] in (1.0, 10.0, 100.0) and f"lambda {ease.notes['lambda']:g}" in table
    )
    # The numbers are the shared evaluation's: recompute popularity independently.
    from recvae.baselines import Popularity

    split = prepared.split
    expected = evaluate(
        Popularity().fit(split.train), split.test.fold_in.matrix, split.test.targets.matrix
    )
    popularity = next(r for r in outcome.results if r.label == "popularity")
    assert popularity.test.mean("ndcg@100") == pytest.approx(expected.mean("ndcg@100"))
    assert f"{expected.mean('ndcg@100'):.4f} ± {expected.stderr('ndcg@100'):.4f}" in table
    # Files: markdown, CSV (one row per model), results.json, plots, the VAE bundle.
    out = tmp_path / "run"
    assert table in (out / "comparison.md").read_text()
    with (out / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == labels
    assert float(rows[-1]["ndcg@100"]) == pytest.approx(expected.mean("ndcg@100"))
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "planted" and len(results["models"]) == len(labels)
    for name in ("metrics_vs_k.png", "ndcg_by_activity.png", "learning_curves.png"):
        assert (out / "plots" / name).stat().st_size > 0
    assert (out / "multvae" / "bundle" / "meta.json").is_file()
    # MLflow: a parent run and a child per model, with configs, epochs and final metrics.
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("tiny").experiment_id
    runs = client.search_runs([experiment_id])
    parent = client.get_run(outcome.run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(labels)
    assert parent.data.params["experiment.models"] == json.dumps(labels)
    assert parent.data.metrics["ease_test_ndcg_at_100"] == pytest.approx(ease.test.mean("ndcg@100"))
    parent_artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"comparison.md", "comparison.csv", "results.json", "plots"} <= parent_artifacts
    vae = next(r for r in children if r.info.run_name == "multvae")
    assert vae.data.params["latent_dim"] == "8" and vae.data.params["epochs"] == "3"
    history = client.get_metric_history(vae.info.run_id, "val_ndcg_at_100")
    assert [m.step for m in history] == [1, 2, 3]
    assert "test_ndcg_at_100_q4" in vae.data.metrics and "test_gini_at_20" in vae.data.metrics
    ease_run = next(r for r in children if r.info.run_name == "ease")
    steps = client.get_metric_history(ease_run.info.run_id, "lambda_search_validation_ndcg_at_100")
    assert len(steps) == 3
    assert ease_run.data.params["regularization_chosen"] == str(ease.notes["lambda"])
    # The Mult-VAE bundle is registered and its alias points at it.
    assert outcome.registered is not None
    assert outcome.registered["registered_model"] == "recvae-tiny"
    import mlflow

    model = mlflow.pyfunc.load_model("models:/recvae-tiny@staging")
    history_ids = [int(i) for i in prepared.split.train.item_ids[:4]]
    assert len(model.predict([history_ids], params={"k": 5})[0]["item_ids"]) == 5
    assert any("multvae: test NDCG@100" in line for line in lines)


def test_every_model_type_runs_on_the_same_split(prepared: PreparedData, tmp_path: Path) -> None:
    outcome = run_experiment(_job(), _settings(plots=False), output_dir=tmp_path, prepared=prepared)
    assert [r.label for r in outcome.results] == list(TINY_MODELS) and not outcome.failures
    n_test = prepared.split.test.n_users_with_targets
    for result in outcome.results:
        assert result.test.n_users == n_test and result.validation.n_users > 0
        assert 0.0 < result.test.mean("ndcg@100") <= 1.0
        assert result.ranker is not None and result.ranker.n_items == prepared.split.train.n_items
    # On planted clusters every personalized model beats popularity.
    by_label = {r.label: r.test.mean("ndcg@100") for r in outcome.results}
    assert by_label["ease"] > by_label["popularity"] and by_label["als"] > by_label["popularity"]
    assert not (tmp_path / "plots").exists()


def test_a_failing_model_does_not_stop_the_others(
    prepared: PreparedData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.experiment as experiment

    real = experiment.build_baseline

    def flaky(spec, **kwargs):  # type: ignore[no-untyped-def]
        if spec.label == "itemknn":
            raise RuntimeError("out of memory")
        return real(spec, **kwargs)

    monkeypatch.setattr(experiment, "build_baseline", flaky)
    settings = _settings().with_models(["itemknn", "popularity"])
    outcome = run_experiment(_job(), settings, output_dir=tmp_path, prepared=prepared)
    assert [r.label for r in outcome.results] == ["popularity"]
    assert outcome.failures == {"itemknn": "RuntimeError: out of memory"}
    assert "itemknn: FAILED (RuntimeError: out of memory)" in outcome.table


def test_missing_implicit_fails_before_training(
    prepared: PreparedData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "implicit" else real(name, *a),
    )
    with pytest.raises(ValueError, match=r"als.*need implicit"):
        run_experiment(_job(), _settings(), output_dir=tmp_path, prepared=prepared)
    assert not (tmp_path / "multvae").exists()


def test_a_run_option_recvae_would_ignore_fails_before_training(
    prepared: PreparedData, tmp_path: Path
) -> None:
    settings = experiment_from_dict(
        {"models": {"pop": {"model": "popularity"}, "rv": {"model": "recvae", "epochs": 1}}}
    )
    job = JobSettings(run={"device": "cpu", "progress": False, "precision": "bf16"})
    with pytest.raises(ValueError, match=r"\[models\.rv\]: .*precision 'bf16' is not supported"):
        run_experiment(job, settings, output_dir=tmp_path, prepared=prepared)
    assert not (tmp_path / "pop").exists()  # nothing ran, not even the baseline
    # Mult-VAE takes bf16: the same run options pass the check
    vae = experiment_from_dict({"models": {"vae": {"model": "multvae"}}})
    check_requirements(vae, job.run)


def test_experiment_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = planted_interactions(n_users=150, n_items=30, n_clusters=3, seed=2)
    csv_path = write_interactions_csv(data, tmp_path / "log.csv")
    config = tmp_path / "exp.toml"
    config.write_text(
        '[experiment]\nks = [10]\nplots = false\n[models.vae]\nmodel = "multvae"\n'
        "hidden_dims = [8]\n"
        'latent_dim = 4\nepochs = 50\nbatch_size = 32\n[models.pop]\nmodel = "popularity"\n'
    )
    argv = ["experiment", "--config", str(config), "--data", str(csv_path), "--n-heldout", "20"]
    argv += ["--epochs", "2", "--no-track", "--no-progress", "--device", "cpu"]
    argv += ["-o", str(tmp_path / "out"), "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| vae |" in out and "| pop |" in out and "±" in out
    assert "mlflow" not in out
    rows = list(csv.DictReader((tmp_path / "out" / "comparison.csv").open()))
    assert [row["model"] for row in rows] == ["vae", "pop"]
    meta = json.loads((tmp_path / "out" / "vae" / "bundle" / "meta.json").read_text())
    assert meta["epochs_run"] == 2  # --epochs overrides the config
    assert main([*argv[:-2], "--models", "pop,nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main([*argv, "--epochs", "0"]) == 2
    # A bad [run] value stops the experiment before any model (the baselines first) runs.
    config.write_text(config.read_text() + '[run]\nprecision = "fp8"\n')
    capsys.readouterr()
    out_dir = tmp_path / "bad-run"
    assert main([*argv[:-2], "-o", str(out_dir), "--threads", "1"]) == 2
    assert "'precision': must be fp32 or bf16" in capsys.readouterr().err
    assert not (out_dir / "pop").exists()


def test_comparison_table_marks_empty_segments(prepared: PreparedData) -> None:
    from pipelines.experiment import ModelResult

    split = prepared.split
    from recvae.baselines import Popularity

    result = evaluate(
        Popularity().fit(split.train), split.test.fold_in.matrix, split.test.targets.matrix
    )
    segments = result.by_segment("ndcg@100", np.ones(split.test.n_users), 4)
    row = ModelResult("pop", "popularity", {}, result, result, 0.0, segments)
    table = comparison_table([row])
    assert table.count("\n") == 2 and "| pop |" in table
