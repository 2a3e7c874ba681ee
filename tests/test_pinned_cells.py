"""Pinned numbers of every built-in cell and form: a tiny seeded run in plain PyTorch, through the public API only,
whose first ten training losses, eval loss and greedy continuation were recorded from the code before the cells'
refactor. A change that moves any of them changes what the models compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.sampling import generate_tokens

B, T, STEPS = 4, 8, 10  # rows, chunk length, training steps
EVAL_CHUNKS = 3
KEEP = 0.9  # how often a token follows the one before by the rule
SIZES = {"embedding_dim": 16, "hidden_size": 24, "num_layers": 2, "dropout": 0.2}

CASES = {
    "rnn-tanh-fused": {"cell": "rnn", "impl": "fused"},
    "rnn-tanh-scratch": {"cell": "rnn", "impl": "scratch"},
    "rnn-relu-fused": {"cell": "rnn", "impl": "fused", "nonlinearity": "relu"},
    "rnn-relu-scratch": {"cell": "rnn", "impl": "scratch", "nonlinearity": "relu"},
    "lstm-fused": {"cell": "lstm", "impl": "fused"},
    "lstm-scratch": {"cell": "lstm", "impl": "scratch"},
    "gru-fused": {"cell": "gru", "impl": "fused", "reset_after": True},
    "gru-scratch": {"cell": "gru", "impl": "scratch", "reset_after": True},
    "gru-reset-before-scratch": {"cell": "gru", "impl": "scratch", "reset_after": False},
    "mingru-fused": {"cell": "mingru", "impl": "fused"},
    "mingru-scratch": {"cell": "mingru", "impl": "scratch"},
    "minlstm-fused": {"cell": "minlstm", "impl": "fused"},
    "minlstm-scratch": {"cell": "minlstm", "impl": "scratch"},
    "lstm-bidirectional-fused": {"cell": "lstm", "impl": "fused", "bidirectional": True},
    "lstm-bidirectional-scratch": {"cell": "lstm", "impl": "scratch", "bidirectional": True},
    "lstm-adaptive-fused": {"cell": "lstm", "impl": "fused", "softmax": "adaptive", "adaptive_cutoffs": [10, 30]},
    "lstm-awd-fused": {"cell": "lstm", "impl": "fused", "weight_drop": 0.3, "locked_dropout": True,
                       "embedding_dropout": 0.1},
    "lstm-awd-scratch": {"cell": "lstm", "impl": "scratch", "weight_drop": 0.3, "locked_dropout": True,
                         "embedding_dropout": 0.1},
}


def vocab_size(options: dict) -> int:
    return 60 if options.get("softmax") == "adaptive" else 30  # word-like for the adaptive softmax


def token_stream(vocab: int, length: int, seed: int) -> torch.Tensor:
    """A learnable seeded stream: each token follows the one before by a fixed rule half the time, else is random."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, vocab, (length,), generator=generator)
    keep = torch.rand(length, generator=generator) < KEEP
    tokens = [int(noise[0])]
    for t in range(1, length):
        tokens.append((tokens[-1] + 7) % vocab if keep[t] else int(noise[t]))
    return torch.tensor(tokens)


def batchify(stream: torch.Tensor, rows: int) -> torch.Tensor:
    """(N,) -> (rows, N // rows): each row a contiguous stretch of the stream."""
    return stream[: stream.numel() // rows * rows].view(rows, -1)


def detach(state):
    """The state's values without their graph: a tensor, or (nested) tuples and lists of them."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return type(state)(detach(s) for s in state)


def chunk_loss(net: LanguageModel, rows: torch.Tensor, start: int, state, bidirectional: bool, adaptive: bool):
    """The mean loss of the chunk at ``start`` and the state after it."""
    if bidirectional:  # each token predicted from both sides, itself unseen; nothing carried
        tokens = rows[:, start:start + T]
        logits, _ = net(tokens)
        targets = tokens
        state = None
    else:
        logits, state = net(rows[:, start:start + T], state)
        targets = rows[:, start + 1:start + T + 1]
    flat, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    loss = F.nll_loss(flat, targets) if adaptive else F.cross_entropy(flat, targets)
    return loss, state


def run(case: str) -> tuple[list[float], float, LanguageModel, torch.Tensor]:
    """Ten SGD steps and an eval of ``case`` -> (training losses, eval loss, the trained network, eval rows)."""
    options = dict(CASES[case])
    vocab = vocab_size(options)
    bidirectional, adaptive = options.get("bidirectional", False), options.get("softmax") == "adaptive"
    train_rows = batchify(token_stream(vocab, B * (STEPS * T + 1), seed=1), B)
    eval_rows = batchify(token_stream(vocab, B * (EVAL_CHUNKS * T + 1), seed=2), B)
    torch.manual_seed(0)
    net = LanguageModel(NetworkConfig.from_settings({**SIZES, **options}, vocab_size=vocab))
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    net.train()
    losses, state = [], None
    for step in range(STEPS):
        loss, state = chunk_loss(net, train_rows, step * T, state, bidirectional, adaptive)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.25)
        optimizer.step()
        state = detach(state)
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        total, state = 0.0, None
        for chunk in range(EVAL_CHUNKS):
            loss, state = chunk_loss(net, eval_rows, chunk * T, state, bidirectional, adaptive)
            total += loss.item()
    return losses, total / EVAL_CHUNKS, net, eval_rows


# Recorded from the code before the refactor of the cells: (first ten training losses, eval loss).
PINNED: dict[str, tuple[list[float], float]] = {
    "rnn-tanh-fused": (
        [3.4001548290252686, 3.4321861267089844, 3.4128036499023438, 3.418368101119995, 3.4322683811187744,
         3.4155642986297607, 3.404749870300293, 3.358541488647461, 3.389374256134033, 3.4853203296661377],
        3.4027759234110513,
    ),
    "rnn-tanh-scratch": (
        [3.4126899242401123, 3.4245622158050537, 3.4038641452789307, 3.406996488571167, 3.415374517440796,
         3.4011390209198, 3.392805814743042, 3.3685858249664307, 3.4075822830200195, 3.483334541320801],
        3.3979457219441733,
    ),
    "rnn-relu-fused": (
        [3.4041178226470947, 3.439807653427124, 3.401045799255371, 3.405003070831299, 3.4268839359283447,
         3.4101006984710693, 3.40018367767334, 3.3706648349761963, 3.402111291885376, 3.48210072517395],
        3.4057761828104653,
    ),
    "rnn-relu-scratch": (
        [3.402792453765869, 3.4226067066192627, 3.4017891883850098, 3.405099391937256, 3.4148366451263428,
         3.4153053760528564, 3.3963308334350586, 3.3815977573394775, 3.41001033782959, 3.461946487426758],
        3.402724822362264,
    ),
    "lstm-fused": (
        [3.4068987369537354, 3.4263460636138916, 3.4049267768859863, 3.4023613929748535, 3.4192416667938232,
         3.4160664081573486, 3.395350217819214, 3.383119583129883, 3.4006879329681396, 3.475914239883423],
        3.4062982400258384,
    ),
    "lstm-scratch": (
        [3.399291515350342, 3.4187090396881104, 3.399876356124878, 3.405935525894165, 3.424828052520752,
         3.416435956954956, 3.398864269256592, 3.387378454208374, 3.416971206665039, 3.4647955894470215],
        3.403159777323405,
    ),
    "gru-fused": (
        [3.4081761837005615, 3.423952579498291, 3.3938143253326416, 3.430593967437744, 3.42099928855896,
         3.4116628170013428, 3.408045530319214, 3.3849563598632812, 3.418649911880493, 3.4678080081939697],
        3.4042511781056723,
    ),
    "gru-scratch": (
        [3.391083240509033, 3.44065523147583, 3.4133384227752686, 3.4159040451049805, 3.4217464923858643,
         3.4177615642547607, 3.401235818862915, 3.37982177734375, 3.425626754760742, 3.488250732421875],
        3.400822401046753,
    ),
    "gru-reset-before-scratch": (
        [3.4019126892089844, 3.4261739253997803, 3.4014437198638916, 3.409635305404663, 3.4244883060455322,
         3.4124109745025635, 3.4007601737976074, 3.369128465652466, 3.404327154159546, 3.497067451477051],
        3.4027339617411294,
    ),
    "mingru-fused": (
        [3.4124624729156494, 3.4936764240264893, 3.4185190200805664, 3.4496967792510986, 3.4418461322784424,
         3.438005208969116, 3.452605962753296, 3.3558058738708496, 3.433134078979492, 3.5898945331573486],
        3.414612611134847,
    ),
    "mingru-scratch": (
        [3.4124624729156494, 3.4936766624450684, 3.4185190200805664, 3.4496967792510986, 3.4418461322784424,
         3.4380054473876953, 3.452605962753296, 3.3558053970336914, 3.433134078979492, 3.5898945331573486],
        3.4146124521891275,
    ),
    "minlstm-fused": (
        [3.444690465927124, 3.4801909923553467, 3.4207968711853027, 3.4030752182006836, 3.4734418392181396,
         3.4162986278533936, 3.464423179626465, 3.3479273319244385, 3.4054760932922363, 3.6170430183410645],
        3.42347518603007,
    ),
    "minlstm-scratch": (
        [3.444690465927124, 3.4801909923553467, 3.4207968711853027, 3.4030749797821045, 3.4734418392181396,
         3.4162986278533936, 3.464423179626465, 3.3479273319244385, 3.4054765701293945, 3.6170430183410645],
        3.42347518603007,
    ),
    "lstm-bidirectional-fused": (
        [3.40555477142334, 3.421766996383667, 3.3995962142944336, 3.406978130340576, 3.422970771789551,
         3.419408082962036, 3.4011025428771973, 3.399258613586426, 3.409083604812622, 3.4437944889068604],
        3.406890392303467,
    ),
    "lstm-bidirectional-scratch": (
        [3.4029202461242676, 3.4180002212524414, 3.3927512168884277, 3.405953884124756, 3.4239776134490967,
         3.41399884223938, 3.403679609298706, 3.394301414489746, 3.4023220539093018, 3.4434006214141846],
        3.4082980155944824,
    ),
    "lstm-adaptive-fused": (
        [5.053697109222412, 5.280910968780518, 5.1196393966674805, 5.000095367431641, 4.9512038230896,
         4.970039367675781, 4.8750104904174805, 4.547111988067627, 4.5175089836120605, 4.315176486968994],
        4.229774157206218,
    ),
    "lstm-awd-fused": (
        [3.4073703289031982, 3.428708076477051, 3.4081039428710938, 3.4037575721740723, 3.4198334217071533,
         3.421088218688965, 3.3966152667999268, 3.3761346340179443, 3.4071953296661377, 3.475339651107788],
        3.4050328731536865,
    ),
    "lstm-awd-scratch": (
        [3.3968663215637207, 3.419335126876831, 3.4006643295288086, 3.4093096256256104, 3.4221389293670654,
         3.415926456451416, 3.4000492095947266, 3.3792498111724854, 3.412731647491455, 3.4640140533447266],
        3.403855562210083,
    ),
}

# Greedy continuations of the first eval row's first six tokens. Ten clipped SGD steps teach these models little more
# than which tokens are frequent, so each repeats one id: a check of the generation path, weaker than the losses.
PINNED_GREEDY: dict[str, list[int]] = {
    "lstm-fused": [10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10],
    "gru-reset-before-scratch": [15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15],
    "mingru-fused": [15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15],
}


@pytest.mark.parametrize("case", list(CASES))
def test_losses_are_pinned(case):
    losses, eval_loss, _, _ = run(case)
    expected_losses, expected_eval = PINNED[case]
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(expected_losses, dtype=torch.float64), rtol=1e-5, atol=1e-6,
                               msg=lambda report: f"{case} training losses {losses}: {report}")
    assert eval_loss == pytest.approx(expected_eval, rel=1e-5, abs=1e-6), f"{case} eval loss {eval_loss}"


@pytest.mark.parametrize("case", list(PINNED_GREEDY))
def test_greedy_generation_is_pinned(case):
    _, _, net, eval_rows = run(case)
    new = generate_tokens(net, eval_rows[:1, :6], 20, greedy=True)
    assert new.tolist()[0] == PINNED_GREEDY[case]
