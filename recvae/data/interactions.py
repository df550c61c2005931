"""The dataset object: a binary user-item CSR matrix plus the id vocabularies."""

from __future__ import annotations

import hashlib
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

if TYPE_CHECKING:
    import polars as pl

__all__ = ["Interactions", "UnknownUserError", "DataError"]


class DataError(ValueError):
    """Raised when input data cannot be turned into interactions (names the problem)."""


class UnknownUserError(KeyError):
    """Raised when a user id is not part of a dataset or model vocabulary.

    ``user_id`` is the id as given; ``str(error)`` says why it is unknown (with a hint when its
    type differs from the vocabulary's ids).
    """

    def __init__(self, user_id: Any, message: str | None = None) -> None:
        super().__init__(user_id)
        self.user_id = user_id
        self.message = message or f"user id {user_id!r} is not in the user vocabulary"

    def __str__(self) -> str:
        return self.message


_INT64_MAX = int(np.iinfo(np.int64).max)
_INT64_MIN = int(np.iinfo(np.int64).min)


def _as_id_array(ids: Any, name: str) -> NDArray[Any]:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise DataError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        # An empty list has no type to keep (numpy makes it float64); no ids is a valid vocabulary.
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind == "O":
        return _object_ids(arr, name)
    if arr.dtype.kind == "U":
        # Keep them as Python strings for stable JSON round-trips.
        return np.asarray([str(v) for v in arr.tolist()], dtype=object)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{name} contains NaN or infinite values (missing ids?)")
        raise DataError(
            f"{name} must be integers or strings, got {arr.dtype} values: convert integral "
            f"floats with {name}.astype(np.int64)"
        )
    if arr.dtype.kind == "u" and int(arr.max()) > _INT64_MAX:
        # astype(int64) would wrap such an id around to a negative one.
        raise DataError(f"{name} holds ids above the int64 range (max {int(arr.max())})")
    if arr.dtype.kind not in "iu":
        raise DataError(f"{name} must be integers or strings, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _object_ids(arr: NDArray[Any], name: str) -> NDArray[Any]:
    """Ids held as Python objects: all ints stay ints (int64), strings become str.

    A missing id (None, NaN) or a value that is neither an int nor a string is refused: turned
    into text it would silently become an id such as ``"None"``.
    """
    values = [v.item() if isinstance(v, np.generic) else v for v in arr.tolist()]
    n_str = 0
    for value in values:
        if isinstance(value, str):
            n_str += 1
        elif isinstance(value, bool) or not isinstance(value, int):
            if value is None or (isinstance(value, float) and value != value):
                raise DataError(f"{name} contains a missing id ({value!r})")
            raise DataError(
                f"{name} must hold ints or strings, got {type(value).__name__} value {value!r}"
            )
    if n_str == 0:
        if not all(_INT64_MIN <= v <= _INT64_MAX for v in values):
            raise DataError(f"{name} holds ids outside the int64 range")
        return np.asarray(values, dtype=np.int64)
    # Strings, possibly mixed with ints (numpy itself turns such a list into strings).
    return np.asarray([str(v) for v in values], dtype=object)


def _positions(values: Any, name: str) -> NDArray[np.int64]:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise DataError(f"{name} must hold integer positions, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _check_count(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_filter_arguments(threshold: Any, min_user_count: Any, min_item_count: Any) -> None:
    """Raise ``ValueError`` unless the counts are ints >= 0 and ``threshold`` is None or a
    finite number (a string "3" compared as text; NaN dropped every row and blamed the data)."""
    _check_count(min_user_count, "min_user_count")
    _check_count(min_item_count, "min_item_count")
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not math.isfinite(threshold)
    ):
        raise ValueError(f"threshold must be a finite number or None, got {threshold!r}")


def _check_values(matrix: sp.csr_array) -> None:
    """Refuse values that have no meaning as implicit feedback (they would become ones)."""
    if not matrix.nnz:
        return
    data = matrix.data
    if data.dtype.kind not in "biuf":
        raise DataError(f"matrix values must be numbers, got dtype {data.dtype}")
    n_bad = int(np.count_nonzero(~np.isfinite(data))) if data.dtype.kind == "f" else 0
    if n_bad:
        raise DataError(
            f"matrix has {n_bad} non-finite value(s) (NaN or inf); interactions must be "
            "finite and >= 0"
        )
    n_negative = int(np.count_nonzero(data < 0))
    if n_negative:
        raise DataError(
            f"matrix has {n_negative} negative value(s); interactions must be >= 0 (drop "
            "negative feedback such as dislikes before building Interactions)"
        )


@dataclass(frozen=True, eq=False)
class Interactions:
    """A binary implicit-feedback dataset.

    ``matrix[user_idx, item_idx] == 1`` when the user interacted positively with the item.
    ``user_ids[user_idx]`` and ``item_ids[item_idx]`` give the external keys; positions are
    what models see. The matrix is float32, has sorted indices, no duplicates and no explicit
    zeros. Treat it as read-only.

    Attributes:
        matrix: ``(n_users, n_items)`` CSR array of ones.
        user_ids: External user ids, one per row (int64 or str objects).
        item_ids: External item ids, one per column (int64 or str objects).
    """

    matrix: sp.csr_array
    user_ids: NDArray[Any]
    item_ids: NDArray[Any]
    _user_index: dict[Any, int] = field(init=False, repr=False)
    _item_index: dict[Any, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        matrix = self.matrix
        if not isinstance(matrix, sp.csr_array):
            # A csr_array built from another sparse object may share its arrays (not copied).
            matrix = sp.csr_array(matrix)
        _check_values(matrix)
        if (
            matrix.dtype != np.float32
            or not matrix.has_canonical_format
            or (matrix.nnz and bool((matrix.data != 1.0).any()))
        ):
            # Normalize a copy: the caller's matrix (and any array it shares) stays untouched.
            # Binarize before casting and summing: a positive value below float32's range, or
            # duplicates whose integer sum wraps around to 0, is still an interaction.
            matrix = sp.csr_array(
                (
                    (matrix.data != 0).astype(np.float32),
                    matrix.indices.copy(),
                    matrix.indptr.copy(),
                ),
                shape=matrix.shape,
            )
            matrix.sum_duplicates()
            matrix.eliminate_zeros()
            matrix.data[:] = 1.0
            matrix.sort_indices()
        user_ids = _as_id_array(self.user_ids, "user_ids")
        item_ids = _as_id_array(self.item_ids, "item_ids")
        if matrix.shape != (len(user_ids), len(item_ids)):
            raise DataError(
                f"matrix shape {matrix.shape} does not match "
                f"{len(user_ids)} user ids x {len(item_ids)} item ids"
            )
        user_index = {_key(v): i for i, v in enumerate(user_ids.tolist())}
        item_index = {_key(v): i for i, v in enumerate(item_ids.tolist())}
        if len(user_index) != len(user_ids):
            raise DataError("user_ids contains duplicates")
        if len(item_index) != len(item_ids):
            raise DataError("item_ids contains duplicates")
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "user_ids", user_ids)
        object.__setattr__(self, "item_ids", item_ids)
        object.__setattr__(self, "_user_index", user_index)
        object.__setattr__(self, "_item_index", item_index)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_polars(
        cls,
        df: pl.DataFrame,
        *,
        user_col: str = "user_id",
        item_col: str = "item_id",
        rating_col: str | None = None,
        threshold: float | None = 3.5,
        min_user_count: int = 0,
        min_item_count: int = 0,
    ) -> Interactions:
        """Build interactions from a polars frame of (user, item[, rating]) rows.

        Rows with ``rating > threshold`` (strictly) are positives when ``rating_col`` is given (a
        ``threshold`` of None keeps every row). Duplicate (user, item) rows then collapse: a
        pair is a positive when any of its rows is, whatever their order, so a pair rated 5 and
        later 1 stays a positive. Then items with fewer than ``min_item_count`` positives are
        dropped, then users with fewer than ``min_user_count`` (each filter once, items first;
        0 keeps all). Ids keep their type; rows and columns are ordered by sorted id.

        Args:
            df: The rows.
            user_col: Column of the external user ids (ints or strings).
            item_col: Column of the external item ids (ints or strings).
            rating_col: Optional column of numeric ratings.
            threshold: Ratings strictly above it are positives; None keeps every row.
            min_user_count: Minimum distinct positives a user needs (an int >= 0).
            min_item_count: Minimum distinct positives an item needs (an int >= 0).

        Returns:
            The binary interactions.

        Raises:
            ValueError: ``min_user_count`` or ``min_item_count`` is not an int >= 0, or
                ``threshold`` is neither None nor a finite number.
            DataError: ``df`` is not a polars frame (a pandas one is named, with the fix), a
                column is missing, ids or ratings are null or unparsable, or nothing is left
                after filtering.
        """
        check_filter_arguments(threshold, min_user_count, min_item_count)
        from recvae.data.readers import interactions_from_frame

        module = type(df).__module__.split(".", 1)[0]
        if module == "pandas":
            raise DataError(
                f"from_polars needs a polars DataFrame, got a pandas {type(df).__name__}: "
                "convert it first with polars.from_pandas(df)"
            )

        return interactions_from_frame(
            df,
            user_col=user_col,
            item_col=item_col,
            rating_col=rating_col,
            threshold=threshold,
            min_user_count=min_user_count,
            min_item_count=min_item_count,
        )

    @classmethod
    def from_pairs(
        cls,
        user_idx: NDArray[np.integer[Any]],
        item_idx: NDArray[np.integer[Any]],
        *,
        n_users: int,
        n_items: int,
        user_ids: NDArray[Any] | None = None,
        item_ids: NDArray[Any] | None = None,
    ) -> Interactions:
        """Build interactions from integer position pairs (ids default to the positions).

        Raises:
            ValueError: the positions are not integers (floats would be truncated to another
                position), not one-dimensional, of different lengths or out of range.
        """
        rows = _positions(user_idx, "user_idx")
        cols = _positions(item_idx, "item_idx")
        data = np.ones(len(rows), dtype=np.float32)
        matrix = sp.csr_array((data, (rows, cols)), shape=(n_users, n_items))
        matrix.data[:] = 1.0
        return cls(
            matrix,
            np.arange(n_users) if user_ids is None else user_ids,
            np.arange(n_items) if item_ids is None else item_ids,
        )

    # ------------------------------------------------------------------ properties
    @property
    def n_users(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def nnz(self) -> int:
        return int(self.matrix.nnz)

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.n_users * self.n_items)

    def __len__(self) -> int:
        return self.n_users

    def __repr__(self) -> str:
        return (
            f"Interactions(n_users={self.n_users}, n_items={self.n_items}, nnz={self.nnz}, "
            f"density={self.density:.4%})"
        )

    # ------------------------------------------------------------------ lookups
    def user_index(self, user_id: Any) -> int:
        """Position of an external user id.

        Raises:
            UnknownUserError: the id is not in the vocabulary (the message hints at a str/int
                mismatch when the id's type differs from the vocabulary's).
            TypeError: the id is not hashable (a list, for example).
        """
        try:
            return self._user_index[_key(user_id)]
        except KeyError:
            raise UnknownUserError(user_id, self._unknown_user_message(user_id)) from None
        except TypeError:
            raise TypeError(
                f"a user id must be an int or a str, got {type(user_id).__name__}"
            ) from None

    def _unknown_user_message(self, user_id: Any) -> str:
        message = f"user id {user_id!r} is not a training user (not in the user vocabulary)"
        given = _id_kind(user_id)
        expected = "str" if self.user_ids.dtype == object else "int"
        if given is not None and given != expected and self.n_users:
            example = self.user_ids[0]
            message += (
                f"; it is a {given} but the user ids are {expected} (e.g. {_py(example)!r}): "
                f"convert it with {expected}(...)"
            )
        return message

    def item_index(self, item_id: Any) -> int | None:
        """Position of an external item id, or None when unknown."""
        return self._item_index.get(_key(item_id))

    def item_indices(self, item_ids: Sequence[Any]) -> tuple[NDArray[np.int64], list[Any]]:
        """Positions of known item ids, and the list of unknown ones (kept in input order)."""
        known: list[int] = []
        unknown: list[Any] = []
        for item_id in item_ids:
            idx = self._item_index.get(_key(item_id))
            if idx is None:
                unknown.append(item_id)
            else:
                known.append(idx)
        return np.asarray(known, dtype=np.int64), unknown

    def history(self, user_idx: int) -> NDArray[np.int32]:
        """Item positions of one user's positives (sorted)."""
        start, end = self.matrix.indptr[user_idx], self.matrix.indptr[user_idx + 1]
        return np.asarray(self.matrix.indices[start:end])

    # ------------------------------------------------------------------ derived datasets
    def subset_users(self, user_idx: NDArray[np.integer[Any]]) -> Interactions:
        """Rows ``user_idx`` (in that order) with the same item vocabulary."""
        idx = np.asarray(user_idx, dtype=np.int64)
        return Interactions(self.matrix[idx], self.user_ids[idx], self.item_ids)

    def subset_items(self, item_idx: NDArray[np.integer[Any]]) -> Interactions:
        """Columns ``item_idx`` (in that order) with the same user vocabulary."""
        idx = np.asarray(item_idx, dtype=np.int64)
        matrix = self.matrix[:, idx].tocsr()
        matrix.sort_indices()  # a fresh matrix: sorting it here spares Interactions a copy
        return Interactions(matrix, self.user_ids, self.item_ids[idx])

    def user_counts(self) -> NDArray[np.int64]:
        indptr: NDArray[np.integer[Any]] = self.matrix.indptr
        return np.diff(indptr).astype(np.int64)

    def item_counts(self) -> NDArray[np.int64]:
        return np.bincount(self.matrix.indices, minlength=self.n_items).astype(np.int64)

    def fingerprint(self) -> str:
        """A sha256 that identifies the data.

        It covers the shape, where the ones are (so the order of users and items) and the ids
        with their kind: ``1`` and ``"1"`` are different ids. It ignores what does not change
        the data: the index dtype, how the matrix was built, the values (all ones). Stable across
        runs, threads and platforms.

        Returns:
            64 hex digits.
        """
        h = hashlib.sha256()
        h.update(np.asarray(self.matrix.shape, dtype="<i8").tobytes())
        h.update(np.asarray(self.matrix.indptr, dtype="<i8").tobytes())
        h.update(np.asarray(self.matrix.indices, dtype="<i8").tobytes())
        for ids in (self.user_ids, self.item_ids):
            h.update(_vocabulary_bytes(ids))
        return h.hexdigest()


# What ``str(int)`` writes: string ids that all look like this could pass for int ids.
_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]*")
_SEPARATORS = ("\x1f", "\x1e", "\x00")


def _vocabulary_bytes(ids: NDArray[Any]) -> bytes:
    """One vocabulary's bytes for :meth:`Interactions.fingerprint`, each distinct from another's.

    The historical form (ids joined by ``\\x1f``, ended by ``\\x1e``) is kept wherever it is
    unambiguous, so that recorded fingerprints stay valid; string ids that contain a separator,
    or that all look like integers, are written length-prefixed behind a tag (``\\x00`` never
    occurs in the historical form).
    """
    values = ids.tolist()
    if ids.dtype == object and values:
        texts = [str(v) for v in values]
        if all(_CANONICAL_INT.fullmatch(t) for t in texts) or any(
            sep in t for t in texts for sep in _SEPARATORS
        ):
            encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
            parts = [b"\x00str", len(encoded).to_bytes(8, "little")]
            for chunk in encoded:
                parts += [len(chunk).to_bytes(8, "little"), chunk]
            return b"".join(parts)
    return "\x1f".join(map(str, values)).encode("utf-8", "surrogatepass") + b"\x1e"


def _id_kind(value: Any) -> str | None:
    """``"str"`` or ``"int"`` for an id's kind (numbers count as int), None for anything else."""
    if isinstance(value, str | bytes | np.str_ | np.bytes_):
        return "str"
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    ):
        return "int"
    return None


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _key(value: Any) -> Any:
    """Normalize an external id for dictionary lookup (numpy ints -> int)."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.str_):
        return str(value)
    return value
