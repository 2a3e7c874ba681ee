"""Scoring text with a network: the loss over a split's batches (as validation and test compute it), the
log-probability of whole lines, and the ranking of the tokens that could fill a blank (from the left context and
after it, or from both sides with a bidirectional model)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from rnnlm.errors import ConfigError
from rnnlm.loss import IGNORE_INDEX, CharacterCount, pad_batch
from rnnlm.network import LanguageModel
from rnnlm.state import State, batch_rows
from rnnlm.vocab import Vocab


def chunk_loss(net: LanguageModel, inputs: Tensor, targets: Tensor, state: State | None,
               count_correct: bool = False) -> tuple[Tensor, Tensor, State | None, Tensor | None]:
    """The summed loss (nats) of one chunk, as :class:`rnnlm.lightning_module.RecurrentLM` computes it in validation
    and test: targets (B, T) follow inputs (B, T) step by step, from ``state``.

    Returns:
        the summed loss, the number of scored targets, the final state (None for a bidirectional network) and, with
        ``count_correct``, how many scored targets the network ranks first (else None).
    """
    if net.bidirectional:  # each target predicted from both sides of it
        # Row b of the window is inputs[b, 0] then the targets: T+1 tokens, so the targets' right neighbours are in
        # view. Window position 0 was the previous chunk's last target (or a row's first token, never a target):
        # scoring only positions 1..T counts every token once.
        window = torch.cat([inputs[:, :1], targets], 1)  # (B, T+1)
        features, state = net.features(window)[0][:, 1:], None
    else:
        features, state = net.features(inputs, state)  # (B, T, D)
    correct = None
    if count_correct:
        scored = targets != IGNORE_INDEX
        correct = (net.logits(features[scored]).argmax(-1) == targets[scored]).sum()
    return *net.summed_loss(features, targets), state, correct


@torch.inference_mode()
def split_loss(net: LanguageModel, batches: Iterable[tuple[Tensor, Tensor]], carry_state: bool,
               count_correct: bool = False, characters: CharacterCount | None = None
               ) -> tuple[float, float, float, float]:
    """The summed loss (nats) over ``batches`` read in order, the number of scored targets, with ``count_correct``
    the number of those the network ranks first (else 0), and with ``characters`` the characters they stand for
    (else 0; see :class:`rnnlm.loss.CharacterCount`): one process's validation or test in training, without
    Lightning. Each batch is moved to the network's device.

    With ``carry_state`` (a model trained on a stream) each chunk starts from the previous chunk's final state while
    the rows stay as many: a stream's columns carry on, and its remainder, read as one shorter row, starts afresh.
    The sums are float64, added chunk by chunk as :class:`rnnlm.lightning_module.RecurrentLM` adds them.
    """
    net.eval()
    device = net.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, scored targets, ranked first, characters
    state = None
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        if state is not None and batch_rows(state) != inputs.size(0):
            state = None
        total, count, final, correct = chunk_loss(net, inputs, targets, state, count_correct)
        state = final if carry_state else None
        zero = total.new_zeros((), dtype=torch.float64)
        right = correct.double() if correct is not None else zero
        chars = characters(inputs, targets) if characters is not None else zero
        sums += torch.stack([total.double(), count.double(), right, chars])
    total, count, right, chars = sums.tolist()
    return total, count, right, chars


@torch.no_grad()
def sentence_logprobs(net: LanguageModel, vocab: Vocab, texts: list[str],
                      batch_size: int = 64) -> list[tuple[float, int]]:
    """Log-probability (nats) of each whole text as a line — its tokens and the line end — and how many
    tokens that counts. Texts are scored ``batch_size`` at a time, right-padded (padding is not scored),
    on the device of the network's weights."""
    net.eval()
    device = net.device
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
    if vocab.level == "bpe":  # bytes: every text is readable, but a filler must be one token
        return [str(c) for c in candidates if single_token and len(vocab.encode_text(str(c))) != 2]
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
    logits, _ = net.eval()(torch.tensor([ids], device=net.device))
    return logits[0, len(left)].float().log_softmax(-1).cpu()


def rank_fillers(log_probs: Tensor, vocab: Vocab, candidates: list[str]) -> list[tuple[str, float]]:
    """``(candidate, log-probability)`` best first; a bidirectional model fills one token per blank, so only
    candidates that are one token of the vocabulary are ranked."""
    def token_id(candidate: str) -> int:
        return vocab.encode_text(candidate)[1] if vocab.level == "bpe" else vocab.index[candidate]

    ranked = [(c, float(log_probs[token_id(c)])) for c in _known(vocab, candidates, single_token=True)]
    return sorted(ranked, key=lambda row: -row[1])
