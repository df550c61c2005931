"""Tests of recvae.data: readers, the dataset registry and the synthetic generators."""

from __future__ import annotations

import csv
import gzip
import io
import os
import time
import zipfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recvae.data import (
    SYNTHETIC_SHAPES,
    DataError,
    DataFileNotFound,
    DatasetSpec,
    Interactions,
    get_dataset_spec,
    interactions_from_frame,
    list_datasets,
    load_dataset,
    load_dataset_frame,
    load_interactions,
    planted_interactions,
    read_frame,
    read_ml1m,
    read_ml100k,
    read_movielens_csv,
    synthetic_interactions,
)
from recvae.data.synthetic import _sample_by_gumbel, _sample_by_rejection

# ../shared/data next to the repository (RECVAE_SHARED_DATA overrides it, as in conftest.py).
SHARED_DATA = Path(
    os.environ.get("RECVAE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
BUNDLED_ZIP = Path(__file__).resolve().parents[1] / "recvae/data/bundled/ml-latest-small.zip"


# ============================================================================ helpers
def dense(data: Interactions) -> np.ndarray:
    return data.matrix.toarray()


def protocol_counts(pairs: Iterable[tuple[str, str]], min_user_count: int = 5) -> tuple[int, ...]:
    """(users, items, positives) after dedup and the min-user filter, in plain Python."""
    by_user: dict[str, set[str]] = defaultdict(set)
    for user, item in pairs:
        by_user[user].add(item)
    kept = {u: s for u, s in by_user.items() if len(s) >= min_user_count}
    items = set().union(*kept.values()) if kept else set()
    return len(kept), len(items), sum(len(s) for s in kept.values())


def shape_of(data: Interactions) -> tuple[int, int, int]:
    return data.n_users, data.n_items, data.nnz


def needs_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path} (../shared/data next to the repo)")
    return path


@pytest.fixture
def ratings_df() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user": [3, 3, 1, 1, 1, 2, 2, 3],
            "item": [20, 10, 10, 30, 30, 20, 30, 40],
            "stars": [5.0, 4.0, 3.5, 4.5, 1.0, 2.0, 5.0, 3.0],
        }
    )


# ==================================================================== interactions_from_frame
def test_int_ids_sorted_vocab_and_matrix(ratings_df: pl.DataFrame) -> None:
    data = interactions_from_frame(ratings_df, user_col="user", item_col="item", threshold=None)
    assert data.user_ids.tolist() == [1, 2, 3]
    assert data.item_ids.tolist() == [10, 20, 30, 40]
    assert data.user_ids.dtype == np.int64 and data.item_ids.dtype == np.int64
    expected = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 1]], dtype=np.float32)
    np.testing.assert_array_equal(dense(data), expected)
    assert data.matrix.dtype == np.float32 and data.matrix.has_sorted_indices


def test_threshold_is_strict(ratings_df: pl.DataFrame) -> None:
    data = interactions_from_frame(
        ratings_df, user_col="user", item_col="item", rating_col="stars", threshold=3.5
    )
    # Kept: (3,20) 5.0, (3,10) 4.0, (1,30) 4.5, (2,30) 5.0; 3.5 itself is not a positive.
    assert data.user_ids.tolist() == [1, 2, 3]
    assert data.item_ids.tolist() == [10, 20, 30]
    np.testing.assert_array_equal(dense(data), [[0, 0, 1], [0, 0, 1], [1, 1, 0]])


def test_duplicates_collapse_and_any_positive_row_counts(ratings_df: pl.DataFrame) -> None:
    # (1, 30) appears twice, once at 4.5 and once at 1.0: it stays a single positive.
    data = interactions_from_frame(ratings_df, user_col="user", item_col="item", rating_col="stars")
    assert data.nnz == 4
    assert data.matrix[[data.user_index(1)], :].sum() == 1
    implicit = interactions_from_frame(ratings_df, user_col="user", item_col="item")
    assert implicit.nnz == 7  # 8 rows, one duplicate pair


def test_threshold_none_keeps_every_row_even_with_rating(ratings_df: pl.DataFrame) -> None:
    data = interactions_from_frame(
        ratings_df, user_col="user", item_col="item", rating_col="stars", threshold=None
    )
    assert data.nnz == 7


def test_string_ids_stay_strings() -> None:
    df = pl.DataFrame({"user_id": ["bob", "alice", "bob"], "item_id": ["x", "z", "y"]})
    data = interactions_from_frame(df)
    assert data.user_ids.tolist() == ["alice", "bob"]
    assert data.item_ids.tolist() == ["x", "y", "z"]
    assert all(type(v) is str for v in data.user_ids)
    np.testing.assert_array_equal(dense(data), [[0, 0, 1], [1, 1, 0]])
    assert data.user_index("bob") == 1


def test_categorical_and_integral_float_ids() -> None:
    df = pl.DataFrame({"user_id": ["b", "a"], "item_id": [2.0, 1.0]}).with_columns(
        pl.col("user_id").cast(pl.Categorical)
    )
    data = interactions_from_frame(df)
    assert data.user_ids.tolist() == ["a", "b"]
    assert data.item_ids.tolist() == [1, 2] and data.item_ids.dtype == np.int64


def test_string_ratings_are_parsed() -> None:
    df = pl.DataFrame({"user_id": [1, 2], "item_id": [1, 1], "rating": ["4.5", " 2"]})
    data = interactions_from_frame(df, rating_col="rating")
    assert data.user_ids.tolist() == [1]


def test_item_filter_runs_before_user_filter() -> None:
    # Item 9 has one positive; dropping it leaves user 2 with 1 positive, below 2.
    df = pl.DataFrame(
        {"user_id": [1, 1, 2, 2, 3, 3], "item_id": [5, 6, 5, 9, 5, 6]},
    )
    data = interactions_from_frame(df, min_item_count=2, min_user_count=2)
    assert data.user_ids.tolist() == [1, 3]
    assert data.item_ids.tolist() == [5, 6]
    only_users = interactions_from_frame(df, min_user_count=2)
    assert only_users.user_ids.tolist() == [1, 2, 3] and 9 in only_users.item_ids.tolist()


def test_min_user_count_counts_distinct_positives() -> None:
    df = pl.DataFrame({"user_id": [1, 1, 1, 2, 2, 2], "item_id": [1, 1, 1, 1, 2, 3]})
    data = interactions_from_frame(df, min_user_count=3)
    assert data.user_ids.tolist() == [2]


def test_lazy_frame_and_from_polars(ratings_df: pl.DataFrame) -> None:
    lazy = interactions_from_frame(ratings_df.lazy(), user_col="user", item_col="item")
    eager = Interactions.from_polars(ratings_df, user_col="user", item_col="item", threshold=None)
    assert lazy.fingerprint() == eager.fingerprint()


def test_vectorized_build_matches_reference_on_random_frame() -> None:
    rng = np.random.default_rng(3)
    users = rng.integers(0, 300, 5000)
    items = rng.integers(0, 80, 5000) * 7
    ratings = rng.integers(1, 6, 5000).astype(float)
    df = pl.DataFrame({"user_id": users, "item_id": items, "rating": ratings})
    data = interactions_from_frame(df, rating_col="rating", min_user_count=3)
    pairs = [(u, i) for u, i, r in zip(users, items, ratings, strict=True) if r > 3.5]
    by_user: dict[int, set[int]] = defaultdict(set)
    for u, i in pairs:
        by_user[int(u)].add(int(i))
    kept = {u: s for u, s in by_user.items() if len(s) >= 3}
    assert data.user_ids.tolist() == sorted(kept)
    assert data.item_ids.tolist() == sorted(set().union(*kept.values()))
    for user, items_of_user in kept.items():
        row = data.history(data.user_index(user))
        assert sorted(data.item_ids[row].tolist()) == sorted(items_of_user)


# ---------------------------------------------------------------------------- errors
def test_missing_column_names_it_and_lists_available(ratings_df: pl.DataFrame) -> None:
    with pytest.raises(DataError, match=r"'user_id'.*available columns.*'user', 'item', 'stars'"):
        interactions_from_frame(ratings_df)
    with pytest.raises(DataError, match="'score'"):
        interactions_from_frame(ratings_df, user_col="user", item_col="item", rating_col="score")


def test_null_ids_name_column_and_count() -> None:
    df = pl.DataFrame({"user_id": [1, None, None], "item_id": [1, 2, 3]})
    with pytest.raises(DataError, match=r"'user_id' has 2 null"):
        interactions_from_frame(df)


def test_unparsable_rating_names_column_and_example() -> None:
    df = pl.DataFrame({"user_id": [1, 2], "item_id": [1, 1], "stars": ["4", "five"]})
    with pytest.raises(DataError, match=r"'stars'.*not numbers.*'five'"):
        interactions_from_frame(df, rating_col="stars")


def test_unparsable_rating_in_a_file_names_the_files_column(tmp_path: Path) -> None:
    # The reader renames the column to "rating"; the error must still name the user's column.
    path = tmp_path / "bad.csv"
    path.write_text("u,i,r\n1,2,abc\n1,3,4\n")
    with pytest.raises(DataError, match=r"rating column 'r' has 1 value\(s\).*'abc'"):
        load_interactions(path, user_col="u", item_col="i", rating_col="r")
    with pytest.raises(DataError, match=r"rating column 2 has 1 value\(s\)"):
        load_interactions(path, user_col=0, item_col=1, rating_col=2)
    path.write_text("u,i,r\n1,2, 4.5\n1,3,4\n")
    frame = read_frame(path, user_col="u", item_col="i", rating_col="r")
    assert frame["rating"].to_list() == [4.5, 4.0]


def test_nan_and_null_ratings_are_errors() -> None:
    # polars orders NaN above every number, so NaN would silently pass "rating > 3.5".
    df = pl.DataFrame({"user_id": [1, 2], "item_id": [1, 1], "rating": [4.0, float("nan")]})
    with pytest.raises(DataError, match=r"'rating' has 1 NaN"):
        interactions_from_frame(df, rating_col="rating")
    df = pl.DataFrame({"user_id": [1, 2], "item_id": [1, 1], "rating": [4.0, None]})
    with pytest.raises(DataError, match=r"'rating' has 1 null"):
        interactions_from_frame(df, rating_col="rating")


def test_bad_id_types_are_errors() -> None:
    df = pl.DataFrame({"user_id": [1.5, 2.0], "item_id": [1, 1]})
    with pytest.raises(DataError, match="'user_id' holds non-integer floats"):
        interactions_from_frame(df)
    df = pl.DataFrame({"user_id": [1, 2], "item_id": [True, False]})
    with pytest.raises(DataError, match="'item_id' has type Boolean"):
        interactions_from_frame(df)


def test_empty_results_say_which_step_emptied_them(ratings_df: pl.DataFrame) -> None:
    with pytest.raises(DataError, match="no rows"):
        interactions_from_frame(ratings_df.clear(), user_col="user", item_col="item")
    with pytest.raises(DataError, match=r"no rows have stars > 9"):
        interactions_from_frame(
            ratings_df, user_col="user", item_col="item", rating_col="stars", threshold=9
        )
    with pytest.raises(DataError, match="min_user_count=10 removed every user"):
        interactions_from_frame(ratings_df, user_col="user", item_col="item", min_user_count=10)
    with pytest.raises(DataError, match="min_item_count=10 removed every item"):
        interactions_from_frame(ratings_df, user_col="user", item_col="item", min_item_count=10)


def test_negative_min_count_is_value_error(ratings_df: pl.DataFrame) -> None:
    with pytest.raises(ValueError, match="min_user_count"):
        interactions_from_frame(ratings_df, user_col="user", item_col="item", min_user_count=-1)


# ============================================================================ read_frame
def test_read_csv_with_header_standardizes_columns(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("uid,iid,score,ts\n1,10,4.0,100\n2,10,3,200\n")
    frame = read_frame(path, user_col="uid", item_col="iid", rating_col="score", timestamp_col="ts")
    assert frame.columns == ["user_id", "item_id", "rating", "timestamp"]
    assert frame.schema["user_id"] == pl.Int64 and frame.schema["rating"] == pl.Float64
    assert frame["rating"].to_list() == [4.0, 3.0]
    assert read_frame(path, user_col="uid", item_col="iid").columns == ["user_id", "item_id"]


def test_read_tsv_sniffed_from_extension_and_string_ids(tmp_path: Path) -> None:
    path = tmp_path / "r.tsv"
    path.write_text("user\titem\nu1\ta,b\nu2\tc\n")  # a comma inside a field: tab wins
    frame = read_frame(path, user_col="user", item_col="item")
    assert frame["item_id"].to_list() == ["a,b", "c"]
    assert frame.schema["user_id"] == pl.String


def test_read_given_separator_and_positions_without_header(tmp_path: Path) -> None:
    path = tmp_path / "r.txt"
    path.write_text("1;10;5\n2;11;1\n")
    frame = read_frame(path, user_col=0, item_col=1, rating_col=2, separator=";", has_header=False)
    assert frame.rows() == [(1, 10, 5.0), (2, 11, 1.0)]


def test_read_double_colon_sniffed(tmp_path: Path) -> None:
    path = tmp_path / "r.dat"
    path.write_text("1::10::5::7\n2::11::1::8\n")
    frame = read_frame(path, user_col=0, item_col=1, rating_col=2, has_header=False)
    assert frame.rows() == [(1, 10, 5.0), (2, 11, 1.0)]


def test_read_gzipped_csv(tmp_path: Path) -> None:
    path = tmp_path / "r.csv.gz"
    path.write_bytes(gzip.compress(b"user_id,item_id,rating\n1,2,4.5\n3,4,2\n"))
    frame = read_frame(path, rating_col="rating")
    assert frame.rows() == [(1, 2, 4.5), (3, 4, 2.0)]


def test_corrupt_files_are_data_errors_naming_the_file(tmp_path: Path) -> None:
    content = b"user_id,item_id,rating\n" + b"".join(b"%d,%d,4\n" % (i, i) for i in range(2000))
    truncated = tmp_path / "truncated.csv.gz"
    truncated.write_bytes(gzip.compress(content)[:300])
    with pytest.raises(DataError, match="could not decompress .*truncated.csv.gz"):
        read_frame(truncated)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(os.urandom(5000))
    with pytest.raises(DataError, match="could not read parquet data .*garbage.parquet"):
        load_interactions(garbage)
    half = tmp_path / "half.parquet"
    pl.DataFrame({"user_id": range(100), "item_id": range(100)}).write_parquet(half)
    half.write_bytes(half.read_bytes()[:200])
    with pytest.raises(DataError, match="half.parquet"):
        read_frame(half)


def test_read_falls_back_when_ids_turn_to_strings_late(tmp_path: Path) -> None:
    path = tmp_path / "late.csv"
    rows = "".join(f"{i},{i}\n" for i in range(10_050)) + "x,1\n"
    path.write_text("user_id,item_id\n" + rows)
    frame = read_frame(path)
    assert frame.schema["user_id"] == pl.String and frame["user_id"][-1] == "x"


def test_read_parquet_file_directory_and_glob(tmp_path: Path) -> None:
    part = pl.DataFrame({"u": [1, 2], "i": ["a", "b"], "r": [5, 1]})
    part.write_parquet(tmp_path / "single.parquet")
    folder = tmp_path / "parts"
    folder.mkdir()
    part.write_parquet(folder / "a.parquet")
    part.with_columns(pl.col("u") + 10).write_parquet(folder / "b.pq")
    single = read_frame(tmp_path / "single.parquet", user_col="u", item_col="i", rating_col="r")
    assert single.rows() == [(1, "a", 5.0), (2, "b", 1.0)]
    both = read_frame(folder, user_col="u", item_col="i")
    assert sorted(both["user_id"].to_list()) == [1, 2, 11, 12]
    globbed = read_frame(str(folder / "*.parquet"), user_col="u", item_col="i")
    assert globbed["user_id"].to_list() == [1, 2]
    with pytest.raises(DataError, match=r"'user_id'.*available columns.*'u', 'i', 'r'"):
        read_frame(tmp_path / "single.parquet")


def test_missing_file_is_file_not_found_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match="nope.csv") as info:
        read_frame(missing)
    assert isinstance(info.value, DataError) and isinstance(info.value, DataFileNotFound)
    with pytest.raises(DataFileNotFound, match="no parquet files"):
        read_frame(str(tmp_path / "*.parquet"))


def test_misnamed_column_lists_available(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("userId,movieId\n1,2\n")
    with pytest.raises(
        DataError, match=r"'user_id' not found in .*r\.csv.*\['userId', 'movieId'\]"
    ):
        read_frame(path)
    with pytest.raises(DataError, match="position 5 out of range"):
        read_frame(path, user_col=5, item_col=1)


def test_bad_format_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("")
    with pytest.raises(ValueError, match="format"):
        read_frame(path, format="xlsx")
    with pytest.raises(DataError, match="empty"):
        read_frame(path)


def test_load_interactions_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("u,i,r\n1,1,5\n1,2,4\n1,2,5\n2,1,1\n2,3,4\n")
    data = load_interactions(path, user_col="u", item_col="i", rating_col="r", min_user_count=2)
    assert shape_of(data) == (1, 2, 2)
    implicit = load_interactions(path, user_col="u", item_col="i")
    assert shape_of(implicit) == (2, 3, 4)


# ============================================================================ MovieLens
U_DATA = b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"


def test_read_ml100k_file_folder_and_zip(tmp_path: Path) -> None:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_bytes(U_DATA)
    expected = [(196, 242, 3.0, 881250949), (186, 302, 3.0, 891717742), (22, 377, 1.0, 878887116)]
    for path in (folder / "u.data", folder, tmp_path):
        frame = read_ml100k(path)
        assert frame.columns == ["user_id", "item_id", "rating", "timestamp"]
        assert frame.rows() == expected
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-100k/u.item", "1|Toy Story|...\n")
        zf.writestr("ml-100k/u.data", U_DATA)
    assert read_ml100k(archive).rows() == expected


def test_read_ml1m_dat_csv_gz_and_zip(tmp_path: Path) -> None:
    dat = b"1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_bytes(dat)
    frame = read_ml1m(tmp_path)
    assert frame.columns == ["user_id", "item_id", "rating", "timestamp"]
    assert frame.rows()[0] == (1, 1193, 5.0, 978300760)

    shared = tmp_path / "shared-layout"
    shared.mkdir()
    (shared / "ratings.csv.gz").write_bytes(
        gzip.compress(b"user_id,item_id,rating\n1,1193,5\n1,661,3\n")
    )
    frame = read_ml1m(shared)
    assert frame.columns == ["user_id", "item_id", "rating"]
    assert frame.rows() == [(1, 1193, 5.0), (1, 661, 3.0)]

    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", dat)
        zf.writestr("ml-1m/movies.dat", b"1::Toy Story (1995)::Animation\n")
    assert read_ml1m(archive).height == 3
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(DataFileNotFound, match=r"ratings\.dat.*tried"):
        read_ml1m(empty)


def test_read_movielens_csv_file_folder_and_zip(tmp_path: Path) -> None:
    text = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n"
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    (folder / "ratings.csv").write_text(text)
    expected = [(1, 1, 4.0, 964982703), (1, 3, 4.5, 964981247)]
    for path in (folder / "ratings.csv", folder, tmp_path):
        assert read_movielens_csv(path).rows() == expected

    zipped = tmp_path / "zipped"
    zipped.mkdir()
    archive = zipped / "ml-25m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-25m/movies.csv", "movieId,title\n1,Toy Story\n")
        zf.writestr("ml-25m/ratings.csv", text)
    before = sorted(p.name for p in zipped.iterdir())
    assert read_movielens_csv(archive).rows() == expected
    assert read_movielens_csv(zipped).rows() == expected
    assert sorted(p.name for p in zipped.iterdir()) == before  # nothing extracted to disk


def test_movielens_errors_name_paths(tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFound, match="nowhere"):
        read_movielens_csv(tmp_path / "nowhere")
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x/movies.csv", "movieId\n1\n")
    with pytest.raises(DataFileNotFound, match=r"no ratings\.csv.*inside the zip"):
        read_movielens_csv(archive)
    bad = tmp_path / "bad.csv"
    bad.write_text("user,movie\n1,2\n")
    with pytest.raises(DataError, match=r"'userId' not found.*\['user', 'movie'\]"):
        read_movielens_csv(bad)


# ============================================================================ registry
def test_registry_matches_protocol_table() -> None:
    specs = {spec.name: spec for spec in list_datasets()}
    assert {name: spec.n_heldout for name, spec in specs.items()} == {
        "ml-latest-small": 100,
        "ml-100k": 100,
        "ml-1m": 1000,
        "ml-20m": 10_000,
        "ml-25m": 10_000,
        "lastfm": 200,
        "gowalla": 3000,
    }
    assert specs["lastfm"].implicit and specs["gowalla"].implicit
    assert not specs["ml-1m"].implicit and specs["ml-latest-small"].bundled
    assert isinstance(get_dataset_spec("ml-1m"), DatasetSpec)


@pytest.mark.parametrize("name", ["ml-20m", "ml-25m"])
def test_large_movielens_load_from_folder_parent_or_zip(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    text = "userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i},{4.0 if i % 3 else 2.5},{1000 + i}\n" for u in (1, 2) for i in range(1, 10)
    )
    folder = tmp_path / "data" / name
    folder.mkdir(parents=True)
    (folder / "ratings.csv").write_text(text)
    for data_dir in (folder, folder.parent):
        interactions = load_dataset(name, data_dir)
        assert (interactions.n_users, interactions.n_items, interactions.nnz) == (2, 6, 12)
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    with zipfile.ZipFile(zipped / f"{name}.zip", "w") as zf:
        zf.writestr(f"{name}/ratings.csv", text)
    assert load_dataset(name, zipped).nnz == 12
    with pytest.raises(DataFileNotFound, match=f"GroupLens' license forbids redistributing {name}"):
        load_dataset(name, tmp_path / "empty")
    # 18 rows are not the published file: read, with a warning (another dataset, or a cut copy).
    assert f"has 18 rows, but {name} has {get_dataset_spec(name).n_rows}" in caplog.text


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"'ml-10m'.*ml-latest-small, ml-100k, ml-1m, ml-20m"):
        get_dataset_spec("ml-10m")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("nope")


def _bundled_ratings() -> list[dict[str, str]]:
    with zipfile.ZipFile(BUNDLED_ZIP) as zf:
        text = zf.read("ml-latest-small/ratings.csv").decode()
    return list(csv.DictReader(io.StringIO(text)))


def test_bundled_ml_latest_small_matches_plain_python_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RECVAE_DATA_DIR", raising=False)
    rows = _bundled_ratings()
    frame = load_dataset_frame("ml-latest-small")
    assert frame.height == len(rows) == 100_836  # README.txt: 100836 ratings
    data = load_dataset("ml-latest-small")
    expected = protocol_counts(
        (r["userId"], r["movieId"]) for r in rows if float(r["rating"]) > 3.5
    )
    assert shape_of(data) == expected == (603, 6298, 48_562)
    assert data.user_counts().min() >= 5
    loose = load_dataset("ml-latest-small", min_user_count=1)
    assert loose.n_users > data.n_users


def test_bundled_is_read_without_data_dir_and_ignores_unrelated_data_dir(tmp_path: Path) -> None:
    assert shape_of(load_dataset("ml-latest-small", tmp_path)) == (603, 6298, 48_562)


def _write_ml100k(folder: Path) -> None:
    folder.mkdir(parents=True)
    lines = [f"{u}\t{i}\t{4 if (u + i) % 3 else 2}\t{u * i}\n" for u in (1, 2, 3) for i in range(8)]
    (folder / "u.data").write_text("".join(lines))


def test_data_dir_may_be_the_folder_or_its_parent(tmp_path: Path) -> None:
    _write_ml100k(tmp_path / "ml-100k")
    from_parent = load_dataset("ml-100k", tmp_path)
    from_folder = load_dataset("ml-100k", tmp_path / "ml-100k")
    assert from_parent.fingerprint() == from_folder.fingerprint()
    # Rating 4 where (u + i) % 3 != 0: users 1, 2, 3 keep 6, 5, 5 of their 8 items.
    assert from_parent.user_counts().tolist() == [6, 5, 5]


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_ml100k(tmp_path / "ml-100k")
    monkeypatch.setenv("RECVAE_DATA_DIR", str(tmp_path))
    assert load_dataset_frame("ml-100k").height == 24


def test_missing_dataset_explains_paths_and_license(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("ml-1m", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "ml-1m" / "ratings.csv.gz") in message
    assert "license" in message and "--data-dir" in message
    assert isinstance(info.value, DataError)
    monkeypatch.delenv("RECVAE_DATA_DIR", raising=False)
    with pytest.raises(DataFileNotFound, match="RECVAE_DATA_DIR.*cannot be bundled"):
        load_dataset("ml-100k")


def test_lastfm_layout_is_implicit(tmp_path: Path) -> None:
    folder = tmp_path / "lastfm-hetrec2011"
    folder.mkdir()
    rows = "".join(f"{u}\t{a}\t{u * a}\r\n" for u in (2, 3) for a in range(51, 57))
    (folder / "user_artists.dat").write_bytes(f"userID\tartistID\tweight\r\n{rows}".encode())
    frame = load_dataset_frame("lastfm", tmp_path)
    assert frame.columns == ["user_id", "item_id", "weight"]
    assert frame.schema["weight"] == pl.Float64 and frame["weight"][0] == 102.0
    assert shape_of(load_dataset("lastfm", tmp_path)) == (2, 6, 12)


def test_gowalla_union_of_three_files(tmp_path: Path) -> None:
    folder = tmp_path / "gowalla-lightgcn"
    folder.mkdir()
    (folder / "train.txt").write_text("0 0 1 2 3\n1 4 5 6 7 8\n2 1\n")
    (folder / "valid.txt").write_text("0 4\n1 9\n")
    (folder / "test.txt").write_text("0 4 5\n1 0 \n2\n")  # a repeat, a trailing space, no items
    frame = load_dataset_frame("gowalla", tmp_path)
    assert frame.schema["user_id"] == pl.Int64 and frame.height == 14
    data = load_dataset("gowalla", folder)
    assert data.user_ids.tolist() == [0, 1]  # user 2 has one item
    assert data.user_counts().tolist() == [6, 7]


# ---------------------------------------------------------------------------- real data
def _check_real(name: str, folder: Path, pairs: Iterable[tuple[str, str]]) -> Interactions:
    data = load_dataset(name, SHARED_DATA)
    assert shape_of(data) == protocol_counts(pairs)
    assert shape_of(load_dataset(name, folder)) == shape_of(data)
    return data


def test_real_ml100k() -> None:
    folder = needs_shared("ml-100k")
    lines = (folder / "u.data").read_text().splitlines()
    fields = [line.split("\t") for line in lines]
    data = _check_real("ml-100k", folder, ((f[0], f[1]) for f in fields if float(f[2]) > 3.5))
    assert shape_of(data) == (938, 1447, 55_361)


def test_real_lastfm() -> None:
    folder = needs_shared("lastfm-hetrec2011")
    lines = (folder / "user_artists.dat").read_text().splitlines()[1:]
    data = _check_real("lastfm", folder, (tuple(line.split("\t")[:2]) for line in lines))
    assert shape_of(data) == (1877, 17_617, 92_801)


@pytest.mark.slow
def test_real_ml1m() -> None:
    folder = needs_shared("ml-1m")
    with gzip.open(folder / "ratings.csv.gz", "rt") as handle:
        rows = list(csv.DictReader(handle))
    pairs = ((r["user_id"], r["item_id"]) for r in rows if float(r["rating"]) > 3.5)
    data = _check_real("ml-1m", folder, pairs)
    assert shape_of(data) == (6034, 3533, 575_272)


@pytest.mark.slow
def test_real_gowalla() -> None:
    folder = needs_shared("gowalla-lightgcn")

    def pairs() -> Iterable[tuple[str, str]]:
        for part in ("train", "valid", "test"):
            for line in (folder / f"{part}.txt").read_text().splitlines():
                user, *items = line.split()
                yield from ((user, item) for item in items)

    data = _check_real("gowalla", folder, pairs())
    assert shape_of(data) == (29_858, 40_981, 1_027_370)


# ============================================================================ synthetic
def test_synthetic_tiny_shape_and_constraints() -> None:
    shape = SYNTHETIC_SHAPES["tiny"]
    data = synthetic_interactions(**shape)
    assert (data.n_users, data.n_items) == (shape["n_users"], shape["n_items"])
    assert abs(data.nnz - shape["n_interactions"]) <= 0.01 * shape["n_interactions"]
    counts = data.user_counts()
    assert counts.min() >= 5 and counts.max() <= shape["n_items"]
    matrix = data.matrix
    codes = np.repeat(np.arange(data.n_users), counts) * data.n_items + matrix.indices
    assert len(np.unique(codes)) == data.nnz  # no duplicate (user, item) pair
    assert data.user_ids.tolist() == list(range(data.n_users))


def test_synthetic_is_deterministic_per_seed() -> None:
    kwargs = SYNTHETIC_SHAPES["tiny"]
    first = synthetic_interactions(**kwargs, seed=7)
    assert synthetic_interactions(**kwargs, seed=7).fingerprint() == first.fingerprint()
    assert synthetic_interactions(**kwargs, seed=8).fingerprint() != first.fingerprint()


def test_synthetic_popularity_decreases_with_item_index() -> None:
    data = synthetic_interactions(n_users=3000, n_items=500, n_interactions=60_000, seed=1)
    bins = data.item_counts().reshape(10, 50).sum(axis=1)
    assert np.all(np.diff(bins) < 0)
    assert data.item_counts()[0] == data.item_counts().max()


def test_synthetic_activity_is_heavy_tailed_and_respects_minimum() -> None:
    data = synthetic_interactions(
        n_users=2000, n_items=400, n_interactions=40_000, min_per_user=7, seed=2
    )
    counts = data.user_counts()
    assert counts.min() == 7
    assert counts.max() > 5 * np.median(counts)


def test_synthetic_samplers_agree_in_distribution() -> None:
    # Rejection rounds and Gumbel-top-k are two exact forms of successive sampling.
    popularity = np.arange(1, 31, dtype=np.float64) ** -1.5
    popularity /= popularity.sum()
    users = np.arange(20_000)
    counts = np.full(len(users), 6)
    rng = np.random.default_rng(0)
    _, items_a = _sample_by_rejection(rng, users, counts, popularity)
    _, items_b = _sample_by_gumbel(rng, users, counts, popularity)
    freq_a = np.bincount(items_a, minlength=30) / len(users)
    freq_b = np.bincount(items_b, minlength=30) / len(users)
    np.testing.assert_allclose(freq_a, freq_b, atol=0.02)


def test_synthetic_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="n_interactions"):
        synthetic_interactions(n_users=10, n_items=20, n_interactions=10)
    with pytest.raises(ValueError, match="min_per_user"):
        synthetic_interactions(n_users=10, n_items=3, n_interactions=30)
    with pytest.raises(ValueError, match="popularity_exponent"):
        synthetic_interactions(n_users=10, n_items=20, n_interactions=60, popularity_exponent=-1)


@pytest.mark.slow
def test_synthetic_ml20m_like_builds_quickly() -> None:
    start = time.perf_counter()
    data = synthetic_interactions(**SYNTHETIC_SHAPES["ml-20m-like"])
    elapsed = time.perf_counter() - start
    assert (data.n_users, data.n_items) == (136_677, 20_108)
    assert abs(data.nnz - 10_000_000) < 10_000
    assert data.user_counts().min() >= 5
    assert elapsed < 60


def test_planted_structure() -> None:
    data = planted_interactions(n_users=300, n_items=60, n_clusters=3, p_in=0.5, p_out=0.02)
    assert (data.n_users, data.n_items) == (300, 60)
    matrix = dense(data)
    same = (np.arange(300)[:, None] % 3) == (np.arange(60)[None, :] % 3)
    assert abs(matrix[same].mean() - 0.5) < 0.05
    assert matrix[~same].mean() < 0.05
    assert (matrix * same).sum(axis=1).min() >= 1
    again = planted_interactions(n_users=300, n_items=60, n_clusters=3)
    assert again.fingerprint() == data.fingerprint()


def test_planted_gives_every_user_an_in_cluster_item() -> None:
    data = planted_interactions(n_users=50, n_items=10, n_clusters=5, p_in=0.0, p_out=0.0)
    matrix = dense(data)
    assert matrix.sum(axis=1).tolist() == [1.0] * 50
    users, items = np.nonzero(matrix)
    assert np.all(users % 5 == items % 5)


def test_planted_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="p_in"):
        planted_interactions(p_in=1.5)
    with pytest.raises(ValueError, match="n_clusters"):
        planted_interactions(n_items=2, n_clusters=3)


def test_not_found_from_a_relative_data_dir_says_where_it_looked_and_why_the_env_is_unused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECVAE_DATA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(DataFileNotFound) as caught:
        load_dataset("ml-1m", "../shared/data")
    message = str(caught.value)
    assert f"read from the working directory ({tmp_path})" in message
    assert "RECVAE_DATA_DIR is set but not read: a data directory was given" in message


# ====================================================================== messy files (audit)
def _load_text(tmp_path: Path, text: str, name: str = "log.csv", **kwargs: object) -> Interactions:
    path = tmp_path / name
    path.write_text(text)
    return load_interactions(path, user_col="user", item_col="item", threshold=None, **kwargs)


@pytest.mark.parametrize("token", ["NA", "null", "\\N", "NULL", "None", "N/A", "nan", '""'])
def test_null_markers_in_an_id_column_are_missing_ids_not_ids(tmp_path: Path, token: str) -> None:
    with pytest.raises(DataError, match=r"id column 'user' has 1 missing value\(s\)"):
        _load_text(tmp_path, f"user,item\n1,10\n{token},20\n3,30\n")


def test_ids_are_stripped_and_typed_by_one_rule(tmp_path: Path) -> None:
    spaced = _load_text(tmp_path, "user,item\n  12 ,10\n12,10\n12,20\n")
    assert spaced.user_ids.tolist() == [12] and spaced.nnz == 2
    # Leading zeros are not integer notation: every id stays text, whatever else is in the file.
    zeros = _load_text(tmp_path, "user,item\n007,1\n7,2\n")
    assert zeros.user_ids.tolist() == ["007", "7"]
    # pandas writes the integer ids of a column with gaps as "12.0": exact, even beyond 2**53.
    floats = _load_text(tmp_path, "user,item\n12345678901234567.0,1\n12345678901234568.0,2\n")
    assert floats.user_ids.tolist() == [12345678901234567, 12345678901234568]
    exponents = _load_text(tmp_path, "user,item\n1e3,1\n1E3,2\n1000,3\n")
    assert sorted(exponents.user_ids.tolist()) == ["1000", "1E3", "1e3"]
    huge = _load_text(tmp_path, "user,item\n18446744073709551616,1\n9223372036854775808,1\n1,1\n")
    assert huge.n_users == 3 and set(huge.user_ids.tolist()) >= {"18446744073709551616"}


def test_structural_mistakes_in_a_file_are_named(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"repeat the header \('user', 'item'\), the first at line 4"
    ):
        _load_text(tmp_path, "user,item\n1,10\n2,20\nuser,item\n3,30\n")
    path = tmp_path / "same.csv"
    path.write_text("user,item\n1,2\n")
    with pytest.raises(DataError, match="'user' is given as both the user and the item column"):
        load_interactions(path, user_col="user", item_col="user", threshold=None)
    with pytest.raises(DataError, match="names the column 'item' more than once"):
        _load_text(tmp_path, "user,item,item\n1,10,99\n2,20,98\n")
    blank_lines = _load_text(tmp_path, "user,item\n1,10\n\n2,20\n\n")
    assert blank_lines.nnz == 2


def test_infinite_ratings_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("user,item,r\n1,10,inf\n2,20,4\n")
    with pytest.raises(DataError, match=r"rating column 'r' has 1 value\(s\) that are not"):
        load_interactions(path, user_col="user", item_col="item", rating_col="r")


def test_files_are_recognised_by_content_not_name(tmp_path: Path) -> None:
    import bz2
    import lzma

    text = "user,item\n1,10\n2,20\n"
    for name, packed in (
        ("a.csv.bz2", bz2.compress(text.encode())),
        ("b.csv.xz", lzma.compress(text.encode())),
    ):
        (tmp_path / name).write_bytes(packed)
        assert load_interactions(tmp_path / name, user_col="user", item_col="item").nnz == 2
    pl.DataFrame({"user": [1, 2], "item": [10, 20]}).write_parquet(tmp_path / "really.csv")
    assert load_interactions(tmp_path / "really.csv", user_col="user", item_col="item").nnz == 2
    with zipfile.ZipFile(tmp_path / "log.zip", "w") as zf:
        zf.writestr("log.csv", text)
    with pytest.raises(DataError, match="is a zip archive: extract the ratings file"):
        load_interactions(tmp_path / "log.zip", user_col="user", item_col="item")
    (tmp_path / "utf16.csv").write_text(text, encoding="utf-16")
    with pytest.raises(DataError, match="is UTF-16 text; convert it to UTF-8"):
        load_interactions(tmp_path / "utf16.csv", user_col="user", item_col="item")
    bracketed = tmp_path / "ratings[2020].parquet"
    pl.DataFrame({"user": [1], "item": [10]}).write_parquet(bracketed)
    assert load_interactions(bracketed, user_col="user", item_col="item").nnz == 1
    tabbed = tmp_path / "t.txt"
    tabbed.write_text("user\titem\n1\t10\n")
    assert load_interactions(tabbed, user_col="user", item_col="item", separator="\\t").nnz == 1


def test_a_pipe_is_read_like_a_file(tmp_path: Path) -> None:
    import threading

    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("user,item\n1,10\n2,20\n",))
    writer.start()
    try:
        assert load_interactions(fifo, user_col="user", item_col="item").nnz == 2
    finally:
        writer.join(timeout=10)


def test_parquet_ids_beyond_int64_or_float_precision(tmp_path: Path) -> None:
    big = pl.DataFrame({"user": pl.Series([2**63 + 5, 1], dtype=pl.UInt64), "item": [1, 1]})
    big.write_parquet(tmp_path / "u64.parquet")
    loaded = load_interactions(tmp_path / "u64.parquet", user_col="user", item_col="item")
    assert sorted(loaded.user_ids.tolist()) == ["1", str(2**63 + 5)]
    floats = pl.DataFrame({"user": [2.0**60, 1.0], "item": [1, 1]})
    floats.write_parquet(tmp_path / "f.parquet")
    with pytest.raises(DataError, match=r"float ids above 2\*\*53"):
        load_interactions(tmp_path / "f.parquet", user_col="user", item_col="item")


def test_parquet_files_of_one_dataset_may_differ_in_unused_columns_and_int_widths(
    tmp_path: Path,
) -> None:
    for folder, second in (
        ("extra", pl.DataFrame({"user": [3], "item": [30], "extra": ["x"]})),
        ("widths", pl.DataFrame({"user": pl.Series([3], dtype=pl.Int32), "item": [30]})),
    ):
        (tmp_path / folder).mkdir()
        pl.DataFrame({"user": [1, 2], "item": [10, 20]}).write_parquet(tmp_path / folder / "a.pq")
        second.write_parquet(tmp_path / folder / "b.pq")
        assert load_interactions(tmp_path / folder, user_col="user", item_col="item").nnz == 3
