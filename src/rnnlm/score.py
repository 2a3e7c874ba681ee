"""Score sentences with a checkpoint (``rnnlm/conf/score.yaml``): fill-in-the-blank ranking and per-line
log-probabilities."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from rnnlm.checkpoint import load_checkpoint, resolve_checkpoint
from rnnlm.checks import ConfigError
from rnnlm.cli import CONF_DIR, exit_on_user_error, pick_device, quote_free_text, run_command
from rnnlm.corpora import read_lines
from rnnlm.datamodule import IGNORE_INDEX, pad_batch
from rnnlm.network import LanguageModel
from rnnlm.vocab import Vocab


@torch.no_grad()
def sentence_logprobs(net: LanguageModel, vocab: Vocab, texts: list[str],
                      batch_size: int = 64) -> list[tuple[float, int]]:
    """Log-probability (nats) of each whole text as a line — its tokens and the line end — and how many
    tokens that counts. Texts are scored ``batch_size`` at a time, right-padded (padding is not scored),
    on the device of the network's weights."""
    net.eval()
    device = _device_of(net)
    results = []
    for start in range(0, len(texts), batch_size):
        examples = []
        for text in texts[start : start + batch_size]:
            ids = torch.tensor([*vocab.encode_text(text), vocab.line_end_id])  # <start> t1 .. tn <line end>
            examples.append((ids[:-1], ids[1:]))
        inputs, targets = (t.to(device) for t in pad_batch(examples))
        logits, _ = net(inputs)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                                reduction="none")  # (B, T)
        counts = (targets != IGNORE_INDEX).sum(1)
        results += [(-float(n), int(c)) for n, c in zip(nll.sum(1).tolist(), counts.tolist(), strict=True)]
    return results


def _device_of(net: LanguageModel) -> torch.device:
    """Where the network's weights are: the inputs are made there."""
    return net.decoder.weight.device


def _check_one_blank(text: str, blank: str, fix: str) -> None:
    if blank not in text:
        raise ConfigError(f"text has no blank {blank!r} to fill: {fix}")
    if text.count(blank) > 1:
        raise ConfigError(f"text has {text.count(blank)} blanks {blank!r}: one is filled at a time, so leave one blank "
                          "and write the other words in")


def unknown_candidates(vocab: Vocab, candidates: list[str], single_token: bool = False) -> list[str]:
    """Candidates the model cannot read: a word (or, in a char model, a character) outside its vocabulary.

    Such a candidate would be scored as ``<unk>``, often a frequent token, and so ranked above real words.
    With ``single_token`` each candidate must be one token of the vocabulary (a bidirectional model's filler).
    """
    if single_token:
        return [str(c) for c in candidates if str(c) not in vocab]
    return [str(c) for c in candidates
            if any(t not in vocab for t in (str(c).split() if vocab.level == "word" else str(c)))]


def _known(vocab: Vocab, candidates: list[str], single_token: bool = False) -> list[str]:
    if not candidates:
        raise ConfigError("candidates is empty: give candidates=[a,b,c]")
    unknown = unknown_candidates(vocab, candidates, single_token)
    known = [str(c) for c in candidates if str(c) not in unknown]
    if not known:
        raise ConfigError(f"none of the candidates is in the model's vocabulary ({', '.join(unknown)}), so none can "
                          "be ranked: give words (or characters) the model was trained on")
    return known


def rank_candidates(net: LanguageModel, vocab: Vocab, text: str, candidates: list[str],
                    blank: str = "___") -> list[tuple[str, float, int]]:
    """``(candidate, log-probability, tokens)`` of the text with its blank filled by each candidate, best first.

    Only candidates inside the vocabulary are ranked (see :func:`unknown_candidates` for the others).

    Raises:
        ConfigError: no blank or several, no candidates, or none of them in the vocabulary.
    """
    _check_one_blank(text, blank, "write it where the candidates go (or set blank=...)")
    known = _known(vocab, candidates)
    scores = sentence_logprobs(net, vocab, [text.replace(blank, c) for c in known])
    ranked = [(c, lp, n) for c, (lp, n) in zip(known, scores, strict=True)]
    return sorted(ranked, key=lambda row: -row[1])


@torch.no_grad()
def fill_blank(net: LanguageModel, vocab: Vocab, text: str, blank: str = "___") -> Tensor:
    """Log-probabilities (V,) of every token in the blank of ``text``, from a bidirectional model:
    it reads the words (or characters) on both sides, never the blank itself. Computed where the
    network's weights are, returned on the CPU."""
    if not net.bidirectional:
        raise ConfigError("filling a blank from both sides needs a bidirectional model (task=bilm); "
                          "give candidates=[...] to rank them with this model")
    _check_one_blank(text, blank, "write it where the missing token goes")
    before, after = text.split(blank)
    left = vocab.encode_text(before)  # <start> and the tokens before the blank
    ids = [*left, 0, *vocab.encode_text(after)[1:], vocab.line_end_id]  # the blank's id (0) is never read
    logits, _ = net.eval()(torch.tensor([ids], device=_device_of(net)))
    return logits[0, len(left)].float().log_softmax(-1).cpu()


def rank_fillers(log_probs: Tensor, vocab: Vocab, candidates: list[str]) -> list[tuple[str, float]]:
    """``(candidate, log-probability)`` best first; a bidirectional model fills one token per blank, so only
    candidates that are one token of the vocabulary are ranked."""
    ranked = [(c, float(log_probs[vocab.index[c]])) for c in _known(vocab, candidates, single_token=True)]
    return sorted(ranked, key=lambda row: -row[1])


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="score")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> None:
    if (cfg.text is None) == (cfg.text_file is None):
        raise ConfigError("give text=... (with candidates=[...] to fill a blank) or text_file=FILE, one of the two")
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
            rows = [(vocab.tokens[i], lp) for lp, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
        print("rank\tlogprob\tprob\tfiller")
        for rank, (token, lp) in enumerate(rows, 1):
            print(f"{rank}\t{lp:.3f}\t{math.exp(lp):.4f}\t{token!r}" if vocab.level == "char" else
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
    print("logprob\tppl\ttokens\ttext")
    for line, (lp, n) in zip(lines, sentence_logprobs(net, vocab, lines, cfg.batch_size), strict=True):
        print(f"{lp:.3f}\t{math.exp(-lp / n):.2f}\t{n}\t{line}")


def _print_unknown(candidates: list[str], why: str) -> None:
    if candidates:  # after the table, so the ranks above stay those of real words
        print(f"{why}, not ranked: {', '.join(candidates)}")


def main() -> None:
    """Console entry point: ``rnnlm-score [overrides]``."""
    sys.argv[1:] = quote_free_text(sys.argv[1:], text_keys=("text", "blank"), list_keys=("candidates",))
    run_command(_hydra_main, "score")


if __name__ == "__main__":
    main()
