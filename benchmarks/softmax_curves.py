#!/usr/bin/env python
"""Full against adaptive softmax for the same wall-clock budget: validation perplexity against seconds.

Trains the same word model twice, one after the other, through ``src/train.py`` (WikiText-2, LSTM 2x200,
seq 35, batch 20 by default, the rest of rnnlm's defaults): once with ``model.softmax=full``, once with
``model.softmax=adaptive``, each stopped by ``trainer.max_time`` after ``--minutes``. Each validates on the
whole validation split every ``--val-steps-*`` optimizer steps of its own (the adaptive model takes more
steps per second; the defaults make both about 3.5 minutes of training on 2 cores) and once more when
the time is up. The clock starts when the training process is launched, so start-up, tokenizing (cached
after the first run) and validations count against each side.

Printed: each side's median training tokens/s (rnnlm's own ``train/tokens_per_s``) and their ratio, the
steps taken, and the final and best validation perplexity. Written to ``--out``: ``softmax_curves.csv``
(every validation: side, seconds, step, loss, perplexity), ``softmax_curves.png`` and ``softmax_curves.md``.

    python benchmarks/softmax_curves.py                          # 20 minutes each: 40 minutes in all
    python benchmarks/softmax_curves.py --minutes 2 --out /tmp/curves --override model.hidden_size=100
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
SIDES = ("full", "adaptive")
MODEL = ["model=lstm", "data=word", "data.corpus=wikitext2", "data.seq_len=35", "data.batch_size=20"]


def run_side(softmax: str, args, run_dir: Path) -> dict:
    """Train one side; return its validations [(seconds, step, loss)] and run summary."""
    overrides = [*MODEL, f"model.softmax={softmax}", f"trainer.max_time=00:00:{args.minutes:02d}:00",
                 "trainer.max_epochs=1000", "trainer.max_steps=-1", "trainer.check_val_every_n_epoch=null",
                 f"trainer.val_check_interval={args.val_steps[softmax]}", "test=false", f"seed={args.seed}",
                 f"hydra.run.dir={run_dir}", *args.override]
    print(f"{softmax}: python src/train.py {' '.join(overrides)}", flush=True)
    started = time.time()
    done = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *overrides], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the {softmax} run failed:\n{done.stderr[-3000:]}")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    validations = [(e.wall_time - started, e.step, e.value) for e in events.Scalars("val/loss")]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    return {"validations": validations, "summary": summary, "wall_s": time.time() - started}


def write_outputs(results: dict, args, machine: str) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "softmax_curves.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["softmax", "seconds", "step", "val_loss", "val_ppl"])
        for side, result in results.items():
            for seconds, step, loss in result["validations"]:
                writer.writerow([side, f"{seconds:.1f}", step, f"{loss:.5f}", f"{math.exp(loss):.2f}"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, result in results.items():
        seconds = [s for s, _, _ in result["validations"]]
        ax.plot(seconds, [math.exp(v) for _, _, v in result["validations"]], marker="o", label=f"softmax={side}")
    ax.set_xlabel("seconds since launch (start-up and validations included)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title(f"WikiText-2, LSTM 2x200, {args.minutes} min each ({machine})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "softmax_curves.png", dpi=120)
    (out / "softmax_curves.md").write_text(table(results, args, machine) + "\n")


def table(results: dict, args, machine: str) -> str:
    full, adaptive = (results[s]["summary"] for s in SIDES)
    lines = [f"`python benchmarks/softmax_curves.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
             f"({machine}; {args.minutes} min each, one after the other)", "",
             "| softmax | tokens/s (median) | steps | validations | final val ppl | best val ppl | run wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for side in SIDES:
        result, summary = results[side], results[side]["summary"]
        losses = [v for _, _, v in result["validations"]]
        steps = result["validations"][-1][1] if result["validations"] else 0
        lines.append(f"| {side} | {summary['tokens_per_s']:,.0f} | {steps:,} | {len(losses)} | "
                     f"{math.exp(losses[-1]):.1f} | {math.exp(min(losses)):.1f} | {result['wall_s']:.0f} |")
    lines += ["", f"adaptive / full tokens/s: **{adaptive['tokens_per_s'] / full['tokens_per_s']:.2f}x**"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=20, help="wall-clock budget of each run (default 20)")
    parser.add_argument("--val-steps-full", type=int, default=600, help="validate every N steps (full)")
    parser.add_argument("--val-steps-adaptive", type=int, default=2500, help="validate every N steps (adaptive)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[], help="another Hydra override for both runs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results", help="where the csv/png/md go")
    parser.add_argument("--runs", type=Path, default=REPO / "outputs" / "softmax_curves", help="the run folders")
    args = parser.parse_args()
    args.val_steps = {"full": args.val_steps_full, "adaptive": args.val_steps_adaptive}
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    results = {side: run_side(side, args, args.runs / f"{stamp}_{side}") for side in SIDES}
    write_outputs(results, args, machine)
    print(table(results, args, machine))
    print(f"wrote {args.out / 'softmax_curves.csv'}, .png and .md")


if __name__ == "__main__":
    main()
