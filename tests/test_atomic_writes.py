"""Every file rnnlm writes is written whole or not at all: a full disk keeps the old file, leaves no temporary
file, and costs one line that names the folder, the bytes needed and the bytes free; what a killed process
left is removed at the next start.

The full disk is simulated in-process (``os.fsync``, a writer, ``posix_fallocate`` or ``torch.save`` failing as
they do on a full disk); the tests marked with the ``small_disk`` fixture fill a real tmpfs of a few KB, which
needs root, and are skipped without it."""

import ast
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import rnnlm
from helpers import write_tiny_corpus
from rnnlm import files
from rnnlm.checkpoint import write_checkpoint, write_model_section
from rnnlm.commands import generate
from rnnlm.commands.cli import exit_on_user_error
from rnnlm.commands.train import train
from rnnlm.errors import DiskFullError
from rnnlm.files import keep_logging_on_full_disk, remove_stale_temporaries, write_atomically
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.vocab import Vocab

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")
TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def _fail_fsync(monkeypatch, error: OSError = NO_SPACE, when=lambda name: True) -> None:
    """``os.fsync`` raises ``error`` for the files whose name ``when`` accepts, as it does on a full disk."""
    real = os.fsync

    def fsync(fd):
        if when(os.readlink(f"/proc/self/fd/{fd}")):
            raise error
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _no_space_free(monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _tiny_checkpoint(path: Path) -> Path:
    vocab = Vocab("char", list("\nabcdef "))
    net = LanguageModel(NetworkConfig(vocab_size=len(vocab), cell="gru", embedding_dim=4, hidden_size=8))
    data = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "global_step": 0}
    write_model_section(data, net.config, vocab, carry_state=True, world_size=1)
    torch.save(data, path)
    return path


def _generate(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run ``rnnlm-generate args`` in this process: its exit status and what it wrote on stderr."""
    monkeypatch.setattr(sys, "argv", ["rnnlm-generate", "device=cpu", *args])
    with pytest.raises(SystemExit) as stop:
        generate.main()
        sys.exit(0)
    return stop.value.code, capsys.readouterr().err


# ------------------------------------------------------------------ the helper
@pytest.mark.parametrize("fail", ["fsync", "write", "quota", "torch"])
def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(fail, tmp_path, monkeypatch):
    path = tmp_path / "out" / "keep.txt"
    write_atomically(path, "old\n")
    data = "new text\n" * 100
    if fail == "fsync":
        _fail_fsync(monkeypatch)
    elif fail == "quota":
        _fail_fsync(monkeypatch, OSError(errno.EDQUOT, "Disk quota exceeded"))
    elif fail == "write":  # the disk fills half-way through

        def data(fh):
            fh.write(b"x" * 5000)
            raise NO_SPACE
    else:  # torch.save says only RuntimeError: the free space tells
        _no_space_free(monkeypatch)

        def data(fh):
            fh.write(b"PK\x03\x04" + b"x" * 5000)
            raise TORCH_FULL
    with pytest.raises(DiskFullError) as err:
        write_atomically(path, data, size=2_300_000 if callable(data) else None, elsewhere="output=FILE")
    message = str(err.value)
    assert "\n" not in message
    if fail == "quota":
        assert message.startswith(f"the disk quota is used up in {path.parent}: writing keep.txt needs about 900 B: ")
    else:
        assert message.startswith(f"no space left in {path.parent}: writing keep.txt needs about ")
        assert ("2.3 MB, " if callable(data) else "900 B, ") in message and " free: " in message
    assert message.endswith("free some space, or write elsewhere (output=FILE)")
    assert path.read_text() == "old\n"
    assert os.listdir(path.parent) == ["keep.txt"]


def test_other_write_errors_stay_what_they_are(tmp_path):
    path = tmp_path / "keep.txt"
    write_atomically(path, "old\n")

    def broken(fh):  # torch.save failing with plenty of space left: not a full disk
        fh.write(b"x" * 10)
        raise RuntimeError("some other failure")

    with pytest.raises(RuntimeError, match="some other failure"):
        write_atomically(path, broken)
    with pytest.raises(TypeError):
        write_atomically(path, object())
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["keep.txt"]


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "metrics.json"
    write_atomically(path, "{}")
    assert path.stat().st_mode & 0o777 == 0o666 & ~files._UMASK  # as open() makes it, not mkstemp's 0o600
    path.chmod(0o640)
    write_atomically(path, "{}\n")
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_checkpoint_save_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    write_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    save = torch.save

    def save_until_full(obj, fh):  # what torch.save does when the disk fills during the write
        save(obj, fh)
        raise TORCH_FULL

    monkeypatch.setattr(torch, "save", save_until_full)
    _no_space_free(monkeypatch)
    weights = torch.zeros(3_800_000)  # 15.2 MB
    folder = re.escape(str(path.parent))
    with pytest.raises(DiskFullError, match=rf"^no space left in {folder}: writing last\.ckpt needs about "
                                            r"15\.2 MB, 0 B free: free some space, or write elsewhere "
                                            r"\(paths\.log_dir=DIR\)$"):
        write_checkpoint({"state_dict": {"w": weights, "view": weights[:10]}, "global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert os.listdir(path.parent) == ["last.ckpt"]


# ------------------------------------------------------------------ the commands
def test_generate_on_a_full_disk_keeps_the_old_output(tmp_path, monkeypatch, capsys):
    checkpoint = _tiny_checkpoint(tmp_path / "model.ckpt")
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "keep.txt"
    keep.write_text("the old samples\n")
    stale, live = out / f".keep.txt.{_dead_pid()}.k3j.tmp", out / f".keep.txt.{os.getppid()}.k3j.tmp"
    stale.write_bytes(b"x" * 4096)
    live.write_bytes(b"x")
    _fail_fsync(monkeypatch)
    status, err = _generate(monkeypatch, capsys, f"ckpt_path={checkpoint}", f"output={keep}", "overwrite=true",
                            "max_new_tokens=50")
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: no space left in {out}: writing keep.txt")
    assert keep.read_text() == "the old samples\n"
    assert sorted(os.listdir(out)) == sorted(["keep.txt", live.name])  # the killed writer's temporary is gone

    status, err = _generate(monkeypatch, capsys, f"ckpt_path={checkpoint}", f"output={out / 'new.txt'}",
                            "max_new_tokens=50")
    assert status == 2 and err.startswith(f"error: no space left in {out}")
    assert not (out / "new.txt").exists()  # nothing that would block the next try
    monkeypatch.undo()
    status, _ = _generate(monkeypatch, capsys, f"ckpt_path={checkpoint}", f"output={out / 'new.txt'}",
                          "max_new_tokens=50")
    assert status == 0 and (out / "new.txt").read_text().strip()


@pytest.mark.parametrize("summary_too", [False, True], ids=["checkpoint", "checkpoint-and-summary"])
def test_a_full_disk_during_training_ends_the_run_in_one_line(summary_too, make_cfg, tiny_corpus, tmp_path,
                                                             monkeypatch, capsys):
    cfg = make_cfg(f"data.path={tiny_corpus}", "test=false", "logger=csv")
    run = Path(cfg.paths.output_dir)
    (run / "checkpoints").mkdir(parents=True)
    stale = run / "checkpoints" / f".last.ckpt.{_dead_pid()}.ab12cd.tmp"  # left by a run killed while saving
    stale.write_bytes(b"x" * 1000)
    _fail_fsync(monkeypatch, when=lambda name: name.startswith(str(run)) and (summary_too or ".ckpt." in name))
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(train)(cfg)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: no space left in {run / 'checkpoints'}: writing ")
    assert "needs about " in lines[0] and "(paths.log_dir=DIR)" in lines[0]
    assert not stale.exists() and not _temporaries(run)
    assert not list((run / "checkpoints").iterdir())
    if summary_too:
        assert lines[0].endswith("; run_summary.json was not written either")
        assert not (run / "run_summary.json").exists()
    else:
        summary = json.loads((run / "run_summary.json").read_text())
        assert summary["status"] == "failed" and summary["error"].startswith("DiskFullError: no space left in ")


def test_run_summary_is_written_atomically(make_cfg, tiny_corpus, monkeypatch):
    cfg = make_cfg(f"data.path={tiny_corpus}", "test=false", "logger=csv")
    run = Path(cfg.paths.output_dir)
    run.mkdir(parents=True)
    (run / "run_summary.json").write_text('{"status": "an earlier summary"}\n')
    old = run / ".run_summary.json.tmp"  # the name rnnlm 0.1 used, from a process killed an hour ago
    old.write_text("{")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    _fail_fsync(monkeypatch, when=lambda name: "run_summary.json" in name)
    with pytest.raises(DiskFullError, match=f"no space left in {re.escape(str(run))}: writing run_summary.json "):
        train(cfg)
    assert json.loads((run / "run_summary.json").read_text()) == {"status": "an earlier summary"}
    assert not _temporaries(run)
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_full_token_cache_is_one_line_and_leaves_nothing(tmp_path, tiny_corpus, monkeypatch):
    from rnnlm.corpora import path_source
    from rnnlm.prepare import prepare

    def fallocate(fd, offset, length):
        raise NO_SPACE

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    cache = tmp_path / "cache"
    folder = re.escape(str(cache))
    with pytest.raises(DiskFullError, match=rf"no space left in {folder}: writing tiny-char-\w+ needs about .* "
                                            r"\(RNNLM_CACHE_DIR=DIR or paths.cache_dir=DIR\)$"):
        prepare(path_source(tiny_corpus), "char", cache)
    assert os.listdir(cache) == []


def test_a_download_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    from rnnlm.corpora import RemoteFile, download

    upstream = tmp_path / "upstream.txt"
    upstream.write_bytes(b"hello world\n" * 100)
    digest = hashlib.sha256(upstream.read_bytes()).hexdigest()
    dest = tmp_path / "data" / "fake" / "input.txt"
    _fail_fsync(monkeypatch)
    folder = re.escape(str(dest.parent))
    with pytest.raises(DiskFullError, match=rf"no space left in {folder}: writing input.txt needs more than "
                                            r"1\.2 KB, .*\(RNNLM_DATA_DIR=DIR or paths.data_dir=DIR\)$"):
        download(RemoteFile("input.txt", upstream.as_uri(), digest), dest)
    assert os.listdir(dest.parent) == []


class FullStream:
    def write(self, text: str) -> None:
        raise NO_SPACE

    def flush(self) -> None:
        pass


def test_a_log_file_on_a_full_disk_warns_once_without_a_traceback(tmp_path, capsys):
    logger = logging.getLogger("rnnlm-test-full-log")
    handler = logging.FileHandler(tmp_path / "train.log")
    logger.addHandler(handler)
    try:
        keep_logging_on_full_disk(logger)
        handler.stream = FullStream()
        logger.error("a line")
        logger.error("another line")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert err == f"warning: no space left for {tmp_path / 'train.log'}: its lines are dropped until there is space\n"


# ------------------------------------------------------------------ what a killed process left
def test_stale_temporaries_go_and_live_ones_stay(tmp_path):
    dead, live, here = _dead_pid(), os.getppid(), files._HOST
    hour_ago = time.time() - 3600
    stays = [f".last.ckpt.{live}.k3j.tmp", f".last.ckpt.{live}@{here}.k3j.tmp",
             f".last.ckpt.{dead}@another-host.k3j.tmp",  # its writer may be alive on that host
             ".run_summary.json.tmp",  # no pid, and written a moment ago
             "notes.tmp", ".hydra", "last.ckpt"]
    goes = [f".last.ckpt.{dead}.k3j.tmp", f".best.ckpt.{dead}@{here}.x_9.tmp", f".keep.txt.{dead}.abc.tmp"]
    aged = [f".metrics.json.{dead}@another-host.k3j.tmp", ".run_summary.json.old.tmp"]
    for name in stays + goes + aged:
        (tmp_path / name).write_text("x")
    for name in aged:
        os.utime(tmp_path / name, (hour_ago, hour_ago))
    folder = tmp_path / f".corpus-char-0123.{dead}@{here}.q1w2.tmp"  # a token cache being built
    folder.mkdir()
    (folder / "train.npy").write_bytes(b"x")
    goes.append(folder.name)

    checkpoints = {f".last.ckpt.{dead}.k3j.tmp", f".best.ckpt.{dead}@{here}.x_9.tmp"}
    assert {p.name for p in remove_stale_temporaries(tmp_path, names=["*.ckpt"])} == checkpoints
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(stays)
    assert {p.name for p in removed} == set(goes + aged) - checkpoints
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_a_temporary_names_its_writer(tmp_path, monkeypatch):
    names = []
    _fail_fsync(monkeypatch, when=lambda name: names.append(os.path.basename(name)) or False)
    write_atomically(tmp_path / "last.ckpt", b"x")
    assert names[0].startswith(f".last.ckpt.{os.getpid()}@{socket.gethostname().split('.')[0][:40]}")
    assert names[0].endswith(".tmp")


# ------------------------------------------------------------------ every write goes through rnnlm.files
SRC = Path(rnnlm.__file__).parent
# Whole-file writes that do not go through rnnlm.files, by (module, function, call); each says why.
ALLOWED = {
    # appended logs: a line at a time, never replaced; a failed append is a warning
    ("callbacks.py", "TextSamples.on_validation_end", "open"),  # samples.txt
    ("diagnostics.py", "GradientFlow._write_csv", "open"),  # gradient_flow.csv, appended (converted separately)
    # owned by other modules' authors, converted separately
    ("commands/report.py", "_writable", "tempfile.mkstemp"),  # a probe of the report folder
    ("commands/report.py", "_save", "figure.savefig"),
    ("run_folder.py", "_lock", "os.open"),  # .rnnlm.lock, held open with flock
}
WRITE_CALLS = {"write_text", "write_bytes", "savefig", "save", "savez", "savez_compressed", "savetxt", "tofile",
               "open_memmap", "mkstemp", "mkdtemp", "NamedTemporaryFile", "replace", "rename", "copyfile", "copy",
               "copy2", "copytree", "move", "FileHandler"}
OWNERS = {"save": ("torch", "np", "numpy"), "replace": ("os",), "rename": ("os",), "copy": ("shutil",),
          "copy2": ("shutil",), "copyfile": ("shutil",), "copytree": ("shutil",), "move": ("shutil",)}
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC")


def _writes(path: Path) -> list[tuple[str, str, str]]:
    """(function, call) of every call in ``path`` that writes a file, outside functions handed to
    ``write_atomically`` (which write into the temporary file it opened)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    handed = {arg.id for node in ast.walk(tree) if isinstance(node, ast.Call)
              and getattr(node.func, "id", getattr(node.func, "attr", "")) == "write_atomically"
              for arg in node.args if isinstance(arg, ast.Name)}

    def through_files(node) -> bool:
        while node in parents:
            parent = parents[node]
            if isinstance(node, ast.Lambda) and isinstance(parent, ast.Call) and node in parent.args:
                return getattr(parent.func, "id", getattr(parent.func, "attr", "")) == "write_atomically"
            if isinstance(node, ast.FunctionDef) and node.name in handed:
                return True
            node = parent
        return False

    def scope(node) -> str:
        names = []
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.append(node.name)
        return ".".join(reversed(names))

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        mode = next((k.value for k in node.keywords if k.arg in ("mode", "flags")), None)
        if name in ("open", "fdopen"):
            position = 1 if isinstance(func, ast.Name) or owner in ("io", "os") or name == "fdopen" else 0
            mode = mode or (node.args[position] if len(node.args) > position else None)
            text = ast.unparse(mode) if mode is not None else ""
            writes = any(flag in text for flag in WRITE_FLAGS) if owner == "os" and name == "open" else (
                isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+"))
        else:
            writes = name in WRITE_CALLS and owner in OWNERS.get(name, (owner,))
        if writes and not through_files(node):
            found.append((scope(node), f"{owner}.{name}" if owner else name))
    return found


def test_every_file_rnnlm_writes_goes_through_rnnlm_files():
    found = {(path.relative_to(SRC).as_posix(), *write) for path in sorted(SRC.rglob("*.py"))
             if path.name != "files.py" for write in _writes(path)}
    unprotected = sorted(found - ALLOWED)
    assert not unprotected, (f"write these through rnnlm.files.write_atomically (or, for an appended log, add them "
                             f"to ALLOWED with the reason): {unprotected}")


def test_the_scan_sees_every_kind_of_write(tmp_path):
    module = tmp_path / "module.py"
    module.write_text(
        "def f(p, fh):\n"
        "    open(p, 'w'); p.open('a'); os.open(p, os.O_WRONLY | os.O_CREAT); os.fdopen(3, 'wb')\n"
        "    p.write_text('x'); p.write_bytes(b''); torch.save({}, p); np.save(p, a); fig.savefig(p)\n"
        "    os.replace(p, p); shutil.copyfile(p, p); tempfile.mkstemp()\n"
        "    open(p); open(p, 'rb'); p.open(); d.copy(); s.replace('a', 'b')\n"  # reads: not writes
        "    write_atomically(p, lambda out: torch.save({}, out))\n"
    )
    assert len(_writes(module)) == 12


# ------------------------------------------------------------------ a real full disk
@pytest.fixture
def small_disk():
    """``small_disk(folder, size)`` mounts a tmpfs of ``size`` at ``folder`` (needs root)."""
    mounted = []

    def mount(folder: Path, size: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                  capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command: the tests that simulate a full disk in-process cover the same code")
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs ({done.stderr.strip() or 'needs root'}): the tests that simulate a "
                        "full disk in-process cover the same code")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_generate_on_a_real_full_disk(small_disk, tmp_path, monkeypatch, capsys):
    checkpoint = _tiny_checkpoint(tmp_path / "model.ckpt")
    disk = small_disk(tmp_path / "disk", "4k")
    keep = disk / "keep.txt"
    keep.write_text("the old samples\n")  # the disk's one page
    status, err = _generate(monkeypatch, capsys, f"ckpt_path={checkpoint}", f"output={keep}", "overwrite=true",
                            "max_new_tokens=50")
    assert status == 2
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: no space left in {disk}: writing keep.txt needs about 51 B, 0 B free: ")
    assert keep.read_text() == "the old samples\n" and os.listdir(disk) == ["keep.txt"]


def test_training_on_a_real_full_disk(small_disk, make_cfg, tiny_corpus, monkeypatch, capsys):
    cfg = make_cfg(f"data.path={tiny_corpus}", "test=false", "logger=csv", "model.hidden_size=64")
    run = Path(cfg.paths.output_dir)
    checkpoints = small_disk(run / "checkpoints", "64k")  # a checkpoint needs about 290 KB
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(train)(cfg)
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: no space left in {checkpoints}: writing ")
    assert os.listdir(checkpoints) == []
    assert json.loads((run / "run_summary.json").read_text())["status"] == "failed"


def test_a_token_cache_on_a_real_full_disk_is_one_error_not_a_crash(small_disk, tmp_path):
    corpus = write_tiny_corpus(tmp_path)
    corpus.write_text(corpus.read_text() * 20)  # 300 KB of ids, on a disk of 64 KB
    cache = small_disk(tmp_path / "cache", "64k")
    code = ("import sys; from pathlib import Path; from rnnlm.corpora import path_source; "
            "from rnnlm.prepare import prepare; from rnnlm.errors import DiskFullError\n"
            "try: prepare(path_source(Path(sys.argv[1])), 'char', Path(sys.argv[2]))\n"
            "except DiskFullError as err: sys.exit(f'error: {err}')")
    done = subprocess.run([sys.executable, "-c", code, str(corpus), str(cache)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]  # a memory map filling a full disk would kill it: SIGBUS
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: no space left in {cache}: writing tiny-char-")
    assert os.listdir(cache) == []
