"""The adaptive softmax (``model.softmax=adaptive``): an exact loss, a full distribution to sample from, and
every command working on its checkpoints; the word vocabulary it relies on is ordered by frequency."""

import json
import math
from collections import Counter

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import PANGRAMS
from rnnlm.checkpoint import load_checkpoint
from rnnlm.checks import ConfigError, check_train_config
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.eval import evaluate
from rnnlm.commands.generate import generate_texts
from rnnlm.commands.train import train
from rnnlm.loss import IGNORE_INDEX
from rnnlm.network import LanguageModel, NetworkConfig, adaptive_cutoffs
from rnnlm.sampling import generate_tokens
from rnnlm.scoring import rank_candidates, sentence_logprobs
from rnnlm.vocab import EOS, UNK, build_vocab, split_line

# The tiny corpus has 36 distinct words: a head of the 8 most frequent, then two clusters.
ADAPTIVE = ("data=word", "model.softmax=adaptive", "model.adaptive_cutoffs=[8,20]")
LEARN = ("trainer.max_steps=30", "optimizer.lr=0.03", "model.dropout=0")


def _net(**settings) -> LanguageModel:
    torch.manual_seed(0)
    config = dict(vocab_size=60, cell="gru", embedding_dim=16, hidden_size=16, num_layers=1, softmax="adaptive",
                  adaptive_cutoffs=[10, 30], dropout=0.0)
    return LanguageModel(NetworkConfig(**{**config, **settings})).eval()


def test_the_adaptive_loss_is_the_exact_log_likelihood():
    net = _net()
    inputs, targets = torch.randint(0, 60, (3, 9)), torch.randint(0, 60, (3, 9))
    targets[:, 0] = torch.tensor([2, 15, 45])  # one target in the head and in each cluster at least
    targets[2, 5:] = IGNORE_INDEX  # padding is not scored
    features, _ = net.features(inputs)
    total, count = net.summed_loss(features, targets)
    log_probs = net.decoder.log_prob(features.reshape(-1, 16)).view(3, 9, 60)  # the head's full distribution
    scored = targets != IGNORE_INDEX
    direct = -log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0][scored].sum()
    assert count == 23
    torch.testing.assert_close(total, direct)
    torch.testing.assert_close(total / count, net.decoder(features[scored], targets[scored]).loss)  # torch's own
    torch.testing.assert_close(torch.logsumexp(net(inputs)[0], -1), torch.zeros(3, 9))  # normalised: sums to 1


def test_generation_from_the_adaptive_head_follows_its_full_distribution():
    net = _net()
    prompt = torch.tensor([[1, 5, 7], [2, 40, 3]])
    greedy = generate_tokens(net, prompt, 12, greedy=True)
    text = prompt
    for _ in range(12):  # the whole text re-run for every token: argmax of the full distribution
        text = torch.cat([text, net(text)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, text[:, 3:])
    sampled = generate_tokens(net, prompt.repeat(50, 1), 40, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (100, 40) and 0 <= int(sampled.min()) and int(sampled.max()) < 60
    assert len(sampled.unique()) > 30  # draws from the clusters, not only the head
    assert int((sampled >= 30).sum()) > 0


def test_an_adaptive_checkpoint_works_in_every_command(train_tiny, shared_data, cache_dir):
    run = train_tiny(*ADAPTIVE, *LEARN)
    logged = json.loads((run / "run_summary.json").read_text())["metrics"]
    assert logged["val/ppl"] < 5  # the pangrams are learned: far below the 36 words of a uniform guess
    loaded = load_checkpoint(run / "checkpoints" / "best.ckpt")
    assert loaded.net.adaptive and loaded.net.config.adaptive_cutoffs == (8, 20)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        base = [f"paths.data_dir={shared_data}", f"paths.cache_dir={cache_dir}", "device=cpu"]
        for split, ckpt, stage in (("test", "best", "test"), ("valid", "last", "val")):
            result = evaluate(compose("eval", overrides=[*base, f"ckpt_path={run / 'checkpoints' / f'{ckpt}.ckpt'}",
                                                         f"split={split}"]))
            assert result["tokens"] == logged[f"{stage}/tokens"]
            assert result["loss"] == pytest.approx(logged[f"{stage}/loss"], rel=1e-5)
        texts = generate_texts(compose("generate", overrides=[*base, f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
                                                              "prompt=the quick brown", "max_new_tokens=5",
                                                              "greedy=true"]))
    [text] = texts
    assert text.startswith("the quick brown ") and len(text.split()) == 3 + 5 - text.count("\n")  # <eos>: a line end
    assert set(text.split()) <= set(" ".join(PANGRAMS).split())
    ranked = rank_candidates(loaded.net, loaded.vocab, "the quick brown ___ jumps over the lazy dog", ["fox", "dog"])
    assert ranked[0][0] == "fox"
    [(logprob, tokens)] = sentence_logprobs(loaded.net, loaded.vocab, [PANGRAMS[1]])
    ids = torch.tensor([[*loaded.vocab.encode_text(PANGRAMS[1]), loaded.vocab.line_end_id]])
    total, count = loaded.net.summed_loss(loaded.net.features(ids[:, :-1])[0], ids[:, 1:])  # the training loss
    assert tokens == count == len(PANGRAMS[1].split()) + 1
    assert logprob == pytest.approx(-float(total), rel=1e-5)
    samples = (run / "samples.txt").read_text()  # TensorBoard's samples, written during training
    assert samples.strip()


def test_an_adaptive_run_resumes_and_trains_on_sentences(make_cfg, tiny_corpus, tmp_path):
    first = tmp_path / "a"
    train(make_cfg(f"data.path={tiny_corpus}", *ADAPTIVE, "test=false", "trainer.max_steps=3", run_dir=first))
    resumed = train(make_cfg(f"data.path={tiny_corpus}", *ADAPTIVE, "test=false", "trainer.max_steps=6",
                             f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", run_dir=tmp_path / "b"))
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert math.isfinite(resumed["val/loss"])
    sentences = train(make_cfg(f"data.path={tiny_corpus}", *ADAPTIVE, "data.mode=sentence", "trainer.max_steps=3",
                               run_dir=tmp_path / "c"))
    assert math.isfinite(sentences["test/loss"]) and sentences["test/tokens"] > 0


def test_the_word_vocabulary_is_ordered_by_frequency():
    lines = ["a b c a", "b a d", "a e e e e"]
    counts = Counter(t for line in lines for t in split_line(line, "word"))
    vocab = build_vocab(counts, "word", specials=[UNK, EOS])
    words = vocab.tokens[2:]
    assert vocab.tokens[:2] == [UNK, EOS]
    assert words == ["a", "e", "b", "c", "d"]  # most frequent first, ties by the word
    assert [counts[w] for w in words] == sorted((counts[w] for w in words), reverse=True)
    assert build_vocab(counts, "word", [UNK, EOS], max_size=4).tokens == [UNK, EOS, "a", "e"]  # the most frequent kept
    assert build_vocab(counts, "word", [UNK, EOS], min_freq=2).tokens == [UNK, EOS, "a", "e", "b"]


def test_default_cutoffs_follow_the_vocabulary_size():
    assert adaptive_cutoffs(10_000) == (2_000,)
    assert adaptive_cutoffs(33_278) == (2_000, 10_000)
    assert adaptive_cutoffs(267_735) == (2_000, 10_000, 50_000, 200_000)
    assert adaptive_cutoffs(33_278, (500, 4_000)) == (500, 4_000)


@pytest.mark.parametrize(("settings", "message"), [
    ({"vocab_size": 1_500}, "too small for the default clusters .* model.adaptive_cutoffs=\\[...\\]"),
    ({"adaptive_cutoffs": [30, 10]}, "must be a list of increasing integers >= 1"),
    ({"adaptive_cutoffs": [10, 60]}, "must all be below the vocabulary size"),
    ({"tie_weights": True, "embedding_dim": 16}, "set model.tie_weights=false"),
    ({"adaptive_div_value": 0.5}, "adaptive_div_value=0.5 must be a number >= 1"),
])
def test_bad_adaptive_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        _net(**{"adaptive_cutoffs": None if "vocab_size" in settings else [10, 30], **settings})


def test_an_adaptive_char_model_is_refused_before_training(make_cfg):
    with pytest.raises(ConfigError, match="use data=word or data.level=bpe, or model.softmax=full"):
        check_train_config(make_cfg("data=char", "model.softmax=adaptive"))


def test_an_adaptive_model_is_never_recorded_as_a_cuda_graph(make_cfg):
    with pytest.raises(ConfigError, match="model.cuda_graph=true needs model.softmax=full"):
        check_train_config(make_cfg("data=word", "model.softmax=adaptive", "model.cuda_graph=true"))
