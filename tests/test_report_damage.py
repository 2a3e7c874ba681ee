"""rnnlm-report on a sweep that was damaged: a job whose files cannot be read, a job whose folder is gone and a
sweep folder that cannot be written in each get their row or their place, and the rest of the report is as
usual. The sweeps here are job folders written on the spot, as train leaves them: no training."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from rnnlm.commands import report
from rnnlm.commands.report import main, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def fake_job(sweep, number, overrides, val=(2.0, 1.5)):
    """A finished job's folder: Hydra's config and overrides, run_summary.json and csv/metrics.csv."""
    job = sweep / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": {"level": "char"}}))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"hydra.sweep.dir={sweep}"]))
    (job / "run_summary.json").write_text(json.dumps({"status": "ok", "params": 1234, "metrics": {"test/loss": 1.4},
                                                      "tokens_per_s": 5000.0, "wall_s": 3.0}))
    (job / "csv").mkdir()
    (job / "csv" / "metrics.csv").write_text("epoch,step,train/tokens_seen,val/loss\n"
                                             + "".join(f"0,{10 * i},{640 * i},{v}\n" for i, v in enumerate(val, 1)))
    return job


def fake_sweep(tmp_path, models=("rnn", "lstm", "gru"), sizes=("16", "32")):
    """``-m model=... model.hidden_size=...``: every job's folder, and Hydra's multirun.yaml listing them."""
    sweep = tmp_path / "2026-01-01_12-00-00"
    task = [f"model={','.join(models)}", f"model.hidden_size={','.join(sizes)}", "trainer.max_steps=3"]
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}"},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "max_batch_size": None,
                    "params": None},
        "overrides": {"hydra": [f"hydra.sweep.dir={sweep}", "hydra.mode=MULTIRUN"], "task": task}}}))
    jobs = [(m, s) for m in models for s in sizes]
    for number, (model, size) in enumerate(jobs):
        fake_job(sweep, number, [f"model={model}", f"model.hidden_size={size}", "trainer.max_steps=3"])
    return sweep


def rows_of(path):
    return {row["job"]: row for row in csv.DictReader(path.open(newline=""))}


def test_damaged_and_missing_jobs_are_rows_of_their_own(tmp_path):
    sweep = fake_sweep(tmp_path)
    summary = (sweep / "1" / "run_summary.json").read_text()
    (sweep / "1" / "run_summary.json").write_text(summary[:25])  # truncated
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text("- model=lstm\n- [model.hidden_size=16\n")
    shutil.rmtree(sweep / "3")  # deleted mid-sweep
    shutil.rmtree(sweep / "5")  # the last one too: only multirun.yaml tells
    (sweep / "4" / "csv" / "metrics.csv").write_text("epoch,step,val/loss\n0,10,2.0\n0,20,abc\n")

    written = write_report(sweep)

    assert [p.name for p in written] == ["summary.csv", "summary.md", "curves.png"]
    assert written[2].read_bytes()[:8] == PNG
    rows = rows_of(sweep / "summary.csv")
    assert [(j, r["model"], r["model.hidden_size"], r["status"]) for j, r in rows.items()] == [
        ("0", "rnn", "16", "ok"), ("1", "rnn", "32", "damaged"), ("2", "lstm", "16", "damaged"),
        ("3", "lstm", "32", "missing"), ("4", "gru", "16", "damaged"), ("5", "gru", "32", "missing")]
    assert rows["0"]["params"] == "1234" and float(rows["0"]["best val/loss"]) == 1.5 and rows["0"]["error"] == ""
    assert rows["1"]["error"].startswith("run_summary.json is not valid JSON (") and "truncated?" in rows["1"]["error"]
    assert rows["2"]["error"] == ".hydra/overrides.yaml is not valid YAML at line 3 (truncated?)"
    assert rows["3"]["error"] == "listed in multirun.yaml, but its folder 3/ is gone (deleted, or not started)"
    assert rows["4"]["error"] == "csv/metrics.csv line 3: val/loss='abc' is not a number"
    assert list(rows["0"])[-1] == "error"
    md = (sweep / "summary.md").read_text()
    assert md.startswith("Sweep `2026-01-01_12-00-00`: 6 jobs (3 damaged, 2 missing), all with `trainer.max_steps=3`")
    assert "| 3 | lstm | 32 | missing |" in md


def test_a_gap_in_the_numbered_folders_is_a_missing_job(tmp_path):
    sweep = tmp_path / "sweep"
    for number, model in ((0, "rnn"), (2, "gru")):
        fake_job(sweep, number, [f"model={model}"])
    written = write_report(sweep)  # no multirun.yaml
    rows = rows_of(written[0])
    assert [(j, r["model"], r["status"]) for j, r in rows.items()] == [("0", "rnn", "ok"), ("1", "", "missing"),
                                                                        ("2", "gru", "ok")]
    assert rows["1"]["error"] == "its folder 1/ is gone (deleted?): later jobs have theirs"


def test_a_job_folder_without_its_hydra_files_is_damaged(tmp_path):
    sweep = fake_sweep(tmp_path, models=("rnn",))
    shutil.rmtree(sweep / "1" / ".hydra")
    rows = rows_of(write_report(sweep)[0])
    assert (rows["1"]["status"], rows["1"]["model.hidden_size"]) == ("damaged", "32")  # the value from multirun.yaml
    assert rows["1"]["error"] == ".hydra/ is missing (Hydra writes it as the job starts)"


def test_the_report_goes_where_asked(tmp_path, capsys):
    sweep = fake_sweep(tmp_path, models=("rnn",))
    main([str(sweep), "--output", str(tmp_path / "out")])
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "out" / name) for name in ("summary.csv", "summary.md", "curves.png")]
    assert not (sweep / "summary.csv").exists()
    main([str(sweep), f"output={tmp_path / 'out2'}"])
    assert (tmp_path / "out2" / "summary.md").is_file()


def test_a_read_only_sweep_folder_gets_its_report_beside(tmp_path, monkeypatch, caplog):
    """Emulated: the probe reports the sweep folder read-only (root writes through permission bits)."""
    sweep = fake_sweep(tmp_path, models=("rnn",))
    writable = report._writable
    monkeypatch.setattr(report, "_writable", lambda folder: "Read-only file system" if folder == sweep
                        else writable(folder))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    written = write_report(sweep)
    assert [p.parent for p in written] == [report.Path("report-2026-01-01_12-00-00")] * 3
    assert all((work / p).is_file() for p in written)
    assert f"cannot write in {sweep} (Read-only file system): the report goes to report-2026-01-01_12-00-00/" \
        in caplog.text
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]  # nothing written there


def _read_only(folder):
    """A command prefix under which ``folder`` is read-only: a private read-only bind mount for root (who writes
    through permission bits), chmod for anyone else; None if neither can be had."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    probe = subprocess.run(["unshare", "-m", "sh", "-c", script, str(folder), "touch", str(folder / "x")],
                           capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        return None
    return ["unshare", "-m", "sh", "-c", script, str(folder)]


def test_the_command_on_a_read_only_sweep_folder(tmp_path):
    sweep = fake_sweep(tmp_path, models=("rnn",))
    prefix = _read_only(sweep)
    if prefix is None:
        pytest.skip("cannot make a read-only folder here (needs a non-root user, or root with mount namespaces)")
    try:
        done = subprocess.run([*prefix, sys.executable, "-m", "rnnlm.commands.report", str(sweep)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    finally:
        sweep.chmod(0o755)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "report-2026-01-01_12-00-00"
    names = ("summary.csv", "summary.md", "curves.png")
    assert done.stdout.split() == [str(out.relative_to(tmp_path) / name) for name in names]
    assert "the report goes to report-2026-01-01_12-00-00/" in done.stderr
    assert (out / "curves.png").read_bytes()[:8] == PNG
    assert not (sweep / "summary.csv").exists()


@pytest.mark.parametrize("case, message", [
    ("no argument", "give a sweep folder: rnnlm-report SWEEP_FOLDER [--output DIR]"),
    ("empty", "the sweep folder is an empty string"),
    ("file", "is a file, not a folder: give the sweep folder that holds the job folders 0/, 1/, ..."),
    ("nonexistent", "does not exist: give a sweep folder from outputs/train/multiruns/"),
    ("extra", "unexpected argument 'extra' after the sweep folder"),
    ("unknown option", "unknown option --bogus"),
    ("no output folder", "--output needs a folder"),
    ("empty output", "--output is empty"),
    ("output twice", "--output is given twice"),
    ("no job folders", "holds no job folders (each has .hydra/config.yaml): give a sweep folder, e.g. "),
    ("output is a file", "is a file, not a folder: give --output a folder you can write to"),
    ("output not creatable", "cannot create the report folder /proc/rnnlm-report ("),
])
def test_every_mistake_is_one_line_and_exit_status_2(tmp_path, capsys, case, message):
    sweep = fake_sweep(tmp_path, models=("rnn",))
    (tmp_path / "notes.txt").write_text("not a sweep")
    argv = {"no argument": [], "empty": [""], "file": [str(sweep / "0" / "run_summary.json")],
            "nonexistent": [str(tmp_path / "nope")], "extra": [str(sweep), "extra"],
            "unknown option": [str(sweep), "--bogus"], "no output folder": [str(sweep), "--output"],
            "empty output": [str(sweep), "--output="], "output twice": [str(sweep), "--output", "a", "output=b"],
            "no job folders": [str(tmp_path)],  # the folder above the sweep
            "output is a file": [str(sweep), "--output", str(tmp_path / "notes.txt")],
            "output not creatable": [str(sweep), "--output", "/proc/rnnlm-report"]}[case]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err
    if case in ("no job folders", "file"):
        assert captured.err.endswith(f", e.g. {sweep}\n")  # the sweep it meant
    assert not (sweep / "summary.csv").exists()


def test_help_is_not_an_error(capsys):
    main(["--help"])
    assert capsys.readouterr().out.startswith("usage: rnnlm-report SWEEP_FOLDER [--output DIR]\n")
