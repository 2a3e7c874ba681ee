"""Ranking candidates for a blank: only words the model knows are ranked, one blank at a time, ckpt_path=last."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import PANGRAMS, REPO, compose_train
from rnnlm.checks import ConfigError
from rnnlm.commands.train import train
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.scoring import fill_blank, rank_candidates, rank_fillers, unknown_candidates
from rnnlm.vocab import EOS, UNK, Vocab

KOREAN = "운동을 열심히 하면 근육이 는다"


def _unk_loving_net(vocab: Vocab) -> LanguageModel:
    """A model that always finds <unk> the likeliest next token, as a word model of real text often does."""
    net = LanguageModel(NetworkConfig(len(vocab), "gru", 4, 4, 1, 0.0)).eval()
    logits = torch.zeros(len(vocab))
    if vocab.unk_id is not None:
        logits[vocab.unk_id] = 5.0
    with torch.no_grad():
        net.decoder.weight.zero_()
        net.decoder.bias.copy_(logits)
    return net


def test_candidates_outside_the_vocabulary_are_not_ranked():
    vocab = Vocab("word", [UNK, EOS, "the", "company", "said", "it", "expects", "new", "york"])
    net = _unk_loving_net(vocab)
    ranked = rank_candidates(net, vocab, "the ___ said it expects", ["zzqx", "blorf", "company", "new york"])
    assert sorted(c for c, _, _ in ranked) == ["company", "new york"]  # zzqx would have come first as <unk>
    assert unknown_candidates(vocab, ["zzqx", "blorf", "company", "new yorkk"]) == ["zzqx", "blorf", "new yorkk"]
    with pytest.raises(ConfigError, match="none of the candidates is in the model's vocabulary"):
        rank_candidates(net, vocab, "the ___ said", ["zzqx", "blorf"])


def test_char_candidates_with_characters_the_vocabulary_lacks_are_not_ranked():
    for tokens in ([UNK, "\n", " ", "a", "b", "c"], ["\n", " ", "a", "b", "c"]):  # with and without <unk>
        vocab = Vocab("char", tokens)
        ranked = rank_candidates(_unk_loving_net(vocab), vocab, "a ___ c", ["zz", "ab", "bz"])
        assert [c for c, _, _ in ranked] == ["ab"]
        assert unknown_candidates(vocab, ["zz", "ab", "bz"]) == ["zz", "bz"]


def test_several_blanks_are_refused():
    vocab = Vocab("word", [UNK, EOS, "a", "b"])
    with pytest.raises(ConfigError, match="text has 2 blanks '___': one is filled at a time"):
        rank_candidates(_unk_loving_net(vocab), vocab, "a ___ b ___", ["a", "b"])


def test_bidirectional_fillers_rank_known_tokens_only():
    vocab = Vocab("word", [UNK, EOS, "cat", "dog"])
    log_probs = torch.tensor([0.0, -5.0, -2.0, -1.0])
    assert rank_fillers(log_probs, vocab, ["cat", "zzqx", "dog"]) == [("dog", -1.0), ("cat", -2.0)]
    with pytest.raises(ConfigError, match="none of the candidates"):
        rank_fillers(log_probs, vocab, ["zzqx", "big cat"])
    net = LanguageModel(NetworkConfig(len(vocab), "gru", 4, 4, 1, 0.0, bidirectional=True)).eval()
    with pytest.raises(ConfigError, match="2 blanks"):
        fill_blank(net, vocab, "cat ___ dog ___")


@pytest.fixture(scope="module")
def word_run(tmp_path_factory, shared_data, cache_dir) -> Path:
    """A word model trained a few steps, as the newest run under <root>/outputs (for ckpt_path=last)."""
    root = tmp_path_factory.mktemp("score")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join([*PANGRAMS, KOREAN] * 40) + "\n", encoding="utf-8")
    run = root / "outputs" / "train" / "runs" / "only"
    train(compose_train(["data=word", f"data.path={corpus}", "trainer.max_steps=3", "test=false"], run, shared_data,
                        cache_dir))
    return root


def _score(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "src" / "score.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_score_cli_lists_unknown_candidates_after_the_table(word_run):
    result = _score(word_run, "ckpt_path=last", f"text={KOREAN.replace('열심히', '___')}",
                    "candidates=[지방,열심히,zzqx]")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "rank\tlogprob\tppl\tcandidate"
    assert [row.split("\t")[-1] for row in lines[1:-1]] == ["열심히"]
    assert lines[-1] == "not in the model's vocabulary, not ranked: 지방, zzqx"


def test_score_cli_refuses_when_no_candidate_is_known(word_run):
    ckpt = word_run / "outputs" / "train" / "runs" / "only" / "checkpoints" / "last.ckpt"
    for args, message in [(["text=the ___ fox", "candidates=[zzqx,blorf]"], "none of the candidates is in the"),
                          (["text=the ___ brown ___", "candidates=[quick]"], "text has 2 blanks")]:
        result = _score(word_run, f"ckpt_path={ckpt}", *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
        assert result.stderr.startswith("error: ") and message in result.stderr


@pytest.mark.parametrize("command", ["score", "generate", "eval", "inspect"])
def test_the_inference_commands_do_not_import_lightning(command):
    """Lightning takes seconds to import, and scoring, generating from, evaluating or inspecting a checkpoint does
    not need it."""
    code = f"import sys, rnnlm.commands.{command}; print(sorted(m for m in sys.modules if m.startswith('lightning')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


HEAVY = re.compile(r"^import time:.*\| +((?:lightning|pytorch_lightning|torchmetrics|tensorboard)(?:\.\S*)?)$", re.M)


@pytest.mark.parametrize("command,args", [
    ("generate", ["prompt=the", "max_new_tokens=5"]),
    ("score", ["text=the quick ___ fox", "candidates=[brown,lazy]"]),
    ("eval", ["split=valid"]),
])
def test_the_inference_commands_run_without_lightning(command, args, word_run, cache_dir, tmp_path):
    """The whole command, start to exit, as a user runs it (eval of a stream checkpoint on one device included):
    nothing it imports, when or wherever, is Lightning's (``-X importtime`` lists every module a process imports)."""
    if command == "eval":
        args = [*args, f"paths.cache_dir={cache_dir}", f"output={tmp_path / 'metrics.json'}"]
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "src" / f"{command}.py"), "ckpt_path=last",
                             *args], capture_output=True, text=True, cwd=word_run, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() and "import time:" in result.stderr
    assert HEAVY.findall(result.stderr) == []
    if command == "eval":  # the process ends without Python's teardown: its log is complete all the same
        log = max((word_run / "outputs" / "eval").glob("runs/*/eval.log"), key=lambda p: p.stat().st_mtime)
        assert f"Metrics written to {tmp_path / 'metrics.json'}" in log.read_text()
