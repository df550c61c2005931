"""Shared fixtures (seeded rng, tiny frame, checkerboard, tiny bundle) and test helpers."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import scipy.sparse as sp

if TYPE_CHECKING:
    from recvae.config import ModelConfig, MultVAEConfig, RunOptions
    from recvae.data import Interactions
    from recvae.split import HeldOut

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# `recvae train/experiment/tune` log to MLflow by default; tests opt in with --tracking-uri.
os.environ.setdefault("RECVAE_TRACKING", "off")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip when it is absent."""
    env = os.environ.get("RECVAE_SHARED_DATA")
    path = Path(env) if env else SHARED_DATA
    if not path.is_dir():
        pytest.skip(f"real datasets not available: {path} does not exist")
    return path


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterable[None]:
    """Undo a test's ``torch.set_num_threads`` (direct, or through ``--threads``/``num_threads``):
    the thread count is process-wide and changes what training does (``item_multiple``, BLAS)."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    return shared_data_dir()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(42)


@pytest.fixture
def tiny_df():  # type: ignore[no-untyped-def]
    import polars as pl

    return pl.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 2, 3, 3, 3, 3, 1],
            "item_id": [10, 20, 30, 10, 40, 20, 30, 40, 50, 10],
            "rating": [5.0, 4.0, 2.0, 4.5, 3.0, 5.0, 4.0, 4.0, 1.0, 5.0],
        }
    )


def make_checkerboard(n_users: int = 60, n_items: int = 20):  # type: ignore[no-untyped-def]
    """Even users like even items, odd users odd items; user u's item ``u % n_items`` is withheld.

    Returns ``(interactions, withheld)`` where ``withheld[u]`` is the withheld item position.
    """
    from recvae.data import Interactions

    rows, cols, withheld = [], [], []
    for u in range(n_users):
        held = u % n_items
        withheld.append(held)
        for i in range(u % 2, n_items, 2):
            if i != held:
                rows.append(u)
                cols.append(i)
    matrix = sp.csr_array(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n_users, n_items)
    )
    return Interactions(matrix, np.arange(n_users), np.arange(n_items) * 10), np.asarray(withheld)


@pytest.fixture
def checkerboard():  # type: ignore[no-untyped-def]
    return make_checkerboard()


def small_vae_config(**overrides: Any) -> MultVAEConfig:
    """The small Mult-VAE that learns the checkerboard in 30 epochs; ``overrides`` set fields."""
    from recvae.config import MultVAEConfig

    fields: dict[str, Any] = {
        "hidden_dims": (16,),
        "latent_dim": 8,
        "epochs": 30,
        "batch_size": 16,
        "learning_rate": 1e-2,
        "dropout": 0.2,
        "seed": 1,
    }
    fields.update(overrides)
    return MultVAEConfig(**fields)


def interrupt_training(
    data: Interactions,
    config: ModelConfig,
    checkpoint_dir: Path,
    *,
    after_epoch: int,
    validation: HeldOut | None = None,
    **options: Any,
) -> RunOptions:
    """Train on the CPU with checkpoints in ``checkpoint_dir`` and crash after ``after_epoch``.

    Returns:
        The ``RunOptions`` (with the extra ``options`` fields) that resume from the checkpoint.
    """
    from recvae.config import RunOptions
    from recvae.training import train

    class Interrupt(Exception):
        pass

    def stop(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == after_epoch:
            raise Interrupt

    resumable = RunOptions(
        device="cpu", progress=False, checkpoint_dir=str(checkpoint_dir), **options
    )
    with pytest.raises(Interrupt):
        train(data, config, validation=validation, options=resumable, on_epoch=stop)
    return resumable


def write_csv(path: Path, header: str, rows: Iterable[Iterable[object]]) -> Path:
    """Write ``header`` then one comma-joined line per row; returns ``path``."""
    lines = [header, *(",".join(str(value) for value in row) for row in rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``recvae ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    from pipelines.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def write_interactions_csv(data: Interactions, path: Path) -> Path:
    """``data`` as a ``user_id,item_id`` CSV of its (row, column) positions; returns ``path``."""
    coo = data.matrix.tocoo()
    return write_csv(path, "user_id,item_id", zip(coo.row, coo.col, strict=True))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mult-VAE trained briefly on the checkerboard and saved (built once per test run)."""
    from recvae.config import RunOptions
    from recvae.training import train

    data, _ = make_checkerboard()
    rec = train(data, small_vae_config(), options=RunOptions(device="cpu", progress=False))
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    rec.save(path)
    return path


@pytest.fixture
def mlflow_uri(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh, empty sqlite MLflow store in ``tmp_path`` (``sqlite:///.../mlflow.db``).

    Creating a store runs all of MLflow's schema migrations (10-20 s here), so a migrated empty
    database is made once, kept in pytest's cache (keyed by the MLflow version), and copied.
    """
    pytest.importorskip("mlflow")
    import shutil
    import uuid

    import mlflow

    cache = getattr(request.config, "cache", None)
    if cache is not None:
        folder = cache.mkdir(f"mlflow-{mlflow.__version__}-empty-store")
    else:  # no cache plugin: one template per test session
        folder = request.getfixturevalue("tmp_path_factory").getbasetemp() / "mlflow-template"
        folder.mkdir(exist_ok=True)
    template = Path(folder) / "mlflow.db"
    if not template.is_file():
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        building = Path(folder) / f"building-{uuid.uuid4().hex}.db"
        store = SqlAlchemyStore(f"sqlite:///{building}", (Path(folder) / "artifacts").as_uri())
        store.engine.dispose()
        building.replace(template)
    database = tmp_path / "mlflow.db"
    shutil.copyfile(template, database)
    return f"sqlite:///{database}"


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record ``("fsync", path)`` for every ``os.fsync`` and ``("rename", target)`` for every
    rename/replace, in order (Linux: the path of an fd is read from /proc)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("reading the path of an open file needs /proc (Linux)")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        events.append(("rename", str(Path(dst).resolve())))
        real_replace(src, dst, *args, **kwargs)

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        events.append(("rename", str(Path(dst).resolve())))
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events
