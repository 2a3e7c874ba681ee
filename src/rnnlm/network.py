"""The plain ``nn.Module`` language model (embedding or one-hot -> recurrent backbone -> decoder) and the
frozen config that describes it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from rnnlm.cells import BUILT_IN, FEATURES, cell_class, cell_problem, setting_defaults
from rnnlm.errors import ConfigError
from rnnlm.loss import IGNORE_INDEX, sequence_loss
from rnnlm.regularization import embedding_dropout, sequence_dropout
from rnnlm.schema import integer, network_problems, shown
from rnnlm.stack import RecurrentStack, layer_widths
from rnnlm.state import State

SOFTMAXES = ("full", "adaptive")
CANNOT_GENERATE = "a bidirectional model cannot generate text: it predicts tokens from both sides"
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


def decoder_input_size(model) -> int:
    """What the decoder reads: the projection's width, or the top layer's (both directions)."""
    top = model.hidden_size if isinstance(model.hidden_size, int) else model.hidden_size[-1]
    return model.projection_size or top * (2 if model.bidirectional else 1)


def cluster_width_problems(model, clusters: int) -> list[str]:
    """The adaptive softmax's cluster i projects to ``features / div_value**(i+1)`` units (rounded down, as torch.nn
    does): a cluster of zero units could never be predicted."""
    features = decoder_input_size(model)
    width = int(features // (model.adaptive_div_value ** clusters))
    if width >= 1:
        return []
    return [f"model.adaptive_div_value={model.adaptive_div_value} leaves cluster {clusters} of the adaptive softmax "
            f"0 units wide ({features} / {model.adaptive_div_value}^{clusters}): lower model.adaptive_div_value "
            f"(at most {features ** (1 / clusters):.4g}) or give fewer model.adaptive_cutoffs"]


@dataclass(frozen=True)
class NetworkConfig:
    """Everything that shapes a :class:`LanguageModel`, and nothing else; ``model.*`` in the configs (and a
    checkpoint's ``network`` section) are its fields by name, and the cell's own settings beside them. A new model
    option is a field here and a line in ``conf/model/_recurrent.yaml``; a cell's own option is declared by the cell
    (:class:`rnnlm.cells.RecurrentCell`).

    Fields:
        vocab_size: number of token ids (comes from the data, not the config).
        cell: a built-in cell (``rnn``, ``lstm``, ``gru``, ``mingru``, ``minlstm``) or the class path of a user's
            cell (``mypackage.cells:MyCell``): :func:`rnnlm.cells.cell_class`.
        embedding_dim: size of the learned embedding; ``None`` feeds one-hot vectors instead.
        hidden_size: every layer's width, or one width per layer (AWD-LSTM's 1150, 1150, 400).
        num_layers: how many layers.
        dropout: on the top layer's outputs, before the decoder; also on the embeddings and between layers
            unless ``input_dropout`` / ``layer_dropout`` say otherwise.
        input_dropout: on the embeddings (AWD-LSTM's ``dropouti``); ``None``: ``dropout``.
        layer_dropout: between layers (AWD-LSTM's ``dropouth``); ``None``: ``dropout``.
        locked_dropout: those three draw one mask per sequence, the same at every time step (variational
            dropout, Gal and Ghahramani 2016), instead of one per step.
        embedding_dropout: drops whole words: each vocabulary row of the embedding is zeroed for the batch with
            this probability (AWD-LSTM's ``dropoute``).
        weight_drop: DropConnect on the hidden-to-hidden matrices, a new mask per forward call (AWD-LSTM's
            ``wdrop``; for cells that support it: not minGRU/minLSTM, which have none).
        projection_size: a linear map from the top layer's outputs to this size before the decoder (``None``:
            none), so that a stack wider than the embedding can still tie the decoder to it. (AWD-LSTM narrows
            its top layer instead: ``hidden_size=[1150, 1150, 400]``.)
        tie_weights: share the embedding matrix with the decoder (needs ``embedding_dim`` equal to the
            decoder's input: the top layer's width, twice that when bidirectional, or ``projection_size``).
        init_range: embedding and decoder weights start uniform in ``±init_range`` (all parameters
            with ``init_all``; otherwise the recurrent ones keep torch.nn's ``±1/sqrt(hidden_size)``).
        bidirectional: a bidirectional LM: token t is predicted from the forward state at t-1 and the
            backward state at t+1, so no prediction sees its own token. It cannot generate text.
        impl: a built-in cell's form: ``fused`` (torch's kernels; minGRU/minLSTM: the parallel scan) or ``scratch``
            (the textbook equations; minGRU/minLSTM: the step-by-step loop).
        softmax: ``full`` (one linear decoder over the vocabulary) or ``adaptive`` (Grave et al. 2017,
            ``torch.nn.AdaptiveLogSoftmaxWithLoss``: the frequent tokens in a small head, the rare ones in
            clusters reached through it, each with a narrower projection; needs ids sorted by frequency, as
            word vocabularies are).
        adaptive_cutoffs: where the adaptive softmax's clusters start (increasing ids); ``None`` takes
            :func:`adaptive_cutoffs`' default for the vocabulary size.
        adaptive_div_value: each cluster's projection is this many times narrower than the previous one.
        cell_settings: the cell's own settings by name (``nonlinearity`` of rnn, ``reset_after`` of gru, those a user's
            cell declares); the defaults of those not given.

    Raises:
        ConfigError: on construction, listing every invalid field as ``model.<field>=<value>`` and the fix.
    """

    vocab_size: int
    cell: str = "lstm"
    embedding_dim: int | None = 200
    hidden_size: int | tuple[int, ...] = 200
    num_layers: int = 2
    dropout: float = 0.2
    input_dropout: float | None = None
    layer_dropout: float | None = None
    locked_dropout: bool = False
    embedding_dropout: float = 0.0
    weight_drop: float = 0.0
    projection_size: int | None = None
    tie_weights: bool = False
    init_range: float = 0.1
    bidirectional: bool = False
    impl: str = "fused"
    init_all: bool = False
    softmax: str = "full"
    adaptive_cutoffs: tuple[int, ...] | None = None
    adaptive_div_value: float = 4.0
    cell_settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.adaptive_cutoffs is not None:  # a list from YAML or a checkpoint: frozen, like the rest
            object.__setattr__(self, "adaptive_cutoffs", tuple(self.adaptive_cutoffs))
        if isinstance(self.hidden_size, Sequence) and not isinstance(self.hidden_size, str):  # a list: frozen
            object.__setattr__(self, "hidden_size", tuple(self.hidden_size))
        problems = self.problems_of(self.settings())
        if not problems:
            cell = cell_class(self.cell, self.impl)
            problems += [f"model.{key} is not a setting of model.cell={self.cell} (its own: "
                         f"{', '.join(cell.settings) or 'none'})"
                         for key in self.cell_settings if key not in cell.settings]
            object.__setattr__(self, "cell_settings", {**setting_defaults(cell), **dict(self.cell_settings)})
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
        """The config from ``model.*`` settings (or a checkpoint's ``network`` section): its fields, and the settings
        the cell declares; other keys (how the model trains, e.g. ``compile``) are left out, and missing ones take
        their defaults.

        Raises:
            ConfigError: listing every invalid setting, as on construction.
        """
        names = {f.name for f in fields(cls)} - {"cell_settings"}
        values = {k: v for k, v in settings.items() if k in names}
        if vocab_size is not None:
            values["vocab_size"] = vocab_size
        if problem := cell_problem(values.get("cell", cls.cell), values.get("impl", cls.impl)):
            raise ConfigError(problem)
        declared = cell_class(values.get("cell", cls.cell), values.get("impl", cls.impl)).settings
        values["cell_settings"] = {k: v for k, v in settings.items() if k in declared}
        return cls(**values)

    @staticmethod
    def problems_of(model: Mapping) -> list[str]:
        """Every invalid setting of ``model``: ``model.*`` by name (a config's section, or :meth:`settings`)."""
        model = dict(model.items())
        problems = network_problems(model)  # each field's type and range
        if problems:  # the rules below compare fields, which needs them well typed
            return problems
        name, impl = model.get("cell", NetworkConfig.cell), model.get("impl", NetworkConfig.impl)
        if problem := cell_problem(name, impl):
            return [problem]
        cell = cell_class(name, impl)
        problems += _cell_setting_problems(cell, name, model)
        if model.get("init_all") and model.get("forget_bias") is not None:
            problems.append(f"model.forget_bias={shown(model['forget_bias'])} is undone by model.init_all=true, which "
                            "draws every bias afterwards (the forget gate's too): set one of them, not both")
        for feature, (key, off) in FEATURES.items():
            value = model.get(feature, 0)
            if value and feature not in cell.supports:
                problems.append(f"{key}={shown(value)}: model.cell={name} does not support {feature.replace('_', ' ')} "
                                f"(it supports {', '.join(sorted(cell.supports)) or 'none of ' + '|'.join(FEATURES)}): "
                                f"set {key}={off}, or use another cell")
        widths = model.get("hidden_size", NetworkConfig.hidden_size)
        layers = model.get("num_layers", NetworkConfig.num_layers)
        if not isinstance(widths, int) and len(widths) != layers:
            problems.append(f"model.hidden_size={shown(widths)} gives {len(widths)} widths for "
                            f"model.num_layers={layers}: give one width per layer, or one width for all")
            return problems
        if model.get("embedding_dropout", 0) and not model.get("embedding_dim", NetworkConfig.embedding_dim):
            problems.append("model.embedding_dropout drops rows of the embedding, and model.embedding_dim=null feeds "
                            "one-hot vectors instead: set model.embedding_dim or model.embedding_dropout=0")
        settings = _Settings({f.name: f.default for f in fields(NetworkConfig) if f.name != "cell_settings"}
                             | {"vocab_size": 1} | model)
        decoder_input = decoder_input_size(settings)
        if settings.tie_weights and settings.embedding_dim != decoder_input:
            fix = (f"model.embedding_dim={decoder_input}, model.projection_size={settings.embedding_dim}" +
                   ("" if isinstance(widths, int) else f", a top layer of {settings.embedding_dim}"))
            problems.append(
                f"model.tie_weights=true needs model.embedding_dim ({settings.embedding_dim}) == the decoder's input "
                f"size ({decoder_input}): set {fix} or model.tie_weights=false"
            )
        if settings.softmax == "adaptive":
            # the first cluster; the others once the vocabulary is known
            problems += cluster_width_problems(settings, 1)
            if settings.tie_weights:
                problems.append("model.tie_weights=true shares the embedding with a full decoder, which "
                                "model.softmax=adaptive does not have: set model.tie_weights=false")
        return problems

    @property
    def widths(self) -> tuple[int, ...]:
        """Each layer's width."""
        return layer_widths(self.hidden_size, self.num_layers)

    def settings(self) -> dict:
        """The ``model.*`` settings as plain data (a checkpoint's ``network`` section): the fields, with the cell's
        own settings beside them."""
        settings = asdict(self)
        cell_settings = settings.pop("cell_settings")
        if isinstance(self.hidden_size, tuple):
            settings["hidden_size"] = list(self.hidden_size)
        if self.adaptive_cutoffs is not None:
            settings["adaptive_cutoffs"] = list(self.adaptive_cutoffs)
        return {**settings, **cell_settings}


class _Settings(dict):
    """Settings read as attributes (``settings.hidden_size``)."""

    __getattr__ = dict.__getitem__


def _cell_setting_problems(cell, name: str, model: dict) -> list[str]:
    """The cell's own settings (type, range, and together), and settings of other built-in cells that this one would
    silently ignore (``model.nonlinearity=relu`` on an LSTM)."""
    problems = []
    own = {**setting_defaults(cell), **{k: v for k, v in model.items() if k in cell.settings}}
    for key, setting in cell.settings.items():
        if problem := setting.problem(f"model.{key}", own[key]):
            problems.append(problem)
    if not problems:
        problems += cell.setting_problems(own)
    for built_in, forms in BUILT_IN.items():
        for key, default in setting_defaults(forms["fused"]).items():
            if key in model and key not in cell.settings and model[key] != default:
                problems.append(f"model.{key}={shown(model[key])} applies to model={built_in} only ({name} does not "
                                f"read it): drop it, or use model={built_in}")
    return list(dict.fromkeys(problems))


class LanguageModel(nn.Module):
    """Next-token model over a vocabulary, or, bidirectional, a model of each token from both sides;
    :class:`NetworkConfig` describes it. This is the network alone, in plain PyTorch: checkpoints load
    into it, and :class:`rnnlm.lightning_module.RecurrentLM` (the Lightning module) trains it."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        self.bidirectional = config.bidirectional
        self.vocab_size = config.vocab_size
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim) if config.embedding_dim else None

        def stack() -> RecurrentStack:
            return RecurrentStack(
                config.cell, config.embedding_dim or config.vocab_size, config.hidden_size, config.num_layers,
                dropout=_or(config.layer_dropout, config.dropout), impl=config.impl, weight_drop=config.weight_drop,
                locked_dropout=config.locked_dropout, cell_settings=config.cell_settings,
            )

        self.backbone = stack()
        # A bidirectional LM keeps its directions in two separate stacks (as ELMo does): in one
        # interleaved bidirectional stack, layer 2's forward state at t would already have read the
        # backward layer-1 outputs, and through them token t+1 onward.
        self.backward_backbone = stack() if config.bidirectional else None
        features = self.backbone.output_size * (2 if config.bidirectional else 1)
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

    def step(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """One token per row, for generation (eval mode): tokens (B,) and the state -> next-token logits (B, V)
        (log-probabilities from an adaptive softmax) and the new state. Each cell takes its own one-step path
        (:meth:`rnnlm.cells.RecurrentCell.step`), which costs far less per token than a sequence kernel's call.

        Raises:
            ValueError: a bidirectional network (it reads each token's future too: it cannot generate).
        """
        return self._step(self.backbone.step, tokens, state)

    @torch.no_grad()
    def stepper(self, batch: int) -> Callable[[Tensor, State | None], tuple[Tensor, State]]:
        """:meth:`step` for generating ``batch`` rows, with each cell's
        :meth:`~rnnlm.cells.RecurrentCell.stepper`: the fused LSTM and GRU pack their weights for oneDNN once,
        now, which pays from a few rows on a CPU. Make a new one after the weights change."""
        return partial(self._step, self.backbone.stepper(batch))

    @torch.no_grad()
    def _step(self, backbone_step: Callable, tokens: Tensor, state: State | None) -> tuple[Tensor, State]:
        if self.bidirectional:
            raise ValueError(CANNOT_GENERATE)
        h, state = backbone_step(self.embed(tokens), state)
        return self.logits(h if self.projection is None else self.projection(h)), state

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


class _SkipInit(TorchFunctionMode):
    """Skips ``torch.nn.init``: on the meta device there are no values to set (and the meta ``normal_`` imports
    torch._dynamo, two seconds that the inference commands otherwise never spend)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def on_meta(build):
    """What ``build()`` makes, on the meta device: shapes without memory or time (a user's cell included)."""
    with torch.device("meta"), _SkipInit():
        return build()


def network_shapes(config: NetworkConfig) -> dict[str, torch.Size]:
    """The shape of each entry of the state dict of a :class:`LanguageModel` of ``config``, by name."""
    return {name: tensor.shape for name, tensor in on_meta(lambda: LanguageModel(config)).state_dict().items()}


def _or(value: float | None, default: float) -> float:
    return default if value is None else value

