"""AWD-LSTM's regularizers (rnnlm.regularization, the model options, NT-ASGD, variable-length BPTT): what each one
does to the numbers, and that a run using all of them trains, resumes exactly and evaluates its averaged weights."""

import copy
import unittest.mock
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from rnnlm.batches import StreamChunks
from rnnlm.checkpoint import load_checkpoint
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.eval import evaluate
from rnnlm.commands.generate import generate_texts
from rnnlm.commands.train import train
from rnnlm.errors import ConfigError
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.ntasgd import NTASGD
from rnnlm.regularization import activation_penalty, embedding_dropout, locked_dropout
from rnnlm.scoring import rank_candidates
from rnnlm.stack import RecurrentStack

# every AWD option on, at sizes that train in seconds
AWD = ["model.locked_dropout=true", "model.input_dropout=0.3", "model.layer_dropout=0.2", "model.dropout=0.3",
       "model.embedding_dropout=0.1", "model.weight_drop=0.3", "model.activation_reg=2",
       "model.temporal_activation_reg=1", "model.num_layers=2", "data.variable_seq_len=true", "optimizer=ntasgd",
       "optimizer.lr=5", "scheduler=none", "trainer.gradient_clip_val=0.25",
       "model.projection_size=16", "model.tie_weights=true"]  # TINY: embedding 16, hidden 32


def test_locked_dropout_keeps_one_mask_for_the_whole_sequence():
    torch.manual_seed(0)
    x = torch.ones(8, 50, 16)
    out = locked_dropout(x, 0.5, training=True)
    assert torch.equal(out, out[:, :1].expand_as(out))  # the same features dropped at every step
    assert set(out.unique().tolist()) == {0.0, 2.0}  # kept ones scaled by 1/(1-p)
    assert not torch.equal(out[0, 0], out[1, 0])  # each row has its own mask
    assert torch.equal(locked_dropout(x, 0.5, training=False), x)
    ordinary = torch.nn.functional.dropout(x, 0.5)
    assert not torch.equal(ordinary[:, 0], ordinary[:, 1])  # what locking changes


def test_embedding_dropout_drops_every_occurrence_of_a_word():
    torch.manual_seed(0)
    weight = torch.randn(20, 4)
    dropped = embedding_dropout(weight, 0.5, training=True)
    zero_rows = (dropped == 0).all(1)
    assert 0 < zero_rows.sum() < 20
    torch.testing.assert_close(dropped[~zero_rows], weight[~zero_rows] * 2)
    tokens = torch.tensor([[3, 3, 3, 7, 7, 3]])
    embedded = nn.functional.embedding(tokens, dropped)
    for word in (3, 7):
        rows = embedded[tokens == word]
        assert (rows == rows[0]).all()  # a dropped word is zeros at every position, a kept one is itself
    assert torch.equal(embedding_dropout(weight, 0.5, training=False), weight)


def test_activation_penalties_by_hand():
    outputs = torch.tensor([[[1.0], [3.0], [2.0]]])  # (B=1, T=3, F=1)
    dropped = torch.tensor([[[2.0], [0.0], [4.0]]])
    scored = torch.tensor([[True, True, True]])
    # AR: 2 * mean(4, 0, 16); TAR: 1 * mean((3-1)^2, (2-3)^2)
    assert activation_penalty(outputs, dropped, scored, 2.0, 0.0).item() == pytest.approx(2 * 20 / 3)
    assert activation_penalty(outputs, dropped, scored, 0.0, 1.0).item() == pytest.approx(2.5)
    padded = torch.tensor([[True, True, False]])  # the padded last step is left out of both
    assert activation_penalty(outputs, dropped, padded, 2.0, 1.0).item() == pytest.approx(2 * 2 + 4)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_weight_drop_is_the_same_dropconnect_in_both_implementations(cell):
    torch.manual_seed(0)
    fused = RecurrentStack(cell, 5, 8, 2, dropout=0.3, bidirectional=True, weight_drop=0.5, locked_dropout=True)
    scratch = RecurrentStack(cell, 5, 8, 2, dropout=0.3, bidirectional=True, impl="scratch", weight_drop=0.5,
                             locked_dropout=True)
    scratch.load_fused_state_dict(fused.fused_state_dict())
    assert set(fused.fused_state_dict()) == set(nn.LSTM(5, 8, 2, bidirectional=True).state_dict())  # torch.nn's
    x = torch.randn(3, 7, 5)
    runs = []
    for backbone in (fused, scratch):
        torch.manual_seed(1)  # the same masks, drawn in the same order
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # swapping an RNN's weights warns; passing them to its kernel does not
            out, _ = backbone(x)
        out.square().sum().backward()
        runs.append(out)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-5)
    grads = []
    with torch.no_grad():  # each form's gradients, in torch.nn's layout: load them as weights and convert
        for backbone in (fused, scratch):
            with_grads = copy.deepcopy(backbone)
            for p, original in zip(with_grads.parameters(), backbone.parameters(), strict=True):
                p.copy_(original.grad)
            grads.append(with_grads.fused_state_dict())
    for name in grads[0]:
        if name.startswith("weight"):
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5)
    torch.manual_seed(1)
    again, _ = fused(x)
    assert torch.equal(again, runs[0])  # same seed, same masks
    assert not torch.equal(fused(x)[0], again)  # a new call, new masks
    fused.eval()
    plain = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell](5, 8, 2, batch_first=True, bidirectional=True)
    plain.load_state_dict(fused.fused_state_dict())
    torch.testing.assert_close(fused(x)[0], plain(x)[0])  # evaluation reads the weights themselves


def test_weight_drop_gradient_reaches_only_the_kept_weights():
    torch.manual_seed(0)
    backbone = RecurrentStack("rnn", 3, 6, 1, weight_drop=0.5)
    x = torch.randn(2, 5, 3)
    torch.manual_seed(7)
    out, _ = backbone(x)
    out.sum().backward()
    torch.manual_seed(7)
    kept = nn.functional.dropout(torch.ones(6, 6), 0.5) != 0  # the mask the forward call drew
    grad = backbone.cells[0].weight_hh.grad
    assert (grad[~kept] == 0).all() and (grad[kept] != 0).float().mean() > 0.9


def test_language_model_options_reach_the_network():
    config = NetworkConfig(vocab_size=50, embedding_dim=8, hidden_size=16, num_layers=3, projection_size=8,
                           tie_weights=True, locked_dropout=True, input_dropout=0.4, layer_dropout=0.25, dropout=0.4,
                           embedding_dropout=0.1, weight_drop=0.5)
    net = LanguageModel(config)
    assert net.decoder.weight is net.embedding.weight and net.projection.out_features == 8
    assert net.backbone.dropout == 0.25 and net.backbone.locked_dropout
    assert all(cell.weight_drop == 0.5 for cell in net.backbone.cells)
    tokens = torch.randint(0, 50, (4, 9))
    features, state, outputs, dropped = net.features_and_outputs(tokens)
    assert features.shape == (4, 9, 8) and outputs.shape == dropped.shape == (4, 9, 16)
    # locked output dropout: each row loses the same units at every step
    lost = (dropped == 0) & (outputs != 0)
    assert torch.equal(lost, lost[:, :1].expand_as(lost))
    net.eval()
    features, _, outputs, dropped = net.features_and_outputs(tokens)
    assert torch.equal(outputs, dropped)


@pytest.mark.parametrize("settings, message", [
    ({"cell": "lstm", "embedding_dim": None, "embedding_dropout": 0.1}, "model.embedding_dropout drops rows"),
    ({"weight_drop": 1.0}, r"model.weight_drop=1.0 must be a number in \[0, 1\)"),
    ({"input_dropout": -0.1}, r"model.input_dropout=-0.1 must be a number in \[0, 1\)"),
    ({"hidden_size": 32, "embedding_dim": 8, "tie_weights": True}, "model.projection_size=8"),
    ({"projection_size": 0}, "model.projection_size=0 must be a positive integer"),
    ({"locked_dropout": "yes"}, "model.locked_dropout=yes must be true or false"),
])
def test_bad_regularizer_settings_are_refused_with_the_fix(settings, message):
    with pytest.raises(ConfigError, match=message):
        NetworkConfig(vocab_size=30, **settings)


def test_variable_length_chunks_tile_the_stream_and_repeat_for_a_seed():
    ids = np.arange(4 * 1001, dtype=np.int64)
    fixed = StreamChunks(ids, batch_size=4, seq_len=35)
    varying = StreamChunks(ids, batch_size=4, seq_len=35, variable=True, seed=3)
    first = list(varying)
    lengths = [x.size(1) for x, _ in first]
    assert len(first) == len(fixed) == len(varying)  # as many steps per pass as the fixed length gives
    assert len(set(lengths)) > 5 and 25 < np.mean(lengths) < 45 and min(lengths) >= 4
    inputs = torch.cat([x for x, _ in first], 1)
    assert torch.equal(inputs, torch.from_numpy(ids.reshape(4, 1001)[:, :-1]))  # every step once, in order
    second = [x.size(1) for x, _ in varying]
    assert second != lengths  # a new pass is cut elsewhere
    again = StreamChunks(ids, batch_size=4, seq_len=35, variable=True, seed=3)
    assert [x.size(1) for x, _ in again] == lengths  # the same seed and pass cut the same way
    again.resume_at, again.passes = 3, 1  # a run resumed in pass 1 at chunk 3
    assert [x.size(1) for x, _ in again] == second[3:]


def test_ntasgd_switches_when_validation_stops_improving_and_averages():
    weight = nn.Parameter(torch.zeros(2))
    optimizer = NTASGD([weight], lr=1.0, nonmono=2)
    # nonmono=2: a loss is compared with the best before the last two
    for loss in (5.0, 4.0, 3.0, 4.5):
        assert not optimizer.observe(loss)  # 4.5 > 5 (the best before 4.0 and 3.0)? no
    assert optimizer.observe(4.6) and optimizer.averaging  # 4.6 > min(5, 4)
    iterates = []
    for grad in ([1.0, 2.0], [-3.0, 0.5], [0.5, 0.5]):
        weight.grad = torch.tensor(grad)
        optimizer.step()
        iterates.append(weight.detach().clone())
    (p, average), = optimizer.averages()
    torch.testing.assert_close(average, torch.stack(iterates).mean(0))
    optimizer.swap()
    torch.testing.assert_close(weight.detach(), torch.stack(iterates).mean(0))
    optimizer.swap()
    torch.testing.assert_close(weight.detach(), iterates[-1])
    resumed = NTASGD([nn.Parameter(weight.detach().clone())], lr=1.0)
    resumed.load_state_dict(optimizer.state_dict())
    assert resumed.averaging and resumed.param_groups[0]["val_losses"] == [5.0, 4.0, 3.0, 4.5, 4.6]


def _averaging_from_the_second_validation(monkeypatch):
    """NT-ASGD that switches at its second validation, whatever the losses (a tiny run's keep improving)."""
    observe = NTASGD.observe

    def forced(self, val_loss):
        if len(self.param_groups[0]["val_losses"]) == 1 and not self.averaging:
            self.param_groups[0]["averaged_steps"] = 0
            self.param_groups[0]["val_losses"].append(float(val_loss))
            return True
        return observe(self, val_loss)

    monkeypatch.setattr(NTASGD, "observe", forced)


def test_an_awd_run_resumes_exactly_and_its_checkpoint_holds_the_averaged_weights(make_cfg, tiny_corpus, tmp_path,
                                                                                    monkeypatch, shared_data,
                                                                                    cache_dir):
    _averaging_from_the_second_validation(monkeypatch)
    run = [*AWD, f"data.path={tiny_corpus}", "trainer.val_check_interval=3", "trainer.max_steps=16"]
    straight = train(make_cfg(*run, run_dir=tmp_path / "straight"))
    assert straight["train/averaging"] == 1.0
    # stopped mid-pass, on a validation step (one between them would validate its final weights too, and so
    # could keep another best.ckpt than the straight run), three steps after the averaging began
    first = train(make_cfg(*run, "trainer.max_steps=9", "test=false", run_dir=tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = train(make_cfg(*run, f"ckpt_path={last}", run_dir=tmp_path / "rest"))
    # weights, averages, the pass's cuts, the carried state and the masks all continue where they were
    assert resumed["val/loss"] == pytest.approx(straight["val/loss"], abs=1e-6)
    assert resumed["test/loss"] == pytest.approx(straight["test/loss"], abs=1e-6)

    checkpoint = torch.load(last, weights_only=True)
    iterate = checkpoint["rnnlm_sgd_iterate"]  # training goes on from the SGD iterate ...
    assert iterate and all(not torch.equal(iterate[k], checkpoint["state_dict"][k]) for k in iterate)
    # ... and what eval reads is the average, which scores as the run's own validation of it did
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={last}", "split=valid", "device=cpu",
                                         f"paths.data_dir={shared_data}", f"paths.cache_dir={cache_dir}"])
    assert evaluate(cfg)["loss"] == pytest.approx(first["val/loss"], rel=1e-5)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):  # generation and scoring read it too
        cfg = compose("generate", overrides=[f"ckpt_path={last}", "prompt=the quick", "max_new_tokens=12",
                                             "num_samples=2", "device=cpu"])
    texts = generate_texts(cfg)
    assert len(texts) == 2 and all(t.startswith("the quick") and len(t) == 9 + 12 for t in texts)
    loaded = load_checkpoint(last)
    ranked = rank_candidates(loaded.net, loaded.vocab, "the quick brown ___ jumps", ["fox", "dog"])
    assert sorted(c for c, _, _ in ranked) == ["dog", "fox"]


def test_variable_length_steps_scale_the_learning_rate(make_cfg, tiny_corpus):
    seen, after = [], []

    class RecordRates(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append((pl_module._lr_scale, optimizer.param_groups[0]["lr"]))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after.append(trainer.optimizers[0].param_groups[0]["lr"])

    cfg = make_cfg(f"data.path={tiny_corpus}", "data.variable_seq_len=true", "data.seq_len=20", "optimizer=sgd",
                   "optimizer.lr=2", "scheduler=none", "trainer.max_steps=8", "test=false")
    metrics = train(cfg, extra_callbacks=[RecordRates()])
    assert len({scale for scale, _ in seen}) > 2
    for scale, lr in seen:
        assert lr == pytest.approx(2 * scale)  # this chunk's length over data.seq_len
    assert after == [2.0] * 8  # and back to the configured rate after each step, which is the one logged
    assert metrics["train/lr"] == pytest.approx(2.0)


def test_awd_activation_penalty_is_optimized_but_not_logged_as_the_loss(make_cfg, tiny_corpus):
    from rnnlm.lightning_module import RecurrentLM

    seen = []
    original = RecurrentLM.manual_backward

    def record(self, objective, *args, **kwargs):  # what each step differentiates
        seen.append((objective.item(), self._penalty.item()))
        return original(self, objective, *args, **kwargs)

    cfg = make_cfg(f"data.path={tiny_corpus}", "model.activation_reg=2", "model.temporal_activation_reg=1",
                   "trainer.max_steps=3", "test=false", "trainer.log_every_n_steps=1")
    with unittest.mock.patch.object(RecurrentLM, "manual_backward", record):
        metrics = train(cfg)
    assert all(penalty > 0 for _, penalty in seen)
    objective, penalty = seen[-1]  # what is optimized: the cross-entropy and the penalty; what is logged: the former
    assert metrics["train/loss"] == pytest.approx(objective - penalty, rel=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["data.variable_seq_len=true", "data.mode=sentence"], "use data.mode=stream"),
    (["data.variable_seq_len=true", "data.seq_len=6"], "set data.seq_len=10 or more"),
    (["data.variable_seq_len=yes"], "data.variable_seq_len=yes must be true or false"),
    (["model.activation_reg=-1"], "model.activation_reg=-1 must be a number >= 0"),
    (["optimizer=ntasgd", "optimizer.nonmono=0"], "optimizer.nonmono=0 must be a positive integer"),
    (["optimizer=ntasgd", "optimizer.weight_decay=-1"], "optimizer.weight_decay=-1 must be a number >= 0"),
    (["model=gru", "model.cell=mingru", "model.weight_drop=0.5"], "set model.weight_drop=0"),
])
def test_bad_awd_configs_fail_before_training(make_cfg, tiny_corpus, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(f"data.path={tiny_corpus}", *overrides))
