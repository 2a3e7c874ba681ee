"""A wheel built from the repository carries its configs: installed elsewhere, the commands work from any folder."""

import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_trains_from_any_folder(tmp_path, tiny_corpus, shared_data):
    def run(*args, cwd=tmp_path):
        result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "wheel", REPO)
    # The venv sees this interpreter's packages (torch, lightning, hydra) but installs rnnlm from the wheel alone.
    run(sys.executable, "-m", "venv", "--system-site-packages", tmp_path / "venv")
    wheel = next((tmp_path / "wheel").glob("rnnlm-*.whl"))
    run(tmp_path / "venv" / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(tmp_path / "venv" / "bin" / "python", "-c", "import rnnlm; print(rnnlm.__file__)", cwd=elsewhere)
    assert str(tmp_path / "venv") in where  # the wheel's copy, not the checkout
    assert "hidden_size: 200" in run(tmp_path / "venv" / "bin" / "rnnlm-train", "--cfg", "job", cwd=elsewhere)
    run(tmp_path / "venv" / "bin" / "rnnlm-train", f"data.path={tiny_corpus}", "trainer.max_steps=2", "test=false",
        "model.hidden_size=16", "model.embedding_dim=8", "data.seq_len=8", "data.batch_size=2", "trainer=cpu",
        f"paths.data_dir={shared_data}", cwd=elsewhere)
    assert list((elsewhere / "outputs" / "train" / "runs").glob("*/checkpoints/last.ckpt"))
