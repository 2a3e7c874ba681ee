"""Export a checkpoint for use outside rnnlm (``conf/export.yaml``): ``rnnlm-export ckpt_path=... format=onnx``, the
one-step function for onnxruntime, or ``format=safetensors``, the weights (the writing itself is
:mod:`rnnlm.exporting`)."""

from __future__ import annotations

import glob
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rnnlm.checkpoint import load_checkpoint, resolve_checkpoint
from rnnlm.checks import check_export_config
from rnnlm.commands.cli import CONF_DIR, check_output, end_program, exit_on_user_error, run_command
from rnnlm.errors import ConfigError, ExportError
from rnnlm.files import human_size, remove_stale_temporaries, write_atomically


def export_model(cfg: DictConfig) -> tuple[Path, dict]:
    """Write the checkpoint ``cfg.ckpt_path`` as ``cfg.format`` to ``cfg.output`` (by default beside the checkpoint,
    with the format's suffix), atomically; nothing is written unless the whole file is ready and, for ONNX, checked
    with onnxruntime.

    Returns:
        the path written, and the description it holds (:func:`rnnlm.exporting.describe`).

    Raises:
        UserError: one line: a setting, a missing package, a checkpoint, an output path, or a model that this format
            cannot hold (:func:`rnnlm.exporting.export_problem`).
    """
    from rnnlm import exporting  # it imports the optional packages only when it writes a file

    check_export_config(cfg)
    exporting.require(cfg.format)  # before the checkpoint is read: the missing package is the first thing to fix
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir)
    output = export_output(cfg.output or ckpt_path.with_suffix(exporting.SUFFIXES[cfg.format]), cfg.format,
                           cfg.overwrite)
    remove_stale_temporaries(output.parent, names=[glob.escape(output.name)])
    loaded = load_checkpoint(ckpt_path)  # on the CPU, in float32
    if problem := exporting.export_problem(loaded.net, cfg.format, str(ckpt_path)):
        raise ExportError(problem)
    description = exporting.describe(loaded.net, loaded.vocab, loaded.info["global_step"], cfg.format)
    if cfg.format == "onnx":
        data = exporting.onnx_bytes(loaded.net, description)
    else:
        data = exporting.safetensors_bytes(loaded.net, description)
    try:
        write_atomically(output, data, elsewhere="output=FILE")
    except OSError as err:  # a folder that took the probe file of export_output and then no longer does
        raise ConfigError(f"cannot write output={output} ({err.strerror}): give a path in a folder you can write "
                          "to") from None
    return output, description


def export_output(path: str | Path, format_name: str, overwrite: bool) -> Path:
    """The file to write (:func:`rnnlm.commands.cli.check_output`: never a checkpoint, never an existing file unless
    ``overwrite``), refused also when it has the other format's suffix or its folder takes no new file.

    Raises:
        ConfigError: the message says what to give instead.
    """
    from rnnlm.exporting import SUFFIXES

    path = check_output(path, overwrite)
    other = [name for name, suffix in SUFFIXES.items() if name != format_name and path.suffix == suffix]
    if other:
        raise ConfigError(f"output={path} is named as a {other[0]} file, and format={format_name}: give format="
                          f"{other[0]}, or output=FILE{SUFFIXES[format_name]}")
    try:  # root passes os.access anywhere, and a read-only mount does not show in the permission bits
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as err:
        raise ConfigError(f"output={path}: cannot write in {path.parent} ({err.strerror}): give a path in a folder "
                          "you can write to") from None
    return path


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> None:
    output, description = export_model(cfg)
    print(f"{output} ({cfg.format}, {human_size(output.stat().st_size)})")
    if "inputs" in description:  # what a program that runs it passes and gets back
        print(" -> ".join(", ".join(f"{t['name']} {_shape(t['shape'])}" for t in description[part])
                          for part in ("inputs", "outputs")))


def _shape(dims: list) -> str:
    """``(batch,)``, ``(batch, 32)``: a shape as Python writes a tuple."""
    return f"({', '.join(map(str, dims))}{',' if len(dims) == 1 else ''})"


def main() -> None:
    """Console entry point: ``rnnlm-export [overrides]``."""
    if run_command(_hydra_main, "export", compose_once=True):
        end_program(main)


if __name__ == "__main__":
    main()
