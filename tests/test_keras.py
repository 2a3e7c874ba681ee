"""Keras parity: what ``KerasRecurrent`` returns for every ``return_sequences`` / ``return_state`` /
``Bidirectional(merge_mode=...)`` case (Python types, lengths, shapes, values from the backbone), the
backward direction's order, and the reset-before GRU, which has no torch.nn form."""

import re

import pytest
import torch
from torch import nn

from rnnlm.cells.gru import RESET_BEFORE_HAS_NO_FUSED_FORM
from rnnlm.keras import KerasRecurrent
from rnnlm.stack import RecurrentStack

UNITS, BATCH, STEPS, FEATURES = 3, 2, 4, 5
UNIDIRECTIONAL = "unidirectional"  # not wrapped in Bidirectional (merge_mode=None is a Bidirectional case)


def assert_close(actual, expected, name: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6, msg=lambda report: f"{name}: {report}")


def expected_keras_result(layer: KerasRecurrent, x: torch.Tensor, merge_mode) -> list[torch.Tensor]:
    """What Keras 3 returns, flattened, from the backbone's own outputs and final state."""
    outputs, state = layer.backbone(x)  # (B, T, D*H); state: per cell, (h,) or (h, c), layer-major
    directions = layer.backbone.directions
    top = [t for cell in state[len(state) - directions:] for t in cell]  # h_fwd, [c_fwd,] h_bwd, ...
    seq = layer.return_sequences
    if merge_mode == UNIDIRECTIONAL:
        outs = [outputs if seq else outputs[:, -1]]
    else:
        fwd, bwd = outputs[..., :UNITS], outputs[..., UNITS:]
        fwd, bwd = (fwd, bwd) if seq else (fwd[:, -1], bwd[:, 0])  # the backward direction ends at t=0
        outs = {"concat": [torch.cat([fwd, bwd], -1)], "sum": [fwd + bwd], "mul": [fwd * bwd],
                "ave": [(fwd + bwd) / 2], None: [fwd, bwd]}[merge_mode]
    return outs + (top if layer.return_state else [])


@pytest.mark.parametrize("impl", ["fused", "scratch"])
@pytest.mark.parametrize("merge_mode", [UNIDIRECTIONAL, "concat", "sum", "mul", "ave", None])
@pytest.mark.parametrize("return_state", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_keras_output_structure(cell, return_sequences, return_state, merge_mode, impl):
    torch.manual_seed(0)
    bidirectional = merge_mode != UNIDIRECTIONAL
    layer = KerasRecurrent(cell, FEATURES, UNITS, return_sequences=return_sequences, return_state=return_state,
                           bidirectional=bidirectional, merge_mode=merge_mode if bidirectional else "concat",
                           impl=impl)
    x = torch.randn(BATCH, STEPS, FEATURES)
    result = layer(x)

    n_outputs = 2 if merge_mode is None else 1
    n_states = (2 if cell == "lstm" else 1) * (2 if bidirectional else 1) if return_state else 0
    if n_outputs + n_states == 1:  # a bare tensor, as Keras returns it
        assert isinstance(result, torch.Tensor)
        parts = [result]
    else:  # Keras 3 returns a tuple (RNN.call: `return output, *states`; Bidirectional.call: `(y, y_rev)`)
        assert type(result) is tuple and len(result) == n_outputs + n_states
        parts = list(result)

    width = 2 * UNITS if merge_mode == "concat" else UNITS
    output_shape = (BATCH, STEPS, width) if return_sequences else (BATCH, width)
    assert [tuple(p.shape) for p in parts] == [output_shape] * n_outputs + [(BATCH, UNITS)] * n_states

    expected = expected_keras_result(layer, x, merge_mode)
    for k, (actual, wanted) in enumerate(zip(parts, expected, strict=True)):
        assert_close(actual, wanted, f"part {k}")
    if return_state and not return_sequences and merge_mode in (UNIDIRECTIONAL, None):
        assert_close(parts[0], parts[n_outputs], "last output vs h")  # a direction's last output is its h
    if return_state and not return_sequences and merge_mode is None:
        assert_close(parts[1], parts[n_outputs + n_states // 2], "backward last output vs h_bwd")


@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_keras_merge_none_is_the_concat_output_apart(cell, return_sequences):
    torch.manual_seed(0)
    layer = KerasRecurrent(cell, FEATURES, UNITS, return_sequences=return_sequences, bidirectional=True)
    x = torch.randn(BATCH, STEPS, FEATURES)
    concat = layer(x)
    layer.merge_mode = None
    forward, backward = layer(x)
    assert_close(forward, concat[..., :UNITS], "forward")
    assert_close(backward, concat[..., UNITS:], "backward")


@pytest.mark.parametrize("impl", ["fused", "scratch"])
def test_keras_backward_sequence_is_in_input_order(impl):
    """Keras runs the backward layer with go_backwards=True and flips its sequence back: position t holds the
    state after reading x_{T-1} .. x_t. Recomputed here with a plain torch.nn.GRU on the reversed input."""
    torch.manual_seed(0)
    layer = KerasRecurrent("gru", FEATURES, UNITS, return_sequences=True, bidirectional=True, merge_mode=None,
                           impl=impl)
    x = torch.randn(BATCH, STEPS, FEATURES)
    _, backward = layer(x)
    reverse = nn.GRU(FEATURES, UNITS, batch_first=True)
    weights = layer.backbone.fused_state_dict()
    reverse.load_state_dict({k.removesuffix("_reverse"): v for k, v in weights.items() if k.endswith("_reverse")})
    assert_close(backward, reverse(x.flip(1))[0].flip(1), "backward sequence")


def test_keras_stacked_bidirectional_states_are_the_top_layers():
    torch.manual_seed(0)
    layer = KerasRecurrent("lstm", FEATURES, UNITS, return_state=True, bidirectional=True, merge_mode=None,
                           num_layers=2)
    x = torch.randn(BATCH, STEPS, FEATURES)
    forward, backward, h_fwd, c_fwd, h_bwd, c_bwd = layer(x)
    _, state = layer.backbone(x)  # per cell, layer-major, forward first
    (h2, c2), (h3, c3) = state[2], state[3]
    for actual, wanted, name in [(h_fwd, h2, "h_fwd"), (c_fwd, c2, "c_fwd"), (h_bwd, h3, "h_bwd"),
                                 (c_bwd, c3, "c_bwd"), (forward, h2, "forward"), (backward, h3, "backward")]:
        assert_close(actual, wanted, name)


def test_keras_unknown_merge_mode_is_refused():
    with pytest.raises(ValueError, match=re.escape("merge_mode=max must be one of concat|sum|mul|ave|None")):
        KerasRecurrent("lstm", FEATURES, UNITS, bidirectional=True, merge_mode="max")


def test_keras_reset_before_gru_runs_from_scratch_cells():
    torch.manual_seed(0)
    layer = KerasRecurrent("gru", FEATURES, UNITS, return_state=True, impl="scratch", reset_after=False)
    out, h = layer(torch.randn(BATCH, STEPS, FEATURES))
    assert out.shape == h.shape == (BATCH, UNITS)
    assert_close(out, h, "last output vs h")


def test_reset_before_gru_weights_do_not_convert_to_or_from_torch_nn():
    assert "\n" not in RESET_BEFORE_HAS_NO_FUSED_FORM and "keep impl=scratch" in RESET_BEFORE_HAS_NO_FUSED_FORM
    torch.manual_seed(0)
    backbone = RecurrentStack("gru", 4, 4, num_layers=2, impl="scratch", cell_settings={"reset_after": False})
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    message = re.escape(RESET_BEFORE_HAS_NO_FUSED_FORM)
    with pytest.raises(ValueError, match=message):
        backbone.fused_state_dict()
    reset_after = RecurrentStack("gru", 4, 4, num_layers=2, impl="scratch").fused_state_dict()
    with pytest.raises(ValueError, match=message):  # was: AttributeError: 'GRUCell' object has no attribute 'b_hg'
        backbone.load_fused_state_dict(reset_after)
    with pytest.raises(ValueError, match=message):
        backbone.load_fused_state_dict(nn.GRU(4, 4, num_layers=2, batch_first=True).state_dict())
    for name, value in backbone.state_dict().items():  # the refused load left every weight as it was
        assert torch.equal(value, before[name]), name
