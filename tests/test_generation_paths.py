"""Generation's per-token paths give the sequence forward's outputs: every cell's stepper at batch sizes on both
sides of the fused cells' switch to oneDNN on packed weights (rnnlm.cells.fused.PACK_FROM_ROWS)."""

import pytest
import torch

from rnnlm.cells import BUILT_IN, cell_class
from rnnlm.cells.fused import ONEDNN_PACK, PACK_FROM_ROWS
from rnnlm.network import LanguageModel, NetworkConfig

BATCHES = (1, PACK_FROM_ROWS - 1, PACK_FROM_ROWS, 8)


@pytest.mark.parametrize("impl", ["fused", "scratch"])
@pytest.mark.parametrize("cell", list(BUILT_IN))
def test_the_stepper_gives_the_sequence_outputs_at_every_batch_size(cell, impl):
    torch.manual_seed(0)
    net = LanguageModel(NetworkConfig(30, cell, 16, 24, 2, 0.0, impl=impl)).eval()
    for batch in sorted({b for b in BATCHES if b > 0}):
        tokens = torch.randint(0, 30, (batch, 10))
        with torch.no_grad():
            full, final = net(tokens)
            _, state = net(tokens[:, :3])
        step = net.stepper(batch)
        logits = []
        for t in range(3, 10):
            out, state = step(tokens[:, t], state)
            logits.append(out)
        message = f"{cell} {impl}, {batch} rows"
        torch.testing.assert_close(torch.stack(logits, 1), full[:, 3:], rtol=1e-5, atol=1e-5, msg=message)
        torch.testing.assert_close(state, final, rtol=1e-5, atol=1e-5, msg=message)


@pytest.mark.skipif(ONEDNN_PACK is None, reason="this torch build has no oneDNN weight packing")
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_fused_cells_pack_from_the_threshold_and_never_under_autograd(cell):
    layer = cell_class(cell, "fused")(16, 24)
    with torch.no_grad():
        packed = {batch: layer.stepper(batch) != layer.step for batch in (1, PACK_FROM_ROWS, 8)}
    assert packed == {batch: layer.packs and batch >= PACK_FROM_ROWS for batch in packed}
    assert layer.packs == (cell != "rnn")
    # with autograd the step reads the parameters themselves, so their gradients are the step's
    assert layer.stepper(8) == layer.step
