#!/usr/bin/env python
"""Preparing a WikiText-103-sized word corpus: tokenization time, peak memory, cache size, and a second run's start.

The corpus is WikiText-2's train.txt repeated to about ``--tokens`` tokens (``<eos>`` per line counted, as the
cache counts them; 100M by default, WikiText-103's size), with WikiText-2's own valid.txt and test.txt, in one
folder. Each step runs in a fresh process, through the code path of
``python src/train.py data=word data.path=FOLDER``: the composed ``data`` config instantiated as a
``TextDataModule``, then

1. first run: its vocabulary (tokenize and cache); reported: the wall time, and the peak resident memory of that
   process (``ru_maxrss``; also how much of it came after the imports);
2. second run, in a new process: the cache is found, the ids memory-mapped, ``setup()`` builds the training
   stream and the first batch is drawn; reported: the time from the datamodule's creation to that batch
   (imports left out, and shown apart).

Targets: peak memory under 2 GB, a second run ready in under 1 s.

    python benchmarks/data_prep.py                                  # 100M tokens, in a temporary folder removed after
    python benchmarks/data_prep.py --tokens 5000000                 # a quick check (about 5M tokens)
    python benchmarks/data_prep.py --repeat 10 --json prep.json     # WikiText-2 train x10; numbers also to prep.json
    python benchmarks/data_prep.py --dir /tmp/wt100m                # keep corpus/ and cache/ there, then train:
    python src/train.py data=word data.path=/tmp/wt100m/corpus paths.cache_dir=/tmp/wt100m/cache  # (cache hit)

The corpus folder takes about 5.2 bytes a token (518 MB at 100M) and the cache 2 bytes a token (uint16 ids).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEAK_TARGET = 2 * 1024**3  # bytes
READY_TARGET = 1.0  # seconds


# ------------------------------------------------------------------ the measured steps (each in a child process)
def _datamodule_config(corpus: Path, cache: Path):
    from hydra import compose, initialize_config_dir

    from rnnlm.commands.cli import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data=word", f"data.path={corpus}", f"paths.cache_dir={cache}"])
    return cfg.data


def _first_batch(data_cfg) -> tuple[object, float]:
    """A datamodule from ``data_cfg`` as train.py makes it, set up, and its first training batch; the seconds taken."""
    from hydra.utils import instantiate

    start = time.perf_counter()
    datamodule = instantiate(data_cfg, _convert_="all")
    datamodule.setup("fit")
    next(iter(datamodule.train_dataloader()))
    return datamodule, time.perf_counter() - start


def child_first_run(corpus: Path, cache: Path) -> dict:
    start_imports = time.perf_counter()
    from hydra.utils import instantiate

    import rnnlm.datamodule  # noqa: F401  (imported here so that the timing below is the work alone)

    data_cfg = _datamodule_config(corpus, cache)
    imports = time.perf_counter() - start_imports
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    datamodule = instantiate(data_cfg, _convert_="all")
    prepared = datamodule.load()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _, warm = _first_batch(data_cfg)  # the cache read back in the same process (files in the page cache)
    return {
        "imports_s": imports, "tokenize_s": seconds, "peak_rss_bytes": peak, "rss_after_imports_bytes": base,
        "tokens": {s: len(a) for s, a in prepared.splits.items()}, "vocab_size": len(prepared.vocab),
        "dtype": str(prepared.splits["train"].dtype), "cache_path": str(prepared.path),
        "cache_bytes": sum(p.stat().st_size for p in prepared.path.iterdir()), "ready_same_process_s": warm,
    }


def child_second_run(corpus: Path, cache: Path) -> dict:
    start_imports = time.perf_counter()
    import rnnlm.datamodule  # noqa: F401
    import rnnlm.prepare

    data_cfg = _datamodule_config(corpus, cache)
    imports = time.perf_counter() - start_imports
    built = []
    rnnlm.prepare._build = lambda *a: built.append(a)  # a cache miss would show here, and fail below
    datamodule, seconds = _first_batch(data_cfg)
    if built:
        raise RuntimeError("the second run did not find the token cache")
    return {"imports_s": imports, "ready_s": seconds, "cache_path": str(datamodule.load().path),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


CHILDREN = {"first": child_first_run, "second": child_second_run}


def run_child(step: str, corpus: Path, cache: Path) -> dict:
    """Run one step in a fresh Python process; its result is the last line it prints."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", step, "--corpus", str(corpus), "--cache", str(cache)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {step} run failed (exit {done.returncode}): {done.stderr.strip()[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start  # interpreter start and imports included
    return result


# ------------------------------------------------------------------ the corpus
def build_corpus(wikitext2: dict[str, list[Path]], folder: Path, tokens: int, repeat: int | None) -> tuple[int, int]:
    """WikiText-2's train repeated into ``folder/train.txt`` (``repeat`` times, or enough for ``tokens``), its valid
    and test copied. Returns the repeat count and the train tokens (whitespace tokens plus one ``<eos>`` a line)."""
    source = wikitext2["train"][0]
    with open(source, encoding="utf-8") as fh:
        per_copy = sum(len(line.split()) + 1 for line in fh)
    repeat = repeat or max(1, math.ceil(tokens / per_copy))
    folder.mkdir(parents=True, exist_ok=True)
    text = source.read_bytes()
    with open(folder / "train.txt", "wb") as out:
        for _ in range(repeat):
            out.write(text)
    for split in ("valid", "test"):
        shutil.copyfile(wikitext2[split][0], folder / f"{split}.txt")
    return repeat, repeat * per_copy


# ------------------------------------------------------------------ report
def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def print_table(r: dict) -> None:
    first, second = r["first_run"], r["second_run"]
    total = sum(first["tokens"].values())
    peak_ok = first["peak_rss_bytes"] < PEAK_TARGET
    ready_ok = second["ready_s"] < READY_TARGET
    print(f"\ncorpus: WikiText-2 train x{r['repeat']} + its valid/test, {mb(r['corpus_bytes'])}; tokens "
          + ", ".join(f"{s} {n:,}" for s, n in first["tokens"].items())
          + f"; vocabulary {first['vocab_size']:,} ({first['dtype']} ids)")
    print(f"machine: {r['machine']}\n")
    print("| measure | value | target | met |")
    print("|---|---:|---:|:---:|")
    rate = total / first["tokenize_s"] / 1e6
    print(f"| tokenization, first run | {first['tokenize_s']:.1f} s ({rate:.2f} M tokens/s) | | |")
    print(f"| peak memory of that process | {mb(first['peak_rss_bytes'])} "
          f"({mb(first['peak_rss_bytes'] - first['rss_after_imports_bytes'])} after the imports) | < 2 GB "
          f"| {'yes' if peak_ok else 'NO'} |")
    print(f"| token cache on disk | {mb(first['cache_bytes'])} ({first['cache_bytes'] / total:.2f} bytes/token) | | |")
    print(f"| second run ready to train, fresh process | {second['ready_s']:.3f} s (+ {second['imports_s']:.1f} s "
          f"of imports; process {second['process_s']:.1f} s) | < 1 s | {'yes' if ready_ok else 'NO'} |")
    print(f"| second run ready to train, same process | {first['ready_same_process_s']:.3f} s | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(__file__).resolve().parents[2] / "shared"
    parser.add_argument("--tokens", type=float, default=100e6, help="train tokens to reach (default 100M)")
    parser.add_argument("--repeat", type=int, help="copies of WikiText-2's train (overrides --tokens)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("RNNLM_DATA_DIR", shared / "data")),
                        help="holds wikitext-2/{train,valid,test}.txt (downloaded there when missing)")
    parser.add_argument("--dir", type=Path, help="build corpus/ and cache/ here and keep them (default: a temporary "
                                                 "folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.corpus, args.cache)))
        return

    from rnnlm.corpora import named_source

    wikitext2 = named_source("wikitext2", args.data_dir).files
    root = args.dir or Path(tempfile.mkdtemp(prefix="rnnlm-data-prep-"))
    corpus, cache = root / "corpus", root / "cache"
    try:
        start = time.perf_counter()
        repeat, _ = build_corpus(wikitext2, corpus, int(args.tokens), args.repeat)
        print(f"wrote {corpus} (WikiText-2 train x{repeat}) in {time.perf_counter() - start:.1f} s", flush=True)
        shutil.rmtree(cache, ignore_errors=True)  # the first run must tokenize
        first = run_child("first", corpus, cache)
        print(f"first run: tokenized in {first['tokenize_s']:.1f} s", flush=True)
        second = run_child("second", corpus, cache)
        result = {
            "repeat": repeat, "corpus_bytes": sum(p.stat().st_size for p in corpus.iterdir()),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
                       f"{platform.python_version()}",
            "first_run": first, "second_run": second,
            "targets": {"peak_rss_bytes": PEAK_TARGET, "ready_s": READY_TARGET},
            "met": {"peak_rss": first["peak_rss_bytes"] < PEAK_TARGET, "ready": second["ready_s"] < READY_TARGET},
        }
        print_table(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        if args.dir or args.keep:
            print(f"\nkept {root}: python src/train.py data=word data.path={corpus} paths.cache_dir={cache}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
