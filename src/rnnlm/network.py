"""The plain ``nn.Module`` language model (embedding or one-hot -> recurrent backbone -> decoder) and the
frozen config that describes it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm.backbone import RecurrentBackbone, State
from rnnlm.errors import ConfigError
from rnnlm.loss import IGNORE_INDEX, sequence_loss
from rnnlm.minrnn import MIN_CELLS
from rnnlm.regularization import embedding_dropout, sequence_dropout
from rnnlm.schema import integer, network_problems

SOFTMAXES = ("full", "adaptive")
# Where the adaptive softmax's clusters start when model.adaptive_cutoffs is not given: the 2,000 most
# frequent tokens (most of any text's tokens) in the head, then clusters of growing size and shrinking
# width. Those below the vocabulary size are used.
DEFAULT_CUTOFFS = (2_000, 10_000, 50_000, 200_000)


def adaptive_cutoffs(vocab_size: int, cutoffs: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The cluster boundaries of an adaptive softmax over ``vocab_size`` frequency-sorted ids: ``cutoffs``,
    or those of :data:`DEFAULT_CUTOFFS` that leave every cluster at least one id (empty if none does)."""
    if cutoffs is not None:
        return tuple(cutoffs)
    return tuple(c for c in DEFAULT_CUTOFFS if c < vocab_size - 1)


def cluster_width_problems(model, clusters: int) -> list[str]:
    """The adaptive softmax's cluster i projects to ``features / div_value**(i+1)`` units (rounded down, as torch.nn
    does): a cluster of zero units could never be predicted."""
    features = model.projection_size or model.hidden_size * (2 if model.bidirectional else 1)
    width = int(features // (model.adaptive_div_value ** clusters))
    if width >= 1:
        return []
    return [f"model.adaptive_div_value={model.adaptive_div_value} leaves cluster {clusters} of the adaptive softmax "
            f"0 units wide ({features} / {model.adaptive_div_value}^{clusters}): lower model.adaptive_div_value "
            f"(at most {features ** (1 / clusters):.4g}) or give fewer model.adaptive_cutoffs"]


@dataclass(frozen=True)
class NetworkConfig:
    """Everything that shapes a :class:`LanguageModel`, and nothing else; ``model.*`` in the configs (and a
    checkpoint's ``network`` section) are its fields by name. A new model option is a field here and a
    line in ``conf/model/_recurrent.yaml``.

    Fields:
        vocab_size: number of token ids (comes from the data, not the config).
        cell: ``rnn``, ``lstm``, ``gru``, ``mingru`` or ``minlstm``.
        embedding_dim: size of the learned embedding; ``None`` feeds one-hot vectors instead.
        hidden_size, num_layers: size of the recurrent stack.
        dropout: on the top layer's outputs, before the decoder; also on the embeddings and between layers
            unless ``input_dropout`` / ``layer_dropout`` say otherwise.
        input_dropout: on the embeddings (AWD-LSTM's ``dropouti``); ``None``: ``dropout``.
        layer_dropout: between layers (AWD-LSTM's ``dropouth``); ``None``: ``dropout``.
        locked_dropout: those three draw one mask per sequence, the same at every time step (variational
            dropout, Gal and Ghahramani 2016), instead of one per step.
        embedding_dropout: drops whole words: each vocabulary row of the embedding is zeroed for the batch with
            this probability (AWD-LSTM's ``dropoute``).
        weight_drop: DropConnect on the hidden-to-hidden matrices, a new mask per forward call (AWD-LSTM's
            ``wdrop``; not for minGRU/minLSTM, which have none).
        projection_size: a linear map from the top layer's outputs to this size before the decoder (``None``:
            none), so that a stack wider than the embedding can still tie the decoder to it. (AWD-LSTM narrows
            its top layer instead; rnnlm's layers share one width.)
        nonlinearity: ``tanh`` or ``relu`` (vanilla RNN only).
        tie_weights: share the embedding matrix with the decoder (needs ``embedding_dim`` equal to the
            decoder's input: ``hidden_size``, or ``2 * hidden_size`` when bidirectional).
        init_range: embedding and decoder weights start uniform in ``±init_range`` (all parameters
            with ``init_all``; otherwise the recurrent ones keep torch.nn's ``±1/sqrt(hidden_size)``).
        bidirectional: a bidirectional LM: token t is predicted from the forward state at t-1 and the
            backward state at t+1, so no prediction sees its own token. It cannot generate text.
        impl: ``fused`` (torch.nn kernels; minGRU/minLSTM: the parallel scan) or ``scratch`` (the textbook cells of
            :mod:`rnnlm.cells`; minGRU/minLSTM: the step-by-step loop).
        reset_after: GRU only: torch.nn's form (True) or the original reset-before GRU (scratch only).
        softmax: ``full`` (one linear decoder over the vocabulary) or ``adaptive`` (Grave et al. 2017,
            ``torch.nn.AdaptiveLogSoftmaxWithLoss``: the frequent tokens in a small head, the rare ones in
            clusters reached through it, each with a narrower projection; needs ids sorted by frequency, as
            word vocabularies are).
        adaptive_cutoffs: where the adaptive softmax's clusters start (increasing ids); ``None`` takes
            :func:`adaptive_cutoffs`' default for the vocabulary size.
        adaptive_div_value: each cluster's projection is this many times narrower than the previous one.

    Raises:
        ConfigError: on construction, listing every invalid field as ``model.<field>=<value>`` and the fix.
    """

    vocab_size: int
    cell: str = "lstm"
    embedding_dim: int | None = 200
    hidden_size: int = 200
    num_layers: int = 2
    dropout: float = 0.2
    input_dropout: float | None = None
    layer_dropout: float | None = None
    locked_dropout: bool = False
    embedding_dropout: float = 0.0
    weight_drop: float = 0.0
    projection_size: int | None = None
    nonlinearity: str = "tanh"
    tie_weights: bool = False
    init_range: float = 0.1
    bidirectional: bool = False
    impl: str = "fused"
    reset_after: bool = True
    init_all: bool = False
    softmax: str = "full"
    adaptive_cutoffs: tuple[int, ...] | None = None
    adaptive_div_value: float = 4.0

    def __post_init__(self):
        if self.adaptive_cutoffs is not None:  # a list from YAML or a checkpoint: frozen, like the rest
            object.__setattr__(self, "adaptive_cutoffs", tuple(self.adaptive_cutoffs))
        problems = self.problems_of(self)
        if problem := integer(1).problem("vocab_size", self.vocab_size):
            problems.append(problem)
        if self.softmax == "adaptive" and not problems:
            cutoffs = adaptive_cutoffs(self.vocab_size, self.adaptive_cutoffs)
            if not cutoffs:
                problems.append(
                    f"model.softmax=adaptive: a vocabulary of {self.vocab_size:,} tokens is too small for the default "
                    f"clusters (the first starts at {DEFAULT_CUTOFFS[0]:,}): use model.softmax=full, or give "
                    "model.adaptive_cutoffs=[...]"
                )
            elif cutoffs[-1] >= self.vocab_size:
                problems.append(f"model.adaptive_cutoffs={list(cutoffs)} must all be below the vocabulary size "
                                f"({self.vocab_size:,}): lower them or drop the last")
            else:
                problems += cluster_width_problems(self, len(cutoffs))
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
        settings = model.settings() if isinstance(model, NetworkConfig) else dict(model.items())
        problems = network_problems(settings)  # each field's type and range
        if problems:  # the rules below compare fields, which needs them well typed
            return problems
        if getattr(model, "weight_drop", 0) and model.cell in MIN_CELLS:
            problems.append(f"model.weight_drop drops hidden-to-hidden weights, which {model.cell} does not have "
                            "(its gates read only the input): set model.weight_drop=0")
        if getattr(model, "embedding_dropout", 0) and not model.embedding_dim:
            problems.append("model.embedding_dropout drops rows of the embedding, and model.embedding_dim=null feeds "
                            "one-hot vectors instead: set model.embedding_dim or model.embedding_dropout=0")
        projection = getattr(model, "projection_size", None)
        if model.nonlinearity != "tanh" and model.cell != "rnn":  # options a cell would silently ignore
            problems.append(f"model.nonlinearity={model.nonlinearity} applies to model=rnn only ({model.cell} has its "
                            "own fixed activations): drop it, or use model=rnn")
        if model.reset_after is False and model.cell != "gru":
            problems.append(f"model.reset_after=false applies to model=gru only ({model.cell} has no reset gate): "
                            "drop it, or use model=gru")
        decoder_input = projection or model.hidden_size * (2 if model.bidirectional else 1)
        if model.tie_weights and model.embedding_dim != decoder_input:
            problems.append(
                f"model.tie_weights=true needs model.embedding_dim ({model.embedding_dim}) == the decoder's input "
                f"size ({decoder_input}): set model.embedding_dim={decoder_input}, "
                f"model.projection_size={model.embedding_dim} or model.tie_weights=false"
            )
        if model.cell == "gru" and not model.reset_after and model.impl != "scratch":
            problems.append("model.reset_after=false (the original GRU) has no fused kernel: add model.impl=scratch")
        if model.softmax == "adaptive":
            problems += cluster_width_problems(model, 1)  # the first cluster; the others once the vocabulary is known
            if model.tie_weights:
                problems.append("model.tie_weights=true shares the embedding with a full decoder, which "
                                "model.softmax=adaptive does not have: set model.tie_weights=false")
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

        def stack() -> RecurrentBackbone:
            return RecurrentBackbone(
                config.cell, config.embedding_dim or config.vocab_size, config.hidden_size, config.num_layers,
                dropout=_or(config.layer_dropout, config.dropout), nonlinearity=config.nonlinearity,
                impl=config.impl, reset_after=config.reset_after, weight_drop=config.weight_drop,
                locked_dropout=config.locked_dropout,
            )

        self.backbone = stack()
        # A bidirectional LM keeps its directions in two separate stacks (as ELMo does): in one
        # interleaved bidirectional stack, layer 2's forward state at t would already have read the
        # backward layer-1 outputs, and through them token t+1 onward.
        self.backward_backbone = stack() if config.bidirectional else None
        features = config.hidden_size * (2 if config.bidirectional else 1)
        self.projection = nn.Linear(features, config.projection_size) if config.projection_size else None
        features = config.projection_size or features
        self.adaptive = config.softmax == "adaptive"
        if self.adaptive:  # the config checked that the cutoffs fit the vocabulary
            self.decoder = nn.AdaptiveLogSoftmaxWithLoss(
                features, config.vocab_size, list(adaptive_cutoffs(config.vocab_size, config.adaptive_cutoffs)),
                div_value=config.adaptive_div_value)
        else:
            self.decoder = nn.Linear(features, config.vocab_size)
        init_range = config.init_range
        if config.init_all:  # every weight and bias, recurrent ones too (Zaremba et al. 2014)
            for parameter in self.parameters():
                nn.init.uniform_(parameter, -init_range, init_range)
        else:
            if self.embedding is not None:
                nn.init.uniform_(self.embedding.weight, -init_range, init_range)
            for name, parameter in self.decoder.named_parameters():
                if name.endswith("weight"):
                    nn.init.uniform_(parameter, -init_range, init_range)
                else:
                    nn.init.zeros_(parameter)
        if config.tie_weights:  # checked by the config: the sizes match, and the decoder is a full one
            self.decoder.weight = self.embedding.weight

    @property
    def device(self) -> torch.device:
        """Where the network's weights are: its inputs are made there."""
        return next(self.decoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    def embed(self, tokens: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, E) inputs of the backbone."""
        if self.embedding is None:  # one-hot: each id selects one column of the first layer's input weights
            return F.one_hot(tokens, self.vocab_size).to(self.dtype)
        config = self.config
        weight = embedding_dropout(self.embedding.weight, config.embedding_dropout, self.training)
        return sequence_dropout(F.embedding(tokens, weight), _or(config.input_dropout, config.dropout),
                                config.locked_dropout, self.training)

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State | None]:
        """tokens (B, T) -> logits (B, T, V) and the final state, to pass to the next call.

        Causal: ``logits[:, t]`` predicts ``tokens[:, t+1]``. Bidirectional: ``logits[:, t]`` predicts
        ``tokens[:, t]`` itself, from the forward state after t-1 and the backward state after t+1
        (zeros beyond the ends); no state is returned, as the backward direction has no future to carry.
        With the adaptive softmax the logits are the full log-probabilities (already normalised).
        """
        features, state = self.features(tokens, state)
        return self.logits(features), state

    def features(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State | None]:
        """tokens (B, T) -> what the decoder reads (B, T, D), after dropout (and the projection), and the final
        state (see :meth:`forward`). Training computes its loss from these, so an adaptive softmax never builds
        the full (B, T, V) distribution."""
        features, state, _, _ = self.features_and_outputs(tokens, state)
        return features, state

    def features_and_outputs(self, tokens: Tensor, state: State | None = None
                             ) -> tuple[Tensor, State | None, Tensor, Tensor]:
        """:meth:`features` and the top layer's outputs (B, T, D*H) before and after the output dropout, which
        activation regularization reads (:func:`rnnlm.regularization.activation_penalty`)."""
        inputs = self.embed(tokens)
        outputs, state = self.backbone(inputs, state)  # (B, T, H)
        if self.backward_backbone is not None:
            backward, _ = self.backward_backbone(inputs.flip(1))  # read from the end
            backward = backward.flip(1)  # row t: the backward state after reading tokens T-1 .. t
            before = F.pad(outputs[:, :-1], (0, 0, 1, 0))  # row t: the forward state after token t-1
            after = F.pad(backward[:, 1:], (0, 0, 0, 1))  # row t: the backward state after token t+1
            outputs, state = torch.cat([before, after], -1), None
        dropped = sequence_dropout(outputs, self.config.dropout, self.config.locked_dropout, self.training)
        features = dropped if self.projection is None else self.projection(dropped)
        return features, state, outputs, dropped

    def logits(self, features: Tensor) -> Tensor:
        """features (..., D) -> scores over the vocabulary (..., V); softmax gives the model's distribution."""
        if self.adaptive:
            return self.decoder.log_prob(features.reshape(-1, features.size(-1))).view(*features.shape[:-1], -1)
        return self.decoder(features)

    def summed_loss(self, features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Summed cross-entropy (nats) of the targets (B, T) given features (B, T, D), and how many targets were
        scored (not :data:`~rnnlm.loss.IGNORE_INDEX`). Exact for both softmaxes: the adaptive one computes
        each target's own log-probability, through its cluster, without the rest of the distribution."""
        if not self.adaptive:
            return sequence_loss(self.decoder(features), targets)
        scored = targets != IGNORE_INDEX
        # padding gets a valid id (0) and is masked out of the sum: no data-dependent shapes here
        target_logprob = self.decoder(features.reshape(-1, features.size(-1)),
                                      targets.masked_fill(~scored, 0).flatten()).output
        return -(target_logprob * scored.flatten()).sum(), scored.sum()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _or(value: float | None, default: float) -> float:
    return default if value is None else value

