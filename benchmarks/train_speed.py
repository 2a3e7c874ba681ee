#!/usr/bin/env python
"""Training speed of rnnlm against the plain-PyTorch loop ``raw_lm.py``, same settings, same run.

Runs alternate (raw, rnnlm, raw, rnnlm, ...) so drift in the machine's speed hits both. Each side
reports the median tokens/s of its training steps (forward, backward, clipping, optimizer step),
leaving out the first ``--warmup`` steps; rnnlm also reports its wall-clock rate, which adds data
loading, logging and Lightning's hooks between steps. On a GPU, rnnlm's steps are timed with CUDA
events (the host is never made to wait for the GPU, as rnnlm itself never does), and its wall clock
ends once the GPU has finished the last step; raw_lm.py waits for the GPU after every step.

    python benchmarks/train_speed.py                        # PTB word LSTM 2x200, seq 35, batch 20, SGD
    python benchmarks/train_speed.py --config char512       # tiny Shakespeare char LSTM 2x512, seq 128, batch 64, Adam
    python benchmarks/train_speed.py --config char64        # char LSTM 1x64: per-step costs show most
    python benchmarks/train_speed.py --device cuda --size 650
    python benchmarks/train_speed.py --device cuda --variant model.cuda_graph=true --json speed.json
    python benchmarks/train_speed.py --device cuda --size 650 --no-raw --variant trainer.precision=bf16-mixed
    python benchmarks/train_speed.py --table a.json b.json  # one Markdown table from earlier --json files
    python benchmarks/train_speed.py --config wt2 --variant model.softmax=adaptive   # WikiText-2: full vs adaptive

``--override KEY=VALUE`` adds a Hydra override to every rnnlm run; ``--variant "KEY=VALUE ..."`` adds one
more rnnlm run to each round, with those overrides on top (so raw, rnnlm and rnnlm with a CUDA graph
alternate in one run). The final training loss of each side is the mean of its last 50 step losses.

Distance to the machine's limit: each run's multiply-adds per training token are counted (the recurrent and
decoder matrix products, forward, times 3 for the backward pass's two products; an adaptive softmax's clusters
weighted by how often the training text reaches them), a large fp32 matrix product is timed in the same run,
and the achieved GFLOP/s (2 per multiply-add) is printed with its fraction of that product's.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig

from rnnlm.checks import ConfigError
from rnnlm.commands.cli import CONF_DIR, describe_hydra_error
from rnnlm.commands.train import train
from rnnlm.corpora import named_source
from rnnlm.errors import UserError
from rnnlm.network import LanguageModel, NetworkConfig, adaptive_cutoffs, on_meta

LAST_LOSSES = 50  # the final training loss is the mean of this many last steps (as raw_lm.py reports it)


class StepTimer(L.Callback):
    """Tokens/s of each call of the training step (``trainer.chunks_per_call`` chunks or fewer, each an optimizer
    step), from batch start to batch end, and of the whole run from the first call that starts after ``warmup``
    steps; the step losses.

    On a GPU, steps are timed with CUDA events read once at the end, so timing never makes the host wait;
    the run's wall clock then goes from the first step's start to the moment the GPU finished the last.
    """

    def __init__(self, warmup: int, cuda: bool = False):
        self.warmup = warmup
        self.cuda = cuda
        self._counting = False
        self._rates: list[float] = []
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []
        self.tokens = 0
        self._t0 = 0.0
        self._start_event = None
        self.first_start: float | None = None
        self.last_end = 0.0
        self.losses: list[torch.Tensor] = []  # the last ones, on the device, read once at the end
        self.steps = 0
        self.graph_replays: int | None = None  # with model.cuda_graph=true: the steps replayed from the graph

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # a call that starts inside the warm-up counts for nothing (with several steps per call it may end after it)
        self._counting = trainer.global_step >= self.warmup
        if not self._counting:
            return
        self._t0 = time.perf_counter()
        self.first_start = self.first_start or self._t0
        if self.cuda:
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.extend(outputs["losses"].float().unbind())  # copies: a captured graph reuses its outputs
        del self.losses[:-LAST_LOSSES]
        self.steps += len(outputs["chunks"])
        if not self._counting:
            return
        tokens = sum(targets.numel() for _, targets in outputs["chunks"])
        self.last_end = time.perf_counter()
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start_event, end, tokens))
        else:
            self._rates.append(tokens / (self.last_end - self._t0))
        self.tokens += tokens

    def on_train_end(self, trainer, pl_module):
        graphed = getattr(pl_module, "_graphed", None)  # rnnlm.cuda_graph.GraphedStep, when the module has one
        self.graph_replays = getattr(graphed, "replays", None)

    @property
    def rates(self) -> list[float]:
        if self.cuda and len(self._rates) < len(self._events):
            torch.cuda.synchronize()
            self._rates = [n * 1000 / start.elapsed_time(end) for start, end, n in self._events]
        return self._rates

    def wall_rate(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            seconds = self._events[0][0].elapsed_time(self._events[-1][1]) / 1000
        else:
            seconds = self.last_end - self.first_start
        return self.tokens / seconds

    def final_loss(self) -> float | None:
        return float(torch.stack(self.losses).mean()) if self.losses else None


# The configurations compared; a flag given on the command line wins over its preset.
PRESETS = {
    "ptb": dict(corpus="ptb", level="word", emsize=200, size=200, layers=2, seq_len=35, batch_size=20,
                optimizer="sgd", lr=20.0, clip=0.25, dropout=0.2, steps=300),
    "char512": dict(corpus="tinyshakespeare", level="char", emsize=128, size=512, layers=2, seq_len=128, batch_size=64,
                    optimizer="adam", lr=2e-3, clip=5.0, dropout=0.2, steps=60),
    "char64": dict(corpus="tinyshakespeare", level="char", emsize=64, size=64, layers=1, seq_len=64, batch_size=32,
                   optimizer="adam", lr=2e-3, clip=5.0, dropout=0.0, steps=400),
    "wt2": dict(corpus="wikitext2", level="word", emsize=200, size=200, layers=2, seq_len=35, batch_size=20,
                optimizer="sgd", lr=20.0, clip=0.25, dropout=0.2, steps=150),
}
CORPUS_FILES = {"ptb": [f"ptb/ptb.{s}.txt" for s in ("train", "valid", "test")],
                "wikitext2": [f"wikitext-2/{s}.txt" for s in ("train", "valid", "test")],
                "tinyshakespeare": ["tinyshakespeare/input.txt"]}


def multiply_adds_per_token(cfg: DictConfig) -> float:
    """Multiply-adds of the matrix products one training token costs: forward through the recurrent stack and
    the decoder, times 3 (backward computes the inputs' and the weights' gradients, a product each). Embedding
    lookups, the gates' elementwise maths and the softmax's exponentials are left out.

    An adaptive softmax scores every token in its head (the first cutoff's ids plus one per cluster) and, for a
    token in cluster i, that cluster's projection down and out to its ids: weighted here by the share of the
    training text's tokens in each cluster.
    """
    model, data = cfg.model, instantiate(cfg.data, _convert_="all")
    vocab = len(data.vocab)
    directions = 2 if model.bidirectional else 1
    # every element of a weight matrix is one multiply-add per token (one-hot inputs too: a dense product); the
    # stack is built on the meta device, so any cell is counted from its own parameters
    config = NetworkConfig.from_settings(model, vocab_size=vocab)
    stack = on_meta(lambda: LanguageModel(config)).backbone
    recurrent = directions * sum(p.numel() for p in stack.parameters() if p.dim() >= 2)
    features = stack.output_size * directions
    if model.softmax != "adaptive":
        return 3.0 * (recurrent + features * vocab)
    cutoffs = [*adaptive_cutoffs(vocab, model.adaptive_cutoffs), vocab]
    counts = np.bincount(np.asarray(data.load().splits["train"]), minlength=vocab)
    decoder = float(features * (cutoffs[0] + len(cutoffs) - 1))
    for i in range(len(cutoffs) - 1):
        share = counts[cutoffs[i]:cutoffs[i + 1]].sum() / counts.sum()
        width = int(features // (model.adaptive_div_value ** (i + 1)))
        decoder += share * width * (features + cutoffs[i + 1] - cutoffs[i])
    return 3.0 * (recurrent + decoder)


def matmul_gflops(device: str, rounds: int = 5) -> float:
    """The best GFLOP/s of a large square fp32 matrix product on ``device``: what this machine can reach."""
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    repeats = 20 if device == "cuda" else 4
    seconds = []
    for _round in range(rounds + 1):  # the first round warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 * repeats / min(seconds[1:]) / 1e9


def run_raw(args) -> tuple[float, float]:
    """Median step rate and final training loss of raw_lm.py."""
    cmd = [sys.executable, str(args.raw), "--data", *(str(args.data_dir / f) for f in CORPUS_FILES[args.corpus]),
           "--level", args.level, "--model", args.model, "--emsize", str(args.emsize), "--nhid", str(args.size),
           "--nlayers", str(args.layers), "--bptt", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--optimizer", args.optimizer, "--lr", str(args.lr), "--clip", str(args.clip), "--dropout",
           str(args.dropout), "--max-steps", str(args.steps), "--warmup-steps", str(args.warmup), "--no-eval",
           "--device", args.device, "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{args.raw} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["train_tok_per_s_median"], result["train_loss_last"]


def compose_rnnlm(args, extra: list[str]) -> DictConfig:
    """rnnlm's config for the same settings as raw_lm.py's (no validation), with ``extra`` overrides on top."""
    overrides = [
        f"model={args.model}", f"data={args.level}", f"data.corpus={args.corpus}", f"paths.data_dir={args.data_dir}",
        f"paths.cache_dir={args.cache_dir}", f"model.embedding_dim={args.emsize}", f"model.hidden_size={args.size}",
        f"model.num_layers={args.layers}", f"model.dropout={args.dropout}", f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch_size}", f"optimizer={args.optimizer}", f"optimizer.lr={args.lr}",
        "scheduler=none", f"trainer.gradient_clip_val={args.clip}",
        f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}", "test=false", "~callbacks.text_samples",
        # rnnlm's own progress bar stays, as a user's run has it; the summary is printed once, before timing
        "~callbacks.model_summary", "trainer.enable_model_summary=false",
        *extra,
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            return compose("train", overrides=overrides)
        except HydraException as err:  # e.g. an override naming a setting this checkout does not have
            raise ConfigError(describe_hydra_error(err)) from err


def run_rnnlm(args, out_dir: Path, extra: list[str]) -> tuple[float, float, float | None, str | None]:
    """Median step rate, wall-clock rate, final training loss of rnnlm on the same settings (no validation), and
    with a CUDA graph, how many steps were replayed from it ("replays/steps")."""
    cfg = compose_rnnlm(args, extra)
    cfg.paths.output_dir = str(out_dir / "run")
    timer = StepTimer(args.warmup, cuda=args.device == "cuda")
    try:
        train(cfg, extra_callbacks=[timer])
    finally:
        shutil.rmtree(out_dir / "run" / "checkpoints", ignore_errors=True)  # up to 0.3 GB each; not measured
    replays = None if timer.graph_replays is None else f"{timer.graph_replays}/{timer.steps}"
    if not timer.rates:
        raise RuntimeError(f"no training step after the {args.warmup} warm-up steps: raise --steps")
    return statistics.median(timer.rates), timer.wall_rate(), timer.final_loss(), replays


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def variant_name(extra: list[str]) -> str:
    return " ".join(["rnnlm", *extra])


def median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def print_table(paths: list[Path]) -> None:
    """One Markdown table from the --json files of earlier runs: one line per rnnlm variant."""
    print("| configuration | raw_lm.py tok/s | rnnlm run | step tok/s | wall tok/s | wall / raw | final loss (raw) |")
    print("|---|---:|---|---:|---:|---:|---|")
    for path in paths:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"| {path} | | not readable: {one_line(err)} | | | | |")
            continue
        raw = result["raw_lm"]
        raw_rate = f"{raw['tok_s']:,.0f}" if raw and raw.get("tok_s") else "—"
        for name, run in result["rnnlm"].items():
            if run["status"] != "ok":
                print(f"| {result['label']} | {raw_rate} | {name} | {run['status']}: {run['error']} | | | |")
                continue
            ratio = f"{run['wall_ratio']:.2f}" if run.get("wall_ratio") else "—"
            loss = "—" if run["final_loss"] is None else f"{run['final_loss']:.3f}"
            if raw and raw.get("final_loss") is not None:
                loss += f" ({raw['final_loss']:.3f})"
            shown = name + (f" (graph replayed {run['graph_replays']} steps)" if run.get("graph_replays") else "")
            print(f"| {result['label']} | {raw_rate} | {shown} | {run['step_tok_s']:,.0f} | {run['wall_tok_s']:,.0f} "
                  f"| {ratio} | {loss} |")


def main() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=shared / "bench" / "raw_lm.py")
    parser.add_argument("--data-dir", type=Path, default=shared / "data", help="holds ptb/ptb.{train,valid,test}.txt "
                        "(a missing corpus is downloaded there)")
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
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's intra-op threads on both sides (0: torch's default, one per core)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--cache-dir", type=Path, help="rnnlm's token cache (default: OUT/cache)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for every rnnlm run (repeatable), e.g. trainer.precision=bf16-mixed")
    parser.add_argument("--variant", action="append", default=[], metavar='"KEY=VALUE ..."',
                        help="one more rnnlm run per round, with these overrides on top (repeatable), "
                             "e.g. model.cuda_graph=true")
    parser.add_argument("--no-raw", action="store_true", help="compare the rnnlm runs only")
    parser.add_argument("--refusals-ok", action="store_true",
                        help="a run that rnnlm refuses with a one-line error (e.g. a CUDA graph on a CPU) is shown "
                             "as refused, without failing the benchmark")
    parser.add_argument("--label", help="the configuration's name in --json and --table (default: from the settings)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the medians and ratios here")
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="print one Markdown table from earlier --json files, and run nothing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # the rnnlm runs are in this process
    if args.table:
        print_table(args.table)
        return
    preset = dict(PRESETS[args.config])
    if args.config == "ptb" and args.size and not args.emsize:
        args.emsize = args.size
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.cache_dir = args.cache_dir or args.out / "cache"
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    named_source(args.corpus, args.data_dir)  # raw_lm.py reads the files: download a missing corpus first

    runs = [list(args.override)] + [list(args.override) + shlex.split(v) for v in args.variant]
    macs = {variant_name(extra): multiply_adds_per_token(compose_rnnlm(args, extra)) for extra in runs}
    raw_macs = multiply_adds_per_token(compose_rnnlm(args, [*args.override, "model.softmax=full"]))  # raw_lm.py's
    peak = matmul_gflops(args.device)
    print(f"fp32 matrix product ({'8192' if args.device == 'cuda' else '2048'}^2): {peak:,.1f} GFLOP/s", flush=True)
    raw, raw_loss = [], []
    ours = {variant_name(extra): {"step": [], "wall": [], "loss": [], "error": None} for extra in runs}
    for round_ in range(args.rounds):
        line = []
        if not args.no_raw:
            rate, loss = run_raw(args)
            raw.append(rate)
            raw_loss.append(loss)
            line.append(f"raw_lm {raw[-1]:,.0f} tok/s")
        for i, extra in enumerate(runs):
            name, result = variant_name(extra), ours[variant_name(extra)]
            if result["error"]:  # refused or failed in an earlier round
                continue
            try:
                step_rate, wall_rate, loss, replays = run_rnnlm(args, args.out / f"round{round_}" / f"run{i}", extra)
            except (Exception, SystemExit) as err:  # one failing variant must not hide the others
                refused = isinstance(err, UserError)
                result["error"] = one_line(err)
                result["status"] = "refused" if refused else "failed"
                line.append(f"{name}: {result['status']}: {result['error']}")
                if not refused:
                    logging.getLogger(__name__).exception("%s failed", name)
                continue
            result["step"].append(step_rate)
            result["wall"].append(wall_rate)
            result["loss"].append(loss)
            result["graph_replays"] = replays
            label = "rnnlm" if i == 0 else name
            line.append(f"{label} {step_rate:,.0f} tok/s (steps), {wall_rate:,.0f} tok/s (wall)"
                        + (f", graph replayed {replays} steps" if replays else ""))
        print(f"round {round_}: " + " | ".join(line), flush=True)

    r = statistics.median(raw) if raw else None
    print(f"\n{args.corpus} {args.level} {args.model} {args.layers}x{args.size} (emb {args.emsize}), "
          f"seq {args.seq_len}, batch {args.batch_size}, {args.optimizer} lr {args.lr}, {args.steps} steps, "
          f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"medians of {args.rounds} rounds")
    if args.override:
        print(f"rnnlm overrides: {' '.join(args.override)}")
    def share_of_peak(tok_s: float, per_token: float) -> str:
        achieved = 2 * per_token * tok_s / 1e9
        return (f"{per_token / 1e6:.2f} M multiply-adds/token, {achieved:,.1f} GFLOP/s = {achieved / peak:.1%} "
                "of the matmul's")

    if r is not None:
        print(f"raw_lm.py        {r:>9,.0f} tok/s   {share_of_peak(r, raw_macs)}")
    summary, losses = {}, [] if r is None else [f"raw_lm {median_or_none(raw_loss):.4f}"]
    base = ours[variant_name(runs[0])]
    w0 = statistics.median(base["wall"]) if base["wall"] and not base["error"] else None  # the variants' yardstick
    for i, extra in enumerate(runs):
        name, result = variant_name(extra), ours[variant_name(extra)]
        prefix = "rnnlm" if i == 0 else name
        if result["error"]:
            print(f"{prefix}: {result['status']}: {result['error']}")
            summary[name] = {"overrides": extra, "status": result["status"], "error": result["error"]}
            continue
        o, w = statistics.median(result["step"]), statistics.median(result["wall"])
        loss = median_or_none(result["loss"])
        print(f"{prefix + ' (steps)':<16} {o:>9,.0f} tok/s" + (f"   ratio to raw {o / r:.3f}" if r else "")
              + f"   {share_of_peak(o, macs[name])}")
        print(f"{prefix + ' (wall)':<16} {w:>9,.0f} tok/s" + (f"   ratio to raw {w / r:.3f}" if r else "")
              + (f"   ratio to rnnlm {w / w0:.3f}" if i and w0 else ""))
        if r and len(result["wall"]) == len(raw) > 1:  # each round against its own raw run: drift cancels
            per_round = [ours_ / raw_ for ours_, raw_ in zip(result["wall"], raw, strict=True)]
            print(f"{'':<16} wall / raw by round: {' '.join(f'{x:.3f}' for x in per_round)} "
                  f"(median {statistics.median(per_round):.3f})")
        losses.append(f"{prefix} {'—' if loss is None else f'{loss:.4f}'}")
        summary[name] = {"overrides": extra, "status": "ok", "step_tok_s": o, "wall_tok_s": w, "final_loss": loss,
                         "step_ratio": o / r if r else None, "wall_ratio": w / r if r else None,
                         "graph_replays": result.get("graph_replays"), "multiply_adds_per_token": macs[name],
                         "step_gflops": 2 * macs[name] * o / 1e9,
                         "rounds": {"step_tok_s": result["step"], "wall_tok_s": result["wall"],
                                    "final_loss": result["loss"]}}
    print(f"final training loss (mean of the last {LAST_LOSSES} steps): {' | '.join(losses)}")

    if args.json:
        label = args.label or f"{args.layers}x{args.size}, batch {args.batch_size}, seq {args.seq_len}"
        raw_summary = None if args.no_raw else {"tok_s": r, "final_loss": median_or_none(raw_loss),
                                                "multiply_adds_per_token": raw_macs, "gflops": 2 * raw_macs * r / 1e9,
                                                "rounds": {"tok_s": raw, "final_loss": raw_loss}}
        settings = {k: getattr(args, k) for k in ("config", "corpus", "level", "model", "emsize", "size", "layers",
                                                  "seq_len", "batch_size", "optimizer", "lr", "clip", "dropout",
                                                  "steps", "warmup", "rounds", "device", "override")}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"label": label, "settings": settings, "torch": torch.__version__,
                                         "matmul_gflops": peak,
                                         "raw_lm": raw_summary, "rnnlm": summary}, indent=1) + "\n")
    failed = [n for n, s in summary.items() if s["status"] == "failed"
              or (s["status"] == "refused" and not args.refusals_ok)]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
