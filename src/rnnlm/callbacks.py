"""Training callbacks: checkpoints that survive interruptions, a resume that continues exactly, validation of
the final weights, throughput, a progress line per validation, text samples, the model's summary, the run's config
and hyperparameters in every checkpoint and logger."""

from __future__ import annotations

import datetime
import logging
import math
import shutil
import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, Timer
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from rnnlm.checkpoint import (
    NonFiniteError,
    restore_random_state,
    upgrade_checkpoint,
    write_checkpoint,
    write_random_state,
    write_run_config,
)
from rnnlm.files import write_atomically
from rnnlm.lightning_module import writes_logs
from rnnlm.loss import IGNORE_INDEX, loss_in_units
from rnnlm.sampling import generate_tokens

log = logging.getLogger(__name__)

DECIDE_EVERY_N_STEPS = 10  # distributed runs agree this often whether a signal or the clock asks to save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through :func:`rnnlm.checkpoint.write_checkpoint` (atomic, finite only), and
    its reader, which upgrades an older format."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        write_checkpoint(checkpoint, path)

    def load_checkpoint(self, path, *args, **kwargs) -> dict:
        """Lightning's reader, with an older format brought up to this one (:func:`upgrade_checkpoint`)."""
        return upgrade_checkpoint(super().load_checkpoint(path, *args, **kwargs))


class TrainingInterrupted(BaseException):  # noqa: N818 - not an Exception: a sweep must stop too, as on Ctrl-C
    """SIGINT or SIGTERM stopped training after ``last.ckpt`` was written; the message says how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class RunCheckpoints(ModelCheckpoint):
    """``best.ckpt`` on the monitored metric, as :class:`ModelCheckpoint` writes it, and a ``last.ckpt``
    that never waits for a validation.

    ``last.ckpt`` is written after every validation, every ``every_n_train_steps`` optimizer steps, every
    ``every_n_minutes`` of training, at the end, and when the process is asked to stop: on SIGINT
    (Ctrl-C) or SIGTERM (``kill``, SLURM) the current step finishes, ``last.ckpt`` is written and
    :class:`TrainingInterrupted` ends the run (with several processes, at the next step that is a multiple of
    ``DECIDE_EVERY_N_STEPS``); a second Ctrl-C stops at once. All of these saves are
    taken between steps, so a run resumed from any of them continues exactly.

    A run resumed into a new folder takes a copy of the old run's ``best.ckpt`` and its score, so its
    first validation does not overwrite a better model and testing uses the true best.
    """

    def __init__(self, dirpath: str, filename: str = "best", monitor: str | None = "val/loss", mode: str = "min",
                 save_top_k: int = 1, save_last: bool = True, every_n_train_steps: int | None = None,
                 every_n_minutes: float | None = 10.0, save_on_signal: bool = True, **kwargs):
        # Lightning's own step/time triggers wait for the monitored metric and its save_last skips
        # validations that did not improve it: last.ckpt is written here instead.
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, save_top_k=save_top_k,
                         save_last=False, enable_version_counter=False, **kwargs)
        self.write_last = save_last
        self.every_n_train_steps = every_n_train_steps
        self.every_n_seconds = every_n_minutes * 60 if every_n_minutes else None
        self.save_on_signal = save_on_signal
        self.stop_signal: int | None = None
        self._saved_at = time.monotonic()
        self._last_step_saved = -1
        self._in_validation_end = False
        self._replaced_handlers: dict[int, object] = {}
        self._state_key = super().state_key

    @property
    def state_key(self) -> str:
        # Lightning formats ModelCheckpoint's key from its settings at every hook call of every step; they are fixed
        return self._state_key

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def _save_last(self, trainer: L.Trainer) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if not self.write_last or not fitting or trainer.fast_dev_run:
            return
        trainer.save_checkpoint(self.last_path, weights_only=False)  # every process takes part; the first writes
        self._saved_at, self._last_step_saved = time.monotonic(), trainer.global_step

    # ---------------------------------------------------------------- stopping on a signal
    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.stop_signal = signum
        if rank_zero_only.rank == 0:
            log.warning("%s received: finishing this step, then saving %s and stopping (Ctrl-C again stops at "
                        "once, without saving)", signal.Signals(signum).name, self.last_path)

    def _restore_handlers(self) -> None:
        for signum, handler in self._replaced_handlers.items():
            signal.signal(signum, handler)
        self._replaced_handlers = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self._saved_at = time.monotonic()
        self.stop_signal = None
        # Installed after Lightning's own SIGTERM handler, which would stop in the middle of a validation.
        if self.save_on_signal and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._replaced_handlers[signum] = signal.signal(signum, self._on_signal)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()
        if self._last_step_saved != trainer.global_step:
            self._save_last(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)

    # ---------------------------------------------------------------- when to save
    def _time_due(self) -> bool:
        return self.every_n_seconds is not None and time.monotonic() - self._saved_at >= self.every_n_seconds

    def acts_after_step(self, trainer) -> bool:
        """Whether this callback may save after the step just taken: a training step that trains several chunks
        (``trainer.chunks_per_call``) ends there. With several processes, only steps count (every process must
        end its group at the same step): the clock and signals are agreed on every ``DECIDE_EVERY_N_STEPS``."""
        step = trainer.global_step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0:
            return True
        if trainer.world_size > 1:
            return step % DECIDE_EVERY_N_STEPS == 0
        return self._time_due() or self.stop_signal is not None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        by_steps = bool(self.every_n_train_steps) and step % self.every_n_train_steps == 0
        by_time = self._time_due()
        stop = self.stop_signal is not None
        if trainer.world_size > 1:  # clocks and signals differ between processes: any one decides for all,
            # every few steps, as agreeing makes every process wait for the slowest
            if step % DECIDE_EVERY_N_STEPS:
                by_time = stop = False  # decided at a later step (the signal and the clock stay as they are)
            else:
                flags = torch.tensor([by_time, stop], dtype=torch.float32, device=pl_module.device)
                by_time, stop = (trainer.strategy.reduce(flags, reduce_op="sum") > 0).tolist()
        if by_steps or by_time or stop:
            self._save_last(trainer)
        if stop:
            name = signal.Signals(self.stop_signal or signal.SIGTERM).name
            raise TrainingInterrupted(
                self.stop_signal or signal.SIGTERM,
                f"{name}: training stopped at step {step} and saved {self.last_path}; "
                f"resume with ckpt_path={self.last_path}",
            )

    def on_validation_end(self, trainer, pl_module) -> None:
        self._in_validation_end = True
        try:
            super().on_validation_end(trainer, pl_module)  # best.ckpt first: last.ckpt records its score
            self._save_last(trainer)
        finally:
            self._in_validation_end = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Lightning counts a step for its loggers after the validation that runs inside it, and a run
        # resumed from a checkpoint taken during that validation does not count it again: count it here,
        # so the resumed run logs at the right steps.
        if self._in_validation_end:
            checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] += 1

    # ---------------------------------------------------------------- resuming into a new folder
    def load_state_dict(self, state_dict: dict) -> None:
        old_dir, best = state_dict.get("dirpath"), state_dict.get("best_model_path")
        if old_dir and self.dirpath and Path(old_dir).resolve() != Path(self.dirpath).resolve():
            score = state_dict.get("best_k_models", {}).get(best, state_dict.get("best_model_score"))
            state_dict = dict(state_dict, dirpath=self.dirpath, last_model_path="", best_k_models={},
                              kth_best_model_path="", best_model_path="", best_model_score=None)
            if best and Path(best).is_file():
                kept = Path(self.dirpath) / Path(best).name
                if rank_zero_only.rank == 0:
                    _copy_atomically(Path(best), kept)
                state_dict.update(best_model_path=str(kept), kth_best_model_path=str(kept),
                                  best_k_models={str(kept): score}, best_model_score=score, kth_value=score)
            elif best:
                log.warning("the resumed run's best checkpoint %s is gone: its first validation starts anew", best)
        super().load_state_dict(state_dict)


def _copy_atomically(source: Path, dest: Path) -> None:
    def copy(out) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, out)

    write_atomically(dest, copy, size=source.stat().st_size, elsewhere="paths.log_dir=DIR")


class RandomStreams(L.Callback):
    """Every checkpoint keeps the random streams, and a resumed run continues them: it draws the dropout
    masks the uninterrupted run would have drawn, so it ends with the same weights."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        write_random_state(checkpoint)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        restore_random_state(checkpoint)


class ValidateFinalWeights(L.Callback):
    """Stop at ``trainer.max_steps`` through ``should_stop``: Lightning then validates, and so checkpoints,
    the final weights (when ``max_steps`` ends the loop itself, the steps since the last validation are
    neither validated nor saved as best)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class SaveRunConfig(L.Callback):
    """Puts the run's config (as composed, interpolations unresolved) in every checkpoint, so
    ``ckpt_path=...`` alone resumes a run with the settings it was trained with."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        write_run_config(checkpoint, self.config)


class ProgressLog(L.Callback):
    """One line in the log after each validation: step, validation metrics, training speed since the last
    line, elapsed time and the time left, so a run whose output goes to a file (``train.log``) shows its
    progress. The speed counts the tokens of :class:`TokensPerSecond` over training time only."""

    def __init__(self):
        self._started = self._training_since = time.monotonic()
        self._first_step, self._training_s, self._seen = 0, 0.0, 0.0
        self._counter: TokensPerSecond | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = self._training_since = time.monotonic()
        self._first_step = trainer.global_step
        self._counter = next((c for c in trainer.callbacks if isinstance(c, TokensPerSecond)), None)
        self._seen = float(self._counter.seen) if self._counter else 0.0  # a resumed run has counted some already

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._training_s += time.monotonic() - self._training_since

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        self._training_since = time.monotonic()
        if trainer.sanity_checking:
            return
        metrics, step, total = trainer.callback_metrics, trainer.global_step, trainer.estimated_stepping_batches
        elapsed = time.monotonic() - self._started
        done = step - self._first_step
        eta = elapsed / done * (total - step) if math.isfinite(total) and done > 0 and total > step else math.inf
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)  # trainer.max_time
        remaining = timer.time_remaining("train") if timer is not None else None
        # A run stopped by trainer.max_time first does not reach its step bound: showing that bound would mislead.
        time_bound = remaining is not None and max(remaining, 0.0) < eta
        if time_bound:
            eta = max(remaining, 0.0)
        parts = [f"step {step:,}" + (f"/{total:,}" if math.isfinite(total) and not time_bound else ""),
                 f"epoch {trainer.current_epoch}"]
        parts += [f"{k} {float(metrics[k]):.4f}" for k in ("val/loss", "val/ppl", "val/bpc") if k in metrics]
        seen = float(self._counter.seen) if self._counter else self._seen
        if seen > self._seen and self._training_s > 0:
            parts.append(f"{(seen - self._seen) / self._training_s:,.0f} tok/s")
        self._seen, self._training_s = seen, 0.0
        parts.append(f"elapsed {_duration(elapsed)}")
        if math.isfinite(eta):
            parts.append(f"ETA {_duration(eta)}" + (" (trainer.max_time)" if time_bound else ""))
        log.info(" | ".join(parts))


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, redrawn at most every ``refresh_s`` seconds while training or
    validating. Redrawn after every batch, as Lightning does, it costs 1-2 ms a step: as much as the
    whole step of a small model (char LSTM 1x64 on a 2-core CPU) and idle time for a GPU."""

    def __init__(self, refresh_s: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.refresh_s = refresh_s
        self._next_draw = {"train": 0.0, "val": 0.0}
        self._undrawn: tuple | None = None  # the last training batch not drawn yet

    def _due(self, bar: str, batch_idx: int, total: float | int) -> bool:
        now = time.monotonic()
        if now < self._next_draw[bar] and batch_idx + 1 != total:
            return False
        self._next_draw[bar] = now + self.refresh_s
        return True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # a call trains several chunks (trainer.chunks_per_call): the bar counts the last one
        last = batch_idx + len(outputs["chunks"]) - 1
        self._undrawn = (trainer, pl_module, outputs, batch, last)
        if self._due("train", batch_idx, self.total_train_batches):
            self._draw_undrawn()

    def _draw_undrawn(self) -> None:
        if self._undrawn is not None:
            undrawn, self._undrawn = self._undrawn, None
            super().on_train_batch_end(*undrawn)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if self._due("val", batch_idx, self.total_val_batches_current_dataloader):
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._draw_undrawn()  # the bar shows where training stands while validation runs
        super().on_validation_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._draw_undrawn()
        super().on_train_epoch_end(trainer, pl_module)


class ModelSummary(LightningModelSummary):
    """Before training, in the log (and so in ``train.log``): the parameters and their size, then the model's parts
    down to ``max_depth`` levels of nesting (0: the totals alone; -1: all), each with its parameters.

    Lightning's own summary also prints a FLOPs column, which counts nothing unless the module declares an example
    input (rnnlm's cannot: its input is a batch and the carried state), so every entry and the total read 0, and
    how many modules are in train and eval mode, which says nothing before training starts. Being a
    :class:`lightning.pytorch.callbacks.ModelSummary`, it stands in for Lightning's default summary.
    """

    def __init__(self, max_depth: int = 4):
        super().__init__(max_depth=max_depth)
        self.max_depth = max_depth

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        log.info("\n".join(summary_lines(pl_module, self.max_depth)))


def summary_lines(module: torch.nn.Module, max_depth: int) -> list[str]:
    """``Model: N parameters (M MB)`` and a line per part down to ``max_depth`` (-1: all): name, class, parameters."""
    parameters = list(module.parameters())
    size = sum(p.numel() * p.element_size() for p in parameters)
    lines = [f"Model: {sum(p.numel() for p in parameters):,} parameters ({size / 1e6:,.1f} MB)"]
    parts = [("  " * name.count(".") + name.rpartition(".")[2], part) for name, part in module.named_modules()
             if name and (max_depth < 0 or name.count(".") < max_depth)]  # indented by depth
    width = max((len(shown) for shown, _ in parts), default=0)
    kinds = max((len(type(part).__name__) for _, part in parts), default=0)
    for shown, part in parts:
        count = sum(p.numel() for p in part.parameters())
        lines.append(f"  {shown.ljust(width)}  {type(part).__name__.ljust(kinds)}  {count:>12,}")
    return lines


class TokensPerSecond(L.Callback):
    """Logs ``train/tokens_per_s`` (scored tokens over wall time, averaged over ``window`` steps or more: it is
    measured at the end of a call of the training step, which may train several chunks) and
    ``train/tokens_seen`` (all tokens trained on so far, the x-axis of sweep reports).

    Wall time between batch ends counts everything a step costs (data, forward, backward, optimizer,
    logging); validation time is left out. Stream chunks count all their targets; padded sentence batches
    are counted on the device and read back only when a value is logged, so the host never waits for the
    GPU on other steps.
    """

    def __init__(self, window: int = 20):
        self.window = window
        self.rates: list[float] = []  # every logged rate, for the run summary
        self.seen = 0  # tokens trained on since the run began (all processes), up to the last read
        self._world = 1
        self._pending = 0  # tokens of the steps since the last read (for sentences, a device tensor)
        self._tokens = 0
        self._steps = 0
        self._since: float | None = None
        self._stream = False

    def state_dict(self) -> dict:
        self._read()
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state.get("seen", 0)

    def _read(self) -> None:
        if torch.is_tensor(self._pending) or self._pending:  # a device tensor is read back here, and only here
            tokens = int(self._pending) * self._world
            self._tokens, self.seen, self._pending = self._tokens + tokens, self.seen + tokens, 0

    def _restart(self) -> None:
        self._read()
        self._tokens, self._steps, self._since = 0, 0, time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self._world = trainer.world_size
        self._stream = getattr(trainer.datamodule, "carries_state", False)
        self._restart()  # a run resumed mid-epoch gets no on_train_epoch_start

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._restart()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._read()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restart()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for _, targets in outputs["chunks"]:  # every chunk the call trained on (trainer.chunks_per_call)
            # Stream chunks score every target; padded sentences are counted on the device.
            self._pending = self._pending + (targets.numel() if self._stream else (targets != IGNORE_INDEX).sum())
        self._steps += len(outputs["chunks"])
        full = self._steps >= self.window
        if full or writes_logs(trainer):
            self._read()
            pl_module.log("train/tokens_seen", float(self.seen), rank_zero_only=True)
        if full:
            rate = self._tokens / (time.perf_counter() - self._since)
            self.rates.append(rate)
            pl_module.log("train/tokens_per_s", rate, prog_bar=True, rank_zero_only=True)
            self._restart()


class TextSamples(L.Callback):
    """After each validation, generate a short sample and log it (TensorBoard text, ``samples.txt``).
    Bidirectional models, which cannot generate, are skipped.

    The same seed every time, so samples at successive steps differ only through training.
    """

    def __init__(self, num_tokens: int = 200, temperature: float = 0.8, prompt: str | None = None, seed: int = 0):
        self.num_tokens = num_tokens
        self.temperature = temperature
        self.prompt = prompt
        self.seed = seed

    def on_fit_start(self, trainer, pl_module) -> None:
        self._prompt_ids = pl_module.vocab.encode_text(self.prompt or "")  # a bad prompt fails before training

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.num_tokens <= 0 or pl_module.net.bidirectional:  # it cannot generate
            return
        vocab = pl_module.vocab
        prompt = torch.tensor([self._prompt_ids], device=pl_module.device)
        generator = torch.Generator().manual_seed(self.seed)
        try:
            new = generate_tokens(pl_module.net, prompt, self.num_tokens, self.temperature, generator=generator)
        except RuntimeError as err:  # torch.multinomial's word for probabilities that are NaN or infinite
            if "probability tensor contains" not in str(err):
                raise
            raise NonFiniteError(
                f"the model's outputs overflow at step {trainer.global_step} (its weights grew too large): training "
                "stopped and the last good checkpoint was kept; lower optimizer.lr or set trainer.gradient_clip_val"
            ) from None
        text = vocab.decode(self._prompt_ids[1:] + new[0].tolist())
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Markdown: indent four spaces so line breaks and spacing show as written.
                logger.experiment.add_text("samples", "    " + text.replace("\n", "\n    "), step)
        samples = Path(trainer.default_root_dir) / "samples.txt"
        try:  # a log, appended to: a full disk costs these lines, not the run
            with open(samples, "a", encoding="utf-8") as fh:
                fh.write(f"=== step {step}\n{text}\n\n")
        except OSError as err:
            log.warning("cannot append the sample of step %d to %s (%s)", step, samples, err.strerror or err)


class HparamsWithBest(L.Callback):
    """At the end of fitting, record the run's hyperparameters in every logger together with its best
    ``val/loss`` (and ``val/bpc``, and ``val/ppl`` for word and bpe models), so TensorBoard's HParams tab can compare
    runs."""

    def __init__(self, hparams: dict | None = None):
        self.hparams = hparams or {}

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        best = pl_module.best_val_loss
        if not trainer.loggers or best == float("inf"):
            return
        unit, value = loss_in_units(best, pl_module.vocab.level)
        metrics = {"hp/val_loss_best": best, f"hp/val_{unit}_best": value}
        if unit != "bpc" and math.isfinite(pl_module.best_val_bpc):  # word and bpe: bits per character too
            metrics["hp/val_bpc_best"] = pl_module.best_val_bpc
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # ties the metrics to the hparams in the HParams tab
                logger.log_hyperparams(self.hparams, metrics=metrics)
            else:
                logger.log_hyperparams(self.hparams)
                logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
