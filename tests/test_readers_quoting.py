"""Multi-character separators (MovieLens' ``::``) and CSV quoting in the delimited reader.

polars reads single-byte separators only, so the reader stands a single byte in for a longer
separator before parsing; these tests pin that a quoted field keeps its separators, that
quoting works as polars understands it for a one-byte separator, and that a byte already in the
file is never taken for a separator.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recvae.data import DataError, read_frame, readers

# One line per row, fields already written as they appear in the file (quoted or not).
_ROWS = [
    ["1", '"a::b"', "5"],  # the separator inside a quoted field
    ["2", '"say ""x::y"" twice"', "4"],  # an escaped quote next to it
    ["3", '"two\nlines::here"', "3"],  # a quoted line break
    ["5", '""""', "1"],  # a quoted field that is one escaped quote
    ["6", "plain", "1"],
]
_EXPECTED = [
    (1, "a::b", 5.0),
    (2, 'say "x::y" twice', 4.0),
    (3, "two\nlines::here", 3.0),
    (5, '"', 1.0),
    (6, "plain", 1.0),
]


def _write(path: Path, separator: str, rows: list[list[str]], header: str = "") -> Path:
    lines = ([header] if header else []) + [separator.join(row) for row in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return path


def _read(path: Path, separator: str | None, *, has_header: bool = False) -> pl.DataFrame:
    return read_frame(
        path, user_col=0, item_col=1, rating_col=2, separator=separator, has_header=has_header
    )


@pytest.mark.parametrize("given", [True, False], ids=["given", "sniffed"])
def test_a_multi_character_separator_inside_a_quoted_field_is_kept(
    tmp_path: Path, given: bool
) -> None:
    path = _write(tmp_path / "r.dat", "::", _ROWS)
    assert _read(path, "::" if given else None).rows() == _EXPECTED


def test_a_multi_character_separator_quotes_like_polars_reads_a_one_byte_separator(
    tmp_path: Path,
) -> None:
    # The same fields with "," (which polars parses itself) and with "::" read the same.
    rows = [[field.replace("::", ",") for field in row] for row in _ROWS]
    by_polars = _read(_write(tmp_path / "r.csv", ",", rows), ",")
    by_substitute = _read(_write(tmp_path / "r.dat", "::", rows), "::")
    assert by_substitute.rows() == by_polars.rows()
    assert by_substitute["item_id"][0] == "a,b"


@pytest.mark.parametrize("n_rows", [1, 3])
def test_a_quote_inside_an_unquoted_field_reads_as_with_a_one_byte_separator(
    tmp_path: Path, n_rows: int
) -> None:
    # A quote that does not open a field is a plain character for the substitution, so polars
    # sees what it would see with ",": one row reads, and its chunked reader refuses more.
    rows = [["1", 'the 12" cut', "5"], ["2", "b", "4"], ["3", "c", "3"]][:n_rows]

    def outcome(separator: str) -> object:
        try:
            return _read(_write(tmp_path / f"r{len(separator)}.txt", separator, rows), separator)
        except DataError:
            return DataError

    by_polars = outcome(",")
    by_substitute = outcome("::")
    if by_polars is DataError:
        assert by_substitute is DataError
    else:
        assert isinstance(by_polars, pl.DataFrame) and isinstance(by_substitute, pl.DataFrame)
        assert by_substitute.rows() == by_polars.rows() == [(1, 'the 12" cut', 5.0)]


def test_a_quoted_first_field_after_a_byte_order_mark_is_quoted(tmp_path: Path) -> None:
    path = tmp_path / "r.dat"
    path.write_bytes(b'\xef\xbb\xbf"a::b"::1::5\n"c"::2::4\n')
    frame = read_frame(path, user_col=0, item_col=1, rating_col=2, has_header=False)
    assert frame.rows() == [("a::b", 1, 5.0), ("c", 2, 4.0)]


def test_quoted_header_names_may_hold_the_separator(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.dat", "::", [["1", '"x::y"']], header='user::"item::id"')
    frame = read_frame(path, user_col="user", item_col="item::id")
    assert frame.rows() == [(1, "x::y")]


@pytest.mark.parametrize("separator", ["¦", "→", "||", "\t\t"])
def test_separators_longer_than_one_byte_keep_quoted_fields(tmp_path: Path, separator: str) -> None:
    rows = [["1", f'"a{separator}b"', "5"], ["2", "c", "4"]]
    path = _write(tmp_path / "r.txt", separator, rows)
    assert _read(path, separator).rows() == [(1, f"a{separator}b", 5.0), (2, "c", 4.0)]


def test_a_unit_separator_byte_in_the_file_stays_part_of_its_field(tmp_path: Path) -> None:
    # The byte that stands in for "::" is chosen among bytes the file does not hold.
    rows = [["1", "a\x1fb", "5"], ["2", '"c::\x1fd"', "4"], ["3", "e", "3"]]
    path = _write(tmp_path / "r.dat", "::", rows)
    assert _read(path, "::").rows() == [(1, "a\x1fb", 5.0), (2, "c::\x1fd", 4.0), (3, "e", 3.0)]


def test_a_file_holding_every_substitute_byte_is_refused_not_misread(tmp_path: Path) -> None:
    every = "".join(readers._SUBSTITUTE_SEPARATORS)
    path = _write(tmp_path / "r.dat", "::", [["1", f"a{every}b", "5"]])
    with pytest.raises(DataError, match=r"r\.dat.*'::'"):
        _read(path, "::")


def test_a_multi_character_separator_holding_a_quote_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.dat", '";"', [["1", "a", "5"]])
    with pytest.raises(ValueError, match="quote"):
        _read(path, '";"')
