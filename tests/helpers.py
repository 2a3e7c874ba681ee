"""What the tests share that is not a fixture: paths, the tiny sizes and corpus, composing the real config,
reading a run's logged scalars, and an object whose unpickling would run code."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rnnlm.commands.cli import CONF_DIR

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


def write_tiny_corpus(folder: Path) -> Path:
    """A small repetitive text (200 lines) that a model can learn in a few dozen steps."""
    path = folder / "tiny.txt"
    path.write_text("\n".join(PANGRAMS * 50) + "\n", encoding="utf-8")
    return path


def compose_train(overrides: list[str], run_dir: Path, data_dir: Path, cache_dir: Path,
                  tiny: bool = True) -> DictConfig:
    """conf/train.yaml with overrides, writing to run_dir; tiny sizes unless tiny=False."""
    base = [f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}", f"paths.log_dir={run_dir.parent}"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=base + (TINY if tiny else []) + list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar a run logged to TensorBoard, by tag, in step order."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


class Payload:
    """Unpickling this object would create a file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))
