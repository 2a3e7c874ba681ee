#!/usr/bin/env python
"""Generation speed: rnnlm's incremental decoding against the naive recipe, same model, same run.

The naive recipe re-runs the model on the whole growing text for every new token (what a model
without carried state must do). rnnlm reads the prompt once and then takes one recurrent step per
token (``rnnlm.sampling.generate``). Both sample from the same random weights of a 2x512 char LSTM.

    python benchmarks/generate_speed.py                            # 500 new tokens, 1 sample, 3 rounds
    python benchmarks/generate_speed.py --device cuda --samples 1 16  # on a GPU, 1 sample then 16 as one batch
    python benchmarks/generate_speed.py --device cuda --no-naive      # rnnlm's decoding only

On a GPU, each timing waits for the GPU to finish, and one short untimed generation comes first
(CUDA and cuBLAS start-up).
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


def rate(fn, tokens: int, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tokens / (time.perf_counter() - start)


def measure(net: LanguageModel, prompt: torch.Tensor, tokens: int, rounds: int, naive: bool) -> tuple[list, list]:
    """Tokens/s of rnnlm's generation and of the naive recipe (if ``naive``), alternating, one value per round."""
    total = tokens * prompt.size(0)
    ours, theirs = [], []
    for _ in range(rounds):  # alternate, so drift in the machine's speed hits both
        ours.append(rate(lambda: generate(net, prompt, tokens, generator=torch.Generator().manual_seed(0)),
                         total, prompt.device))
        if naive:
            theirs.append(rate(lambda: naive_generate(net, prompt, tokens, torch.Generator().manual_seed(0)),
                               total, prompt.device))
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="lstm", choices=["rnn", "lstm", "gru"])
    parser.add_argument("--vocab", type=int, default=65, help="tiny Shakespeare has 65 characters")
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--samples", "--num-samples", type=int, nargs="+", default=[1], metavar="N",
                        help="samples generated together as one batch; several counts are measured one after another")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--no-naive", action="store_true", help="leave out the naive recipe (slow on long texts)")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    net = LanguageModel(args.vocab, args.cell, args.embedding_dim, args.hidden_size, args.num_layers, 0.0)
    net = net.to(device).eval()
    if device.type == "cuda":  # start-up costs are not generation speed
        generate(net, torch.zeros(max(args.samples), 1, dtype=torch.long, device=device), 20,
                 generator=torch.Generator().manual_seed(0))
        if not args.no_naive:
            naive_generate(net, torch.zeros(1, 1, dtype=torch.long, device=device), 20, torch.Generator())
    for i, samples in enumerate(args.samples):
        prompt = torch.zeros(samples, 1, dtype=torch.long, device=device)
        ours, naive = measure(net, prompt, args.tokens, args.rounds, not args.no_naive)
        where = f"{args.device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else args.device
        print(("\n" if i else "") + f"{args.cell} {args.num_layers}x{args.hidden_size}, vocab {args.vocab}, "
              f"{samples} sample(s) x {args.tokens} tokens, {where}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, median of {args.rounds} rounds")
        o = statistics.median(ours)
        print(f"rnnlm incremental     {o:>9,.0f} tokens/s")
        if naive:
            n = statistics.median(naive)
            print(f"naive growing prefix  {n:>9,.0f} tokens/s")
            print(f"ratio                 {o / n:>9.1f}x")


if __name__ == "__main__":
    main()
