"""Shared fixtures: a seeded rng, a tiny hand-written frame, the checkerboard and a tiny bundle."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

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


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mult-VAE trained briefly on the checkerboard and saved (built once per test run)."""
    from recvae.config import MultVAEConfig, RunOptions
    from recvae.training import train

    data, _ = make_checkerboard()
    config = MultVAEConfig(
        hidden_dims=(16,),
        latent_dim=8,
        epochs=30,
        batch_size=16,
        learning_rate=1e-2,
        dropout=0.2,
        seed=1,
    )
    rec = train(data, config, options=RunOptions(device="cpu", progress=False))
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
