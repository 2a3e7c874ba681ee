#!/usr/bin/env python
"""Where a training step's time goes: the network's own work against what the framework adds, per optimizer step.

Three measurements of the same model, data and optimizer, alternated in one run (``--rounds``):

- **plain**: a plain PyTorch loop over rnnlm's own network (``RecurrentLM._step``: forward and loss, then
  backward, clipping, optimizer step): what the step costs without Lightning or callbacks;
- **rnnlm**: ``train()`` as a user runs it, once per ``--chunks`` value (``trainer.chunks_per_call``), timed from
  the first step's start to the last step's end, divided by the steps;
- the difference, the framework's cost per step (Lightning's loop, hooks, logging, callbacks, data transfer).

``--cprofile`` adds, for the last ``train()`` of the run, the functions that take the most time per step (under
cProfile, which slows Python code down, so read it for shares, not for times). The timing works with any
checkout of rnnlm (it reads only ``trainer.global_step``), so the same script measures an older version:
``PYTHONPATH=<old checkout>/src python benchmarks/step_profile.py``.

    python benchmarks/step_profile.py                         # char LSTM 1x64 (train_speed.py --config char64)
    python benchmarks/step_profile.py --chunks 1 4 16 --rounds 3 --cprofile
    python benchmarks/step_profile.py --config ptb --steps 200
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import PRESETS, compose_rnnlm  # noqa: E402  (the same settings as the speed benchmark)

from rnnlm.commands.train import train  # noqa: E402


class WallPerStep(L.Callback):
    """Seconds per optimizer step from the first step's start to the last step's end, leaving out ``warmup``
    steps (counted with ``trainer.global_step``, however many steps a call of the training step takes)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start: tuple[float, int] | None = None
        self.end: tuple[float, int] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None and trainer.global_step >= self.warmup:
            self.start = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = (time.perf_counter(), trainer.global_step)

    def seconds(self) -> float:
        return (self.end[0] - self.start[0]) / (self.end[1] - self.start[1])


def plain_seconds(args, steps: int) -> float:
    """Seconds per step of a plain PyTorch loop over rnnlm's network, on the run's first ``steps`` chunks."""
    cfg = compose_rnnlm(args, [])
    data = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.model, _partial_=True, _convert_="all")(vocab=data.vocab)
    data.setup()
    chunks = [chunk for _, chunk in zip(range(steps), iter(data.datasets["train"]), strict=False)]
    optimizer = module.configure_optimizers()  # the optimizer train() makes (fused where torch has it)
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    times = []
    for chunk in chunks:
        start = time.perf_counter()
        total, count = module._step(chunk, "train")
        loss = total / count
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), args.clip)
        optimizer.step()
        loss.item()
        times.append(time.perf_counter() - start)
    return statistics.mean(times[args.warmup:])


def rnnlm_seconds(args, chunks: int | None, out: Path, profile: cProfile.Profile | None = None) -> float:
    extra = [] if chunks is None else [f"trainer.chunks_per_call={chunks}"]
    cfg = compose_rnnlm(args, extra)
    cfg.paths.output_dir = str(out)
    timer = WallPerStep(args.warmup)
    if profile:
        profile.enable()
    train(cfg, extra_callbacks=[timer])
    if profile:
        profile.disable()
    return timer.seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="char64", choices=sorted(PRESETS))
    parser.add_argument("--chunks", type=int, nargs="+", default=[None],
                        help="trainer.chunks_per_call values to measure (default: the configured one)")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cprofile", action="store_true", help="also profile the last run's functions")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/profile"))
    args = parser.parse_args()
    for key, value in PRESETS[args.config].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.model, args.device, args.threads, args.cache_dir = "lstm", "cpu", 0, args.out / "cache"
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    plain, ours = [], {c: [] for c in args.chunks}
    profile = cProfile.Profile() if args.cprofile else None
    for round_ in range(args.rounds):
        plain.append(plain_seconds(args, args.steps))
        for i, chunks in enumerate(args.chunks):
            last = round_ == args.rounds - 1 and i == len(args.chunks) - 1
            ours[chunks].append(rnnlm_seconds(args, chunks, args.out / f"r{round_}c{i}", profile if last else None))
    base = statistics.median(plain)
    print(f"\n{args.config}: {args.steps} steps, {args.warmup} left out, medians of {args.rounds} rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"plain loop over rnnlm's network   {base * 1e3:7.2f} ms/step")
    for chunks, seconds in ours.items():
        s = statistics.median(seconds)
        name = "configured" if chunks is None else str(chunks)
        print(f"rnnlm, chunks_per_call={name:<10} {s * 1e3:7.2f} ms/step   framework {(s - base) * 1e3:+6.2f} ms/step"
              f"   plain / rnnlm {base / s:.3f}")
    if profile:
        steps = args.steps
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(40)
        print(f"\ncProfile of the last run (cumulative seconds over {steps} steps; divide by {steps} for per step):")
        print(text.getvalue())


if __name__ == "__main__":
    main()
