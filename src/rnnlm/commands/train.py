"""Train a recurrent language model from the composed Hydra config (``conf/train.yaml``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import difflib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from rnnlm.callbacks import (
    AtomicCheckpointIO,
    HparamsWithBest,
    ModelSummary,
    RandomStreams,
    RunCheckpoints,
    SaveRunConfig,
    TokensPerSecond,
    TrainingInterrupted,
    ValidateFinalWeights,
)
from rnnlm.checkpoint import CheckpointError, checkpoint_vocab, describe, read_checkpoint
from rnnlm.checks import check_model_memory, check_train_config
from rnnlm.commands.cli import CONF_DIR, exit_on_user_error, run_command
from rnnlm.errors import ConfigError, DiskFullError, UserError
from rnnlm.files import keep_logging_on_full_disk, remove_stale_temporaries, write_atomically
from rnnlm.loss import quoted_units
from rnnlm.ntasgd import NTASGD
from rnnlm.resume import resume_config
from rnnlm.vocab import Vocab

log = logging.getLogger(__name__)

SUMMARY_FILE = "run_summary.json"


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    Every step frees and re-allocates the same large buffers (the logits alone are batch x seq_len x
    vocab floats). By default glibc unmaps or trims them each time and the next step page-faults them
    back in: on a 2-core CPU that costs about a quarter of a word-level step. A process that preloads
    another allocator (tcmalloc, jemalloc) is left alone. Returns whether the setting was applied.
    """
    if platform.libc_ver()[0] != "glibc" or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def run_hparams(cfg: DictConfig) -> dict:
    """The settings worth comparing runs by, flattened for the loggers."""
    full = OmegaConf.to_container(cfg, resolve=True)
    plain = {k: full[k] for k in ("model", "data", "optimizer", "scheduler", "seed") if k in full}
    plain["trainer"] = {k: full["trainer"].get(k) for k in ("max_steps", "max_epochs", "gradient_clip_val")}
    for group in ("model", "optimizer", "scheduler"):
        if isinstance(plain.get(group), dict):
            plain[group].pop("_partial_", None)
    return plain


def train(cfg: DictConfig, extra_callbacks: list[L.Callback] = (),
          overrides: list[str] | None = None) -> dict[str, float]:
    """Fit (and optionally test) the model the config describes; return the final metrics.

    Whatever happens, the run folder gets ``run_summary.json``: status (``ok``, ``interrupted`` or
    ``failed`` with the error), parameter count, final metrics, tokens/s and wall time, which
    ``rnnlm-report`` reads. ``extra_callbacks`` join the configured ones (for programs that drive
    training, e.g. benchmarks). With ``cfg.ckpt_path``, ``overrides`` are the settings asked for on the
    command line (see :func:`rnnlm.resume.resume_config`).

    Raises:
        DiskFullError: no space left for a checkpoint or the summary (the message says if the summary was
            not written either).
    """
    started = time.time()
    summary: dict = {"status": "running"}
    try:
        metrics = _fit(cfg, list(extra_callbacks), summary, overrides)
    except BaseException as err:
        # Lightning's clean-up after a full disk may fail on it too (a logger's last write): report the first.
        failure = _disk_full_cause(err) or err
        status = "interrupted" if isinstance(failure, (TrainingInterrupted, KeyboardInterrupt)) else "failed"
        summary.update(status=status, error=f"{type(failure).__name__}: {failure}".splitlines()[0][:500])
        _write_summary(cfg, summary, started, failure)
        if failure is err:
            raise
        raise failure from err
    summary.update(status="ok", metrics=metrics)
    _write_summary(cfg, summary, started)
    return metrics


def _write_summary(cfg: DictConfig, summary: dict, started: float, failure: BaseException | None = None) -> None:
    """``run_summary.json``, written atomically by the first process. If it cannot be written after the run
    failed with a user error, the one line of that error says so too."""
    summary["wall_s"] = round(time.time() - started, 1)
    if rank_zero_only.rank != 0:
        return
    try:
        write_atomically(Path(cfg.paths.output_dir) / SUMMARY_FILE, json.dumps(summary, indent=1, default=str) + "\n",
                         elsewhere="paths.log_dir=DIR")
    except (DiskFullError, OSError) as err:
        if failure is None:
            raise
        reason = err if isinstance(err, DiskFullError) else err.strerror or err
        if isinstance(failure, UserError):
            message = f"{failure}; {SUMMARY_FILE} was not written either"
            if not isinstance(failure, DiskFullError):
                message += f" ({reason})"
            raise type(failure)(message) from failure
        log.error("%s was not written: %s", SUMMARY_FILE, reason)


def _disk_full_cause(err: BaseException) -> DiskFullError | None:
    """The :class:`DiskFullError` that ``err`` is, or that was being handled when ``err`` was raised."""
    for _ in range(10):
        if err is None or isinstance(err, DiskFullError):
            return err
        err = err.__context__
    return None


def remove_temporaries_of_killed_runs(cfg: DictConfig) -> None:
    """Remove what a process killed while writing left beside the files of this run: in its folder, its
    checkpoints' folder, the token cache, and the folder of the checkpoint it resumes."""
    run, cache = Path(cfg.paths.output_dir), Path(cfg.paths.cache_dir).expanduser()
    checkpoints = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    for folder in (run, run / "checkpoints", Path(checkpoints) if checkpoints else None, cache, cache / "recall"):
        if folder is not None:
            remove_stale_temporaries(folder)
    if cfg.ckpt_path:  # any folder the user keeps checkpoints in: only the temporaries of checkpoints
        remove_stale_temporaries(Path(cfg.ckpt_path).parent, names=["*.ckpt"])


def check_same_vocabulary(ckpt_path: str, vocab: Vocab) -> None:
    """The data of a resumed run must give the vocabulary it was trained on (its files may have changed)."""
    trained = checkpoint_vocab(read_checkpoint(ckpt_path, mmap=True))
    if trained.tokens != vocab.tokens:
        raise CheckpointError(
            f"{ckpt_path} was trained on a different vocabulary ({len(trained)} tokens, this data gives "
            f"{len(vocab)}): resume with the data of that run"
        )


def _fit(cfg: DictConfig, extra_callbacks: list[L.Callback], summary: dict,
         overrides: list[str] | None) -> dict[str, float]:
    check_train_config(cfg)
    if cfg.ckpt_path:
        cfg = resume_config(cfg, overrides)
    keep_logging_on_full_disk()  # train.log
    remove_temporaries_of_killed_runs(cfg)
    if cfg.seed is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.keep_freed_memory and keep_freed_memory():
        log.debug("glibc malloc keeps freed memory for reuse")

    # _convert_="all": plain lists and dicts, which checkpoints can hold and weights_only loading accepts.
    datamodule = instantiate(cfg.data, _convert_="all")
    vocab = datamodule.vocab  # tokenizes and caches on the first run
    check_model_memory(cfg, len(vocab))
    if cfg.ckpt_path:
        check_same_vocabulary(cfg.ckpt_path, vocab)
    # Built through a partial: Hydra would turn a dataclass argument (the vocabulary) into a config.
    model = instantiate(cfg.model, _partial_=True, _convert_="all")(
        vocab=vocab,
        carry_state=datamodule.carries_state and cfg.task == "lm",
        answer_accuracy=cfg.data.get("scored") == "last",
        nominal_seq_len=cfg.data.seq_len if cfg.data.get("variable_seq_len") else None,
        # how the steps run: the module runs them itself (Lightning's manual optimization)
        chunks_per_call=cfg.trainer.chunks_per_call,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        gradient_clip_algorithm=cfg.trainer.gradient_clip_algorithm,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,  # `scheduler=null` drops it
    )
    splits = datamodule.load().splits
    log.info(
        "%s | %s level, %s mode | vocab %d | tokens train %d valid %d test %d | %s %d params",
        datamodule.load().path.name, vocab.level, cfg.data.mode, len(vocab),
        len(splits["train"]), len(splits["valid"]), len(splits["test"]), cfg.model.cell, model.net.num_parameters(),
    )
    summary.update(params=model.net.num_parameters(), level=vocab.level, vocab_size=len(vocab))
    log.info("Run folder: %s", cfg.paths.output_dir)  # said first too: a resumed run writes a new one

    callbacks = [instantiate(c) for c in cfg.callbacks.values()] + [HparamsWithBest(run_hparams(cfg))]
    callbacks += [RandomStreams(), ValidateFinalWeights()]  # how rnnlm trains, whatever callbacks the config lists
    callbacks += [SaveRunConfig(OmegaConf.to_container(_without_hydra(cfg), resolve=False)), *extra_callbacks]
    if cfg.trainer.enable_model_summary and not any(isinstance(c, LightningModelSummary) for c in callbacks):
        callbacks.append(ModelSummary())  # ~callbacks.model_summary alone: rnnlm's summary, not Lightning's default
    loggers = [instantiate(lg) for lg in cfg.logger.values()]
    trainer = instantiate(lightning_trainer(cfg.trainer), callbacks=callbacks, logger=loggers,
                          plugins=[AtomicCheckpointIO()])
    if trainer.is_global_zero:
        log.info("Training on %s", devices_in_use(trainer))
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    run_checkpoints = next((c for c in callbacks if isinstance(c, RunCheckpoints)), None)
    if run_checkpoints is not None and run_checkpoints.stop_signal is not None:  # it came during the last validation
        raise TrainingInterrupted(run_checkpoints.stop_signal, f"training ended at step {trainer.global_step} and "
                                  f"saved {run_checkpoints.last_path}; the test was skipped")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    speed = [c for c in callbacks if isinstance(c, TokensPerSecond) and c.rates]
    summary["tokens_per_s"] = round(statistics.median(speed[0].rates), 1) if speed else None
    if cfg.test:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if trainer.is_global_zero:
            log.info("Testing %s", tested_weights(best, trainer.checkpoint_callback))
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        # which protocol the test numbers used: the stream columns (all processes) or lines per batch, as eval's
        # batch_size (data.test_batch_size=1 reads the test split as one stream, as AWD-LSTM's reference does)
        metrics["test/batch_size"] = float(datamodule.rows("test") * (trainer.world_size if datamodule.carries_state
                                                                      else 1))
    shown = [k for k in sorted(metrics) if k.startswith(("val/", "test/"))
             and not k.endswith(("_best", "/tokens", "/batch_size"))]
    columns = f" (test read as {metrics['test/batch_size']:.0f} column(s))" if "test/batch_size" in metrics else ""
    log.info("Final: %s%s", " | ".join(f"{k} {metrics[k]:.4f}" for k in shown), columns)
    log.info("Run folder: %s", cfg.paths.output_dir)
    return metrics


def devices_in_use(trainer: L.Trainer) -> str:
    """``1 cpu device, precision 32-true`` (or ``4 cuda devices on 2 nodes, strategy ddp, ...``): what Lightning's
    "GPU available: ..., used: ..." lines would say, in one line."""
    kind = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    count = trainer.num_devices * trainer.num_nodes
    where = f"{count} {kind} device{'s' if count > 1 else ''}"
    if trainer.num_nodes > 1:
        where += f" on {trainer.num_nodes} nodes"
    if trainer.world_size > 1:
        where += f", strategy {type(trainer.strategy).__name__.removesuffix('Strategy').lower()}"
    return f"{where}, precision {trainer.precision}"


def tested_weights(best: str, checkpoints: ModelCheckpoint | None) -> str:
    """Which weights the test reads, for the log: the best checkpoint, with its step and score, or the final ones."""
    if not best:
        return "the final weights (no best checkpoint was written)"
    score = checkpoints.best_model_score
    scored = f", {checkpoints.monitor} {float(score):.4f}" if score is not None and checkpoints.monitor else ""
    return f"the best checkpoint, {describe(Path(best), read_checkpoint(best, mmap=True))}{scored}"


# trainer.* settings that the module applies itself (its steps are manual, which Lightning refuses them with)
MODULE_TRAINER_SETTINGS = ("chunks_per_call", "gradient_clip_val", "accumulate_grad_batches")


def lightning_trainer(trainer: DictConfig) -> DictConfig:
    """The ``trainer`` group as Lightning's ``Trainer`` takes it: without what the module applies itself, and
    without Lightning's default model summary: the summary is a callback (``callbacks.model_summary``, or rnnlm's
    own when that is removed), and with ``enable_model_summary=True`` Lightning would say, on every run, that it
    skips its default because there is one."""
    trainer = trainer.copy()
    with open_dict(trainer):
        for key in MODULE_TRAINER_SETTINGS:
            trainer.pop(key, None)
        trainer.enable_model_summary = False
        if isinstance(trainer.get("max_time"), DictConfig):  # Lightning reads a dict, but takes a DictConfig for a
            # timedelta: give it the same duration as DD:HH:MM:SS
            seconds = round(timedelta(**trainer.max_time).total_seconds())
            trainer.max_time = f"{seconds // 86400:02d}:{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:" \
                               f"{seconds % 60:02d}"
    return trainer


def _without_hydra(cfg: DictConfig) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def returned_metrics(cfg: DictConfig) -> list[str]:
    """The metrics a training run with ``cfg`` returns (what :func:`train` returns: the module's and the callbacks'
    logged values, ``trainer.callback_metrics``), which ``optimized_metric`` may name.

    ``val/*`` unless validation is off (``trainer.limit_val_batches=0``), ``test/*`` with ``test=true``; bits per
    character for every level, and perplexity (per token) for words and bpe; ``*/answer_acc`` with ``data.scored=last``.
    """
    names = ["train/loss", "train/grad_norm", "train/lr"]
    if any(_builds(c, TokensPerSecond) for c in cfg.callbacks.values()):
        names += ["train/tokens_seen", "train/tokens_per_s"]
    validates = cfg.trainer.limit_val_batches != 0
    stages = (["val"] if validates else []) + (["test"] if cfg.test else [])
    units = quoted_units(cfg.data.level)
    for stage in stages:
        names += [f"{stage}/loss", *(f"{stage}/{unit}" for unit in units), f"{stage}/tokens"]
        names += [f"{stage}/answer_acc"] if cfg.data.get("scored") == "last" else []
    names += ["test/batch_size"] if cfg.test else []  # the columns the test split was read as
    if validates:
        names.append("val/loss_best")
        names += ["train/averaging"] if _builds(cfg.optimizer, NTASGD) else []
    return names


def _builds(node, cls: type) -> bool:
    return isinstance(node, DictConfig) and node.get("_target_") == f"{cls.__module__}.{cls.__qualname__}"


def check_optimized_metric(cfg: DictConfig) -> None:
    """Refuse an ``optimized_metric`` that a run with ``cfg`` does not return (a misspelling, ``val/ppl`` of a
    character model, ``test/*`` with ``test=false``): an optimizing sweeper (``hparams_search=optuna``) would get
    nothing from every trial.

    Raises:
        ConfigError: the message lists the metrics the run returns.
    """
    names = returned_metrics(cfg)
    if cfg.optimized_metric not in names:
        close = difflib.get_close_matches(str(cfg.optimized_metric), names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"optimized_metric={cfg.optimized_metric} is not a metric this run returns{hint}: use one "
                          f"of {', '.join(names)}")


def failed_job_value() -> float:
    """What a failed job of a sweep returns: the worst value for the sweeper's direction (+inf when it minimizes,
    -inf when it maximizes). Optuna records it as the trial's value and steers away from it; the basic sweeper
    ignores it. NaN would end an Optuna search: optuna 2 refuses a NaN, and the sweeper's recovery from that
    fails in turn (two chained tracebacks)."""
    direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction", default=None)
    return -math.inf if "max" in str(direction).lower() else math.inf


@exit_on_user_error
def _run(cfg: DictConfig) -> float | None:
    overrides = list(HydraConfig.get().overrides.task)
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return train(cfg, overrides=overrides).get(cfg.optimized_metric)
    try:  # in a sweep one failing job (a crash, a NaN, a bad combination) must not stop the others
        metrics = train(cfg, overrides=overrides)
    except Exception as err:  # recorded in the job's run_summary.json
        log.error("Job failed: %s: %s", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return failed_job_value()
    if cfg.optimized_metric not in metrics:  # e.g. no validation ran within the budget
        log.error("Job returned no %s (it logged %s)", cfg.optimized_metric, ", ".join(sorted(metrics)) or "nothing")
        return failed_job_value()
    return metrics[cfg.optimized_metric]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        return _run(cfg)
    except TrainingInterrupted as stop:  # a sweep stops too
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)  # as the shell reports a process ended by that signal


def main() -> None:
    """Console entry point: ``rnnlm-train [overrides]``."""
    run_command(_hydra_main, "train")


if __name__ == "__main__":
    main()
