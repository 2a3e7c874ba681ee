"""Summarise a sweep from what its runs logged: ``rnnlm-report outputs/train/multiruns/<sweep>``.

Writes, into the sweep folder, ``summary.csv`` and ``summary.md`` (one row per job: the swept values,
parameter count, best validation loss and perplexity or bits per character, test metrics, tokens/s,
wall time, status), ``curves.png`` (every job's validation loss against tokens seen), ``curves_time.png``
(against training wall time, for comparisons at equal time budgets, ``trainer.max_time``) and, for jobs
trained with ``callbacks=diagnostics``, ``gradient_flow.png`` (how far back each one's gradient reaches). Nothing
is re-run: each job's ``run_summary.json`` and its TensorBoard events (or ``csv/metrics.csv``) are read.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import re
import sys
from pathlib import Path

import yaml

from rnnlm.loss import loss_in_units

SKIPPED_OVERRIDES = ("hydra.", "paths.")  # where things go, not what was compared
GRADIENT_FLOW_FILE = "gradient_flow.csv"  # written by rnnlm.diagnostics.GradientFlow


def job_dirs(sweep: Path) -> list[Path]:
    """The sweep's job folders (those Hydra wrote a config into), in job order."""
    jobs = [p for p in sweep.iterdir() if (p / ".hydra" / "config.yaml").is_file()]
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def swept_values(job: Path) -> dict[str, str]:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    values = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        if not key.lstrip("+~").startswith(SKIPPED_OVERRIDES):
            values[key] = re.sub(r"\\(.)", r"\1", value)  # as typed: Hydra escapes ':' and the like (00\:35\:00)
    return values


@functools.cache  # the table and every figure read a job's events: once per report
def _events(job: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(job / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def curves(job: Path) -> dict[str, list[tuple[int, float]]]:
    """Logged scalars as ``tag -> [(step, value)]``, from TensorBoard events or the CSV log."""
    if (job / "tensorboard").is_dir():
        return {tag: [(e.step, e.value) for e in scalars] for tag, scalars in _events(job).items()}
    found: dict[str, list[tuple[int, float]]] = {}
    metrics = job / "csv" / "metrics.csv"
    if metrics.is_file():
        for row in csv.DictReader(metrics.open()):
            for tag, value in row.items():
                if tag not in ("epoch", "step") and value not in ("", None):
                    found.setdefault(tag, []).append((int(row["step"]), float(value)))
    return found


def timed_curve(job: Path, tag: str = "val/loss") -> list[tuple[float, float]]:
    """``[(seconds, value)]`` of one logged scalar, timed from the job's first logged scalar (TensorBoard events
    record when they were written; the CSV log does not: empty then)."""
    if not (job / "tensorboard").is_dir():
        return []
    scalars = _events(job)
    if tag not in scalars:
        return []
    start = min(e.wall_time for events in scalars.values() for e in events)
    return [(e.wall_time - start, e.value) for e in scalars[tag]]


def _tokens_at(step: int, seen: list[tuple[int, float]]) -> float:
    """Tokens seen by ``step``, read off the logged ``train/tokens_seen`` (the last value at or before it)."""
    before = [value for s, value in seen if s <= step]
    return before[-1] if before else 0.0


def job_row(job: Path, swept: list[str]) -> dict:
    """One row of the summary table; ``swept`` names the overrides that differ between jobs."""
    summary_file = job / "run_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"status": "no summary"}
    logged = curves(job)
    metrics = summary.get("metrics") or {}
    values = swept_values(job)
    row: dict = {"job": job.name, **{k: values.get(k, "") for k in swept}, "status": summary.get("status"),
                 "params": summary.get("params")}
    level = summary.get("level") or (yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) or {}).get(
        "data", {}).get("level")
    val = [v for _, v in logged.get("val/loss", [])]
    best = min(val) if val else None
    unit = loss_in_units(0.0, level)[0]
    row["best val/loss"] = best
    row[f"best val/{unit}"] = None if best is None else loss_in_units(best, level)[1]
    test = metrics.get("test/loss")
    row["test/loss"] = test
    row[f"test/{unit}"] = None if test is None else loss_in_units(test, level)[1]
    if "val/answer_acc" in logged:  # data.scored=last (data=recall): the share of answers recalled
        row["best val/answer_acc"] = max(v for _, v in logged["val/answer_acc"])
        row["test/answer_acc"] = metrics.get("test/answer_acc")
    row["tokens/s"] = summary.get("tokens_per_s")
    row["wall s"] = summary.get("wall_s")
    row["error"] = summary.get("error", "")
    return row


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if column in ("tokens/s", "params") else f"{value:,.1f}" if column == "wall s" \
            else f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int) and column == "params":
        return f"{value:,}"
    return str(value)


def varying_overrides(jobs: list[Path]) -> tuple[list[str], dict[str, str]]:
    """The overrides whose values differ between jobs (the swept ones) and those all jobs share."""
    values = [swept_values(job) for job in jobs]
    keys = list(dict.fromkeys(k for v in values for k in v))
    varying = [k for k in keys if len({v.get(k) for v in values}) > 1]
    shared = {k: values[0][k] for k in keys if k not in varying and k in values[0]}
    return varying, shared


def write_report(sweep: Path) -> list[Path]:
    """Write summary.csv, summary.md and curves.png into ``sweep`` (and curves_time.png from TensorBoard events,
    gradient_flow.png when its jobs measured it, ``callbacks=diagnostics``, answer_accuracy.png for a sweep over
    data.recall's distance); return their paths."""
    _events.cache_clear()  # the runs may have logged more since an earlier report in this process
    jobs = job_dirs(sweep)
    if not jobs:
        raise SystemExit(f"error: {sweep} holds no job folders (each has .hydra/config.yaml): give a sweep folder")
    swept, shared = varying_overrides(jobs)
    rows = [job_row(job, swept) for job in jobs]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    csv_path, md_path, png_path = sweep / "summary.csv", sweep / "summary.md", sweep / "curves.png"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Sweep `{sweep.name}`: {len(rows)} jobs"]
    if shared:
        lines[0] += ", all with " + " ".join(f"`{k}={v}`" for k, v in shared.items())
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c, row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    _plot(jobs, swept, png_path)
    written = [csv_path, md_path, png_path]
    if any(timed_curve(job) for job in jobs):
        written.append(_plot_against_time(jobs, swept, sweep / "curves_time.png"))
    if any((job / GRADIENT_FLOW_FILE).is_file() for job in jobs):
        written.append(_plot_gradient_flow(jobs, swept, sweep / "gradient_flow.png"))
    distance = next((k for k in swept if k.endswith("distance")), None)
    if distance and any(row.get("best val/answer_acc") is not None for row in rows):
        written.append(_plot_answer_accuracy(rows, distance, swept, sweep / "answer_accuracy.png"))
    return written


def _new_figure():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5), dpi=110)


def _save(figure, axes, path: Path) -> None:
    import matplotlib.pyplot as plt

    if axes.lines:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _plot(jobs: list[Path], swept: list[str], path: Path) -> None:
    figure, axes = _new_figure()
    for job in jobs:
        logged = curves(job)
        points = logged.get("val/loss", [])
        if not points:
            continue
        seen = logged.get("train/tokens_seen", [])
        x = [_tokens_at(step, seen) if seen else step for step, _ in points]
        values = swept_values(job)
        label = ", ".join(f"{k}={values.get(k, '')}" for k in swept) or job.name
        axes.plot(x, [v for _, v in points], marker="o", markersize=3, label=label)
    axes.set_xlabel("tokens seen" if any("train/tokens_seen" in curves(j) for j in jobs) else "step")
    axes.set_ylabel("validation loss (nats per token)")
    axes.grid(alpha=0.3)
    _save(figure, axes, path)


def _plot_against_time(jobs: list[Path], swept: list[str], path: Path) -> Path:
    figure, axes = _new_figure()
    for job in jobs:
        if points := timed_curve(job):
            values = swept_values(job)
            label = ", ".join(f"{k}={values.get(k, '')}" for k in swept) or job.name
            axes.plot([t / 60 for t, _ in points], [v for _, v in points], marker="o", markersize=3, label=label)
    axes.set_xlabel("training time (minutes, from the first logged value)")
    axes.set_ylabel("validation loss (nats per token)")
    axes.grid(alpha=0.3)
    _save(figure, axes, path)
    return path


def _plot_gradient_flow(jobs: list[Path], swept: list[str], path: Path) -> Path:
    """Each job's last measured ‖∂L/∂h_{T-k}‖ against k, relative to k = 0, on one log scale."""
    figure, axes = _new_figure()
    for job in jobs:
        if not (job / GRADIENT_FLOW_FILE).is_file():
            continue
        with open(job / GRADIENT_FLOW_FILE, newline="") as fh:
            rows = [(int(r["step"]), int(r["k"]), float(r["grad_norm"])) for r in csv.DictReader(fh)]
        last = max(step for step, _, _ in rows)
        norms = [norm for step, _, norm in sorted(rows) if step == last]
        values = swept_values(job)
        label = ", ".join(f"{k}={values.get(k, '')}" for k in swept) or job.name
        axes.semilogy(range(len(norms)), [max(n / norms[0], 1e-30) if norms[0] else math.nan for n in norms],
                      label=f"{label} (step {last})")
    axes.set_xlabel("k: steps back from the prediction")
    axes.set_ylabel("‖∂L/∂h(T−k)‖ / ‖∂L/∂h(T)‖")
    axes.grid(alpha=0.3, which="both")
    _save(figure, axes, path)
    return path


def _plot_answer_accuracy(rows: list[dict], distance: str, swept: list[str], path: Path) -> Path:
    """The best validation answer accuracy against the swept distance, one line per value of the other swept
    settings (e.g. per model)."""
    others = [k for k in swept if k != distance]
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get("best val/answer_acc") is not None:
            label = ", ".join(f"{k}={row[k]}" for k in others) or "runs"
            lines.setdefault(label, []).append((float(row[distance]), row["best val/answer_acc"]))
    figure, axes = _new_figure()
    for label, points in lines.items():
        points.sort()
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    axes.set_xscale("log")
    axes.set_xlabel(distance)
    axes.set_ylabel("best validation answer accuracy")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3, which="both")
    _save(figure, axes, path)
    return path


def main() -> None:
    """Console entry point: ``rnnlm-report SWEEP_FOLDER``."""
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: rnnlm-report outputs/train/multiruns/<sweep>", file=sys.stderr)
        sys.exit(2)
    sweep = Path(sys.argv[1])
    if not sweep.is_dir():
        print(f"error: {sweep} is not a folder: give a sweep folder from outputs/train/multiruns/", file=sys.stderr)
        sys.exit(2)
    for written in write_report(sweep):
        print(written)


if __name__ == "__main__":
    main()
