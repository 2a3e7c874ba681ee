"""Read a training checkpoint back into a ready :class:`LanguageModel` and its vocabulary."""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rnnlm.module import CHECKPOINT_KEY, NonFiniteError, RecurrentLM
from rnnlm.network import LanguageModel
from rnnlm.vocab import Vocab


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged, unsafe, or not one of ours; the message says which."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, syncs it to disk, then renames it over the
    old one: a process killed at any moment leaves the previous checkpoint whole. A checkpoint whose
    weights are not finite is refused, so a diverged run never overwrites its last good checkpoint."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteError(
                f"the weights became NaN or infinite by step {checkpoint.get('global_step')} ({', '.join(bad[:3])}): "
                f"{path.name} was not overwritten; lower optimizer.lr or set trainer.gradient_clip_val"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@dataclass
class LoadedModel:
    module: RecurrentLM  # in eval mode, on map_location
    vocab: Vocab
    info: dict  # the checkpoint's plain-data section, plus global_step
    data: dict  # the training data settings (TextDataModule arguments), {} if unknown

    @property
    def net(self) -> LanguageModel:
        return self.module.net


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load ``path`` without unpickling arbitrary objects (``weights_only=True``).

    Raises:
        CheckpointError: the file does not exist, is truncated or corrupt, needs pickled code to load,
            or was not written by rnnlm.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: give ckpt_path=RUN/checkpoints/last.ckpt")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refusing to load {path}: it needs arbitrary pickled objects to load, which could run code; "
            "rnnlm checkpoints hold only tensors and plain data"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {err}") from None
    if not isinstance(data, dict) or CHECKPOINT_KEY not in data:
        raise CheckpointError(f"{path} is not an rnnlm checkpoint (no '{CHECKPOINT_KEY}' section)")
    info = dict(data[CHECKPOINT_KEY])
    info["global_step"] = data.get("global_step")
    vocab = Vocab.from_dict(info["vocab"])
    network = {k: v for k, v in info["network"].items() if k != "vocab_size"}
    module = RecurrentLM(vocab, carry_state=info["carry_state"], **network)
    module.load_state_dict(data["state_dict"])
    module.eval()
    return LoadedModel(module=module, vocab=vocab, info=info, data=dict(data.get("datamodule_hyper_parameters") or {}))
