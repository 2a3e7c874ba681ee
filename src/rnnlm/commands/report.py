"""Summarise a sweep from what its runs logged: ``rnnlm-report outputs/train/multiruns/<sweep> [--output DIR]``.

Writes ``summary.csv`` and ``summary.md`` (one row per job: the swept values, parameter count, best validation
loss and perplexity or bits per character, test metrics, tokens/s, wall time, status), ``curves.png`` (every
job's validation loss against tokens seen), ``curves_time.png`` (against training wall time, for comparisons at
equal time budgets, ``trainer.max_time``) and, for jobs trained with ``callbacks=diagnostics``,
``gradient_flow.png`` (how far back each one's gradient reaches). Nothing is re-run: each job's
``run_summary.json`` and its TensorBoard events (or ``csv/metrics.csv``) are read.

Seeds: jobs whose swept values differ only in ``seed`` are repeats of one setting (``python src/train.py -m
seed=1,2,3 model=rnn,gru``; a job left at the config's seed joins them). ``summary.md`` then opens with one row per
group: each metric's mean ± sample standard deviation over the group's n finished jobs (``summary_seeds.csv``: mean,
std and n in columns of their own); the figures draw each group's mean with a band of ± one standard deviation
(accuracy against distance: error bars). The per-job rows stay in ``summary.csv`` and below in ``summary.md``.

The files go into the sweep folder, or into ``--output DIR``; a sweep folder this user cannot write to sends
them to ``./report-<sweep>/``. A sweep that was damaged still gets its report: a job whose files cannot be
read is a row with status ``damaged`` and what is wrong (``error`` column), a job the sweep launched whose
folder is gone (``multirun.yaml`` lists the sweep's jobs; a gap in the numbered folders shows one too) is a row
with status ``missing``.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rnnlm.errors import UserError
from rnnlm.files import write_atomically
from rnnlm.loss import loss_in_units

log = logging.getLogger(__name__)

SKIPPED_OVERRIDES = ("hydra.", "paths.")  # where things go, not what was compared
SEED = "seed"  # jobs that differ only in it are repeats of one setting: a group, shown as mean ± std
GRADIENT_FLOW_FILE = "gradient_flow.csv"  # written by rnnlm.diagnostics.GradientFlow
SUMMARY_FILE = "run_summary.json"  # written by rnnlm.commands.train
PLAN_FILE = "multirun.yaml"  # written by Hydra into the sweep folder: the sweep's config and overrides
JOB_NUMBER = "${hydra.job.num}"  # hydra.sweep.subdir when job folders are numbered 0, 1, ... in launch order
USAGE = "rnnlm-report SWEEP_FOLDER [--output DIR]"
ARGUMENTS = (  # what --help and docs/configuration.md say of each (rnnlm.reference)
    ("SWEEP_FOLDER", "a sweep's folder, outputs/train/multiruns/<date>_<time>/, with a job folder per run"),
    ("--output DIR", "write the report into DIR (made if missing) instead of the sweep folder; also --output=DIR"),
)


class ReportError(UserError):
    """A sweep folder or output folder the report cannot use; the message says why and what to give instead."""


class Damaged(Exception):
    """A job's file that cannot be read; the message names the file and what is wrong with it."""


@dataclass
class Job:
    """What the report knows of one job of the sweep."""

    name: str
    folder: Path | None  # None: the sweep launched it, but its folder is gone
    values: dict[str, str] = field(default_factory=dict)  # its overrides, as typed
    summary: dict = field(default_factory=dict)  # its run_summary.json
    level: str | None = None  # data.level: char, word or bpe
    keys: int | None = None  # data.recall.keys of the recall task (chance: 1/keys)
    logged: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # see curves()
    timed: list[tuple[float, float]] = field(default_factory=list)  # see timed_curve()
    flow: tuple[int, list[float]] | None = None  # the last step of gradient_flow.csv and its norms by k
    problems: list[str] = field(default_factory=list)  # why it is damaged, or missing

    @property
    def status(self) -> str:
        if self.folder is None:
            return "missing"
        return "damaged" if self.problems else str(self.summary.get("status", "no summary"))

    @property
    def readable(self) -> bool:
        return self.folder is not None and not self.problems


@dataclass
class Group:
    """Jobs whose swept values differ only in the seed: repeats of one setting. Without a swept seed each job is a
    group of its own."""

    values: dict[str, str]  # the swept values its jobs share (all but the seed)
    jobs: list[Job]
    counted: list[Job]  # those its means, bands and error bars are made of

    @property
    def left_out(self) -> list[Job]:
        return [job for job in self.jobs if job not in self.counted]


def seed_groups(jobs: list[Job], swept: list[str]) -> list[Group]:
    """The sweep's jobs grouped by every swept value but the seed, in job order. A group counts its jobs that
    finished (status ``ok``): a damaged, missing, failed or unfinished one is left out of its means. Without a swept
    seed each job is a group of its own, counted whenever its files can be read, as a finished job is."""
    if SEED not in swept:
        return [Group({k: job.values.get(k, "") for k in swept}, [job], [job] if job.readable else []) for job in jobs]
    others = [key for key in swept if key != SEED]
    grouped: dict[tuple, list[Job]] = {}
    for job in jobs:  # a job whose overrides are unknown is a group of its own: it cannot be placed
        key = tuple(job.values.get(k, "") for k in others) if job.values else ("job", job.name)
        grouped.setdefault(key, []).append(job)
    return [Group({k: members[0].values.get(k, "") for k in others}, members,
                  [job for job in members if job.readable and job.status == "ok"]) for members in grouped.values()]


def job_dirs(sweep: Path) -> list[Path]:
    """The sweep's job folders, in job order: the numbered folders, and any other that Hydra wrote a config into."""
    jobs = [p for p in sweep.iterdir() if p.is_dir() and (p.name.isdigit() or (p / ".hydra" / "config.yaml").is_file())]
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def _parse_overrides(items) -> dict[str, str]:
    values = {}
    for item in items:
        key, _, value = str(item).partition("=")
        if not key.lstrip("+~").startswith(SKIPPED_OVERRIDES):
            values[key] = re.sub(r"\\(.)", r"\1", value)  # as typed: Hydra escapes ':' and the like (00\:35\:00)
    return values


def swept_values(job: Path) -> dict[str, str]:
    """The job's overrides (``.hydra/overrides.yaml``) as typed, less where its files go.

    Raises:
        Damaged: the file is missing or is not a YAML list.
    """
    overrides = _read_yaml(job, ".hydra/overrides.yaml")
    if overrides is None:
        overrides = []
    if not isinstance(overrides, list):
        raise Damaged(f".hydra/overrides.yaml holds a {type(overrides).__name__}, not a list of overrides")
    return _parse_overrides(overrides)


def _read_text(job: Path, name: str) -> str:
    try:
        return (job / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Damaged(f"{name} is missing") from None
    except UnicodeDecodeError as err:
        raise Damaged(f"{name} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise Damaged(f"cannot read {name} ({err.strerror})") from None


def _read_yaml(job: Path, name: str):
    try:
        return yaml.safe_load(_read_text(job, name))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise Damaged(f"{name} is not valid YAML{where} (truncated?)") from None


def _read_summary(job: Path) -> dict:
    if not (job / SUMMARY_FILE).exists():
        return {"status": "no summary"}  # still running, or killed before it could write one
    text = _read_text(job, SUMMARY_FILE)
    if not text.strip():
        raise Damaged(f"{SUMMARY_FILE} is empty")
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as err:
        raise Damaged(f"{SUMMARY_FILE} is not valid JSON ({err.msg} at character {err.pos} of {len(text)}: "
                      f"truncated?)") from None
    if not isinstance(summary, dict):
        raise Damaged(f"{SUMMARY_FILE} holds a {type(summary).__name__}, not an object")
    return summary


@functools.cache  # the table and every figure read a job's events: once per report
def _events(job: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(job / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def _tensorboard(job: Path):
    try:
        return _events(job)
    except Exception as err:  # whatever a damaged events file makes TensorBoard raise
        raise Damaged(f"cannot read tensorboard/ ({type(err).__name__}: {str(err)[:200]})") from None


def curves(job: Path) -> dict[str, list[tuple[int, float]]]:
    """Logged scalars as ``tag -> [(step, value)]``, from TensorBoard events or the CSV log.

    Raises:
        Damaged: the events or ``csv/metrics.csv`` cannot be read.
    """
    if (job / "tensorboard").is_dir():
        return {tag: [(e.step, e.value) for e in scalars] for tag, scalars in _tensorboard(job).items()}
    name = "csv/metrics.csv"
    found: dict[str, list[tuple[int, float]]] = {}
    if not (job / name).is_file():
        return found
    lines = _read_text(job, name).splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # the line a running job is writing
    reader = csv.DictReader(lines)
    for row in reader:
        where = f"{name} line {reader.line_num}"
        if None in row or None in row.values():
            raise Damaged(f"{where} does not have the header's {len(reader.fieldnames)} fields")
        try:
            step = int(row["step"])
        except (KeyError, ValueError):
            raise Damaged(f"{where} has no step number") from None
        for tag, value in row.items():
            if tag in ("epoch", "step") or value == "":
                continue
            try:
                found.setdefault(tag, []).append((step, float(value)))
            except ValueError:
                raise Damaged(f"{where}: {tag}={value[:20]!r} is not a number") from None
    return found


def timed_curve(job: Path, tag: str = "val/loss") -> list[tuple[float, float]]:
    """``[(seconds, value)]`` of one logged scalar, timed from the job's first logged scalar (TensorBoard events
    record when they were written; the CSV log does not: empty then)."""
    if not (job / "tensorboard").is_dir():
        return []
    scalars = _tensorboard(job)
    if tag not in scalars:
        return []
    start = min(e.wall_time for events in scalars.values() for e in events)
    return [(e.wall_time - start, e.value) for e in scalars[tag]]


def _gradient_flow(job: Path) -> tuple[int, list[float]] | None:
    """The last measured step of the job's ``gradient_flow.csv`` and its ‖∂L/∂h_{T-k}‖ for k = 0, 1, ..."""
    if not (job / GRADIENT_FLOW_FILE).is_file():
        return None
    reader = csv.DictReader(io.StringIO(_read_text(job, GRADIENT_FLOW_FILE), newline=""))
    try:
        rows = [(int(r["step"]), int(r["k"]), float(r["grad_norm"])) for r in reader]
    except (KeyError, TypeError, ValueError):
        raise Damaged(f"{GRADIENT_FLOW_FILE} line {reader.line_num} is not step,k,grad_norm numbers") from None
    if not rows:
        return None
    last = max(step for step, _, _ in rows)
    return last, [norm for step, _, norm in sorted(rows) if step == last]


def load_job(folder: Path) -> Job:
    """Read what one job left; every file that cannot be read is a problem of the job, not of the report."""
    job = Job(folder.name, folder)

    def attempt(read, default):
        try:
            return read()
        except Damaged as err:
            job.problems.append(str(err))
            return default

    config = {}
    if not (folder / ".hydra").is_dir():
        job.problems.append(".hydra/ is missing (Hydra writes it as the job starts)")
    else:
        config = attempt(lambda: _read_yaml(folder, ".hydra/config.yaml"), {})
        if not isinstance(config, dict):
            job.problems.append(f".hydra/config.yaml holds a {type(config).__name__}, not a config")
            config = {}
        job.values = attempt(lambda: swept_values(folder), {})
    job.summary = attempt(lambda: _read_summary(folder), {})
    data = config.get("data")
    job.level = job.summary.get("level") or (data.get("level") if isinstance(data, dict) else None)
    recall = data.get("recall") if isinstance(data, dict) else None
    job.keys = recall.get("keys") if isinstance(recall, dict) else None
    logged = attempt(lambda: curves(folder), None)
    if logged is not None:  # else its events are damaged: said once
        job.logged, job.timed = logged, attempt(lambda: timed_curve(folder), [])
    job.flow = attempt(lambda: _gradient_flow(folder), None)
    if job.problems and not folder.is_dir():
        job.folder, job.problems = None, ["its folder was deleted while the report read it"]
    return job


def planned_jobs(sweep: Path) -> list[dict[str, str]] | None:
    """The jobs the sweep launches, in job order, each as its overrides, from the ``multirun.yaml`` Hydra's
    basic sweeper (``-m``) writes; None if that cannot tell (no such file, as for Optuna, job folders not
    numbered by ``hydra.job.num``, or a damaged file)."""
    path = sweep / PLAN_FILE
    if not path.is_file():
        return None
    try:
        hydra = (yaml.safe_load(path.read_text(encoding="utf-8")) or {})["hydra"]
        if hydra["sweep"]["subdir"] != JOB_NUMBER:
            return None
        sweeper = hydra["sweeper"]
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        arguments += list(hydra["overrides"]["task"])
        [jobs] = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
        return [_parse_overrides(overrides) for overrides in jobs]
    except Exception as err:  # a damaged file, or a sweep Hydra's parser needs the config for (glob)
        log.warning("note: cannot tell the sweep's jobs from %s (%s: %s): a job missing after the last folder is "
                    "not listed", path, type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
        return None


def _sweep_near(path: Path) -> Path | None:
    """A sweep folder the user may have meant: the newest one inside ``path``, or the one ``path`` is in."""
    def is_sweep(folder: Path) -> bool:
        try:
            return folder.is_dir() and bool(job_dirs(folder))
        except OSError:
            return False

    try:
        inside = [p for p in sorted(path.iterdir()) if is_sweep(p)] if path.is_dir() else []
    except OSError:
        inside = []
    return inside[-1] if inside else next((p for p in list(path.parents)[:3] if is_sweep(p)), None)


def sweep_jobs(sweep: Path) -> list[Job]:
    """Every job of the sweep, in job order: those with a folder, read, and those whose folder is gone."""
    folders = job_dirs(sweep)
    if not folders:
        near = _sweep_near(sweep)
        raise ReportError(f"{sweep} holds no job folders (each has .hydra/config.yaml): give a sweep folder"
                          f"{f', e.g. {near}' if near else ''}")
    jobs = [load_job(folder) for folder in folders]
    plan = planned_jobs(sweep)
    numbers = {int(job.name) for job in jobs if job.name.isdigit()}
    expected = len(plan) if plan is not None else max(numbers, default=-1) + 1
    for number in sorted(set(range(expected)) - numbers):
        known = plan[number] if plan is not None else {}
        reason = (f"listed in {PLAN_FILE}, but its folder {number}/ is gone (deleted, or not started)"
                  if plan is not None else f"its folder {number}/ is gone (deleted?): later jobs have theirs")
        jobs.append(Job(str(number), None, values=known, problems=[reason]))
    if plan is not None:
        for job in jobs:
            if job.name.isdigit() and int(job.name) < len(plan) and not job.values and plan[int(job.name)]:
                job.values = plan[int(job.name)]  # its overrides.yaml is damaged: the sweep's plan says
    return sorted(jobs, key=lambda j: (not j.name.isdigit(), int(j.name) if j.name.isdigit() else 0, j.name))


def job_row(job: Job, swept: list[str]) -> dict:
    """One row of the summary table; ``swept`` names the overrides that differ between jobs."""
    row: dict = {"job": job.name, **{k: job.values.get(k, "") for k in swept}, "status": job.status}
    if not job.readable:
        row["error"] = "; ".join(job.problems)
        return row
    summary, logged = job.summary, job.logged
    metrics = summary.get("metrics") if isinstance(summary.get("metrics"), dict) else {}
    row["params"] = summary.get("params")
    val = [v for _, v in logged.get("val/loss", [])]
    best = min(val) if val else None
    unit = loss_in_units(0.0, job.level)[0]
    row["best val/loss"] = best
    row[f"best val/{unit}"] = None if best is None else loss_in_units(best, job.level)[1]
    test = metrics.get("test/loss")
    row["test/loss"] = test
    row[f"test/{unit}"] = None if test is None else loss_in_units(test, job.level)[1]
    if unit != "bpc" and ("val/bpc" in logged or "test/bpc" in metrics):  # word and bpe: bits per character too,
        # logged from the characters of each split (not a function of the loss), at the best val/loss's step
        at_best = [step for step, v in logged.get("val/loss", []) if v == best]
        bpc = dict(logged.get("val/bpc", []))
        row["best val/bpc"] = bpc.get(at_best[0]) if at_best else None
        row["test/bpc"] = metrics.get("test/bpc")
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


def varying_overrides(jobs: list[Job]) -> tuple[list[str], dict[str, str]]:
    """The overrides whose values differ between jobs (the swept ones) and those all jobs share (jobs whose
    overrides are unknown left out)."""
    values = [job.values for job in jobs if job.values]
    keys = list(dict.fromkeys(k for v in values for k in v))
    varying = [k for k in keys if len({v.get(k) for v in values}) > 1]
    shared = {k: values[0][k] for k in keys if k not in varying and k in values[0]}
    return varying, shared


def _writable(folder: Path) -> str:
    """'' if this process can create files in ``folder``, else why not. A real try: permission bits do not
    stop root, and a read-only mount stops everyone."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".rnnlm-report.", dir=folder)
    except OSError as err:
        return err.strerror or type(err).__name__
    os.close(fd)
    os.unlink(probe)
    return ""


def output_folder(sweep: Path, output: Path | None = None) -> Path:
    """Where the report goes: ``output`` (created if need be), else the sweep folder, or ``./report-<sweep>/``
    when this process cannot write in the sweep folder.

    Raises:
        ReportError: that folder cannot be created or written in.
    """
    if output is None:
        if not (why := _writable(sweep)):
            return sweep
        output = Path(f"report-{sweep.resolve().name}")
        log.warning("note: cannot write in %s (%s): the report goes to %s/", sweep, why, output)
        fix = "give --output DIR"
    else:
        fix = "give --output a folder you can write to"
    if output.exists() and not output.is_dir():
        raise ReportError(f"{output} is a file, not a folder: {fix}")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"cannot create the report folder {output} ({err.strerror}): {fix}") from None
    if why := _writable(output):
        raise ReportError(f"cannot write the report in {output} ({why}): {fix}")
    return output


def group_row(group: Group, rows: dict[str, dict], metrics: list[str]) -> dict:
    """One row of the table of groups: the swept values its jobs share, ``n`` (the jobs counted), the jobs left out
    and why, and each metric's values over the counted jobs (a list: see :func:`_mean_std`)."""
    row: dict = {**group.values, "n": len(group.counted),
                 "left out": ", ".join(f"{job.name} ({job.status})" for job in group.left_out)}
    for metric in metrics:
        row[metric] = [value for job in group.counted
                       if isinstance(value := rows[job.name].get(metric), int | float) and math.isfinite(value)]
    return row


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator); None where too few values."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _mean_cell(column: str, values: list[float], n: int) -> str:
    """``mean ± std`` of a metric over a group's jobs; one value when they all agree (a parameter count), and how
    many jobs gave it when some of the group's did not log it."""
    mean, std = _mean_std(values)
    if mean is None:
        return ""
    text = _cell(column, values[0]) if len(set(values)) == 1 else f"{_cell(column, mean)} ± {_cell(column, std)}"
    return text if len(values) == n else f"{text} (n={len(values)})"


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _md_table(cells: list[list[str]], columns: list[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells)]


def write_report(sweep: Path, output: Path | None = None) -> list[Path]:
    """Write summary.csv, summary.md and curves.png (and curves_time.png from TensorBoard events,
    gradient_flow.png when its jobs measured it, ``callbacks=diagnostics``, answer_accuracy.png for a sweep over
    data.recall's distance) into ``output`` (see :func:`output_folder`); return their paths. A sweep over ``seed``
    also gets summary_seeds.csv, and summary.md a table of its groups first (:func:`seed_groups`): each metric's
    mean ± sample standard deviation and n; its figures draw each group's mean with a band or error bars.

    Raises:
        ReportError: ``sweep`` holds no job folders, or there is nowhere to write.
    """
    _events.cache_clear()  # the runs may have logged more since an earlier report in this process
    sweep = Path(sweep)
    jobs = sweep_jobs(sweep)
    out = output_folder(sweep, None if output is None else Path(output))
    swept, shared = varying_overrides(jobs)
    rows = [job_row(job, swept) for job in jobs]
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "error")) + ["error"]
    written = [write_atomically(out / "summary.csv", _csv_text(rows, columns))]
    lines = [f"Sweep `{sweep.name}`: {len(rows)} jobs"]
    broken = {status: sum(job.status == status for job in jobs) for status in ("damaged", "missing")}
    if any(broken.values()):
        lines[0] += " (" + ", ".join(f"{n} {status}" for status, n in broken.items() if n) + ")"
    if shared:
        lines[0] += ", all with " + " ".join(f"`{k}={v}`" for k, v in shared.items())
    groups = seed_groups(jobs, swept)
    if SEED in swept:
        by_name = {row["job"]: row for row in rows}
        metrics = [c for c in columns if c not in ("job", "status", "error", *swept)]
        grouped = [group_row(group, by_name, metrics) for group in groups]
        keys = [*groups[0].values, "n"]
        flat_columns = [*keys, *(f"{m} {what}" for m in metrics for what in ("mean", "std", "n")), "left out"]
        flat = [dict(zip(flat_columns, [*(row[k] for k in keys), *(v for m in metrics for v in (*_mean_std(row[m]),
                                                                                              len(row[m]))),
                                        row["left out"]], strict=True)) for row in grouped]
        written.append(write_atomically(out / "summary_seeds.csv", _csv_text(flat, flat_columns)))
        left_out = ["left out"] if any(row["left out"] for row in grouped) else []  # job (why), as summary.csv says
        lines += ["", "Over seeds: each metric's mean ± sample standard deviation over the n jobs of a group that "
                  "finished (status ok)" + ("; the jobs left out, and why, in the last column." if left_out else "."),
                  ""]
        lines += _md_table([[*(str(row[k]) for k in keys), *(_mean_cell(m, row[m], row["n"]) for m in metrics),
                             *(row[c] for c in left_out)] for row in grouped], [*keys, *metrics, *left_out])
        lines += ["", "Each job:"]
    lines += [""] + _md_table([[_cell(c, row.get(c)) for c in columns] for row in rows], columns)
    written.append(write_atomically(out / "summary.md", "\n".join(lines) + "\n"))
    for job in jobs:
        if not job.readable:
            log.warning("note: job %s is %s: %s", job.name, job.status, "; ".join(job.problems))
    counted = [job for group in groups for job in group.counted]
    written.append(_plot(groups, out / "curves.png"))
    if any(job.timed for job in counted):
        written.append(_plot_against_time(groups, out / "curves_time.png"))
    if any(job.flow for job in counted):
        written.append(_plot_gradient_flow(groups, out / "gradient_flow.png"))
    distance = next((k for k in swept if k.endswith("distance")), None)
    if distance and any(row.get("best val/answer_acc") is not None for row in rows):
        written.append(_plot_answer_accuracy(groups, distance, out / "answer_accuracy.png"))
    return written


def _label(group: Group, note: str = "") -> str:
    notes = [note] if note else []
    if len(group.counted) > 1:
        notes.append(f"mean of {len(group.counted)} ± std")
    label = ", ".join(f"{k}={v}" for k, v in group.values.items()) or \
        (group.jobs[0].name if len(group.jobs) == 1 else "runs")  # only the seed was swept
    return f"{label} ({'; '.join(notes)})" if notes else label


def _new_figure():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5), dpi=110)


def _save(figure, axes, path: Path) -> Path:
    import matplotlib.pyplot as plt

    if axes.lines:
        axes.legend(fontsize=8)
    figure.tight_layout()
    write_atomically(path, lambda fh: figure.savefig(fh, format="png"))
    plt.close(figure)
    return path


def _draw(axes, curves: list[list[tuple[float, float]]], label: str, log_scale: bool = False, **style) -> None:
    """One job's curve as logged, or a group's: the mean over the x range every curve covers, each interpolated
    linearly onto the x values of them all, with a band of ± one sample standard deviation. ``log_scale``: the
    values span orders of magnitude, so the mean and the band are taken of their logarithms (a geometric mean)."""
    import numpy as np

    curves = [sorted(c) for c in curves if c]
    if not curves:
        return
    if len(curves) == 1:
        [(x, y)] = [zip(*curves[0], strict=True)]
        axes.plot(x, y, label=label, **style)
        return
    low, high = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    x = np.unique([px for c in curves for px, _ in c if low <= px <= high])
    ys = np.array([np.interp(x, [px for px, _ in c], [py for _, py in c]) for c in curves])
    ys = np.log10(ys) if log_scale else ys
    mean, std = ys.mean(0), ys.std(0, ddof=1)
    back = (lambda v: 10 ** v) if log_scale else (lambda v: v)
    [line] = axes.plot(x, back(mean), label=label, **style)
    axes.fill_between(x, back(mean - std), back(mean + std), color=line.get_color(), alpha=0.2, linewidth=0)


def _plot(groups: list[Group], path: Path) -> Path:
    figure, axes = _new_figure()
    by_tokens = any("train/tokens_seen" in job.logged for group in groups for job in group.counted)
    for group in groups:
        curves = []
        for job in group.counted:
            seen = job.logged.get("train/tokens_seen", [])
            curves.append([(_tokens_at(step, seen) if seen else step, v) for step, v in job.logged.get("val/loss", [])])
        _draw(axes, curves, _label(group), marker="o", markersize=3)
    axes.set_xlabel("tokens seen" if by_tokens else "step")
    axes.set_ylabel("validation loss (nats per token)")
    axes.grid(alpha=0.3)
    return _save(figure, axes, path)


def _tokens_at(step: int, seen: list[tuple[int, float]]) -> float:
    """Tokens seen by ``step``, read off the logged ``train/tokens_seen`` (the last value at or before it)."""
    before = [value for s, value in seen if s <= step]
    return before[-1] if before else 0.0


def _plot_against_time(groups: list[Group], path: Path) -> Path:
    figure, axes = _new_figure()
    for group in groups:
        _draw(axes, [[(t / 60, v) for t, v in job.timed] for job in group.counted], _label(group), marker="o",
              markersize=3)
    axes.set_xlabel("training time (minutes, from the first logged value)")
    axes.set_ylabel("validation loss (nats per token)")
    axes.grid(alpha=0.3)
    return _save(figure, axes, path)


def _plot_gradient_flow(groups: list[Group], path: Path) -> Path:
    """Each job's (or group's) last measured ‖∂L/∂h_{T-k}‖ against k, relative to k = 0, on one log scale."""
    figure, axes = _new_figure()
    for group in groups:
        flows = [job.flow for job in group.counted if job.flow and job.flow[1][0]]
        steps = sorted({last for last, _ in flows})
        curves = [[(k, max(n / norms[0], 1e-30)) for k, n in enumerate(norms)] for _, norms in flows]
        _draw(axes, curves, _label(group, f"step {', '.join(map(str, steps))}"), log_scale=True)
    axes.set_yscale("log")
    axes.set_xlabel("k: steps back from the prediction")
    axes.set_ylabel("‖∂L/∂h(T−k)‖ / ‖∂L/∂h(T)‖")
    axes.grid(alpha=0.3, which="both")
    return _save(figure, axes, path)


def _plot_answer_accuracy(groups: list[Group], distance: str, path: Path) -> Path:
    """The best validation answer accuracy against the swept distance, one line per value of the other swept
    settings (e.g. per model); a group of seeds is its mean with an error bar of ± one sample standard deviation."""
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for group in groups:
        accuracies = [max(v for _, v in job.logged["val/answer_acc"]) for job in group.counted
                      if job.logged.get("val/answer_acc")]
        if accuracies and group.values.get(distance):
            label = ", ".join(f"{k}={v}" for k, v in group.values.items() if k != distance) or "runs"
            mean, std = _mean_std(accuracies)
            lines.setdefault(label, []).append((float(group.values[distance]), mean, std or 0.0))
    repeated = any(len(group.counted) > 1 for group in groups)
    figure, axes = _new_figure()
    for label, points in lines.items():
        x, mean, std = zip(*sorted(points), strict=True)
        if repeated:
            axes.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=label)
        else:
            axes.plot(x, mean, marker="o", label=label)
    keys = {job.keys for group in groups for job in group.counted}
    if len(keys) == 1 and (only := keys.pop()):  # one task: where guessing lands
        axes.axhline(1 / only, color="grey", linestyle="--", linewidth=1, label=f"chance (1/{only})")
    axes.set_xscale("log")
    distances = sorted({x for points in lines.values() for x, _, _ in points})
    axes.set_xticks(distances, [f"{d:g}" for d in distances])
    axes.minorticks_off()
    axes.set_xlabel(distance)
    axes.set_ylabel("best validation answer accuracy" + (" (mean ± std over seeds)" if repeated else ""))
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3, which="both")
    return _save(figure, axes, path)


def parse_arguments(argv: list[str]) -> tuple[Path, Path | None]:
    """``SWEEP_FOLDER [--output DIR]`` (also ``--output=DIR``, ``output=DIR``) -> (sweep, output or None).

    Raises:
        ReportError: a missing, empty, unknown or extra argument, or a sweep folder that is not one.
    """
    sweep: str | None = None
    output: str | None = None
    args = iter(argv)
    for arg in args:
        if arg == "--output":
            value = next(args, None)
            if value is None:
                raise ReportError(f"--output needs a folder: {USAGE}")
        elif arg.startswith(("--output=", "output=")):
            value = arg.partition("=")[2]
        elif arg.startswith("-") and arg != "-":
            raise ReportError(f"unknown option {arg}: {USAGE}")
        elif sweep is not None:
            raise ReportError(f"unexpected argument {arg!r} after the sweep folder {sweep}: {USAGE}")
        else:
            sweep = arg
            continue
        if output is not None:
            raise ReportError(f"--output is given twice ({output}, {value}): give it once")
        if not value.strip():
            raise ReportError(f"--output is empty: give a folder, {USAGE}")
        output = value
    if sweep is None:
        raise ReportError(f"give a sweep folder: {USAGE}")
    if not sweep.strip():
        raise ReportError(f"the sweep folder is an empty string: give a folder from outputs/train/multiruns/, {USAGE}")
    folder = Path(sweep)
    if not folder.exists():
        raise ReportError(f"{folder} does not exist: give a sweep folder from outputs/train/multiruns/")
    if not folder.is_dir():
        near = _sweep_near(folder)
        raise ReportError(f"{folder} is a file, not a folder: give the sweep folder that holds the job folders "
                          f"0/, 1/, ...{f', e.g. {near}' if near else ''}")
    try:
        next(folder.iterdir(), None)
    except OSError as err:
        raise ReportError(f"cannot read {folder} ({err.strerror}): give a sweep folder you can read") from None
    return folder, None if output is None else Path(output)


def usage() -> str:
    """What ``--help`` prints: the usage line, each argument on a line of its own, then this module's account of
    what the report writes."""
    width = max(len(name) for name, _ in ARGUMENTS)
    purpose, details = __doc__.split("\n\n", 1)
    return "\n".join([f"usage: {USAGE}", "", purpose.partition(": ``")[0] + ".", "",
                      *(f"  {name.ljust(width)}  {text}" for name, text in ARGUMENTS), "",
                      details.strip().replace("``", "")])


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``rnnlm-report SWEEP_FOLDER [--output DIR]``."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage())
        return
    logging.basicConfig(format="%(message)s", level=logging.WARNING, stream=sys.stderr)
    try:
        sweep, output = parse_arguments(argv)
        for written in write_report(sweep, output):
            print(written)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
