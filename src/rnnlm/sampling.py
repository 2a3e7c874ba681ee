"""Text generation: encode the prompt once with the sequence kernels, then one recurrent step per new token with
the carried state (:meth:`rnnlm.network.LanguageModel.stepper`)."""

from __future__ import annotations

import torch
from torch import Tensor

from rnnlm.network import CANNOT_GENERATE, LanguageModel


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the ``top_k`` largest and outside the smallest set whose
    probability reaches ``top_p`` (nucleus). logits: (B, V)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, greedy: bool,
                generator: torch.Generator | None) -> Tensor:
    """Pick one token per row of logits (B, V) -> (B,), on the logits' device.

    Sampling draws where ``generator`` lives: a CPU generator (as ``rnnlm-generate`` and the training
    samples use) gives the same text from a seed whether the model runs on the CPU or a GPU; a CUDA
    generator samples on its GPU. Without one, the CPU's global generator draws.
    """
    if greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.multinomial(probs.to(where), 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def generate_tokens(
    net: LanguageModel,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
) -> Tensor:
    """Continue every row of ``prompt`` (B, P) by up to ``max_new_tokens`` ids -> (B, N), on the prompt's device.

    The prompt is read once by the sequence kernel; each new token costs one step of every cell. Both run
    where the network's weights are (the prompt is moved there); see :func:`next_tokens` for where
    sampling draws. With ``stop_id``, generation ends once every row has produced it (later positions of
    rows that stopped early repeat ``stop_id``).
    """
    was_training = net.training
    net.eval()
    given_on = prompt.device
    prompt = prompt.to(net.device)
    try:
        if net.bidirectional:
            raise ValueError(CANNOT_GENERATE)  # before the first token, which needs no step
        logits, state = net(prompt)
        logits = logits[:, -1]
        step = net.stepper(prompt.size(0))
        new = []
        done = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)
        for _ in range(max_new_tokens):
            token = next_tokens(logits, temperature, top_k, top_p, greedy, generator)
            if stop_id is not None:
                token = token.masked_fill(done, stop_id)
                done |= token == stop_id
            new.append(token)
            if len(new) == max_new_tokens or (stop_id is not None and bool(done.all())):
                break
            logits, state = step(token, state)
        return (torch.stack(new, 1) if new else prompt.new_zeros(prompt.size(0), 0)).to(given_on)
    finally:
        net.train(was_training)
