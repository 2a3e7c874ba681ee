#!/usr/bin/env python
"""Generation speed: rnnlm's decoding against a plain-PyTorch sampling loop, same weights, same run.

The baseline is what every RNN code does, and what pytorch/examples' word_language_model
``generate.py`` does: call ``torch.nn.RNN`` (tanh), ``LSTM`` or ``GRU`` (seq-first, as there) on one token with
the carried hidden state, then ``torch.multinomial`` on softmax(logits / temperature) — no Lightning and
no rnnlm code in the loop. Its weights are copied from rnnlm's network. rnnlm is
``rnnlm.sampling.generate_tokens`` on a ``rnnlm.network.LanguageModel`` (it reads the prompt once, then takes
one step of every cell per token: ``LanguageModel.stepper``; from 2 rows the fused LSTM and GRU multiply on
oneDNN with weights packed once per text, and ``--unpacked`` adds rnnlm without that as a contender). Both draw
from a CPU generator with the same seed, so on the CPU they write the same text, which is checked. A third
column re-runs the model on the whole growing prefix for every token: the lecture's reference for "no carried
state", which no RNN code does; it is measured at one sample only (it costs O(tokens²)) and ``--no-naive``
leaves it out.

    python benchmarks/generate_speed.py                                  # lstm and gru 2x512, 1 and 8 samples
    python benchmarks/generate_speed.py --cell rnn lstm gru --samples 1 8 64 --rounds 3 --no-naive
    python benchmarks/generate_speed.py --cell lstm --samples 1 --no-naive
    python benchmarks/generate_speed.py --device cuda --samples 1 16 --tokens 500 --rounds 3 --no-naive
    python benchmarks/generate_speed.py --no-naive --rounds 1 --profile  # and where each one's time goes (cProfile)

Each round times every contender once, in turn (so drift in the machine's speed hits all of them),
with ``time.perf_counter`` around one whole text (waiting for the GPU on CUDA); one untimed short text of
each comes first. Printed: median tokens/s (min-max over the rounds) and rnnlm / plain loop, both as the
ratio of the medians and as the median of each round's own ratio.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from rnnlm.cells import fused
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.sampling import generate_tokens

WARMUP_TOKENS = 50


class PlainRNNModel(nn.Module):
    """word_language_model's RNNModel (eval mode, so without dropout): encoder -> nn.RNN/LSTM/GRU -> decoder."""

    def __init__(self, cell: str, ntoken: int, ninp: int, nhid: int, nlayers: int):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = getattr(nn, cell.upper())(ninp, nhid, nlayers)  # seq-first: (T, B, ...)
        self.decoder = nn.Linear(nhid, ntoken)

    def forward(self, input, hidden):
        output, hidden = self.rnn(self.encoder(input), hidden)
        return self.decoder(output), hidden  # (T, B, V)

    def copy_from(self, net: LanguageModel) -> PlainRNNModel:
        """Take the weights of rnnlm's network (of the same sizes); strict, so a missing tensor is an error."""
        self.encoder.load_state_dict(net.embedding.state_dict())
        self.rnn.load_state_dict(net.backbone.fused_state_dict())
        self.decoder.load_state_dict(net.decoder.state_dict())
        return self.to(net.decoder.weight.device).eval()


@torch.no_grad()
def plain_generate(model: PlainRNNModel, prompt: torch.Tensor, max_new_tokens: int, temperature: float,
                   generator: torch.Generator) -> torch.Tensor:
    """word_language_model's generate.py loop, for a batch: prompt (B, 1) -> new tokens (B, N) on the CPU.

    As there, sampling happens on the CPU (``.cpu()``), which is also what rnnlm does with a CPU generator.
    """
    input = prompt.t().contiguous()  # (1, B)
    hidden = None  # zeros, as model.init_hidden(B)
    words = []
    for _ in range(max_new_tokens):
        output, hidden = model(input, hidden)
        word_weights = F.softmax(output[-1] / temperature, dim=-1).cpu()  # (B, V)
        word_idx = torch.multinomial(word_weights, 1, generator=generator)  # (B, 1)
        words.append(word_idx)
        input = word_idx.t().to(input.device)
    return torch.cat(words, 1)


@torch.no_grad()
def naive_generate(net: LanguageModel, prompt: torch.Tensor, max_new_tokens: int, temperature: float,
                   generator: torch.Generator) -> torch.Tensor:
    """The lecture's reference: no carried state, the whole growing prefix through the model for every token."""
    text = prompt
    for _ in range(max_new_tokens):
        logits, _ = net(text)  # (B, T, V): the whole prefix, every time
        probs = F.softmax(logits[:, -1] / temperature, dim=-1).cpu()
        token = torch.multinomial(probs, 1, generator=generator)
        text = torch.cat([text, token.to(text.device)], dim=1)
    return text[:, prompt.size(1):].cpu()


def unpacked(fn):
    """``fn`` with the fused cells' packed oneDNN stepping off (``rnnlm.cells.fused.PACK_FROM_ROWS`` out of reach):
    rnnlm as it stepped before that switch, in the same run."""
    def call(*args):
        kept, fused.PACK_FROM_ROWS = fused.PACK_FROM_ROWS, sys.maxsize
        try:
            return fn(*args)
        finally:
            fused.PACK_FROM_ROWS = kept
    return call


def contenders(net: LanguageModel, plain: PlainRNNModel, temperature: float, seed: int) -> dict:
    """name -> function(prompt, tokens) returning the new tokens (B, N) on the CPU, each from a fresh generator."""
    def rnnlm(p, n):
        return generate_tokens(net, p, n, temperature, generator=torch.Generator().manual_seed(seed)).cpu()

    return {
        "plain loop": lambda p, n: plain_generate(plain, p, n, temperature, torch.Generator().manual_seed(seed)),
        "rnnlm": rnnlm,
        "rnnlm unpacked": unpacked(rnnlm),
        "growing prefix": lambda p, n: naive_generate(net, p, n, temperature, torch.Generator().manual_seed(seed)),
    }


def timed(fn, prompt: torch.Tensor, tokens: int) -> tuple[float, torch.Tensor]:
    """Tokens/s (new tokens of all samples together) of one call, and what it generated."""
    cuda = prompt.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(prompt.device)
    start = time.perf_counter()
    out = fn(prompt, tokens)
    if cuda:
        torch.cuda.synchronize(prompt.device)
    return tokens * prompt.size(0) / (time.perf_counter() - start), out


def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    if torch.equal(a, b):
        return "same tokens"
    first = int((a != b).any(0).nonzero()[0])
    return f"tokens differ from position {first} of {a.size(1)}"


def measure(fns: dict, names: list[str], prompt: torch.Tensor, tokens: int, rounds: int) -> tuple[dict, dict]:
    """Tokens/s of each contender, one value per round, alternating; and each one's first text."""
    for name in names:  # untimed: first-call costs (allocations, oneDNN primitives, CUDA start-up)
        fns[name](prompt, min(tokens, WARMUP_TOKENS))
    rates = {name: [] for name in names}
    texts = {}
    for _ in range(rounds):
        for name in names:
            rate, out = timed(fns[name], prompt, tokens)
            rates[name].append(rate)
            texts.setdefault(name, out)
    return rates, texts


def profile(fns: dict, prompt: torch.Tensor, tokens: int, lines: int) -> None:
    for name in ("plain loop", "rnnlm"):
        fns[name](prompt, min(tokens, WARMUP_TOKENS))
        profiler = cProfile.Profile()
        profiler.enable()
        fns[name](prompt, tokens)
        profiler.disable()
        print(f"\n--- cProfile: {name}, {prompt.size(0)} sample(s) x {tokens} tokens, by own time")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(lines)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):>9,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", nargs="+", default=["lstm", "gru"], choices=["rnn", "lstm", "gru"])
    parser.add_argument("--vocab", type=int, default=65, help="tiny Shakespeare has 65 characters")
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=500, help="new tokens per sample")
    parser.add_argument("--samples", "--num-samples", type=int, nargs="+", default=[1, 8], metavar="N",
                        help="samples generated together as one batch; several counts are measured one after another")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--no-mkldnn", action="store_true",
                        help="torch.backends.mkldnn.enabled=False: torch.nn's own LSTM/GRU kernels instead of oneDNN's")
    parser.add_argument("--no-naive", action="store_true",
                        help="leave out the growing-prefix reference (otherwise measured at 1 sample only)")
    parser.add_argument("--unpacked", action="store_true",
                        help="also time rnnlm without the fused cells' packed oneDNN stepping (its gain, same run)")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile one text of rnnlm and one of the plain loop, at each sample count")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    where = f"{args.device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else args.device
    print(f"{args.num_layers}x{args.hidden_size}, emb {args.embedding_dim}, vocab {args.vocab}, {args.tokens} new "
          f"tokens per sample, temperature {args.temperature:g}, {where}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads{', oneDNN off' if args.no_mkldnn else ''}; "
          f"tokens/s: median (min-max) of {args.rounds} rounds")
    rows = []
    for cell in args.cell:
        torch.manual_seed(0)
        config = NetworkConfig(vocab_size=args.vocab, cell=cell, embedding_dim=args.embedding_dim,
                               hidden_size=args.hidden_size, num_layers=args.num_layers, dropout=0.0)
        net = LanguageModel(config).to(device).eval()
        plain = PlainRNNModel(cell, args.vocab, args.embedding_dim, args.hidden_size, args.num_layers).copy_from(net)
        fns = contenders(net, plain, args.temperature, seed=0)
        for samples in args.samples:
            names = (["plain loop", "rnnlm"] + (["rnnlm unpacked"] if args.unpacked else [])
                     + (["growing prefix"] if samples == 1 and not args.no_naive else []))
            prompt = torch.zeros(samples, 1, dtype=torch.long, device=device)
            rates, texts = measure(fns, names, prompt, args.tokens, args.rounds)
            print(f"\n{cell}, {samples} sample(s): rnnlm and the plain loop wrote "
                  f"{agreement(texts['rnnlm'], texts['plain loop'])}")
            for name in names:
                print(f"  {name:<15} {spread(rates[name])} tokens/s")
            per_round = [o / p for o, p in zip(rates["rnnlm"], rates["plain loop"], strict=True)]
            ratio = statistics.median(rates["rnnlm"]) / statistics.median(rates["plain loop"])
            print(f"  rnnlm / plain loop {ratio:.2f} (median of per-round ratios {statistics.median(per_round):.2f}, "
                  f"{min(per_round):.2f}-{max(per_round):.2f})")
            if args.unpacked:
                before = [o / p for o, p in zip(rates["rnnlm unpacked"], rates["plain loop"], strict=True)]
                print(f"  rnnlm unpacked / plain loop: median of per-round ratios {statistics.median(before):.2f}, "
                      f"{min(before):.2f}-{max(before):.2f}")
            rows.append((cell, samples, rates, per_round))
            if args.profile:
                profile(fns, prompt, args.tokens, 15)

    print("\n| cell | samples | plain loop tok/s | rnnlm tok/s | rnnlm / plain (per-round range) "
          "| growing prefix tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for cell, samples, rates, per_round in rows:
        prefix = f"{statistics.median(rates['growing prefix']):,.0f}" if "growing prefix" in rates else "—"
        print(f"| {cell} | {samples} | {statistics.median(rates['plain loop']):,.0f} | "
              f"{statistics.median(rates['rnnlm']):,.0f} | {statistics.median(per_round):.2f} "
              f"({min(per_round):.2f}-{max(per_round):.2f}) | {prefix} |")


if __name__ == "__main__":
    main()
