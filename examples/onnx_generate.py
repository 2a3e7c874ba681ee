"""Greedy text from a model that ``rnnlm-export format=onnx`` wrote, with onnxruntime and numpy alone (no torch, no
rnnlm): what a program that ships the ``.onnx`` file does.

    python examples/onnx_generate.py RUN/checkpoints/last.onnx "ROMEO:" 200

The file's ``rnnlm`` metadata (JSON) names the inputs and outputs and holds the vocabulary. One call of the graph is
one step: the token ids of a batch (batch,) and every layer's state in, the next token's log-probabilities
(batch, V) and the new state out. A text starts from zero states and the start id; each token of the prompt is fed
in turn, then each token picked.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime


def load(path: str) -> tuple[onnxruntime.InferenceSession, dict]:
    """The session that runs the file, and its description (the ``rnnlm`` metadata)."""
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session, json.loads(session.get_modelmeta().custom_metadata_map["rnnlm"])


def encode(description: dict, text: str) -> list[int]:
    """The ids of a prompt, after the start id: words split at spaces, or characters; unknown ones read as <unk>."""
    vocab = description["vocab"]
    index = {token: i for i, token in enumerate(vocab["tokens"])}
    tokens = text.split() if vocab["level"] == "word" else list(text)
    unknown = [t for t in tokens if t not in index]
    if unknown and description["unk_id"] is None:
        raise ValueError(f"not in the model's vocabulary: {unknown[:10]}")
    return [description["start_id"], *(index.get(t, description["unk_id"]) for t in tokens)]


def decode(description: dict, ids: list[int]) -> str:
    """Text of ids, as rnnlm writes it: characters joined (``<unk>`` as U+FFFD); words joined by spaces, ``<eos>`` as
    a line end."""
    vocab = description["vocab"]
    tokens = [vocab["tokens"][i] for i in ids if vocab["tokens"][i] != "<bos>"]
    if vocab["level"] == "char":
        return "".join("\ufffd" if t == "<unk>" else t for t in tokens)
    lines, words = [], []
    for t in tokens:
        if t == "<eos>":
            lines.append(" ".join(words) + "\n")
            words = []
        else:
            words.append(t)
    return "".join(lines) + " ".join(words)


def greedy(session: onnxruntime.InferenceSession, description: dict, prompt: list[int],
           max_new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
    """The ``max_new_tokens`` most likely ids after ``prompt`` (one row), and the log-probabilities (V,) each was
    picked from."""
    states = [i for i in description["inputs"] if i["name"] != "tokens"]
    feed = {s["name"]: np.zeros((1, s["shape"][1]), dtype=np.float32) for s in states}  # a text starts from zeros
    new, picked_from = [], []
    token = prompt[0]
    for position in range(len(prompt) - 1 + max_new_tokens):
        log_probs, *next_states = session.run(None, {"tokens": np.array([token], dtype=np.int64), **feed})
        feed = {s["name"]: value for s, value in zip(states, next_states, strict=True)}
        if position + 1 < len(prompt):
            token = prompt[position + 1]  # still reading the prompt
        else:
            token = int(log_probs[0].argmax())
            new.append(token)
            picked_from.append(log_probs[0])
    return new, picked_from


def continue_text(session: onnxruntime.InferenceSession, description: dict, prompt: str, max_new_tokens: int) -> str:
    """The prompt and its greedy continuation, as ``rnnlm-generate greedy=true`` prints them."""
    continuation = decode(description, greedy(session, description, encode(description, prompt), max_new_tokens)[0])
    words = description["vocab"]["level"] == "word"
    return prompt + (" " if words and prompt and continuation and not continuation[0].isspace() else "") + continuation


def main(argv: list[str]) -> None:
    if not 1 <= len(argv) <= 3:
        sys.exit("usage: python examples/onnx_generate.py MODEL.onnx [PROMPT] [MAX_NEW_TOKENS]")
    session, description = load(argv[0])
    print(continue_text(session, description, argv[1] if len(argv) > 1 else "", int(argv[2]) if len(argv) > 2 else 100))


if __name__ == "__main__":
    main(sys.argv[1:])
