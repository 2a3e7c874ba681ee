"""A trained network written for use outside rnnlm: the one-step function as ONNX (for onnxruntime), or the weights as
safetensors; either file carries the network's settings and the vocabulary as JSON (``rnnlm-export``).

The ONNX graph is :class:`OneStep`: the token ids of a batch and the state of every layer in, the next token's
log-probabilities and the new state out, the batch dimension dynamic::

    tokens (batch,) int64 ──> embedding ──> layer 0 ──> ... ──> layer L-1 ──> decoder ──> log_probs (batch, V)
    state_l0_h (batch, H_0) ─────────────────┘ (and _c: an LSTM's cell state)
    next_state_l0_h (batch, H_0) <───────────┘

Generating is a loop: feed the prompt's ids one at a time from a zero state, then feed back each picked token with the
state the last step returned (``examples/onnx_generate.py`` does it with onnxruntime and numpy alone).

onnx, onnxscript, onnxruntime and safetensors are optional (``pip install 'rnnlm[export]'``): they are imported only
when a file is written or read, and importing rnnlm never needs them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm import __version__
from rnnlm.errors import CheckpointError, ExportError, MissingPackageError
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.state import State
from rnnlm.vocab import Vocab

FORMATS = ("onnx", "safetensors")
SUFFIXES = {"onnx": ".onnx", "safetensors": ".safetensors"}
# What each format needs besides rnnlm's own dependencies: the ONNX exporter of torch.onnx.export(dynamo=True) builds
# the graph with onnxscript and writes it with onnx; onnxruntime runs the file once before it is written, as a check.
PACKAGES = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "safetensors": ("safetensors",)}
METADATA_KEY = "rnnlm"  # the JSON description, in the ONNX model's metadata_props and the safetensors header
EXPORT_FORMAT = 1  # of that description
# One protobuf message (an ONNX file with its weights inside) cannot exceed 2 GiB.
ONNX_MAX_BYTES = 2**31 - 2**24
# The exported step must agree with the network's own within this (log-probabilities and states, float32).
ATOL, RTOL = 1e-4, 1e-4


def require(format_name: str) -> None:
    """Raise :class:`MissingPackageError` in one line, naming the install command, unless the packages ``format``
    needs are installed."""
    missing = [name for name in PACKAGES[format_name] if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingPackageError(
            f"format={format_name} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: pip install 'rnnlm[export]' (in a checkout: pip install -e '.[export]'), or pip install "
            f"{' '.join(missing)}")


def export_problem(net: LanguageModel, format_name: str, source: str) -> str | None:
    """Why ``net`` (read from ``source``) cannot be exported as ``format``, in one line; None if it can."""
    if format_name == "onnx" and net.bidirectional:
        return (f"{source} is a bidirectional model: it predicts each token from both sides, so it has no one-step "
                "function to export as ONNX; format=safetensors exports its weights")
    if format_name == "onnx" and any(t.any() for t in _flat(net.backbone.zero_state(1, torch.zeros(1)))):
        return (f"model.cell={net.config.cell} starts a text from a state other than zeros (its zero_state), which "
                "the ONNX file's users could not know: format=safetensors exports its weights")
    if format_name == "onnx" and (size := weight_bytes(net)) > ONNX_MAX_BYTES:
        return (f"{source} has {size / 2**30:.1f} GiB of weights, more than one ONNX file holds (2 GiB): use "
                "format=safetensors")
    return None


def weight_bytes(net: LanguageModel) -> int:
    """Bytes of the network's weights, each shared tensor (tied weights) counted once."""
    return sum(t.numel() * t.element_size() for t in _unique(net.state_dict())[0].values())


def describe(net: LanguageModel, vocab: Vocab, global_step: int | None, format_name: str) -> dict:
    """What the file says about itself (JSON): the network's settings (``model.*``, :class:`NetworkConfig`), the
    vocabulary and the ids a text starts and ends a line with, so that a user can encode a prompt and decode ids; for
    ONNX also the graph's inputs and outputs (:func:`signature`)."""
    description = {
        "rnnlm_export": EXPORT_FORMAT,
        "rnnlm_version": __version__,
        "format": format_name,
        "global_step": global_step,
        "network": net.config.settings(),
        "vocab": vocab.to_dict(),
        "start_id": vocab.start_id,
        "line_end_id": vocab.line_end_id,
        "unk_id": vocab.unk_id,
    }
    if format_name == "onnx":
        description["inputs"], description["outputs"] = signature(net)
    else:  # the names of the weights stored once for several (safetensors_bytes)
        description["tied"] = _unique(net.state_dict())[1]
    return description


class OneStep(nn.Module):
    """The network's one-step function with log-probabilities out: tokens (B,) and the state (one tuple per layer, in
    its cell's ``state_names`` order, each (B, H)) -> log-probabilities of the next token (B, V) and the new state."""

    def __init__(self, net: LanguageModel):
        super().__init__()
        self.net = net

    def forward(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        scores, state = self.net.step(tokens, state)
        # the adaptive softmax's scores are log-probabilities already (LanguageModel.logits)
        return (scores if self.net.adaptive else F.log_softmax(scores, -1)), state


def state_names(net: LanguageModel) -> list[str]:
    """The ONNX names of the state tensors, layer by layer: ``state_l0_h``, ``state_l0_c``, ``state_l1_h`` ..."""
    return [f"state_l{k}_{name}" for k, cell in enumerate(net.backbone.cells) for name in cell.state_names]


def signature(net: LanguageModel) -> tuple[list[dict], list[dict]]:
    """The ONNX graph's inputs and outputs: name, shape (``batch`` is any number of rows) and type of each."""
    widths = [cell.hidden_size for cell in net.backbone.cells for _ in cell.state_names]
    names = state_names(net)
    states = [{"name": n, "shape": ["batch", w], "dtype": "float32"} for n, w in zip(names, widths, strict=True)]
    inputs = [{"name": "tokens", "shape": ["batch"], "dtype": "int64",
               "doc": "the current token of each row (ids of the vocabulary)"}] + [
        {**s, "doc": "zeros at the start of a text, then what the last step returned"} for s in states]
    outputs = [{"name": "log_probs", "shape": ["batch", net.vocab_size], "dtype": "float32",
                "doc": "natural log-probability of each token of the vocabulary being the next one"}] + [
        {**s, "name": "next_" + s["name"], "doc": f"the new {s['name']}, for the next step"} for s in states]
    return inputs, outputs


def onnx_bytes(net: LanguageModel, description: dict) -> bytes:
    """The ONNX model of :class:`OneStep` over ``net`` (on the CPU, in float32, eval mode), its inputs and outputs
    named as :func:`signature` says and ``description`` (:func:`describe`) in its metadata, checked with onnxruntime
    against the network before it is returned.

    ``torch.onnx.export(dynamo=True)``: the graph comes from ``torch.export`` and is translated by onnxscript. (The
    older TorchScript exporter also handles every built-in cell, but warns at every call that it will be removed.)

    Raises:
        ExportError: the network cannot be traced (a user's cell whose step branches on values, say), or the file
            does not compute what the network does.
    """
    import onnx

    net = net.float().cpu().eval()
    inputs, outputs = signature(net)
    example_tokens = torch.zeros(2, dtype=torch.long)  # two rows: torch.export takes a batch of one for a constant
    example_state = net.backbone.zero_state(2, torch.zeros(1))
    batch = {0: "batch"}
    dynamic = (batch, tuple(tuple(batch for _ in cell) for cell in example_state))
    try:
        with _quiet():
            program = torch.onnx.export(
                OneStep(net), (example_tokens, example_state), dynamo=True, external_data=False, verbose=False,
                input_names=[i["name"] for i in inputs], output_names=[o["name"] for o in outputs],
                dynamic_shapes=dynamic)
    except Exception as err:  # noqa: BLE001 - whatever the tracer or translator cannot handle, in one line
        raise ExportError(f"model.cell={net.config.cell} cannot be exported as ONNX ({_root_cause(err)}): "
                          "format=safetensors exports its weights") from None
    model = program.model_proto
    model.doc_string = ("rnnlm one-step language model: tokens and state in, log_probs and next state out; the "
                        f"'{METADATA_KEY}' metadata (JSON) names them and holds the vocabulary")
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(description)})
    try:
        onnx.checker.check_model(model, full_check=True)  # the standard's rules, and its shapes inferred
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"the exported model of model.cell={net.config.cell} is not valid ONNX "
                          f"({_root_cause(err)}): please report it") from None
    data = model.SerializeToString()
    check_onnx(data, net)
    return data


def check_onnx(data: bytes, net: LanguageModel, steps: int = 4, batch: int = 3, seed: int = 0) -> None:
    """Run the ONNX model ``data`` with onnxruntime for a few greedy steps of ``batch`` rows (not the two it was traced
    with: the batch dimension is dynamic) from random tokens, beside the network.

    Raises:
        ExportError: the log-probabilities or the states differ by more than :data:`ATOL` + :data:`RTOL` x |value|,
            or onnxruntime cannot run the file.
    """
    import onnxruntime

    names = state_names(net)
    try:
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"onnxruntime cannot load the exported model ({_root_cause(err)})") from None
    tokens = torch.randint(net.vocab_size, (batch,), generator=torch.Generator().manual_seed(seed))
    state = net.backbone.zero_state(batch, torch.zeros(1))
    for step in range(steps):
        feed = {"tokens": tokens.numpy(), **{n: t.numpy() for n, t in zip(names, _flat(state), strict=True)}}
        got = session.run(None, feed)
        with torch.no_grad():
            log_probs, state = OneStep(net)(tokens, state)
        for name, value, expected in zip(["log_probs", *names], got, [log_probs, *_flat(state)], strict=True):
            value = torch.from_numpy(value)
            if value.shape != expected.shape or not torch.allclose(value, expected, rtol=RTOL, atol=ATOL):
                off = (value - expected).abs().max().item() if value.shape == expected.shape else "a shape"
                raise ExportError(f"the exported model's {name} differs from the network's by {off} at step "
                                  f"{step + 1} (onnxruntime {onnxruntime.__version__}): please report it")
        tokens = log_probs.argmax(-1)


def safetensors_bytes(net: LanguageModel, description: dict) -> bytes:
    """The network's weights (its ``state_dict``, contiguous, on the CPU) as a safetensors file, ``description``
    (:func:`describe`) in its metadata. A tensor that is another's (the decoder tied to the embedding) is stored once,
    under its first name; ``description["tied"]`` maps each other name to it."""
    from safetensors.torch import save

    weights, _ = _unique(net.state_dict())
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}
    return save(tensors, metadata={METADATA_KEY: json.dumps(description)})


@dataclass
class ExportedModel:
    net: LanguageModel  # in eval mode, on the CPU
    vocab: Vocab
    description: dict  # the file's JSON metadata


def load_safetensors(path: str | Path) -> ExportedModel:
    """The network and vocabulary of a safetensors file that ``rnnlm-export format=safetensors`` wrote.

    Raises:
        CheckpointError: the file is missing, not safetensors, not written by rnnlm-export, or its weights do not fit
            the network its settings describe.
    """
    require("safetensors")
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
        weights = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a safetensors file ({err})") from None
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} was not written by rnnlm-export (no '{METADATA_KEY}' metadata)")
    try:
        description = json.loads(metadata[METADATA_KEY])
        vocab = Vocab.from_dict(description["vocab"])
        net = LanguageModel(NetworkConfig.from_settings(description["network"], vocab_size=len(vocab)))
        for name, first in description.get("tied", {}).items():
            weights[name] = weights[first]
        net.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"the weights or settings of {path} cannot be read ({reason})") from None
    return ExportedModel(net.eval(), vocab, description)


def _unique(weights: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``weights`` with each tensor that is another one (same storage, offset, shape and strides) left out, and a map
    from each name left out to the name kept."""
    kept, tied, seen = {}, {}, {}
    for name, tensor in weights.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = tensor
    return kept, tied


def _flat(state: State) -> list[Tensor]:
    """The state's tensors, layer by layer (the order of :func:`state_names`)."""
    return [tensor for cell in state for tensor in cell]


def _root_cause(err: BaseException) -> str:
    """The innermost error that ``err`` came from, as ``Type: first line``."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress lines, notes (torchvision's operators), warnings and, when it fails, graph dumps, left
    out of a command's output: the error it raises says what went wrong (:func:`_root_cause`)."""
    names = ["torch", "onnxscript", "onnx_ir", *(name for name in logging.root.manager.loggerDict
                                                 if name.partition(".")[0] in ("torch", "onnxscript", "onnx_ir"))]
    loggers = [logging.getLogger(name) for name in dict.fromkeys(names)]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
