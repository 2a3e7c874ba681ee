"""Check a composed config before any work starts, so a mistake costs one line, not a run."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from rnnlm.backbone import CELLS, IMPLS, NONLINEARITIES
from rnnlm.corpora import CORPORA
from rnnlm.datamodule import MODES
from rnnlm.vocab import LEVELS

TASKS = ("lm", "bilm")


class ConfigError(Exception):
    """An invalid setting; the message names the key and how to fix it."""


def _positive(problems: list[str], key: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        extra = " or null" if allow_none else ""
        problems.append(f"{key}={value} must be a positive integer{extra}")


def check_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem in the model and data settings."""
    problems: list[str] = []
    model, data = cfg.model, cfg.data
    if model.cell not in CELLS:
        problems.append(f"model.cell={model.cell} is unknown: use model={'|'.join(CELLS)}")
    _positive(problems, "model.hidden_size", model.hidden_size)
    _positive(problems, "model.num_layers", model.num_layers)
    _positive(problems, "model.embedding_dim", model.embedding_dim, allow_none=True)
    if not 0 <= model.dropout < 1:
        problems.append(f"model.dropout={model.dropout} must be in [0, 1)")
    if model.nonlinearity not in NONLINEARITIES:
        problems.append(f"model.nonlinearity={model.nonlinearity} must be one of {'|'.join(NONLINEARITIES)}")
    decoder_input = model.hidden_size * (2 if model.bidirectional else 1)
    if model.tie_weights and model.embedding_dim != decoder_input:
        problems.append(
            f"model.tie_weights=true needs model.embedding_dim ({model.embedding_dim}) == the decoder's input "
            f"size ({decoder_input}): set model.embedding_dim={decoder_input} or model.tie_weights=false"
        )
    if model.impl not in IMPLS:
        problems.append(f"model.impl={model.impl} must be one of {'|'.join(IMPLS)}")
    if model.cell == "gru" and not model.reset_after and model.impl != "scratch":
        problems.append("model.reset_after=false (the original GRU) has no fused kernel: add model.impl=scratch")
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
    if data.mode not in MODES:
        problems.append(f"data.mode={data.mode} must be one of {'|'.join(MODES)}")
    for key in ("seq_len", "batch_size", "eval_batch_size", "min_freq"):
        _positive(problems, f"data.{key}", data[key])
    _positive(problems, "data.max_size", data.max_size, allow_none=True)
    if not data.path and data.corpus not in CORPORA:
        problems.append(f"data.corpus={data.corpus} is unknown: use one of {'|'.join(CORPORA)} or data.path=FILE")
    split = list(data.split)
    if len(split) != 3 or any(f < 0 for f in split) or sum(split) > 1 + 1e-9:
        problems.append(f"data.split={split} must be three fractions (train, valid, test) summing to at most 1")
    if problems:
        raise ConfigError("; ".join(problems))


def _require_checkpoint(problems: list[str], cfg: DictConfig) -> None:
    if not cfg.ckpt_path:
        problems.append("ckpt_path is required: ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt")


def check_generate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem in the sampling settings."""
    problems: list[str] = []
    _require_checkpoint(problems, cfg)
    if not isinstance(cfg.max_new_tokens, int) or cfg.max_new_tokens < 0:
        problems.append(f"max_new_tokens={cfg.max_new_tokens} must be an integer >= 0")
    _positive(problems, "num_samples", cfg.num_samples)
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
