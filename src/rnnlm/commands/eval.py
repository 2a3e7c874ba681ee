"""Evaluate a checkpoint on its corpus's test split or any text (``conf/eval.yaml``):
``rnnlm-eval ckpt_path=...``. Plain PyTorch: the split is read as training's validation and test read it, without
Lightning, which would take seconds to import."""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from rnnlm.batches import data_source, make_loader, split_dataset
from rnnlm.checkpoint import LoadedModel, load_checkpoint, resolve_checkpoint
from rnnlm.checks import ConfigError, check_eval_config
from rnnlm.commands.cli import CONF_DIR, check_output, end_program, exit_on_user_error, pick_device, run_command
from rnnlm.corpora import DataError, path_source
from rnnlm.files import remove_stale_temporaries, write_atomically
from rnnlm.loss import CharacterCount, bits_per_character, loss_in_units
from rnnlm.prepare import encode_split_counted
from rnnlm.scoring import split_loss

log = logging.getLogger(__name__)

MAX_UNK_SHARE = 0.5  # above this share of <unk>, a perplexity says nothing about the model
# TextDataModule's arguments and defaults (tests/test_eval_modes.py checks that they agree; datamodule.py imports
# Lightning): what a checkpoint records, and the fallback for an argument it lacks.
DATA_DEFAULTS = {
    "corpus": "tinyshakespeare", "path": None, "level": "char", "mode": "stream", "seq_len": 128, "batch_size": 64,
    "eval_batch_size": 10, "test_batch_size": None, "min_freq": 1, "max_size": None, "split": (0.9, 0.05, 0.05),
    "holdout": True, "data_dir": "data", "cache_dir": ".cache", "download": True, "num_workers": 0, "scored": "all",
    "recall": None, "variable_seq_len": False, "bpe_vocab_size": 4096, "split_by": "lines",
}


def evaluate(cfg: DictConfig) -> dict:
    """Token-weighted loss of the checkpoint on the chosen text, with the hidden state carried as in training, and
    bits per character (:class:`rnnlm.loss.CharacterCount`)."""
    check_eval_config(cfg)
    device = pick_device(cfg.device)
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir)
    loaded = load_checkpoint(ckpt_path, map_location=device)  # the batches follow the network
    if not cfg.data.path and not {"corpus", "path"} & loaded.data.keys():
        raise ConfigError("the checkpoint does not record its training data: give data.path=FILE")
    vocab, trained = loaded.vocab, recorded_data(loaded)
    if cfg.data.path:
        source = path_source(Path(cfg.data.path).expanduser())
        split = None if "all" in source.files else cfg.split  # a lone file is evaluated whole
    else:
        # the corpus as training found it, in this machine's data_dir and cache_dir (not training's)
        source = data_source(trained["corpus"], trained["path"], cfg.paths.data_dir, cfg.paths.cache_dir,
                             trained["split"], trained["holdout"], trained["download"], trained["recall"],
                             trained["split_by"])
        split = cfg.split
    ids, unknown_chars = encode_split_counted(source, vocab, split)
    if vocab.unk_id is not None and len(ids) and (unk_share := float((ids == vocab.unk_id).mean())) > MAX_UNK_SHARE:
        raise DataError(
            f"{unk_share:.0%} of the tokens of {source.name} are outside the checkpoint's vocabulary: this text "
            "does not match the model (a different language or tokenization?); evaluate on text like its training data"
        )
    mode, batch_size, seq_len = evaluation_layout(trained, loaded.info["world_size"], cfg.data.batch_size,
                                                  cfg.data.seq_len, split=split)
    dataset = split_dataset(ids, vocab, mode, seq_len, batch_size, name=split or "evaluation", scored=trained["scored"])
    answers = trained["scored"] == "last"  # data=recall: the share of answers ranked first, too
    total, count, right, chars = split_loss(loaded.net, make_loader(dataset, batch_size), loaded.info["carry_state"],
                                            count_correct=answers, characters=CharacterCount(vocab, unknown_chars))
    loss = as_logged(total / max(count, 1.0))
    result = {
        "checkpoint": str(ckpt_path.resolve()),
        "global_step": loaded.info["global_step"],
        "text": f"{source.name}:{split or 'all'}",
        "level": vocab.level,
        "tokens": int(count),
        "batch_size": batch_size,
        "seq_len": seq_len if mode == "stream" else None,  # sentences are read whole
        "characters": round(chars, 6),  # (a word model's <unk> counts the mean of the split's unknown words)
        "loss": loss,
    }
    if vocab.level != "char":  # a char model's per-token unit is its bpc
        unit, value = loss_in_units(loss, vocab.level)
        result[unit] = value
    result["bpc"] = as_logged(bits_per_character(total, chars))
    if answers:
        result["answer_acc"] = as_logged(right / max(count, 1.0))
    return result


def as_logged(value: float) -> float:
    """``value`` as training logs it (Lightning keeps a logged number in float32), so that eval gives the run's own
    val/loss and test/loss to the last digit."""
    return torch.tensor(value, dtype=torch.float32).item()


def recorded_data(loaded: LoadedModel) -> dict:
    """The training data settings of a checkpoint (:class:`TextDataModule`'s arguments), complete.

    rnnlm's checkpoints record every argument. For one that lacks some (written without TextDataModule,
    or edited by hand):

    - ``mode`` is worked out from the model: training carries the state of a causal LM in stream mode
      only, and a bidirectional model (``task=bilm``) trains in stream mode, so a model that carries no
      state and reads one way was trained on sentences.
    - every other argument takes TextDataModule's default (:data:`DATA_DEFAULTS`), with a warning for
      ``seq_len`` and ``eval_batch_size``, which decide the stream windows: the score may then differ from
      the run's own validation (give ``data.seq_len`` and ``data.batch_size`` to match it). A missing
      ``test_batch_size`` is None: runs from before that setting tested with ``eval_batch_size``.
    """
    settings = {**DATA_DEFAULTS, **loaded.data}
    if "mode" not in loaded.data:
        settings["mode"] = "stream" if loaded.info["carry_state"] or loaded.net.bidirectional else "sentence"
    if settings["mode"] == "stream":
        for key in ("seq_len", "eval_batch_size"):
            if key not in loaded.data:
                log.warning("the checkpoint does not record data.%s: %s unless given (the score may differ "
                            "from the run's own)", key, settings[key])
    return settings


def evaluation_layout(trained: dict, world_size: int, batch_size: int | None = None,
                      seq_len: int | None = None, split: str | None = None) -> tuple[str, int, int]:
    """``(mode, batch_size, seq_len)`` to read text as a training run read its validation split (or, for
    ``split=test``, its test split), from its data settings (:func:`recorded_data`) and how many processes it ran
    on; a ``batch_size`` or ``seq_len`` given wins.

    Training cut the stream into ``eval_batch_size`` columns on each of its processes (``test_batch_size``, when
    set, for the test split), rank r reading the r-th block of them: one process reading as many columns in all
    scores the same tokens in the same windows, so eval reproduces the logged val/loss and test/loss. Sentences
    are scored whole whatever their batch, so one process's batch size will do.
    """
    stream = trained["mode"] == "stream"
    rows = trained["eval_batch_size"]
    if split == "test" and trained["test_batch_size"] is not None:
        rows = trained["test_batch_size"]
    batch_size = batch_size or rows * (world_size if stream else 1)
    return trained["mode"], batch_size, seq_len or trained["seq_len"]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> None:
    output = check_output(cfg.output or Path(cfg.paths.output_dir) / "metrics.json", cfg.overwrite)
    remove_stale_temporaries(output.parent, names=[glob.escape(output.name)])
    result = evaluate(cfg)
    metric = (f"ppl {result['ppl']:.2f} | " if "ppl" in result else "") + f"bpc {result['bpc']:.4f}"
    print(f"{result['text']}: {result['tokens']:,} tokens | loss {result['loss']:.4f} nats | {metric}")
    write_atomically(output, json.dumps(result, indent=2) + "\n", elsewhere="output=FILE")
    log.info("Metrics written to %s", output)


def main() -> None:
    """Console entry point: ``rnnlm-eval [overrides]``."""
    if run_command(_hydra_main, "eval", compose_once=True):
        end_program(main)


if __name__ == "__main__":
    main()
