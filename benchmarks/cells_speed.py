#!/usr/bin/env python
"""Forward + backward cost per token of one recurrent layer: fused torch.nn vs rnnlm's textbook cells
(eager, and under ``torch.compile``), for LSTM and GRU, measured in the same run.

    python benchmarks/cells_speed.py                 # batch 32, seq 64, hidden 256
    python benchmarks/cells_speed.py --skip-compile

The compiled cells pay a one-off compilation on their first call; it is reported on its own line.
``fused (no oneDNN)`` is torch.nn's own kernel with the oneDNN RNN primitive switched off.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rnnlm.stack import RecurrentStack


def per_token_us(forward, params, tokens: int, repeats: int, iters: int) -> float:
    """Median microseconds per token of forward + backward (gradients dropped each call)."""

    def step():
        for p in params:
            p.grad = None
        forward().sum().backward()

    for _ in range(2):
        step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            step()
        samples.append((time.perf_counter() - start) / iters / tokens * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    print(f"batch {args.batch} x seq {args.seq}, hidden {args.hidden}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; forward + backward, microseconds per token (median)")
    for cell in ("lstm", "gru"):
        bench_cell(cell, args)


def bench_cell(cell: str, args) -> None:
    tokens = args.batch * args.seq
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.hidden)
    fused = RecurrentStack(cell, args.hidden, args.hidden, impl="fused")
    scratch = RecurrentStack(cell, args.hidden, args.hidden, impl="scratch")
    scratch.load_fused_state_dict(fused.fused_state_dict())

    def run_fused_plain():
        with torch.backends.mkldnn.flags(enabled=False):
            return fused(x)[0]

    def measure(forward, module) -> float:
        return per_token_us(forward, list(module.parameters()), tokens, args.repeats, args.iters)

    rows = {
        "fused": measure(lambda: fused(x)[0], fused),
        "fused (no oneDNN)": measure(run_fused_plain, fused),
        "scratch": measure(lambda: scratch(x)[0], scratch),
    }
    if not args.skip_compile:
        compiled = RecurrentStack(cell, args.hidden, args.hidden, impl="scratch")
        compiled.load_fused_state_dict(fused.fused_state_dict())
        compiled.compile()
        start = time.perf_counter()
        compiled(x)[0].sum().backward()  # the first call compiles forward and backward
        startup = time.perf_counter() - start
        rows["scratch, compiled"] = measure(lambda: compiled(x)[0], compiled)
    for name, us in rows.items():
        print(f"{cell:4s} {name:18s} {us:7.2f} us/token   {us / rows['fused']:5.2f}x fused", flush=True)
    if not args.skip_compile:
        print(f"{cell:4s} compile start-up     {startup:7.1f} s (first call)", flush=True)


if __name__ == "__main__":
    main()
