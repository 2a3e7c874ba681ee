"""A synthetic long-range memory task (``data=recall``): recall a key read ``distance`` tokens earlier.

Each line is ``K n n ... n ? K``: a key ``K`` (one of ``keys``), ``distance - 1`` noise words (one of
``noise``, drawn at random), the query mark ``?``, then the key again. With ``data.scored=last`` only that
last word is scored, so the loss and ``answer_acc`` say whether the model still holds the key after
``distance`` steps; chance is ``1 / keys``. The chapter's example is a traveller who says at the start that
they came to Moscow, and many words later "here is ___" must be filled with "Moscow".

The three splits are drawn from ``seed`` (train, valid and test from separate streams) and written once,
as text, into a folder named after the settings; the rest of the pipeline reads it as any word corpus.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from rnnlm.files import moved_into_place, temporary_folder, write_atomically

QUERY = "?"
SPLIT_SEEDS = {"train": 0, "valid": 1, "test": 2}


def recall_lines(distance: int, keys: int, noise: int, examples: int, seed: int) -> list[str]:
    """``examples`` lines of the task, reproducible from ``seed``."""
    rng = random.Random(seed)
    lines = []
    for _ in range(examples):
        key = f"k{rng.randrange(keys)}"
        filler = [f"n{rng.randrange(noise)}" for _ in range(distance - 1)]
        lines.append(" ".join([key, *filler, QUERY, key]))
    return lines


def write_recall_corpus(cache_dir: Path, distance: int, keys: int = 16, noise: int = 32,
                        examples: tuple[int, int, int] = (4000, 500, 500), seed: int = 0) -> Path:
    """The folder holding train.txt, valid.txt and test.txt of the task with these settings (written on first
    use, atomically; the same settings always give the same text)."""
    settings = {"distance": distance, "keys": keys, "noise": noise, "examples": list(examples), "seed": seed}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir).expanduser() / "recall" / f"d{distance}-k{keys}-n{noise}-{digest}"
    if folder.is_dir():
        return folder
    elsewhere = "RNNLM_CACHE_DIR=DIR or paths.cache_dir=DIR"
    tmp = temporary_folder(folder, elsewhere)
    with moved_into_place(tmp, folder, elsewhere=elsewhere):  # another process may write it first: the same text
        for (split, offset), count in zip(SPLIT_SEEDS.items(), examples, strict=True):
            lines = recall_lines(distance, keys, noise, count, seed * 3 + offset)
            write_atomically(tmp / f"{split}.txt", "\n".join(lines) + "\n")
        write_atomically(tmp / "settings.json", json.dumps(settings, indent=1) + "\n")
    return folder
