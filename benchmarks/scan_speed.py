#!/usr/bin/env python
"""Training speed of minGRU and minLSTM (parallel scan, and step by step) against torch.nn's GRU and LSTM, same run.

Each contender is a one-layer ``rnnlm.network.LanguageModel`` (char-level: vocabulary 65, embedding 128, hidden
256 by default) trained with AdamW on random tokens, batch 32; a training step is forward, cross-entropy,
backward and the optimizer step. The question is how the cost grows with the sequence length: torch.nn's kernels
and the step-by-step loop take T steps one after another; the scan takes ``rnnlm.cells.scan.SCAN_CHUNK`` (64) steps
at once, chunk after chunk.

    python benchmarks/scan_speed.py                             # seq 128, 512, 2048: 2-3 minutes on 2 CPU cores
    python benchmarks/scan_speed.py --device cuda --batch 64 --seq 512 2048 8192
    python benchmarks/scan_speed.py --contenders gru mingru "mingru loop" --seq 2048
    python benchmarks/scan_speed.py --quick                     # a smoke run: every contender runs; times nothing

Every measurement trains about ``--tokens`` tokens (more steps at short sequences; at least one step); each
round times every contender once, in turn (so drift in the machine's speed hits all of them), after one untimed
step of each. Printed: median tokens/s (min-max over the rounds), and the ratios of the medians against GRU and
LSTM and of the scan against the loop. At equal hidden size the min cells have fewer weights (no hidden-to-hidden
matrix); their recurrent parameters are printed with them. Measure on otherwise idle cores: with another job on
them, torch.nn's GRU on the CPU was seen to slow down 20-fold, and LSTM not at all.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rnnlm.network import LanguageModel, NetworkConfig

# name -> (cell, impl): impl=fused is torch.nn's kernel, or for the min cells the parallel scan
CONTENDERS = {
    "gru": ("gru", "fused"),
    "mingru": ("mingru", "fused"),
    "mingru loop": ("mingru", "scratch"),
    "lstm": ("lstm", "fused"),
    "minlstm": ("minlstm", "fused"),
    "minlstm loop": ("minlstm", "scratch"),
}
DEFAULT = ["gru", "mingru", "mingru loop", "lstm", "minlstm"]
# (numerator, denominator) of the printed ratios, where both were measured
RATIOS = [("mingru", "gru"), ("mingru loop", "gru"), ("mingru", "mingru loop"), ("minlstm", "lstm"),
          ("minlstm", "minlstm loop")]


def make_step(net: LanguageModel, tokens: torch.Tensor):
    """One training step of ``net`` on tokens (B, T+1): inputs are the first T, targets the last T."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        logits, _ = net(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` training steps (waiting for the GPU to finish on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(args, seq_len: int, device: torch.device) -> dict[str, list[float]]:
    """Tokens/s of every contender at one sequence length, one value per round."""
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, seq_len + 1), device=device)
    steps = {}
    for name in args.contenders:
        cell, impl = CONTENDERS[name]
        torch.manual_seed(0)
        config = NetworkConfig(args.vocab, cell, args.embedding_dim, args.hidden_size, 1, dropout=0.0, impl=impl)
        steps[name] = make_step(LanguageModel(config).to(device).train(), tokens)
    per_measure = max(1, round(args.tokens / (args.batch * seq_len)))
    for step in steps.values():  # untimed: first-call costs (allocations, oneDNN primitives, the optimizer's state)
        step()
    rates = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            rates[name].append(per_measure * args.batch * seq_len / timed(step, per_measure, device))
    return rates


def recurrent_parameters(args, name: str) -> int:
    cell, impl = CONTENDERS[name]
    config = NetworkConfig(args.vocab, cell, args.embedding_dim, args.hidden_size, 1, dropout=0.0, impl=impl)
    return sum(p.numel() for p in LanguageModel(config).backbone.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512, 2048], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=65, help="tiny Shakespeare has 65 characters")
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--contenders", nargs="+", default=DEFAULT, choices=list(CONTENDERS), metavar="NAME",
                        help=f"from {', '.join(repr(c) for c in CONTENDERS)} (default: {', '.join(DEFAULT)})")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32768, help="tokens trained per measurement (at least one step)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (seq 16 and 64, batch 4, hidden 32, one round of few tokens): every "
                             "contender runs, nothing is measured")
    args = parser.parse_args()
    if args.quick:
        args.seq, args.batch, args.embedding_dim, args.hidden_size = [16, 64], 4, 16, 32
        args.rounds, args.tokens = 1, 256

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = f"{args.device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else args.device
    print(f"1x{args.hidden_size}, emb {args.embedding_dim}, vocab {args.vocab}, batch {args.batch}, AdamW, {where}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; training tokens/s: median (min-max) of "
          f"{args.rounds} rounds of at least {args.tokens:,} tokens")
    print("recurrent parameters: " + ", ".join(f"{name} {recurrent_parameters(args, name):,}"
                                               for name in args.contenders))
    results = {}
    for seq_len in args.seq:
        rates = measure(args, seq_len, device)
        results[seq_len] = rates
        print(f"\nseq {seq_len}")
        for name, values in rates.items():
            print(f"  {name:<13} {statistics.median(values):>10,.0f} ({min(values):,.0f}-{max(values):,.0f}) tokens/s",
                  flush=True)

    ratios = [(a, b) for a, b in RATIOS if a in args.contenders and b in args.contenders]
    print("\n| seq | " + " | ".join(f"{name} tok/s" for name in args.contenders) + " | "
          + " | ".join(f"{a} / {b}" for a, b in ratios) + " |")
    print("|---:|" + "---:|" * (len(args.contenders) + len(ratios)))
    for seq_len, rates in results.items():
        medians = {name: statistics.median(values) for name, values in rates.items()}
        print(f"| {seq_len} | " + " | ".join(f"{medians[name]:,.0f}" for name in args.contenders) + " | "
              + " | ".join(f"{medians[a] / medians[b]:.2f}" for a, b in ratios) + " |")


if __name__ == "__main__":
    main()
