"""Each command's --help lists its own settings, one line each, and docs/configuration.md describes every group,
choice and setting, both made from the configs' own comments (rnnlm.reference); the page is kept current."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from rnnlm import reference
from rnnlm.reference import (
    CHECKOUT_SCRIPTS,
    COMMANDS,
    HIDDEN,
    UPDATE,
    choices,
    command_help,
    composed,
    config_file,
    describe,
    first_sentence,
    groups,
    leaves,
    read_config_file,
)

# pyproject.toml's [project.scripts] (tomllib is Python 3.11+, and rnnlm runs on 3.10)
SCRIPTS = re.findall(r"^(rnnlm-\w+) = ", (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1]
                     .split("\n[")[0], re.M)
TRAINING_ONLY = ("experiment", "trainer", "_recurrent", "optimizer", "scheduler", "callbacks", "model=", "model.")


def _help(command: str, *args: str) -> subprocess.CompletedProcess:
    script = REPO / "src" / f"{CHECKOUT_SCRIPTS.get(command, command)}.py"
    return subprocess.run([sys.executable, str(script), *args, "--help"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def _own_keys(command: str) -> list[str]:
    cfg, _ = composed(command)
    return [key for key, _ in leaves(cfg) if key.rpartition(".")[2] not in HIDDEN]


def test_the_configuration_page_is_current():
    page = REPO / "docs" / "configuration.md"
    written = page.read_text(encoding="utf-8") if page.is_file() else ""
    assert written == reference.reference(), f"docs/configuration.md is out of date with conf/: run `{UPDATE}`"


def test_every_command_of_the_package_has_a_help_and_a_section():
    assert set(SCRIPTS) == {f"rnnlm-{c}" for c in (*COMMANDS, "report")}, "a new command: add it to rnnlm.reference"
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    for script in SCRIPTS:
        assert f"## {script}\n" in page


@pytest.mark.parametrize("command", COMMANDS)
def test_each_help_lists_its_own_settings_one_line_each(command):
    result = _help(command)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith(f"usage: rnnlm-{command} ")
    lines = out.splitlines()
    for key in _own_keys(command):
        described = [line for line in lines if line.startswith(f"  {key}=")]
        assert len(described) == 1, key  # one line, with its value
        if not key.startswith("paths."):
            assert len(described[0].split(None, 1)) == 2, f"{key} has no description in --help"
    if command != "train":  # the training groups, which these commands refuse
        for word in TRAINING_ONLY:
            assert word not in out, word
        assert "groups" not in out
    else:
        for group in groups("train"):
            assert re.search(rf"^  {group}=\S+ +\[{', '.join(choices(group))}\] ", out, re.M), group
        assert "mingru, minlstm" in out and "ntasgd" in out and "multistep" in out and "_recurrent" not in out
    assert "== Config ==" not in out and "Powered by Hydra" not in out  # not Hydra's own help


def test_help_shows_the_settings_of_the_choices_on_the_command_line():
    result = _help("train", "model=gru", "optimizer=sgd", "scheduler=none", "trainer.max_steps=30")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^  model=gru ", result.stdout, re.M)
    assert re.search(r"^  scheduler=null +how the learning rate changes", result.stdout, re.M)
    assert re.search(r"^  model\.reset_after=true +false: the original reset-before GRU", result.stdout, re.M)
    assert re.search(r"^  optimizer\.momentum=0\.0 +momentum factor", result.stdout, re.M)
    assert re.search(r"^  trainer\.max_steps=30 ", result.stdout, re.M)


def test_help_with_a_mistake_is_one_error_line():
    result = _help("train", "model=foo")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "error: model=foo is not a choice: use one of gru, lstm, mingru, minlstm, rnn"


def test_report_help_lists_its_arguments():
    from rnnlm.commands.report import ARGUMENTS

    result = subprocess.run([sys.executable, str(REPO / "src" / "report.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: rnnlm-report SWEEP_FOLDER [--output DIR]\n")
    for name, text in ARGUMENTS:
        assert f"  {name}" in result.stdout and text in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_setting_has_a_description(command):
    cfg, chosen = composed(command)
    missing = [key for key in _own_keys(command) if not describe(key, command, chosen)]
    assert not missing, f"add a comment above each of these in conf/: {missing}"


@pytest.mark.parametrize("group", groups("train"))
def test_every_group_choice_and_its_settings_are_described(group):
    assert config_file(None, "train").group_comments.get(group), f"a comment above `- {group}:` in conf/train.yaml"
    for choice in choices(group):
        assert config_file(group, choice).prose, f"conf/{group}/{choice}.yaml opens with no comment"
        cfg, _ = composed("train", [f"{group}={choice}"])
        section = cfg.get(group)
        keys = [key for key, _ in leaves(section, f"{group}.")] if isinstance(section, dict) else []
        missing = [k for k in keys if k.rpartition(".")[2] not in HIDDEN and not describe(k, "train", {group: choice})]
        assert not missing, f"conf/{group}/{choice}.yaml (or what it builds on): add a comment above {missing}"


def test_the_page_has_every_choice_and_setting():
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    for group in groups("train"):
        for choice in choices(group):
            assert f"`{group}={choice}`" in page
    for name in ("model=mingru", "model=minlstm", "optimizer=ntasgd", "scheduler=multistep", "hydra/launcher=slurm"):
        assert f"`{name}`" in page
    for key in ("model.reset_after", "model.nonlinearity", "optimizer.nonmono", "scheduler.milestones",
                "trainer.chunks_per_call", "callbacks.gradient_flow.rows", "data.recall.keys", "logger.csv.save_dir"):
        assert f"| `{key}` |" in page
    assert "`model=_recurrent`" not in page


def test_comments_are_read_from_the_yaml(tmp_path):
    path = tmp_path / "choice.yaml"
    path.write_text(
        "# @package _global_\n"
        "# What the file does. More about it.\n"
        "# python src/train.py group=choice\n"
        "defaults:\n"
        "  - base\n"
        "  # the models\n"
        "  - model: lstm\n"
        "  - override /data: word\n"
        "\n"
        "# one key\n"
        "top: 1\n"
        "section:\n"
        "  # --- a heading, not a key's comment\n"
        "  # a nested key,\n"
        "  # on two lines\n"
        "  inner: [1, 2]\n"
        "  bare: x\n"
        "  list:\n"
        "    # not a key\n"
        "    - 3\n"
        "after: 2\n",
        encoding="utf-8",
    )
    doc = read_config_file(path)
    assert doc.global_package and doc.bases == ["base"] and doc.groups == ["model"]
    assert doc.summary == "What the file does." and doc.prose == "What the file does. More about it."
    assert doc.group_comments == {"model": "the models"}
    assert doc.comments == {"top": "one key", "section.inner": "a nested key, on two lines"}


def test_first_sentences():
    assert first_sentence("what a sweep (e.g. Optuna) optimizes. More") == "what a sweep (e.g. Optuna) optimizes."
    assert first_sentence("Zaremba et al. 2014, small. The paper") == "Zaremba et al. 2014, small."
    assert first_sentence("no full stop: 0.25 or 1.0") == "no full stop: 0.25 or 1.0"


def test_the_help_needs_no_run_folder(tmp_path):
    text = command_help("eval", [f"paths.log_dir={tmp_path / 'x'}"])
    assert f"paths.log_dir={tmp_path / 'x'}" in text and not (tmp_path / "x").exists()
    assert not Path(tmp_path / "outputs").exists()
