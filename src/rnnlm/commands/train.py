"""Train a recurrent language model from the composed Hydra config (``rnnlm/conf/train.yaml``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from rnnlm.callbacks import (
    AtomicCheckpointIO,
    HparamsWithBest,
    RandomStreams,
    RunCheckpoints,
    SaveRunConfig,
    TokensPerSecond,
    TrainingInterrupted,
    ValidateFinalWeights,
)
from rnnlm.checkpoint import CheckpointError, checkpoint_vocab, read_checkpoint
from rnnlm.checks import check_model_memory, check_train_config
from rnnlm.commands.cli import CONF_DIR, exit_on_user_error, run_command
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
    """
    started = time.time()
    summary: dict = {"status": "running"}
    try:
        metrics = _fit(cfg, list(extra_callbacks), summary, overrides)
    except BaseException as err:
        status = "interrupted" if isinstance(err, (TrainingInterrupted, KeyboardInterrupt)) else "failed"
        summary.update(status=status, error=f"{type(err).__name__}: {err}".splitlines()[0][:500])
        raise
    else:
        summary.update(status="ok", metrics=metrics)
        return metrics
    finally:
        summary["wall_s"] = round(time.time() - started, 1)
        if rank_zero_only.rank == 0:
            write_json_atomically(Path(cfg.paths.output_dir) / SUMMARY_FILE, summary)


def write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


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

    callbacks = [instantiate(c) for c in cfg.callbacks.values()] + [HparamsWithBest(run_hparams(cfg))]
    callbacks += [RandomStreams(), ValidateFinalWeights()]  # how rnnlm trains, whatever callbacks the config lists
    callbacks += [SaveRunConfig(OmegaConf.to_container(_without_hydra(cfg), resolve=False)), *extra_callbacks]
    loggers = [instantiate(lg) for lg in cfg.logger.values()]
    trainer_args = {}
    if cfg.model.get("cuda_graph"):  # the graphed step clips inside its graph (Lightning clips only its own steps)
        model.gradient_clip_val, model.gradient_clip_algorithm = (cfg.trainer.gradient_clip_val,
                                                                  cfg.trainer.gradient_clip_algorithm)
        trainer_args["gradient_clip_val"] = None
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()],
                          **trainer_args)
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
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    shown = [k for k in sorted(metrics) if k.startswith(("val/", "test/")) and not k.endswith(("_best", "/tokens"))]
    log.info("Final: %s", " | ".join(f"{k} {metrics[k]:.4f}" for k in shown))
    log.info("Run folder: %s", cfg.paths.output_dir)
    return metrics


def _without_hydra(cfg: DictConfig) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


@exit_on_user_error
def _run(cfg: DictConfig) -> float | None:
    overrides = list(HydraConfig.get().overrides.task)
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return train(cfg, overrides=overrides).get(cfg.optimized_metric)
    try:  # in a sweep one failing job (a crash, a NaN, a bad combination) must not stop the others
        return train(cfg, overrides=overrides).get(cfg.optimized_metric)
    except Exception as err:  # recorded in the job's run_summary.json
        log.error("Job failed: %s: %s", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return float("nan")


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
