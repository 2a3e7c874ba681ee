"""See inside a trained model (``conf/inspect.yaml``): ``rnnlm-inspect ckpt_path=... text_file=...`` writes one HTML
page of the text read by the model (:mod:`rnnlm.inspection_page`), or with ``format=json`` the data itself
(:mod:`rnnlm.inspection`)."""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rnnlm.checkpoint import load_checkpoint, resolve_checkpoint
from rnnlm.checks import check_inspect_config
from rnnlm.commands.cli import (
    CONF_DIR,
    check_output,
    end_program,
    exit_on_user_error,
    pick_device,
    quote_free_text,
    run_command,
)
from rnnlm.corpora import read_lines
from rnnlm.errors import ConfigError
from rnnlm.files import human_size, remove_stale_temporaries, write_atomically
from rnnlm.inspection import BIDIRECTIONAL, Inspection, check_size, inspect_text, layer_cell
from rnnlm.inspection_page import render_page


def sequences_of(cfg: DictConfig) -> list[str]:
    """The text as the sequences it is read in, each from a fresh state: the whole text without its final line ends
    (``read=stream``), or each line that is not blank (``read=lines``), as rnnlm-score reads ``text=`` and
    ``text_file=``."""
    if cfg.text is not None:
        lines = cfg.text.split("\n")
    else:
        if not Path(cfg.text_file).is_file():
            raise ConfigError(f"text_file={cfg.text_file} does not exist")
        lines = list(read_lines(Path(cfg.text_file)))
    if cfg.read == "lines":
        return [line for line in lines if line.strip()]
    text = "\n".join(lines).rstrip("\n")  # as a shell's "$(cat FILE)" gives it to rnnlm-score text=
    return [text] if text.strip() else []


def inspect_checkpoint(cfg: DictConfig) -> tuple[Path, Inspection]:
    """Read ``cfg``'s text with ``cfg.ckpt_path`` and write the page (or JSON) to ``cfg.output``, atomically.

    Raises:
        UserError: one line: a setting, the checkpoint (a bidirectional one too), the text, or the output path.
    """
    check_inspect_config(cfg)
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir)
    output = check_output(cfg.output or f"inspect.{cfg.format}", cfg.overwrite)  # before the work, not after
    remove_stale_temporaries(output.parent, names=[glob.escape(output.name)])
    loaded = load_checkpoint(ckpt_path, map_location=pick_device(cfg.device))
    if loaded.net.bidirectional:
        raise ConfigError(f"{ckpt_path} {BIDIRECTIONAL}")
    sequences = sequences_of(cfg)
    check_size(loaded.vocab, sequences, cfg.max_tokens)
    width = layer_cell(loaded.net, cfg.layer).hidden_size
    if any(u >= width for u in cfg.units):
        raise ConfigError(f"units={list(cfg.units)}: the layer has units 0..{width - 1}: give units in that range")
    inspection = inspect_text(loaded.net, loaded.vocab, sequences, cfg.layer, cfg.top_k, cfg.finder_units,
                              cfg.batch_size)
    if cfg.format == "json":
        data = json.dumps(inspection.to_json(), ensure_ascii=False, allow_nan=False) + "\n"
    else:
        data = render_page(inspection, Path(ckpt_path).name, list(cfg.units))
    write_atomically(output, data, elsewhere="output=FILE")
    return output, inspection


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="inspect")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> None:
    output, inspection = inspect_checkpoint(cfg)
    print(f"{output} ({human_size(output.stat().st_size)}): {inspection.scored} tokens, "
          f"{inspection.bits_per_character:.4f} bits per character, perplexity {inspection.perplexity:.2f}")
    if (best := inspection.best()) is not None:
        print(f"unit finder: layer {inspection.layer} {best.kind} unit {best.unit} follows {best.feature}, "
              f"r = {best.r:+.3f}")


FREE_TEXT = {"text_keys": ("text",)}  # the user's text, quoted for Hydra


def main() -> None:
    """Console entry point: ``rnnlm-inspect [overrides]``."""
    sys.argv[1:] = quote_free_text(sys.argv[1:], **FREE_TEXT)
    if run_command(_hydra_main, "inspect", compose_once=True):
        end_program(main)


if __name__ == "__main__":
    main()
