"""``model.cuda_graph``: the graphed training step trains exactly as Lightning's own loop does.

On a CPU the graph itself cannot be recorded, but everything around it can be checked: the step that
the graph replays (forward, backward, clipping, the optimizer step through Lightning, carried state,
schedulers) must give the same run as automatic optimization. The tests marked ``gpu`` record and
replay the graph and run only where CUDA is available.
"""

from __future__ import annotations

import logging

import pytest
import torch

import rnnlm.checks
from rnnlm.checks import ConfigError
from rnnlm.commands.train import train
from rnnlm.cuda_graph import GraphedStep

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
    rnn = torch.nn.LSTM(16, 32, 2, batch_first=True).to(device)
    decoder = torch.nn.Linear(32, 50).to(device)
    params = [*embedding.parameters(), *rnn.parameters(), *decoder.parameters()]

    def mean_loss(inputs, targets, state):
        outputs, final = rnn(embedding(inputs), state)
        return torch.nn.functional.cross_entropy(decoder(outputs).flatten(0, 1), targets.flatten()), final

    return mean_loss, params


def _train(step, params, batches, device):
    optimizer = torch.optim.SGD(params, lr=1.0)
    losses, state = [], None
    for inputs, targets in batches:
        loss, norm, state = step(inputs.to(device), targets.to(device), state)
        losses.append((loss.item(), norm.item()))
        optimizer.step()
    return losses


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("clip", ["norm", "value"])
def test_replayed_steps_give_the_eager_losses(clip):
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (4, 8 * 16 + 6), generator=generator)  # 8 chunks of 16, a last one of 5
    batches = [(tokens[:, i:i + 16], tokens[:, i + 1:i + 17]) for i in range(0, tokens.size(1) - 1, 16)]
    batches = batches * 2  # a second pass, starting again from a chunk of 16
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
