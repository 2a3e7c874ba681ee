"""Sweeps: every combination runs, a failing job is recorded and the others go on, Optuna searches,
and the report summarises what the runs logged."""

import csv
import os
import subprocess
import sys

import pytest
import yaml

from helpers import REPO
from rnnlm.commands.report import curves, swept_values, timed_curve, write_report
from rnnlm.errors import UserError

SMALL = ["model.embedding_dim=8", "model.num_layers=1", "data.seq_len=8", "data.batch_size=4",
         "data.eval_batch_size=2", "trainer.max_steps=3", "test=false", "trainer.accelerator=cpu",
         "~callbacks.progress_bar", "~callbacks.model_summary"]


def sweep(tmp_path, tiny_corpus, cache_dir, *args):
    run = subprocess.run(
        [sys.executable, str(REPO / "src" / "train.py"), *args, f"data.path={tiny_corpus}",
         f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMALL],
        cwd=tmp_path, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp_path / "sweep", run


def test_parallel_sweep_records_a_failing_job_and_reports(tmp_path, tiny_corpus, cache_dir):
    folder, run = sweep(tmp_path, tiny_corpus, cache_dir, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                        "model=rnn,gru", "model.hidden_size=16,0")
    assert "Job failed: ConfigError: model.hidden_size=0 must be a positive integer" in run.stdout + run.stderr
    summary_csv, summary_md, curves_png, time_png = write_report(folder)  # no diagnostics: no gradient_flow.png
    rows = list(csv.DictReader(summary_csv.open()))
    assert sorted((r["model"], r["model.hidden_size"], r["status"]) for r in rows) == [
        ("gru", "0", "failed"), ("gru", "16", "ok"), ("rnn", "0", "failed"), ("rnn", "16", "ok")]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(float(r["best val/loss"]) > 0 and int(r["params"]) > 0 for r in ok)
    assert all("must be a positive integer" in r["error"] for r in rows if r["status"] == "failed")
    assert "| rnn | ok |" in summary_md.read_text().replace("| 16 ", "").replace("| 0 ", "")
    for png in (curves_png, time_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    timed = timed_curve(folder / "0")  # the validation losses, at the seconds they were logged
    assert [v for _, v in timed] == [v for _, v in curves(folder / "0")["val/loss"]]
    assert all(0 <= a <= b for (a, _), (b, _) in zip(timed, timed[1:], strict=False))


def test_optuna_search_runs_its_trials(tmp_path, tiny_corpus, cache_dir):
    folder, _ = sweep(tmp_path, tiny_corpus, cache_dir, "hparams_search=optuna", "hydra.sweeper.n_trials=2")
    results = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    # searched: learning rate, dropout, size (the depth too, unless fixed on the command line, as here)
    assert set(results["best_params"]) == {"optimizer.lr", "model.dropout", "model.hidden_size"}
    assert results["best_value"] > 0
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["0", "1"]


@pytest.mark.slow
def test_submitit_local_launcher_runs_jobs(tmp_path, tiny_corpus, cache_dir):
    folder, _ = sweep(tmp_path, tiny_corpus, cache_dir, "-m", "hydra/launcher=submitit_local", "model=rnn,gru",
                      "hydra.launcher.timeout_min=10")
    assert all((folder / job / "run_summary.json").is_file() for job in ("0", "1"))


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="holds no job folders"):
        write_report(tmp_path)


def test_report_shows_overrides_as_typed(tmp_path):
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    # what Hydra writes for `trainer.max_time=00:00:35:00 model=gru hydra.run.dir=x`
    (job / ".hydra" / "overrides.yaml").write_text("- trainer.max_time=00\\:00\\:35\\:00\n- model=gru\n"
                                                   "- hydra.run.dir=x\n")
    assert swept_values(job) == {"trainer.max_time": "00:00:35:00", "model": "gru"}
