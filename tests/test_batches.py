"""The batch layouts: stream columns for truncated BPTT, padded sentences, and what the model does with them."""

import numpy as np
import pytest
import torch

from rnnlm.batches import Sentences, StreamChunks
from rnnlm.corpora import DataError
from rnnlm.lightning_module import RecurrentLM
from rnnlm.loss import IGNORE_INDEX, pad_batch, sequence_loss
from rnnlm.state import state_tensors
from rnnlm.vocab import BOS, EOS, UNK, Vocab


def test_stream_columns_are_contiguous_and_targets_shift_by_one():
    ids = np.arange(103, dtype=np.uint16)  # 103 tokens -> 4 columns of 25, 3 dropped
    chunks = list(StreamChunks(ids, batch_size=4, seq_len=10))
    assert len(chunks) == len(StreamChunks(ids, 4, 10)) == 3  # steps 0-9, 10-19, 20-23
    inputs = torch.cat([x for x, _ in chunks], dim=1)
    targets = torch.cat([y for _, y in chunks], dim=1)
    for row in range(4):  # each row reads its own stretch of the stream in order
        assert inputs[row].tolist() == list(range(25 * row, 25 * row + 24))
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert targets[:, -1].tolist() == [24, 49, 74, 99]
    assert [x.shape for x, _ in chunks] == [(4, 10), (4, 10), (4, 4)]


def test_stream_ranks_read_every_token_once():
    ids = np.arange(1000, dtype=np.uint32)  # 2 ranks x 3 rows = 6 columns of 166 tokens; 4 dropped
    columns = []
    for rank in range(2):
        chunks = list(StreamChunks(ids, batch_size=3, seq_len=7, rank=rank, world_size=2))
        inputs = torch.cat([x for x, _ in chunks], dim=1)
        columns += torch.cat([inputs, chunks[-1][1][:, -1:]], dim=1).tolist()  # + each row's last target
    assert all(col == list(range(col[0], col[0] + 166)) for col in columns)  # contiguous
    assert sorted(t for col in columns for t in col) == list(range(996))  # none twice, none skipped


def test_stream_too_short_for_the_batch_is_a_clear_error():
    with pytest.raises(DataError, match="too few for 8 columns"):
        StreamChunks(np.arange(10, dtype=np.uint16), batch_size=8, seq_len=4, split="valid")


def _vocab():
    return Vocab("word", [UNK, EOS, BOS, "a", "b", "c"])


def test_sentences_start_with_bos_and_skip_empty_lines():
    v = _vocab()
    ids = np.array([3, 4, 1, 1, 5, 3, 4, 5, 1], dtype=np.uint16)  # "a b" / "" / "c a b c"
    sentences = Sentences(ids, v.line_end_id, v.bos_id, max_len=3)
    assert len(sentences) == 2 and sentences.truncated == 1
    x, y = sentences[0]
    assert x.tolist() == [2, 3, 4] and y.tolist() == [3, 4, 1]
    x, y = sentences[1]
    assert x.tolist() == [2, 5, 3] and y.tolist() == [5, 3, 4]  # cut to max_len
    inputs, targets = pad_batch([sentences[0], (torch.tensor([2]), torch.tensor([1]))])
    assert targets.tolist() == [[3, 4, 1], [1, IGNORE_INDEX, IGNORE_INDEX]]


def test_padding_never_contributes_to_the_loss():
    torch.manual_seed(0)
    model = RecurrentLM(_vocab(), cell="gru", embedding_dim=8, hidden_size=8, num_layers=1, dropout=0.0,
                        carry_state=False)
    short = (torch.tensor([[2, 3, 4]]), torch.tensor([[3, 4, 1]]))
    padded_a = (torch.tensor([[2, 3, 4, 0, 0]]), torch.tensor([[3, 4, 1, IGNORE_INDEX, IGNORE_INDEX]]))
    padded_b = (torch.tensor([[2, 3, 4, 5, 5]]), torch.tensor([[3, 4, 1, IGNORE_INDEX, IGNORE_INDEX]]))
    losses, grads = [], []
    for batch in (short, padded_a, padded_b):
        model.zero_grad()
        total, count = model._step(batch, "train")
        (total / count).backward()
        losses.append(total.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert count.item() == 3
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) == pytest.approx(losses[2], abs=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_hidden_state_is_carried_detached_between_chunks(cell):
    torch.manual_seed(0)
    model = RecurrentLM(_vocab(), cell=cell, embedding_dim=8, hidden_size=8, num_layers=2, dropout=0.0)
    ids = np.arange(3, 6).repeat(40).astype(np.uint16)
    first, second = list(StreamChunks(ids, batch_size=2, seq_len=10))[:2]
    model._step(first, "train")
    carried = model._state["train"]
    parts = state_tensors(carried)
    assert len(parts) == (4 if cell == "lstm" else 2)  # h (and c) of each of the two layers
    assert all(not p.requires_grad and p.grad_fn is None for p in parts)
    _, expected_end = model.net(first[0])  # the state at the end of chunk k, computed afresh
    expected = state_tensors(expected_end)
    assert all(torch.equal(p, e.detach()) for p, e in zip(parts, expected, strict=True))
    # chunk k+1 starts from exactly that state: same logits as running both chunks in one go
    both = torch.cat([first[0], second[0]], dim=1)
    full_logits, _ = model.net(both)
    model._step(second, "train")
    logits, _ = model.net(second[0], carried)
    torch.testing.assert_close(logits, full_logits[:, 10:], rtol=1e-5, atol=1e-6)
    # that each pass over the stream starts from zeros again: the pinned runs over several epochs
    # (test_pinned_training.py) and test_epoch_resume.py


def test_sequence_loss_counts_only_scored_targets():
    logits = torch.zeros(1, 3, 4)
    total, count = sequence_loss(logits, torch.tensor([[1, IGNORE_INDEX, 2]]))
    assert count.item() == 2 and total.item() == pytest.approx(2 * np.log(4))
