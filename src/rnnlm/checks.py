"""Check a composed config before any work starts, so a mistake costs one line, not a run."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rnnlm.backbone import CELLS
from rnnlm.corpora import CORPORA
from rnnlm.errors import ConfigError, positive_integer, positive_number
from rnnlm.minrnn import MIN_CELLS
from rnnlm.network import NetworkConfig, adaptive_cutoffs
from rnnlm.vocab import LEVELS

TASKS = ("lm", "bilm")
# weight blocks per layer: one per gate and candidate; minGRU's and minLSTM's read the input alone
GATES = {"rnn": 1, "lstm": 4, "gru": 3, "mingru": 2, "minlstm": 3}
# float32 weights, their gradients and the optimizer's two moments (AdamW; SGD with momentum keeps one)
BYTES_PER_PARAMETER = 4 * 4


def check_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem in the model, data, optimizer and trainer settings."""
    from rnnlm.datamodule import MODES  # imports Lightning, which only training needs

    missing = sorted(OmegaConf.missing_keys(cfg))
    if "model.cell" in missing:
        raise ConfigError("model.cell is not set (model=_recurrent is the base the model files share): "
                          f"use model={'|'.join(CELLS)}")
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set (??? in the config): add {missing[0]}=...")
    problems: list[str] = []
    model, data = cfg.model, cfg.data
    problems += NetworkConfig.problems_of(model)
    if cfg.task not in TASKS:
        problems.append(f"task={cfg.task} must be one of {'|'.join(TASKS)}")
    elif model.bidirectional and cfg.task != "bilm":
        problems.append("a bidirectional model would see the token it predicts, so it cannot be a causal LM: "
                        "use task=bilm (or model.bidirectional=false)")
    elif cfg.task == "bilm" and not model.bidirectional:
        problems.append("task=bilm needs model.bidirectional=true")
    elif cfg.task == "bilm" and data.mode != "stream":
        problems.append("task=bilm reads fixed windows: use data.mode=stream")
    if data.level not in LEVELS:
        problems.append(f"data.level={data.level} must be one of {'|'.join(LEVELS)}")
    elif model.softmax == "adaptive" and data.level != "word":
        problems.append("model.softmax=adaptive clusters ids by frequency, as word vocabularies are ordered; a char "
                        "vocabulary is ordered by code point: use data=word, or model.softmax=full")
    if data.mode not in MODES:
        problems.append(f"data.mode={data.mode} must be one of {'|'.join(MODES)}")
    for key in ("seq_len", "batch_size", "eval_batch_size", "min_freq"):
        positive_integer(problems, f"data.{key}", data[key])
    positive_integer(problems, "data.max_size", data.max_size, allow_none=True)
    if not isinstance(data.get("variable_seq_len", False), bool):
        problems.append(f"data.variable_seq_len={data.variable_seq_len} must be true or false")
    elif data.get("variable_seq_len"):
        if data.mode != "stream":
            problems.append("data.variable_seq_len=true varies the length of stream chunks: use data.mode=stream")
        elif isinstance(data.seq_len, int) and data.seq_len < 10:
            problems.append(f"data.variable_seq_len=true draws lengths around data.seq_len={data.seq_len} with a "
                            "spread of 5 steps: set data.seq_len=10 or more")
        if model.get("cuda_graph"):
            problems.append("data.variable_seq_len=true gives chunks of many lengths, and model.cuda_graph replays "
                            "one: drop one of them")
    for key in ("activation_reg", "temporal_activation_reg"):
        value = model.get(key, 0.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            problems.append(f"model.{key}={value} must be a number >= 0")
    if data.get("scored", "all") not in ("all", "last"):
        problems.append(f"data.scored={data.scored} must be all or last")
    elif data.get("scored") == "last" and data.mode != "sentence":
        problems.append("data.scored=last scores each line's last word: use data.mode=sentence")
    if data.get("recall"):
        recall = data.recall
        if data.path:
            problems.append(f"data.path={data.path} and data.recall (the synthetic task, data=recall) are two corpora: "
                            "drop one (data.recall=null reads the file)")
        positive_integer(problems, "data.recall.distance", recall.get("distance"))
        positive_integer(problems, "data.recall.keys", recall.get("keys"))
        positive_integer(problems, "data.recall.noise", recall.get("noise"))
        length = recall.distance + 3 if isinstance(recall.get("distance"), int) else 0  # with the line end
        if data.mode == "sentence" and length > data.seq_len:
            problems.append(f"data.recall.distance={recall.distance} makes lines of {length} tokens, longer than "
                            f"data.seq_len={data.seq_len}: set data.seq_len={length} or more")
    elif not data.path and data.corpus not in CORPORA:
        problems.append(f"data.corpus={data.corpus} is unknown: use one of {'|'.join(CORPORA)} or data.path=FILE")
    split = list(data.split)
    if len(split) != 3 or any(f < 0 for f in split) or sum(split) > 1 + 1e-9:
        problems.append(f"data.split={split} must be three fractions (train, valid, test) summing to at most 1")
    if not isinstance(data.holdout, bool):
        problems.append(f"data.holdout={data.holdout} must be true (validate on held-out text) or false "
                        "(validate on the training text)")
    if cfg.seed is not None and (not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool)):
        problems.append(f"seed={cfg.seed} must be an integer (or null for a random one)")
    positive_number(problems, "optimizer.lr", cfg.optimizer.lr)
    if "nonmono" in cfg.optimizer:  # optimizer=ntasgd
        positive_integer(problems, "optimizer.nonmono", cfg.optimizer.nonmono)
    decay = cfg.optimizer.get("weight_decay", 0.0)
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not decay >= 0:
        problems.append(f"optimizer.weight_decay={decay} must be a number >= 0")
    if str(cfg.trainer.accelerator).lower() in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append(f"trainer.accelerator={cfg.trainer.accelerator} but no GPU is available: use trainer=cpu, "
                        "or trainer=default (a GPU when there is one)")
    if model.get("cuda_graph"):
        problems += _cuda_graph_problems(cfg)
    for flag, callback in (("enable_progress_bar", "progress_bar"), ("enable_model_summary", "model_summary")):
        if cfg.trainer[flag] is False and callback in cfg.callbacks:  # Lightning refuses the pair
            problems.append(f"trainer.{flag}=false: also remove the callback with ~callbacks.{callback}")
    if problems:
        raise ConfigError("; ".join(problems))
    _check_memory(cfg, 0, "the recurrent layers alone")  # the vocabulary's share is known later


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


def count_parameters(model: DictConfig, vocab_size: int) -> int:
    """The parameters of the :class:`~rnnlm.network.LanguageModel` that ``model`` (rnnlm/conf/model) describes, with
    torch.nn's two biases per gate (the scratch cells keep one: a few hundred fewer; minGRU and minLSTM have one
    in both implementations)."""
    hidden, layers = model.hidden_size, model.num_layers
    directions = 2 if model.bidirectional else 1  # a bidirectional LM has a second, backward stack
    embedding = vocab_size * model.embedding_dim if model.embedding_dim else 0
    inputs = [model.embedding_dim or vocab_size] + [hidden] * (layers - 1)
    stack = sum(layer_parameters(model.cell, i, hidden) for i in inputs)
    features = hidden * directions
    projection = getattr(model, "projection_size", None)  # settings from before the option lack it
    if projection:  # a linear map (with a bias) from the stack's outputs to what the decoder reads
        stack_out, features = features * projection + projection, projection
    else:
        stack_out = 0
    if model.softmax == "adaptive" and vocab_size:
        cutoffs = [*adaptive_cutoffs(vocab_size, model.adaptive_cutoffs), vocab_size]
        # the head (no bias) scores the first cutoffs[0] ids and one entry per cluster; cluster i projects
        # down to features / div**(i+1), then out to its ids (neither with a bias), as torch.nn does
        decoder = features * (cutoffs[0] + len(cutoffs) - 1)
        for i in range(len(cutoffs) - 1):
            width = int(features // (model.adaptive_div_value ** (i + 1)))
            decoder += width * (features + cutoffs[i + 1] - cutoffs[i])
    else:
        decoder = (0 if model.tie_weights else features * vocab_size) + vocab_size
    return embedding + directions * stack + stack_out + decoder


def layer_parameters(cell: str, input_size: int, hidden: int) -> int:
    """Weights and biases of one recurrent layer (one direction) of ``hidden`` units reading ``input_size`` inputs:
    W_ih (G*H, I), W_hh (G*H, H) and torch.nn's two biases, or for minGRU / minLSTM W_x (G*H, I) and one bias."""
    if cell in MIN_CELLS:
        return GATES[cell] * hidden * (input_size + 1)
    return GATES[cell] * hidden * (input_size + hidden + 2)


def equal_budget(cell: str, input_size: int, lstm_units: int) -> int:
    """The hidden size that gives a one-layer ``cell`` about the recurrent parameters of an LSTM of ``lstm_units``
    reading ``input_size`` inputs (``${rnnlm.equal_budget:cell,input,units}`` in the configs), so that cells are
    compared at the same budget (:func:`layer_parameters`)."""
    budget = layer_parameters("lstm", input_size, lstm_units)
    if cell in MIN_CELLS:  # G * H * (I + 1): linear in H, as there is no H x H matrix
        return max(1, round(budget / (GATES[cell] * (input_size + 1))))
    b = input_size + 2  # G * H * (I + H + 2) = budget: solve H^2 + b H = budget / G
    return max(1, round((-b + math.sqrt(b * b + 4 * budget / GATES[cell])) / 2))


def _memory(cfg: DictConfig) -> tuple[int, str]:
    """Bytes of memory of the device the run trains on, and its name for messages."""
    accelerator = str(cfg.trainer.accelerator).lower()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_properties(0).total_memory, "the GPU has"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"


def _check_memory(cfg: DictConfig, vocab_size: int, what: str) -> None:
    needed = count_parameters(cfg.model, vocab_size) * BYTES_PER_PARAMETER
    available, where = _memory(cfg)
    if needed > available:
        raise ConfigError(
            f"{what} (model.hidden_size={cfg.model.hidden_size}, model.num_layers={cfg.model.num_layers}"
            f"{f', {vocab_size:,} tokens' if vocab_size else ''}) would need about {needed / 2**30:,.1f} GiB for the "
            f"weights, gradients and optimizer state, but {where} {available / 2**30:,.1f} GiB: lower "
            "model.hidden_size or model.num_layers" + (" or the vocabulary (data.max_size)" if vocab_size else "")
        )


def check_generate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem in the sampling settings."""
    problems: list[str] = []
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        problems.append(f"seed={cfg.seed} must be an integer")
    if not isinstance(cfg.max_new_tokens, int) or cfg.max_new_tokens < 0:
        problems.append(f"max_new_tokens={cfg.max_new_tokens} must be an integer >= 0")
    positive_integer(problems, "num_samples", cfg.num_samples)
    if not cfg.greedy and not cfg.temperature > 0:
        problems.append(f"temperature={cfg.temperature} must be > 0 (or set greedy=true)")
    if cfg.top_k is not None and (not isinstance(cfg.top_k, int) or cfg.top_k < 1):
        problems.append(f"top_k={cfg.top_k} must be an integer >= 1 (or null)")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        problems.append(f"top_p={cfg.top_p} must be in (0, 1] (or null)")
    if cfg.prompt and cfg.prompt_file:
        problems.append("give prompt=... or prompt_file=..., not both")
    if cfg.prompt_file and not Path(cfg.prompt_file).is_file():
        problems.append(f"prompt_file={cfg.prompt_file} does not exist")
    if problems:
        raise ConfigError("; ".join(problems))
