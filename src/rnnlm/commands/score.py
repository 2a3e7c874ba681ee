"""Score sentences with a checkpoint (``conf/score.yaml``): fill-in-the-blank ranking and per-line
log-probabilities (the scoring itself is :mod:`rnnlm.scoring`): ``rnnlm-score ckpt_path=... text=...``."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rnnlm.checkpoint import load_checkpoint, resolve_checkpoint
from rnnlm.checks import check_score_config
from rnnlm.commands.cli import CONF_DIR, end_program, exit_on_user_error, pick_device, quote_free_text, run_command
from rnnlm.corpora import read_lines
from rnnlm.errors import ConfigError
from rnnlm.loss import bits_per_character
from rnnlm.scoring import fill_blank, rank_candidates, rank_fillers, sentence_logprobs, unknown_candidates


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="score")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> None:
    check_score_config(cfg)
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir)
    loaded = load_checkpoint(ckpt_path, map_location=pick_device(cfg.device))  # the inputs follow the network
    net, vocab = loaded.net, loaded.vocab
    if net.bidirectional:
        if cfg.text is None:
            raise ConfigError("a bidirectional model scores blanks only: give text='... ___ ...'")
        log_probs = fill_blank(net, vocab, cfg.text, cfg.blank)
        unknown = []
        if cfg.candidates:
            rows = rank_fillers(log_probs, vocab, list(cfg.candidates))
            unknown = unknown_candidates(vocab, list(cfg.candidates), single_token=True)
        else:
            top = log_probs.topk(min(cfg.top_k, len(vocab)))
            shown = (lambda i: vocab.decode([i])) if vocab.level == "bpe" else (lambda i: vocab.tokens[i])
            rows = [(shown(i), lp) for lp, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
        print("rank\tlogprob\tprob\tfiller")
        for rank, (token, lp) in enumerate(rows, 1):
            print(f"{rank}\t{lp:.3f}\t{math.exp(lp):.4f}\t{token!r}" if vocab.level != "word" else
                  f"{rank}\t{lp:.3f}\t{math.exp(lp):.4f}\t{token}")
        _print_unknown(unknown, "not one token of the model's vocabulary")
        return
    if cfg.text is not None and (cfg.candidates or cfg.blank in cfg.text):
        ranked = rank_candidates(net, vocab, cfg.text, list(cfg.candidates), cfg.blank)
        print("rank\tlogprob\tppl\tcandidate")
        for rank, (cand, lp, n) in enumerate(ranked, 1):
            print(f"{rank}\t{lp:.3f}\t{math.exp(-lp / n):.2f}\t{cand}")
        _print_unknown(unknown_candidates(vocab, list(cfg.candidates)), "not in the model's vocabulary")
        return
    if cfg.text is not None:
        lines = [cfg.text]
    else:
        if not Path(cfg.text_file).is_file():
            raise ConfigError(f"text_file={cfg.text_file} does not exist")
        lines = [line for line in read_lines(Path(cfg.text_file)) if line.strip()]
    # bits per character: each line's characters with its line end (rnnlm.vocab.Vocab.text_characters), the same
    # count training's val/bpc and test/bpc divide by
    print("logprob\tppl\tbpc\ttokens\ttext")
    total_lp = total_tokens = total_chars = 0
    for line, (lp, n) in zip(lines, sentence_logprobs(net, vocab, lines, cfg.batch_size), strict=True):
        chars = vocab.text_characters(line)
        print(f"{lp:.3f}\t{math.exp(-lp / n):.2f}\t{bits_per_character(-lp, chars):.4f}\t{n}\t{line}")
        total_lp, total_tokens, total_chars = total_lp + lp, total_tokens + n, total_chars + chars
    if len(lines) > 1:  # the lines together: a sentence-mode model's test/bpc when they are its test split
        print(f"{total_lp:.3f}\t{math.exp(-total_lp / total_tokens):.2f}\t"
              f"{bits_per_character(-total_lp, total_chars):.4f}\t{total_tokens}\t(all {len(lines)} lines, "
              f"{total_chars} characters)")


def _print_unknown(candidates: list[str], why: str) -> None:
    if candidates:  # after the table, so the ranks above stay those of real words
        print(f"{why}, not ranked: {', '.join(candidates)}")


FREE_TEXT = {"text_keys": ("text", "blank"), "list_keys": ("candidates",)}  # the user's text, quoted for Hydra


def main() -> None:
    """Console entry point: ``rnnlm-score [overrides]``."""
    sys.argv[1:] = quote_free_text(sys.argv[1:], **FREE_TEXT)
    if run_command(_hydra_main, "score", compose_once=True):
        end_program(main)


if __name__ == "__main__":
    main()
