"""The checkpoint file: its format (every section rnnlm adds to Lightning's, written and read here), written
atomically while training, checked and read back into a ready :class:`LanguageModel`.

This module imports neither Lightning nor the training code, so the inference commands start fast.
"""

from __future__ import annotations

import datetime
import json
import math
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rnnlm.cells import cell_problem, is_class_path
from rnnlm.errors import CheckpointError, ConfigError, NonFiniteError
from rnnlm.files import write_atomically
from rnnlm.network import LanguageModel, NetworkConfig, network_shapes
from rnnlm.state import State
from rnnlm.vocab import Vocab

# rnnlm's sections of a Lightning checkpoint, all plain data so that it loads with weights_only=True:
CHECKPOINT_KEY = "rnnlm"  # what eval/generate/score read: the network's config, the vocabulary, how training read text
# 2: one cell module per layer (net.backbone.cells.<k>.*), states as per-cell tuples (rnnlm.state); 1 is upgraded.
# 3: a bpe vocabulary, with its tokenizer as JSON text (rnnlm.bpe). Char and word checkpoints are still written as 2,
# which older rnnlm reads; a bpe one as 3, which older rnnlm refuses ("upgrade rnnlm") instead of misreading it.
CHECKPOINT_FORMAT = 3  # the newest format this rnnlm reads and writes
WORD_CHAR_FORMAT = 2  # what a char or word checkpoint is written as
CONFIG_KEY = "rnnlm_config"  # the training run's config, so `ckpt_path=...` alone resumes it
RESUME_KEY = "rnnlm_resume"  # what only a resumed run reads: carried hidden state, best loss, configured lr
RANDOM_KEY = "rnnlm_random"  # the random streams, so a resumed run draws the dropout masks it would have drawn
# NT-ASGD once averaging: "state_dict" holds the averaged weights (what is evaluated and used), this the SGD iterate
ITERATE_KEY = "rnnlm_sgd_iterate"
LEGACY_BEST_KEY = "best_val_loss"  # rnnlm 0.1 kept the best loss as a buffer in the state dict
NETWORK_PREFIX = "net."  # the state dict's names of the network's weights (RecurrentLM.net)
EXTRA_WEIGHTS = (LEGACY_BEST_KEY,)  # what else the training module's state dict may hold
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"  # torch.save's zip format; its legacy pickle format


def write_model_section(checkpoint: dict, network: NetworkConfig, vocab: Vocab, carry_state: bool,
                        world_size: int) -> None:
    """What rebuilds the network and reads text as training did, without the training config."""
    checkpoint[CHECKPOINT_KEY] = {
        "format": CHECKPOINT_FORMAT if vocab.level == "bpe" else WORD_CHAR_FORMAT,
        "network": network.settings(),
        "vocab": vocab.to_dict(),
        "carry_state": carry_state,
        "world_size": world_size,  # stream columns were eval_batch_size x this
    }


def upgrade_checkpoint(checkpoint: dict) -> dict:
    """Bring a checkpoint of an older format to this one, in place (and return it); a current one is left alone.

    Format 1 kept each stack as one ``torch.nn.LSTM``-like module (``net.backbone.rnn.weight_ih_l0``, or the
    textbook cells as ``net.backbone.rnn.cells.0.W_xi``) and carried states as (layers, B, H) tensors, an (h, c)
    pair for LSTM; format 2 has one cell per layer (``net.backbone.cells.0.weight_ih``) and a tuple of states per
    cell. The parameters keep their order, so the optimizer's state (kept by position) needs no change.

    Whatever the format, a checkpoint of a run whose steps Lightning took itself gets its step count where
    manual steps keep theirs (:func:`_count_steps_as_manual`).
    """
    _count_steps_as_manual(checkpoint)
    section = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(section, dict) or section.get("format") != 1:
        return checkpoint
    for key in ("state_dict", ITERATE_KEY):
        if isinstance(checkpoint.get(key), dict):
            checkpoint[key] = {_format2_name(name): value for name, value in checkpoint[key].items()}
    resume = checkpoint.get(RESUME_KEY)
    if isinstance(resume, dict):
        if "train_state" in resume:  # rnnlm 0.1: one process's state
            resume["train_state_by_rank"] = _by_rank(resume.pop("train_state"), lambda s: s[None])
        resume["train_state_by_rank"] = _by_rank(resume.get("train_state_by_rank"), lambda s: s)
    config = checkpoint.get(CONFIG_KEY)
    if isinstance(config, dict) and isinstance(config.get("model"), dict) \
            and config["model"].get("_target_") == "rnnlm.module.RecurrentLM":
        config["model"]["_target_"] = "rnnlm.lightning_module.RecurrentLM"
    section["format"] = WORD_CHAR_FORMAT  # format 1 had no bpe
    return checkpoint


def _count_steps_as_manual(checkpoint: dict) -> None:
    """Training steps are manual (Lightning's manual optimization: several chunks per call, see
    ``RecurrentLM.training_step``); older runs' steps were Lightning's automatic optimization, which counts them
    elsewhere in the loop's state. Moved there, a resumed run goes on from its step instead of from 0."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(loop, dict):
        return
    automatic = loop.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).get("step")
    manual = loop.get("epoch_loop.manual_optimization.optim_step_progress")
    if automatic and manual and manual["total"]["completed"] == 0 < automatic["total"]["completed"]:
        for part in ("total", "current"):
            manual[part] = {"ready": automatic[part]["ready"], "completed": automatic[part]["completed"]}


_FORMAT1_FUSED = re.compile(r"(net\.(?:backward_)?backbone\.)rnn\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)$")


def _format2_name(name: str) -> str:
    if match := _FORMAT1_FUSED.match(name):  # format 1's stacks were one-directional: layer k is cell k
        prefix, kind, layer = match.groups()
        return f"{prefix}cells.{layer}.{kind}"
    return re.sub(r"^(net\.(?:backward_)?backbone\.)rnn\.cells\.", r"\1cells.", name)


def _by_rank(old, first):
    """A format-1 carried state (per rank: a (W, layers, B, H) tensor, or an (h, c) pair of them) as format 2's
    per-cell tuples of (W, B, H) tensors."""
    if old is None:
        return None
    parts = [first(t) for t in (old if isinstance(old, tuple | list) else (old,))]
    if not all(torch.is_tensor(p) and p.dim() == 4 for p in parts):
        return old  # not format 1's shape: check_checkpoint's or the resume's checks will name it
    return tuple(tuple(p[:, k] for p in parts) for k in range(parts[0].size(1)))


def checkpoint_vocab(checkpoint: dict) -> Vocab:
    return Vocab.from_dict(checkpoint[CHECKPOINT_KEY]["vocab"])


def write_run_config(checkpoint: dict, config: dict) -> None:
    """The run's config as composed (interpolations unresolved), so ``ckpt_path=...`` alone resumes the run."""
    checkpoint[CONFIG_KEY] = config


def read_run_config(checkpoint: dict) -> dict | None:
    """What :func:`write_run_config` wrote; None in checkpoints from before it (their run folder has it)."""
    return checkpoint.get(CONFIG_KEY)


@dataclass
class ResumeSection:
    """What a resumed run needs to continue as if it had not stopped (besides Lightning's own state)."""

    train_state_by_rank: State | None  # the hidden state carried into the next chunk, (world_size, ...) per tensor
    best_val_loss: float
    configured_lr: float | None  # optimizer.lr as configured: a resume that asks for another one gets it


def write_resume_section(checkpoint: dict, section: ResumeSection) -> None:
    checkpoint[RESUME_KEY] = {
        "train_state_by_rank": section.train_state_by_rank,
        "best_val_loss": section.best_val_loss,
        "configured_lr": section.configured_lr,
    }


def read_resume_section(checkpoint: dict) -> ResumeSection | None:
    """The resume section, also from rnnlm 0.1's checkpoints (one process's carried state; the best loss as a
    buffer, which is taken out of the state dict here); None if the checkpoint has none."""
    legacy_best = checkpoint.get("state_dict", {}).pop(LEGACY_BEST_KEY, None)
    resume = checkpoint.get(RESUME_KEY)
    if resume is None:
        return None
    by_rank = resume.get("train_state_by_rank")  # format 1's and rnnlm 0.1's, by upgrade_checkpoint
    best = resume.get("best_val_loss", math.inf if legacy_best is None else float(legacy_best))
    return ResumeSection(by_rank, best, resume.get("configured_lr"))


def write_averaged_weights(checkpoint: dict, parameters: dict[str, torch.Tensor],
                           averages: dict[int, torch.Tensor]) -> None:
    """Put each parameter's average (``averages``, by ``id`` of the parameter; ``parameters`` the module's
    ``state_dict(keep_vars=True)``) in the checkpoint's state dict, and the parameter itself in the iterate
    section, which a resumed run trains on from (:func:`read_sgd_iterate`)."""
    weights, iterate = checkpoint["state_dict"], {}
    for name, parameter in parameters.items():
        if id(parameter) in averages:
            iterate[name] = weights[name]
            weights[name] = averages[id(parameter)]
    checkpoint[ITERATE_KEY] = iterate


def read_sgd_iterate(checkpoint: dict) -> None:
    """Before a run resumes from ``checkpoint``: put the SGD iterate back in its state dict (the averages stay in
    the optimizer's state)."""
    checkpoint["state_dict"].update(checkpoint.pop(ITERATE_KEY, {}))


def write_random_state(checkpoint: dict) -> None:
    """This process's random streams (the CPU's and every GPU's)."""
    checkpoint[RANDOM_KEY] = {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_random_state(checkpoint: dict) -> None:
    """Set the random streams :func:`write_random_state` saved (checkpoints before it kept them in the resume
    section); a checkpoint with neither leaves them alone."""
    saved = checkpoint.get(RANDOM_KEY) or checkpoint.get(RESUME_KEY) or {}
    if "torch_rng" in saved:
        torch.set_rng_state(saved["torch_rng"])
    if saved.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


def write_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Write ``checkpoint`` to a temporary file beside ``path``, sync it to disk, then rename it over the
    old one: a process killed at any moment leaves the previous checkpoint whole. A checkpoint whose
    weights are not finite is refused, so a diverged run never overwrites its last good checkpoint.

    Raises:
        NonFiniteError: a floating-point weight holds NaN or infinity.
        DiskFullError: no space left for it (the message says how much it needs).
    """

    path = Path(path)
    bad = [k for k, v in checkpoint.get("state_dict", {}).items()
           if torch.is_tensor(v) and not _finite(v)]
    if bad:
        raise NonFiniteError(
            f"the weights became NaN or infinite by step {checkpoint.get('global_step')} ({', '.join(bad[:3])}): "
            f"{path.name} was not overwritten; lower optimizer.lr or set trainer.gradient_clip_val"
        )
    storages: dict[tuple, int] = {}  # torch.save writes each storage once, however many tensors view it

    def count(item) -> None:
        if torch.is_tensor(item) and item.layout == torch.strided:  # (sparse ones, rare, are left out)
            storage = item.untyped_storage()
            storages[storage.device, storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict | list | tuple):
            for value in item.values() if isinstance(item, dict) else item:
                count(value)

    count(checkpoint)
    write_atomically(path, lambda fh: torch.save(checkpoint, fh), size=sum(storages.values()),
                     elsewhere="paths.log_dir=DIR")


def written_by_torch(path: Path) -> bool:
    """Whether ``path`` starts as torch.save's files do (a zip archive, or a pickle in the legacy format)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The whole checkpoint as plain data, read without unpickling arbitrary objects (``weights_only=True``);
    ``mmap``: leave the tensors on disk until used (to read the plain-data sections of a large file).

    Raises:
        CheckpointError: the file does not exist, is not a checkpoint, is truncated or corrupt, needs
            pickled code to load, was not written by rnnlm, or fails :func:`check_checkpoint`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: give ckpt_path=RUN/checkpoints/last.ckpt")
    if not written_by_torch(path):
        if path.suffix in (".safetensors", ".onnx"):  # what rnnlm-export writes: for other programs, not for rnnlm's
            raise CheckpointError(
                f"{path} is an rnnlm-export file, not a checkpoint: give the .ckpt it was exported from (in Python, "
                "rnnlm.exporting.load_safetensors reads a .safetensors file; examples/onnx_generate.py runs a .onnx)")
        raise CheckpointError(f"{path} is not a checkpoint file (torch.save writes them): "
                              "give ckpt_path=RUN/checkpoints/last.ckpt or best.ckpt")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refusing to load {path}: it needs arbitrary pickled objects to load, which could run code; "
            "rnnlm checkpoints hold only tensors and plain data"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {err}") from None
    upgrade_checkpoint(data)
    check_checkpoint(data, path)
    return data


_DAMAGED = "the file is damaged or was edited; use another checkpoint (best.ckpt, or an earlier last.ckpt)"


def check_checkpoint(data, path: str | Path) -> None:
    """Check that ``data``, checkpoint ``path`` as read, is one this rnnlm can use: its sections and format
    version, the network's settings and the vocabulary, weights named and shaped as the network those describe
    (built on the meta device: no memory, no time) and all finite (this reads every weight).

    Raises:
        CheckpointError: one line that names ``path``, what is wrong and what to do.
    """
    if not isinstance(data, dict) or CHECKPOINT_KEY not in data:
        raise CheckpointError(f"{path} is not an rnnlm checkpoint (no '{CHECKPOINT_KEY}' section)")
    section = data[CHECKPOINT_KEY]
    if not isinstance(section, dict):
        raise CheckpointError(f"the '{CHECKPOINT_KEY}' section of {path} is a {type(section).__name__}: {_DAMAGED}")
    entries = {"format": ("the format version", int, "a positive integer"),
               "network": ("the network's settings", dict, "a table of settings"),
               "vocab": ("the vocabulary", dict, "a table of its tokens"),
               "carry_state": ("whether training carried the hidden state", bool, "true or false")}
    for key, (what, kind, expected) in entries.items():
        if key not in section:
            raise CheckpointError(f"{path} has no '{CHECKPOINT_KEY}.{key}' entry ({what}): {_DAMAGED}")
        value = section[key]
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
            shown = repr(value) if kind in (int, bool) else f"a {type(value).__name__}"
            raise CheckpointError(f"'{CHECKPOINT_KEY}.{key}' of {path} ({what}) is {shown}, not {expected}: "
                                  f"{_DAMAGED}")
    if section["format"] > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was written by a newer rnnlm (format {section['format']}, this one reads up "
                              f"to {CHECKPOINT_FORMAT}): upgrade rnnlm")
    world_size = section.get("world_size", 1)  # checkpoints from before it was recorded lack it
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise CheckpointError(f"'{CHECKPOINT_KEY}.world_size' of {path} is {world_size!r}, not a count of "
                              f"processes: {_DAMAGED}")
    vocab = _checked_vocab(section["vocab"], path)
    config = _checked_network(section["network"], len(vocab), path)
    weights = data.get("state_dict")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} has no weights (no 'state_dict' section): {_DAMAGED}")
    try:
        shapes = {NETWORK_PREFIX + name: shape for name, shape in network_shapes(config).items()}
    except Exception as err:  # noqa: BLE001 - a user's cell that no longer builds with the saved settings
        if not is_class_path(config.cell):
            raise
        raise CheckpointError(f"{path}: model.cell={config.cell} fails to build with the settings saved in the "
                              f"checkpoint ({type(err).__name__}: {err}): restore the version it was trained with") \
            from None
    # a user's cell may have changed since the checkpoint was written; a built-in one has not
    damaged = (f"the class model.cell={config.cell} changed since training (restore the version it was trained "
               "with), or the file was edited" if is_class_path(config.cell) else _DAMAGED)
    _check_weights(weights, shapes, path, damaged)
    iterate = data.get(ITERATE_KEY, {})
    _check_iterate(iterate, shapes, path)
    tensors = [(name, weights[name]) for name in shapes] + list(iterate.items())
    bad = list(dict.fromkeys(name for name, tensor in tensors if not _finite(tensor)))
    if bad:
        raise CheckpointError(f"the weights of {path} hold NaN or infinite values ({_listed(bad)}): the file is "
                              "damaged or the run diverged; use an earlier checkpoint")


def _checked_vocab(saved: dict, path: str | Path) -> Vocab:
    tokens = saved.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
        raise CheckpointError(f"the vocabulary of {path} is not a list of tokens: {_DAMAGED}")
    try:
        vocab = Vocab.from_dict(saved)
        if vocab.level == "bpe":
            _check_tokenizer(vocab)
        return vocab
    except (KeyError, TypeError, ValueError) as err:
        reason = f"no '{err.args[0]}' entry" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"the vocabulary of {path} cannot be read ({reason}): {_DAMAGED}") from None


def _check_tokenizer(vocab: Vocab) -> None:
    """A bpe vocabulary's tokens are its tokenizer's, id for id (read from the JSON text: no tokenizers needed).

    Raises:
        ValueError, KeyError, TypeError: they are not, or the tokenizer is not JSON of that shape.
    """
    tokenizer = json.loads(vocab.tokenizer)
    ids = dict(tokenizer["model"]["vocab"])
    ids.update({added["content"]: added["id"] for added in tokenizer["added_tokens"]})
    if {token: i for i, token in enumerate(vocab.tokens)} != ids:
        raise ValueError("its tokens are not its tokenizer's")


def _checked_network(settings: dict, vocab_size: int, path: str | Path) -> NetworkConfig:
    built_for = settings.get("vocab_size", vocab_size)
    if built_for != vocab_size:
        raise CheckpointError(f"the vocabulary of {path} has {vocab_size} tokens, and its network was built for "
                              f"{built_for!r}: {_DAMAGED}")
    cell = settings.get("cell")
    if isinstance(cell, str) and is_class_path(cell) and (problem := cell_problem(cell)):
        raise CheckpointError(f"{path} needs the class it was trained with: {problem}")
    try:
        return NetworkConfig.from_settings(settings, vocab_size=vocab_size)
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"the network settings of {path} are invalid ({err}): {_DAMAGED}") from None


def _check_weights(weights: dict, shapes: dict[str, torch.Size], path: str | Path, damaged: str) -> None:
    """The state dict holds a tensor of the right shape under each of the network's names, and nothing else."""
    missing = [name for name in shapes if name not in weights]
    if missing:
        raise CheckpointError(f"the weights of {path} lack {_listed(missing)}, which the network its settings "
                              f"describe has: {damaged}")
    unknown = [name for name in weights if name not in shapes and name not in EXTRA_WEIGHTS]
    if unknown:
        raise CheckpointError(f"the weights of {path} include {_listed(unknown)}, which the network its settings "
                              f"describe does not have: {damaged}")
    for name in shapes:
        if not torch.is_tensor(weights[name]):
            raise CheckpointError(f"the weights of {path} are not all tensors: {name} is a "
                                  f"{type(weights[name]).__name__}, not a tensor: {damaged}")
    wrong = [f"{name} is {tuple(weights[name].shape)}, expected {tuple(shape)}"
             for name, shape in shapes.items() if weights[name].shape != shape]
    if wrong:
        raise CheckpointError(f"the weights of {path} do not fit the network its settings describe: "
                              f"{_listed(wrong)}: {damaged}")


def _check_iterate(iterate, shapes: dict[str, torch.Size], path: str | Path) -> None:
    """NT-ASGD's SGD iterate (what a resumed run trains on from) has the shapes of the weights it stands in for."""
    where = f"the NT-ASGD section ('{ITERATE_KEY}') of {path}"
    if not isinstance(iterate, dict):
        raise CheckpointError(f"{where} is a {type(iterate).__name__}: {_DAMAGED}")
    unknown = [name for name in iterate if name not in shapes]
    if unknown:
        raise CheckpointError(f"{where} names {_listed(unknown)}, which the weights lack: {_DAMAGED}")
    wrong = [f"{name} is {tuple(t.shape) if torch.is_tensor(t) else f'a {type(t).__name__}'}, the weights' "
             f"{tuple(shapes[name])}"
             for name, t in iterate.items() if not torch.is_tensor(t) or t.shape != shapes[name]]
    if wrong:
        raise CheckpointError(f"{where} does not match its weights: {_listed(wrong)}: {_DAMAGED}")


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in ``tensor`` (always true of integers). Its minimum and maximum are NaN if any value is,
    and ``aminmax`` reads the tensor once without a mask of its size: 8x faster than ``isfinite().all()``."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _listed(items: list[str], shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def describe(path: Path, data: dict) -> str:
    """``PATH (step N, saved 2026-11-27 23:50)``: which checkpoint a command is using."""
    saved = datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
    return f"{path} (step {data.get('global_step')}, saved {saved})"


def last_checkpoints(log_dir: str | Path, task_name: str = "train") -> list[Path]:
    """Every ``last.ckpt`` of the runs and sweep jobs under ``<log_dir>/<task_name>``, newest first."""
    found = (Path(log_dir) / task_name).glob("*runs/**/checkpoints/last.ckpt")
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_checkpoint(ckpt_path: str | Path | None, log_dir: str | Path) -> Path:
    """The checkpoint a command should read: ``last`` is the newest training run's ``last.ckpt``.

    Raises:
        CheckpointError: no path was given, it does not exist, or ``last`` finds no run.
    """
    if not ckpt_path:
        raise CheckpointError("ckpt_path is required: ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt, "
                              "or ckpt_path=last for the newest training run's")
    if str(ckpt_path) == "last":
        found = last_checkpoints(log_dir)
        if not found:
            raise CheckpointError(f"ckpt_path=last found no run with checkpoints/last.ckpt under {Path(log_dir)}/train")
        print(f"ckpt_path=last: {found[0]}", file=sys.stderr)  # which run "last" was: stdout stays the result
        return found[0]
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path} does not exist: give RUN/checkpoints/last.ckpt or last")
    return path


@dataclass
class LoadedModel:
    net: LanguageModel  # in eval mode, in float32, every parameter and buffer on the device asked for
    vocab: Vocab
    info: dict  # the checkpoint's plain-data section, plus global_step and world_size
    data: dict  # the training data settings (TextDataModule arguments), {} if unknown
    state_dict: dict  # the training module's state (the network under "net." and its buffers), on the CPU


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """The network and vocabulary of checkpoint ``path``, rebuilt from the file alone.

    Args:
        map_location: the device the network is put on (``cpu``, ``cuda``, ``cuda:1``). The file is read
            onto the CPU whatever device wrote it, and only the network moves: the optimizer's state and
            the rest of a training checkpoint stay off the GPU. Weights saved in 16-bit (``trainer.precision=
            bf16-true``) are loaded into float32; mixed-precision runs save float32 weights already.

    Raises:
        CheckpointError: see :func:`read_checkpoint`.
    """
    data = read_checkpoint(path, "cpu")
    info = dict(data[CHECKPOINT_KEY])
    info["global_step"] = data.get("global_step")
    info.setdefault("world_size", 1)
    vocab = checkpoint_vocab(data)
    net = LanguageModel(NetworkConfig.from_settings(info["network"], vocab_size=len(vocab)))
    prefix = NETWORK_PREFIX
    net.load_state_dict({k[len(prefix):]: v for k, v in data["state_dict"].items() if k.startswith(prefix)})
    net.to(map_location).eval()
    return LoadedModel(net=net, vocab=vocab, info=info, data=dict(data.get("datamodule_hyper_parameters") or {}),
                       state_dict=data["state_dict"])
