"""The plain ``nn.Module`` language model: embedding (or one-hot) -> recurrent backbone -> decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm.backbone import RecurrentBackbone, State


class LanguageModel(nn.Module):
    """Next-token model over a vocabulary, or, bidirectional, a model of each token from both sides.

    Args:
        vocab_size: number of token ids (comes from the data, not the config).
        cell: ``rnn``, ``lstm`` or ``gru``.
        embedding_dim: size of the learned embedding; ``None`` feeds one-hot vectors instead.
        hidden_size, num_layers: size of the recurrent stack.
        dropout: on the embeddings, between layers and before the decoder.
        nonlinearity: ``tanh`` or ``relu`` (vanilla RNN only).
        tie_weights: share the embedding matrix with the decoder (needs ``embedding_dim`` equal to the
            decoder's input: ``hidden_size``, or ``2 * hidden_size`` when bidirectional).
        init_range: embedding and decoder weights start uniform in ``±init_range`` (all parameters
            with ``init_all``; otherwise the recurrent ones keep torch.nn's ``±1/sqrt(hidden_size)``).
        bidirectional: a bidirectional LM: token t is predicted from the forward state at t-1 and the
            backward state at t+1, so no prediction sees its own token. It cannot generate text.
        impl: ``fused`` (torch.nn kernels) or ``scratch`` (the textbook cells of :mod:`rnnlm.cells`).
        reset_after: GRU only: torch.nn's form (True) or the original reset-before GRU (scratch only).
    """

    def __init__(self, vocab_size: int, cell: str = "lstm", embedding_dim: int | None = 200,
                 hidden_size: int = 200, num_layers: int = 2, dropout: float = 0.2,
                 nonlinearity: str = "tanh", tie_weights: bool = False, init_range: float = 0.1,
                 bidirectional: bool = False, impl: str = "fused", reset_after: bool = True,
                 init_all: bool = False):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, cell=cell, embedding_dim=embedding_dim,
                           hidden_size=hidden_size, num_layers=num_layers, dropout=dropout,
                           nonlinearity=nonlinearity, tie_weights=tie_weights, init_range=init_range,
                           bidirectional=bidirectional, impl=impl, reset_after=reset_after, init_all=init_all)
        self.bidirectional = bidirectional
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if embedding_dim else None
        self.drop = nn.Dropout(dropout)
        stack = (cell, embedding_dim or vocab_size, hidden_size, num_layers, dropout, nonlinearity, False, impl,
                 reset_after)
        self.backbone = RecurrentBackbone(*stack)
        # A bidirectional LM keeps its directions in two separate stacks (as ELMo does): in one
        # interleaved bidirectional stack, layer 2's forward state at t would already have read the
        # backward layer-1 outputs, and through them token t+1 onward.
        self.backward_backbone = RecurrentBackbone(*stack) if bidirectional else None
        features = hidden_size * (2 if bidirectional else 1)
        self.decoder = nn.Linear(features, vocab_size)
        if init_all:  # every weight and bias, recurrent ones too (Zaremba et al. 2014)
            for parameter in self.parameters():
                nn.init.uniform_(parameter, -init_range, init_range)
        else:
            if self.embedding is not None:
                nn.init.uniform_(self.embedding.weight, -init_range, init_range)
            nn.init.uniform_(self.decoder.weight, -init_range, init_range)
            nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            if self.embedding is None or embedding_dim != features:
                raise ValueError(f"tie_weights needs embedding_dim == {features} (the decoder's input size)")
            self.decoder.weight = self.embedding.weight

    def embed(self, tokens: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, E) inputs of the backbone."""
        if self.embedding is None:  # one-hot: each id selects one column of the first layer's input weights
            return F.one_hot(tokens, self.vocab_size).to(self.decoder.weight.dtype)
        return self.drop(self.embedding(tokens))

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State | None]:
        """tokens (B, T) -> logits (B, T, V) and the final state, to pass to the next call.

        Causal: ``logits[:, t]`` predicts ``tokens[:, t+1]``. Bidirectional: ``logits[:, t]`` predicts
        ``tokens[:, t]`` itself, from the forward state after t-1 and the backward state after t+1
        (zeros beyond the ends); no state is returned, as the backward direction has no future to carry.
        """
        inputs = self.embed(tokens)
        outputs, state = self.backbone(inputs, state)  # (B, T, H)
        if self.backward_backbone is not None:
            backward, _ = self.backward_backbone(inputs.flip(1))  # read from the end
            backward = backward.flip(1)  # row t: the backward state after reading tokens T-1 .. t
            before = F.pad(outputs[:, :-1], (0, 0, 1, 0))  # row t: the forward state after token t-1
            after = F.pad(backward[:, 1:], (0, 0, 0, 1))  # row t: the backward state after token t+1
            outputs, state = torch.cat([before, after], -1), None
        return self.decoder(self.drop(outputs)), state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sequence_loss(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy (nats) over the scored targets, and how many there were."""
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="sum")
    return total, (targets != ignore_index).sum()

