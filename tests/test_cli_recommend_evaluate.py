"""Regression tests of ``recvae recommend``, ``evaluate`` and ``anomalies`` on the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipelines.cli import main
from tests.conftest import make_checkerboard, write_interactions_csv
from tests.conftest import run_cli as _run

# A split seed other than the default (98765), so that a command that forgets it re-splits.
SEED = 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of ``recvae train`` on the bundled ml-latest-small, split with ``SEED``."""
    out = tmp_path_factory.mktemp("run") / "seeded"
    argv = ["train", "--epochs", "1", "--no-progress", "--device", "cpu", "--seed", str(SEED)]
    assert main([*argv, "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def bundle(run_dir: Path) -> Path:
    return run_dir / "bundle"


@pytest.fixture(scope="module")
def csv_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle trained on a CSV file of the checkerboard (60 users)."""
    folder = tmp_path_factory.mktemp("csv")
    data, _ = make_checkerboard()
    path = write_interactions_csv(data, folder / "board.csv")
    argv = ["train", "--data", str(path), "--epochs", "1", "--no-progress", "--n-heldout", "5"]
    assert main([*argv, "--seed", str(SEED), "-o", str(folder / "run")]) == 0
    return folder / "run" / "bundle"


def _user_ids(bundle: Path) -> list[int]:
    ids: list[int] = json.loads((bundle / "user_ids.json").read_text())["ids"]
    return ids


def _items(out: str) -> list[object]:
    return [item["item_id"] for item in json.loads(out)["items"]]


def _metric(report: str, name: str) -> float:
    match = re.search(rf"^\| {re.escape(name)} \| ([0-9.]+) \|", report, flags=re.MULTILINE)
    assert match, report
    return float(match.group(1))


# ---------------------------------------------------------------------------------- recommend
@pytest.mark.parametrize(
    "tail",
    [
        ["-k", "5", "1", "2", "--json"],
        ["--json", "1", "2", "-k", "5"],
        ["1", "--json", "2", "-k", "5"],
        ["1", "-k", "5", "2", "--json"],
        ["--include-seen", "1", "2", "-k", "5", "--json"],
    ],
)
def test_recommend_takes_options_among_the_item_ids(
    tail: list[str], bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, expected, _ = _run(["recommend", str(bundle), "1", "2", "-k", "5", "--json"], capsys)
    assert code == 0
    code, out, err = _run(["recommend", str(bundle), *tail], capsys)
    assert code == 0, err
    if "--include-seen" in tail:
        assert len(_items(out)) == 5
    else:
        assert _items(out) == _items(expected)


def test_recommend_explore_options_among_the_item_ids(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head = ["recommend", str(bundle)]
    code, expected, _ = _run([*head, "1", "2", "--explore", "--seed", "3", "--json"], capsys)
    assert code == 0
    code, out, err = _run([*head, "--explore", "1", "--seed", "3", "2", "--json"], capsys)
    assert code == 0, err
    assert _items(out) == _items(expected)


def test_recommend_unknown_option_among_item_ids_is_a_usage_error(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["recommend", str(bundle), "1", "--bogus", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "recvae recommend: error: unrecognized arguments: --bogus" in err
    assert "2" not in err.splitlines()[-1].split(":")[-1]  # the item id is not "unrecognized"


def test_other_commands_still_reject_extra_arguments(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(bundle), "extra"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: extra" in capsys.readouterr().err


def test_recommend_user_and_items_together_is_an_error(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user = _user_ids(bundle)[0]
    code, out, err = _run(["recommend", "--user", str(user), str(bundle), "2", "3"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("recvae: error: give either --user") and "not both" in err


@pytest.mark.parametrize("seed", ["99999999999999999999", "9223372036854775808", "-1"])
def test_recommend_seed_out_of_range_names_the_range(
    seed: str, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["recommend", str(bundle), "1", "--explore", "--seed", seed], capsys)
    assert code == 2
    assert err.strip() == (
        f"recvae: error: --seed must be in [0, 9223372036854775807] (2**63 - 1), got {seed}"
    )


def test_recommend_largest_seed_works(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["recommend", str(bundle), "1", "--explore", "--seed", str(2**63 - 1), "--json"]
    code, out, _ = _run(argv, capsys)
    assert code == 0 and len(_items(out)) == 10


def test_recommend_held_out_user_says_it_is_not_a_training_user(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    training = set(_user_ids(bundle))
    held_out = min(set(range(1, 611)) - training)  # ml-latest-small's users are 1..610
    code, _, err = _run(["recommend", "--user", str(held_out), str(bundle)], capsys)
    assert code == 2
    assert f"user {held_out} is not a training user of the bundle" in err
    assert "give that user's item ids as a history instead" in err
    assert "unknown id" not in err


@pytest.mark.parametrize("command", ["recommend", "evaluate", "anomalies"])
def test_run_folder_instead_of_bundle_hints_at_its_bundle(
    command: str, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, str(run_dir), *(["1"] if command == "recommend" else [])]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert err.strip() == (
        f"recvae: error: {run_dir} is a run folder, not a model bundle: "
        f"did you mean {run_dir / 'bundle'}?"
    )


# ----------------------------------------------------------------------------------- evaluate
def test_evaluate_reproduces_train_test_metrics_with_the_bundles_split_seed(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = json.loads((bundle / "meta.json").read_text())["metrics"]["test"]
    code, out, err = _run(["evaluate", str(bundle)], capsys)
    assert code == 0 and "warning" not in err
    for name in ("ndcg@100", "recall@20", "recall@50"):
        assert _metric(out, name) == pytest.approx(trained[name], abs=1e-4), name


def test_evaluate_with_another_split_seed_warns_of_overlap(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(["evaluate", str(bundle), "--seed", "98765"], capsys)
    assert code == 0 and "ndcg@100" in out
    assert err.startswith("warning: --seed 98765 (trained with 5)")
    assert "may include users the model was trained on" in err


def test_evaluate_on_the_recorded_file_without_data_flags(
    csv_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = json.loads((csv_bundle / "meta.json").read_text())["metrics"]["test"]
    code, out, err = _run(["evaluate", str(csv_bundle)], capsys)
    assert code == 0, err
    assert "on board test users" in out
    assert _metric(out, "ndcg@100") == pytest.approx(trained["ndcg@100"], abs=1e-4)


def test_file_flags_apply_to_the_file_a_bundle_was_trained_on(
    csv_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --separator describes the recorded file: not refused as a flag without --data.
    code, out, err = _run(["evaluate", str(csv_bundle), "--separator", ","], capsys)
    assert code == 0, err
    assert "on board test users" in out
    code, _, err = _run(["evaluate", str(csv_bundle), "--threshold", "4"], capsys)
    assert code == 2 and "--threshold needs --rating-col" in err  # the file has no ratings


def test_evaluate_refuses_another_dataset(
    bundle: Path, csv_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = json.loads((csv_bundle / "meta.json").read_text())["job"]["data"]["path"]
    code, out, err = _run(["evaluate", str(bundle), "--data", csv], capsys)
    assert code == 2 and out == ""
    assert err.startswith(
        f"recvae: error: the bundle {bundle} was trained on ml-latest-small, not board"
    )
    assert "--allow-other-dataset" in err
    code, _, err = _run(["evaluate", str(csv_bundle), "--dataset", "ml-latest-small"], capsys)
    assert code == 2 and "was trained on board, not ml-latest-small" in err


# ---------------------------------------------------------------------------------- anomalies
def test_anomalies_refuses_another_dataset_unless_allowed(
    bundle: Path, csv_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["anomalies", str(csv_bundle), "--dataset", "ml-latest-small"], capsys)
    assert code == 2 and "was trained on board, not ml-latest-small" in err
    csv = json.loads((csv_bundle / "meta.json").read_text())["job"]["data"]["path"]
    argv = ["anomalies", str(bundle), "--data", csv, "--json"]
    code, _, err = _run(argv, capsys)
    assert code == 2 and "not board" in err
    code, out, err = _run([*argv, "--allow-other-dataset"], capsys)
    assert code == 0, err
    assert json.loads(out)["dataset"] == "board"


def test_anomalies_scores_the_bundles_own_data_by_default(
    csv_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(["anomalies", str(csv_bundle), "--json"], capsys)
    assert code == 0, err
    payload = json.loads(out)
    assert payload["dataset"] == "board" and payload["n_users"] == 60


def test_anomalies_held_out_reference_without_calibration_says_what_to_use(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["anomalies", str(bundle), "--reference", "held-out"], capsys)
    assert code == 2
    assert err.startswith(f"recvae: error: the bundle {bundle} has no held-out anomaly reference")
    assert "use --reference training or auto" in err
    assert "before saving the bundle" not in err
