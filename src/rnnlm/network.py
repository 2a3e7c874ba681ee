"""The plain ``nn.Module`` language model: embedding (or one-hot) -> recurrent backbone -> decoder."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
NONLINEARITIES = ("tanh", "relu")

State = Tensor | tuple[Tensor, Tensor]  # h, or (h, c) for LSTM; each (num_layers, B, H)


def detach_state(state: State | None) -> State | None:
    """Keep the state's values but cut the graph: gradients stop at the chunk boundary (truncated BPTT)."""
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


class RecurrentBackbone(nn.Module):
    """A stack of recurrent layers on the fused ``torch.nn`` kernels, batch first.

    Args:
        cell: ``rnn`` (``h_t = act(W_x x_t + W_h h_{t-1} + b)``), ``lstm`` or ``gru``.
        dropout: applied to the outputs of every layer but the last.
        nonlinearity: ``tanh`` or ``relu``; vanilla RNN only.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0, nonlinearity: str = "tanh"):
        super().__init__()
        extra = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
        self.rnn = CELLS[cell](input_size, hidden_size, num_layers, batch_first=True,
                               dropout=dropout if num_layers > 1 else 0.0, **extra)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """x: (B, T, input_size) -> outputs (B, T, H) of the top layer, final state of every layer."""
        return self.rnn(x, state)


class LanguageModel(nn.Module):
    """Next-token model over a vocabulary.

    Args:
        vocab_size: number of token ids (comes from the data, not the config).
        cell: ``rnn``, ``lstm`` or ``gru``.
        embedding_dim: size of the learned embedding; ``None`` feeds one-hot vectors instead.
        hidden_size, num_layers: size of the recurrent stack.
        dropout: on the embeddings, between layers and before the decoder.
        nonlinearity: ``tanh`` or ``relu`` (vanilla RNN only).
        tie_weights: share the embedding matrix with the decoder (needs ``embedding_dim == hidden_size``).
        init_range: embedding and decoder weights start uniform in ``±init_range``.
    """

    def __init__(self, vocab_size: int, cell: str = "lstm", embedding_dim: int | None = 200,
                 hidden_size: int = 200, num_layers: int = 2, dropout: float = 0.2,
                 nonlinearity: str = "tanh", tie_weights: bool = False, init_range: float = 0.1):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, cell=cell, embedding_dim=embedding_dim,
                           hidden_size=hidden_size, num_layers=num_layers, dropout=dropout,
                           nonlinearity=nonlinearity, tie_weights=tie_weights, init_range=init_range)
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if embedding_dim else None
        self.drop = nn.Dropout(dropout)
        self.backbone = RecurrentBackbone(cell, embedding_dim or vocab_size, hidden_size, num_layers,
                                          dropout, nonlinearity)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        if self.embedding is not None:
            nn.init.uniform_(self.embedding.weight, -init_range, init_range)
        nn.init.uniform_(self.decoder.weight, -init_range, init_range)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            if self.embedding is None or embedding_dim != hidden_size:
                raise ValueError("tie_weights needs embedding_dim == hidden_size")
            self.decoder.weight = self.embedding.weight

    def embed(self, tokens: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, E) inputs of the backbone."""
        if self.embedding is None:  # one-hot: each id selects one column of the first layer's input weights
            return F.one_hot(tokens, self.vocab_size).to(self.decoder.weight.dtype)
        return self.drop(self.embedding(tokens))

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens (B, T) -> logits (B, T, V) and the final state, to pass to the next call."""
        outputs, state = self.backbone(self.embed(tokens), state)  # (B, T, H)
        return self.decoder(self.drop(outputs)), state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sequence_loss(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy (nats) over the scored targets, and how many there were."""
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="sum")
    return total, (targets != ignore_index).sum()

