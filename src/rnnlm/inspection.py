"""What a trained causal model does with a text, token by token: how surprised it is by each token, its top-k
guesses for it, every unit of one layer after each token (the hidden state, the cell state of an LSTM, the gates
of a cell that has them), simple features of the text, and the units that follow each feature most closely (the
unit finder). :mod:`rnnlm.inspection_page` draws it as one HTML page; ``rnnlm-inspect`` writes that page or this
data as JSON.

The text is read as ``rnnlm-score`` reads it, in sequences each from a fresh state and ended by the line end: the
whole text as one (score's ``text=``; a char or bpe model reads its line ends as tokens, as it read its training
stream), or each line as one (score's ``text_file=``); the totals are score's own
(:func:`rnnlm.scoring.sentence_logprobs`). Token t's surprisal and guesses are the model's prediction of t, from the
state after t-1; the units at t are the state after reading t.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from rnnlm.cells import RecurrentCell
from rnnlm.errors import ConfigError
from rnnlm.loss import bits_per_character
from rnnlm.network import LanguageModel
from rnnlm.scoring import sentence_logprobs
from rnnlm.vocab import Vocab, token_bytes

BIDIRECTIONAL = ("is a bidirectional model: it predicts each token from both sides, so it has no next-token "
                 "surprisal or guesses to show: inspect a causal (task=lm) checkpoint")
OPENING_QUOTES, CLOSING_QUOTES = "\u201c", "\u201d"  # “ ”; a plain " opens or closes in turn
OPENING_BRACKETS, CLOSING_BRACKETS = "([{", ")]}"
SENTENCE_ENDS = ".!?"


def text_features(text: str) -> dict[str, np.ndarray]:
    """Simple features of each character of ``text``, each as the model could know it once it has read that
    character (float arrays of ``len(text)``):

    - ``inside quotes``: 1 between an opening and a closing quotation mark (``"`` opens and closes in turn, “ opens,
      ” closes; the opening mark counts as inside, the closing one as outside). Single quotes are left out: they are
      apostrophes as often.
    - ``bracket depth``: how many of ``( [ {`` are open.
    - ``position in line``: characters read since the line began (1 for its first character, 0 for its line end,
      after which a new line begins).
    - ``since space``: characters read since the last space, tab or line end (0 at one).
    - ``line start``: 1 at the first character of a line.
    - ``sentence start``: 1 at the first letter or digit of the text and after a sentence's end (``. ! ?``).
    """
    names = ("inside quotes", "bracket depth", "position in line", "since space", "line start", "sentence start")
    values = {name: np.zeros(len(text)) for name in names}
    inside, depth, column, since_space, sentence_ended = False, 0, 0, 0, True
    for i, char in enumerate(text):
        if char in OPENING_QUOTES or char in CLOSING_QUOTES:
            inside = char in OPENING_QUOTES
        elif char == '"':
            inside = not inside
        depth = depth + 1 if char in OPENING_BRACKETS else max(depth - 1, 0) if char in CLOSING_BRACKETS else depth
        values["line start"][i] = column == 0 and char != "\n"
        column = 0 if char == "\n" else column + 1
        since_space = 0 if char.isspace() else since_space + 1
        if char.isalnum() and sentence_ended:
            values["sentence start"][i], sentence_ended = 1, False
        sentence_ended = sentence_ended or char in SENTENCE_ENDS
        values["inside quotes"][i], values["bracket depth"][i] = inside, depth
        values["position in line"][i], values["since space"][i] = column, since_space
    return values


@dataclass
class Match:
    """One unit of the unit finder: how closely its activation follows a feature of the text."""

    feature: str
    kind: str  # a state's name (h, c) or "<gate> gate"
    unit: int  # 0-based, within the layer
    r: float  # Pearson's correlation over the tokens where the feature is defined


@dataclass
class Inspection:
    """One text read by one model: per token (T of them, the line ends included) and for one layer of H units.

    Token t's ``surprisal`` (bits) and ``top_ids``/``top_probs`` (T, k) are the model's prediction of t, from the
    state after t-1; ``activations[kind][t]`` (H,) is the state after reading t (or the gates at that step). A token's
    ``features`` are those of its last character (:func:`text_features`): NaN for a byte-level token that ends no
    character (the first bytes of a character split between tokens).
    """

    level: str
    cell: str
    layer: int  # 1-based
    layers: int
    pieces: list[str]  # each token's text: a char, a word with its space before it, a bpe token's characters
    first: list[bool]  # read first from a fresh state: left out of the unit finder, since every unit marks it
    unknown: list[bool]  # read as <unk>
    surprisal: np.ndarray  # (T,) bits
    top_ids: np.ndarray  # (T, k)
    top_probs: np.ndarray  # (T, k)
    labels: list[str]  # each vocabulary id as text (the guesses' names)
    activations: dict[str, np.ndarray]  # kind -> (T, H)
    features: dict[str, np.ndarray]  # name -> (T,)
    finder: list[Match]  # by feature, the closest units first
    log_prob: float  # nats, as rnnlm-score sums it
    scored: int  # tokens, as rnnlm-score counts them
    characters: int  # the characters they stand for (bits per character's denominator)
    sequences: int  # read each from a fresh state
    constant: list[str] = field(default_factory=list)  # features the same at every token: no unit can follow them

    @property
    def bits_per_character(self) -> float:
        return bits_per_character(-self.log_prob, self.characters)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.log_prob / self.scored)

    def best(self) -> Match | None:
        """The unit that follows some feature most closely (largest |r|), if any feature varies."""
        return max(self.finder, key=lambda m: abs(m.r), default=None)

    def to_json(self) -> dict:
        """Plain data for ``format=json``: every number of the page, the activations to 6 decimals."""
        return {
            "level": self.level, "cell": self.cell, "layer": self.layer, "layers": self.layers,
            "sequences": self.sequences, "tokens": self.scored, "characters": self.characters,
            **{name: value if math.isfinite(value) else None for name, value in (
                ("log_prob", self.log_prob), ("bits_per_character", self.bits_per_character),
                ("perplexity", self.perplexity))},
            "token": [{"text": piece, "first": first, "unknown": unknown,
                       "surprisal": bits if math.isfinite(bits) else None,  # null: a probability of 0 (JSON has no inf)
                       "top": [[self.labels[i], p] for i, p in zip(ids, probs, strict=True)]}
                      for piece, first, unknown, bits, ids, probs in zip(
                          self.pieces, self.first, self.unknown, self.surprisal.tolist(), self.top_ids.tolist(),
                          self.top_probs.tolist(), strict=True)],
            # 6 decimals, far finer than a plot or a correlation needs, in a third of the text of float32's digits
            "activations": {kind: np.round(values, 6).tolist() for kind, values in self.activations.items()},
            "features": {name: [None if math.isnan(v) else v for v in values.tolist()]
                         for name, values in self.features.items()},
            "constant_features": self.constant,
            "finder": [vars(match) for match in self.finder],
        }


def token_labels(vocab: Vocab) -> list[str]:
    """Each id as text: a char, a word, or a bpe token's bytes read as UTF-8 (a partial character as ``\\xNN``)."""
    if vocab.level == "bpe":
        return [token_bytes(t).decode("utf-8", "backslashreplace") or t for t in vocab.tokens]
    return list(vocab.tokens)


def line_tokens(vocab: Vocab, line: str) -> tuple[list[int], list[str], list[bool]]:
    """A line as rnnlm-score reads it (its ``text=``: line ends inside it are chars or bytes of a char or bpe model,
    and a word model reads only its words): its ids (:attr:`Vocab.start_id` first, the line end last), and the text and
    the <unk> flag of each id after the first (the scored ones). The pieces join into the text bits per character
    counts (:meth:`Vocab.text_characters`): the line, its words joined by single spaces at word level, and a
    newline."""
    ids = [*vocab.encode_text(line), vocab.line_end_id]
    if vocab.level == "char":
        return ids, [*line, "\n"], [c not in vocab for c in line] + [False]
    if vocab.level == "word":
        words = line.split()
        return ids, [*(("" if i == 0 else " ") + w for i, w in enumerate(words)), "\n"], \
            [w not in vocab for w in words] + [False]
    decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character split between tokens shows once whole
    return ids, [decoder.decode(token_bytes(vocab.tokens[i])) for i in ids[1:]], [False] * (len(ids) - 1)


def check_size(vocab: Vocab, sequences: list[str], max_tokens: int) -> int:
    """How many tokens the sequences are read as (their line ends included), counted before any is read.

    Raises:
        ConfigError: more than ``max_tokens``.
    """
    if vocab.level == "bpe":
        count = sum(len(ids) for ids in vocab.encode_lines(sequences))
    else:
        count = sum(len(text.split() if vocab.level == "word" else text) + 1 for text in sequences)
    if count > max_tokens:
        raise ConfigError(f"the text is {count:,} tokens, more than max_tokens={max_tokens}: inspect a shorter "
                          f"passage (the page stays quick up to about 5,000 tokens), or raise max_tokens")
    return count


def layer_cell(net: LanguageModel, layer: int | None) -> RecurrentCell:
    """The cell of layer ``layer`` (1-based; None: the top layer) of a causal network.

    Raises:
        ConfigError: the network has no such layer.
    """
    cells = list(net.backbone.cells)
    if layer is not None and not 1 <= layer <= len(cells):
        raise ConfigError(f"layer={layer}, but the model has {len(cells)} layer{'s' * (len(cells) > 1)}: give layer="
                          f"1..{len(cells)}, or leave it out for the top layer")
    return cells[(layer or len(cells)) - 1]


@torch.no_grad()
def inspect_text(net: LanguageModel, vocab: Vocab, sequences: list[str], layer: int | None = None, top_k: int = 5,
                 finder_units: int = 3, batch_size: int = 64) -> Inspection:
    """Read each of ``sequences`` from a fresh state with ``net`` as rnnlm-score reads a line (one may hold line
    ends: :func:`line_tokens`) and record what :class:`Inspection` holds, for layer ``layer``
    (1-based; None: the top layer). Each layer is stepped one token at a time by its cell's own step
    (:meth:`rnnlm.stack.RecurrentStack.trace`), so every cell and form, a user's too, shows its states and gates.

    Raises:
        ConfigError: a bidirectional network, a layer it does not have, or an empty text.
    """
    if net.bidirectional:
        raise ConfigError(f"this checkpoint {BIDIRECTIONAL}")
    cell = layer_cell(net, layer)
    cells = list(net.backbone.cells)
    layer = cells.index(cell) + 1
    if not sequences:
        raise ConfigError("the text is empty: give text=... or a text_file with a line that is not blank")
    net.eval()
    kinds = [*cell.state_names, *(f"{g} gate" for g in cell.gate_names)]
    pieces, first, unknown, surprisal, top_ids, top_probs = [], [], [], [], [], []
    activations: dict[str, list[np.ndarray]] = {kind: [] for kind in kinds}
    for start in range(0, len(sequences), batch_size):
        batch = [line_tokens(vocab, text) for text in sequences[start:start + batch_size]]
        longest = max(len(ids) for ids, _, _ in batch)
        ids = torch.tensor([ids + [vocab.start_id] * (longest - len(ids)) for ids, _, _ in batch], device=net.device)
        tops, per_kind = [], {kind: [] for kind in kinds}
        # Every id is read, the last too: step t's top layer predicts id t+1, and the units after step t (>= 1) are
        # what reading id t, the (t-1)-th scored token, left.
        for outputs, states, opened in net.backbone.trace(net.embed(ids)):  # no dropout in eval mode
            tops.append(outputs[-1])
            for name, value in zip(cell.state_names, states[layer - 1], strict=True):
                per_kind[name].append(value)
            for name in cell.gate_names:
                per_kind[f"{name} gate"].append(opened[layer - 1][name])
        per_kind = {kind: torch.stack(values, 1).float().cpu().numpy() for kind, values in per_kind.items()}
        top = torch.stack(tops[:-1], 1)  # (B, T-1, H): the top layer after each id but the last
        log_probs = net.logits(top if net.projection is None else net.projection(top)).float().log_softmax(-1)
        target_log_probs = log_probs.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        best = log_probs.topk(min(top_k, len(vocab)), -1)
        for row, (row_ids, row_pieces, row_unknown) in enumerate(batch):
            n = len(row_ids) - 1  # scored: every token after the start
            pieces += row_pieces
            unknown += row_unknown
            first += [True] + [False] * (n - 1)
            surprisal.append((-target_log_probs[row, :n] / math.log(2)).cpu().numpy())
            top_ids.append(best.indices[row, :n].cpu().numpy())
            top_probs.append(best.values[row, :n].exp().cpu().numpy())
            for kind, values in per_kind.items():
                activations[kind].append(values[row, 1:n + 1])
    totals = sentence_logprobs(net, vocab, sequences, batch_size)  # rnnlm-score's own numbers
    features = token_features(pieces)
    stacked = {kind: np.concatenate(values).astype(np.float64) for kind, values in activations.items()}
    measured = ~np.array(first)  # every unit marks the step from a fresh state: a line start is no finding
    finder, constant = find_units({kind: values[measured] for kind, values in stacked.items()},
                                  {name: values[measured] for name, values in features.items()}, finder_units)
    return Inspection(
        level=vocab.level, cell=net.config.cell, layer=layer, layers=len(cells), pieces=pieces, first=first,
        unknown=unknown, surprisal=np.concatenate(surprisal), top_ids=np.concatenate(top_ids),
        top_probs=np.concatenate(top_probs), labels=token_labels(vocab), activations=stacked, features=features,
        finder=finder, constant=constant, log_prob=sum(lp for lp, _ in totals), scored=sum(n for _, n in totals),
        characters=sum(vocab.text_characters(text) for text in sequences), sequences=len(sequences))


def token_features(pieces: list[str]) -> dict[str, np.ndarray]:
    """:func:`text_features` of the text the pieces join into, at each piece's last character (NaN for an empty
    piece: a byte-level token that ends no character). For words and subwords that is the feature once the whole
    token is read, as the units after it are."""
    text = "".join(pieces)
    ends = np.cumsum([len(p) for p in pieces]) - 1  # each piece's last character
    defined = np.array([len(p) > 0 for p in pieces])
    return {name: np.where(defined, values[np.clip(ends, 0, None)] if len(text) else 0.0, np.nan)
            for name, values in text_features(text).items()}


def find_units(activations: dict[str, np.ndarray], features: dict[str, np.ndarray],
               per_feature: int) -> tuple[list[Match], list[str]]:
    """For each feature, the ``per_feature`` units (of any kind) whose activation correlates most with it, by
    |Pearson's r| over the tokens where the feature is defined; and the features that are constant there (no unit
    can follow those: a text without quotes, say)."""
    matches, constant = [], []
    for name, values in features.items():
        defined = ~np.isnan(values)
        feature = values[defined] - values[defined].mean() if defined.any() else values[defined]
        if not feature.any():  # the same at every token, or at none
            constant.append(name)
            continue
        found = []
        for kind, units in activations.items():
            r = _correlations(units[defined], feature)
            found += [Match(name, kind, int(u), float(r[u])) for u in np.argsort(-np.abs(r))[:per_feature]]
        matches += sorted(found, key=lambda m: -abs(m.r))[:per_feature]
    return matches, constant


def _correlations(units: np.ndarray, centred_feature: np.ndarray) -> np.ndarray:
    """Pearson's r of each column of ``units`` (T, H) with the feature (T,, already centred); 0 for a unit that
    never changes."""
    centred = units - units.mean(0)
    spread = np.sqrt((centred**2).sum(0) * (centred_feature**2).sum())
    return np.divide(centred_feature @ centred, spread, out=np.zeros(units.shape[1]), where=spread > 0)

