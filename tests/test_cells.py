"""Textbook cells: the equations by hand, equivalence with torch.nn's fused kernels, and the bidirectional
language model that never sees the token it predicts (the Keras view is in test_keras.py)."""

import math

import pytest
import torch
from torch import nn

from rnnlm.cells.gru import ScratchGRU
from rnnlm.cells.lstm import ScratchLSTM
from rnnlm.cells.rnn import ScratchRNN
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.stack import RecurrentStack

FUSED = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def assert_close_named(actual, expected, name: str) -> None:
    """torch.testing.assert_close with the parameter's name in front of its report of the difference."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda report: f"{name}: {report}")


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def set_scalars(cell, **values):
    """Give a 1-input, 1-unit cell the named scalar weights."""
    with torch.no_grad():
        for name, value in values.items():
            getattr(cell, name).fill_(value)


def one_step(cell, x: float, state):
    """The cell's sequence call over one step, and its one-step call: both must give the equations' h."""
    out, final = cell(torch.tensor([[[x]]]), state)
    h, stepped = cell.step(torch.tensor([[x]]), state)
    torch.testing.assert_close(h, out[:, 0], rtol=1e-6, atol=1e-7)
    for a, b in zip(final, stepped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    return out.item(), final


def nn_state(state) -> tuple:
    """Per-cell states -> torch.nn's (layers * directions, B, H) tensors, h (and c)."""
    return tuple(torch.stack(parts) for parts in zip(*state, strict=True))


def cell_states(nn_parts: tuple) -> tuple:
    """torch.nn's (layers * directions, B, H) tensors -> per-cell states."""
    return tuple(zip(*(p.unbind(0) for p in nn_parts), strict=True))


def test_rnn_cell_by_hand():
    cell = ScratchRNN(1, 1)
    set_scalars(cell, W_x=0.5, W_h=-1.0, b=0.1)
    h, _ = one_step(cell, 2.0, (torch.tensor([[0.3]]),))
    assert h == pytest.approx(math.tanh(0.5 * 2.0 - 1.0 * 0.3 + 0.1), abs=1e-6)
    relu = ScratchRNN(1, 1, "relu")
    set_scalars(relu, W_x=0.5, W_h=-1.0, b=0.1)
    assert one_step(relu, -2.0, (torch.tensor([[0.3]]),))[0] == 0.0


def test_lstm_cell_by_hand():
    cell = ScratchLSTM(1, 1)
    w = dict(W_xi=0.1, W_hi=0.2, b_i=0.3, W_xf=0.4, W_hf=0.5, b_f=0.6, W_xg=0.7, W_hg=0.8, b_g=0.9,
             W_xo=1.0, W_ho=1.1, b_o=1.2)
    set_scalars(cell, **w)
    x, h0, c0 = 0.5, -0.4, 0.25
    i = sigmoid(w["W_xi"] * x + w["W_hi"] * h0 + w["b_i"])
    f = sigmoid(w["W_xf"] * x + w["W_hf"] * h0 + w["b_f"])
    g = math.tanh(w["W_xg"] * x + w["W_hg"] * h0 + w["b_g"])
    o = sigmoid(w["W_xo"] * x + w["W_ho"] * h0 + w["b_o"])
    c = f * c0 + i * g
    h, (h_state, c_state) = one_step(cell, x, (torch.tensor([[h0]]), torch.tensor([[c0]])))
    assert h == pytest.approx(o * math.tanh(c), abs=1e-6) and h_state.item() == pytest.approx(h, abs=1e-7)
    assert c_state.item() == pytest.approx(c, abs=1e-6)


@pytest.mark.parametrize("reset_after", [False, True])
def test_gru_cell_by_hand(reset_after):
    cell = ScratchGRU(1, 1, reset_after=reset_after)
    w = dict(W_xr=0.3, W_hr=-0.2, b_r=0.1, W_xz=0.5, W_hz=0.4, b_z=-0.3, W_xg=0.9, W_hg=-1.5, b_g=0.2)
    set_scalars(cell, **w, **({"b_hg": 0.7} if reset_after else {}))
    x, h0 = 0.8, 0.6
    r = sigmoid(w["W_xr"] * x + w["W_hr"] * h0 + w["b_r"])
    z = sigmoid(w["W_xz"] * x + w["W_hz"] * h0 + w["b_z"])
    if reset_after:  # multiply, then reset: tanh(W_xg x + b_g + r (W_hg h + b_hg))
        g = math.tanh(w["W_xg"] * x + w["b_g"] + r * (w["W_hg"] * h0 + 0.7))
    else:  # reset, then multiply: tanh(W_hg (r h) + W_xg x + b_g)
        g = math.tanh(w["W_hg"] * (r * h0) + w["W_xg"] * x + w["b_g"])
    assert one_step(cell, x, (torch.tensor([[h0]]),))[0] == pytest.approx((1 - z) * g + z * h0, abs=1e-6)


def test_gru_forms_differ_in_where_the_reset_applies():
    torch.manual_seed(0)
    before, after = ScratchGRU(3, 4, reset_after=False), ScratchGRU(3, 4, reset_after=True)
    after.load_state_dict({**before.state_dict(), "b_hg": torch.zeros(4)})
    x, h = torch.randn(2, 5, 3), (torch.randn(2, 4),)
    assert not torch.allclose(before(x, h)[0], after(x, h)[0], atol=1e-4)


def _grads_in_fused_layout(cell: str, scratch: RecurrentStack) -> dict:
    """Gradients of the scratch parameters arranged like torch.nn's, through the same conversion."""
    with_grads = RecurrentStack(cell, 5, 7, scratch.num_layers, bidirectional=scratch.directions == 2,
                                impl="scratch")
    with torch.no_grad():
        for name, p in with_grads.named_parameters():
            p.copy_(scratch.get_parameter(name).grad)
    return with_grads.fused_state_dict()


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_scratch_equals_fused_outputs_and_gradients(cell, bidirectional):
    torch.manual_seed(0)
    fused = FUSED[cell](5, 7, num_layers=2, batch_first=True, bidirectional=bidirectional)
    scratch = RecurrentStack(cell, 5, 7, num_layers=2, bidirectional=bidirectional, impl="scratch")
    scratch.load_fused_state_dict(fused.state_dict())
    x1 = torch.randn(3, 6, 5, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    d = 2 if bidirectional else 1
    h0 = torch.randn(2 * d, 3, 7)
    state = (h0, torch.randn(2 * d, 3, 7)) if cell == "lstm" else h0
    out_f, final_f = fused(x1, state)
    out_s, final_s = scratch(x2, cell_states(state if cell == "lstm" else (state,)))
    torch.testing.assert_close(out_f, out_s, rtol=1e-5, atol=1e-5)
    for a, b in zip(final_f if cell == "lstm" else [final_f], nn_state(final_s), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out_f)
    (out_f * upstream).sum().backward()
    (out_s * upstream).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    grads = _grads_in_fused_layout(cell, scratch)
    for name, p in fused.named_parameters():
        if name.startswith("bias_hh"):  # the textbook b is bias_ih + bias_hh: both get b's gradient
            keep = slice(0, 14) if cell == "gru" else slice(None)  # GRU's candidate keeps its own b_hg
            assert_close_named(p.grad[keep], grads[name.replace("hh", "ih")][keep], name)
            if cell == "gru":
                assert_close_named(p.grad[14:], grads[name][14:], name)
        else:
            assert_close_named(p.grad, grads[name], name)
    restored = FUSED[cell](5, 7, num_layers=2, batch_first=True, bidirectional=bidirectional)
    restored.load_state_dict(scratch.fused_state_dict())  # and back: the converted weights give the same outputs
    torch.testing.assert_close(restored(x1, state)[0], out_f, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("impl", ["fused", "scratch"])
def test_lstm_forget_bias_starts_the_forget_gate_there_and_draws_the_same_weights(impl):
    """model.forget_bias=2: b_f (the sum of torch.nn's two biases' forget blocks) starts at 2 in both forms, the forms
    agree once converted, every other weight is the one the seed draws without it, and the forget gate starts open."""
    def stack(**settings):
        torch.manual_seed(0)
        return RecurrentStack("lstm", 5, 7, num_layers=2, impl=impl, cell_settings=settings)

    plain, biased = stack().fused_state_dict(), stack(forget_bias=2.0).fused_state_dict()
    forget = slice(7, 14)  # torch.nn's blocks: i, f, g, o
    for name in plain:
        if name.startswith("bias_ih"):
            b_f = biased[name][forget] + biased[name.replace("ih", "hh")][forget]
            torch.testing.assert_close(b_f, torch.full((7,), 2.0))
        if name.startswith("bias"):  # the other blocks as drawn
            assert torch.equal(biased[name][:7], plain[name][:7]) and torch.equal(biased[name][14:], plain[name][14:])
        else:
            assert torch.equal(biased[name], plain[name]), name
    other = RecurrentStack("lstm", 5, 7, num_layers=2, impl="scratch" if impl == "fused" else "fused")
    other.load_fused_state_dict(biased)
    x = torch.randn(3, 6, 5)
    torch.testing.assert_close(stack(forget_bias=2.0)(x)[0], other(x)[0], rtol=1e-5, atol=1e-5)
    cell = stack(forget_bias=2.0).cells[0]
    forget_gate = cell.gates(torch.zeros(3, 5), cell.zero_state(3, x))["forget"]
    torch.testing.assert_close(forget_gate, torch.full((3, 7), sigmoid(2.0)))

def test_language_model_weights_convert_between_implementations():
    torch.manual_seed(0)
    fused = LanguageModel(NetworkConfig(40, "gru", 8, [16, 12], 2, 0.0, impl="fused")).eval()
    scratch = LanguageModel(NetworkConfig(40, "gru", 8, [16, 12], 2, 0.0, impl="scratch")).eval()
    other = {k: v for k, v in fused.state_dict().items() if not k.startswith("backbone.")}
    scratch.load_state_dict(other, strict=False)
    scratch.backbone.load_fused_state_dict(fused.backbone.fused_state_dict())
    tokens = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(fused(tokens)[0], scratch(tokens)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "scratch"])
def test_bidirectional_lm_never_sees_its_target(impl):
    torch.manual_seed(0)
    config = NetworkConfig(30, "lstm", 16, 24, num_layers=2, dropout=0.0, bidirectional=True, impl=impl)
    net = LanguageModel(config).eval()
    tokens = torch.randint(0, 30, (2, 10))
    logits, _ = net(tokens)
    for t in range(10):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 30
        new, _ = net(changed)
        # the prediction for t ignores token t
        torch.testing.assert_close(new[:, t], logits[:, t], rtol=1e-5, atol=1e-6)
        neighbours = [s for s in (t - 1, t + 1) if 0 <= s < 10]
        assert all(not torch.allclose(new[:, s], logits[:, s]) for s in neighbours)  # but its neighbours see it


def test_reset_before_gru_has_no_fused_form():
    with pytest.raises(ValueError, match="impl=scratch"):
        RecurrentStack("gru", 4, 4, impl="fused", cell_settings={"reset_after": False})
    with pytest.raises(ValueError, match="no fused form"):
        RecurrentStack("gru", 4, 4, impl="scratch", cell_settings={"reset_after": False}).fused_state_dict()
