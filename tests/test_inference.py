"""Using a checkpoint without the training setup: generate, evaluate, score; safe loading; bad input."""

import csv
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import REPO, Payload, compose_train, write_tiny_corpus
from rnnlm.checkpoint import CheckpointError, load_checkpoint
from rnnlm.checks import ConfigError, check_generate_config
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.eval import evaluate
from rnnlm.commands.generate import generate_texts
from rnnlm.commands.train import train
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.sampling import generate_tokens
from rnnlm.scoring import rank_candidates, sentence_logprobs
from rnnlm.vocab import UNK, Vocab, VocabularyError


@pytest.fixture(scope="module")
def overfit_runs(tmp_path_factory, shared_data, cache_dir) -> dict[str, Path]:
    """A char and a word model that have learned the tiny corpus by heart (CSV and TensorBoard logs)."""
    root = tmp_path_factory.mktemp("overfit")
    corpus = write_tiny_corpus(root)
    runs = {}
    for level in ("char", "word"):
        run = root / level
        cfg = compose_train([f"data={level}", f"data.path={corpus}", "trainer.max_steps=150", "trainer.max_epochs=100",
                             "model.dropout=0", "optimizer.lr=0.01", "model.hidden_size=64", "logger=many",
                             "test=false", "trainer.val_check_interval=50", "trainer.check_val_every_n_epoch=null"],
                            run, shared_data, cache_dir)
        train(cfg)
        runs[level] = run
    runs["corpus"] = corpus
    return runs


def test_incremental_decoding_gives_the_full_sequence_logits():
    torch.manual_seed(0)
    configs = [NetworkConfig(30, cell, embedding_dim, 24, 3, 0.3, impl=impl,
                             cell_settings={"nonlinearity": "relu"} if cell == "rnn" else {})
               for cell in ("rnn", "lstm", "gru") for embedding_dim in (16, None) for impl in ("fused", "scratch")]
    # the reset-before GRU has no torch.nn form: it steps with its own equations
    configs.append(NetworkConfig(30, "gru", 16, 24, 2, 0.0, impl="scratch", cell_settings={"reset_after": False}))
    # layers of different widths
    configs.append(NetworkConfig(30, "lstm", 16, [24, 16], 2, 0.0, tie_weights=True))
    # minGRU and minLSTM step without the scan that trains them, from either implementation's weights
    configs += [NetworkConfig(30, cell, embedding_dim, 24, 3, 0.3, impl=impl)
                for cell in ("mingru", "minlstm") for embedding_dim in (16, None) for impl in ("fused", "scratch")]
    configs.append(NetworkConfig(30, "lstm", 16, 48, 2, 0.0, projection_size=16, tie_weights=True))
    configs.append(NetworkConfig(30, "mingru", 16, 24, 2, 0.0, projection_size=16))
    for config in configs:
        net = LanguageModel(config).eval()
        tokens = torch.randint(0, 30, (3, 12))
        with torch.no_grad():
            full, final = net(tokens)
            _, state = net(tokens[:, :4])
        steps = []
        for t in range(4, 12):
            logits, state = net.step(tokens[:, t], state)
            steps.append(logits)
        torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], rtol=1e-5, atol=1e-5, msg=str(config))
        torch.testing.assert_close(state, final, rtol=1e-5, atol=1e-5, msg=str(config))  # the kernel's final state


def _random_net():
    torch.manual_seed(0)
    return LanguageModel(NetworkConfig(20, "lstm", 8, 16, 2, 0.0)).eval()


def _sample(net, **kwargs):
    seed = kwargs.pop("seed", 0)
    prompt = torch.zeros(2, 1, dtype=torch.long)
    return generate_tokens(net, prompt, 100, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_sampling_is_reproducible_and_greedy_is_deterministic():
    net = _random_net()
    assert torch.equal(_sample(net, greedy=True), _sample(net, greedy=True, seed=5))
    assert torch.equal(_sample(net, top_k=1), _sample(net, greedy=True))
    assert torch.equal(_sample(net, seed=3), _sample(net, seed=3))
    assert not torch.equal(_sample(net, seed=3), _sample(net, seed=4))
    assert _sample(net).shape == (2, 100)  # num_samples rows generated as one batch


def _fixed_logits_net(logits: list[float]) -> LanguageModel:
    """A model whose next-token logits are always ``logits``, whatever the input."""
    net = LanguageModel(NetworkConfig(len(logits), "gru", 4, 4, 1, 0.0)).eval()
    with torch.no_grad():
        net.decoder.weight.zero_()
        net.decoder.bias.copy_(torch.tensor(logits))
    return net


def test_top_k_and_top_p_never_emit_a_token_outside_the_kept_set():
    probs = torch.tensor([0.30, 0.25, 0.20, 0.10, 0.08, 0.07])
    net = _fixed_logits_net(probs.log().tolist())
    seen_k = set(_sample(net, top_k=3, temperature=2.0).flatten().tolist())
    assert seen_k == {0, 1, 2}  # the three most likely, each seen in 200 draws
    seen_p = set(_sample(net, top_p=0.5).flatten().tolist())
    assert seen_p == {0, 1}  # 0.30 + 0.25 reaches 0.5: the nucleus is the first two
    assert set(_sample(net, top_p=0.3).flatten().tolist()) == {0}


def test_prompt_encoding_at_the_vocabulary_boundary(caplog):
    words = Vocab("word", [UNK, "<eos>", "the", "cat"])
    assert words.encode_text("") == [words.line_end_id]  # an empty prompt starts a fresh line
    assert words.encode_text("the dog") == [1, 2, 0]
    assert "'dog'" in caplog.text
    chars = Vocab("char", ["\n", "a", "b"])
    with pytest.raises(VocabularyError, match="'x', 'z'"):
        chars.encode_text("abxz")


def test_eval_reproduces_the_logged_validation_loss(overfit_runs, shared_data, cache_dir):
    for level in ("char", "word"):
        run = overfit_runs[level]
        rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("val/loss")]
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("eval", overrides=[f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "split=valid",
                                             f"paths.data_dir={shared_data}", f"paths.cache_dir={cache_dir}",
                                             "device=cpu"])
        result = evaluate(cfg)
        assert result["loss"] == pytest.approx(float(rows[-1]["val/loss"]), rel=1e-4)
        assert result["global_step"] == 150
        metric = "bpc" if level == "char" else "ppl"
        expected = result["loss"] / math.log(2) if level == "char" else math.exp(result["loss"])
        assert result[metric] == pytest.approx(expected)


def _eval_config(*overrides: str, data_dir: Path, cache_dir: Path):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=[f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}", "device=cpu",
                                          *overrides])


def test_eval_of_a_bidirectional_model_reproduces_its_validation_loss(make_cfg, tiny_corpus, shared_data,
                                                                      cache_dir):
    cfg = make_cfg("data=word", "model.bidirectional=true", "task=bilm", f"data.path={tiny_corpus}", "logger=csv",
                   "trainer.max_steps=6", "test=false")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("val/loss")]
    # it trains on stream windows without carrying its state: eval must read the same windows, not sentences
    result = evaluate(_eval_config(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "split=valid",
                                   data_dir=shared_data, cache_dir=cache_dir))
    assert result["loss"] == pytest.approx(float(rows[-1]["val/loss"]), rel=1e-4)


def test_eval_uses_the_columns_of_every_training_process(overfit_runs, tmp_path, shared_data, cache_dir):
    data = torch.load(overfit_runs["char"] / "checkpoints" / "last.ckpt", weights_only=True)
    data["rnnlm"]["world_size"] = 2  # as if trained by two DDP processes, each on eval_batch_size columns
    torch.save(data, tmp_path / "ddp.ckpt")
    ddp = evaluate(_eval_config(f"ckpt_path={tmp_path / 'ddp.ckpt'}", "split=valid", data_dir=shared_data,
                                cache_dir=cache_dir))
    columns = data["datamodule_hyper_parameters"]["eval_batch_size"]
    assert ddp["batch_size"] == 2 * columns
    same = evaluate(_eval_config(f"ckpt_path={overfit_runs['char'] / 'checkpoints' / 'last.ckpt'}", "split=valid",
                                 f"data.batch_size={2 * columns}", data_dir=shared_data, cache_dir=cache_dir))
    assert ddp["loss"] == pytest.approx(same["loss"], rel=1e-6)
    given = evaluate(_eval_config(f"ckpt_path={tmp_path / 'ddp.ckpt'}", "split=valid", "data.batch_size=3",
                                  data_dir=shared_data, cache_dir=cache_dir))
    assert given["batch_size"] == 3  # a batch size on the command line wins


def test_last_is_the_newest_training_run_for_eval_and_generate(overfit_runs, tmp_path, shared_data, cache_dir):
    log_dir = tmp_path / "outputs"
    for run, level in (("old", "word"), ("new", "char")):
        folder = log_dir / "train" / "runs" / run / "checkpoints"
        folder.mkdir(parents=True)
        shutil.copy(overfit_runs[level] / "checkpoints" / "last.ckpt", folder / "last.ckpt")
        os.utime(folder / "last.ckpt", (1e9, 1e9) if run == "old" else None)
    newest = log_dir / "train" / "runs" / "new" / "checkpoints" / "last.ckpt"
    result = evaluate(_eval_config("ckpt_path=last", f"paths.log_dir={log_dir}", "split=valid",
                                   data_dir=shared_data, cache_dir=cache_dir))
    assert result["checkpoint"] == str(newest.resolve()) and result["level"] == "char"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("generate", overrides=["ckpt_path=last", f"paths.log_dir={log_dir}", "prompt=pack my",
                                             "max_new_tokens=8", "device=cpu"])
    [text] = generate_texts(cfg)
    assert text.startswith("pack my") and len(text) == 7 + 8  # characters: the char model was picked


def test_score_ranks_the_right_candidate_first(overfit_runs):
    for level in ("char", "word"):
        loaded = load_checkpoint(overfit_runs[level] / "checkpoints" / "last.ckpt")
        ranked = rank_candidates(loaded.net, loaded.vocab, "the quick brown ___ jumps over the lazy dog",
                                 ["box", "fox", "dog"])
        assert [c for c, _, _ in ranked][0] == "fox"
        seen, unseen = sentence_logprobs(loaded.net, loaded.vocab, ["pack my box with five dozen liquor jugs",
                                                                     "jugs liquor dozen five with box my pack"])
        assert seen[0] > unseen[0] and seen[1] == unseen[1]  # same tokens, the learned order is likelier
    with pytest.raises(ConfigError, match="no blank"):
        rank_candidates(loaded.net, loaded.vocab, "no blank here", ["a"])
    with pytest.raises(ConfigError, match="candidates is empty"):
        rank_candidates(loaded.net, loaded.vocab, "the ___", [])


def test_a_checkpoint_with_a_pickled_object_is_refused_without_running_it(overfit_runs, tmp_path):
    data = torch.load(overfit_runs["char"] / "checkpoints" / "last.ckpt", weights_only=True)
    marker = tmp_path / "payload-ran"
    data["evil"] = Payload(marker)
    torch.save(data, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
    (tmp_path / "cut.ckpt").write_bytes((overfit_runs["char"] / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not an rnnlm checkpoint"):
        load_checkpoint(tmp_path / "other.ckpt")


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "src" / script), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_generate_cli_prints_prompt_and_continuation(overfit_runs):
    ckpt = overfit_runs["char"] / "checkpoints" / "last.ckpt"
    args = [f"ckpt_path={ckpt}", "prompt=pack my box", "max_new_tokens=60", "num_samples=2", "seed=7"]
    first, again = _cli("generate.py", *args), _cli("generate.py", *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout  # same checkpoint, seed and options: same text
    samples = first.stdout.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("pack my box") and len(s) == 11 + 60 for s in samples)


@pytest.mark.parametrize(
    "override,message",
    [("temperature=0", "temperature=0 must be > 0"), ("top_p=1.5", "top_p=1.5 must be a number in (0, 1]"),
     ("top_k=0", "top_k=0 must be a positive integer"), ("max_new_tokens=-1", "max_new_tokens=-1 must be"),
     ("num_samples=0", "num_samples=0 must be an integer in [1, 10000]")],
)
def test_bad_sampling_options_are_rejected(override, message):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("generate", overrides=["ckpt_path=x.ckpt", override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_generate_config(cfg)


def test_cli_errors_are_one_line_and_exit_2(overfit_runs, tmp_path):
    ckpt = overfit_runs["word"] / "checkpoints" / "last.ckpt"
    cases = [
        ("generate.py", [f"ckpt_path={tmp_path / 'missing.ckpt'}"], "does not exist"),
        ("generate.py", [f"ckpt_path={ckpt}", "temperature=-1"], "temperature=-1 must be a number >= 0"),
        ("score.py", [f"ckpt_path={ckpt}", "text=the quick fox", "candidates=[a,b]"], "no blank"),
        ("score.py", [f"ckpt_path={ckpt}", "text=운동을 ___ 을", "candidates=[]"], "candidates is empty"),
    ]
    for script, args, message in cases:
        result = _cli(script, *args)
        assert result.returncode == 2, (script, args, result.stderr)
        assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
        assert "Traceback" not in result.stderr

