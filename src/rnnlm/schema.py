"""Every setting of every command, with its type and range, declared once.

A table per command maps each key (``model.hidden_size``) to a :class:`Setting`. :func:`check_settings` walks
the composed config and refuses, in one line that names each key, a value of the wrong type or out of range,
an interpolation that cannot be resolved, a required key that is missing (``~key``), and a key that is not a
setting (``+key``) unless it is an argument of the class its section builds (``+trainer.profiler=simple``,
``+optimizer.betas=[0.9,0.99]``). Settings that only make sense together are checked afterwards, once every
value has its type (:mod:`rnnlm.checks`).

Why a table rather than Hydra's structured configs: the ranges (``> 0``, ``[0, 1)``, "an integer or a fraction")
and the messages are ours to phrase; the groups keep their plain YAML files; the same table checks a
checkpoint's stored run config when it is resumed; and the fuzz test (``tests/test_config_fuzz.py``) reads it
to know what every key accepts.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rnnlm.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    """What one key accepts: ``accepts(value)`` is true for a good value; ``expects`` completes the sentence
    "key=value must be ..."."""

    expects: str
    accepts: Callable[[Any], bool]
    null: bool = False  # null (None) is a good value too
    required: bool = True  # the key must be present where its section is
    section: bool = False  # a section of settings of its own when not null (data.recall, scheduler)

    def problem(self, key: str, value: Any) -> str | None:
        if value is None and self.null:
            return None
        try:
            if self.accepts(value):
                return None
        except (TypeError, ValueError, OverflowError):
            pass
        null = " (or null)" if self.null and "null" not in self.expects else ""
        return f"{key}={shown(value)} must be {self.expects}{null}"


def shown(value: Any) -> str:
    """A value as it would be typed: ``null``, ``true``, ``''``, ``[1, 2]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value.strip() and value == value.strip() else repr(value)
    if isinstance(value, (ListConfig, DictConfig)):
        return str(OmegaConf.to_container(value))
    return str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def _in_range(value, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


def integer(low: int | None = None, high: int | None = None, **options) -> Setting:
    expects = "a positive integer" if (low, high) == (1, None) else f"an integer {_range_text(low, high, False, False)}"
    return Setting(expects.strip(), lambda v: _is_int(v) and _in_range(v, low, high, False, False), **options)


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           **options) -> Setting:
    expects = ("a positive number" if (low, high, low_open) == (0, None, True)
               else f"a number {_range_text(low, high, low_open, high_open)}")
    return Setting(expects.strip(), lambda v: _is_number(v) and _in_range(v, low, high, low_open, high_open),
                   **options)


def flag(**options) -> Setting:
    return Setting("true or false", lambda v: isinstance(v, bool), **options)


def one_of(*values: Any, **options) -> Setting:
    return Setting(f"one of {'|'.join(shown(v) for v in values)}",
                   lambda v: not isinstance(v, bool) and isinstance(v, (str, int, float)) and v in values, **options)


def text(empty: bool = False, **options) -> Setting:
    return Setting("a text" if empty else "a non-empty text",
                   lambda v: isinstance(v, str) and (empty or bool(v.strip())), **options)


def folder(**options) -> Setting:
    """A folder that exists, or that can be made (a file of that name cannot)."""
    return Setting("a folder (a path that is not a file)",
                   lambda v: isinstance(v, str) and bool(v.strip()) and not Path(v).expanduser().is_file(), **options)


def existing_file(**options) -> Setting:
    return Setting("an existing file", lambda v: isinstance(v, str) and Path(v).expanduser().is_file(), **options)


def existing_path(**options) -> Setting:
    return Setting("an existing file or folder", lambda v: isinstance(v, str) and bool(v.strip())
                   and Path(v).expanduser().exists(), **options)


def integers(low: int | None = None, length: int | None = None, increasing: bool = False, **options) -> Setting:
    def accepts(v) -> bool:
        return (isinstance(v, (list, tuple, ListConfig)) and (length is None or len(v) == length) and len(v) > 0
                and all(_is_int(x) and _in_range(x, low, None, False, False) for x in v)
                and (not increasing or list(v) == sorted(set(v))))
    what = f"{length} " if length else ""
    order = "increasing " if increasing else ""
    bound = f" {_range_text(low, None, False, False)}" if low is not None else ""
    return Setting(f"a list of {what}{order}integers{bound}, e.g. [{', '.join(['1'] * (length or 2))}]",
                   accepts, **options)


def numbers(low: float | None = None, high: float | None = None, length: int | None = None, **options) -> Setting:
    def accepts(v) -> bool:
        return (isinstance(v, (list, tuple, ListConfig)) and (length is None or len(v) == length)
                and all(_is_number(x) and _in_range(x, low, high, False, False) for x in v))
    what = f"{length} " if length else ""
    return Setting(f"a list of {what}numbers {_range_text(low, high, False, False)}", accepts, **options)


def class_path(**options) -> Setting:
    """``module.Name`` of a class or function that can be imported."""
    return Setting("an importable class path (module.Name)", lambda v: _import(v) is not None, **options)


def either(*settings: Setting, **options) -> Setting:
    return Setting(" or ".join(s.expects for s in settings), lambda v: any(s.accepts(v) for s in settings), **options)


def _import(path: Any):
    if not isinstance(path, str) or not re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*", path):
        return None
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except Exception:  # noqa: BLE001 - any failure to import means: not a class path we can build
        return None


def _duration(value: Any) -> bool:
    """Lightning's ``max_time``: ``DD:HH:MM:SS`` or ``{days: .., hours: .., minutes: .., seconds: ..}``."""
    if isinstance(value, str):
        parts = value.split(":")
        return len(parts) == 4 and all(p.isdigit() for p in parts) and any(int(p) for p in parts)
    if isinstance(value, (dict, DictConfig)):
        units = ("days", "hours", "minutes", "seconds")
        return (bool(value) and set(value) <= set(units) and all(_is_number(value[u]) and value[u] >= 0 for u in value)
                and any(value[u] for u in value))
    return False


def _devices(value: Any) -> bool:
    """Lightning's ``devices``: a count, -1 (all), ``auto``, a list of indices, or ``"0,1"``."""
    if _is_int(value):
        return value >= 1 or value == -1
    if isinstance(value, str):
        return value == "auto" or bool(re.fullmatch(r"-1|\d+|(\d+,)+\d*", value.strip()))
    if isinstance(value, (list, ListConfig)):
        return len(value) > 0 and all(_is_int(i) and i >= 0 for i in value)
    return False


def _count_or_fraction(low_count: int, zero_fraction: bool, **options) -> Setting:
    return Setting(f"an integer >= {low_count} (batches) or a fraction in {'[' if zero_fraction else '('}0, 1] (of "
                   "the epoch)",
                   lambda v: (_is_int(v) and v >= low_count) or (isinstance(v, float) and math.isfinite(v)
                                                                 and (0 <= v if zero_fraction else 0 < v) and v <= 1),
                   **options)


PRECISIONS = ("64-true", "64", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true",
              "transformer-engine", "transformer-engine-float16", 64, 32, 16)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")

PATHS = {
    "paths.root_dir": folder(),
    "paths.data_dir": folder(),
    "paths.cache_dir": folder(),
    "paths.log_dir": folder(),
    "paths.output_dir": folder(),
}
CHECKPOINT_PATH = Setting("a checkpoint file, or last (the newest training run's last.ckpt)",
                          lambda v: isinstance(v, str) and bool(v.strip()), null=True)
DEVICE = Setting("auto, cpu, cuda, cuda:N or mps", lambda v: isinstance(v, str)
                 and bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v)))
OUTPUT = Setting("a file name", lambda v: isinstance(v, str) and bool(v.strip()), null=True)


# A bound on the sizes, far above any model a machine trains, that keeps a mistyped size from building billions of
# layers on the meta device (where parameter counts come from) before the memory check can refuse it.
MAX_SIZE = 2**24
MAX_LAYERS = 1_000


def size(high: int, **options) -> Setting:
    """A width or a count of layers: a positive integer, bounded far above any real model."""
    return Setting(f"a positive integer (at most {high:,})", integer(1, high).accepts, **options)


def _widths() -> Setting:
    """``model.hidden_size``: one width for every layer, or a list with one per layer."""
    one = size(MAX_SIZE)
    return Setting(f"{one.expects}, or a list of those with one per layer (e.g. [1150, 1150, 400])",
                   lambda v: one.accepts(v) or (isinstance(v, (list, tuple, ListConfig)) and len(v) > 0
                                                and all(one.accepts(x) for x in v)))


def cell_settings_table(cell: type) -> dict[str, Setting]:
    """The settings a cell class declares, as ``model.<name>`` entries (only that cell has them: not required)."""
    return {f"model.{name}": Setting(s.expects, s.accepts, s.null, required=False) for name, s in cell.settings.items()}


def _model_settings() -> dict[str, Setting]:
    from rnnlm.cells import BUILT_IN, CLASS_PATH_HINT, IMPLS  # torch: only the commands that build models need it
    from rnnlm.network import SOFTMAXES

    probability = number(0, 1, high_open=True)
    own = {key: setting for forms in BUILT_IN.values() for cell in forms.values()
           for key, setting in cell_settings_table(cell).items()}
    return {
        "model._target_": class_path(),
        "model.cell": Setting(f"one of {'|'.join(BUILT_IN)}, {CLASS_PATH_HINT}",
                              lambda v: isinstance(v, str) and bool(v.strip())),
        "model.embedding_dim": size(MAX_SIZE, null=True),
        "model.hidden_size": _widths(),
        "model.num_layers": size(MAX_LAYERS),
        "model.dropout": probability,
        "model.input_dropout": number(0, 1, high_open=True, null=True),
        "model.layer_dropout": number(0, 1, high_open=True, null=True),
        "model.locked_dropout": flag(),
        "model.embedding_dropout": probability,
        "model.weight_drop": probability,
        "model.projection_size": size(MAX_SIZE, null=True),
        "model.tie_weights": flag(),
        "model.init_range": number(0, low_open=True),
        "model.init_all": flag(),
        "model.impl": one_of(*IMPLS),
        "model.compile": flag(),
        "model.cuda_graph": flag(),
        "model.bidirectional": flag(),
        "model.softmax": one_of(*SOFTMAXES),
        "model.adaptive_cutoffs": integers(1, increasing=True, null=True),
        "model.adaptive_div_value": number(1),
        "model.activation_reg": number(0),
        "model.temporal_activation_reg": number(0),
        **own,  # the built-in cells' own settings (model.nonlinearity of rnn, model.reset_after of gru)
    }


# The settings a checkpoint's network section holds are model.* settings by name.
def network_problems(settings: Mapping) -> list[str]:
    """Type and range problems of ``model.*`` settings (a config's, or a checkpoint's network section)."""
    table = _model_settings()
    problems = []
    for name, value in settings.items():
        setting = table.get(f"model.{name}")
        if setting is not None and (problem := setting.problem(f"model.{name}", value)):
            problems.append(problem)
    return problems


def _train_settings() -> dict[str, Setting]:
    from rnnlm.corpora import CORPORA

    return {
        "task_name": text(),
        "task": one_of("lm", "bilm"),
        "seed": integer(0, 2**32 - 1, null=True),
        "ckpt_path": CHECKPOINT_PATH,
        "test": flag(),
        "keep_freed_memory": flag(),
        "optimized_metric": Setting("a metric name such as val/loss_best",
                                    lambda v: isinstance(v, str) and "/" in v),
        **_model_settings(),
        "data._target_": class_path(),
        "data.corpus": one_of(*CORPORA, null=True),
        "data.path": existing_path(null=True),
        "data.level": one_of("char", "word", "bpe"),
        # the 256 bytes at least; far above any vocabulary a corpus here can fill (ids are stored as uint32)
        "data.bpe_vocab_size": integer(256, 2**20, required=False),
        "data.mode": one_of("stream", "sentence"),
        "data.seq_len": integer(1),
        "data.batch_size": integer(1),
        "data.eval_batch_size": integer(1),
        "data.test_batch_size": integer(1, null=True, required=False),
        "data.min_freq": integer(1),
        "data.max_size": integer(3, null=True),
        "data.split": numbers(0, 1, length=3),
        "data.split_by": one_of("lines", "characters"),
        "data.holdout": Setting("true (validate on held-out text) or false (validate on the training text)",
                                lambda v: isinstance(v, bool)),
        "data.scored": one_of("all", "last"),
        "data.recall": Setting("the recall task's settings (data=recall)", lambda v: False, null=True, section=True),
        "data.recall.distance": integer(1),
        "data.recall.keys": integer(2),
        "data.recall.noise": integer(1),
        "data.recall.examples": integers(1, length=3),
        "data.recall.seed": integer(0),
        "data.variable_seq_len": flag(),
        "data.data_dir": folder(),
        "data.cache_dir": folder(),
        "data.download": flag(),
        "data.num_workers": integer(0),
        "optimizer._target_": class_path(),
        "optimizer._partial_": flag(),
        "optimizer.lr": number(0, low_open=True),
        "optimizer.weight_decay": number(0, required=False),
        "optimizer.momentum": number(0, 1, high_open=True, required=False),
        "optimizer.nonmono": integer(1, required=False),
        "scheduler": Setting("a scheduler (scheduler=plateau|step|multistep|none)", lambda v: False, null=True,
                             section=True),
        "scheduler._target_": class_path(),
        "scheduler._partial_": flag(),
        "scheduler.mode": one_of("min", "max", required=False),
        "scheduler.factor": number(0, 1, low_open=True, high_open=True, required=False),
        "scheduler.patience": integer(0, required=False),
        "scheduler.step_size": integer(1, required=False),
        "scheduler.gamma": number(0, 1, low_open=True, required=False),
        "scheduler.milestones": integers(1, increasing=True, required=False),
        "trainer._target_": class_path(),
        "trainer.default_root_dir": folder(),
        "trainer.accelerator": one_of(*ACCELERATORS),
        "trainer.devices": Setting("a number of devices (>= 1, or -1 for all), auto, or a list of indices", _devices),
        "trainer.strategy": text(required=False),
        "trainer.num_nodes": integer(1, required=False),
        "trainer.sync_batchnorm": flag(required=False),
        "trainer.max_epochs": Setting("a positive integer, or -1 for no limit",
                                      lambda v: _is_int(v) and (v >= 1 or v == -1), null=True),
        "trainer.max_steps": Setting("a positive integer, or -1 for no limit",
                                     lambda v: _is_int(v) and (v >= 1 or v == -1)),
        "trainer.max_time": Setting("a duration DD:HH:MM:SS (e.g. 00:01:30:00) or {hours: 1, minutes: 30}",
                                    _duration, null=True),
        "trainer.val_check_interval": _count_or_fraction(1, zero_fraction=False, null=True),
        "trainer.check_val_every_n_epoch": integer(1, null=True),
        "trainer.limit_train_batches": _count_or_fraction(1, zero_fraction=False, null=True),
        "trainer.limit_val_batches": _count_or_fraction(0, zero_fraction=True, null=True),
        "trainer.limit_test_batches": _count_or_fraction(0, zero_fraction=True, null=True),
        "trainer.num_sanity_val_steps": integer(-1, null=True),
        "trainer.accumulate_grad_batches": integer(1),
        "trainer.chunks_per_call": integer(1),
        "trainer.gradient_clip_val": Setting("a number >= 0 (0 or null: no clipping)",
                                             lambda v: _is_number(v) and v >= 0, null=True),
        "trainer.gradient_clip_algorithm": one_of("norm", "value"),
        "trainer.log_every_n_steps": integer(1),
        "trainer.precision": one_of(*PRECISIONS),
        "trainer.deterministic": either(flag(), one_of("warn"), null=True),
        "trainer.benchmark": flag(null=True),
        "trainer.detect_anomaly": flag(),
        "trainer.fast_dev_run": either(flag(), integer(1)),
        "trainer.overfit_batches": _count_or_fraction(0, zero_fraction=True),
        "trainer.enable_progress_bar": flag(),
        "trainer.enable_model_summary": flag(),
        "logger.*._target_": class_path(),
        "logger.*.save_dir": folder(required=False),
        "logger.*.name": text(empty=True, null=True, required=False),
        "logger.*.version": Setting("a text or an integer", lambda v: isinstance(v, str) or _is_int(v),
                                    null=True, required=False),
        "logger.*.default_hp_metric": flag(required=False),
        "callbacks.*._target_": class_path(),
        "callbacks.model_checkpoint.dirpath": folder(required=False),
        "callbacks.model_checkpoint.filename": text(required=False),
        "callbacks.model_checkpoint.monitor": text(required=False),
        "callbacks.model_checkpoint.mode": one_of("min", "max", required=False),
        "callbacks.model_checkpoint.save_top_k": integer(-1, required=False),
        "callbacks.model_checkpoint.save_last": flag(required=False),
        "callbacks.model_checkpoint.auto_insert_metric_name": flag(required=False),
        "callbacks.model_checkpoint.every_n_train_steps": integer(1, null=True, required=False),
        "callbacks.model_checkpoint.every_n_minutes": number(0, low_open=True, null=True, required=False),
        "callbacks.model_checkpoint.save_on_signal": flag(required=False),
        "callbacks.tokens_per_second.window": integer(1, required=False),
        "callbacks.text_samples.num_tokens": integer(0, required=False),
        "callbacks.text_samples.temperature": number(0, low_open=True, required=False),
        "callbacks.text_samples.prompt": text(empty=True, null=True, required=False),
        "callbacks.progress_bar.refresh_s": number(0, required=False),
        "callbacks.model_summary.max_depth": integer(-1, required=False),
        "callbacks.gradient_flow.output_dir": folder(required=False),
        "callbacks.gradient_flow.every_n_steps": integer(1, required=False),
        "callbacks.gradient_flow.rows": integer(1, required=False),
        **PATHS,
    }


def _eval_settings() -> dict[str, Setting]:
    from rnnlm.corpora import SPLITS

    return {
        "task_name": text(),
        "ckpt_path": CHECKPOINT_PATH,
        "split": one_of(*SPLITS),
        "data.path": existing_path(null=True),
        "data.batch_size": integer(1, null=True),
        "data.seq_len": integer(1, null=True),
        "output": OUTPUT,
        "overwrite": flag(),
        "device": DEVICE,
        **PATHS,
    }


def _generate_settings() -> dict[str, Setting]:
    return {
        "ckpt_path": CHECKPOINT_PATH,
        "prompt": text(empty=True),
        "prompt_file": existing_file(null=True),
        "max_new_tokens": integer(0, 10**7),
        "temperature": number(0),  # 0 only with greedy=true (rnnlm.checks)
        "top_k": integer(1, null=True),
        "top_p": number(0, 1, low_open=True, null=True),
        "greedy": flag(),
        "num_samples": integer(1, 10_000),
        "seed": integer(0, 2**63 - 1),
        "stop_at_eos": flag(),
        "output": OUTPUT,
        "overwrite": flag(),
        "device": DEVICE,
        **PATHS,
    }


def _score_settings() -> dict[str, Setting]:
    return {
        "ckpt_path": CHECKPOINT_PATH,
        "text": text(null=True),
        "candidates": Setting("a list of words, e.g. [cat,dog]", lambda v: isinstance(v, (list, ListConfig))
                              and all(isinstance(c, str) and c.strip() for c in v)),
        "blank": text(),
        "top_k": integer(1),
        "text_file": existing_file(null=True),
        "batch_size": integer(1),
        "device": DEVICE,
        **PATHS,
    }


def _inspect_settings() -> dict[str, Setting]:
    return {
        "ckpt_path": CHECKPOINT_PATH,
        "text": text(null=True),
        "text_file": existing_file(null=True),
        "read": one_of("stream", "lines"),
        "format": one_of("html", "json"),
        "output": OUTPUT,
        "overwrite": flag(),
        "layer": integer(1, MAX_LAYERS, null=True),
        "units": Setting("a list of unit numbers (integers >= 0), e.g. [3, 17], or []",
                         lambda v: isinstance(v, (list, ListConfig)) and all(_is_int(u) and u >= 0 for u in v)),
        "top_k": integer(1, 1_000),
        "finder_units": integer(1, 1_000),
        "max_tokens": integer(1),
        "batch_size": integer(1),
        "device": DEVICE,
        **PATHS,
    }


def _export_settings() -> dict[str, Setting]:
    from rnnlm.exporting import FORMATS

    return {
        "ckpt_path": CHECKPOINT_PATH,
        "format": one_of(*FORMATS),
        "output": OUTPUT,
        "overwrite": flag(),
        **PATHS,
    }


TABLES: dict[str, Callable[[], dict[str, Setting]]] = {
    "train": _train_settings, "eval": _eval_settings, "generate": _generate_settings, "score": _score_settings,
    "export": _export_settings, "inspect": _inspect_settings,
}
# Sections that build another library's class from `_target_` (or a user's): a key that is not in the table may
# still be one of its arguments. rnnlm's own model and data take exactly the keys the table lists.
BUILT_SECTIONS = ("optimizer", "scheduler", "trainer")
# Sections a user may drop whole (~callbacks.progress_bar) or add (+callbacks.mine._target_=...).
OPEN_SECTIONS = ("logger", "callbacks")


@functools.cache
def settings_table(command: str) -> dict[str, Setting]:
    """The declared settings of ``command`` (train, eval, generate, score, export, inspect), by key (``*`` stands
    for any name)."""
    return TABLES[command]()


def declared(key: str, command: str) -> Setting | None:
    """What ``key`` of ``command`` accepts, if the table declares it (itself, or as ``logger.*.save_dir``)."""
    table = settings_table(command)
    pattern = _pattern(key, table)
    return None if pattern is None else table[pattern]


def _pattern(key: str, table: Mapping[str, Setting]) -> str | None:
    """The table entry that declares ``key``: itself, or with an open section's name as ``*``."""
    if key in table:
        return key
    parts = key.split(".")
    if len(parts) >= 3 and parts[0] in OPEN_SECTIONS:
        starred = ".".join([parts[0], "*", *parts[2:]])
        if starred in table:
            return starred
    return None


def _leaves(node: Mapping, table: Mapping[str, Setting], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of every setting in ``node`` (plain data): a section is entered unless the table declares
    its key as one value (``trainer.max_time: {hours: 1}``)."""
    for name, value in node.items():
        key = f"{prefix}{name}"
        pattern = _pattern(key, table)
        if isinstance(value, dict) and value and (pattern is None or table[pattern].section):
            yield from _leaves(value, table, key + ".")
        else:
            yield key, value


def _section_of(key: str) -> tuple[str, str] | None:
    """The section that builds another library's class, and the argument of that class which ``key`` may be (or be
    inside of: ``optimizer.betas.a`` is in ``betas``)."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[0] in OPEN_SECTIONS:
        return ".".join(parts[:2]), parts[2]
    if len(parts) >= 2 and parts[0] in BUILT_SECTIONS:
        return parts[0], parts[1]
    return None


# Arguments rnnlm passes itself when it builds the section: the parameters and the optimizer.
PASSED_IN_CODE = {"self", "params", "optimizer"}


@functools.cache
def _arguments(target: str) -> tuple[dict[str, inspect.Parameter], set[str], bool]:
    """The keyword arguments the class or function at ``target`` names, by name; those it requires; and whether it
    takes any other name too (``**kwargs`` that no base class ends). A class that passes ``**kwargs`` on to its
    base takes the base's too (but requires only what it requires itself)."""
    built = _import(target)
    if built is None:
        return {}, set(), False
    found: dict[str, inspect.Parameter] = {}
    required: set[str] = set()
    for part in (inspect.getmro(built) if inspect.isclass(built) else (built,)):
        try:
            parameters = _signature(part.__init__ if inspect.isclass(part) else part).parameters.values()
        except (TypeError, ValueError):
            return found, required, True
        named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not found:  # the class itself
            required = {p.name for p in named if p.default is p.empty} - PASSED_IN_CODE
        found.update((p.name, p) for p in named if p.name not in found and p.name != "self")
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return found, required, False
    return found, required, True


def _signature(function: Callable) -> inspect.Signature:
    """``function``'s signature with its annotations as types where they can be evaluated (torch writes some as
    strings)."""
    try:
        return inspect.signature(function, eval_str=True)
    except Exception:  # noqa: BLE001 - a name the annotation's module cannot resolve: keep them as strings
        return inspect.signature(function)


# What a YAML value can be, by the plain types an argument's annotation names; any other class in an annotation
# (a Tensor, a Callback) is one a YAML value cannot be checked against, so that argument takes anything.
_PLAIN_TYPES: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true/false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
    type(None): (lambda v: v is None, "null"),
    tuple: (lambda v: isinstance(v, (list, tuple)), "a list"),
    list: (lambda v: isinstance(v, (list, tuple)), "a list"),
    dict: (lambda v: isinstance(v, dict), "a mapping"),
}


def _annotated_arms(annotation: Any) -> list[tuple[Callable[[Any], bool], str]] | None:
    """What each arm of an annotation accepts, and its name (``bool | None``: true/false, null); None if an arm is
    a type a YAML value cannot be checked against."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        arms = [_annotated_arms(arm) for arm in typing.get_args(annotation)]
        return None if any(arm is None for arm in arms) else [a for arm in arms for a in arm]
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        names = "one of " + "|".join(map(shown, allowed))
        return [(lambda v: any(v == a and type(v) is type(a) for a in allowed), names)]
    plain = type(None) if annotation is None else origin if origin in (tuple, list, dict) else annotation
    return [_PLAIN_TYPES[plain]] if plain in _PLAIN_TYPES else None


def argument_type(parameter: inspect.Parameter) -> list[tuple[Callable[[Any], bool], str]] | None:
    """What a YAML value of the argument ``parameter`` may be, from its annotation (or, without one, its default's
    type): a list of (accepts, name); None if that cannot be told."""
    if parameter.annotation is not parameter.empty:
        return _annotated_arms(parameter.annotation)
    default = parameter.default
    if default is parameter.empty or default is None or type(default) not in _PLAIN_TYPES:
        return None  # no annotation and a null default: anything may be meant
    return [_PLAIN_TYPES[type(default)]]


def _argument_problem(key: str, value: Any, parameter: inspect.Parameter, target: str) -> str | None:
    """Why ``value`` cannot be the argument ``parameter`` of ``target`` (``+optimizer.fused=maybe``); None if it
    can, or if its type cannot be told."""
    arms = argument_type(parameter)
    if arms is None or any(accepts(value) for accepts, _ in arms):
        return None
    *others, last = dict.fromkeys(name for _, name in arms)
    names = f"{', '.join(others)} or {last}" if others else last
    return f"{key}={shown(value)} must be {names}, the type of {target}'s argument {parameter.name}"


def _unknown_key(key: str, sections: Mapping, table: Mapping[str, Setting], command: str) -> str | None:
    """Why ``key`` (in the config, not in the table) is refused; None if it is an argument of the class its
    section builds and its value fits that argument's annotated type."""
    if (found := _section_of(key)) is not None:
        section, name = found
        target = _get(sections, f"{section}._target_")
        if isinstance(target, str):
            arguments, _, takes_any = _arguments(target)
            if name in arguments:
                argument = f"{section}.{name}"
                return _argument_problem(argument, _get(sections, argument), arguments[name], target)
            if takes_any:
                return None
            close = difflib.get_close_matches(name, sorted(arguments), n=3)
            hint = f" (did you mean {' or '.join(f'{section}.{c}' for c in close)}?)" if close else ""
            return f"{key} is not an argument of {target}{hint}: check the name"
    known = sorted(k for k in table if "*" not in k)
    top = key.partition(".")[0]
    if "." in key and not any(k.startswith(top + ".") for k in table):
        key = top  # a whole section that is not rnnlm-<command>'s (+model=gru): named once
    close = difflib.get_close_matches(key, known, n=3)
    hint = f": did you mean {' or '.join(close)}?" if close else ": check the name"
    return f"{key} is not a setting of rnnlm-{command}{hint}"


_ABSENT = object()


def _get(node: Any, key: str) -> Any:
    for name in key.split("."):
        if not isinstance(node, dict) or name not in node:
            return _ABSENT
        node = node[name]
    return node


_UNRESOLVED = object()


def _resolved(cfg: DictConfig, problems: list[str]) -> dict:
    """``cfg`` as plain data with every interpolation resolved; a key that cannot be resolved is added to
    ``problems`` and holds :data:`_UNRESOLVED`."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException:
        pass  # find which keys, one by one

    def resolve(node: DictConfig, prefix: str) -> dict:
        out = {}
        for name in node.keys():
            key, child = f"{prefix}{name}", node._get_node(name)
            if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing() \
                    and not child._is_interpolation():
                out[name] = resolve(child, key + ".")
                continue
            try:
                value = node[name]
                out[name] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            except OmegaConfBaseException as err:
                reason = str(err).splitlines()[0]
                out[name] = _UNRESOLVED
                if "HydraConfig was not set" in reason:  # a program building the config without Hydra's runtime
                    continue
                if "Missing mandatory value" in reason:
                    problems.append(f"{key} must be set (??? in the config): add {key}=...")
                else:
                    problems.append(f"{key}={child._value()} cannot be resolved ({reason}): give a value, or an "
                                    "interpolation of an existing key")
        return out

    return resolve(cfg, "")


def problems_of(cfg: DictConfig, command: str) -> list[str]:
    """Every problem with the type, range, presence or name of a key of ``cfg`` (composed for ``command``); the
    ``hydra`` section is Hydra's to check."""
    table = settings_table(command)
    problems: list[str] = []
    raw = OmegaConf.to_container(cfg, resolve=False)
    plain = _resolved(cfg, problems)
    if command == "train":
        table = {**table, **_user_cell_table(plain.get("model"))}
    raw.pop("hydra", None)
    plain.pop("hydra", None)
    for key, value in _leaves(plain, table):
        pattern = _pattern(key, table)
        if pattern is None:
            if (problem := _unknown_key(key, plain, table, command)) and problem not in problems:
                problems.append(problem)
            continue
        typed = _get(raw, key)
        if value is _UNRESOLVED or (isinstance(typed, str) and re.fullmatch(r"\$\{[\w.]+\}", typed)):
            continue  # reported above; or a copy of another key's value (${paths.data_dir}), checked as that key
        if problem := table[pattern].problem(key, value):
            if isinstance(value, str) and pattern.endswith("dir"):
                problem += _env_hint(value)
            problems.append(problem)
    for pattern, setting in table.items():
        parent, _, name = pattern.rpartition(".")
        if setting.required and "*" not in pattern and isinstance(_get(plain, parent) if parent else plain, dict) \
                and _get(plain, pattern) is _ABSENT:
            problems.append(f"{pattern} is missing (was it deleted with ~{pattern}?): every setting needs a value, "
                            f"give {pattern}=...")
    for section in _built_sections(plain):  # what the class a section builds cannot do without
        target = _get(plain, f"{section}._target_")
        if not isinstance(target, str):
            problems.append(f"{section} has no _target_: give +{section}._target_=module.Class, or remove it with "
                            f"~{section}")
            continue
        for name in sorted(_arguments(target)[1] - set(_get(plain, section))):
            problems.append(f"{section}.{name} is missing, and {target} needs it: give {section}.{name}=...")
    return problems


def _user_cell_table(model) -> dict[str, Setting]:
    """The settings of a user's cell (``model.cell=pkg:Cls``), which the tables cannot list; none if it cannot be
    imported (that is reported with the network's other problems)."""
    from rnnlm.cells import cell_class, is_class_path
    from rnnlm.errors import ConfigError

    name = model.get("cell") if isinstance(model, dict) else None
    if not isinstance(name, str) or not is_class_path(name):
        return {}
    try:
        return cell_settings_table(cell_class(name))
    except ConfigError:
        return {}


def _built_sections(plain: dict) -> list[str]:
    """The sections that build another library's class (or a user's), present in ``plain``."""
    sections = [s for s in BUILT_SECTIONS if isinstance(plain.get(s), dict)]
    for open_section in OPEN_SECTIONS:
        node = plain.get(open_section)
        if isinstance(node, dict):
            sections += [f"{open_section}.{name}" for name, child in node.items() if isinstance(child, dict)]
    return sections


def _env_hint(value: str) -> str:
    names = [name for name in ("RNNLM_DATA_DIR", "RNNLM_CACHE_DIR") if os.environ.get(name) and
             os.path.expanduser(os.environ[name]) in value]
    return f" (it comes from {names[0]}={os.environ[names[0]]}: point it at a folder)" if names else ""


def check_settings(cfg: DictConfig, command: str) -> None:
    """Raise :class:`ConfigError` naming every key of ``cfg`` whose value is of the wrong type, out of range,
    missing or unresolvable, and every key that is not a setting of ``command``."""
    problems = problems_of(cfg, command)
    if problems:
        raise ConfigError("; ".join(problems))
