"""What a user's terminal shows: the model's size, the devices, which checkpoint a run resumes and tests, and not
Lightning's lines that say nothing to a user of rnnlm; those are dropped by name, so a user's own warnings and
Lightning's other lines still show."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from helpers import REPO, TINY, write_tiny_corpus
from rnnlm.commands.cli import QUIET_LOG_LINES

NOISE = ("GPU available", "TPU available", "Trainer already configured with model summary", "FLOPs",
         "Modules in train mode", "Restoring states from the checkpoint", "Restored all states",
         "Loaded model weights from the checkpoint", "_pytree", "💡 Tip")
USER_CALLBACK = '''
import warnings

import lightning as L


class WarnOnFit(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        warnings.warn("userwarn: a warning of the user's own")
'''


def _run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(cwd), "COLUMNS": "120"}
    result = subprocess.run([sys.executable, str(REPO / "src" / script), *args], capture_output=True, text=True,
                            timeout=600, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    for noise in NOISE:
        assert noise not in printed, f"{noise!r} in the output of {script}:\n{printed[-3000:]}"
    return printed


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with a callback of the user's that warns, then a run resumed from it: what each printed."""
    root = tmp_path_factory.mktemp("terminal")
    (root / "userwarn.py").write_text(USER_CALLBACK, encoding="utf-8")
    corpus = write_tiny_corpus(root)
    common = [*TINY, f"data.path={corpus}", f"paths.cache_dir={root / 'cache'}"]
    first = _run("train.py", *common, f"hydra.run.dir={root / 'run'}", "+callbacks.user._target_=userwarn.WarnOnFit",
                 cwd=root)
    resumed = _run("train.py", f"ckpt_path={root / 'run' / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=8",
                   f"paths.cache_dir={root / 'cache'}", f"hydra.run.dir={root / 'run2'}", cwd=root)
    return root, first, resumed


def test_a_run_says_what_helps(trained):
    root, first, _ = trained
    assert "Model: " in first and " parameters (" in first and " MB)" in first
    assert "Training on 1 cpu device, precision 32-true" in first
    assert f"Testing the best checkpoint, {root / 'run' / 'checkpoints' / 'best.ckpt'} (step " in first
    assert ", val/loss " in first.split("Testing the best checkpoint")[1].splitlines()[0]


def test_a_users_own_warning_still_shows(trained):
    _, first, _ = trained
    assert "UserWarning: userwarn: a warning of the user's own" in first


def test_a_resumed_run_says_which_checkpoint_once(trained):
    root, _, resumed = trained
    last = root / "run" / "checkpoints" / "last.ckpt"
    assert resumed.count(str(last)) == 1 and f"Resuming {last} (step 4, saved " in resumed
    assert f"Testing the best checkpoint, {root / 'run2' / 'checkpoints' / 'best.ckpt'}" in resumed


def test_inference_commands_print_no_noise(trained):
    root, _, _ = trained
    checkpoint = root / "run2" / "checkpoints" / "last.ckpt"
    evaluated = _run("eval.py", f"ckpt_path={checkpoint}", f"paths.log_dir={root / 'eval'}",
                     f"paths.cache_dir={root / 'cache'}", cwd=root)
    assert "tokens | loss " in evaluated
    _run("generate.py", f"ckpt_path={checkpoint}", "prompt=the", "max_new_tokens=5", cwd=root)
    _run("score.py", f"ckpt_path={checkpoint}", "text=the quick brown fox", cwd=root)


def test_lightning_lines_are_dropped_by_logger_and_message(caplog):
    caplog.set_level(logging.INFO)
    for name in QUIET_LOG_LINES:
        logger = logging.getLogger(name)
        logger.info("GPU available: False (cuda), used: False")
        logger.info("Restoring states from the checkpoint path at /x/last.ckpt")
        logger.info("`Trainer.fit` stopped: `max_steps=30` reached.")  # Lightning's other lines still show
    logging.getLogger("mine").info("GPU available: says a logger of the user's")
    assert [r.getMessage() for r in caplog.records] == ["`Trainer.fit` stopped: `max_steps=30` reached."] * len(
        QUIET_LOG_LINES) + ["GPU available: says a logger of the user's"]


def test_a_users_warning_passes_rnnlms_filters():
    import rnnlm.commands.cli  # noqa: F401 - installs them

    with warnings.catch_warnings(record=True) as caught:  # the filters as they are, rnnlm's included
        warnings.warn("a warning of the user's own", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning of the user's own"]
