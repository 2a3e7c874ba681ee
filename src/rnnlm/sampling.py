"""Text generation: encode the prompt once, then one recurrent step per new token with the carried state."""

from __future__ import annotations

import torch
from torch import Tensor

from rnnlm.network import LanguageModel


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the ``top_k`` largest and outside the smallest set whose
    probability reaches ``top_p`` (nucleus). logits: (B, V)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    net: LanguageModel,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue every row of ``prompt`` (B, P) by ``max_new_tokens`` ids -> (B, max_new_tokens).

    The prompt is read once; each new token costs one step of the network on the carried state.
    """
    was_training = net.training
    net.eval()
    try:
        logits, state = net(prompt)
        next_logits = logits[:, -1]
        new = []
        for _ in range(max_new_tokens):
            if greedy:
                token = next_logits.argmax(-1, keepdim=True)
            else:
                probs = filter_logits(next_logits / temperature, top_k, top_p).softmax(-1)
                token = torch.multinomial(probs.float().cpu(), 1, generator=generator).to(prompt.device)
            new.append(token)
            logits, state = net(token, state)
            next_logits = logits[:, -1]
        return torch.cat(new, dim=1) if new else prompt.new_zeros(prompt.size(0), 0)
    finally:
        net.train(was_training)
