"""Shared fixtures: the real config composed and shrunk, small corpora written on the spot, and the
offline copies of the real corpora (``RNNLM_DATA_DIR``, default ``../shared/data``). Plain helpers are in
``helpers.py``, which test files import."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig

from helpers import SHARED_DATA, compose_train, write_tiny_corpus


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ptb" / "ptb.train.txt").is_file():
        pytest.fail(f"the offline corpora are missing: set RNNLM_DATA_DIR (looked in {SHARED_DATA})")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One token cache for the whole session, so each real corpus is tokenized once."""
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    return write_tiny_corpus(tmp_path)


@pytest.fixture
def make_cfg(tmp_path, shared_data, cache_dir):
    """Compose conf/train.yaml with overrides, outputs under tmp_path, tiny sizes by default."""

    def _make(*overrides: str, tiny: bool = True, run_dir: Path | None = None) -> DictConfig:
        return compose_train(list(overrides), run_dir or tmp_path / "run", shared_data, cache_dir, tiny)

    return _make


@pytest.fixture(scope="session")
def session_corpus(tmp_path_factory) -> Path:
    """The tiny corpus, written once for the whole session."""
    return write_tiny_corpus(tmp_path_factory.mktemp("session-corpus"))


@pytest.fixture(scope="session")
def train_tiny(tmp_path_factory, session_corpus, shared_data, cache_dir):
    """``train_tiny(*overrides)`` -> the run folder of a tiny char model trained on the tiny corpus (TINY
    sizes and ``data.path`` set, then ``overrides``). Each distinct set of overrides trains once per session."""
    from rnnlm.commands.train import train  # imports Lightning: only tests that train pay for it

    root = tmp_path_factory.mktemp("tiny-runs")
    runs: dict[tuple[str, ...], Path] = {}

    def _train(*overrides: str) -> Path:
        if overrides not in runs:
            run = root / f"run{len(runs)}"
            train(compose_train([f"data.path={session_corpus}", *overrides], run, shared_data, cache_dir))
            runs[overrides] = run
        return runs[overrides]

    return _train
