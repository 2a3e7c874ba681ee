#!/usr/bin/env python
"""Start time of the inference commands: ``rnnlm-generate``, ``rnnlm-score`` and ``rnnlm-eval`` on a small
checkpoint, each timed as a whole process (interpreter start, imports, Hydra, reading the checkpoint, the work,
exit), against the floor: ``python -c "import torch"``, and that floor without Python's teardown (``os._exit``),
which the commands skip.

    python benchmarks/start_time.py                           # trains a tiny char model first (about 15 s)
    python benchmarks/start_time.py --ckpt RUN/checkpoints/last.ckpt --runs 9
    python benchmarks/start_time.py --importtime              # and what each command imports, heaviest first
    python benchmarks/start_time.py --compare /old/checkout/src  # the same commands on another rnnlm, interleaved
    python benchmarks/start_time.py --threads 1 --cached-bytecode

Each round runs every command once, in turn (so drift in the machine's speed hits all of them), from a scratch
folder. Printed per command: the median wall time from start to exit and to its first byte on stdout (min-max over
the rounds), and the median over the floor. The console scripts are those next to this Python
(``<prefix>/bin/rnnlm-*``), not a version manager's shims, whose own start would be counted too.

``--compare DIR`` also runs each command with ``PYTHONPATH=DIR``, where DIR holds another ``rnnlm`` package (the
``src/`` of another checkout), in the same rounds. ``--threads N`` sets ``OMP_NUM_THREADS`` for every process
timed. ``--cached-bytecode`` lets Python keep the modules it compiles (in a scratch ``PYTHONPYCACHEPREFIX``) when
``PYTHONDONTWRITEBYTECODE`` is set, as a normal install does; the untimed first round fills the cache.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ("model.hidden_size=32", "model.embedding_dim=16", "data.seq_len=16", "data.batch_size=4",
            "trainer.max_steps=5", "test=false", "logger=csv", "~callbacks.progress_bar")


def tiny_corpus(path: Path) -> Path:
    """600 short lines of a 20-word language (about 20 kB): enough for a char vocabulary and every split."""
    words = "the cat sat on a mat and dog ran to his big red house with my old friend who likes green tea".split()
    lines = [" ".join(words[(7 * i + 3 * j) % len(words)] for j in range(4 + i % 9)) for i in range(600)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_tiny(folder: Path) -> Path:
    """A small checkpoint to measure with: a 1x32 LSTM trained for 5 steps on :func:`tiny_corpus`."""
    corpus = tiny_corpus(folder / "text.txt")
    run = folder / "run"
    subprocess.run([sys.executable, str(REPO / "src" / "train.py"), f"data.path={corpus}", *TINY_RUN,
                    f"hydra.run.dir={run}"], cwd=folder, check=True, capture_output=True, text=True)
    return run / "checkpoints" / "last.ckpt"


def command(name: str) -> list[str]:
    """The console script ``rnnlm-<name>`` of this Python's environment, or ``python -m`` its module."""
    script = Path(sys.executable).parent / f"rnnlm-{name}"
    return [str(script)] if script.is_file() else [sys.executable, "-m", f"rnnlm.commands.{name}"]


def run_once(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds to the first byte on stdout and to exit, and the whole stdout; stops on a failure."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=err, env=env)
        first = process.stdout.read(1)
        first_at = time.perf_counter()
        rest = process.stdout.read()
        process.wait()
        end = time.perf_counter()
        if process.returncode != 0:
            err.seek(0)
            sys.exit(f"{' '.join(argv)} failed ({process.returncode}):\n{err.read().decode()[-3000:]}")
    return (first_at if first else end) - start, end - start, (first + rest).decode()


def import_times(argv: list[str], env: dict[str, str], cwd: Path, shown: int = 12) -> list[tuple[str, float]]:
    """What ``argv`` imports (``-X importtime``), heaviest first, in ms with what they import in turn: the modules
    imported at the top level or by those (the command's own imports, ``site``'s)."""
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
    rows = re.finditer(r"^import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)$", done.stderr, re.M)
    top = [(f"{'  ' * (len(m[2]) // 2)}{m[3]}", int(m[1]) / 1000) for m in rows if len(m[2]) <= 2]
    return sorted(top, key=lambda row: -row[1])[:shown]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, help="a checkpoint (default: train a tiny one in a scratch folder)")
    parser.add_argument("--runs", type=int, default=7, help="rounds; each runs every command once (default 7)")
    parser.add_argument("--importtime", action="store_true", help="also list each command's heaviest imports")
    parser.add_argument("--compare", type=Path, help="also run the commands with PYTHONPATH=COMPARE (another rnnlm)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every process timed")
    parser.add_argument("--cached-bytecode", action="store_true", help="keep compiled modules between runs")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="rnnlm-start-"))
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.cached_bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
    try:
        ckpt = args.ckpt.resolve() if args.ckpt else train_tiny(scratch)
        lines = tiny_corpus(scratch / "lines.txt")
        lines.write_text("".join(lines.read_text().splitlines(keepends=True)[:20]))
        inference = {
            "generate": [*command("generate"), f"ckpt_path={ckpt}", "prompt=the", "max_new_tokens=20"],
            "score": [*command("score"), f"ckpt_path={ckpt}", f"text_file={lines}"],
            "eval": [*command("eval"), f"ckpt_path={ckpt}", f"output={scratch / 'metrics.json'}", "overwrite=true"],
        }
        commands = {  # name -> (argv, environment)
            "python -c pass": ([sys.executable, "-c", "pass"], env),
            "import torch (floor)": ([sys.executable, "-c", "import torch"], env),
            # the floor less Python's teardown, which the commands skip (rnnlm.commands.cli.end_program)
            "import torch, os._exit": ([sys.executable, "-c", "import os, torch; os._exit(0)"], env),
            **{name: (argv, env) for name, argv in inference.items()},
        }
        if args.compare:
            other = {**env, "PYTHONPATH": str(args.compare.resolve())}
            commands.update({f"{name} ({args.compare})": (argv, other) for name, argv in inference.items()})
        print(f"checkpoint: {ckpt}\npython: {sys.executable}\n{args.runs} rounds; commands as run:")
        for name, (argv, _) in commands.items():
            print(f"  {name:22s} {' '.join(argv)}")
        for argv, environment in commands.values():  # once untimed: the file system's caches, the bytecode cache
            run_once(argv, scratch, environment)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, (argv, environment) in commands.items():
                first, total, _ = run_once(argv, scratch, environment)
                times[name].append((first, total))
        floor = statistics.median(total for _, total in times["import torch (floor)"])
        width = max(map(len, times))
        print(f"\n{'':{width}s} {'to exit: median (min-max) s':>30s} {'to first output':>16s} {'over floor':>11s}")
        for name, pairs in times.items():
            totals, firsts = [t for _, t in pairs], [f for f, _ in pairs]
            median = statistics.median(totals)
            print(f"{name:{width}s} {median:14.3f} ({min(totals):.3f}-{max(totals):.3f}) "
                  f"{statistics.median(firsts):16.3f} {median - floor:+11.3f}")
        if args.importtime:
            for name in inference:
                print(f"\n{name}: top-level imports (ms, -X importtime)")
                for module, ms in import_times(*commands[name], cwd=scratch):
                    print(f"  {module:40s} {ms:8.1f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
