"""Every key of every command, fed bad values: the command either works or refuses in one line that names the
key, before it writes anything. The cases are generated from the composed configs, so a new key is covered
without a new test, and from the schema (``rnnlm.schema``), so a key without a declared type fails here."""

from __future__ import annotations

import contextlib
import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from helpers import REPO, SHARED_DATA, TINY
from rnnlm.checks import check_config
from rnnlm.commands.cli import CONF_DIR, _set_output_dir, check_command_line
from rnnlm.errors import ConfigError, UserError
from rnnlm.schema import (
    PASSED_IN_CODE,
    _arguments,
    _built_sections,
    _leaves,
    _pattern,
    argument_type,
    declared,
    problems_of,
    settings_table,
)

COMMANDS = ("train", "eval", "generate", "score", "export", "inspect")
# Typed on a command line, each of these reaches the config as Hydra parses it: a word, a negative number, zero,
# a huge number, NaN, infinity, an empty text, a list for a scalar, null, a boolean, a dict.
BAD_VALUES = ("abc", "-1", "0", "1e30", "123456789012", "nan", "-inf", "''", "[1,2]", "null", "true", "{a: 1}")
# Group choices whose keys differ: each one's keys are fuzzed too.
VARIANTS = {"train": ([], ["optimizer=sgd", "scheduler=multistep", "data=recall", "callbacks=diagnostics",
                           "logger=many", "trainer=ddp"], ["optimizer=ntasgd", "scheduler=step"]),
            "eval": ([],), "generate": ([],), "score": (["text=the cat sat"],), "export": ([],),
            "inspect": (["text=the cat sat"],)}
_PARSER = OverridesParser.create()


def _compose(command: str, overrides: list[str], tmp: Path) -> DictConfig:
    """The config as the command's job sees it (Hydra's runtime set, its own section left out)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(command, overrides=[f"paths.log_dir={tmp}/outputs", *overrides], return_hydra_config=True)
    _set_output_dir(cfg, multirun=False)
    with open_dict(cfg):
        cfg.pop("hydra")
    return cfg


def _parsed(value: str):
    return _PARSER.parse_override(f"k={value}").value()


def _keys(cfg: DictConfig, command: str) -> list[str]:
    return [k for k, _ in _leaves(OmegaConf.to_container(cfg), settings_table(command))]


def _problems(cfg: DictConfig, command: str, typed: str) -> list[str]:
    try:
        check_config(cfg, command, [typed])
    except UserError as err:
        return [str(err)]
    return []


def _cases(cfg: DictConfig, command: str) -> list[tuple[str, str, object]]:
    """(key, what was done, value) for every key: each bad value, deleted (~key), and a sibling added (+key)."""
    cases = []
    for key in _keys(cfg, command):
        cases += [(key, f"{key}={v}", _parsed(v)) for v in BAD_VALUES]
        cases += [(key, f"~{key}", None), (key + "x", f"+{key}x=1", 1)]
    return cases


@contextlib.contextmanager
def _applied(cfg: DictConfig, case: tuple[str, str, object]):
    """``cfg`` with the case applied, put back as it was afterwards (cheaper than a copy per case)."""
    key, typed, value = case
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    with open_dict(cfg):
        old = node._get_node(name)
        old = copy.deepcopy(old) if old is not None else None
        if typed.startswith("~"):
            node.pop(name)
        else:
            OmegaConf.update(cfg, key, value, force_add=True, merge=False)
        try:
            yield cfg
        finally:
            if old is None:
                node.pop(name)
            else:
                node[name] = old


def _dry_build(cfg: DictConfig) -> None:
    """Build what a training job builds from its config, without data or training: the network (on the meta
    device), the optimizer and scheduler, the trainer, the callbacks and the loggers."""
    from rnnlm.commands.train import lightning_trainer
    from rnnlm.network import LanguageModel, NetworkConfig

    with torch.device("meta"):
        LanguageModel(NetworkConfig.from_settings(cfg.model, vocab_size=300))
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    if cfg.get("scheduler"):
        instantiate(cfg.scheduler)(optimizer)
    for callback in cfg.callbacks.values():
        instantiate(callback)
    for logger in cfg.logger.values():
        instantiate(logger)
    instantiate(lightning_trainer(cfg.trainer), logger=False, enable_checkpointing=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_key_has_a_declared_type(command, tmp_path):
    for variant in VARIANTS[command]:
        cfg = _compose(command, variant, tmp_path)
        undeclared = [k for k in _keys(cfg, command) if _pattern(k, settings_table(command)) is None]
        assert not undeclared, f"declare these keys in rnnlm.schema: {undeclared}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_bad_value_of_every_key_works_or_is_refused_naming_the_key(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checked, wrong, seen = 0, [], set()
    for variant in VARIANTS[command]:
        base = _compose(command, variant, tmp_path)
        assert _problems(base, command, "") == []
        for case in _cases(base, command):
            key, typed, _ = case
            if typed in seen:
                continue  # fuzzed with the first choices already
            seen.add(typed)
            with _applied(base, case) as cfg:
                problems = _problems(cfg, command, typed)
                checked += 1
                if problems:
                    if any("\n" in p for p in problems) or not any(key in p for p in problems):
                        wrong.append(f"{typed}: the refusal does not name {key} in one line: {problems}")
                elif command == "train":
                    try:
                        _dry_build(cfg)
                    except Exception as err:  # noqa: BLE001 - any failure here is a value the check let through
                        wrong.append(f"{typed} passed the check but cannot be built: {type(err).__name__}: {err}")
    assert not wrong, f"{len(wrong)} of {checked} cases:\n" + "\n".join(wrong[:40])
    assert checked > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written: no run folder, no file


@pytest.mark.parametrize(
    "command,argv,message",
    [
        ("generate", ["temperature=abc"], "temperature=abc must be a number >= 0"),
        ("generate", ["top_p=abc"], "top_p=abc must be a number in (0, 1]"),
        ("generate", ["+temprature=0.1"], "temprature is not a setting of rnnlm-generate: did you mean temperature?"),
        ("generate", ["+model=gru"], "model is not a setting of rnnlm-generate"),
        ("generate", ["model=gru"], "model is not a setting of rnnlm-generate"),
        ("eval", ["+model=gru"], "model is not a setting of rnnlm-eval"),
        ("score", ["+temprature=0.1"], "temprature is not a setting of rnnlm-score"),
        ("eval", ["data.seq_len=abc"], "data.seq_len=abc must be a positive integer"),
        ("score", ["batch_size=0"], "batch_size=0 must be a positive integer"),
        ("train", ["model.adaptive_div_value=abc"], "model.adaptive_div_value=abc must be a number >= 1"),
        ("train", ["model.init_range=-1"], "model.init_range=-1 must be a positive number"),
        ("train", ["optimizer=sgd", "optimizer.momentum=-1"], "optimizer.momentum=-1 must be a number in [0, 1)"),
        ("train", ["trainer.val_check_interval=0"], "trainer.val_check_interval=0 must be an integer >= 1"),
        ("train", ["trainer.max_epochs=abc"], "trainer.max_epochs=abc must be a positive integer, or -1"),
        ("train", ["trainer.max_time=abc"], "trainer.max_time=abc must be a duration DD:HH:MM:SS"),
        ("train", ["callbacks=diagnostics", "callbacks.gradient_flow.every_n_steps=0"],
         "callbacks.gradient_flow.every_n_steps=0 must be a positive integer"),
        ("train", ["data=recall", "data.recall.keys=1"], "data.recall.keys=1 must be an integer >= 2"),
        ("train", ["data=recall", "data.recall.keys=100000"], "data.recall.keys=100000 is more than the 4000 training"),
        ("train", ["data=recall", "data.recall.examples=[10,0,5]"], "data.recall.examples=[10, 0, 5] must be a list"),
        ("train", ["data=recall", "data.recall.distance=abc"], "data.recall.distance=abc must be a positive integer"),
        ("train", ["~model.hidden_size"], "model.hidden_size is missing (was it deleted with ~model.hidden_size?)"),
        ("train", ["~data.test_batch_size"], "data.test_batch_size cannot be deleted (~data.test_batch_size)"),  # null
        ("train", ["model.hidden_size=${model.oops}"], "model.hidden_size=${model.oops} cannot be resolved"),
        ("train", ["data=word", "model.softmax=adaptive", "model.hidden_size=16", "model.adaptive_div_value=100"],
         "model.adaptive_div_value=100 leaves cluster 1 of the adaptive softmax 0 units wide"),
        ("train", ["model=mingru", "model.reset_after=false"], "model.reset_after applies to model=gru only"),
        ("train", ["model=minlstm", "model.nonlinearity=relu"], "model.nonlinearity applies to model=rnn only"),
        ("train", ["model=gru", "+model.forget_bias=1"], "model.forget_bias=1 applies to model=lstm only (gru does not read it)"),
        ("train", ["model=lstm", "model.forget_bias=abc"], "model.forget_bias=abc must be a number (or null)"),
        ("train", ["model=lstm", "~model.forget_bias"], "~model.forget_bias deletes nothing (model.forget_bias, a "
                                                         "setting of model=lstm only, is null or absent)"),
        ("train", ["model=lstm", "model.forget_bias=1", "model.init_all=true"],
         "model.forget_bias=1 is undone by model.init_all=true"),
        ("train", ["model=rnn", "model.cell=lstm", "model.nonlinearity=relu"],
         "model.nonlinearity=relu applies to model=rnn only (lstm does not read it)"),
        ("train", ["model.cell=nosuchcell"],
         "model.cell=nosuchcell is not a cell: use one of rnn|lstm|gru|mingru|minlstm"),
        ("train", ["model.cell=nosuchmodule:Cell"], "model.cell=nosuchmodule:Cell cannot be imported (no module named "
                                                     "'nosuchmodule' on the Python path)"),
        ("train", ["model.cell=torch.nn:LSTM"], "model.cell=torch.nn:LSTM is not a cell: torch.nn.modules.rnn.LSTM is "
                                                 "not a subclass of rnnlm.cells.RecurrentCell"),
        ("train", ["model.cell=examples.indrnn:IndRNN", "model.impl=scratch"], "model.impl=scratch picks a form of a "
                                                                               "built-in cell"),
        ("train", ["model.cell=examples.indrnn:IndRNN", "model.recurrent_max=-1"],
         "model.recurrent_max=-1 must be a positive number"),
        ("train", ["model=mingru", "model.weight_drop=0.5"], "model.cell=mingru does not support weight drop"),
        ("train", ["model.hidden_size=[16,16,16]"], "gives 3 widths for model.num_layers=2: give one width per layer"),
        ("train", ["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1 must be a number >= 0"),
        ("train", ["+trainer.profilr=simple"], "trainer.profilr is not an argument of lightning.pytorch.Trainer "
                                               "(did you mean trainer.profiler?)"),
        ("train", ["+model.foo=1"], "model.foo is not a setting of rnnlm-train"),
        ("train", ["-m", "model=rnn,gru", "--cfg", "job"], "-m and --cfg cannot be given together"),
        ("train", ["+optimizer.fused=maybe"], "optimizer.fused=maybe must be true/false or null, the type of "
                                              "torch.optim.AdamW's argument fused"),
        ("train", ["optimizer=sgd", "+optimizer.nesterov=1"], "optimizer.nesterov=1 must be true/false"),
        ("train", ["+logger.tensorboard.log_graph=yes"], "logger.tensorboard.log_graph=yes must be true/false"),
    ],
)
def test_named_mistakes_are_refused_in_one_line(command, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        check_command_line(command, argv)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_data_folder_that_is_a_file_is_refused_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RNNLM_DATA_DIR", str(tmp_path / "file.txt"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="paths.data_dir=.*file.txt must be a folder .*it comes from RNNLM_DATA_DIR"):
        check_command_line("train", [])


def test_arguments_of_the_built_classes_may_be_added(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_command_line("train", ["+trainer.profiler=simple", "+optimizer.betas=[0.9,0.99]", "~callbacks.progress_bar"])


def test_max_time_as_a_mapping_reaches_lightning_as_that_duration(tmp_path):
    """trainer.max_time={hours: 1, minutes: 30}, as the config's comment offers: Lightning's Timer stops at 90 minutes
    (Lightning reads a plain dict only; a DictConfig used to fail when the trainer was built)."""
    from lightning.pytorch.callbacks import Timer

    from rnnlm.commands.train import lightning_trainer

    for given, seconds in (("{hours: 1, minutes: 30}", 5400), ("{seconds: 15}", 15), ("00:00:02:00", 120)):
        cfg = _compose("train", [f"trainer.max_time={given}"], tmp_path)
        trainer = instantiate(lightning_trainer(cfg.trainer), logger=False, enable_checkpointing=False)
        [timer] = [c for c in trainer.callbacks if isinstance(c, Timer)]
        assert timer._duration == seconds


def test_every_added_argument_of_a_built_class_is_checked_against_its_type():
    """``+optimizer.fused=maybe`` and the like: an argument the config does not list, added for the class a section
    builds (every optimizer, scheduler, trainer, logger and callback the configs name), is refused in one line
    naming it when its value is not of the type the class's signature gives (its annotation, or its default's
    type), and let through when it is."""
    targets = {}  # section -> the targets the config groups give it
    for variant in VARIANTS["train"]:
        plain = OmegaConf.to_container(_compose("train", variant, REPO), resolve=False)
        for section in _built_sections(plain):
            targets.setdefault(section, set()).add(OmegaConf.select(OmegaConf.create(plain), f"{section}._target_"))
    checked, wrong = 0, []
    for section, names in targets.items():
        for target in names:
            for name, parameter in _arguments(target)[0].items():
                key = f"{section}.{name}"
                if name in PASSED_IN_CODE or declared(key, "train"):
                    continue  # rnnlm passes it, or the table checks it
                arms = argument_type(parameter)
                for value in BAD_VALUES:
                    parsed = _parsed(value)
                    cfg = OmegaConf.create({})
                    OmegaConf.update(cfg, f"{section}._target_", target, force_add=True)
                    OmegaConf.update(cfg, key, parsed, force_add=True, merge=False)
                    problems = [p for p in problems_of(cfg, "train") if p.startswith(key)]
                    checked += 1
                    misfit = arms is not None and not any(accepts(parsed) for accepts, _ in arms)
                    if misfit and not problems:
                        wrong.append(f"+{key}={value} ({parameter.annotation}) was not refused")
                    if not misfit and problems:
                        wrong.append(f"+{key}={value} ({parameter.annotation}) was refused: {problems}")
    assert not wrong, f"{len(wrong)} of {checked} cases:\n" + "\n".join(wrong[:40])
    assert checked > 500


@pytest.mark.slow
def test_a_sample_of_the_cases_end_to_end(tmp_path, session_corpus, cache_dir):
    """The real command line: a seeded sample of the generated cases, each run as a user would run it."""
    base = _compose("train", [], tmp_path)
    cases = random.Random(0).sample(_cases(base, "train"), 40)
    small = [o for o in TINY if not o.startswith("callbacks.")] + [f"data.path={session_corpus}", "test=false",
                                                                  "trainer.max_steps=2", f"paths.cache_dir={cache_dir}"]
    env = {**os.environ, "RNNLM_DATA_DIR": str(SHARED_DATA)}
    for key, typed, _ in cases:
        folder = tmp_path / f"case{abs(hash(typed))}"
        folder.mkdir()
        argv = [o for o in small if o.split("=")[0] != key] + [typed]
        run = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *argv], cwd=folder, env=env,
                             capture_output=True, text=True, timeout=600)
        if run.returncode == 0:
            continue
        lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, (typed, run.stderr[-2000:])
        assert key.split(".")[-1] in lines[0], (typed, lines[0])
        assert not (folder / "outputs").exists(), typed


@pytest.mark.parametrize("where", ["folder", "--output"])
def test_every_bad_value_of_the_report_arguments_works_or_is_refused_in_one_line(where, tmp_path, monkeypatch, capsys):
    """rnnlm-report takes a sweep folder and --output DIR: the same bad values, typed as a user would."""
    from rnnlm.commands.report import main
    from test_report_damage import fake_sweep

    sweep = fake_sweep(tmp_path, models=("rnn",), sizes=("16",))
    (tmp_path / "a file").write_text("x")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for value in (*(v.strip("'") for v in BAD_VALUES), str(tmp_path / "a file"), " "):
        argv = [value] if where == "folder" else [str(sweep), "--output", value]
        try:
            main(argv)
        except SystemExit as stop:
            lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
            assert stop.code == 2 and len(lines) == 1, (argv, lines)
            assert (value.strip() or "--output") in lines[0] or "folder" in lines[0], (argv, lines[0])
        else:
            assert where == "--output" and (work / value / "summary.csv").is_file(), argv  # a new folder, made
    assert not any(p.name.startswith("report-") for p in work.iterdir())  # nothing written in the wrong place
