"""Audit of the data preparation: ids, invariants, fingerprint, bad arguments, real datasets.

The real-data tests compare ``load_dataset`` with an independent NumPy reimplementation of
PROTOCOL.md steps 1-2 (``rating > 3.5``, duplicates collapse, users with >= 5 distinct
positives, no item filter), reading the files without recvae's readers.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from numpy.typing import NDArray

from recvae.data import (
    DataError,
    Interactions,
    interactions_from_frame,
    load_dataset,
    load_interactions,
)
from recvae.data.datasets import load_dataset_frame

SHARED_DATA = Path(
    os.environ.get("RECVAE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


def needs_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path} (../shared/data next to the repo)")
    return path


def _binary(n_users: int = 2, n_items: int = 3) -> sp.csr_array:
    dense = np.zeros((n_users, n_items), dtype=np.float32)
    dense[0, 0] = dense[-1, -1] = 1.0
    return sp.csr_array(dense)


def _assert_invariants(data: Interactions) -> None:
    m = data.matrix
    assert isinstance(m, sp.csr_array) and m.dtype == np.float32
    assert m.shape == (len(data.user_ids), len(data.item_ids))
    assert np.all(m.data == 1.0)  # binary, no explicit zeros
    for row in range(m.shape[0]):
        cols = m.indices[m.indptr[row] : m.indptr[row + 1]]
        assert np.all(np.diff(cols) > 0)  # sorted, no duplicates
    assert m.has_canonical_format


# ============================================================================ ids
def test_object_array_of_int_ids_stays_int64() -> None:
    # They used to become the strings "7" and "3": user_index(7) then failed.
    ids = np.asarray([7, np.int64(3)], dtype=object)
    data = Interactions(_binary(), ids, np.asarray([10, 20, 30], dtype=object))
    assert data.user_ids.dtype == np.int64 and data.user_ids.tolist() == [7, 3]
    assert data.item_ids.dtype == np.int64
    assert data.user_index(7) == 0 and data.item_index(30) == 2


def test_string_ids_still_become_python_strings() -> None:
    data = Interactions(_binary(), np.asarray(["b", np.str_("a")], dtype=object), ["x", "y", "z"])
    assert data.user_ids.dtype == object
    assert [type(v) for v in data.user_ids] == [str, str]


@pytest.mark.parametrize("missing", [None, float("nan"), np.float64("nan")])
def test_missing_id_in_an_object_array_is_refused(missing: object) -> None:
    # None used to become the user "None" and NaN the user "nan".
    with pytest.raises(DataError, match="user_ids contains a missing id"):
        Interactions(_binary(), np.asarray([missing, "x"], dtype=object), [1, 2, 3])


@pytest.mark.parametrize("value", [True, 1.5, b"raw", (1, 2)])
def test_non_id_objects_are_refused(value: object) -> None:
    ids = np.empty(2, dtype=object)
    ids[0], ids[1] = value, "x"
    with pytest.raises(DataError, match="item_ids must hold ints or strings"):
        Interactions(_binary(3, 2), [1, 2, 3], ids)


def test_unsigned_ids_beyond_int64_are_refused_not_wrapped() -> None:
    # 2**63 used to wrap around to -9223372036854775808.
    ids = np.asarray([2**63, 1], dtype=np.uint64)
    with pytest.raises(DataError, match="above the int64 range"):
        Interactions(_binary(), ids, [1, 2, 3])
    ok = Interactions(_binary(), np.asarray([2**63 - 1, 1], dtype=np.uint64), [1, 2, 3])
    assert ok.user_ids.tolist() == [2**63 - 1, 1]


def test_from_pairs_refuses_float_positions() -> None:
    # 0.7 used to be truncated to position 0.
    with pytest.raises(DataError, match="user_idx must hold integer positions"):
        Interactions.from_pairs(np.array([0.7]), np.array([0]), n_users=2, n_items=2)
    data = Interactions.from_pairs(np.array([1, 1, 0]), np.array([0, 0, 1]), n_users=2, n_items=2)
    np.testing.assert_array_equal(data.matrix.toarray(), [[0, 1], [1, 0]])


# ============================================================================ invariants
def test_positive_values_too_small_for_float32_stay_interactions() -> None:
    # 1e-50 is a positive weight; the float32 cast used to turn it into a zero, then drop it.
    matrix = sp.csr_array(np.array([[1e-50, 0.0, 2.0]]))
    data = Interactions(matrix, [1], [1, 2, 3])
    np.testing.assert_array_equal(data.matrix.toarray(), [[1, 0, 1]])


def test_duplicates_whose_integer_sum_wraps_to_zero_stay_interactions() -> None:
    # Two uint8 entries of 128 sum to 0 in uint8: summing must not happen in the input dtype.
    data = np.array([128, 128, 1], dtype=np.uint8)
    indices = np.array([0, 0, 1], dtype=np.int32)
    matrix = sp.csr_array((data, indices, np.array([0, 3])), shape=(1, 2))
    result = Interactions(matrix, [1], [1, 2])
    np.testing.assert_array_equal(result.matrix.toarray(), [[1, 1]])
    _assert_invariants(result)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64, np.uint8, np.bool_])
def test_messy_matrices_are_normalized_and_the_input_left_alone(dtype: type) -> None:
    rng = np.random.default_rng(5)
    n_users, n_items, n = 40, 30, 400
    rows = np.sort(rng.integers(0, n_users, n))
    cols = rng.integers(0, n_items, n)  # unsorted within rows, with duplicates
    values = rng.integers(0, 3, n).astype(dtype)  # explicit zeros too
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_users))])
    matrix = sp.csr_array((values, cols, indptr), shape=(n_users, n_items))
    before = (matrix.data.copy(), matrix.indices.copy(), matrix.indptr.copy())
    data = Interactions(matrix, np.arange(n_users), np.arange(n_items))
    _assert_invariants(data)
    expected = np.zeros((n_users, n_items), dtype=bool)
    for r, c, v in zip(rows, cols, values, strict=True):
        expected[r, c] |= bool(v)
    np.testing.assert_array_equal(data.matrix.toarray(), expected.astype(np.float32))
    for kept, now in zip(before, (matrix.data, matrix.indices, matrix.indptr), strict=True):
        np.testing.assert_array_equal(kept, now)


# ============================================================================ fingerprint
def test_fingerprint_tells_int_ids_from_string_ids() -> None:
    # Same matrix, ids 1, 2 versus "1", "2": lookups differ, the fingerprints used not to.
    ints = Interactions(_binary(), [1, 2], [5, 6, 7])
    strings = Interactions(_binary(), ["1", "2"], ["5", "6", "7"])
    assert ints.fingerprint() != strings.fingerprint()


def test_fingerprint_has_no_separator_collisions() -> None:
    first = Interactions(_binary(), ["a\x1fb", "c"], ["x", "y", "z"])
    second = Interactions(_binary(), ["a", "b\x1fc"], ["x", "y", "z"])
    assert first.fingerprint() != second.fingerprint()
    third = Interactions(_binary(), ["a", "b"], ["x\x1ey", "z", "w"])
    fourth = Interactions(_binary(), ["a", "b\x1ex"], ["y", "z", "w"])
    assert third.fingerprint() != fourth.fingerprint()


def test_fingerprint_of_ordinary_vocabularies_is_unchanged() -> None:
    # Values computed with the fingerprint before the audit: recorded runs and studies stay valid.
    matrix = sp.csr_array(np.array([[1, 0, 1], [0, 1, 0]], dtype=np.float32))
    ints = Interactions(matrix, [7, 3], [10, 20, 30])
    strings = Interactions(matrix, ["b", "a"], ["x", "y", "z"])
    assert ints.fingerprint() == "9fb748175c6908e2340a52224580576916f101ec9b5b18025e2aecd6a3d93faf"
    assert (
        strings.fingerprint() == "b8373d9ecb463252554dc06bb23ed534ddbe96656701c5998b531fe938b2b7a2"
    )


def test_fingerprint_ignores_representation_but_not_order() -> None:
    dense = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=np.float32)
    base = Interactions(sp.csr_array(dense), [1, 2, 3], [10, 20, 30, 40])
    wide = sp.csr_array(dense * 3)
    wide.indices = wide.indices.astype(np.int64)
    wide.indptr = wide.indptr.astype(np.int64)
    coo = sp.coo_array(dense.astype(np.float64))
    for other in (wide, coo, sp.csr_matrix(dense)):
        assert Interactions(other, [1, 2, 3], [10, 20, 30, 40]).fingerprint() == base.fingerprint()
    permuted = base.subset_items(np.array([1, 0, 2, 3]))
    assert permuted.fingerprint() != base.fingerprint()
    assert base.subset_users(np.array([1, 0, 2])).fingerprint() != base.fingerprint()
    relabelled = Interactions(sp.csr_array(dense), [1, 2, 3], [10, 20, 30, 41])
    assert relabelled.fingerprint() != base.fingerprint()
    moved = dense.copy()
    moved[0, 0], moved[0, 1] = 0, 1
    assert Interactions(sp.csr_array(moved), [1, 2, 3], [10, 20, 30, 40]).fingerprint() != (
        base.fingerprint()
    )


# ============================================================================ duplicates
def test_duplicate_pairs_any_positive_row_decides_whatever_the_row_order() -> None:
    df = pl.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 2, 2, 3, 3],
            "item_id": [10, 10, 20, 10, 10, 30, 20, 20],
            "rating": [5.0, 1.0, 4.0, 1.0, 5.0, 3.5, 2.0, 3.0],
        }
    )
    data = Interactions.from_polars(df, rating_col="rating")
    assert data.user_ids.tolist() == [1, 2] and data.item_ids.tolist() == [10, 20]
    np.testing.assert_array_equal(data.matrix.toarray(), [[1, 1], [1, 0]])
    rng = np.random.default_rng(0)
    for _ in range(5):
        shuffled = df[rng.permutation(df.height).tolist()]
        assert Interactions.from_polars(shuffled, rating_col="rating").fingerprint() == (
            data.fingerprint()
        )


# ============================================================================ bad arguments
@pytest.mark.parametrize("count", [True, 2.5, "5", None, -1])
def test_load_dataset_refuses_bad_min_user_count_naming_it(count: object) -> None:
    # True and 2.5 used to be accepted, "5" and None raised a bare TypeError.
    with pytest.raises(ValueError, match="min_user_count"):
        load_dataset("ml-latest-small", min_user_count=count)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["min_user_count", "min_item_count"])
@pytest.mark.parametrize("count", [True, 1.5, "2", -1])
def test_from_polars_refuses_bad_min_counts_naming_them(field: str, count: object) -> None:
    df = pl.DataFrame({"user_id": [1, 2], "item_id": [1, 1]})
    with pytest.raises(ValueError, match=field):
        Interactions.from_polars(df, threshold=None, **{field: count})  # type: ignore[arg-type]


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), "3", True])
def test_from_polars_refuses_a_threshold_that_is_not_a_finite_number(threshold: object) -> None:
    # A string threshold used to be compared by polars; NaN blamed the data.
    df = pl.DataFrame({"user_id": [1, 2], "item_id": [1, 1], "rating": [4.0, 5.0]})
    with pytest.raises(ValueError, match="threshold must be a finite number or None"):
        Interactions.from_polars(df, rating_col="rating", threshold=threshold)  # type: ignore[arg-type]


def test_min_counts_of_zero_and_one_keep_everything() -> None:
    df = pl.DataFrame({"user_id": [1, 2, 2], "item_id": [1, 1, 2]})
    zero = Interactions.from_polars(df, threshold=None, min_user_count=0, min_item_count=0)
    one = Interactions.from_polars(df, threshold=None, min_user_count=1, min_item_count=1)
    assert zero.fingerprint() == one.fingerprint() and zero.nnz == 3


def test_filters_that_empty_the_data_are_value_errors_naming_them() -> None:
    df = pl.DataFrame({"user_id": [1, 2, 2], "item_id": [1, 1, 2], "rating": [3.5, 2.0, 1.0]})
    with pytest.raises(ValueError, match=r"no rows have rating > 3.5"):
        Interactions.from_polars(df, rating_col="rating")
    with pytest.raises(ValueError, match="min_user_count=3 removed every user"):
        Interactions.from_polars(df, threshold=None, min_user_count=3)
    with pytest.raises(ValueError, match="min_item_count=3 removed every item"):
        Interactions.from_polars(df, threshold=None, min_item_count=3)
    with pytest.raises(ValueError, match="min_user_count=10000 removed every user"):
        load_dataset("ml-latest-small", min_user_count=10_000)


# ============================================================================ real data
def _protocol_pairs(
    users: NDArray[np.int64],
    items: NDArray[np.int64],
    ratings: NDArray[np.float64] | None,
    min_user_count: int = 5,
) -> NDArray[np.int64]:
    """PROTOCOL.md steps 1-2 in NumPy: sorted unique (user, item) positives of kept users."""
    if ratings is not None:
        keep = ratings > 3.5
        users, items = users[keep], items[keep]
    pairs = np.unique(np.stack([users, items], axis=1), axis=0)
    user_values, counts = np.unique(pairs[:, 0], return_counts=True)
    return pairs[np.isin(pairs[:, 0], user_values[counts >= min_user_count])]


def _check_against_reference(data: Interactions, pairs: NDArray[np.int64]) -> None:
    _assert_invariants(data)
    assert data.user_ids.dtype == np.int64 and data.item_ids.dtype == np.int64
    np.testing.assert_array_equal(data.user_ids, np.unique(pairs[:, 0]))
    np.testing.assert_array_equal(data.item_ids, np.unique(pairs[:, 1]))
    coo = data.matrix.tocoo()
    got = np.stack([data.user_ids[coo.row], data.item_ids[coo.col]], axis=1)
    got = got[np.lexsort((got[:, 1], got[:, 0]))]
    np.testing.assert_array_equal(got, pairs)


# Fingerprints of the protocol data (unchanged by this audit; a change means the data moved).
FINGERPRINTS = {
    "ml-100k": "6a10ffa1dd618a114e6765ec7256500b04dbfe84baf668eeeeb4736718874bd9",
    "lastfm": "d8b5a03382c3f4e4671b963e5374454b322109cf519f8e896d2a57a851c0adb0",
    "ml-latest-small": "1b96f1d87dc55994aece7f708cb1d184bc8dd2c3df61323c48732e4223529bf8",
    "ml-1m": "7e969acbd87ab507bed2274cbab74bc9e1ca771b65f0c3b7739aa3c1d576cab8",
    "gowalla": "b6e0116f2d29c59c14531fcd281aee046220ebc07db62b636dc1e9e7796d5875",
}


def _raw_counts(frame: pl.DataFrame) -> tuple[int, int, int]:
    return frame.height, frame["user_id"].n_unique(), frame["item_id"].n_unique()


def test_real_ml100k_matches_reference_and_provenance() -> None:
    folder = needs_shared("ml-100k")
    raw = np.loadtxt(folder / "u.data", dtype=np.int64)
    assert raw.shape == (100_000, 4)  # PROVENANCE: 100,000 rows
    assert _raw_counts(load_dataset_frame("ml-100k", folder)) == (100_000, 943, 1682)
    data = load_dataset("ml-100k", folder)
    _check_against_reference(data, _protocol_pairs(raw[:, 0], raw[:, 1], raw[:, 2] * 1.0))
    assert (data.n_users, data.n_items, data.nnz) == (938, 1447, 55_361)
    assert data.fingerprint() == FINGERPRINTS["ml-100k"]


def test_real_lastfm_matches_reference_and_provenance() -> None:
    folder = needs_shared("lastfm-hetrec2011")
    raw = np.loadtxt(folder / "user_artists.dat", dtype=np.int64, skiprows=1)
    assert raw.shape == (92_834, 3)
    assert _raw_counts(load_dataset_frame("lastfm", folder)) == (92_834, 1892, 17_632)
    data = load_dataset("lastfm", folder)
    _check_against_reference(data, _protocol_pairs(raw[:, 0], raw[:, 1], None))
    assert (data.n_users, data.n_items, data.nnz) == (1877, 17_617, 92_801)
    assert data.fingerprint() == FINGERPRINTS["lastfm"]


def test_real_ml_latest_small_matches_reference_and_provenance() -> None:
    folder = needs_shared("ml-latest-small")
    with zipfile.ZipFile(folder / "ml-latest-small.zip") as archive:
        text = archive.read("ml-latest-small/ratings.csv")
    raw = np.loadtxt(io.BytesIO(text), delimiter=",", skiprows=1)
    assert raw.shape == (100_836, 4)
    users, items = raw[:, 0].astype(np.int64), raw[:, 1].astype(np.int64)
    assert _raw_counts(load_dataset_frame("ml-latest-small", folder)) == (100_836, 610, 9724)
    pairs = _protocol_pairs(users, items, raw[:, 2])
    for data in (load_dataset("ml-latest-small", folder), load_dataset("ml-latest-small")):
        _check_against_reference(data, pairs)
        assert (data.n_users, data.n_items, data.nnz) == (603, 6298, 48_562)
        assert data.fingerprint() == FINGERPRINTS["ml-latest-small"]


@pytest.mark.slow
def test_real_ml1m_matches_reference_and_provenance() -> None:
    folder = needs_shared("ml-1m")
    with gzip.open(folder / "ratings.csv.gz", "rb") as handle:
        raw = np.loadtxt(handle, delimiter=",", skiprows=1, dtype=np.int64)
    assert raw.shape == (1_000_209, 3)
    assert _raw_counts(load_dataset_frame("ml-1m", folder)) == (1_000_209, 6040, 3706)
    data = load_dataset("ml-1m", folder)
    _check_against_reference(data, _protocol_pairs(raw[:, 0], raw[:, 1], raw[:, 2] * 1.0))
    assert (data.n_users, data.n_items, data.nnz) == (6034, 3533, 575_272)
    assert data.fingerprint() == FINGERPRINTS["ml-1m"]


@pytest.mark.slow
def test_real_gowalla_matches_reference_and_provenance() -> None:
    folder = needs_shared("gowalla-lightgcn")
    users: list[NDArray[np.int64]] = []
    items: list[NDArray[np.int64]] = []
    for part in ("train", "valid", "test"):
        for line in (folder / f"{part}.txt").read_text().splitlines():
            ids = np.asarray(line.split(), dtype=np.int64)
            users.append(np.full(len(ids) - 1, ids[0]))
            items.append(ids[1:])
    pairs = _protocol_pairs(np.concatenate(users), np.concatenate(items), None)
    # PROVENANCE: 29,858 users, 40,981 items, 1,027,370 unique pairs, 10-core (no user dropped).
    assert _raw_counts(load_dataset_frame("gowalla", folder)) == (1_027_370, 29_858, 40_981)
    data = load_dataset("gowalla", folder)
    _check_against_reference(data, pairs)
    assert (data.n_users, data.n_items, data.nnz) == (29_858, 40_981, 1_027_370)
    assert data.fingerprint() == FINGERPRINTS["gowalla"]


@pytest.mark.slow
def test_real_fingerprints_do_not_depend_on_polars_threads() -> None:
    needs_shared("ml-100k")
    code = (
        "from recvae.data import load_dataset; import sys\n"
        "for name in ('ml-100k', 'lastfm', 'ml-latest-small'):\n"
        "    print(load_dataset(name, sys.argv[1]).fingerprint())\n"
    )
    expected = [FINGERPRINTS[name] for name in ("ml-100k", "lastfm", "ml-latest-small")]
    for threads in ("1", "2"):
        env = {**os.environ, "POLARS_MAX_THREADS": threads, "MLFLOW_DISABLE_TELEMETRY": "true"}
        result = subprocess.run(
            [sys.executable, "-c", code, str(SHARED_DATA)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.split() == expected


def test_dataset_frame_is_raw_and_string_ids_sort_like_python() -> None:
    rng = np.random.default_rng(2)
    alphabet = list("aZ09_ -é€😀ß")
    users = ["".join(rng.choice(alphabet, int(rng.integers(1, 4)))) for _ in range(2000)]
    items = ["".join(rng.choice(alphabet, int(rng.integers(1, 4)))) for _ in range(2000)]
    data = interactions_from_frame(pl.DataFrame({"user_id": users, "item_id": items}))
    assert data.user_ids.tolist() == sorted(set(users))
    assert data.item_ids.tolist() == sorted(set(items))
    coo = data.matrix.tocoo()
    got = sorted(zip(data.user_ids[coo.row].tolist(), data.item_ids[coo.col].tolist(), strict=True))
    assert got == sorted(set(zip(users, items, strict=True)))
    _assert_invariants(data)


def test_a_frames_ids_follow_the_rules_of_a_files_ids() -> None:
    # A frame with UInt64 ids beyond int64, or float ids beyond 2**53, failed with polars'
    # InvalidOperationError (not a ValueError); a file's ids were kept as text / refused.
    big = pl.DataFrame({"u": pl.Series([2**63 + 5, 1], dtype=pl.UInt64), "i": [1, 2]})
    data = Interactions.from_polars(big, user_col="u", item_col="i", min_user_count=1)
    assert sorted(data.user_ids.tolist()) == ["1", str(2**63 + 5)]
    floats = pl.DataFrame({"u": [1e19, 1.0], "i": [1, 2]})
    with pytest.raises(DataError, match=r"float ids above 2\*\*53"):
        Interactions.from_polars(floats, user_col="u", item_col="i", min_user_count=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_user_count": True},
        {"min_item_count": 2.5},
        {"threshold": "3"},
        {"threshold": math.nan},
    ],
)
def test_load_interactions_checks_its_filter_arguments(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,rating\n1,1,5\n1,2,4\n")
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        load_interactions(path, rating_col="rating", **kwargs)
