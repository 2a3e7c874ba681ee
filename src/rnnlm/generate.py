"""Generate text from a checkpoint (``conf/generate.yaml``): ``rnnlm-generate ckpt_path=... prompt=...``."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from rnnlm.checkpoint import load_checkpoint
from rnnlm.checks import ConfigError, check_generate_config
from rnnlm.cli import CONF_DIR, exit_on_user_error, pick_device, quote_free_text
from rnnlm.sampling import generate

SEPARATOR = "\n" + "-" * 40 + "\n"


def generate_texts(cfg: DictConfig) -> list[str]:
    """The prompt followed by each sample's continuation, as text."""
    check_generate_config(cfg)
    device = pick_device(cfg.device)
    loaded = load_checkpoint(cfg.ckpt_path, map_location=device)
    if loaded.net.bidirectional:
        raise ConfigError(f"{cfg.ckpt_path} is a bidirectional model: it predicts each token from both sides and "
                          "cannot generate text; fill a blank with score.py text='... ___ ...' instead")
    vocab = loaded.vocab
    prompt = Path(cfg.prompt_file).read_text(encoding="utf-8").rstrip("\n") if cfg.prompt_file else cfg.prompt
    ids = vocab.encode_text(prompt)
    stop_id = vocab.line_end_id if cfg.stop_at_eos else None
    new = generate(
        loaded.net, torch.tensor([ids] * cfg.num_samples, device=device), cfg.max_new_tokens,
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, greedy=cfg.greedy,
        generator=torch.Generator().manual_seed(cfg.seed), stop_id=stop_id,
    )
    texts = []
    for row in new.tolist():
        if stop_id is not None and stop_id in row:
            row = row[: row.index(stop_id)]
        continuation = vocab.decode(row)
        glue = " " if vocab.level == "word" and prompt and continuation and not continuation[0].isspace() else ""
        texts.append(prompt + glue + continuation)
    return texts


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> None:
    text = SEPARATOR.join(generate_texts(cfg))
    print(text)
    if cfg.output:
        Path(cfg.output).write_text(text + "\n", encoding="utf-8")


def main() -> None:
    """Console entry point: ``rnnlm-generate [overrides]``."""
    sys.argv[1:] = quote_free_text(sys.argv[1:], text_keys=("prompt",))
    _hydra_main()


if __name__ == "__main__":
    main()
