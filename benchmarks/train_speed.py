#!/usr/bin/env python
"""Training speed of rnnlm against the plain-PyTorch loop ``raw_lm.py``, same settings, same run.

Runs alternate (raw, rnnlm, raw, rnnlm, ...) so drift in the machine's speed hits both. Each side
reports the median tokens/s of its training steps (forward, backward, clipping, optimizer step),
leaving out the first ``--warmup`` steps; rnnlm also reports its wall-clock rate, which adds data
loading, logging and Lightning's hooks between steps.

    python benchmarks/train_speed.py                        # PTB word LSTM 2x200, seq 35, batch 20, SGD
    python benchmarks/train_speed.py --config char512       # tiny Shakespeare char LSTM 2x512, seq 128, batch 64, Adam
    python benchmarks/train_speed.py --config char64        # char LSTM 1x64: per-step costs show most
    python benchmarks/train_speed.py --device cuda --size 650
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from rnnlm.cli import CONF_DIR
from rnnlm.train import train


class StepTimer(L.Callback):
    """Tokens/s of each training step, from batch start to batch end, and of the whole run."""

    def __init__(self):
        self.rates: list[float] = []
        self.tokens = 0
        self._t0 = 0.0
        self.first_start: float | None = None
        self.last_end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()
        self.first_start = self.first_start or self._t0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.last_end = time.perf_counter()
        self.rates.append(batch[1].numel() / (self.last_end - self._t0))
        self.tokens += batch[1].numel()


# The configurations compared; a flag given on the command line wins over its preset.
PRESETS = {
    "ptb": dict(corpus="ptb", level="word", emsize=200, size=200, layers=2, seq_len=35, batch_size=20,
                optimizer="sgd", lr=20.0, clip=0.25, dropout=0.2, steps=300),
    "char512": dict(corpus="tinyshakespeare", level="char", emsize=128, size=512, layers=2, seq_len=128, batch_size=64,
                    optimizer="adam", lr=2e-3, clip=5.0, dropout=0.2, steps=60),
    "char64": dict(corpus="tinyshakespeare", level="char", emsize=64, size=64, layers=1, seq_len=64, batch_size=32,
                   optimizer="adam", lr=2e-3, clip=5.0, dropout=0.0, steps=400),
}
CORPUS_FILES = {"ptb": [f"ptb/ptb.{s}.txt" for s in ("train", "valid", "test")],
                "tinyshakespeare": ["tinyshakespeare/input.txt"]}


def run_raw(args) -> float:
    cmd = [sys.executable, str(args.raw), "--data", *(str(args.data_dir / f) for f in CORPUS_FILES[args.corpus]),
           "--level", args.level, "--model", args.model, "--emsize", str(args.emsize), "--nhid", str(args.size),
           "--nlayers", str(args.layers), "--bptt", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--optimizer", args.optimizer, "--lr", str(args.lr), "--clip", str(args.clip), "--dropout",
           str(args.dropout), "--max-steps", str(args.steps), "--warmup-steps", str(args.warmup), "--no-eval",
           "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["train_tok_per_s_median"]


def run_rnnlm(args, out_dir: Path) -> tuple[float, float]:
    """Median step rate and wall-clock rate of rnnlm on the same settings (no validation)."""
    overrides = [
        f"model={args.model}", f"data={args.level}", f"data.corpus={args.corpus}", f"paths.data_dir={args.data_dir}",
        f"paths.cache_dir={out_dir / 'cache'}", f"model.embedding_dim={args.emsize}", f"model.hidden_size={args.size}",
        f"model.num_layers={args.layers}", f"model.dropout={args.dropout}", f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch_size}", f"optimizer={args.optimizer}", f"optimizer.lr={args.lr}",
        "scheduler=none", f"trainer.gradient_clip_val={args.clip}",
        f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}", "test=false", "~callbacks.text_samples",
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    cfg.paths.output_dir = str(out_dir / "run")
    timer = StepTimer()
    train(cfg, extra_callbacks=[timer])
    wall = timer.tokens / (timer.last_end - timer.first_start)
    return statistics.median(timer.rates[args.warmup:]), wall


def main() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=shared / "bench" / "raw_lm.py")
    parser.add_argument("--data-dir", type=Path, default=shared / "data", help="holds ptb/ptb.{train,valid,test}.txt")
    parser.add_argument("--config", default="ptb", choices=sorted(PRESETS))
    parser.add_argument("--model", default="lstm", choices=["rnn", "lstm", "gru"])
    parser.add_argument("--size", type=int, help="hidden size (ptb: also the embedding size)")
    parser.add_argument("--emsize", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the medians")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args()
    preset = dict(PRESETS[args.config])
    if args.config == "ptb" and args.size and not args.emsize:
        args.emsize = args.size
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    raw, ours, wall = [], [], []
    for round_ in range(args.rounds):
        raw.append(run_raw(args))
        step_rate, wall_rate = run_rnnlm(args, args.out / f"round{round_}")
        ours.append(step_rate)
        wall.append(wall_rate)
        print(f"round {round_}: raw_lm {raw[-1]:,.0f} tok/s | rnnlm {ours[-1]:,.0f} tok/s (steps), "
              f"{wall[-1]:,.0f} tok/s (wall)", flush=True)
    r, o, w = statistics.median(raw), statistics.median(ours), statistics.median(wall)
    print(f"\n{args.corpus} {args.level} {args.model} {args.layers}x{args.size} (emb {args.emsize}), "
          f"seq {args.seq_len}, batch {args.batch_size}, {args.optimizer} lr {args.lr}, {args.steps} steps, "
          f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"medians of {args.rounds} rounds")
    print(f"raw_lm.py        {r:>9,.0f} tok/s")
    print(f"rnnlm (steps)    {o:>9,.0f} tok/s   ratio to raw {o / r:.3f}")
    print(f"rnnlm (wall)     {w:>9,.0f} tok/s   ratio to raw {w / r:.3f}")


if __name__ == "__main__":
    main()
