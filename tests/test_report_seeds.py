"""rnnlm-report over seeds: jobs that differ only in ``seed`` are one group, shown as the mean ± sample standard
deviation and n of each metric, drawn as a mean with a band or error bars; the sweeps are job folders written on
the spot, as train leaves them: no training."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
import yaml

from rnnlm.commands import report
from rnnlm.commands.report import write_report


def fake_job(sweep, number, overrides, val, test_loss=1.4, answers=None, flow=None):
    """A finished job's folder: its overrides, run_summary.json and csv/metrics.csv with ``val`` (val/loss at steps
    10, 20, ...), ``answers`` (val/answer_acc at the same steps) and ``flow`` (gradient_flow.csv norms by k)."""
    job = sweep / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": {"level": "char", "recall": {"keys": 8}}}))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"hydra.sweep.dir={sweep}"]))
    (job / "run_summary.json").write_text(json.dumps({"status": "ok", "params": 1234, "wall_s": 3.0,
                                                      "metrics": {"test/loss": test_loss}}))
    (job / "csv").mkdir()
    answers = answers or [None] * len(val)
    rows = "".join(f"0,{10 * i},{640 * i},{v},{'' if a is None else a}\n"
                   for i, (v, a) in enumerate(zip(val, answers, strict=True), 1))
    (job / "csv" / "metrics.csv").write_text("epoch,step,train/tokens_seen,val/loss,val/answer_acc\n" + rows)
    if flow:
        (job / "gradient_flow.csv").write_text("step,k,grad_norm\n" + "".join(f"20,{k},{n}\n"
                                                                             for k, n in enumerate(flow)))
    return job


@pytest.fixture
def drawn(monkeypatch):
    """The axes of every figure the report saves, by file name."""
    figures = {}
    save = report._save

    def keep(figure, axes, path):
        figures[path.name] = axes
        return save(figure, axes, path)

    monkeypatch.setattr(report, "_save", keep)
    return figures


# best val/loss of each job: (model, seed) -> its validation losses at steps 10, 20
LOSSES = {("rnn", 1): (2.0, 1.5), ("rnn", 2): (2.2, 1.7), ("rnn", 3): (1.9, 1.6),
          ("gru", 1): (1.5, 1.0), ("gru", 2): (1.4, 1.2), ("gru", 3): (1.6, 1.1)}


def seed_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    for number, ((model, seed), val) in enumerate(LOSSES.items()):
        fake_job(sweep, number, [f"model={model}", f"seed={seed}"], val, test_loss=val[1] + 0.1 * seed)
    return sweep


def group_rows(sweep):
    return {row["model"]: row for row in csv.DictReader((sweep / "summary_seeds.csv").open(newline=""))}


def test_jobs_that_differ_only_in_the_seed_are_one_row_with_mean_std_and_n(tmp_path, drawn):
    sweep = seed_sweep(tmp_path)
    written = write_report(sweep)
    assert [p.name for p in written] == ["summary.csv", "summary_seeds.csv", "summary.md", "curves.png"]
    rows = group_rows(sweep)
    assert list(rows) == ["rnn", "gru"]
    best = {"rnn": [1.5, 1.7, 1.6], "gru": [1.0, 1.2, 1.1]}
    for model, values in best.items():
        assert rows[model]["n"] == "3" and rows[model]["left out"] == ""
        assert float(rows[model]["best val/loss mean"]) == pytest.approx(statistics.fmean(values))
        assert float(rows[model]["best val/loss std"]) == pytest.approx(0.1)  # sample std: n - 1 below
        assert rows[model]["best val/loss n"] == "3"
        tests = [v + 0.1 * seed for seed, v in enumerate(values, 1)]
        assert float(rows[model]["test/loss mean"]) == pytest.approx(statistics.fmean(tests))
        assert float(rows[model]["test/loss std"]) == pytest.approx(statistics.stdev(tests))
    md = (sweep / "summary.md").read_text()
    assert "| model | n | params | best val/loss |" in md
    assert "| rnn | 3 | 1,234 | 1.6000 ± 0.1000 |" in md  # one count for all: shown once
    assert "Each job:" in md and "| 5 | gru | 3 | ok |" in md  # the jobs' own rows are kept
    assert len(list(csv.DictReader((sweep / "summary.csv").open()))) == 6
    # the learning curves: each group's mean, with a band of ± one std
    axes = drawn["curves.png"]
    assert [line.get_label() for line in axes.lines] == ["model=rnn (mean of 3 ± std)", "model=gru (mean of 3 ± std)"]
    assert list(axes.lines[0].get_ydata()) == pytest.approx([2.0333333, 1.6])
    assert len(axes.collections) == 2  # the bands
    band = axes.collections[0].get_paths()[0].vertices[:, 1]
    assert min(band) == pytest.approx(1.6 - 0.1) and max(band) == pytest.approx(2.0333333 + statistics.stdev([2.0, 2.2,
                                                                                                              1.9]))


def test_a_damaged_or_missing_seed_is_left_out_of_the_mean_and_n_says_so(tmp_path):
    sweep = seed_sweep(tmp_path)
    (sweep / "1" / "run_summary.json").write_text('{"status": "o')  # truncated: rnn, seed 2
    fake_job(sweep, 7, ["model=gru", "seed=4"], (1.2, 0.9))  # a gap: job 7 ran, 6 left no folder
    write_report(sweep)
    rows = group_rows(sweep)
    assert (rows["rnn"]["n"], rows["rnn"]["left out"]) == ("2", "1 (damaged)")
    assert float(rows["rnn"]["best val/loss mean"]) == pytest.approx(1.55)
    assert float(rows["rnn"]["best val/loss std"]) == pytest.approx(statistics.stdev([1.5, 1.6]))
    assert rows["gru"]["n"] == "4" and float(rows["gru"]["best val/loss mean"]) == pytest.approx(1.05)
    # the missing job's overrides are unknown: a group of its own, with nothing to count
    missing = [row for row in csv.DictReader((sweep / "summary_seeds.csv").open()) if row["model"] == ""]
    assert [(r["n"], r["left out"]) for r in missing] == [("0", "6 (missing)")]


def test_a_seed_left_at_its_default_joins_the_swept_ones(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, ["model=rnn"], (2.0, 1.5))  # the config's seed
    fake_job(sweep, 1, ["model=rnn", "seed=2"], (2.0, 1.7))
    write_report(sweep)
    [row] = csv.DictReader((sweep / "summary_seeds.csv").open(newline=""))
    assert row["n"] == "2" and float(row["best val/loss mean"]) == pytest.approx(1.6)


def test_without_a_swept_seed_each_job_is_drawn_as_before(tmp_path, drawn):
    sweep = tmp_path / "sweep"
    for number, model in enumerate(("rnn", "gru")):
        fake_job(sweep, number, [f"model={model}", "seed=7"], (2.0, 1.5 + number))
    written = write_report(sweep)
    assert [p.name for p in written] == ["summary.csv", "summary.md", "curves.png"]
    assert "±" not in (sweep / "summary.md").read_text()
    axes = drawn["curves.png"]
    assert [line.get_label() for line in axes.lines] == ["model=rnn", "model=gru"] and not axes.collections


def test_accuracy_against_distance_has_error_bars_over_seeds(tmp_path, drawn):
    sweep = tmp_path / "sweep"
    accuracy = {(5, 1): 1.0, (5, 2): 0.9, (5, 3): 0.8, (50, 1): 0.2, (50, 2): 0.1, (50, 3): 0.15}
    for number, ((distance, seed), acc) in enumerate(accuracy.items()):
        fake_job(sweep, number, ["model=rnn", f"data.recall.distance={distance}", f"seed={seed}"], (2.0, 1.5),
                 answers=(acc / 2, acc))
    written = write_report(sweep)
    assert written[-1].name == "answer_accuracy.png" and written[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [(line, _, (bars,))] = drawn["answer_accuracy.png"].containers  # the means, the caps, the bars
    assert list(line.get_xdata()) == [5.0, 50.0] and list(line.get_ydata()) == pytest.approx([0.9, 0.15])
    spans = [tuple(segment[:, 1]) for segment in bars.get_segments()]  # one bar per distance: mean ± std
    assert spans == [pytest.approx((0.8, 1.0)), pytest.approx((0.1, 0.2))]
    chance = drawn["answer_accuracy.png"].lines[-1]
    assert chance.get_label() == "chance (1/8)" and list(chance.get_ydata()) == [0.125, 0.125]


def test_gradient_flow_over_seeds_is_a_geometric_mean_with_a_band(tmp_path, drawn):
    sweep = tmp_path / "sweep"
    flows = {1: [1.0, 0.1, 0.01], 2: [2.0, 0.02, 0.0002], 3: [1.0, 0.01, 0.0001]}
    for number, (seed, flow) in enumerate(flows.items()):
        fake_job(sweep, number, ["model=rnn", f"seed={seed}"], (2.0, 1.5), flow=flow)
    assert write_report(sweep)[-1].name == "gradient_flow.png"
    axes = drawn["gradient_flow.png"]
    [line] = axes.lines
    logs = [[math.log10(n / flow[0]) for n in flow] for flow in flows.values()]  # relative to k = 0
    expected = [10 ** statistics.fmean(column) for column in zip(*logs, strict=True)]
    assert list(line.get_ydata()) == pytest.approx(expected)
    assert line.get_label() == "runs (step 20; mean of 3 ± std)" and len(axes.collections) == 1
