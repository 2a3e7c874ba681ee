"""The plain ``nn.Module`` language model (embedding or one-hot -> recurrent backbone -> decoder) and the
frozen config that describes it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm.backbone import CELLS, IMPLS, NONLINEARITIES, RecurrentBackbone, State
from rnnlm.errors import ConfigError, positive_integer


@dataclass(frozen=True)
class NetworkConfig:
    """Everything that shapes a :class:`LanguageModel`, and nothing else; ``model.*`` in the configs (and a
    checkpoint's ``network`` section) are its fields by name. A new model option is a field here and a
    line in ``rnnlm/conf/model/_recurrent.yaml``.

    Fields:
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

    Raises:
        ConfigError: on construction, listing every invalid field as ``model.<field>=<value>`` and the fix.
    """

    vocab_size: int
    cell: str = "lstm"
    embedding_dim: int | None = 200
    hidden_size: int = 200
    num_layers: int = 2
    dropout: float = 0.2
    nonlinearity: str = "tanh"
    tie_weights: bool = False
    init_range: float = 0.1
    bidirectional: bool = False
    impl: str = "fused"
    reset_after: bool = True
    init_all: bool = False

    def __post_init__(self):
        problems = self.problems_of(self)
        positive_integer(problems, "vocab_size", self.vocab_size)
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def from_settings(cls, settings: Mapping, vocab_size: int | None = None) -> NetworkConfig:
        """The config from ``model.*`` settings (or a checkpoint's ``network`` section); keys that are not
        fields (how the model trains, e.g. ``compile``) are left out, missing fields take their defaults."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in settings.items() if k in names}
        if vocab_size is not None:
            values["vocab_size"] = vocab_size
        return cls(**values)

    @staticmethod
    def problems_of(model) -> list[str]:
        """Every invalid field of ``model`` (this config, or the ``model.*`` settings before it is built)."""
        problems: list[str] = []
        if model.cell not in CELLS:
            problems.append(f"model.cell={model.cell} is unknown: use model={'|'.join(CELLS)}")
        positive_integer(problems, "model.hidden_size", model.hidden_size)
        positive_integer(problems, "model.num_layers", model.num_layers)
        positive_integer(problems, "model.embedding_dim", model.embedding_dim, allow_none=True)
        if not 0 <= model.dropout < 1:
            problems.append(f"model.dropout={model.dropout} must be in [0, 1)")
        if model.nonlinearity not in NONLINEARITIES:
            problems.append(f"model.nonlinearity={model.nonlinearity} must be one of {'|'.join(NONLINEARITIES)}")
        decoder_input = model.hidden_size * (2 if model.bidirectional else 1)
        if model.tie_weights and model.embedding_dim != decoder_input:
            problems.append(
                f"model.tie_weights=true needs model.embedding_dim ({model.embedding_dim}) == the decoder's input "
                f"size ({decoder_input}): set model.embedding_dim={decoder_input} or model.tie_weights=false"
            )
        if model.impl not in IMPLS:
            problems.append(f"model.impl={model.impl} must be one of {'|'.join(IMPLS)}")
        if model.cell == "gru" and not model.reset_after and model.impl != "scratch":
            problems.append("model.reset_after=false (the original GRU) has no fused kernel: add model.impl=scratch")
        return problems

    def settings(self) -> dict:
        """The fields as plain data (for checkpoints)."""
        return asdict(self)


class LanguageModel(nn.Module):
    """Next-token model over a vocabulary, or, bidirectional, a model of each token from both sides;
    :class:`NetworkConfig` describes it. This is the network alone, in plain PyTorch: checkpoints load
    into it, and :class:`rnnlm.module.RecurrentLM` (the Lightning module) trains it."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        self.bidirectional = config.bidirectional
        self.vocab_size = config.vocab_size
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim) if config.embedding_dim else None
        self.drop = nn.Dropout(config.dropout)

        def stack() -> RecurrentBackbone:
            return RecurrentBackbone(
                config.cell, config.embedding_dim or config.vocab_size, config.hidden_size, config.num_layers,
                dropout=config.dropout, nonlinearity=config.nonlinearity, impl=config.impl,
                reset_after=config.reset_after,
            )

        self.backbone = stack()
        # A bidirectional LM keeps its directions in two separate stacks (as ELMo does): in one
        # interleaved bidirectional stack, layer 2's forward state at t would already have read the
        # backward layer-1 outputs, and through them token t+1 onward.
        self.backward_backbone = stack() if config.bidirectional else None
        features = config.hidden_size * (2 if config.bidirectional else 1)
        self.decoder = nn.Linear(features, config.vocab_size)
        init_range = config.init_range
        if config.init_all:  # every weight and bias, recurrent ones too (Zaremba et al. 2014)
            for parameter in self.parameters():
                nn.init.uniform_(parameter, -init_range, init_range)
        else:
            if self.embedding is not None:
                nn.init.uniform_(self.embedding.weight, -init_range, init_range)
            nn.init.uniform_(self.decoder.weight, -init_range, init_range)
            nn.init.zeros_(self.decoder.bias)
        if config.tie_weights:  # checked by the config: the sizes match
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

