#!/usr/bin/env python
"""Generation speed: rnnlm's incremental decoding against the naive recipe, same model, same run.

The naive recipe re-runs the model on the whole growing text for every new token (what a model
without carried state must do). rnnlm reads the prompt once and then takes one recurrent step per
token (``rnnlm.sampling.generate``). Both sample from the same random weights of a 2x512 char LSTM.

    python benchmarks/generate_speed.py            # 500 new tokens, 1 sample, 3 rounds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rnnlm.network import LanguageModel
from rnnlm.sampling import generate, next_tokens


@torch.no_grad()
def naive_generate(net: LanguageModel, prompt: torch.Tensor, max_new_tokens: int, generator) -> torch.Tensor:
    text = prompt
    for _ in range(max_new_tokens):
        logits, _ = net(text)  # the whole prefix, every time
        token = next_tokens(logits[:, -1], 1.0, None, None, False, generator)
        text = torch.cat([text, token[:, None]], dim=1)
    return text[:, prompt.size(1):]


def rate(fn, tokens: int) -> float:
    start = time.perf_counter()
    fn()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="lstm", choices=["rnn", "lstm", "gru"])
    parser.add_argument("--vocab", type=int, default=65, help="tiny Shakespeare has 65 characters")
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    net = LanguageModel(args.vocab, args.cell, args.embedding_dim, args.hidden_size, args.num_layers, 0.0).eval()
    prompt = torch.zeros(args.num_samples, 1, dtype=torch.long)
    total = args.tokens * args.num_samples
    ours, naive = [], []
    for _ in range(args.rounds):  # alternate, so drift in the machine's speed hits both
        ours.append(rate(lambda: generate(net, prompt, args.tokens, generator=torch.Generator().manual_seed(0)), total))
        naive.append(rate(lambda: naive_generate(net, prompt, args.tokens, torch.Generator().manual_seed(0)), total))
    o, n = statistics.median(ours), statistics.median(naive)
    print(f"{args.cell} {args.num_layers}x{args.hidden_size}, vocab {args.vocab}, {args.num_samples} sample(s) x "
          f"{args.tokens} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds")
    print(f"rnnlm incremental     {o:>9,.0f} tokens/s")
    print(f"naive growing prefix  {n:>9,.0f} tokens/s")
    print(f"ratio                 {o / n:>9.1f}x")


if __name__ == "__main__":
    main()
