"""Byte-level BPE (``data.level=bpe``) from training to every inference command, and bits per character, the one
number every level reports (``val/bpc``, ``test/bpc``, eval, score)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import PANGRAMS, REPO, compose_train, scalars
from rnnlm import bpe
from rnnlm.batches import EvaluationStream
from rnnlm.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from rnnlm.checks import check_train_config
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.eval import evaluate
from rnnlm.commands.generate import generate_texts
from rnnlm.commands.train import train
from rnnlm.corpora import path_source
from rnnlm.errors import ConfigError
from rnnlm.loss import CharacterCount
from rnnlm.prepare import prepare
from rnnlm.vocab import UNK, Vocab, byte_alphabet

KOREAN = ["운동을 열심히 하는 것은 근육을 늘리는데 효과적이다", "오늘 영화 정말 재미있었어요 ㅎㅎ"]
TRAIN_LINES = [*PANGRAMS, *KOREAN] * 30


def write_split_corpus(folder: Path) -> Path:
    """train.txt, valid.txt and test.txt: pangrams and Korean, the held-out splits with words train lacks."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("\n".join(TRAIN_LINES) + "\n", encoding="utf-8")
    (folder / "valid.txt").write_text("the lazy zebras box quickly in winter\n\n" + KOREAN[1] + "\n", encoding="utf-8")
    (folder / "test.txt").write_text("five quick wizards jump over the dog\n" + KOREAN[0] + "\nvexingly daft jugs\n",
                                     encoding="utf-8")
    return folder


def _inference_config(command: str, *overrides: str, data_dir: Path, cache_dir: Path):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(command, overrides=[f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}", "device=cpu",
                                           *overrides])


@pytest.fixture(scope="module")
def bpe_runs(tmp_path_factory, shared_data, cache_dir) -> dict[str, Path]:
    """A stream-mode bpe model that has learned the training text by heart (validated once, at the end), and a
    sentence-mode one with the adaptive softmax trained 40 steps; both tested."""
    root = tmp_path_factory.mktemp("bpe")
    corpus = write_split_corpus(root / "corpus")
    common = ["data=bpe", f"data.path={corpus}", "data.bpe_vocab_size=300", "trainer.max_steps=6", "test=true"]
    runs = {"corpus": corpus}
    for name, extra in (("stream", ["trainer.max_steps=160", "trainer.max_epochs=100", "model.dropout=0",
                                    "optimizer.lr=0.01", "model.hidden_size=96", "model.embedding_dim=32",
                                    "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=160"]),
                        ("sentence", ["data.mode=sentence", "data.seq_len=64", "model.softmax=adaptive",
                                      "model.adaptive_cutoffs=[100]", "trainer.max_steps=40", "optimizer.lr=0.01"])):
        runs[name] = root / name
        runs[f"{name}_metrics"] = train(compose_train([*common, *extra], runs[name], shared_data, cache_dir))
    return runs


def test_the_checkpoint_carries_the_tokenizer_as_plain_data(bpe_runs):
    data = torch.load(bpe_runs["stream"] / "checkpoints" / "last.ckpt", weights_only=True)
    section = data["rnnlm"]
    assert section["format"] == CHECKPOINT_FORMAT == 3 and section["vocab"]["level"] == "bpe"
    vocab = Vocab.from_dict(section["vocab"])  # the JSON text alone rebuilds the tokenizer
    assert UNK not in vocab and 256 <= len(vocab) <= 300
    assert vocab.decode(vocab.encode_line(KOREAN[0])) == KOREAN[0] + "\n"


def _generate(ckpt: Path, *overrides: str, data_dir: Path, cache_dir: Path) -> list[str]:
    return generate_texts(_inference_config("generate", f"ckpt_path={ckpt}", *overrides, data_dir=data_dir,
                                            cache_dir=cache_dir))


def test_generated_text_is_the_learned_text(bpe_runs, shared_data, cache_dir):
    ckpt = bpe_runs["stream"] / "checkpoints" / "last.ckpt"
    for prompt, line in (("the quick", PANGRAMS[0]), ("운동을", KOREAN[0])):
        [text] = _generate(ckpt, f"prompt='{prompt}'", "greedy=true", "stop_at_eos=true", "max_new_tokens=60",
                           data_dir=shared_data, cache_dir=cache_dir)
        assert text == line  # spaces and Hangul decoded from the bytes, the line end not printed
    texts = _generate(ckpt, "prompt=the", "max_new_tokens=100", "num_samples=4", "temperature=2.0",
                      data_dir=shared_data, cache_dir=cache_dir)
    assert len(texts) == 4 and all(t.startswith("the") and len(t) > len("the") for t in texts)
    assert not any(UNK in t or "<bos>" in t for t in texts)


def test_eval_and_score_give_the_bpc_training_tested_with(bpe_runs, shared_data, cache_dir):
    for name in ("stream", "sentence"):
        logged = bpe_runs[f"{name}_metrics"]
        ckpt = bpe_runs[name] / "checkpoints" / "best.ckpt"
        result = evaluate(_inference_config("eval", f"ckpt_path={ckpt}", data_dir=shared_data, cache_dir=cache_dir))
        assert result["bpc"] == pytest.approx(logged["test/bpc"], rel=1e-6)
        assert result["ppl"] == pytest.approx(logged["test/ppl"], rel=1e-5)
        assert result["bpc"] == pytest.approx(result["loss"] * result["tokens"] / result["characters"] / math.log(2))
    # A sentence-mode model scores each line from <bos> to its line end, as score.py does: the test split's lines
    # together give its test/bpc.
    ckpt = bpe_runs["sentence"] / "checkpoints" / "best.ckpt"
    score = subprocess.run([sys.executable, str(REPO / "src" / "score.py"), f"ckpt_path={ckpt}",
                            f"text_file={bpe_runs['corpus'] / 'test.txt'}", "device=cpu"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert score.returncode == 0, score.stderr
    lines = score.stdout.splitlines()
    assert lines[0] == "logprob\tppl\tbpc\ttokens\ttext" and len(lines) == 5
    total = lines[-1].split("\t")
    test_text = (bpe_runs["corpus"] / "test.txt").read_text(encoding="utf-8")
    assert total[-1] == f"(all 3 lines, {len(test_text)} characters)"
    assert float(total[2]) == pytest.approx(bpe_runs["sentence_metrics"]["test/bpc"], abs=1e-4)


def test_sentence_mode_and_the_adaptive_softmax_learn_bpe_text(bpe_runs):
    loaded = load_checkpoint(bpe_runs["sentence"] / "checkpoints" / "last.ckpt")
    assert loaded.net.config.softmax == "adaptive" and loaded.vocab.bos_id is not None
    losses = scalars(bpe_runs["sentence"])["train/loss"]
    assert losses[-1] < 0.85 * math.log(len(loaded.vocab))  # below a uniform guess among the tokens, in 40 steps


def test_the_tokenizer_is_trained_once_and_cached(tmp_path, monkeypatch):
    corpus = write_split_corpus(tmp_path / "corpus")
    calls = []
    trained = bpe.train_tokenizer

    def counting(*args, **kwargs):
        calls.append(args[1])
        return trained(*args, **kwargs)

    monkeypatch.setattr(bpe, "train_tokenizer", counting)
    first = prepare(path_source(corpus), "bpe", tmp_path / "cache", bpe_vocab_size=280)
    second = prepare(path_source(corpus), "bpe", tmp_path / "cache", bpe_vocab_size=280)
    assert calls == [280]  # the second run read the cache
    assert second.vocab == first.vocab and np.array_equal(second.splits["train"], first.splits["train"])
    prepare(path_source(corpus), "bpe", tmp_path / "cache", bpe_vocab_size=290)  # another size: its own cache
    assert calls == [280, 290]


def test_korean_text_round_trips_and_counts_its_characters(shared_data):
    lines = (shared_data / "korean" / "nsmc_test_documents.txt").read_text(encoding="utf-8").splitlines()
    vocab = bpe.train_tokenizer(lines[:3000], 1000, [])
    assert UNK not in vocab
    lengths, _ = vocab.characters()
    for line in lines[3000:3500]:  # text the tokenizer never saw
        ids = vocab.encode_line(line)
        assert vocab.decode(ids) == line + "\n"
        assert sum(lengths[i] for i in ids) == len(line) + 1  # a character split between tokens counts once
    # Generation may stop inside a character (3 bytes each here, one byte token each): the incomplete last
    # character is left out, never garbled; bytes that are not UTF-8 read as U+FFFD.
    byte_ids = [vocab.index[byte_alphabet()[b]] for b in "영화".encode()]
    assert [vocab.decode(byte_ids[:cut]) for cut in range(7)] == ["", "", "", "영", "영", "영", "영화"]
    assert vocab.decode([byte_ids[1], vocab.index["a"]]) == "\ufffda"


def test_bpc_of_words_counts_the_original_characters_of_unknown_words():
    # "dog" and "zebra" are outside the vocabulary: each counts its own letters, not the 5 of "<unk>"
    vocab = Vocab("word", [UNK, "<eos>", "the", "cat", "sat", "a"])
    text = "the cat sat\n\na dog\nthe zebra\n"
    ids = np.array([i for line in text.splitlines() for i in vocab.encode_line(line)])
    (inputs, targets), = EvaluationStream(ids, batch_size=1, seq_len=100)  # every token but the first scored
    unknown = (3 + 5) / 2  # the mean length of the split's unknown words, as the token cache records it
    scored_text = text[len("the"):]  # " cat sat\n\na dog\nthe zebra\n"
    assert float(CharacterCount(vocab, unknown)(inputs, targets)) == len(scored_text) == 26
    assert float(CharacterCount(vocab)(inputs, targets)) == 26 - 3 - 5 + 2 * len(UNK)  # "<unk>" as written


def test_bpc_of_chars_is_the_mean_loss_in_bits_as_before():
    vocab = Vocab("char", ["\n", " ", "a", "b", "<bos>"])
    inputs, targets = torch.tensor([[4, 2, 1, 3]]), torch.tensor([[2, 1, 3, -100]])  # padding is not counted
    assert float(CharacterCount(vocab)(inputs, targets)) == 3


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory, shared_data, cache_dir) -> dict[str, Path]:
    """A word model whose vocabulary lacks some words of valid.txt, and a char model, on the same corpus."""
    root = tmp_path_factory.mktemp("levels")
    corpus = write_split_corpus(root / "corpus")
    runs = {"corpus": corpus}
    for level, extra in (("word", []), ("char", [])):  # "in" and "winter" of valid.txt are new words: <unk>
        runs[level] = root / level
        train(compose_train([f"data={level}", f"data.path={corpus}", "trainer.max_steps=3", "test=false", *extra],
                            runs[level], shared_data, cache_dir))
    return runs


@pytest.mark.parametrize("level", ["word", "char"])
def test_eval_bpc_divides_by_the_characters_of_the_text(small_runs, level, shared_data, cache_dir):
    ckpt = small_runs[level] / "checkpoints" / "last.ckpt"
    result = evaluate(_inference_config("eval", f"ckpt_path={ckpt}", "split=valid", data_dir=shared_data,
                                        cache_dir=cache_dir))
    text = (small_runs["corpus"] / "valid.txt").read_text(encoding="utf-8")
    if level == "word":  # words joined by one space, a newline per line, the first word unscored
        chars = sum(len(" ".join(line.split())) + 1 for line in text.splitlines()) - len("the")
    else:  # every character but the first
        chars = len(text) - 1
        assert result["tokens"] == chars
        assert result["bpc"] == pytest.approx(result["loss"] / math.log(2), rel=1e-6)  # today's bpc
    assert result["characters"] == chars
    assert result["bpc"] == pytest.approx(result["loss"] * result["tokens"] / chars / math.log(2), rel=1e-6)
    logged = scalars(small_runs[level])["val/bpc"]
    assert result["bpc"] == pytest.approx(logged[-1], rel=1e-6)  # the run's own last validation


@pytest.mark.parametrize("overrides,message", [
    (["data.bpe_vocab_size=0"], r"data.bpe_vocab_size=0 must be an integer in \[256, 1048576\]"),
    (["data.bpe_vocab_size=1"], r"data.bpe_vocab_size=1 must be an integer in \[256, 1048576\]"),
    (["data.bpe_vocab_size=1000000000"], "data.bpe_vocab_size=1000000000 must be an integer in"),
    (["data.max_size=100"], "data.max_size=100 limits word and char vocabularies; .*drop data.max_size"),
    (["data.min_freq=2"], "data.min_freq=2 limits word and char vocabularies"),
])
def test_bad_bpe_settings_are_refused_in_one_line(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        check_train_config(make_cfg("data=bpe", *overrides))
    assert "\n" not in str(caught.value)


def test_without_tokenizers_bpe_is_refused_with_the_install_line(make_cfg, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tokenizers" else real(name, *a))
    with pytest.raises(ConfigError, match=r"data.level=bpe needs the tokenizers package: pip install 'rnnlm\[bpe\]'"):
        check_train_config(make_cfg("data=bpe"))
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` fails
    with pytest.raises(ConfigError, match=r"pip install 'rnnlm\[bpe\]'"):
        bpe.train_tokenizer(["a b"], 300, [])


def test_rnnlm_imports_without_tokenizers():
    code = ("import sys; sys.modules['tokenizers'] = None\n"
            "import rnnlm.vocab, rnnlm.prepare, rnnlm.checkpoint, rnnlm.checks, rnnlm.commands.generate, "
            "rnnlm.commands.eval, rnnlm.commands.score, rnnlm.bpe\n"
            "from rnnlm.vocab import Vocab\n"
            "v = Vocab('bpe', ['a', 'b', '\\u010a'], tokenizer='{}')\n"
            "assert v.decode([0, 1, 2]) == 'ab\\n'\n")  # decoding reads the tokens' bytes alone
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
