"""Shared fixtures: the real config composed and shrunk, small corpora written on the spot, and the
offline copies of the real corpora (``RNNLM_DATA_DIR``, default ``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from rnnlm.cli import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RNNLM_DATA_DIR", REPO.parent / "shared" / "data"))

# Small enough that a run takes seconds on two CPU cores.
TINY = [
    "model.embedding_dim=16",
    "model.hidden_size=32",
    "model.num_layers=1",
    "data.seq_len=16",
    "data.batch_size=4",
    "data.eval_batch_size=2",
    "trainer.max_steps=4",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "callbacks.text_samples.num_tokens=20",
]

PANGRAMS = [
    "the quick brown fox jumps over the lazy dog",
    "pack my box with five dozen liquor jugs",
    "how vexingly quick daft zebras jump",
    "the five boxing wizards jump quickly",
]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ptb" / "ptb.train.txt").is_file():
        pytest.fail(f"the offline corpora are missing: set RNNLM_DATA_DIR (looked in {SHARED_DATA})")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One token cache for the whole session, so each real corpus is tokenized once."""
    return tmp_path_factory.mktemp("token-cache")


def write_tiny_corpus(folder: Path) -> Path:
    """A small repetitive text (200 lines) that a model can learn in a few dozen steps."""
    path = folder / "tiny.txt"
    path.write_text("\n".join(PANGRAMS * 50) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    return write_tiny_corpus(tmp_path)


def compose_train(overrides: list[str], run_dir: Path, data_dir: Path, cache_dir: Path,
                  tiny: bool = True) -> DictConfig:
    """conf/train.yaml with overrides, writing to run_dir; tiny sizes unless tiny=False."""
    base = [f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}", f"paths.log_dir={run_dir.parent}"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=base + (TINY if tiny else []) + list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


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
    from rnnlm.train import train  # imports Lightning: only tests that train pay for it

    root = tmp_path_factory.mktemp("tiny-runs")
    runs: dict[tuple[str, ...], Path] = {}

    def _train(*overrides: str) -> Path:
        if overrides not in runs:
            run = root / f"run{len(runs)}"
            train(compose_train([f"data.path={session_corpus}", *overrides], run, shared_data, cache_dir))
            runs[overrides] = run
        return runs[overrides]

    return _train
