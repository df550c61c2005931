"""Regression tests from an audit of ``recvae evaluate``, ``recommend`` and ``experiment``: bad
input ends in one ``recvae: error:`` line, and a run never overwrites another run's results."""

from __future__ import annotations

import argparse
import errno
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pipelines.experiment as experiment
import pipelines.tracking_hooks as tracking_hooks
from pipelines.cli import build_parser, main, parse_args
from pipelines.commands.train import train_job_from_args
from pipelines.experiment import experiment_from_dict, run_experiment
from pipelines.settings import JobSettings
from pipelines.train_job import PreparedData
from recvae.data import planted_interactions
from recvae.split import split_users
from tests.conftest import run_cli, write_csv, write_interactions_csv


def _one_line_error(err: str) -> str:
    text = err.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert text.startswith("recvae: error: "), text
    return text


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(interaction CSV, bundle)``: a one-epoch Mult-VAE trained on a planted CSV (30 items)."""
    folder = tmp_path_factory.mktemp("audit")
    data = planted_interactions(n_users=120, n_items=30, n_clusters=3, p_in=0.4, seed=3)
    path = write_interactions_csv(data, folder / "log.csv")
    argv = ["train", "--data", str(path), "--epochs", "1", "--no-progress", "--device", "cpu"]
    assert main([*argv, "--n-heldout", "10", "-o", str(folder / "run")]) == 0
    return path, folder / "run" / "bundle"


# ---------------------------------------------------------------------------------- evaluate
def test_evaluate_refuses_a_cut_off_beyond_the_catalog_in_one_line(
    csv_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # It ran out of memory after loading the data (1e12), or crashed with a traceback (1e23).
    _, bundle = csv_run
    capsys.readouterr()
    for ks in ("1000000000000", "20,99999999999999999999999"):
        code, _, err = run_cli(["evaluate", str(bundle), "--ks", ks], capsys)
        assert code == 2
        assert "ranks only 30 items" in _one_line_error(err)
    code, out, _ = run_cli(["evaluate", str(bundle), "--ks", "30"], capsys)
    assert code == 0 and "| recall@30 |" in out


def test_evaluate_names_a_missing_data_file_not_another_dataset(
    csv_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A mistyped path was reported as "the bundle was trained on log, not lgo".
    _, bundle = csv_run
    capsys.readouterr()
    missing = tmp_path / "lgo.csv"
    for command in ("evaluate", "anomalies"):
        code, _, err = run_cli([command, str(bundle), "--data", str(missing)], capsys)
        assert code == 2
        assert _one_line_error(err) == f"recvae: error: --data {missing}: no such file or folder"


def test_evaluate_warns_when_the_training_file_changed_since_training(
    csv_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same path with other content re-split silently: test users could be training users.
    path, bundle = csv_run
    capsys.readouterr()
    code, _, err = run_cli(["evaluate", str(bundle)], capsys)
    assert code == 0 and "warning" not in err
    original = path.read_text()
    try:
        extra = "".join(f"9999,{item}\n" for item in range(8))
        path.write_text(original + extra)
        code, out, err = run_cli(["evaluate", str(bundle)], capsys)
    finally:
        path.write_text(original)
    assert code == 0 and "test users" in out
    assert "differs from the data the bundle was trained on" in err


def test_evaluate_does_not_warn_for_a_bundle_that_recorded_no_job(
    csv_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A bundle saved by the library (or the nightly job) records its training matrix's
    # fingerprint, not the data file's: that must not read as "the file changed".
    import json
    import shutil

    path, bundle = csv_run
    library = tmp_path / "library-bundle"
    shutil.copytree(bundle, library)
    meta = json.loads((library / "meta.json").read_text())
    del meta["job"]
    meta["data_fingerprint"] = "0123456789abcdef"  # as Trainer records it: another matrix
    (library / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    code, out, err = run_cli(["evaluate", str(library), "--data", str(path)], capsys)
    assert code == 0 and "test users" in out, err
    assert "differs from the data" not in err


def test_evaluate_names_a_recorded_relative_data_file_missing_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `recvae train --data log.csv` records "log.csv"; evaluated from another folder the error
    # was a bare "data file not found: log.csv", with no hint that --data moves it.
    data = planted_interactions(n_users=80, n_items=20, n_clusters=2, seed=6)
    write_interactions_csv(data, tmp_path / "log.csv")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "log.csv", "--epochs", "1", "--no-progress", "--n-heldout", "8"]
    assert run_cli([*argv, "--device", "cpu", "-o", "run"], capsys)[0] == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for command in ("evaluate", "anomalies"):
        code, _, err = run_cli([command, "../run/bundle"], capsys)
        assert code == 2
        message = _one_line_error(err)
        assert f"trained on the file log.csv, which is not found from {elsewhere}" in message
        assert "--data PATH" in message
    code, out, _ = run_cli(["evaluate", "../run/bundle", "--data", "../log.csv"], capsys)
    assert code == 0 and "test users" in out


# ------------------------------------------------------------------------------- experiment
def _prepared(seed: int, *, split_seed: int = 11) -> PreparedData:
    data = planted_interactions(n_users=150, n_items=30, n_clusters=3, p_in=0.4, seed=seed)
    split = split_users(data, n_heldout=20, seed=split_seed)
    return PreparedData(split=split, name="planted", fingerprint=data.fingerprint())


def _popularity() -> Any:
    return experiment_from_dict({"experiment": {"plots": False}, "models": {"popularity": {}}})


def test_experiment_refuses_an_output_holding_an_experiment_on_other_data(
    tmp_path: Path,
) -> None:
    # A rerun with --dataset/--data changed overwrote comparison.md/.csv and results.json of the
    # earlier experiment and left its bundles beside the new results.
    job = JobSettings(run={"device": "cpu", "progress": False})
    run_experiment(job, _popularity(), output_dir=tmp_path, prepared=_prepared(1))
    before = {name: (tmp_path / name).read_bytes() for name in ("comparison.md", "results.json")}
    with pytest.raises(ValueError, match="holds an experiment on other data"):
        run_experiment(job, _popularity(), output_dir=tmp_path, prepared=_prepared(2))
    with pytest.raises(ValueError, match="another split of planted"):
        run_experiment(job, _popularity(), output_dir=tmp_path, prepared=_prepared(1, split_seed=4))
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    # The same data and split still resume into the folder.
    run_experiment(job, _popularity(), output_dir=tmp_path, prepared=_prepared(1))


def test_experiment_reports_an_unwritable_output_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A read-only --output ended in a PermissionError traceback after the data was loaded.
    # (Permissions are simulated: root may write anywhere.)
    real_mkdir = Path.mkdir
    out = tmp_path / "run"
    argv = ["experiment", "--models", "popularity", "--no-track", "-o", str(out)]
    _refuse_new_entries_in(tmp_path, errno.EACCES, monkeypatch)
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "is not writable" in _one_line_error(err)
    assert not out.exists()
    monkeypatch.undo()

    def refuse(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == out:
            raise PermissionError(1, "Operation not permitted", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert "cannot create the output directory" in _one_line_error(err)


def test_experiment_on_other_data_does_not_use_the_presets_mlflow_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `recvae experiment --data log.csv` logged to recvae-ml-latest-small and moved the
    # registry alias models:/recvae-ml-latest-small@staging to a bundle of log.csv.
    data = planted_interactions(n_users=60, n_items=20, n_clusters=2, seed=4)
    path = write_interactions_csv(data, tmp_path / "log.csv")
    seen: dict[str, Any] = {}

    def tracker(**kwargs: Any) -> tracking_hooks.Tracker:
        seen["experiment"] = kwargs["experiment"]
        return tracking_hooks.Tracker.disabled()

    def stop(job: JobSettings, settings: Any, **kwargs: Any) -> Any:
        seen["registered_model"] = settings.registered_model
        raise ValueError("stopped before training")

    monkeypatch.setattr(tracking_hooks, "make_tracker", tracker)
    monkeypatch.setattr(experiment, "run_experiment", stop)
    argv = ["experiment", "--data", str(path), "--models", "multvae", "-o", str(tmp_path / "x")]
    assert run_cli(argv, capsys)[0] == 2
    assert seen == {"experiment": "recvae-log", "registered_model": None}
    # The preset's own dataset keeps the preset's names.
    assert run_cli(["experiment", "--models", "multvae", "-o", str(tmp_path / "y")], capsys)[0] == 2
    assert seen == {
        "experiment": "recvae-ml-latest-small",
        "registered_model": "recvae-ml-latest-small",
    }


# ---------------------------------------------------------------------------------- OS errors
@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PermissionError(13, "Permission denied", "/data/log.csv"), 2),
        (OSError(28, "No space left on device", "/runs/bundle/weights.pt"), 1),
        (OSError(30, "Read-only file system", "/runs"), 1),
    ],
)
def test_an_os_error_is_one_line_naming_the_file(
    error: OSError, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An unreadable file or a full disk gave a traceback (only missing files were handled).
    import pipelines.commands.datasets as datasets

    def fail(args: Any) -> int:
        raise error

    monkeypatch.setattr(datasets, "run_command", fail)
    got, _, err = run_cli(["datasets"], capsys)
    assert got == code
    assert _one_line_error(err) == f"recvae: error: {error}"
    assert str(error.filename) in err and "Traceback" not in err


def test_experiment_rerun_with_other_settings_is_refused_before_any_model_is_fitted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The autoencoder failed on its checkpoint only after the baselines had been refitted and
    # the comparison rewritten.
    data = planted_interactions(n_users=80, n_items=20, n_clusters=2, seed=6)
    path = write_interactions_csv(data, tmp_path / "log.csv")
    out = tmp_path / "x"
    argv = ["experiment", "--data", str(path), "--models", "popularity,multvae", "-o", str(out)]
    flags = ["--n-heldout", "8", "--no-track"]
    assert run_cli([*argv, *flags, "--epochs", "1"], capsys)[0] == 0
    before = (out / "results.json").read_text()
    code, _, err = run_cli([*argv, *flags, "--epochs", "2"], capsys)
    assert code == 2
    message = _one_line_error(err)
    assert "multvae" in message and "epochs 1 -> 2" in message and "checkpoint" in message
    assert (out / "results.json").read_text() == before
    # The same settings still resume.
    assert run_cli([*argv, *flags, "--epochs", "1"], capsys)[0] == 0


# ------------------------------------------------------------ retrain's writable-path checks
def _refuse_new_entries_in(folder: Path, code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``folder`` refuse new files and folders with ``code`` (as a read-only folder or
    mount would; permission bits alone do not stop root)."""
    real_mkdir, real_open = os.mkdir, os.open

    def guard(path: Any) -> None:
        if Path(os.fsdecode(path)).parent == folder:
            raise OSError(code, os.strerror(code), os.fsdecode(path))

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        guard(path)
        real_mkdir(path, *args, **kwargs)

    def open_(path: Any, *args: Any, **kwargs: Any) -> int:
        guard(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("tail", ["x.json", "deeper/x.json"])
def test_retrain_summary_in_a_missing_folder_of_proc_names_that_folder(
    tail: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The message named /proc ("cannot write in /proc (No such file or directory)"), which
    # exists; the problem is /proc/nope, which does not and cannot be created there.
    code, _, err = run_cli(["retrain", "--summary", f"/proc/nope/{tail}"], capsys)
    assert code == 2
    message = _one_line_error(err)
    prefix = f"recvae: error: --summary /proc/nope/{tail}: the folder /proc/nope does not exist"
    assert message.startswith(prefix), message
    assert "cannot write in /proc" not in message


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_retrain_state_dir_in_a_missing_folder_of_proc_names_that_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["retrain", "--config", "nightly", "--lake", str(tmp_path)]
    code, _, err = run_cli([*argv, "--state-dir", "/proc/nope/state"], capsys)
    assert code == 2
    message = _one_line_error(err)
    assert "--state-dir): the folder /proc/nope does not exist" in message, message


@pytest.mark.parametrize(
    ("tail", "missing", "error", "reason"),
    [
        ("missing/x.json", "missing", errno.EACCES, "is not writable (Permission denied)"),
        ("a/b/x.json", "a", errno.EACCES, "is not writable (Permission denied)"),
        ("missing/x.json", "missing", errno.EROFS, "is not writable (Read-only file system)"),
        ("missing/x.json", "missing", errno.ENOSPC, "cannot be created in"),
    ],
)
def test_retrain_summary_under_a_folder_that_takes_no_entries_names_the_missing_folder(
    tail: str,
    missing: str,
    error: int,
    reason: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    _refuse_new_entries_in(locked, error, monkeypatch)
    code, _, err = run_cli(["retrain", "--summary", str(locked / tail)], capsys)
    assert code == 2
    message = _one_line_error(err)
    assert f": the folder {locked / missing} does not exist, and " in message, message
    assert reason in message and str(locked) in message.split("exist, and ")[1]


def test_retrain_summary_in_an_unwritable_existing_folder_names_that_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _refuse_new_entries_in(tmp_path, errno.EACCES, monkeypatch)
    code, _, err = run_cli(["retrain", "--summary", str(tmp_path / "x.json")], capsys)
    assert code == 2
    assert _one_line_error(err).endswith(f": {tmp_path} is not writable (Permission denied)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_retrain_summary_under_a_read_only_folder_names_the_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        code, _, err = run_cli(["retrain", "--summary", str(locked / "new" / "x.json")], capsys)
    finally:
        locked.chmod(0o755)
    assert code == 2
    message = _one_line_error(err)
    assert f"the folder {locked / 'new'} does not exist, and {locked} is not writable" in message


def test_retrain_summary_under_a_file_or_a_broken_link_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, _, err = run_cli(["retrain", "--summary", str(blocker / "sub" / "x.json")], capsys)
    assert code == 2
    assert _one_line_error(err).endswith(f": {blocker} is not a folder")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    code, _, err = run_cli(["retrain", "--summary", str(link / "x.json")], capsys)
    assert code == 2
    assert _one_line_error(err).endswith(f": {link} is a broken symbolic link, not a folder")


def test_retrain_writable_probe_leaves_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["retrain", "--summary", str(tmp_path / "new" / "x.json")], capsys)
    assert code == 2 and "--config is required" in err  # the path passed the check
    # Only the refusal the scheduler reads was written there; no probe was left.
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "new",
        "new/x.json",
    ]


# -------------------------------------------------------------- negative numbers as values
NEGATIVES = ["-inf", "-Infinity", "-1e3", "-2.5E-1", "-nan", "-1_000"]


def _subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command's parser with the words that reach it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*path, name))


def _float_flags() -> list[tuple[tuple[str, ...], str, str]]:
    """``(command words, flag, dest)`` of every flag that takes one float."""
    found = []
    for path, sub in _subcommands(build_parser()):
        for action in sub._actions:
            if action.option_strings and action.type is float and action.nargs is None:
                found.append((path, action.option_strings[0], action.dest))
    return found


def _positionals(path: tuple[str, ...]) -> list[str]:
    """Placeholders for the positionals a command needs (a bundle)."""
    parser = dict(_subcommands(build_parser()))[path]
    return [
        "x"
        for action in parser._actions
        if not action.option_strings
        and action.nargs is None
        and not isinstance(action, argparse._SubParsersAction)
    ]


def test_every_float_flag_is_found() -> None:
    flags = {(path, flag) for path, flag, _ in _float_flags()}
    for command in ("train", "evaluate", "experiment", "tune", "anomalies"):
        assert ((command,), "--threshold") in flags
    assert (("retrain", "simulate"), "--tolerance") in flags


@pytest.mark.parametrize("value", NEGATIVES)
@pytest.mark.parametrize(("path", "flag", "dest"), _float_flags())
def test_a_negative_number_is_the_value_of_every_float_flag(
    path: tuple[str, ...], flag: str, dest: str, value: str
) -> None:
    # argparse took "-inf" and "-1e3" for options: "--threshold -inf" was "expected one
    # argument", and only "--threshold=-inf" worked.
    argv = [*path, *_positionals(path)]
    spaced = parse_args(build_parser(), [*argv, flag, value])
    joined = parse_args(build_parser(), [*argv, f"{flag}={value}"])
    got, expected = getattr(spaced, dest), getattr(joined, dest)
    assert got == pytest.approx(float(value), nan_ok=True)
    assert expected == pytest.approx(got, nan_ok=True)


def test_an_infinite_or_nan_threshold_is_refused_naming_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_csv(tmp_path / "log.csv", "u,i,r", [(0, 0, 4), (0, 1, 5), (1, 0, 3)])
    argv = ["train", "--data", str(csv), "--user-col", "u", "--item-col", "i", "--rating-col", "r"]
    for form in (["--threshold", "-inf"], ["--threshold=-inf"], ["--threshold", "-Infinity"]):
        code, _, err = run_cli([*argv, *form], capsys)
        assert code == 2
        message = _one_line_error(err)
        assert "must be a finite number, got -inf" in message, message
        assert "leave out rating_col (--rating-col)" in message
    for value in ("nan", "-nan", "inf"):
        code, _, err = run_cli([*argv, "--threshold", value], capsys)
        assert code == 2
        message = _one_line_error(err)
        assert f"must be a finite number, got {value.lstrip('-')}: no rating is above" in message
    job = train_job_from_args(parse_args(build_parser(), [*argv, "--threshold", "-1e3"]))
    assert job.data.threshold == -1000.0


@pytest.mark.parametrize(
    ("argv", "unrecognized"),
    [
        (["train", "--threshold", "-1e3", "--bogus"], "--bogus"),
        (["train", "--epochs", "1", "-inf"], "-inf"),  # a stray number is still an error
        (["train", "-x", "--threshold", "-inf"], "-x"),
        (["evaluate", "b", "--ks", "5", "-1e3"], "-1e3"),
        (["recommend", "b", "1", "-x"], "-x"),
    ],
)
def test_unknown_options_and_stray_numbers_are_still_unrecognized(
    argv: list[str], unrecognized: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(build_parser(), argv)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {unrecognized}" in capsys.readouterr().err


def test_a_negative_number_is_an_item_id_of_recommend() -> None:
    args = parse_args(build_parser(), ["recommend", "b", "-inf", "-k", "3", "-1e3", "--json"])
    assert args.items == ["-inf", "-1e3"] and args.k == 3 and args.json


@pytest.mark.parametrize(
    ("argv", "items"),
    [
        (["-k", "3", "--", "5"], ["5"]),
        (["-k", "3", "--", "-x", "-5"], ["-x", "-5"]),
        (["1", "-k", "3", "--", "--json"], ["1", "--json"]),
        (["--", "-5"], ["-5"]),
    ],
)
def test_recommend_takes_every_token_after_dashes_as_an_item_id(
    argv: list[str], items: list[str]
) -> None:
    # "--" after an option was an unrecognized argument, and so was every option-like id after it.
    args = parse_args(build_parser(), ["recommend", "b", *argv])
    assert args.items == items and args.json is False


def test_recommend_still_refuses_an_unknown_option_before_dashes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(build_parser(), ["recommend", "b", "-k", "3", "--nope", "1", "--", "-x"])
    assert info.value.code == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_a_negative_number_is_not_read_as_a_short_option_and_its_value() -> None:
    # argparse's prefix matching reads "-inf" as "-i nf" in a parser with a "-i" option.
    from pipelines.cli import ArgumentParser

    parser = ArgumentParser(prog="t")
    parser.add_argument("-i")
    parser.add_argument("--threshold", type=float)
    args = parser.parse_args(["--threshold", "-inf", "-i", "x"])
    assert args.threshold == -math.inf and args.i == "x"
    assert parser.parse_args(["-ix"]).i == "x"  # a real short option keeps its glued value
