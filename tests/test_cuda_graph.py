"""``model.cuda_graph``: the graphed training step trains exactly as Lightning's own loop does.

On a CPU the graph itself cannot be recorded, but everything around it can be checked: the step that
the graph replays (forward, backward, clipping, the optimizer step through Lightning, carried state,
schedulers) must give the same run as automatic optimization, and so must a step that replays an
emulation of the graph's memory (:class:`EmulatedGraph`). The tests marked ``gpu`` record and replay the
graph and run only where CUDA is available.
"""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

import rnnlm.checks
import rnnlm.lightning_module
from rnnlm.checks import ConfigError
from rnnlm.commands.train import train
from rnnlm.cuda_graph import GraphedStep
from rnnlm.stack import RecurrentStack

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run(make_cfg, tiny_corpus, run_dir, *overrides):
    cfg = make_cfg(f"data.path={tiny_corpus}", "model.dropout=0", "trainer.max_steps=24", "trainer.max_epochs=3",
                   "trainer.limit_train_batches=8", "test=false",
                   "~callbacks.text_samples", *overrides, run_dir=run_dir)
    return train(cfg)


@pytest.mark.parametrize("optimizer,clip,scheduler", [("sgd", "norm", "step"), ("adam", "value", "plateau")])
def test_the_graphed_steps_eager_path_trains_like_lightnings_loop(make_cfg, tiny_corpus, tmp_path, monkeypatch,
                                                                  optimizer, clip, scheduler):
    settings = [f"optimizer={optimizer}", f"optimizer.lr={1.0 if optimizer == 'sgd' else 0.01}",
                "trainer.gradient_clip_val=0.1", f"trainer.gradient_clip_algorithm={clip}", f"scheduler={scheduler}"]
    if scheduler == "step":
        settings += ["scheduler.step_size=1", "scheduler.gamma=0.5"]
    if scheduler == "plateau":  # lowered after every validation that does not improve by 100%
        settings += ["scheduler.patience=0", "+scheduler.threshold=1.0", "scheduler.factor=0.5"]
    automatic = _run(make_cfg, tiny_corpus, tmp_path / "automatic", *settings)
    monkeypatch.setattr(rnnlm.checks, "_cuda_graph_problems", lambda cfg: [])  # allow it on a CPU
    graphed = _run(make_cfg, tiny_corpus, tmp_path / "graphed", "model.cuda_graph=true", *settings)
    for key in ("val/loss", "train/loss", "train/grad_norm", "train/lr"):
        assert graphed[key] == pytest.approx(automatic[key], rel=1e-5), key
    assert graphed["train/lr"] < (1.0 if optimizer == "sgd" else 0.01)  # the scheduler was stepped


# ---------------------------------------------------------------- a graph's memory, emulated on the CPU
def _leaves(outputs) -> list[torch.Tensor]:
    leaves = []
    for value in outputs:
        if isinstance(value, tuple):
            leaves += _leaves(value)
        elif value is not None:
            leaves.append(value)
    return leaves


class EmulatedGraph:
    """What a CUDA graph does to memory, on the CPU. Recording runs the step once and keeps its outputs and the
    ``.grad`` tensors its backward allocated. Each replay runs the step again and writes every result into those
    same tensors, and assigns nothing: each parameter's ``.grad`` is left as it was found, None included."""

    def __init__(self, body, static_in, params: list[torch.Tensor]):
        self.body, self.static_in, self.params = body, static_in, params
        self.outputs = body(*static_in)
        self.grads = [p.grad for p in params]

    def replay(self) -> None:
        found = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        outputs = self.body(*self.static_in)
        for recorded, p in zip(self.grads, self.params, strict=True):
            if recorded is not None:
                recorded.copy_(p.grad)
        for p, grad in zip(self.params, found, strict=True):
            p.grad = grad
        for recorded, value in zip(_leaves(self.outputs), _leaves(outputs), strict=True):
            recorded.copy_(value)


class EmulatedGraphedStep(GraphedStep):
    """A :class:`GraphedStep` that records on the CPU, as an :class:`EmulatedGraph`."""

    def _can_record(self, inputs: torch.Tensor) -> bool:
        return self.enabled

    def _record(self):
        graph = EmulatedGraph(self._body, self._static_in, self.params)
        return graph, graph.outputs


def _emulate_graphs(monkeypatch) -> list[GraphedStep]:
    """Let ``model.cuda_graph=true`` run on the CPU with an :class:`EmulatedGraphedStep` -> the list that each
    step made from then on joins."""
    made = []

    def make(*args, **kwargs) -> GraphedStep:
        made.append(EmulatedGraphedStep(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(rnnlm.checks, "_cuda_graph_problems", lambda cfg: [])
    monkeypatch.setattr(rnnlm.lightning_module, "GraphedStep", make)
    return made


class StepRecorder(L.Callback):
    """Each training step's logged ``train/loss`` and the weights before it, and the steps that validations
    followed."""

    def __init__(self):
        self.losses, self.weights, self.validated_after = [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.weights.append(torch.cat([p.detach().flatten() for p in module.parameters()]))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.validated_after.append(trainer.global_step)


def _plain_and_emulated(make_cfg, tiny_corpus, tmp_path, monkeypatch, *settings):
    """12 steps, validated after steps 4, 8 and 12, without the graph and with an emulated one -> the two
    :class:`StepRecorder` and the emulated run's :class:`GraphedStep`. The graph is recorded at step 4, after
    3 steps of warm-up, and replayed from then on."""
    settings = [f"data.path={tiny_corpus}", "model.dropout=0", "trainer.max_steps=12", "trainer.max_epochs=1",
                "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=0",
                "optimizer=sgd", "optimizer.lr=1.0", "trainer.gradient_clip_val=0.25", "test=false",
                "~callbacks.text_samples", *settings]
    plain = StepRecorder()
    train(make_cfg(*settings, run_dir=tmp_path / "plain"), [plain])
    made, graphed = _emulate_graphs(monkeypatch), StepRecorder()
    train(make_cfg(*settings, "model.cuda_graph=true", run_dir=tmp_path / "graphed"), [graphed])
    (step,) = made
    assert step.graph is not None and step.replays == 12 - step.warmup_steps
    assert graphed.validated_after == plain.validated_after == [4, 8, 12] and len(graphed.losses) == 12
    return plain, graphed, step


def test_a_replayed_step_keeps_training_after_validations(make_cfg, tiny_corpus, tmp_path, monkeypatch):
    """Lightning sets every ``.grad`` to None before validating; the replays write on into the recorded tensors."""
    plain, graphed, _ = _plain_and_emulated(make_cfg, tiny_corpus, tmp_path, monkeypatch)
    for step in range(1, 12):  # every optimizer step moved the weights, before and after the validations
        assert not torch.equal(graphed.weights[step], graphed.weights[step - 1]), f"step {step} changed nothing"
    assert graphed.losses == pytest.approx(plain.losses, rel=1e-6)


def test_a_replayed_step_logs_the_cross_entropy_without_the_activation_penalty(make_cfg, tiny_corpus, tmp_path,
                                                                               monkeypatch):
    plain, graphed, step = _plain_and_emulated(make_cfg, tiny_corpus, tmp_path, monkeypatch,
                                               "model.activation_reg=2", "model.temporal_activation_reg=1")
    assert graphed.losses == pytest.approx(plain.losses, rel=1e-6)  # train/loss is the cross-entropy alone
    loss, objective, _, _ = step._static_out  # the last replay's: the penalty was in what it differentiated
    assert objective > loss + 1e-3


@pytest.mark.parametrize(
    "overrides,message",
    [([], "model.cuda_graph=true needs a CUDA GPU"),
     (["trainer.precision=16-mixed"], "not 16-mixed"),
     (["trainer.accumulate_grad_batches=2"], "set trainer.accumulate_grad_batches=1"),
     (["trainer.devices=2"], "trains on one GPU")],
)
def test_cuda_graph_settings_are_checked_up_front(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(make_cfg("model.cuda_graph=true", *overrides))


# ---------------------------------------------------------------- on a GPU
def _lstm_step(device, clip_val=0.25):
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 16).to(device)
    rnn = RecurrentStack("lstm", 16, 32, 2).to(device)  # its state: per-cell (h, c) pairs
    decoder = torch.nn.Linear(32, 50).to(device)
    params = [*embedding.parameters(), *rnn.parameters(), *decoder.parameters()]

    def mean_loss(inputs, targets, state):
        outputs, final = rnn(embedding(inputs), state)
        loss = torch.nn.functional.cross_entropy(decoder(outputs).flatten(0, 1), targets.flatten())
        return loss, loss, final

    return mean_loss, params


def _train(step, params, batches, device, release_grads=False):
    """Each step's loss and gradient norm, one after the other; ``release_grads``: set every .grad to None before
    every other step, as Lightning does before validating."""
    optimizer = torch.optim.SGD(params, lr=1.0)
    losses, state = [], None
    for n, (inputs, targets) in enumerate(batches):
        if release_grads and n % 2:
            optimizer.zero_grad(set_to_none=True)
        loss, _, norm, state = step(inputs.to(device), targets.to(device), state)
        losses += [loss.item(), norm.item()]
        optimizer.step()
    return losses


def _chunks():
    """8 chunks of 16 and one of 5, twice: (inputs, targets) (4, T) each."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (4, 8 * 16 + 6), generator=generator)
    length = tokens.size(1) - 1  # inputs from tokens[:, :-1], targets from tokens[:, 1:]
    batches = [(tokens[:, i:min(i + 16, length)], tokens[:, i + 1:i + 17]) for i in range(0, length, 16)]
    return batches * 2  # a second pass, starting again from a chunk of 16


@pytest.mark.parametrize("clip", ["norm", "value"])
def test_emulated_replays_give_the_eager_losses_when_grads_are_set_to_none(clip):
    """The replays write into the recorded .grad tensors; the chunks of 5 run eagerly between them."""
    device = torch.device("cpu")
    mean_loss, params = _lstm_step(device)
    eager = _train(GraphedStep(mean_loss, params, 0.25, clip), params, _chunks(), device, release_grads=True)
    mean_loss, params = _lstm_step(device)
    graphed_step = EmulatedGraphedStep(mean_loss, params, 0.25, clip)
    graphed = _train(graphed_step, params, _chunks(), device, release_grads=True)
    assert graphed_step.graph is not None and graphed_step.replays == 18 - 2 - graphed_step.warmup_steps
    assert graphed == pytest.approx(eager, rel=1e-6)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("clip", ["norm", "value"])
def test_replayed_steps_give_the_eager_losses(clip):
    device = torch.device("cuda")
    batches = _chunks()
    mean_loss, params = _lstm_step(device)
    eager = _train(GraphedStep(mean_loss, params, 0.25, clip, enabled=False), params, batches, device)
    mean_loss, params = _lstm_step(device)
    graphed_step = GraphedStep(mean_loss, params, 0.25, clip)
    graphed = _train(graphed_step, params, batches, device)
    assert graphed_step.graph is not None and graphed_step.replays >= 10
    assert graphed == pytest.approx(eager, rel=1e-4, abs=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision,tolerance", [("32-true", 1e-4), ("bf16-mixed", 2e-2)])
def test_a_graphed_run_on_the_gpu_matches_an_eager_one(make_cfg, tiny_corpus, tmp_path, caplog, precision, tolerance):
    settings = ["trainer.accelerator=gpu", f"trainer.precision={precision}", "optimizer=sgd", "optimizer.lr=1.0",
                "trainer.gradient_clip_val=0.25", "model.num_layers=2"]
    eager = _run(make_cfg, tiny_corpus, tmp_path / "eager", *settings)
    with caplog.at_level(logging.INFO, logger="rnnlm.cuda_graph"):
        graphed = _run(make_cfg, tiny_corpus, tmp_path / "graphed", "model.cuda_graph=true", *settings)
    assert "recorded the training step" in caplog.text and "failed" not in caplog.text
    assert graphed["val/loss"] == pytest.approx(eager["val/loss"], rel=tolerance)
    # and it resumes: 24 more steps from the graphed run's checkpoint, graphed again
    last = tmp_path / "graphed" / "checkpoints" / "last.ckpt"
    resumed = _run(make_cfg, tiny_corpus, tmp_path / "resumed", "model.cuda_graph=true", *settings,
                   f"ckpt_path={last}", "trainer.max_steps=48", "trainer.max_epochs=6")
    assert resumed["val/loss"] < graphed["val/loss"]
