"""``RecurrentLM``: the LightningModule that trains a :class:`LanguageModel` with truncated BPTT."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor

from rnnlm.checkpoint import (
    LEGACY_BEST_KEY,
    LoadedModel,
    NonFiniteError,
    ResumeSection,
    read_resume_section,
    read_sgd_iterate,
    write_averaged_weights,
    write_model_section,
    write_resume_section,
)
from rnnlm.cuda_graph import GraphedStep
from rnnlm.loss import IGNORE_INDEX, CharacterCount, bits_per_character, loss_in_units
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.ntasgd import find_ntasgd
from rnnlm.regularization import activation_penalty
from rnnlm.state import State, batch_rows, detach_state, map_state
from rnnlm.vocab import Vocab

log = logging.getLogger(__name__)


def writes_logs(trainer: L.Trainer | None, steps_ahead: int = 0) -> bool:
    """Whether Lightning writes the logged metrics at this point of training: every ``log_every_n_steps``, and at
    the last step (``trainer.max_steps``, counted ``steps_ahead`` of ``global_step``). The values are computed,
    and the host waits for them, only then: per step, each ``self.log`` call costs more than a small model's whole
    step."""
    connector = getattr(trainer, "_logger_connector", None)  # Lightning's own rule, not a copy of it
    if connector is None:
        return True
    # Lightning writes at the last step too (through should_stop, which is set after the step's hooks have run)
    return connector.should_update_logs or 0 < trainer.max_steps <= trainer.global_step + steps_ahead


# torch's single-kernel updates: without one, a CPU runs these optimizers as a Python loop over the parameters
# (0.4-0.7 ms a step for a small LSTM, against 0.1 fused)
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
FUSED_DEVICES = ("cpu", "cuda")


def fused_update(factory: Callable, parameters: Iterable[Tensor]) -> dict:
    """``{"fused": True}`` for an optimizer that has a fused update on the parameters' devices, unless the config
    chose an implementation itself (``+optimizer.fused=false``, ``+optimizer.foreach=true``)."""
    chosen = getattr(factory, "keywords", {})
    if (getattr(factory, "func", None) in FUSED_OPTIMIZERS and not {"fused", "foreach"} & chosen.keys()
            and all(p.device.type in FUSED_DEVICES for p in parameters)):
        return {"fused": True}
    return {}


class RecurrentLM(L.LightningModule):
    """Owns the loss, the metrics, the optimizer and the hidden state carried between stream chunks.

    Args:
        vocab: the data's vocabulary; its size sizes the embedding and decoder.
        carry_state: stream batches continue each other: start each chunk from the previous chunk's
            final state, detached (truncated BPTT), and restart from zeros at every epoch. A bidirectional
            model reads every chunk on its own.
        compile: run the recurrent stacks through ``torch.compile`` (worth it for ``impl=scratch``;
            the first step compiles, which takes tens of seconds).
        cuda_graph: record each chunk's forward, backward and clipping as a CUDA graph and replay it
            (:mod:`rnnlm.cuda_graph`).
        optimizer: ``params -> Optimizer`` (a Hydra partial).
        scheduler: ``optimizer -> LRScheduler`` (a Hydra partial), stepped per epoch on ``val/loss``.
        answer_accuracy: also log ``val/answer_acc`` and ``test/answer_acc``, the share of scored targets the
            model ranks first (with ``data.scored=last``: the answers of ``data=recall``).
        activation_reg: AR (AWD-LSTM's ``alpha``): adds ``activation_reg * mean(o**2)`` of the top layer's outputs
            o after dropout to the training objective.
        temporal_activation_reg: TAR (AWD-LSTM's ``beta``): adds ``temporal_activation_reg * mean((h_t -
            h_{t-1})**2)`` of the top layer's outputs before dropout. ``train/loss`` stays the cross-entropy.
        nominal_seq_len: variable-length BPTT (``data.variable_seq_len``): each step's learning rate is scaled
            by its chunk's length over this one, so that short chunks do not weigh as much as long ones
            (AWD-LSTM). ``None``: every step takes the configured rate.
        chunks_per_call: ``trainer.chunks_per_call``: the most training chunks one ``training_step`` trains on, each
            with its own forward, backward, clipping and optimizer step (see :meth:`training_step`).
        gradient_clip_val / gradient_clip_algorithm: ``trainer.*``; the module clips (Lightning clips only the steps
            of its automatic optimization).
        accumulate_grad_batches: ``trainer.accumulate_grad_batches``: an optimizer step every this many chunks, on
            the sum of their gradients (each chunk's loss divided by it), as Lightning's automatic optimization
            accumulates.
        network: the fields of :class:`~rnnlm.network.NetworkConfig` but ``vocab_size`` (``model.*``).

    Training steps are manual (Lightning's manual optimization), through Lightning's optimizer wrapper and
    backward: precision plugins, DDP's gradient averaging, the hooks and ``trainer.global_step`` see every
    optimizer step.
    """

    def __init__(self, vocab: Vocab, carry_state: bool = True, compile: bool = False, cuda_graph: bool = False,
                 optimizer: Callable | None = None, scheduler: Callable | None = None, answer_accuracy: bool = False,
                 activation_reg: float = 0.0, temporal_activation_reg: float = 0.0, nominal_seq_len: int | None = None,
                 chunks_per_call: int = 1, gradient_clip_val: float | None = None,
                 gradient_clip_algorithm: str = "norm", accumulate_grad_batches: int = 1, **network):
        super().__init__()
        self.vocab = vocab
        self.net = LanguageModel(NetworkConfig.from_settings(network, vocab_size=len(vocab)))
        if compile:  # torch.compile in place: the state dict keeps its names; the first step pays for compiling
            for stack in (self.net.backbone, self.net.backward_backbone):
                if stack is not None:
                    stack.compile()
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=2e-3))
        self.scheduler_factory = scheduler
        self.carry_state = carry_state
        self._state: dict[str, State | None] = {"train": None, "val": None, "test": None}
        self.answer_accuracy = answer_accuracy
        self._correct: Tensor | None = None  # the last evaluation step's answers ranked first
        self.activation_reg, self.temporal_activation_reg = activation_reg, temporal_activation_reg
        self._penalty: Tensor | None = None  # the last training step's AR + TAR
        self.nominal_seq_len = nominal_seq_len
        self._lr_scale = 1.0  # during an optimizer step: its chunk's length over nominal_seq_len
        self._averages_in = False  # NT-ASGD's averaged weights are in the parameters (during validation)
        self._eval_sums = torch.zeros(4, dtype=torch.float64)  # summed loss (nats), scored tokens, ranked first, chars
        self._characters: CharacterCount | None = None  # the characters the scored targets stand for (bpc)
        self.best_val_loss = math.inf  # saved with the resume state, so a resumed run remembers it
        self.best_val_bpc = math.inf  # the val/bpc of the best val/loss (not saved: a resumed run finds it anew)
        self._bpc = math.nan  # the last evaluation's bits per character
        self._first_bad_step = torch.tensor(-1)  # the first training step whose loss was not finite
        self._device_step = torch.tensor(0)  # chunks trained (see on_train_start)
        self._new_lr = False
        self.automatic_optimization = False
        self.chunks_per_call = chunks_per_call
        self.gradient_clip_val, self.gradient_clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        self.accumulate_grad_batches = accumulate_grad_batches
        self.cuda_graph = cuda_graph
        self._graphed: GraphedStep | None = None
        self._grad_norm: Tensor | None = None  # the graphed step's, before clipping
        self._logging = False  # this optimizer step's metrics are written
        self._stepped = True  # the last chunk ended with an optimizer step (not accumulating)
        self._acts_after_step: list[Callable[[L.Trainer], bool]] = []  # the callbacks' (see _group_ends)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> RecurrentLM:
        """The training module around a checkpoint's network, in eval mode, for evaluating with a Trainer."""
        network = {k: v for k, v in loaded.info["network"].items() if k != "vocab_size"}
        module = cls(loaded.vocab, carry_state=loaded.info["carry_state"],
                     answer_accuracy=loaded.data.get("scored") == "last", **network)
        module.load_state_dict({k: v for k, v in loaded.state_dict.items() if k != LEGACY_BEST_KEY})
        return module.eval()

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        return self.net(tokens, state)

    def _forward_loss(self, inputs: Tensor, targets: Tensor, state: State | None, correct: list | None = None,
                      penalty: list | None = None) -> tuple[Tensor, Tensor, State | None]:
        """Summed loss, scored tokens and the final state of one chunk; targets[:, t] follows inputs[:, t].
        ``correct``: a list to append how many scored targets the model ranked first; ``penalty``: a list to
        append the activation regularization (AR + TAR) to."""
        if self.net.bidirectional:  # each target predicted from both sides of it
            # Row b of the window is inputs[b, 0] then the targets: T+1 tokens, so the targets' right
            # neighbours are in view. Window position 0 was the previous chunk's last target (or a row's
            # first token, never a target): scoring only positions 1..T counts every token once.
            window = torch.cat([inputs[:, :1], targets], 1)  # (B, T+1)
            features, _, outputs, dropped = self.net.features_and_outputs(window)
            features, outputs, dropped, state = features[:, 1:], outputs[:, 1:], dropped[:, 1:], None
        else:
            features, state, outputs, dropped = self.net.features_and_outputs(inputs, state)  # (B, T, D)
        if penalty is not None:
            penalty.append(activation_penalty(outputs, dropped, targets != IGNORE_INDEX, self.activation_reg,
                                              self.temporal_activation_reg))
        if correct is not None:
            scored = targets != IGNORE_INDEX
            correct.append((self.net.logits(features[scored]).argmax(-1) == targets[scored]).sum())
        return *self.net.summed_loss(features, targets), state

    def _carried(self, stage: str, rows: int) -> State | None:
        state = self._state[stage] if self.carry_state else None
        return None if state is None or batch_rows(state) != rows else state

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        inputs, targets = batch  # (B, T) each
        correct = [] if self.answer_accuracy and stage != "train" else None
        penalty = [] if stage == "train" and self._regularizes_activations else None
        total, count, state = self._forward_loss(inputs, targets, self._carried(stage, inputs.size(0)), correct,
                                                 penalty)
        self._correct = correct[0] if correct else None
        self._penalty = penalty[0] if penalty else None
        if self.carry_state:
            self._state[stage] = detach_state(state)
        return total, count

    @property
    def _regularizes_activations(self) -> bool:
        return bool(self.activation_reg or self.temporal_activation_reg)

    # ---------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        if stage == "fit":
            # Lightning refuses accumulation with manual optimization (checked before this hook); the module
            # accumulates itself, and with the setting back, Lightning counts steps and logs as it does when it
            # accumulates (its own SWA callback changes the setting during training too).
            self.trainer.accumulate_grad_batches = self.accumulate_grad_batches

    def on_train_start(self) -> None:
        self._acts_after_step = [c.acts_after_step for c in self.trainer.callbacks if hasattr(c, "acts_after_step")]
        # chunks trained, counted on the device from the (restored) global step: making the number there each
        # step would wait for the device
        self._device_step = torch.tensor(self.global_step, device=self.device)
        self._first_bad_step = self._first_bad_step.to(self.device)
        # Restored (on_load_checkpoint) before Lightning moved the module, and in the saving run's dtype.
        dtype = self.net.dtype
        self._state["train"] = map_state(self._state["train"], lambda s: s.to(self.device, dtype))
        # The restored optimizer state holds the learning rate the run had reached; a resume that asks
        # for another one (e.g. lower, after a divergence) gets it.
        if self._new_lr and self._configured_lr() is not None:
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self._configured_lr()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict:
        """Trains on ``batch`` and on the chunks that follow it, up to ``chunks_per_call`` in all, each with its own
        forward, backward, clipping and optimizer step: Lightning's costs of a call (its loop, hooks and logging:
        more than a small model's step on a CPU) are paid once for all of them.

        The group ends early after a step that Lightning or a callback acts on (:meth:`_group_ends`): a validation,
        written metrics, a checkpoint, the end of the epoch or of ``max_steps``. So they see the step, its weights
        and its position as they would with one chunk per call, and every setting counted in steps keeps its
        meaning. Lightning's counters advance by one per chunk, so a checkpoint records the exact chunk to resume
        from. Callbacks' batch hooks run once per call; ``outputs["chunks"]`` holds the chunks trained on.

        Returns:
            ``losses``: each chunk's mean cross-entropy, (n,); ``chunks``: the n ``(inputs, targets)`` trained on.
        """
        chunks, losses, objectives = [batch], [], []
        while True:
            loss, objective = self._train_chunk(chunks[-1])
            losses.append(loss)
            objectives.append(objective)
            # a group ends at an optimizer step, unless something acts on the chunk before it (a validation)
            if (len(chunks) >= self.chunks_per_call and self._stepped) or self._group_ends():
                break
            chunks.append(self._next_chunk())
        self._check_finite(torch.stack(objectives))
        if self._logging:
            self._raise_if_diverged()
        return {"losses": torch.stack(losses), "chunks": chunks}

    def _train_chunk(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """One chunk: forward, backward, and unless accumulating, clipping and the optimizer step -> its loss and
        the objective differentiated (with AR and TAR), detached."""
        loop = self.trainer.fit_loop.epoch_loop
        if loop.batch_idx == 0:  # a new pass over the stream starts from zeros (a resumed one from its checkpoint)
            self._state["train"] = None
        self._stepped = not loop._should_accumulate()  # Lightning's rule: every N chunks, and at the epoch's end
        optimizer = self.optimizers()
        if self.cuda_graph:  # forward, backward and clipping in one replay (cuda_graph refuses accumulation)
            loss, objective = self._graphed_step(batch)
        else:
            total, count = self._step(batch, "train")
            loss = total / count
            objective = loss if self._penalty is None else loss + self._penalty
            if loop.batch_idx % self.accumulate_grad_batches == 0:  # the first chunk of a step, as Lightning zeroes
                optimizer.zero_grad()
            strategy = self.trainer.strategy
            # DDP averages the gradients once, at the chunk that steps
            accumulating = not self._stepped and isinstance(strategy, ParallelStrategy)
            with strategy.block_backward_sync() if accumulating else contextlib.nullcontext():
                self.manual_backward(objective / self.accumulate_grad_batches)
        # as Lightning's automatic optimization, metrics are written at steps, not at the chunks they accumulate
        self._logging = self._stepped and writes_logs(self._trainer, steps_ahead=1)
        if self._stepped:
            self._optimizer_step(optimizer, batch[0].size(1))
            if loop._num_ready_batches_reached():  # the epoch's last chunk: Lightning steps these schedulers here
                self._step_schedulers(plateau=False)
        if self._logging:
            self.log("train/loss", loss.clone(), prog_bar=True)  # a graph's output is overwritten by the next step
        return loss.detach(), objective.detach()

    def _check_finite(self, objectives: Tensor) -> None:
        """Records the first of the call's chunks whose objective is not finite: on the device, once per call, as
        reading the losses back would make the host wait for the GPU. It is read back when metrics are written,
        before a validation and before a checkpoint (:meth:`_raise_if_diverged`)."""
        bad = ~torch.isfinite(objectives)
        first = self._device_step + 1 + bad.int().argmax()
        self._first_bad_step = torch.where(bad.any() & (self._first_bad_step < 0), first, self._first_bad_step)
        self._device_step += objectives.numel()

    def _optimizer_step(self, optimizer, chunk_len: int) -> None:
        """The optimizer step through Lightning's wrapper (precision, hooks, step count). Variable-length BPTT
        scales the rate by the chunk's length over the nominal one, for this step alone: schedulers and
        checkpoints see the configured rate."""
        if not self.nominal_seq_len:
            optimizer.step()
            return
        self._lr_scale = chunk_len / self.nominal_seq_len
        configured = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] *= self._lr_scale
        try:
            optimizer.step()
        finally:
            for group, lr in zip(optimizer.param_groups, configured, strict=True):
                group["lr"] = lr
            self._lr_scale = 1.0

    def _group_ends(self) -> bool:
        """Whether Lightning or a callback acts after the step just taken: the end of the epoch or of
        ``max_steps``, a stop, written metrics, a validation, or a callback's ``acts_after_step(trainer)`` (a
        checkpoint). Every process of a DDP run decides the same, from counts alone."""
        trainer = self.trainer
        loop = trainer.fit_loop.epoch_loop
        return (loop._is_training_done or trainer.should_stop or self._logging
                or loop._should_check_val_fx(trainer.fit_loop._data_fetcher)  # Lightning's own rules
                or any(acts(trainer) for acts in self._acts_after_step))

    def _next_chunk(self) -> tuple[Tensor, Tensor]:
        """The next chunk from Lightning's fetcher, moved to the device as Lightning moves a batch. Lightning's
        counters advance as between two calls (the chunk just trained processed and completed, the next one
        ready and started), so every count of batches (validation intervals, epochs, logging, resuming) counts
        chunks as with one chunk per call."""
        trainer = self.trainer
        loop = trainer.fit_loop.epoch_loop
        progress = loop.batch_progress
        progress.increment_processed()
        progress.increment_completed()
        if self._stepped:  # as Lightning counts the batches that stepped, the x-axis of logged metrics
            loop._batches_that_stepped += 1
        fetcher = trainer.fit_loop._data_fetcher
        batch, _, _ = next(fetcher)
        progress.is_last_batch = fetcher.done
        batch = trainer.precision_plugin.convert_input(batch)
        batch = self._on_before_batch_transfer(batch, dataloader_idx=0)
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        progress.increment_ready()
        progress.increment_started()
        return batch

    def _graphed_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Forward, backward and clipping from the CUDA graph (eagerly for other shapes) -> the mean cross-entropy
        and the objective (with AR and TAR), both the graph's outputs."""
        inputs, targets = batch
        if self._graphed is None:
            def objective_and_loss(inputs: Tensor, targets: Tensor, state: State | None
                                   ) -> tuple[Tensor, Tensor, State | None]:
                penalty = [] if self._regularizes_activations else None
                total, count, final = self._forward_loss(inputs, targets, state, penalty=penalty)
                loss = total / count
                return (loss + penalty[0] if penalty else loss), loss, final

            self._graphed = GraphedStep(objective_and_loss, [p for p in self.parameters() if p.requires_grad],
                                        self.gradient_clip_val, self.gradient_clip_algorithm)
        loss, objective, self._grad_norm, state = self._graphed(inputs, targets, self._carried("train", inputs.size(0)))
        if self.carry_state:
            self._state["train"] = state
        return loss, objective

    def _raise_if_diverged(self) -> None:
        bad_step = int(self._first_bad_step)
        if bad_step >= 0:
            raise NonFiniteError(
                f"the training loss became NaN or infinite at step {bad_step}: training stopped and the last good "
                "checkpoint was kept; lower optimizer.lr or set trainer.gradient_clip_val"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After the gradients are unscaled (16-mixed): log their norm, then clip them, as Lightning's automatic
        optimization does."""
        if self._logging:  # computed only for the steps whose metrics are written
            # Before clipping, so the curve shows what the clipping threshold is compared against.
            if self._grad_norm is not None:  # the graphed step clipped already and kept the norm
                self.log("train/grad_norm", self._grad_norm.clone())
            elif grads := [p.grad for p in self.parameters() if p.grad is not None]:
                self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
            self.log("train/lr", optimizer.param_groups[0]["lr"] / self._lr_scale)  # the configured rate
        if not self.cuda_graph:
            self.clip_gradients(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    def on_train_end(self) -> None:
        self._raise_if_diverged()

    def on_train_epoch_end(self) -> None:
        self._step_schedulers(plateau=True)

    def _step_schedulers(self, plateau: bool) -> None:
        """Lightning steps no scheduler of manual optimization: they are stepped where its automatic optimization
        steps them, once per epoch: a plateau scheduler after the epoch's validation, on ``val/loss`` (not while
        there is none), any other after the epoch's last step."""
        scheduler = self.lr_schedulers()
        if scheduler is None or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) != plateau:
            return
        if not plateau:
            scheduler.step()
        elif (metric := self.trainer.callback_metrics.get("val/loss")) is not None:
            scheduler.step(metric)

    def on_validation_epoch_start(self) -> None:
        self._raise_if_diverged()  # never validate, and so checkpoint, weights that diverged
        self._eval_start("val")
        self._swap_averages(into_parameters=True)

    def _swap_averages(self, into_parameters: bool) -> None:
        """NT-ASGD: validate the averaged weights (the parameters get them back after validation)."""
        ntasgd = find_ntasgd(self.trainer.optimizers) if self._trainer is not None else None
        if ntasgd is not None and self._averages_in != into_parameters:
            ntasgd.swap()
            self._averages_in = into_parameters

    # ---------------------------------------------------------------- evaluation
    def _eval_start(self, stage: str) -> None:
        self._state[stage] = None
        self._eval_sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        # a word model's <unk> counts the characters of the split's own unknown words (the data module knows them)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        unknown = getattr(datamodule, "unknown_chars", None)
        split = "valid" if stage == "val" else stage
        self._characters = CharacterCount(self.vocab, unknown(split) if unknown else None)

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        total, count = self._step(batch, stage)
        right = self._correct.double() if self._correct is not None else total.new_zeros((), dtype=torch.float64)
        self._eval_sums += torch.stack([total.double(), count.double(), right, self._characters(*batch)])

    def _eval_end(self, stage: str) -> float:
        """Token-weighted mean loss over the whole split, summed across processes; bits per character (every level)
        and perplexity (word and bpe: per token) from the same sums."""
        total, count, right, chars = self.trainer.strategy.reduce(self._eval_sums, reduce_op="sum").tolist()
        loss = total / max(count, 1.0)
        # Every process now holds the same value; sync_dist only averages equal numbers (and keeps
        # Lightning from warning about unsynchronised epoch metrics).
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/tokens", count, sync_dist=True)
        if self.vocab.level != "char":
            unit, value = loss_in_units(loss, self.vocab.level)
            self.log(f"{stage}/{unit}", value, sync_dist=True)
        # for chars, `chars` is `count`, and this is the mean loss in bits
        self._bpc = bits_per_character(total, chars)
        self.log(f"{stage}/bpc", self._bpc, sync_dist=True)
        if self.answer_accuracy:
            self.log(f"{stage}/answer_acc", right / max(count, 1.0), sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        loss = self._eval_end("val")
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"the validation loss is {loss} at step {self.trainer.global_step}: training stopped and the last "
                "good checkpoint was kept; lower optimizer.lr or set trainer.gradient_clip_val"
            )
        if not self.trainer.sanity_checking and loss < self.best_val_loss:
            self.best_val_loss, self.best_val_bpc = loss, self._bpc
        self.log("val/loss_best", self.best_val_loss, sync_dist=True)
        self._swap_averages(into_parameters=False)
        if (ntasgd := find_ntasgd(self.trainer.optimizers)) is not None:
            if not self.trainer.sanity_checking and ntasgd.observe(loss):
                log.info("NT-ASGD: val/loss %.4f is no better than before the last %d validations: averaging "
                         "the weights from step %d", loss, ntasgd.param_groups[0]["nonmono"], self.global_step)
            self.log("train/averaging", float(ntasgd.averaging), sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ---------------------------------------------------------------- optimization
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters(), **fused_update(self.optimizer_factory, self.parameters()))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}  # see _step_schedulers

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._raise_if_diverged()  # the checkpoint would hold the weights of a diverged run
        write_model_section(checkpoint, self.net.config, self.vocab, self.carry_state, self.trainer.world_size)
        # Every process's carried state, gathered (each resumes its own columns): every process runs this
        # hook, so the gather is collective.
        by_rank = map_state(self._state["train"], self._gather)
        write_resume_section(checkpoint, ResumeSection(by_rank, self.best_val_loss, self._configured_lr()))
        ntasgd = find_ntasgd(self.trainer.optimizers)
        if ntasgd is not None and ntasgd.averaging:  # checkpoints are taken between steps: the iterate is in place
            averages = {id(p): average for p, average in ntasgd.averages()}
            write_averaged_weights(checkpoint, self.state_dict(keep_vars=True), averages)

    def _configured_lr(self) -> float | None:
        return getattr(self.optimizer_factory, "keywords", {}).get("lr")

    def _gather(self, tensor: Tensor) -> Tensor:
        """(world_size, ...) from every process's ``tensor``."""
        return self.all_gather(tensor) if self.trainer.world_size > 1 else tensor.unsqueeze(0)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":  # testing keeps the averaged weights
            read_sgd_iterate(checkpoint)
        resume = read_resume_section(checkpoint)
        if resume is None:
            return
        self.best_val_loss = resume.best_val_loss
        self._new_lr = resume.configured_lr != self._configured_lr()  # the user changed optimizer.lr
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self._state["train"] = map_state(resume.train_state_by_rank, lambda s: s[rank].to(self.device))
