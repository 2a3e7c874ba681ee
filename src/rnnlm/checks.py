"""Check a composed config before any work starts, so a mistake costs one line, not a run."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rnnlm.cells import BUILT_IN, cell_class
from rnnlm.corpora import CORPORA
from rnnlm.errors import ConfigError
from rnnlm.network import LanguageModel, NetworkConfig, on_meta
from rnnlm.schema import check_settings, shown
from rnnlm.stack import RecurrentStack

# float32 weights, their gradients and the optimizer's two moments (AdamW; SGD with momentum keeps one)
BYTES_PER_PARAMETER = 4 * 4


def check_config(cfg: DictConfig, command: str, overrides: list[str] | None = None) -> None:
    """Check a command's composed config before it does anything (``rnnlm.commands.cli`` calls this for every
    job it is about to run): each key's type and range (:mod:`rnnlm.schema`), then the settings that only make
    sense together, and for a resumed training run the checkpoint's own config with ``overrides`` applied.

    Raises:
        UserError: the message names every key at fault and how to fix it.
    """
    CHECKS[command](cfg)
    if command == "train" and cfg.ckpt_path:
        from rnnlm.resume import resume_config

        check_train_config(resume_config(cfg, overrides))


def check_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem in the training settings: first each key's type and range
    (:mod:`rnnlm.schema`), then the settings that only make sense together."""
    if OmegaConf.is_missing(cfg.model, "cell"):
        raise ConfigError("model.cell is not set (model=_recurrent is the base the model files share): "
                          f"use model={'|'.join(BUILT_IN)}")
    check_settings(cfg, "train")
    problems: list[str] = []
    model, data = cfg.model, cfg.data
    problems += NetworkConfig.problems_of(model)
    if model.bidirectional and cfg.task != "bilm":
        problems.append("a bidirectional model would see the token it predicts, so it cannot be a causal LM: "
                        "use task=bilm (or model.bidirectional=false)")
    elif cfg.task == "bilm" and not model.bidirectional:
        problems.append("task=bilm needs model.bidirectional=true")
    elif cfg.task == "bilm" and data.mode != "stream":
        problems.append("task=bilm reads fixed windows: use data.mode=stream")
    if model.softmax == "adaptive" and data.level == "char":
        problems.append("model.softmax=adaptive clusters ids by frequency, as word and bpe vocabularies are ordered; a "
                        "char vocabulary is ordered by code point: use data=word or data.level=bpe, or "
                        "model.softmax=full")
    if data.level == "bpe":
        problems += _bpe_problems(data)
    if data.variable_seq_len:
        if data.mode != "stream":
            problems.append("data.variable_seq_len=true varies the length of stream chunks: use data.mode=stream")
        elif data.seq_len < 10:
            problems.append(f"data.variable_seq_len=true draws lengths around data.seq_len={data.seq_len} with a "
                            "spread of 5 steps: set data.seq_len=10 or more")
        if model.cuda_graph:
            problems.append("data.variable_seq_len=true gives chunks of many lengths, and model.cuda_graph replays "
                            "one: drop one of them")
    if data.scored == "last" and data.mode != "sentence":
        problems.append("data.scored=last scores each line's last word: use data.mode=sentence")
    if data.recall:
        problems += _recall_problems(data)
    elif not data.path and data.corpus is None:
        problems.append(f"data.corpus is not set: use one of {'|'.join(CORPORA)}, or data.path=FILE")
    if sum(data.split) > 1 + 1e-9:
        problems.append(f"data.split={list(data.split)} must be three fractions (train, valid, test) summing to at "
                        "most 1")
    if str(cfg.trainer.accelerator).lower() in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append(f"trainer.accelerator={cfg.trainer.accelerator} but no GPU is available: use trainer=cpu, "
                        "or trainer=default (a GPU when there is one)")
    else:
        problems += _device_problems(cfg.trainer)
    if model.cuda_graph:
        problems += _cuda_graph_problems(cfg)
    precision = str(cfg.trainer.precision)
    if precision.startswith("bf16") and not _on_gpu(cfg.trainer) and not problems \
            and not cpu_runs_in_bf16(model.cell, model.impl, precision):
        problems.append(f"trainer.precision={precision}: this CPU cannot run model.cell={model.cell} "
                        f"(model.impl={model.impl}) in bfloat16 (torch.nn.LSTM's oneDNN kernel, for one, needs AVX-512 "
                        "with BF16): use trainer.precision=32-true, or another model.impl")
    if model.bidirectional and any(isinstance(c, DictConfig) and c.get("_target_") == "rnnlm.diagnostics.GradientFlow"
                                   for c in cfg.callbacks.values()):
        from rnnlm.diagnostics import BIDIRECTIONAL

        problems.append(BIDIRECTIONAL)
    for flag, callback in (("enable_progress_bar", "progress_bar"), ("enable_model_summary", "model_summary")):
        if cfg.trainer[flag] is False and callback in cfg.callbacks:  # Lightning refuses the pair
            problems.append(f"trainer.{flag}=false: also remove the callback with ~callbacks.{callback}")
    if problems:
        raise ConfigError("; ".join(problems))
    _check_memory(cfg, 0, "the recurrent layers alone")  # the vocabulary's share is known later


def _bpe_problems(data: DictConfig) -> list[str]:
    problems = []
    if importlib.util.find_spec("tokenizers") is None:
        from rnnlm.bpe import INSTALL

        problems.append(f"data.level=bpe needs the tokenizers package: {INSTALL}")
    for key, default in (("min_freq", 1), ("max_size", None)):
        if data[key] != default:
            problems.append(f"data.{key}={shown(data[key])} limits word and char vocabularies; a bpe vocabulary's size "
                            f"is data.bpe_vocab_size: drop data.{key}")
    return problems


def _recall_problems(data: DictConfig) -> list[str]:
    recall, problems = data.recall, []
    if data.path:
        problems.append(f"data.path={data.path} and data.recall (the synthetic task, data=recall) are two corpora: "
                        "drop one (data.recall=null reads the file)")
    length = recall.distance + 3  # with the line end
    if data.mode == "sentence" and length > data.seq_len:
        problems.append(f"data.recall.distance={recall.distance} makes lines of {length} tokens, longer than "
                        f"data.seq_len={data.seq_len}: set data.seq_len={length} or more")
    if recall["keys"] > recall.examples[0]:  # most keys would never be seen with their answer in training
        problems.append(f"data.recall.keys={recall['keys']} is more than the {recall.examples[0]} training lines "
                        "(data.recall.examples[0]): most keys could never be learned; use fewer keys or more lines")
    return problems


def _on_gpu(trainer: DictConfig) -> bool:
    accelerator = str(trainer.accelerator).lower()
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


@functools.cache
def cpu_runs_in_bf16(cell: str, impl: str, precision: str) -> bool:
    """Whether this CPU runs a tiny layer of the cell forward in bfloat16 (oneDNN's LSTM refuses without AVX-512
    BF16, deep inside the first validation step)."""
    layer, inputs = cell_class(cell, impl)(2, 2), torch.zeros(1, 2, 2)
    state = layer.zero_state(1, inputs)
    try:
        with torch.no_grad():
            if precision == "bf16-mixed":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    layer(inputs, state)
            else:
                layer.to(torch.bfloat16)(inputs.to(torch.bfloat16), tuple(s.to(torch.bfloat16) for s in state))
    except RuntimeError:
        return False
    return True


def _device_problems(trainer: DictConfig) -> list[str]:
    """``trainer.devices`` and ``trainer.strategy`` against what this machine has (the schema checked their types)."""
    from lightning.pytorch.strategies import StrategyRegistry

    problems = []
    strategy = trainer.get("strategy", "auto")
    strategies = ["auto", *StrategyRegistry.available_strategies()]
    if isinstance(strategy, str) and strategy not in strategies:
        problems.append(f"trainer.strategy={strategy} is not a strategy: use one of auto, ddp, ddp_spawn, fsdp, "
                        "deepspeed, ... (lightning.pytorch.strategies.StrategyRegistry lists them)")
    devices, accelerator = trainer.devices, str(trainer.accelerator).lower()
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus):
        indices = [int(i) for i in str(devices).split(",") if i] if isinstance(devices, str) and devices != "auto" \
            else list(devices) if not isinstance(devices, (int, str)) else []
        if (isinstance(devices, int) and devices > gpus) or any(i >= gpus for i in indices):
            problems.append(f"trainer.devices={devices} but this machine has {gpus} GPU(s): use 1 to {gpus}, -1 "
                            "for all, or indices below that")
    elif accelerator in ("cpu", "auto") and not (devices == "auto" or (isinstance(devices, int) and 1 <= devices)):
        problems.append(f"trainer.devices={devices}: on the CPU give a number of processes (1 for one, 2 or more "
                        "for DDP on CPU), or auto")
    elif accelerator in ("cpu", "auto") and isinstance(devices, int) and devices > 4 * (os.cpu_count() or 1):
        problems.append(f"trainer.devices={devices} processes on a machine with {os.cpu_count()} CPU cores: give "
                        f"at most {4 * (os.cpu_count() or 1)}")
    return problems


def _cuda_graph_problems(cfg: DictConfig) -> list[str]:
    trainer, problems = cfg.trainer, []
    accelerator = str(trainer.accelerator).lower()
    if accelerator not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
        problems.append("model.cuda_graph=true needs a CUDA GPU: add trainer=gpu on a machine with one, or drop it")
    if str(trainer.precision) not in ("32-true", "32", "bf16-mixed", "bf16-true"):
        problems.append(f"model.cuda_graph=true works with trainer.precision=32-true or bf16-mixed, not "
                        f"{trainer.precision} (its loss scaler checks for overflow on the host every step)")
    if trainer.accumulate_grad_batches != 1:
        problems.append("model.cuda_graph=true takes one optimizer step per batch: "
                        "set trainer.accumulate_grad_batches=1")
    if trainer.devices not in (1, "1", [0]) or trainer.get("num_nodes", 1) != 1:
        problems.append("model.cuda_graph=true trains on one GPU: set trainer.devices=1 (or drop model.cuda_graph "
                        "for multi-GPU training)")
    if trainer.gradient_clip_algorithm not in ("norm", "value"):
        problems.append(f"trainer.gradient_clip_algorithm={trainer.gradient_clip_algorithm} must be norm or value")
    if cfg.model.softmax == "adaptive":
        problems.append("model.cuda_graph=true needs model.softmax=full: the adaptive softmax picks each token's "
                        "cluster on the host, which a recorded graph cannot")
    return problems


def check_model_memory(cfg: DictConfig, vocab_size: int) -> None:
    """Raise :class:`ConfigError` when the model's parameters, gradients and optimizer state cannot fit in the
    memory of the device it would train on (before an allocation fails somewhere deep in torch)."""
    _check_memory(cfg, vocab_size, "the model")


def count_parameters(model: DictConfig | NetworkConfig, vocab_size: int) -> int:
    """The parameters of the :class:`~rnnlm.network.LanguageModel` that ``model`` (conf/model, or a network's
    config) describes, counted on the network built on the meta device (no memory, no time); with ``vocab_size`` 0
    (not known yet), those of its recurrent stacks alone."""
    settings = dict((model.settings() if isinstance(model, NetworkConfig) else model).items())
    if not vocab_size:  # no decoder counted: the full one fits a vocabulary of one token, the adaptive one may not
        settings["softmax"] = "full"
    config = NetworkConfig.from_settings(settings, vocab_size=max(vocab_size, 1))
    if vocab_size:
        return on_meta(lambda: LanguageModel(config)).num_parameters()
    stack = on_meta(lambda: RecurrentStack(config.cell, config.embedding_dim or 1, config.hidden_size,
                                           config.num_layers, impl=config.impl, cell_settings=config.cell_settings))
    return sum(p.numel() for p in stack.parameters()) * (2 if config.bidirectional else 1)


def layer_parameters(cell: str, input_size: int, hidden: int, impl: str = "fused") -> int:
    """The parameters of one layer (one direction) of ``cell``, ``hidden`` units wide, reading ``input_size`` inputs:
    counted on the cell built on the meta device."""
    return sum(p.numel() for p in on_meta(lambda: cell_class(cell, impl)(input_size, hidden)).parameters())


def equal_budget(cell: str, input_size: int, lstm_units: int) -> int:
    """The hidden size that gives a one-layer ``cell`` about the recurrent parameters of an LSTM of ``lstm_units``
    reading ``input_size`` inputs (``${rnnlm.equal_budget:cell,input,units}`` in the configs), so that cells are
    compared at the same budget. A layer's count is a polynomial of at most second degree in its width (H x H
    matrices, H x I matrices, biases), read off three built layers and solved for the budget."""
    budget = layer_parameters("lstm", input_size, lstm_units)
    c1, c2, c3 = (layer_parameters(cell, input_size, h) for h in (1, 2, 3))
    a = (c3 - 2 * c2 + c1) / 2  # count(H) = a H^2 + b H + c
    b = c2 - c1 - 3 * a
    c = c1 - a - b
    if a == 0:
        return max(1, round((budget - c) / b))
    return max(1, round((-b + math.sqrt(b * b - 4 * a * (c - budget))) / (2 * a)))


def per_cell(cell: str, values: Mapping) -> Any:
    """The setting in ``values`` for ``cell`` (``${rnnlm.per_cell:${model.cell},{rnn: 0.001, gru: 0.003}}`` in the
    configs): what suits each cell, such as the learning rates experiment=long_range found for each.

    Raises:
        ConfigError: ``values`` has no setting for ``cell``.
    """
    if cell not in values:
        raise ConfigError(f"the config has a value for model={', '.join(values)} only, not for model.cell={cell}: "
                          "give one on the command line")
    return values[cell]


def _memory(cfg: DictConfig) -> tuple[int, str]:
    """Bytes of memory of the device the run trains on, and its name for messages."""
    if _on_gpu(cfg.trainer):
        return torch.cuda.get_device_properties(0).total_memory, "the GPU has"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"


def _check_memory(cfg: DictConfig, vocab_size: int, what: str) -> None:
    needed = count_parameters(cfg.model, vocab_size) * BYTES_PER_PARAMETER
    available, where = _memory(cfg)
    if needed > available:
        sizes = [f"model.{key}={shown(cfg.model[key])}" for key in ("embedding_dim", "hidden_size", "num_layers",
                                                             "projection_size") if cfg.model.get(key)]
        raise ConfigError(
            f"{what} ({', '.join(sizes)}{f', {vocab_size:,} tokens' if vocab_size else ''}) would need about "
            f"{needed / 2**30:,.1f} GiB for the weights, gradients and optimizer state, but {where} "
            f"{available / 2**30:,.1f} GiB: lower {', '.join(s.partition('=')[0] for s in sizes)}"
            + (" or the vocabulary (data.max_size)" if vocab_size else "")
        )


def check_eval_config(cfg: DictConfig) -> None:
    check_settings(cfg, "eval")


def check_score_config(cfg: DictConfig) -> None:
    check_settings(cfg, "score")
    if (cfg.text is None) == (cfg.text_file is None):
        raise ConfigError("give text=... (with candidates=[...] to fill a blank) or text_file=FILE, one of the two")


def check_generate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem in the sampling settings."""
    check_settings(cfg, "generate")
    problems: list[str] = []
    if not cfg.greedy and not cfg.temperature > 0:
        problems.append(f"temperature={cfg.temperature} must be > 0 (or set greedy=true)")
    if cfg.prompt and cfg.prompt_file:
        problems.append("give prompt=... or prompt_file=..., not both")
    if problems:
        raise ConfigError("; ".join(problems))


def check_export_config(cfg: DictConfig) -> None:
    check_settings(cfg, "export")


def check_inspect_config(cfg: DictConfig) -> None:
    check_settings(cfg, "inspect")
    if (cfg.text is None) == (cfg.text_file is None):
        raise ConfigError("give text=... or text_file=FILE, one of the two")


CHECKS = {"train": check_train_config, "eval": check_eval_config, "generate": check_generate_config,
          "score": check_score_config, "export": check_export_config, "inspect": check_inspect_config}
