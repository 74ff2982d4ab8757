"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder: ``$MEDVL_SHARED_DATA``, else ``<repo>/../shared/data``."""
    folder = Path(os.environ.get("MEDVL_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")
    if not folder.is_dir():
        pytest.skip(f"shared data folder not found: {folder} (set MEDVL_SHARED_DATA)")
    return folder


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small phantom dataset (96 cases, 64 px) shared by the training and CLI tests."""
    from medvl.data.phantom import generate_phantom

    folder = tmp_path_factory.mktemp("phantom") / "data"
    generate_phantom(folder, n=96, seed=3, size=64)
    return folder


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory, shared_data) -> Path:
    """A small MedMNIST-style file cut from the real PneumoniaMNIST (train 240, val 80)."""
    import numpy as np

    source = np.load(shared_data / "pneumoniamnist" / "pneumoniamnist.npz")
    rng = np.random.default_rng(0)
    train = rng.choice(len(source["train_labels"]), size=240, replace=False)
    val = rng.choice(len(source["val_labels"]), size=80, replace=False)
    path = tmp_path_factory.mktemp("npz") / "pneumoniamnist_tiny.npz"
    np.savez(path, train_images=source["train_images"][train], train_labels=source["train_labels"][train],
             val_images=source["val_images"][val], val_labels=source["val_labels"][val])
    return path
