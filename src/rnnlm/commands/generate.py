"""Generate text from a checkpoint (``conf/generate.yaml``): ``rnnlm-generate ckpt_path=... prompt=...``."""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from rnnlm.checkpoint import load_checkpoint, resolve_checkpoint
from rnnlm.checks import ConfigError, check_generate_config
from rnnlm.commands.cli import (
    CONF_DIR,
    check_output,
    end_program,
    exit_on_user_error,
    pick_device,
    quote_free_text,
    run_command,
)
from rnnlm.files import remove_stale_temporaries, write_atomically
from rnnlm.sampling import generate_tokens

SEPARATOR = "\n" + "-" * 40 + "\n"


def generate_texts(cfg: DictConfig) -> list[str]:
    """The prompt followed by each sample's continuation, as text."""
    check_generate_config(cfg)
    prompt = read_prompt(cfg)
    device = pick_device(cfg.device)
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir)
    loaded = load_checkpoint(ckpt_path, map_location=device)
    if loaded.net.bidirectional:
        raise ConfigError(f"{ckpt_path} is a bidirectional model: it predicts each token from both sides and "
                          "cannot generate text; fill a blank with score.py text='... ___ ...' instead")
    vocab = loaded.vocab
    ids = vocab.encode_text(prompt)
    stop_id = vocab.line_end_id if cfg.stop_at_eos else None
    # The network is on `device` and the prompt goes to it; the random draws come from a CPU generator,
    # so a seed gives the same text on the CPU and on a GPU (see rnnlm.sampling.next_tokens).
    new = generate_tokens(
        loaded.net, torch.tensor([ids] * cfg.num_samples), cfg.max_new_tokens,
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


def read_prompt(cfg: DictConfig) -> str:
    """``prompt``, or the text of ``prompt_file`` (UTF-8) without its final newlines."""
    if not cfg.prompt_file:
        return cfg.prompt
    try:
        return Path(cfg.prompt_file).read_text(encoding="utf-8").rstrip("\n")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"prompt_file={cfg.prompt_file} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
            f"{err.start}): convert it, e.g. iconv -f latin1 -t utf-8 {cfg.prompt_file} > prompt-utf8.txt"
        ) from None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> None:
    output = check_output(cfg.output, cfg.overwrite) if cfg.output else None  # before the work, not after
    if output:
        remove_stale_temporaries(output.parent, names=[glob.escape(output.name)])
    text = SEPARATOR.join(generate_texts(cfg))
    print(text)
    if output:  # once the text is ready: a failed write leaves no file, or the old one as it was
        write_atomically(output, text + "\n", elsewhere="output=FILE")


FREE_TEXT = {"text_keys": ("prompt",)}  # settings whose values are the user's text, quoted for Hydra


def main() -> None:
    """Console entry point: ``rnnlm-generate [overrides]``."""
    sys.argv[1:] = quote_free_text(sys.argv[1:], **FREE_TEXT)
    if run_command(_hydra_main, "generate", compose_once=True):
        end_program(main)


if __name__ == "__main__":
    main()
