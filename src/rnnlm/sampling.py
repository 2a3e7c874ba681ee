"""Text generation: encode the prompt once, then one recurrent step per new token with the carried state.

At batch size 1 a call of ``torch.nn.LSTM`` costs far more in per-call overhead than in arithmetic,
so new tokens go through :class:`Stepper`: the same weights, laid out once as one matrix per layer
over ``[x, h]``, so each layer costs one ``addmm`` plus its gates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnlm.backbone import State
from rnnlm.minrnn import MIN_CELLS, coefficients
from rnnlm.network import LanguageModel


class Stepper:
    """Advance a :class:`LanguageModel` (in eval mode) by one token per call, on its own weights.

    Computes what ``torch.nn.RNN/LSTM/GRU`` compute for one time step:

    - rnn:  ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``
    - lstm: ``i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh)``; ``c' = σ(f)c + σ(i)tanh(g)``; ``h' = σ(o)tanh(c')``
    - gru:  ``r, z = σ(split(W_ih x + b_ih + W_hh h + b_hh)[:2])``;
      ``n = tanh(W_in x + b_in + r∘(W_hn h + b_hn))``; ``h' = (1-z)∘n + z∘h``
      (reset-before GRU: ``n = tanh(W_in x + b_in + W_hn (r∘h))``)
    - mingru, minlstm: ``a, b = coefficients(W_x x + b)``; ``h' = a∘h + b`` (:mod:`rnnlm.minrnn`: the gates read x
      alone; the recurrent step, not the scan the training runs)
    """

    def __init__(self, net: LanguageModel):
        if net.bidirectional:
            raise ValueError("a bidirectional model cannot generate text: it predicts tokens from both sides")
        config = net.config
        self.cell = config.cell
        self.hidden = config.hidden_size
        self.relu = self.cell == "rnn" and config.nonlinearity == "relu"
        self.reset_after = config.reset_after
        weights = net.backbone.fused_state_dict(strict=False)
        self.layers = []
        with torch.no_grad():
            for k in range(config.num_layers):
                if self.cell in MIN_CELLS:  # no hidden-to-hidden matrix: (I, G*H) and the bias
                    w_x, b = net.backbone.rnn.cells[k].stacked()
                    self.layers.append((w_x.t().contiguous(), b.clone()))
                    continue
                w_ih, w_hh = weights[f"weight_ih_l{k}"], weights[f"weight_hh_l{k}"]
                b_ih, b_hh = weights[f"bias_ih_l{k}"], weights[f"bias_hh_l{k}"]
                if self.cell == "gru":  # the candidate's recurrent part is gated by r: keep it apart
                    self.layers.append((w_ih.t().contiguous(), b_ih.clone(), w_hh.t().contiguous(), b_hh.clone()))
                else:  # (I + H, G*H): one product over the concatenation [x, h]
                    self.layers.append((torch.cat([w_ih, w_hh], 1).t().contiguous(), b_ih + b_hh))
            self.embedding = None if net.embedding is None else net.embedding.weight.detach()
            self.projection = net.projection  # None, or the linear map from the top layer to the decoder's input
            # the full decoder as one (H, V) matrix; an adaptive softmax computes its own distribution
            self.adaptive_head = net.decoder if net.adaptive else None
            if not net.adaptive:
                self.decoder_w = net.decoder.weight.detach().t().contiguous()
                self.decoder_b = net.decoder.bias.detach()
        self.vocab_size = net.vocab_size
        self.dtype = net.dtype

    def split_state(self, state: State) -> list:
        """``nn`` state (num_layers, B, H) [pair] -> per-layer list of h or (h, c)."""
        if self.cell == "lstm":
            h, c = state
            return [(h[k], c[k]) for k in range(h.size(0))]
        return list(state.unbind(0))

    def join_state(self, layers: list) -> State:
        if self.cell == "lstm":
            return torch.stack([h for h, _ in layers]), torch.stack([c for _, c in layers])
        return torch.stack(layers)

    @torch.no_grad()
    def step(self, tokens: Tensor, layers: list) -> tuple[Tensor, list]:
        """tokens (B,) and per-layer state -> next-token logits (B, V) (log-probabilities from an adaptive
        softmax) and the new per-layer state."""
        if self.embedding is None:
            x = F.one_hot(tokens, self.vocab_size).to(self.dtype)
        else:
            x = self.embedding[tokens]
        new = []
        for weights, state in zip(self.layers, layers, strict=True):
            if self.cell in MIN_CELLS:
                w, bias = weights
                a, b = coefficients(self.cell, torch.addmm(bias, x, w))
                x = torch.addcmul(b, a, state)  # h' = a∘h + b
                new.append(x)
            elif self.cell == "lstm":
                w, b = weights
                h, c = state
                i, f, g, o = torch.addmm(b, torch.cat([x, h], 1), w).chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                x = torch.sigmoid(o) * torch.tanh(c)
                new.append((x, c))
            elif self.cell == "gru":
                w_ih, b_ih, w_hh, b_hh = weights
                xr, xz, xn = torch.addmm(b_ih, x, w_ih).chunk(3, 1)
                if self.reset_after:
                    hr, hz, hn = torch.addmm(b_hh, state, w_hh).chunk(3, 1)
                    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                    n = torch.tanh(xn + r * hn)
                else:  # the original GRU: the reset gate scales h before the candidate's matrix
                    hr, hz = (state @ w_hh[:, : 2 * self.hidden]).chunk(2, 1)
                    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                    n = torch.tanh(xn + (r * state) @ w_hh[:, 2 * self.hidden :])
                x = n + z * (state - n)  # (1 - z) n + z h
                new.append(x)
            else:
                w, b = weights
                pre = torch.addmm(b, torch.cat([x, state], 1), w)
                x = torch.relu(pre) if self.relu else torch.tanh(pre)
                new.append(x)
        if self.projection is not None:
            x = self.projection(x)
        if self.adaptive_head is not None:
            return self.adaptive_head.log_prob(x), new
        return torch.addmm(self.decoder_b, x, self.decoder_w), new


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

    The prompt is read once by the fused kernel; each new token costs one :class:`Stepper` step. Both run
    where the network's weights are (the prompt is moved there); see :func:`next_tokens` for where
    sampling draws. With ``stop_id``, generation ends once every row has produced it (later positions of
    rows that stopped early repeat ``stop_id``).
    """
    was_training = net.training
    net.eval()
    given_on = prompt.device
    prompt = prompt.to(net.device)
    try:
        logits, state = net(prompt)
        logits = logits[:, -1]
        stepper = Stepper(net)
        layers = stepper.split_state(state)
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
            logits, layers = stepper.step(token, layers)
        return (torch.stack(new, 1) if new else prompt.new_zeros(prompt.size(0), 0)).to(given_on)
    finally:
        net.train(was_training)
