"""Training callbacks: throughput, text samples after validation, hyperparameters with the best metric."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from rnnlm.datamodule import IGNORE_INDEX
from rnnlm.sampling import generate
from rnnlm.vocab import loss_in_units


class TokensPerSecond(L.Callback):
    """Logs ``train/tokens_per_s`` (scored tokens over wall time, averaged over ``window`` steps) and
    ``train/tokens_seen`` (all tokens trained on so far, the x-axis of sweep reports).

    Wall time between batch ends counts everything a step costs (data, forward, backward, optimizer,
    logging); validation time is left out.
    """

    def __init__(self, window: int = 20):
        self.window = window
        self.rates: list[float] = []  # every logged rate, for the run summary
        self.seen = 0  # tokens trained on since the run began (all processes)
        self._tokens = 0
        self._steps = 0
        self._since: float | None = None

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state.get("seen", 0)

    def _restart(self) -> None:
        self._tokens, self._steps, self._since = 0, 0, time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._restart()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restart()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._since is None:
            self._restart()
            return
        _, targets = batch
        tokens = int((targets != IGNORE_INDEX).sum()) * trainer.world_size
        self._tokens += tokens
        self.seen += tokens
        pl_module.log("train/tokens_seen", float(self.seen), rank_zero_only=True)
        self._steps += 1
        if self._steps >= self.window:
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
        new = generate(pl_module.net, prompt, self.num_tokens, self.temperature, generator=generator)
        text = vocab.decode(self._prompt_ids[1:] + new[0].tolist())
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Markdown: indent four spaces so line breaks and spacing show as written.
                logger.experiment.add_text("samples", "    " + text.replace("\n", "\n    "), step)
        with open(Path(trainer.default_root_dir) / "samples.txt", "a", encoding="utf-8") as fh:
            fh.write(f"=== step {step}\n{text}\n\n")


class HparamsWithBest(L.Callback):
    """At the end of fitting, record the run's hyperparameters in every logger together with its best
    ``val/loss`` (and ``val/ppl`` or ``val/bpc``), so TensorBoard's HParams tab can compare runs."""

    def __init__(self, hparams: dict | None = None):
        self.hparams = hparams or {}

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        best = pl_module.best_val_loss.item()
        if not trainer.loggers or best == float("inf"):
            return
        unit, value = loss_in_units(best, pl_module.vocab.level)
        metrics = {"hp/val_loss_best": best, f"hp/val_{unit}_best": value}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # ties the metrics to the hparams in the HParams tab
                logger.log_hyperparams(self.hparams, metrics=metrics)
            else:
                logger.log_hyperparams(self.hparams)
                logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
