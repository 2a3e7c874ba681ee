"""minGRU and minLSTM: the parallel scan computes the step-by-step recurrence (outputs, state and gradients), the
equations themselves on a case worked by hand, carried state, long sequences, extreme pre-activations, generation,
and a run through the real config (train, eval, generate, score)."""

import dataclasses
import decimal
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from helpers import REPO, TINY
from rnnlm.cells import BUILT_IN
from rnnlm.cells.scan import SCAN_CHUNK
from rnnlm.checkpoint import load_checkpoint
from rnnlm.checks import count_parameters, equal_budget
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.eval import evaluate
from rnnlm.commands.generate import generate_texts
from rnnlm.diagnostics import gradient_flow
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.sampling import generate_tokens
from rnnlm.scoring import rank_candidates
from rnnlm.stack import RecurrentStack

MIN_CELLS = ("mingru", "minlstm")


class MinRecurrent(RecurrentStack):
    """A stack of min cells whose state is one (layers * directions, B, H) tensor, as torch.nn.GRU's."""

    def __init__(self, cell, input_size, hidden_size, num_layers=1, dropout=0.0, bidirectional=False, parallel=True,
                 locked=False):
        super().__init__(cell, input_size, hidden_size, num_layers, dropout, bidirectional,
                         impl="fused" if parallel else "scratch", locked_dropout=locked)

    def forward(self, x, state=None):
        outputs, final = super().forward(x, None if state is None else tuple((h,) for h in state.unbind(0)))
        return outputs, torch.stack([h for h, in final])


def _pair(cell: str, layers: int, bidirectional: bool, dtype=torch.float32) -> tuple[MinRecurrent, MinRecurrent]:
    """The parallel stack and the step-by-step one, with the same weights."""
    parallel = MinRecurrent(cell, 5, 7, layers, bidirectional=bidirectional).to(dtype)
    loop = MinRecurrent(cell, 5, 7, layers, bidirectional=bidirectional, parallel=False).to(dtype)
    loop.load_state_dict(parallel.state_dict())  # one state dict loads into either
    return parallel, loop


def _run(stack: MinRecurrent, x: torch.Tensor, h0: torch.Tensor | None) -> list[torch.Tensor]:
    """Outputs, final state, and the gradients of the input, the initial state and every parameter of a loss
    that reads both outputs and state."""
    x = x.detach().requires_grad_()
    h0 = None if h0 is None else h0.detach().requires_grad_()
    outputs, state = stack(x, h0)
    weights = torch.linspace(-1, 1, outputs.numel(), dtype=x.dtype).view_as(outputs)
    loss = (outputs * weights).sum() + state.pow(2).sum()
    leaves = [x, *([] if h0 is None else [h0]), *stack.parameters()]
    return [outputs, state, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("cell", MIN_CELLS)
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, False), (3, False), (1, True), (2, True)])
@pytest.mark.parametrize("given_state", [False, True])
def test_the_parallel_scan_computes_the_recurrence(cell, layers, bidirectional, given_state):
    torch.manual_seed(0)
    directions = 2 if bidirectional else 1
    x = torch.randn(3, 9, 5)
    h0 = torch.randn(layers * directions, 3, 7) if given_state else None  # negative values too: h_0 enters linearly
    # In float64 the two are the same function: outputs, state and every gradient agree to 1e-5 and far better.
    parallel, loop = _pair(cell, layers, bidirectional, torch.float64)
    for a, b in zip(_run(parallel, x.double(), None if h0 is None else h0.double()),
                    _run(loop, x.double(), None if h0 is None else h0.double()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # In float32: outputs and state to 1e-5; the weights' gradients sum B*T terms of size ~1, so 1e-4 relative.
    parallel, loop = _pair(cell, layers, bidirectional)
    got, expected = _run(parallel, x, h0), _run(loop, x, h0)
    for a, b in zip(got[:2], expected[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got[2:], expected[2:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_equations_on_a_case_worked_by_hand():
    """One input, one unit, scalar weights: the paper's equations written out with math."""
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    x, h0 = torch.tensor([[[1.0], [-1.0]]]), torch.tensor([[[0.5]]])
    # minGRU, W_xz = 1, b_z = 0, W_xh = 2, b_h = -1
    z1, z2 = sigmoid(1.0), sigmoid(-1.0)
    h1 = (1 - z1) * 0.5 + z1 * (2 * 1 - 1 + 0.5)  # candidate input 1 >= 0: g = 1 + 0.5
    h2 = (1 - z2) * h1 + z2 * sigmoid(2 * -1 - 1)  # candidate input -3 < 0: g = σ(-3)
    # minLSTM, W_xf = 1, b_f = 0, W_xi = -1, b_i = 0.5, W_xh = 1, b_h = 0
    f1, i1, f2, i2 = sigmoid(1.0), sigmoid(-0.5), sigmoid(-1.0), sigmoid(1.5)
    l1 = f1 / (f1 + i1) * 0.5 + i1 / (f1 + i1) * 1.5
    l2 = f2 / (f2 + i2) * l1 + i2 / (f2 + i2) * sigmoid(-1.0)
    cases = {"mingru": ({"W_xz": 1, "b_z": 0, "W_xh": 2, "b_h": -1}, [h1, h2]),
             "minlstm": ({"W_xf": 1, "b_f": 0, "W_xi": -1, "b_i": 0.5, "W_xh": 1, "b_h": 0}, [l1, l2])}
    for cell, (weights, expected) in cases.items():
        for parallel in (True, False):
            stack = MinRecurrent(cell, 1, 1, parallel=parallel)
            stack.load_state_dict({f"cells.0.{name}": torch.full((1, 1) if name[0] == "W" else (1,), float(value))
                                   for name, value in weights.items()})
            outputs, state = stack(x, h0)
            torch.testing.assert_close(outputs.flatten(), torch.tensor(expected), msg=f"{cell} {parallel}")
            torch.testing.assert_close(state.flatten(), torch.tensor(expected[-1:]))


@pytest.mark.parametrize("cell", MIN_CELLS)
def test_a_sequence_in_two_chunks_with_the_carried_state_is_the_whole_sequence(cell):
    torch.manual_seed(0)
    stack = MinRecurrent(cell, 5, 7, 2)
    x = torch.randn(2, SCAN_CHUNK * 2 + 22, 5)  # longer than a scan chunk, and the chunks meet mid-way through one
    whole, final = stack(x)
    first, state = stack(x[:, :100])
    second, carried = stack(x[:, 100:], state)  # as stream training passes it (detached or not: same values)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(carried, final, rtol=1e-5, atol=1e-5)
    loop = MinRecurrent(cell, 5, 7, 2, parallel=False)
    loop.load_state_dict(stack.state_dict())
    torch.testing.assert_close(loop(x)[0], whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("locked", [False, True])
def test_dropout_between_layers_is_drawn_alike_in_both_paths(locked):
    torch.manual_seed(0)
    parallel = MinRecurrent("minlstm", 5, 7, 3, dropout=0.5, locked=locked).train()
    loop = MinRecurrent("minlstm", 5, 7, 3, dropout=0.5, locked=locked, parallel=False).train()
    loop.load_state_dict(parallel.state_dict())
    x = torch.randn(2, 6, 5)
    outputs = []
    for stack in (parallel, loop):
        torch.manual_seed(1)  # the same masks, drawn in the same order
        outputs.append(stack(x)[0])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs[0], parallel.eval()(x)[0])  # the masks changed the outputs


@pytest.mark.parametrize("cell", MIN_CELLS)
def test_long_sequences_stay_finite_with_finite_gradients(cell):
    torch.manual_seed(0)
    stack = MinRecurrent(cell, 8, 16, 2)
    with torch.no_grad():  # large pre-activations too: gates near 0 and 1, candidates far on both sides of 0
        for weight in stack.parameters():
            weight.mul_(10)
    x = torch.randn(2, 2048, 8, requires_grad=True)
    outputs, state = stack(x)
    (outputs.mean() + state.mean()).backward()
    assert torch.isfinite(outputs).all() and torch.isfinite(state).all() and (outputs > 0).all()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(w.grad).all() for w in stack.parameters())


# Gate and candidate pre-activations far out: σ(k) rounds to 0 in float32 below about -88, where minLSTM's
# f / (f + i) is 0/0, and a gate of -1000 or +100 adds ~1000 or ~100 per step to the scan's prefix sums.
EXTREMES = {"-100": (-100.0,), "-1000": (-1000.0,), "+100": (100.0,), "mix": (-1000.0, -100.0, 0.0, 100.0)}


def _extreme_model(cell: str, values: tuple[float, ...]) -> LanguageModel:
    """A one-layer model with one unit per combination of ``values`` across the gates (the candidate's too), as
    biases. Weights and embeddings are multiples of 1/2 (W_x x within ±4 in steps of 1/4), so that every
    implementation computes the same pre-activations, exactly."""
    gates = BUILT_IN[cell]["fused"].gate_letters
    combinations = list(itertools.product(values, repeat=len(gates)))
    torch.manual_seed(0)
    net = LanguageModel(NetworkConfig(11, cell, 4, len(combinations), 1, dropout=0.0)).eval()
    min_cell = net.backbone.cells[0]
    with torch.no_grad():
        net.embedding.weight.copy_(torch.randint(-2, 3, net.embedding.weight.shape) / 2)
        for n, gate in enumerate(gates):
            weight = getattr(min_cell, f"W_x{gate}")
            weight.copy_(torch.randint(-2, 3, weight.shape) / 2)
            getattr(min_cell, f"b_{gate}").copy_(torch.tensor([values[n] for values in combinations]))
    return net


def _textbook(cell: str, pre: torch.Tensor) -> torch.Tensor:
    """The paper's equations step by step from h_0 = 0, with σ, f / (f + i) and all, in 40-digit decimal arithmetic
    (no underflow, no 0/0): pre-activations (B, T, G*H) -> h (B, T, H), rounded to float64."""
    gates = len(BUILT_IN[cell]["fused"].gate_letters)
    batch, steps, hidden = pre.size(0), pre.size(1), pre.size(2) // gates
    out = torch.empty(batch, steps, hidden, dtype=torch.float64)
    with decimal.localcontext() as context:
        context.prec = 40
        one, half = decimal.Decimal(1), decimal.Decimal("0.5")

        def sigmoid(k):
            return one / (one + (-k).exp())

        def g(k):
            return k + half if k >= 0 else sigmoid(k)

        for b, j in itertools.product(range(batch), range(hidden)):
            h = decimal.Decimal(0)
            for t in range(steps):
                k = [decimal.Decimal(pre[b, t, n * hidden + j].item()) for n in range(gates)]  # exact: floats
                if cell == "mingru":
                    z = sigmoid(k[0])
                    h = (one - z) * h + z * g(k[1])
                else:
                    f, i = sigmoid(k[0]), sigmoid(k[1])
                    h = f / (f + i) * h + i / (f + i) * g(k[2])
                out[b, t, j] = float(h)
    return out


@pytest.mark.parametrize("cell", MIN_CELLS)
@pytest.mark.parametrize("case", EXTREMES)
def test_extreme_pre_activations_give_the_textbook_states_in_every_implementation(cell, case):
    fused = _extreme_model(cell, EXTREMES[case])
    scratch = LanguageModel(dataclasses.replace(fused.config, impl="scratch")).eval()
    scratch.load_state_dict(fused.state_dict())  # one state dict loads into either
    tokens = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pre = F.linear(fused.embed(tokens), *fused.backbone.cells[0].stacked())  # (B, T, G*H)
    expected = _textbook(cell, pre)
    state, stepped = None, []  # generation's recurrent step, from zeros
    for token in tokens.unbind(1):
        _, state = fused.step(token, state)
        stepped.append(state[0][0])
    got = {"scan": fused.features_and_outputs(tokens)[2], "loop": scratch.features_and_outputs(tokens)[2],
           "generation": torch.stack(stepped, 1)}
    for name, h in got.items():
        assert torch.isfinite(h).all(), name
        torch.testing.assert_close(h.double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(got["loop"], got["scan"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["generation"], got["loop"], rtol=1e-5, atol=1e-5)
    for net, h in ((fused, got["scan"]), (scratch, got["loop"])):  # and training can go on from there
        gradients = torch.autograd.grad(h.sum(), list(net.backbone.parameters()))
        assert all(torch.isfinite(gradient).all() for gradient in gradients)


@pytest.mark.parametrize("impl", ["fused", "scratch"])
def test_a_minlstm_whose_gates_are_shut_generates(impl):
    """Both gates' biases at -200: σ rounds both to 0 in float32, and generation goes on."""
    torch.manual_seed(0)
    net = LanguageModel(NetworkConfig(12, "minlstm", 16, 32, 2, dropout=0.0, impl=impl))
    with torch.no_grad():
        for min_cell in net.backbone.cells:
            min_cell.b_f.fill_(-200.0)
            min_cell.b_i.fill_(-200.0)
    prompt = torch.arange(4).repeat(2, 1)  # (2, 4)
    # sampled, so that a NaN probability would raise
    tokens = generate_tokens(net, prompt, 6, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 6)
    logits, state = net.eval()(prompt)
    assert torch.isfinite(logits).all() and all(torch.isfinite(h).all() for h, in state)
    for token in tokens.unbind(1):
        logits, state = net.step(token, state)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("cell", MIN_CELLS)
def test_parameters_are_counted_and_budgets_equalised(cell):
    for impl in ("fused", "scratch"):  # one bias per gate in both implementations
        for layers, embedding_dim, bidirectional, projection in ((1, 16, False, None), (3, None, False, None),
                                                                 (2, 16, True, None), (2, 16, False, 16)):
            config = NetworkConfig(57, cell, embedding_dim, 24, layers, impl=impl, bidirectional=bidirectional,
                                   projection_size=projection, tie_weights=projection is not None)
            assert count_parameters(config, 57) == LanguageModel(config).num_parameters(), (config,)
    lstm = LanguageModel(NetworkConfig(30, "lstm", 16, 64, 1)).backbone
    same = LanguageModel(NetworkConfig(30, cell, 16, equal_budget(cell, 16, 64), 1)).backbone
    recurrent = [sum(p.numel() for p in stack.parameters()) for stack in (lstm, same)]
    assert abs(recurrent[1] / recurrent[0] - 1) < 0.03, recurrent


@pytest.mark.parametrize("cell", MIN_CELLS)
def test_a_language_model_trains_and_steps_through_generation(cell):
    torch.manual_seed(0)
    net = LanguageModel(NetworkConfig(12, cell, 16, 32, 2, dropout=0.0))
    tokens = torch.arange(12).repeat(4, 3)  # (4, 36): 0 1 ... 11 0 1 ...
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    losses = []
    for _ in range(60):
        logits, _ = net(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert generate_tokens(net, tokens[:1, :3], 9, greedy=True).tolist() == [list(range(3, 12))]


def test_gradient_flow_is_measured_for_min_cells():
    torch.manual_seed(0)
    net = LanguageModel(NetworkConfig(20, "mingru", 8, 16, 2, dropout=0.0))
    tokens = torch.randint(0, 20, (2, 10))
    norms, gates = gradient_flow(net, tokens, tokens)
    assert len(norms) == 10 and all(math.isfinite(n) and n > 0 for n in norms)
    assert set(gates) == {"update"} and gates["update"].shape == (10, 2, 2, 16)  # (T, layers, B, H)
    z = torch.sigmoid(F.linear(net.embed(tokens[:, :1])[:, 0], net.backbone.cells[0].W_xz, net.backbone.cells[0].b_z))
    torch.testing.assert_close(gates["update"][0, 0], z)  # the first layer's update gate at the first step


def _cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "src" / script), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.parametrize("cell,impl", [("mingru", "fused"), ("minlstm", "scratch")])
def test_train_eval_generate_and_score_through_the_real_config(tmp_path, tiny_corpus, shared_data, cache_dir, cell,
                                                                impl):
    run = tmp_path / "run"
    result = _cli("train.py", f"model={cell}", f"model.impl={impl}", *TINY, f"data.path={tiny_corpus}",
                  f"paths.data_dir={shared_data}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}",
                  "trainer.max_steps=3", "test=false", "~callbacks.progress_bar", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    loaded = load_checkpoint(ckpt)
    assert (loaded.net.config.cell, loaded.net.config.impl, loaded.info["global_step"]) == (cell, impl, 3)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        eval_cfg = compose("eval", overrides=[f"ckpt_path={ckpt}", "split=valid", f"paths.data_dir={shared_data}",
                                              f"paths.cache_dir={cache_dir}", "device=cpu"])
        generate_cfg = compose("generate", overrides=[f"ckpt_path={ckpt}", "prompt=the quick", "max_new_tokens=12",
                                                      "num_samples=2", "device=cpu"])
    assert 0 < evaluate(eval_cfg)["loss"] < 2 * math.log(len(loaded.vocab))
    texts = generate_texts(generate_cfg)
    assert len(texts) == 2 and all(t.startswith("the quick") and len(t) == 9 + 12 for t in texts)
    ranked = rank_candidates(loaded.net, loaded.vocab, "the quick brown ___ jumps", ["fox", "dog"])
    assert sorted(c for c, _, _ in ranked) == ["dog", "fox"]
