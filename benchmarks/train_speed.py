#!/usr/bin/env python
"""Training speed of rnnlm against the plain-PyTorch loop ``raw_lm.py``, same settings, same run.

Runs alternate (raw, rnnlm, raw, rnnlm, ...) so drift in the machine's speed hits both. Each side
reports the median tokens/s of its training steps (forward, backward, clipping, optimizer step),
leaving out the first ``--warmup`` steps; rnnlm also reports its wall-clock rate, which adds data
loading, logging and Lightning's hooks between steps.

    python benchmarks/train_speed.py            # LSTM 2x200, seq 35, batch 20 on PTB (../shared/data)
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


def run_raw(args) -> float:
    ptb = args.data_dir / "ptb"
    cmd = [sys.executable, str(args.raw), "--data", *(str(ptb / f"ptb.{s}.txt") for s in ("train", "valid", "test")),
           "--level", "word", "--model", args.model, "--emsize", str(args.size), "--nhid", str(args.size),
           "--nlayers", "2", "--bptt", str(args.seq_len), "--batch-size", str(args.batch_size), "--lr", "20",
           "--clip", "0.25", "--dropout", "0.2", "--max-steps", str(args.steps), "--warmup-steps", str(args.warmup),
           "--no-eval", "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["train_tok_per_s_median"]


def run_rnnlm(args, out_dir: Path) -> tuple[float, float]:
    """Median step rate and wall-clock rate of rnnlm on the same settings (no validation)."""
    overrides = [
        f"model={args.model}", "data=word", "data.corpus=ptb", f"paths.data_dir={args.data_dir}",
        f"paths.cache_dir={out_dir / 'cache'}", f"model.embedding_dim={args.size}", f"model.hidden_size={args.size}",
        "model.num_layers=2", "model.dropout=0.2", f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch_size}",
        "optimizer=sgd", "optimizer.lr=20", "scheduler=none", "trainer.gradient_clip_val=0.25",
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
    parser.add_argument("--model", default="lstm", choices=["rnn", "lstm", "gru"])
    parser.add_argument("--size", type=int, default=200, help="embedding and hidden size")
    parser.add_argument("--seq-len", type=int, default=35)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the medians")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args()
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
    print(f"\nPTB word {args.model} 2x{args.size}, seq {args.seq_len}, batch {args.batch_size}, {args.steps} steps, "
          f"{args.device},"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.rounds} rounds")
    print(f"raw_lm.py        {r:>9,.0f} tok/s")
    print(f"rnnlm (steps)    {o:>9,.0f} tok/s   ratio to raw {o / r:.3f}")
    print(f"rnnlm (wall)     {w:>9,.0f} tok/s   ratio to raw {w / r:.3f}")


if __name__ == "__main__":
    main()
