from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recvae.data import DataError, Interactions
from recvae.split import split_users


def _random_data(rng: np.random.Generator, n_users: int = 300, n_items: int = 80) -> Interactions:
    dense = rng.random((n_users, n_items)) < rng.uniform(0.03, 0.3, size=(n_users, 1))
    dense[:, 0] = True  # at least one positive per user
    return Interactions(
        sp.csr_array(dense.astype(np.float32)), np.arange(n_users) + 1000, np.arange(n_items) * 3
    )


def test_users_land_in_exactly_one_part(rng: np.random.Generator) -> None:
    data = _random_data(rng)
    split = split_users(data, n_heldout=40, seed=3)
    train, val, test = (
        set(split.train.user_ids.tolist()),
        set(split.validation.fold_in.user_ids.tolist()),
        set(split.test.fold_in.user_ids.tolist()),
    )
    assert len(val) == len(test) == 40 and len(train) == 300 - 80
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(data.user_ids.tolist())


def test_item_vocabulary_comes_from_training_users(rng: np.random.Generator) -> None:
    data = _random_data(rng)
    first = split_users(data, n_heldout=40, seed=3)
    test_user = data.user_index(first.test.fold_in.user_ids[0])
    # Give the last item to that test user alone: it must leave the vocabulary.
    dense = data.matrix.toarray()
    dense[:, -1] = 0
    dense[test_user, -1] = 1
    data = Interactions(sp.csr_array(dense), data.user_ids, data.item_ids)
    split = split_users(data, n_heldout=40, seed=3)
    assert (split.train.item_counts() > 0).all()
    assert data.item_ids[-1] not in set(split.train.item_ids.tolist())
    assert split.test.fold_in.item_ids.tolist() == split.train.item_ids.tolist()
    assert split.validation.targets.item_ids.tolist() == split.train.item_ids.tolist()


def test_fold_in_and_targets_are_disjoint_and_sized(rng: np.random.Generator) -> None:
    data = _random_data(rng)
    split = split_users(data, n_heldout=50, seed=5)
    for part in (split.validation, split.test):
        fold, target = part.fold_in.matrix, part.targets.matrix
        assert fold.multiply(target).nnz == 0
        total = np.diff((fold + target).indptr)
        n_targets = np.diff(target.indptr)
        expected = np.where(total >= 5, (0.2 * total).astype(int), 0)
        np.testing.assert_array_equal(n_targets, expected)


def test_split_is_reproducible_and_seed_dependent(rng: np.random.Generator) -> None:
    data = _random_data(rng)
    a = split_users(data, n_heldout=30, seed=1)
    b = split_users(data, n_heldout=30, seed=1)
    c = split_users(data, n_heldout=30, seed=2)
    assert a.test.targets.user_ids.tolist() == b.test.targets.user_ids.tolist()
    assert (a.test.targets.matrix != b.test.targets.matrix).nnz == 0
    assert a.test.fold_in.user_ids.tolist() != c.test.fold_in.user_ids.tolist()


def test_user_order_follows_the_seeded_permutation(rng: np.random.Generator) -> None:
    data = _random_data(rng, n_users=50)
    split = split_users(data, n_heldout=10, seed=98765)
    perm = np.random.default_rng(98765).permutation(50)
    np.testing.assert_array_equal(split.test.fold_in.user_ids, data.user_ids[perm[40:]])
    np.testing.assert_array_equal(split.validation.fold_in.user_ids, data.user_ids[perm[30:40]])


def test_split_without_training_users_is_a_clear_error(rng: np.random.Generator) -> None:
    data = _random_data(rng, n_users=20)
    with pytest.raises(DataError, match="no training users"):
        split_users(data, n_heldout=10)
    with pytest.raises(ValueError, match="n_heldout"):
        split_users(data, n_heldout=0)
