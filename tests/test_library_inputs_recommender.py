"""Regression tests for library inputs of ``Recommender`` and ``Interactions``.

Each test names the behaviour it pins: wrong-type ids are refused instead of being treated as
unknown, bundles are never overwritten unless they are bundles, data is validated and never
mutated, and ``version`` names the bundle's content.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recvae.data import DataError, Interactions, UnknownUserError
from recvae.recommender import BundleError, Recommender


@pytest.fixture(scope="module")
def rec(tiny_bundle: Path) -> Recommender:
    return Recommender.load(tiny_bundle)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _str_vocab(rec: Recommender) -> Recommender:
    """The same model with string ids (``"i10"`` for item 10, ``"u3"`` for user 3)."""
    return Recommender(
        rec.model,
        rec.config,
        np.asarray([f"i{i}" for i in rec.item_ids.tolist()], dtype=object),
        user_ids=np.asarray([f"u{u}" for u in rec.user_ids.tolist()], dtype=object),
        train_matrix=rec.train_matrix,
    )


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------ save / load
def test_save_overwrite_refuses_a_directory_that_is_not_a_bundle(
    rec: Recommender, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.ipynb").write_text("work")
    with pytest.raises(FileExistsError, match="not a recvae bundle.*nothing was changed"):
        rec.save(project, overwrite=True)
    assert (project / "notes.ipynb").read_text() == "work"
    assert _listing(project) == ["notes.ipynb"]
    assert _listing(tmp_path) == ["project"]  # no temporary directory left behind


def test_save_overwrite_refuses_a_directory_with_a_foreign_meta_json(
    rec: Recommender, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"name": "not a bundle"}))
    with pytest.raises(FileExistsError, match="not a recvae bundle"):
        rec.save(other, overwrite=True)
    assert _listing(other) == ["meta.json"]


def test_save_overwrite_refuses_a_file_before_writing_anything(
    rec: Recommender, tmp_path: Path
) -> None:
    target = tmp_path / "f.txt"
    target.write_text("x")
    version = rec.version
    with pytest.raises(FileExistsError, match="is a file"):
        rec.save(target, overwrite=True)
    assert target.read_text() == "x"
    assert _listing(tmp_path) == ["f.txt"]  # no hidden .f.txt.old, no temporary directory
    assert rec.version == version


def test_save_overwrite_replaces_a_bundle(rec: Recommender, tmp_path: Path) -> None:
    path = rec.save(tmp_path / "b")
    (path / "stale").write_text("from the old bundle")
    rec.save(path, overwrite=True)
    assert "stale" not in _listing(path)
    assert Recommender.load(path).version == rec.version
    assert _listing(tmp_path) == ["b"]


def test_bundle_directory_gets_the_umask_mode(
    rec: Recommender, tmp_path: Path, umask_022: None
) -> None:
    path = rec.save(tmp_path / "b")
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    for file in path.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name
    again = rec.save(path, overwrite=True)
    assert stat.S_IMODE(again.stat().st_mode) == 0o755


def test_save_and_load_expand_the_home_directory(
    rec: Recommender, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    saved = rec.save("~/models/b")
    assert saved == home / "models" / "b"
    assert (home / "models" / "b" / "meta.json").is_file()
    assert _listing(cwd) == []  # no literal "~" directory
    assert Recommender.load("~/models/b").version == rec.version
    assert Recommender.read_meta("~/models/b")["model_version"] == rec.version


@pytest.mark.parametrize(
    ("key", "value"),
    [("model_version", "fake"), ("n_items", 7), ("n_users", 1), ("model", "multdae")],
)
def test_edited_meta_json_is_refused_at_load(
    tiny_bundle: Path, tmp_path: Path, key: str, value: object
) -> None:
    edited = Path(shutil.copytree(tiny_bundle, tmp_path / "edited"))
    meta = json.loads((edited / "meta.json").read_text())
    assert meta[key] != value
    meta[key] = value
    (edited / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=f"corrupted: meta.json says {key}"):
        Recommender.load(edited)


def test_version_is_the_content_id_of_the_files(tiny_bundle: Path, tmp_path: Path) -> None:
    expected = Recommender.load(tiny_bundle).version
    bare = Path(shutil.copytree(tiny_bundle, tmp_path / "bare"))
    meta = json.loads((bare / "meta.json").read_text())
    del meta["model_version"]
    (bare / "meta.json").write_text(json.dumps(meta))
    assert Recommender.load(bare).version == expected


# ------------------------------------------------------------------ item ids
def test_str_history_is_a_type_error(rec: Recommender) -> None:
    with pytest.raises(TypeError, match=r"item_ids must be a sequence.*not a str.*\['10'\]"):
        rec.recommend_from_history("10", k=3)
    with pytest.raises(TypeError, match="not a bytes"):
        rec.recommend_from_history(b"10", k=3)
    with pytest.raises(TypeError, match="history 1 must be a sequence.*not a str"):
        rec.recommend_histories([[10], "20"], k=3)
    with pytest.raises(TypeError, match="item_ids must be a sequence of item ids, got int"):
        rec.recommend_from_history(10, k=3)  # type: ignore[arg-type]


def test_str_ids_for_an_int_vocabulary_are_a_value_error(rec: Recommender) -> None:
    ids = [str(i) for i in rec.item_ids[:3].tolist()]
    with pytest.raises(ValueError, match="item ids are str but this model's ids are int"):
        rec.recommend_from_history(ids, k=3)
    with pytest.raises(ValueError, match="item ids are str but this model's ids are int"):
        rec.recommend_histories([ids[:1], ids[1:]], k=3)
    with pytest.raises(ValueError, match="exclude: item ids are str"):
        rec.recommend_from_history(rec.item_ids[:2].tolist(), k=3, exclude=ids)


def test_int_ids_for_a_str_vocabulary_are_a_value_error(rec: Recommender) -> None:
    named = _str_vocab(rec)
    with pytest.raises(ValueError, match="item ids are int but this model's ids are str"):
        named.recommend_from_history(rec.item_ids[:3].tolist(), k=3)
    known = named.recommend_from_history(named.item_ids[:3].tolist(), k=3)
    assert known.unknown_items == ((),)


def test_unknown_ids_of_the_right_type_are_still_dropped_and_reported(
    rec: Recommender,
) -> None:
    out = rec.recommend_from_history([10**9, 10**9 + 1], k=3)
    assert out.unknown_items == ((10**9, 10**9 + 1),)
    mixed = rec.recommend_histories([[int(rec.item_ids[0]), "nope"], ["nope"]], k=3)
    assert mixed.unknown_items == (("nope",), ("nope",))


def test_tensor_and_zero_d_ids_are_read_as_their_values(rec: Recommender) -> None:
    ids = rec.item_ids[[0, 2, 4]].tolist()
    expected = rec.recommend_from_history(ids, k=5)
    for history in (
        torch.tensor(ids),
        [torch.tensor(i) for i in ids],
        [np.array(i) for i in ids],
        np.asarray(ids),
    ):
        out = rec.recommend_from_history(history, k=5)
        assert out.unknown_items == ((),)
        np.testing.assert_array_equal(out.item_idx, expected.item_idx)
        np.testing.assert_allclose(out.scores, expected.scores, rtol=1e-6)


def test_exclude_and_weights_need_one_row_per_history(rec: Recommender) -> None:
    ids = rec.item_ids.tolist()
    histories = [[ids[1], ids[2]], [ids[3]]]
    with pytest.raises(ValueError, match="exclude has 1 rows for 2 histories"):
        rec.recommend_histories(histories, k=2, exclude=[[ids[1]]])
    with pytest.raises(ValueError, match="exclude has 3 rows for 2 histories"):
        rec.recommend_histories(histories, k=2, exclude=[[ids[1]], [ids[2]], [ids[3]]])
    with pytest.raises(ValueError, match="weights has 1 rows for 2 histories"):
        rec.recommend_histories(histories, k=2, weights=[[1.0, 1.0]])
    with pytest.raises(ValueError, match="weights has 3 rows for 2 histories"):
        rec.recommend_histories(histories, k=2, weights=[[1.0, 1.0], [1.0], [5.0]])
    with pytest.raises(TypeError, match="weights must be a sequence of numbers"):
        rec.recommend_from_history(histories[1], k=2, weights=2.0)  # type: ignore[arg-type]


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("scale", [1e20, 1e39, 1e-30])
def test_extreme_history_weights_rank_like_unit_weights(rec: Recommender, scale: float) -> None:
    ids = rec.item_ids[[0, 2, 4]].tolist()
    expected = rec.recommend_from_history(ids, k=5)
    out = rec.recommend_from_history(ids, k=5, weights=[scale] * 3)
    np.testing.assert_array_equal(out.item_idx, expected.item_idx)
    np.testing.assert_allclose(out.scores, expected.scores, rtol=1e-5)


@pytest.mark.parametrize("value", [np.nan, np.inf, -1.0])
def test_score_encode_and_score_sampled_refuse_bad_values(rec: Recommender, value: float) -> None:
    bad = np.zeros((2, rec.n_items), dtype=np.float32)
    bad[1, 3] = value
    for histories in (bad, sp.csr_array(bad), torch.from_numpy(bad)):
        with pytest.raises(ValueError, match="finite and >= 0"):
            rec.score(histories)
        with pytest.raises(ValueError, match="finite and >= 0"):
            rec.encode(histories)
        with pytest.raises(ValueError, match="finite and >= 0"):
            rec.score_sampled(histories, seed=0)


def test_score_names_an_interactions_argument(rec: Recommender) -> None:
    with pytest.raises(TypeError, match="pass its matrix"):
        rec.score(rec.vocab)  # type: ignore[arg-type]


# ------------------------------------------------------------------ users
def test_a_single_user_id_is_one_user(rec: Recommender) -> None:
    user = rec.user_ids[3]
    expected = rec.recommend([user], k=4)
    for single in (user, int(user), np.int64(user), torch.tensor(int(user))):
        out = rec.recommend(single, k=4)
        np.testing.assert_array_equal(out.item_idx, expected.item_idx)
    named = _str_vocab(rec)
    one = named.recommend("u3", k=4)
    np.testing.assert_array_equal(one.item_idx, named.recommend(["u3"], k=4).item_idx)


def test_unknown_user_error_says_not_a_training_user_and_hints_at_the_type(
    rec: Recommender,
) -> None:
    user = str(rec.user_ids[3])
    with pytest.raises(UnknownUserError) as info:
        rec.recommend(user, k=4)
    message = str(info.value)
    assert "not a training user" in message
    assert "it is a str but the user ids are int" in message
    assert info.value.user_id == user and isinstance(info.value, KeyError)
    with pytest.raises(UnknownUserError) as missing:
        rec.recommend([10**9], k=4)
    assert "not a training user" in str(missing.value) and "str" not in str(missing.value)
    with pytest.raises(UnknownUserError, match="it is a int but the user ids are str"):
        _str_vocab(rec).recommend([3], k=4)


# ------------------------------------------------------------------ Interactions
@pytest.mark.parametrize("value", [-1.0, np.nan, np.inf])
def test_interactions_refuse_negative_and_non_finite_values(value: float) -> None:
    dense = np.array([[1, 0, 1], [0, 1, 2]], dtype=np.float32)
    dense[0, 2] = value
    with pytest.raises(DataError, match="negative|non-finite"):
        Interactions(sp.csr_array(dense), [1, 2], [10, 20, 30])
    with pytest.raises(DataError, match="negative|non-finite"):
        Interactions(dense, [1, 2], [10, 20, 30])  # type: ignore[arg-type]


def test_interactions_never_change_the_callers_matrix() -> None:
    data = np.array([1.0, 0.0, 1.0, 1.0], dtype=np.float32)
    indices = np.array([1, 0, 0, 0])
    indptr = np.array([0, 2, 4])
    matrix = sp.csr_array((data, indices, indptr), shape=(2, 2))
    built = Interactions(matrix, [1, 2], [10, 20])
    assert matrix.nnz == 4
    np.testing.assert_array_equal(matrix.data, [1.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(matrix.indices, [1, 0, 0, 0])
    np.testing.assert_array_equal(built.matrix.toarray(), [[0, 1], [1, 0]])
    weighted = sp.csr_matrix(np.array([[3.0, 0.0], [0.0, 0.5]], dtype=np.float32))
    Interactions(weighted, [1, 2], [10, 20])
    np.testing.assert_array_equal(weighted.data, [3.0, 0.5])


def test_interactions_with_no_users_or_no_items() -> None:
    no_users = Interactions(sp.csr_array((0, 3), dtype=np.float32), [], [1, 2, 3])
    assert (no_users.n_users, no_users.n_items) == (0, 3)
    no_items = Interactions(sp.csr_array((2, 0), dtype=np.float32), ["a", "b"], [])
    assert (no_items.n_users, no_items.n_items) == (2, 0)
    assert no_items.user_index("b") == 1


def test_interactions_name_the_id_argument_and_the_problem() -> None:
    matrix = sp.csr_array(np.eye(2, dtype=np.float32))
    with pytest.raises(DataError, match=r"item_ids must be integers or strings.*astype"):
        Interactions(matrix, [1, 2], [1.5, 2.0])
    with pytest.raises(DataError, match="user_ids contains NaN"):
        Interactions(matrix, [1.0, np.nan], [1, 2])


def test_from_polars_names_a_pandas_frame_and_the_fix() -> None:
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"user_id": [1, 2], "item_id": [3, 4]})
    with pytest.raises(DataError, match=r"got a pandas DataFrame.*polars.from_pandas\(df\)"):
        Interactions.from_polars(frame)


def test_exploration_and_calibration_seeds_are_checked_up_front() -> None:
    import recvae

    data = recvae.load_dataset("ml-latest-small")
    split = recvae.split_users(data, n_heldout=60, seed=1)
    config = recvae.MultVAEConfig(epochs=1, latent_dim=8, hidden_dims=(16,))
    rec = recvae.train(split.train, config, options=recvae.RunOptions(device="cpu", progress=False))
    for seed in (-1, 2**70, 1.5, "x"):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
            rec.recommend_from_history([1, 50], k=3, explore=True, seed=seed)
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
            rec.calibrate_anomalies(split.test.fold_in.matrix, seed=seed)


def test_anomalous_users_refuses_item_ids_of_the_other_type() -> None:
    import numpy as np

    import recvae

    data = recvae.load_dataset("ml-latest-small")
    split = recvae.split_users(data, n_heldout=60, seed=1)
    config = recvae.MultVAEConfig(epochs=1, latent_dim=8, hidden_dims=(16,))
    rec = recvae.train(split.train, config, options=recvae.RunOptions(device="cpu", progress=False))
    held = split.test.fold_in
    as_text = recvae.Interactions(
        held.matrix, held.user_ids, held.item_ids.astype(str).astype(object)
    )
    with pytest.raises(ValueError, match="the data's item ids are str but the model's are int"):
        recvae.anomalous_users(rec, as_text, 50)
    assert recvae.anomalous_users(rec, held, 50).dtype == np.bool_


# ------------------------------------------------------------------ weights float32 cannot hold
@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-30])
def test_a_matrix_of_huge_or_tiny_weights_scores_as_its_direction(
    rec: Recommender, scale: float
) -> None:
    """Only relative weights matter (the encoder L2-normalizes a history). A matrix of weights
    near 1e20 overflowed float32's squares, and one near 1e-30 underflowed them, so the model
    saw an empty history; lists of ids with weights were already rescaled."""
    users = rec.user_ids[:4].tolist()
    binary = sp.csr_array(rec.train_matrix[[rec.vocab.user_index(u) for u in users]])
    expected = rec.score(binary)
    scaled = sp.csr_array(binary * scale, dtype=np.float64)
    for histories in (scaled, scaled.toarray(), torch.from_numpy(scaled.toarray())):
        torch.testing.assert_close(rec.score(histories), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rec.confidence(scaled), rec.confidence(binary), rtol=1e-5)
    # The caller's matrix is left as it was.
    assert scaled.data.max() == pytest.approx(scale)


def test_a_stored_zero_is_no_history_item(rec: Recommender) -> None:
    history = rec.user_history(rec.user_ids[0])
    positions = [rec.vocab.item_index(i) for i in history.tolist()]
    row = np.zeros(len(positions) + 1, dtype=np.int64)
    cols = np.asarray([*positions, (max(positions) + 1) % rec.n_items])
    vals = np.asarray([1.0] * len(positions) + [0.0])  # a stored zero at the end
    with_zero = sp.csr_array((vals, (row, cols)), shape=(1, rec.n_items))
    plain = sp.csr_array((vals[:-1], (row[:-1], cols[:-1])), shape=(1, rec.n_items))
    with_zero_scores = rec.anomaly_scores(with_zero)
    assert with_zero_scores.history_lengths.tolist() == [len(positions)]
    np.testing.assert_allclose(with_zero_scores.scores, rec.anomaly_scores(plain).scores)
