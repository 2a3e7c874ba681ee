"""Evaluate a checkpoint on its corpus's test split or any text (``conf/eval.yaml``): ``rnnlm-eval ckpt_path=...``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from rnnlm.checkpoint import load_checkpoint, resolve_checkpoint
from rnnlm.checks import ConfigError
from rnnlm.cli import CONF_DIR, check_output, exit_on_user_error, pick_device, run_command
from rnnlm.corpora import SPLITS, DataError, path_source
from rnnlm.datamodule import Sentences, StreamChunks, TextDataModule, make_loader
from rnnlm.prepare import encode_text
from rnnlm.vocab import loss_in_units

log = logging.getLogger(__name__)

MAX_UNK_SHARE = 0.5  # above this share of <unk>, a perplexity says nothing about the model


def evaluate(cfg: DictConfig) -> dict:
    """Token-weighted loss of the checkpoint on the chosen text, with the hidden state carried as in training."""
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split} must be one of {'|'.join(SPLITS)}")
    accelerator, devices = trainer_device(pick_device(cfg.device))
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir)
    loaded = load_checkpoint(ckpt_path)  # on the CPU: the Trainer moves the module to the device
    vocab, trained_on = loaded.vocab, loaded.data
    if cfg.data.path:
        source = path_source(Path(cfg.data.path).expanduser())
        split = None if "all" in source.files else cfg.split  # a lone file is evaluated whole
    elif trained_on:
        settings = {**trained_on, "data_dir": cfg.paths.data_dir, "cache_dir": cfg.paths.cache_dir}
        source, split = TextDataModule(**settings).source(), cfg.split
    else:
        raise ConfigError("the checkpoint does not record its training data: give data.path=FILE")
    ids = encode_text(source, vocab.level, vocab, split)
    if vocab.unk_id is not None and len(ids) and (unk_share := float((ids == vocab.unk_id).mean())) > MAX_UNK_SHARE:
        raise DataError(
            f"{unk_share:.0%} of the tokens of {source.name} are outside the checkpoint's vocabulary: this text "
            "does not match the model (a different language or tokenization?); evaluate on text like its training data"
        )
    # A bidirectional model trains on stream windows too, though it carries no state between them.
    stream = trained_on.get("mode", "stream") == "stream"
    # Training cut the stream into eval_batch_size columns on each of its processes: as many columns in
    # all score the same tokens in the same windows, so eval reproduces the logged val/loss.
    columns = trained_on.get("eval_batch_size", 10) * (loaded.info["world_size"] if stream else 1)
    batch_size = cfg.data.batch_size or columns
    seq_len = cfg.data.seq_len or trained_on.get("seq_len", 128)
    if stream:
        dataset = StreamChunks(ids, batch_size, seq_len, split=split or "evaluation")
    else:
        dataset = Sentences(ids, vocab.line_end_id, vocab.start_id, None)  # whole lines: every token scored
    trainer = L.Trainer(accelerator=accelerator, devices=devices, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    metrics = trainer.test(loaded.module, dataloaders=make_loader(dataset, batch_size), verbose=False)[0]
    loss = metrics["test/loss"]
    result = {
        "checkpoint": str(ckpt_path.resolve()),
        "global_step": loaded.info["global_step"],
        "text": f"{source.name}:{split or 'all'}",
        "level": vocab.level,
        "tokens": int(metrics["test/tokens"]),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "loss": loss,
    }
    unit, value = loss_in_units(loss, vocab.level)
    result[unit] = value
    return result


def trainer_device(device: torch.device) -> tuple[str, int | list[int]]:
    """Lightning's ``accelerator`` and ``devices`` for ``device``: ``cuda:1`` is ``("gpu", [1])``, so the
    GPU asked for is the one used (``devices=1`` would take the first).

    Raises:
        ConfigError: a device type Lightning cannot evaluate on.
    """
    if device.type == "cuda":
        return "gpu", [device.index] if device.index is not None else 1
    if device.type in ("cpu", "mps"):
        return device.type, 1
    raise ConfigError(f"device={device} cannot evaluate: use auto, cpu, cuda or cuda:N")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> None:
    output = check_output(cfg.output or Path(cfg.paths.output_dir) / "metrics.json", cfg.overwrite)
    result = evaluate(cfg)
    metric = f"bpc {result['bpc']:.4f}" if "bpc" in result else f"ppl {result['ppl']:.2f}"
    print(f"{result['text']}: {result['tokens']:,} tokens | loss {result['loss']:.4f} nats | {metric}")
    output.write_text(json.dumps(result, indent=2) + "\n")
    log.info("Metrics written to %s", output)


def main() -> None:
    """Console entry point: ``rnnlm-eval [overrides]``."""
    run_command(_hydra_main, "eval")


if __name__ == "__main__":
    main()
