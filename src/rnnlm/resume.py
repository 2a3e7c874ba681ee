"""Resuming a run: which checkpoint ``ckpt_path`` names, and the config the resumed run trains with.

A checkpoint carries the config its run was composed with, so ``ckpt_path=RUN/checkpoints/last.ckpt``
alone continues that run. Settings typed next to it apply when they cannot change the run's maths
(how long to train, how often to validate, where to write, the device, the learning rate); the rest are
refused in one line, as they would make a different run or silently not apply. A checkpoint that has reached
the run's ``trainer.max_steps`` or ``trainer.max_epochs`` is refused too (:func:`check_resumable`), and a setting of
the checkpoint's own groups that today's defaults lack (``optimizer.nonmono`` of an NT-ASGD run) reaches these
checks through :func:`resume_command_line`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from rnnlm import CONF_DIR
from rnnlm.checkpoint import CheckpointError, describe, last_checkpoints, read_checkpoint, read_run_config

log = logging.getLogger(__name__)

# What a resumed run may change. Everything else would make it a different run, or silently not apply
# (the checkpoint restores the optimizer's state and the random streams).
MAY_CHANGE = (
    "ckpt_path", "paths", "callbacks", "logger", "test", "keep_freed_memory", "optimized_metric",
    "data.data_dir", "data.cache_dir", "data.download", "data.num_workers", "data.test_batch_size", "optimizer.lr",
    "trainer.max_steps", "trainer.max_epochs", "trainer.max_time", "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch", "trainer.limit_train_batches", "trainer.limit_val_batches",
    "trainer.limit_test_batches", "trainer.num_sanity_val_steps", "trainer.log_every_n_steps",
    "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm", "trainer.accelerator", "trainer.precision",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.default_root_dir",
    "trainer.detect_anomaly", "trainer.benchmark", "trainer.profiler", "trainer.chunks_per_call", "model.cuda_graph",
    "model.compile",
)
PRESETS = ("experiment", "debug", "hparams_search")  # groups whose choice may set any key
_ABSENT = object()


def may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)


def typed_keys(overrides: list[str]) -> list[str]:
    """The keys or groups that command-line overrides set (``model=gru`` -> ``model``,
    ``+trainer.x=1`` -> ``trainer.x``, ``~callbacks.a`` -> ``callbacks.a``); Hydra's own are left out."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    return [k for k in keys if not k.startswith("hydra") and "/" not in k]


def _flat(node, prefix: str = "") -> dict:
    """``{"model.hidden_size": 200, ...}`` of a plain (resolved) container."""
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _settings(cfg: DictConfig) -> dict:
    return _flat({k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"})


def _under(key: str, selectors: list[str] | None) -> bool:
    if selectors is None:
        return True
    return any(s in PRESETS or key == s or key.startswith(s + ".") for s in selectors)


def differences(cfg: DictConfig, trained: DictConfig, selectors: list[str] | None = None) -> dict:
    """``{key: (value now, value trained with)}`` for the settings that differ, among ``selectors``
    (keys or groups; None: all)."""
    now, then = _settings(cfg), _settings(trained)
    keys = sorted(k for k in now.keys() | then.keys() if _under(k, selectors))
    return {k: (now.get(k, _ABSENT), then.get(k, _ABSENT)) for k in keys
            if now.get(k, _ABSENT) != then.get(k, _ABSENT)}


def _shown(value) -> str:
    return "(absent)" if value is _ABSENT else str(value)


def _trained_config(path: Path, checkpoint: dict) -> DictConfig | None:
    """The config the checkpoint's run was composed with (interpolations unresolved): from the checkpoint, or
    (older checkpoints) its run folder's ``.hydra/config.yaml``; None if neither has it."""
    if (config := read_run_config(checkpoint)) is not None:
        return OmegaConf.create(config)
    if (path.parent.parent / ".hydra" / "config.yaml").is_file():
        return OmegaConf.load(path.parent.parent / ".hydra" / "config.yaml")
    return None


def saved_config(path: Path, checkpoint: dict, cfg: DictConfig) -> DictConfig | None:
    """The config the checkpoint's run was composed with, with this run's paths: from the checkpoint, or
    (older checkpoints) its run folder's ``.hydra/config.yaml``; None if neither has it."""
    if (saved := _trained_config(path, checkpoint)) is None:
        return None
    saved.paths = cfg.paths  # this run's folders (and data/cache dirs on this machine)
    saved.ckpt_path = cfg.ckpt_path
    return saved


def _refusal(path: Path, refused: dict) -> CheckpointError:
    shown = ", ".join(f"{k}={_shown(now)} (trained with {_shown(then)})" for k, (now, then) in refused.items())
    return CheckpointError(f"{path} resumes the run with the settings it was trained with, and these would change "
                           f"it: {shown}; drop them to resume, or leave out ckpt_path to start a new run")


def find_last(cfg: DictConfig, selectors: list[str] | None) -> Path:
    """``ckpt_path=last``: the newest ``last.ckpt`` of a run trained with the settings asked for."""
    runs = Path(cfg.paths.log_dir) / cfg.task_name
    own = Path(cfg.paths.output_dir).resolve()
    candidates = [p for p in last_checkpoints(cfg.paths.log_dir, cfg.task_name) if own not in p.resolve().parents]
    if not candidates:
        raise CheckpointError(f"ckpt_path=last found no run with checkpoints/last.ckpt under {runs}")
    for path in candidates:
        trained = saved_config(path, read_checkpoint(path, mmap=True), cfg)
        if trained is None or not any(not may_change(k) for k in differences(cfg, trained, selectors)):
            return path
    shown = ", ".join(str(p) for p in candidates[:3]) + (", ..." if len(candidates) > 3 else "")
    raise CheckpointError(f"ckpt_path=last found no run under {runs} trained with these settings: give the "
                          f"checkpoint itself, ckpt_path=... (newest first: {shown})")


def resume_config(cfg: DictConfig, overrides: list[str] | None = None) -> DictConfig:
    """The config a run given ``ckpt_path`` trains with.

    Args:
        cfg: the composed config.
        overrides: the command line's overrides: the checkpoint's config applies, with these where they
            may change. None: every setting of ``cfg`` was asked for (a program calling ``train``), so
            ``cfg`` must agree with the checkpoint wherever a resumed run may not change.

    Raises:
        CheckpointError: no such checkpoint, a setting that may not change on resume differs, or the checkpoint
            has reached ``trainer.max_steps`` or ``trainer.max_epochs`` already (:func:`check_resumable`).
    """
    selectors = None if overrides is None else typed_keys(overrides)
    if cfg.ckpt_path == "last":
        path = find_last(cfg, selectors)
    else:
        path = Path(cfg.ckpt_path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"ckpt_path={cfg.ckpt_path} does not exist: give RUN/checkpoints/last.ckpt or last")
    checkpoint = read_checkpoint(path, mmap=True)  # a bad checkpoint fails here, before any work
    trained = saved_config(path, checkpoint, cfg)
    if trained is not None:
        _add_new_settings(trained, cfg)
    result = cfg if trained is None or overrides is None else trained
    if trained is not None:
        diffs = differences(cfg, trained, selectors)
        refused = {k: v for k, v in diffs.items() if not may_change(k)}
        if refused:
            raise _refusal(path, refused)
        if overrides is not None:
            for key in selectors:  # what was typed replaces what the run was trained with
                changed = [k for k in diffs if _under(k, [key])]
                for target in changed if key in PRESETS else [key] if changed else []:
                    _assign(result, target, OmegaConf.select(cfg, target, default=_ABSENT))
    check_resumable(result, checkpoint, path)
    log.info("Resuming %s", describe(path, checkpoint))
    result = result.copy()
    result.ckpt_path = str(path)
    OmegaConf.set_struct(result, True)
    return result


def _add_new_settings(trained: DictConfig, cfg: DictConfig) -> None:
    """Settings that did not exist when the checkpoint's run was made take today's values, in the parts of the
    config that build the same object (a callback replaced since keeps its old arguments)."""
    for key, value in _settings(cfg).items():
        parent = key.rpartition(".")[0]
        if (OmegaConf.select(trained, key, default=_ABSENT) is _ABSENT
                and OmegaConf.select(trained, parent, default=_ABSENT) is not _ABSENT
                and OmegaConf.select(trained, f"{parent}._target_", default=None)
                == OmegaConf.select(cfg, f"{parent}._target_", default=None)):
            OmegaConf.update(trained, key, value, merge=False, force_add=True)


def _assign(cfg: DictConfig, key: str, value) -> None:
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if value is _ABSENT:
        parent.pop(name, None)
    else:
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def epochs_trained(checkpoint: dict) -> int | None:
    """The training epochs a checkpoint has finished, as Lightning counts them when it resumes; None if it does not
    record them.

    A checkpoint written by the validation that ends an epoch (every ``last.ckpt`` of an epoch-based run) is written
    before Lightning counts the epoch as processed: its last batch is done, so a resumed run only closes the epoch.
    """
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs = loops.get("epoch_progress", {}).get("current", {})
    if not isinstance(epochs.get("processed"), int):
        return None
    finished = epochs["processed"]
    if epochs.get("started", 0) > finished and loops.get("epoch_loop.batch_progress", {}).get("is_last_batch"):
        finished += 1
    return finished


def check_resumable(cfg: DictConfig, checkpoint: dict, path: Path | str) -> None:
    """Refuse a checkpoint that has used up the budget ``cfg`` (the config the resumed run trains with) gives it:
    resumed, it would train nothing, test and end as if it had trained.

    Args:
        cfg: the resumed run's config (:func:`resume_config`'s result); only its ``trainer`` limits are read.
        checkpoint: the checkpoint as :func:`rnnlm.checkpoint.read_checkpoint` reads it.
        path: the checkpoint's file, for the message.

    Raises:
        CheckpointError: ``trainer.max_steps`` or ``trainer.max_epochs`` is reached already; the message says how
            far the checkpoint is and what to raise.
    """
    as_it_is = "rnnlm-eval ckpt_path=... evaluates it as it is"
    step, max_steps = checkpoint.get("global_step"), cfg.trainer.max_steps
    if isinstance(step, int) and isinstance(max_steps, int) and 0 <= max_steps <= step:  # -1: no limit
        raise CheckpointError(f"{path} is at step {step}, so trainer.max_steps={max_steps} is reached already: "
                              f"raise trainer.max_steps to train on ({as_it_is})")
    max_epochs = cfg.trainer.max_epochs
    if max_epochs is None:  # as Lightning reads it: 1000 epochs, unless a step or time limit is set
        max_epochs = 1000 if max_steps == -1 and cfg.trainer.get("max_time") is None else -1
    epochs = epochs_trained(checkpoint)
    if isinstance(epochs, int) and isinstance(max_epochs, int) and 0 <= max_epochs <= epochs:  # -1: no limit
        raise CheckpointError(f"{path} has trained {epochs} epoch{'s' if epochs != 1 else ''} (step {step}), so "
                              f"trainer.max_epochs={max_epochs} is reached already: raise trainer.max_epochs to train "
                              f"on, e.g. trainer.max_epochs={epochs + 1} ({as_it_is})")


_DOTTED_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)+")  # group.key, as typed: model.hidden_size


def resume_command_line(argv: list[str]) -> list[str]:
    """The command line of a run that resumes ``ckpt_path=FILE``, with each typed setting that the checkpoint's run
    has but today's defaults lack written as ``++key=value``, so that Hydra accepts it.

    Hydra composes the default groups before the checkpoint is read: resuming an NT-ASGD run with
    ``optimizer.nonmono=3`` would be refused as "not a setting" of the default optimizer (AdamW), whose file has
    no ``nonmono``. With ``++`` the key is added to the composed config, and :func:`resume_config` then judges it
    against the checkpoint's own config as every other typed setting: applied where it may change, refused
    with the value it was trained with where it may not. A key that neither has stays as typed, for Hydra to
    refuse as misspelled; so does a key that today's defaults have.

    Flags, group choices (``model=gru``), ``+``/``~`` overrides, Hydra's own settings, another config
    (``--config-name``, ``--config-dir``), ``ckpt_path=last`` and a checkpoint that cannot be read (the checks
    report it) leave the command line as it is.
    """
    args = get_args_parser().parse_args(argv)
    if args.config_name not in (None, "train") or args.config_dir or args.config_path:
        return list(argv)
    ckpt = [o for o in args.overrides if o.startswith("ckpt_path=")]
    try:
        path = OverridesParser.create().parse_overrides(ckpt[-1:])[0].value() if ckpt else None
    except HydraException:
        return list(argv)
    if not isinstance(path, str) or path in ("", "last"):
        return list(argv)
    try:
        trained = _trained_config(Path(path).expanduser(), read_checkpoint(Path(path).expanduser(), mmap=True))
    except CheckpointError:
        return list(argv)
    if trained is None:
        return list(argv)
    candidates = [o for o in args.overrides if "=" in o and _DOTTED_KEY.fullmatch(key := o.partition("=")[0])
                  and not key.startswith("hydra.") and _has(trained, key)]
    if not candidates:
        return list(argv)
    try:  # what today's defaults give, with the groups chosen on the command line
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            today = compose("train", overrides=[o for o in args.overrides if o not in candidates])
    except Exception:  # a mistake elsewhere on the command line, which the checks report: add every key
        today = OmegaConf.create()
    added = {o for o in candidates if not _has(today, o.partition("=")[0])}
    return [f"++{arg}" if arg in added else arg for arg in argv]


def _has(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False) is not _ABSENT
