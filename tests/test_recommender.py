from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from recvae.data import UnknownUserError
from recvae.recommender import BundleError, Recommender
from tests.conftest import make_checkerboard


@pytest.fixture(scope="module")
def rec(tiny_bundle: Path) -> Recommender:
    return Recommender.load(tiny_bundle)


def test_batch_equals_single_calls(rec: Recommender) -> None:
    users = rec.user_ids[:10].tolist()
    batch = rec.recommend(users, k=5)
    for row, user in enumerate(users):
        single = rec.recommend([user], k=5)
        np.testing.assert_array_equal(single.item_idx[0], batch.item_idx[row])
        np.testing.assert_allclose(single.scores[0], batch.scores[row], rtol=1e-5)


def test_history_fold_in_matches_recommend(rec: Recommender) -> None:
    for user in rec.user_ids[:8].tolist():
        history = rec.user_history(user).tolist()
        a = rec.recommend([user], k=6)
        b = rec.recommend_from_history(history, k=6)
        np.testing.assert_array_equal(a.item_ids, b.item_ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)


def test_exclude_seen_never_returns_a_seen_item(rec: Recommender) -> None:
    users = rec.user_ids.tolist()
    result = rec.recommend(users, k=rec.n_items)
    for row, user in enumerate(users):
        seen = set(rec.user_history(user).tolist())
        finite = np.isfinite(result.scores[row])
        assert not seen & set(result.item_ids[row][finite].tolist())
        assert finite.sum() == rec.n_items - len(seen)
    with_seen = rec.recommend(users[:1], k=rec.n_items, exclude_seen=False)
    assert np.isfinite(with_seen.scores).all()


def test_save_load_gives_identical_scores(rec: Recommender, tmp_path: Path) -> None:
    path = rec.save(tmp_path / "copy")
    again = Recommender.load(path)
    x = rec.train_matrix[:5]
    torch.testing.assert_close(rec.score(x), again.score(x), rtol=0, atol=0)
    assert again.version == rec.version
    assert again.config == rec.config
    np.testing.assert_array_equal(again.item_ids, rec.item_ids)


def test_unknown_items_are_reported_and_dropped(rec: Recommender) -> None:
    known = rec.item_ids[:3].tolist()
    result = rec.recommend_from_history([*known, "nope", 999999], k=3)
    assert result.unknown_items == (("nope", 999999),)
    np.testing.assert_array_equal(result.item_ids, rec.recommend_from_history(known, k=3).item_ids)


def test_unknown_user_and_bad_k(rec: Recommender) -> None:
    with pytest.raises(UnknownUserError):
        rec.recommend(["ghost"], k=3)
    with pytest.raises(ValueError, match="k must be"):
        rec.recommend(rec.user_ids[:1].tolist(), k=0)


@pytest.mark.parametrize("device", ["gpu", "cuda:x"])
def test_a_device_that_is_no_device_is_named(rec: Recommender, device: str) -> None:
    with pytest.raises(ValueError, match=f"device '{device}' is not a device"):
        rec.to(device)


def test_weights_and_exclude(rec: Recommender) -> None:
    items = rec.item_ids[:4].tolist()
    result = rec.recommend_from_history(items, k=5, exclude=[rec.item_ids[5]])
    assert rec.item_ids[5] not in set(result.item_ids[0].tolist())
    with pytest.raises(ValueError, match="weights"):
        rec.recommend_from_history(items, k=5, weights=[1.0])
    with pytest.raises(ValueError, match="finite"):
        rec.recommend_from_history(items, k=5, weights=[1.0, -1.0, 1.0, 1.0])


def test_encode_returns_mean_and_positive_sigma(rec: Recommender) -> None:
    mu, sigma = rec.encode(rec.train_matrix[:4])
    assert mu.shape == sigma.shape == (4, rec.config.latent_dim)
    assert (sigma > 0).all()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupted_bundle_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bad = _copy(tiny_bundle, tmp_path / "bad")
    with (bad / "weights.pt").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00garbage")
    with pytest.raises(BundleError, match="checksum of weights.pt"):
        Recommender.load(bad)


def test_incompatible_or_missing_bundle_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no model bundle"):
        Recommender.load(tmp_path / "missing")
    old = _copy(tiny_bundle, tmp_path / "old")
    meta = json.loads((old / "meta.json").read_text())
    meta["format_version"] = 99
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="format_version"):
        Recommender.load(old)
    gone = _copy(tiny_bundle, tmp_path / "gone")
    (gone / "item_ids.json").unlink()
    with pytest.raises(BundleError, match="item_ids.json is missing"):
        Recommender.load(gone)


@pytest.mark.parametrize("text", ["[1, 2]", '"meta"', "{not json"])
def test_meta_json_that_is_not_an_object_is_a_bundle_error(
    tiny_bundle: Path, tmp_path: Path, text: str
) -> None:
    odd = _copy(tiny_bundle, tmp_path / "odd")
    (odd / "meta.json").write_text(text)
    with pytest.raises(BundleError, match="meta.json is not"):
        Recommender.load(odd)
    with pytest.raises(BundleError, match="meta.json is not"):
        Recommender.read_meta(odd)


def test_save_refuses_to_overwrite_unless_asked(rec: Recommender, tmp_path: Path) -> None:
    path = rec.save(tmp_path / "b")
    with pytest.raises(FileExistsError):
        rec.save(path)
    rec.save(path, overwrite=True)
    assert Recommender.load(path).version == rec.version


def test_string_ids_round_trip(tmp_path: Path) -> None:
    from recvae.config import MultVAEConfig, RunOptions
    from recvae.data import Interactions
    from recvae.training import train

    data, _ = make_checkerboard(20, 10)
    named = Interactions(
        data.matrix,
        np.asarray([f"u{i}" for i in range(20)], dtype=object),
        np.asarray([f"item-{i}" for i in range(10)], dtype=object),
    )
    rec = train(
        named,
        MultVAEConfig(hidden_dims=(8,), latent_dim=4, epochs=2, batch_size=8),
        options=RunOptions(device="cpu", progress=False),
    )
    loaded = Recommender.load(rec.save(tmp_path / "s"))
    out = loaded.recommend(["u3"], k=2)
    assert all(isinstance(i, str) and i.startswith("item-") for i in out.item_ids[0])


def test_save_flushes_every_file_before_the_bundle_takes_its_name(
    rec: Recommender, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import record_fsyncs

    path = rec.save(tmp_path / "b")
    events = record_fsyncs(monkeypatch)
    rec.save(path, overwrite=True)
    target = str(path.resolve())
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert renames and events[renames[-1]] == ("rename", target)
    before = [Path(p) for kind, p in events[: renames[0]] if kind == "fsync"]
    # Every file of the new bundle and its directory reach the disk before any rename ...
    files = {p.name for p in before if p.parent.name.endswith(".tmp")}
    assert files == {p.name for p in path.iterdir()}
    assert any(p.name.endswith(".tmp") and p.parent == path.parent.resolve() for p in before)
    # ... and the renames themselves after them (the parent directory is flushed last).
    assert events[-1] == ("fsync", str(path.parent.resolve()))
    assert Recommender.load(path).version == rec.version


def test_an_interrupted_replacement_says_where_the_previous_bundle_is(
    rec: Recommender, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = rec.save(tmp_path / "b")
    real_rename = os.rename

    def crash_on_the_second_rename(src: object, dst: object) -> None:
        if str(src).endswith(".tmp"):
            raise OSError("simulated crash between the two renames")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", crash_on_the_second_rename)
    with pytest.raises(OSError, match="simulated"):
        rec.save(path, overwrite=True)
    monkeypatch.undo()
    previous = tmp_path / ".b.old"
    with pytest.raises(
        BundleError, match=r"interrupted; the previous bundle is intact at .*b\.old"
    ):
        Recommender.load(path)
    assert Recommender.load(previous).version == rec.version
    # Only a leftover temp bundle is cleaned up; nothing else is in the folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.old"]


def test_popular_items_rank_by_training_count_with_ties_by_position(rec: Recommender) -> None:
    # The popularity fallback of the HTTP API and of `recvae recommend` (one rule, here).
    import scipy.sparse as sp

    rows = [0, 1, 2, 0, 1, 2, 3]
    cols = [5, 5, 5, 2, 2, 2, 7]
    matrix = sp.csr_array(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(4, rec.n_items)
    )
    users = np.arange(100, 104)
    small = Recommender(rec.model, rec.config, rec.item_ids, user_ids=users, train_matrix=matrix)
    got = small.popular_items(4)
    zero = [i for i in range(rec.n_items) if i not in (2, 5, 7)][0]
    assert [i for i, _ in got] == rec.item_ids[[2, 5, 7, zero]].tolist()
    np.testing.assert_allclose([s for _, s in got], [0.75, 0.75, 0.25, 0.0])
    excluded = small.popular_items(2, exclude_idx=[2, 7])
    assert [i for i, _ in excluded] == rec.item_ids[[5, zero]].tolist()
    assert len(small.popular_items(rec.n_items + 5)) == rec.n_items
    assert len(small.popular_items(rec.n_items, exclude_idx=[0, 1])) == rec.n_items - 2
    order, share = small.popularity_ranking()
    assert order[:3].tolist() == [2, 5, 7] and share.dtype == np.float32
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            small.popular_items(bad)  # type: ignore[arg-type]
