"""Every entry point on a GPU: training in each precision (with the TensorBoard text samples), resuming,
eval, greedy generation and scoring as on the CPU, 16 samples in one batch, and the commands themselves.
Tiny models trained a few steps: about a minute on one GPU.

Marked ``gpu``; skipped where CUDA is not available (``python -m pytest -m gpu`` runs only these).

Dry run: ``GPU_TEST_DEVICE=cpu python -m pytest tests/test_gpu.py`` runs every test with the CPU standing in
for the GPU (16-bit mixed precision, which needs a GPU, is skipped), so the tests themselves can be checked
on a machine without one. The CPU-against-GPU comparisons then compare the CPU with itself.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import PANGRAMS, REPO, compose_train
from rnnlm.checkpoint import load_checkpoint
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.eval import evaluate
from rnnlm.commands.generate import SEPARATOR, generate_texts
from rnnlm.commands.train import train
from rnnlm.sampling import generate_tokens
from rnnlm.scoring import fill_blank, sentence_logprobs

DEVICE = os.environ.get("GPU_TEST_DEVICE", "cuda")
DRY_RUN = DEVICE == "cpu"
ACCELERATOR = "cpu" if DRY_RUN else "gpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not DRY_RUN and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (GPU_TEST_DEVICE=cpu: a dry run on the CPU)"),
]

# Validation (and so a text sample) at steps 3 and 6; last.ckpt at step 6 is mid-epoch, with a carried state.
GPU_RUN = (f"trainer.accelerator={ACCELERATOR}", "test=false", "trainer.max_steps=6", "trainer.val_check_interval=3",
           "trainer.check_val_every_n_epoch=null")
PRECISIONS = ["32-true", "bf16-mixed",
              pytest.param("16-mixed", marks=pytest.mark.skipif(DRY_RUN, reason="16-bit mixed precision needs a GPU"))]


@pytest.fixture(scope="module")
def gpu_ckpt(train_tiny) -> Path:
    return train_tiny(*GPU_RUN, "trainer.precision=32-true") / "checkpoints" / "last.ckpt"


def _config(name: str, *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _eval(ckpt: Path, device: str, shared_data: Path, cache_dir: Path) -> dict:
    return evaluate(_config("eval", f"ckpt_path={ckpt}", "split=valid", f"device={device}",
                            f"paths.data_dir={shared_data}", f"paths.cache_dir={cache_dir}"))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_on_the_gpu_in_each_precision(precision, train_tiny, shared_data, cache_dir):
    run = train_tiny(*GPU_RUN, f"trainer.precision={precision}")
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["status"] == "ok" and math.isfinite(summary["metrics"]["val/loss"])
    raw = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # each tensor where it was saved from
    assert {(v.device.type, v.dtype) for v in raw["state_dict"].values()} == {(torch.device(DEVICE).type,
                                                                               torch.float32)}
    # the text samples callback generated on the training device after each validation
    samples = (run / "samples.txt").read_text()
    assert "=== step 3\n" in samples and "=== step 6\n" in samples
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert any(tag.startswith("samples") for tag in events.Tags()["tensors"]), events.Tags()
    # the mixed-precision checkpoint (float32 weights) serves every command on the GPU
    ckpt = run / "checkpoints" / "last.ckpt"
    assert _eval(ckpt, DEVICE, shared_data, cache_dir)["loss"] < 10
    [text] = generate_texts(_config("generate", f"ckpt_path={ckpt}", "prompt=the", "max_new_tokens=10",
                                    "greedy=true", f"device={DEVICE}"))
    assert text.startswith("the") and len(text) == 13
    loaded = load_checkpoint(ckpt, DEVICE)
    [(logprob, tokens)] = sentence_logprobs(loaded.net, loaded.vocab, [PANGRAMS[0]])
    assert tokens == len(PANGRAMS[0]) + 1 and -200 < logprob < 0


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_run_resumes_on_the_gpu(precision, train_tiny, session_corpus, shared_data, cache_dir, tmp_path):
    last = train_tiny(*GPU_RUN, f"trainer.precision={precision}") / "checkpoints" / "last.ckpt"
    # resumed mid-epoch: the restored hidden state carried into the next chunk must be on the GPU too
    cfg = compose_train([f"data.path={session_corpus}", *GPU_RUN, f"trainer.precision={precision}",
                         f"ckpt_path={last}", "trainer.max_steps=9"], tmp_path / "resumed", shared_data, cache_dir)
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"])
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9


def test_eval_on_the_gpu_equals_eval_on_the_cpu(gpu_ckpt, shared_data, cache_dir):
    on_gpu, on_cpu = (_eval(gpu_ckpt, device, shared_data, cache_dir) for device in (DEVICE, "cpu"))
    assert on_gpu["tokens"] == on_cpu["tokens"] > 0
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-4)


def test_greedy_generation_is_the_same_on_the_gpu_and_the_cpu(gpu_ckpt):
    nets = {device: load_checkpoint(gpu_ckpt, device).net for device in (DEVICE, "cpu")}
    vocab = load_checkpoint(gpu_ckpt).vocab
    ids = vocab.encode_text("the quick")
    out = {device: generate_tokens(net, torch.tensor([ids]), 80, greedy=True)[0].tolist()
           for device, net in nets.items()}
    gpu, cpu = out[DEVICE], out["cpu"]
    if gpu != cpu:  # only a near-tie may go either way: at the first difference both tokens are equally likely
        i = next(i for i, (a, b) in enumerate(zip(gpu, cpu, strict=True)) if a != b)
        logits, _ = nets["cpu"](torch.tensor([ids + cpu[:i]]))
        gap = float(logits[0, -1, cpu[i]] - logits[0, -1, gpu[i]])
        assert gap < 1e-3, f"token {i}: the GPU chose {gpu[i]}, the CPU {cpu[i]}, {gap:.2e} more likely on the CPU"
    [text] = generate_texts(_config("generate", f"ckpt_path={gpu_ckpt}", "prompt=the quick", "max_new_tokens=80",
                                    "greedy=true", f"device={DEVICE}"))
    assert text == "the quick" + vocab.decode(gpu)


def test_score_on_the_gpu_equals_the_cpu(gpu_ckpt, train_tiny):
    lines = [*PANGRAMS, "jugs liquor dozen five with box my pack"]
    scores = {}
    for device in (DEVICE, "cpu"):
        loaded = load_checkpoint(gpu_ckpt, device)
        scores[device] = sentence_logprobs(loaded.net, loaded.vocab, lines, batch_size=3)  # ragged last batch
    for (gpu_lp, gpu_n), (cpu_lp, cpu_n) in zip(scores[DEVICE], scores["cpu"], strict=True):
        assert gpu_n == cpu_n and gpu_lp == pytest.approx(cpu_lp, rel=1e-4)
    bilm = train_tiny(f"trainer.accelerator={ACCELERATOR}", "test=false", "trainer.max_steps=3",
                      "model.bidirectional=true", "task=bilm") / "checkpoints" / "last.ckpt"
    filled = {}
    for device in (DEVICE, "cpu"):
        loaded = load_checkpoint(bilm, device)
        filled[device] = fill_blank(loaded.net, loaded.vocab, "the quick br___wn fox")
    assert filled[DEVICE].device.type == "cpu"
    torch.testing.assert_close(filled[DEVICE], filled["cpu"], rtol=1e-4, atol=1e-4)


def test_sixteen_samples_as_one_batch_on_the_gpu(gpu_ckpt):
    texts = generate_texts(_config("generate", f"ckpt_path={gpu_ckpt}", "prompt=the", "max_new_tokens=50",
                                   "num_samples=16", "seed=3", f"device={DEVICE}"))
    assert len(texts) == 16 and all(t.startswith("the") and len(t) == 53 for t in texts)
    assert len(set(texts)) > 1  # sampled, not 16 copies
    lines = generate_texts(_config("generate", f"ckpt_path={gpu_ckpt}", "prompt=the", "max_new_tokens=200",
                                   "num_samples=16", "stop_at_eos=true", f"device={DEVICE}"))
    assert len(lines) == 16 and all("\n" not in t and len(t) <= 203 for t in lines)
    # a generator on the GPU draws there; the same seed gives the same samples
    loaded = load_checkpoint(gpu_ckpt, DEVICE)
    prompt = torch.tensor([loaded.vocab.encode_text("the")] * 16, device=DEVICE)
    draws = [generate_tokens(loaded.net, prompt, 30, generator=torch.Generator(DEVICE).manual_seed(0))
             for _ in range(2)]
    assert draws[0].shape == (16, 30) and draws[0].device == prompt.device
    assert torch.equal(draws[0], draws[1]) and int(draws[0].max()) < len(loaded.vocab)


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "src" / script), *args], capture_output=True, text=True,
                          timeout=300)


def test_every_command_runs_on_the_gpu_from_the_command_line(gpu_ckpt, shared_data, cache_dir, tmp_path):
    result = _cli("generate.py", f"ckpt_path={gpu_ckpt}", "prompt=the", "max_new_tokens=20", "num_samples=16",
                  "device=auto")  # auto: the GPU, where there is one
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.rstrip("\n").split(SEPARATOR)) == 16
    result = _cli("score.py", f"ckpt_path={gpu_ckpt}", "text=the quick brown ___", "candidates=[fox,dog,box]",
                  f"device={DEVICE}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == "rank\tlogprob\tppl\tcandidate" and len(result.stdout.splitlines()) == 4
    output = tmp_path / "metrics.json"
    result = _cli("eval.py", f"ckpt_path={gpu_ckpt}", "split=valid", "device=cpu" if DRY_RUN else "device=cuda:0",
                  f"paths.data_dir={shared_data}", f"paths.cache_dir={cache_dir}", f"output={output}",
                  f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(output.read_text())["tokens"] > 0


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_weight_drop_on_the_gpu_keeps_the_fused_kernel_quiet_and_equal(cell):
    """The dropped weights reach cuDNN as one block in its layout: no warning about weights that are not one
    contiguous chunk (which AWD-LSTM's own code produces), and the same numbers as the scratch cells."""
    import warnings

    from rnnlm.stack import RecurrentStack

    torch.manual_seed(0)
    fused = RecurrentStack(cell, 16, 32, 3, dropout=0.3, weight_drop=0.5, locked_dropout=True).to(DEVICE)
    scratch = RecurrentStack(cell, 16, 32, 3, dropout=0.3, weight_drop=0.5, locked_dropout=True,
                             impl="scratch").to(DEVICE)
    scratch.load_fused_state_dict(fused.fused_state_dict())
    x = torch.randn(8, 20, 16, device=DEVICE)
    outputs = []
    for backbone in (fused, scratch):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, _ = backbone(x)
            out.sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_the_parallel_scan_on_the_gpu_equals_the_step_by_step_form(cell):
    from rnnlm.stack import RecurrentStack

    torch.manual_seed(0)
    scan = RecurrentStack(cell, 16, 32, 2).to(DEVICE)
    loop = RecurrentStack(cell, 16, 32, 2, impl="scratch").to(DEVICE)
    loop.load_state_dict(scan.state_dict())
    x = torch.randn(4, 512, 16, device=DEVICE)
    torch.testing.assert_close(scan(x)[0], loop(x)[0], rtol=1e-4, atol=1e-5)
