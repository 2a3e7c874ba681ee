#!/usr/bin/env python
"""rnnlm's recurrent character models against nanoGPT's character GPT on tiny Shakespeare, at equal CPU time.

Both sides train on the same text, cut as nanoGPT cuts it (the first 90% of the characters train, the last 10%
validate), for the same budget of wall-clock time, and both are scored afterwards on the same characters: the
whole validation text, in nats per character, from each side's final checkpoint.

- rnnlm: ``python src/train.py experiment=shakespeare_char_<N>min`` (``trainer.max_time`` stops it), scored with
  ``python src/eval.py ... split=valid data.batch_size=1`` (one stream: each character read with all the text
  before it, the hidden state carried).
- nanoGPT: its own ``train.py``, run from a checkout of its repository (``--nanogpt DIR``; nothing of it is
  copied here), with its README's CPU recipe scaled to the budget (``NANOGPT``). Its iterations are set so
  that it trains for the budget: a short calibration run measures its time per iteration first. It is scored
  by sliding its context window over the validation text one ``--stride`` at a time, so that every character is
  predicted from at least ``block_size - stride`` characters before it (its own ``estimate_loss`` reads random
  windows, where the first characters of each window have little context).

Runs alternate (rnnlm, nanoGPT, then nanoGPT, rnnlm in the next round) so that drift in the machine's speed hits
both. Writes ``race.json``, ``race.md`` (the table) and ``race_curves.png`` (each side's validation loss against
training time, as each logged it: rnnlm on the whole validation text, nanoGPT on ``eval_iters`` random batches)
into ``--out``.

    python benchmarks/nanogpt_race.py --nanogpt ../nanoGPT --budgets 1 5 20 --rounds 2 --out outputs/race
    python benchmarks/nanogpt_race.py --nanogpt ../nanoGPT --budgets 1 --rounds 1 --scale 0.1   # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# nanoGPT's README recipe for a CPU (4 layers of 128, block 64, batch 12, no dropout, its learning rate decayed
# over max_iters), scaled up with the budget: wider, deeper and longer contexts for the longer budgets.
NANOGPT = {
    1: dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0, learning_rate=1e-3),
    5: dict(n_layer=4, n_head=4, n_embd=192, block_size=128, batch_size=16, dropout=0.0, learning_rate=1e-3),
    20: dict(n_layer=6, n_head=4, n_embd=256, block_size=128, batch_size=24, dropout=0.1, learning_rate=1e-3),
}
EVALS = 10  # validation points on each side's curve


def prepare_nanogpt_data(nanogpt: Path, text_file: Path) -> None:
    """nanoGPT's ``data/shakespeare_char``: its own prepare.py, on our copy of the text (it downloads only when
    input.txt is missing)."""
    folder = nanogpt / "data" / "shakespeare_char"
    shutil.copyfile(text_file, folder / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=folder, check=True, capture_output=True)


def run_logged(command: list[str], cwd: Path, log: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run ``command``, keeping each output line with the seconds since the start; (wall seconds, lines)."""
    lines = []
    start = time.perf_counter()
    with subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process, open(log, "w") as out:
        for line in process.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            out.write(line)
    wall = time.perf_counter() - start
    if process.returncode:
        sys.exit(f"{' '.join(command)} failed (exit {process.returncode}); see {log}")
    return wall, lines


def nanogpt_command(settings: dict, max_iters: int, out_dir: Path, seed_iters: int | None = None) -> list[str]:
    eval_interval = max(1, max_iters // EVALS)
    args = {**settings, "max_iters": max_iters, "lr_decay_iters": max_iters, "min_lr": settings["learning_rate"] / 10,
            "eval_interval": eval_interval, "eval_iters": 20, "log_interval": 1, "device": "cpu", "compile": False,
            "always_save_checkpoint": True, "out_dir": str(out_dir), "warmup_iters": min(100, max_iters // 10)}
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", *(f"--{k}={v}" for k, v in args.items())]


def nanogpt_seconds_per_iteration(nanogpt: Path, settings: dict, work: Path) -> tuple[float, float]:
    """(seconds per training iteration, seconds before the first) from a short run of nanoGPT."""
    _, lines = run_logged(nanogpt_command(settings, 60, work / "calibrate"), nanogpt, work / "calibrate.log")
    stamps = [t for t, line in lines if re.match(r"iter \d+: loss", line)]
    steps = [b - a for a, b in zip(stamps[10:], stamps[11:], strict=False)]  # after the first (warm-up) ones
    return statistics.median(steps), stamps[0]


def nanogpt_run(nanogpt: Path, minutes: int, work: Path, scale: float, changes: dict | None = None) -> dict:
    settings = NANOGPT[minutes] | (changes or {})
    per_iteration, start = nanogpt_seconds_per_iteration(nanogpt, settings, work)
    evals = EVALS * 2 * 20 * per_iteration / 3  # each eval: 20 batches of train and of valid, forward only
    max_iters = max(EVALS, int((minutes * 60 * scale - evals) / per_iteration) // EVALS * EVALS)
    out_dir = work / f"nanogpt_{minutes}min"
    log = work / f"nanogpt_{minutes}min.log"
    wall, lines = run_logged(nanogpt_command(settings, max_iters, out_dir), nanogpt, log)
    curve = [(t - start, float(m.group(1))) for t, line in lines
             if (m := re.match(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", line))]
    return {"side": "nanoGPT", "minutes": minutes, "settings": {**settings, "max_iters": max_iters},
            "seconds_per_iteration": per_iteration, "train_seconds": wall - start, "curve": curve,
            "valid_nats_per_char": score_nanogpt(nanogpt, out_dir / "ckpt.pt")}


def score_nanogpt(nanogpt: Path, checkpoint: Path, stride: int = 8) -> float:
    """Mean nats per character over nanoGPT's whole val.bin, each window of block_size characters moved ``stride``
    at a time and scoring its last ``stride`` predictions (the first window scores all of its own)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's own model code, from its checkout

    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**saved["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    model.eval()
    val = np.fromfile(nanogpt / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16)
    ids = torch.from_numpy(val.astype(np.int64))
    block = saved["model_args"]["block_size"]
    total, count = 0.0, 0
    starts = list(range(0, len(ids) - block, stride))  # windows [s, s + block] of inputs and targets
    with torch.no_grad():
        for i in range(0, len(starts), 256):
            batch = starts[i:i + 256]
            x = torch.stack([ids[s:s + block] for s in batch])
            y = torch.stack([ids[s + 1:s + block + 1] for s in batch])
            logits, _ = model(x, y)  # with targets, nanoGPT returns the logits of every position
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
            for row, s in enumerate(batch):
                scored = nll[row] if s == 0 else nll[row, -stride:]
                total += scored.sum().item()
                count += scored.numel()
        end = starts[-1] + block  # the characters after the last window: one more window, ending at the text's end
        if end + 1 < len(ids):
            x, y = ids[-block - 1:-1][None], ids[-block:][None]
            logits, _ = model(x, y)
            rest = len(ids) - 1 - end
            nll = torch.nn.functional.cross_entropy(logits[0, -rest:], y[0, -rest:], reduction="sum")
            total, count = total + nll.item(), count + rest
    assert count == len(ids) - 1, (count, len(ids))
    return total / count


def rnnlm_run(minutes: int, work: Path, scale: float, seed: int) -> dict:
    run = work / f"rnnlm_{minutes}min"
    budget = minutes * 60 * scale
    overrides = [f"experiment=shakespeare_char_{minutes}min", f"seed={seed}", f"hydra.run.dir={run}",
                 f"trainer.max_time={{seconds: {max(1, round(budget))}}}", "callbacks.progress_bar.refresh_s=5"]
    wall, _ = run_logged([sys.executable, "src/train.py", *overrides], REPO, work / f"rnnlm_{minutes}min.log")
    metrics = work / f"rnnlm_{minutes}min_valid.json"
    subprocess.run([sys.executable, "src/eval.py", f"ckpt_path={run}/checkpoints/last.ckpt", "split=valid",
                    "data.batch_size=1", f"output={metrics}"], cwd=REPO, check=True, capture_output=True)
    scored = json.loads(metrics.read_text())
    sys.path.insert(0, str(REPO / "src"))
    from rnnlm.commands.report import timed_curve

    summary = json.loads((run / "run_summary.json").read_text())
    return {"side": "rnnlm", "minutes": minutes, "settings": overrides[:1], "train_seconds": summary.get("wall_s"),
            "curve": timed_curve(run), "valid_nats_per_char": scored["loss"], "valid_characters": scored["tokens"]}


def write_report(results: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "race.json").write_text(json.dumps(results, indent=1))
    rows = ["| budget | rnnlm (nats/char) | nanoGPT (nats/char) | rnnlm − nanoGPT | rnnlm s | nanoGPT s |",
            "|---:|---|---|---:|---:|---:|"]
    for minutes in sorted({r["minutes"] for r in results}):
        sides = {side: [r for r in results if r["minutes"] == minutes and r["side"] == side]
                 for side in ("rnnlm", "nanoGPT")}
        losses = {side: [r["valid_nats_per_char"] for r in runs] for side, runs in sides.items()}
        shown = {side: " / ".join(f"{v:.3f}" for v in values) for side, values in losses.items()}
        both = all(losses.values())
        gap = statistics.mean(losses["rnnlm"]) - statistics.mean(losses["nanoGPT"]) if both else math.nan
        seconds = {side: " / ".join(f"{r['train_seconds']:.0f}" for r in runs) for side, runs in sides.items()}
        rows.append(f"| {minutes} min | {shown['rnnlm']} | {shown['nanoGPT']} | {gap:+.3f} | {seconds['rnnlm']} | "
                    f"{seconds['nanoGPT']} |")
    (out / "race.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["minutes"] for r in results})
    figure, panels = plt.subplots(1, len(budgets), figsize=(4 * len(budgets), 4), squeeze=False, sharey=True)
    colours = {"rnnlm": "tab:blue", "nanoGPT": "tab:orange"}
    for axes, minutes in zip(panels[0], budgets, strict=True):
        for r in (r for r in results if r["minutes"] == minutes):
            # nanoGPT's first point is its untrained model, at or before its first step: left out
            curve = [(t, v) for t, v in r["curve"] if t > 0 and not (r["side"] == "nanoGPT" and t == r["curve"][0][0])]
            label = f"{r['side']}, round {r['round']}"
            style = "-" if r["round"] == 1 else "--"
            if curve:
                t, v = zip(*curve, strict=True)
                axes.plot(t, v, style, color=colours[r["side"]], alpha=0.85, label=label)
            # the score on the whole validation text, at the end of training
            axes.plot(r["train_seconds"], r["valid_nats_per_char"], "o", color=colours[r["side"]], markersize=5)
        axes.set(title=f"{minutes} min", xlabel="training time (s)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    panels[0][0].set_ylabel("validation loss (nats per character)")
    lowest = min(r["valid_nats_per_char"] for r in results)
    panels[0][0].set_ylim(lowest - 0.1, lowest + 1.3)  # the untrained start (ln 65 = 4.17) would flatten the rest
    figure.suptitle("tiny Shakespeare on 2 CPU cores: lines as each side logged its validation loss, dots the "
                    "whole validation text scored", fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "race_curves.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of github.com/karpathy/nanoGPT")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 5, 20], choices=sorted(NANOGPT))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "race")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every budget (a quick check of the script)")
    parser.add_argument("--only", choices=["rnnlm", "nanoGPT"], help="run one side only")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs that --out's race.json holds and run only the others")
    parser.add_argument("--nanogpt-settings", type=json.loads, default={}, metavar="JSON",
                        help='change nanoGPT\'s settings for every budget, e.g. \'{"n_embd": 128, "block_size": 64}\'')
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("RNNLM_DATA_DIR", REPO / "data")))
    args = parser.parse_args()
    nanogpt = args.nanogpt.resolve()
    if not (nanogpt / "train.py").is_file() or not (nanogpt / "model.py").is_file():
        sys.exit(f"--nanogpt {args.nanogpt}: not a checkout of nanoGPT (no train.py and model.py)")
    prepare_nanogpt_data(nanogpt, args.data / "tinyshakespeare" / "input.txt")
    saved = args.out / "race.json"
    results = json.loads(saved.read_text()) if args.resume and saved.is_file() else []
    done = {(r["round"], r["minutes"], r["side"]) for r in results}
    for round_ in range(args.rounds):
        for minutes in args.budgets:
            work = args.out / f"round{round_ + 1}"
            work.mkdir(parents=True, exist_ok=True)
            sides = [("rnnlm", rnnlm_run, (minutes, work, args.scale, round_ + 1)),
                     ("nanoGPT", nanogpt_run, (nanogpt, minutes, work, args.scale, args.nanogpt_settings))]
            for name, run, arguments in sides if round_ % 2 == 0 else sides[::-1]:
                if args.only not in (None, name) or (round_ + 1, minutes, name) in done:
                    continue
                results.append(run(*arguments) | {"round": round_ + 1})
                print(json.dumps({k: v for k, v in results[-1].items() if k != "curve"}), flush=True)
                write_report(results, args.out)  # after every run: a race cut short keeps what it measured


if __name__ == "__main__":
    main()
