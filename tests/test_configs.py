"""Every file under conf/ composes and instantiates; every experiment trains a few steps."""

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rnnlm.cells import BUILT_IN, setting_defaults
from rnnlm.checkpoint import CHECKPOINT_KEY
from rnnlm.checks import count_parameters
from rnnlm.commands.cli import CONF_DIR
from rnnlm.commands.train import lightning_trainer, train
from rnnlm.errors import ConfigError
from rnnlm.network import NetworkConfig


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_every_group_has_its_files():
    assert choices("model") == ["gru", "lstm", "mingru", "minlstm", "rnn"]
    assert choices("data") == ["bpe", "char", "recall", "word"]
    assert choices("trainer") == ["cpu", "ddp", "default", "gpu"]
    assert {"shakespeare_char", "ptb_word"} <= set(choices("experiment"))


@pytest.mark.parametrize(
    "group,choice",
    [(g, c) for g in ("model", "data", "trainer", "logger", "callbacks", "optimizer", "scheduler", "debug",
                      "experiment") for c in choices(g)],
)
def test_config_composes_and_instantiates(make_cfg, group, choice):
    cfg = make_cfg(f"{group}={choice}", tiny=False)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    if group in ("trainer", "model", "data", "optimizer") or (group == "scheduler" and cfg.scheduler):
        assert instantiate(cfg[group], _partial_=True) is not None
    if group in ("logger", "callbacks"):
        assert all(instantiate(c) is not None for c in cfg[group].values())


def test_model_choice_sets_the_cell(make_cfg):
    for cell in ("rnn", "lstm", "gru"):
        assert make_cfg(f"model={cell}").model.cell == cell


def test_struct_mode_rejects_a_misspelled_override(make_cfg):
    with pytest.raises(Exception, match="hidden_sise"):
        make_cfg("model.hidden_sise=10")


@pytest.mark.parametrize("experiment", choices("experiment"))
def test_every_experiment_runs_a_few_steps(make_cfg, experiment, tiny_corpus):
    # the recall task makes its own text: short lines, few of them
    data = (["data.recall.distance=5", "data.recall.examples=[40,10,10]"] if experiment == "long_range"
            else [f"data.path={tiny_corpus}"])
    cfg = make_cfg(f"experiment={experiment}", *data, "trainer.max_steps=2",
                   "test=false", "model.num_layers=1", "model.hidden_size=16", "model.embedding_dim=16")
    metrics = train(cfg)
    assert metrics["val/loss"] > 0


def test_the_awd_lstm_preset_has_the_papers_layers(make_cfg):
    model = make_cfg("experiment=ptb_awd_lstm", tiny=False).model
    assert list(model.hidden_size) == [1150, 1150, 400] and model.embedding_dim == 400 and model.tie_weights
    assert model.projection_size is None
    assert count_parameters(model, 10_000) == 24_221_600  # PTB's 10,000 words; the paper says 24M


@pytest.mark.parametrize("override", ["model=transformer", "data=bytes", "trainer=tpu"])
def test_unknown_choice_is_rejected_with_the_options(make_cfg, override):
    with pytest.raises(Exception, match=r"Could not find '\w+/\w+'"):
        make_cfg(override)


def test_trainer_options_in_the_yaml_keep_lightning_defaults(make_cfg):
    cfg = make_cfg("trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0")  # no `+` needed
    assert cfg.trainer.limit_val_batches == 0
    ours = instantiate(lightning_trainer(make_cfg(tiny=False).trainer), accelerator="cpu", logger=False,
                       default_root_dir=None)
    plain = L.Trainer(accelerator="cpu", logger=False, devices=1)
    for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "num_sanity_val_steps",
                 "accumulate_grad_batches", "fast_dev_run", "overfit_batches"):
        assert getattr(ours, name) == getattr(plain, name), name
    assert (ours.progress_bar_callback is None) == (plain.progress_bar_callback is None)


@pytest.mark.parametrize("cell", list(BUILT_IN))
def test_the_model_settings_are_the_network_configs_fields_and_the_cells_own(make_cfg, cell):
    model = make_cfg(f"model={cell}").model
    fields = {f.name for f in dataclasses.fields(NetworkConfig)} - {"vocab_size", "cell_settings"}
    how_it_trains = {"_target_", "compile", "cuda_graph", "activation_reg", "temporal_activation_reg"}
    own = setting_defaults(BUILT_IN[cell]["fused"])
    assert set(model) - how_it_trains == fields | set(own)  # one YAML line per field and per setting of the cell
    assert {name: model[name] for name in own} == own  # conf/model/<cell>.yaml has the class's defaults
    for form in BUILT_IN[cell].values():  # both forms declare the same settings
        assert setting_defaults(form) == own
    built = NetworkConfig.from_settings(model, vocab_size=57)
    assert built == NetworkConfig(vocab_size=57, **{name: model[name] for name in fields}, cell_settings=own)


def test_a_network_config_checks_itself_and_cannot_change():
    with pytest.raises(ConfigError,
                       match=r"model.dropout=1.5 must be a number in \[0, 1\); model.impl=cuda must be one of"):
        NetworkConfig(vocab_size=10, dropout=1.5, impl="cuda")
    with pytest.raises(dataclasses.FrozenInstanceError):
        NetworkConfig(vocab_size=10).hidden_size = 3


def test_a_checkpoint_stores_the_network_once(make_cfg, tiny_corpus):
    cfg = make_cfg(f"data.path={tiny_corpus}", "trainer.max_steps=2", "test=false", "model=gru")
    train(cfg)
    data = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert "hyper_parameters" not in data
    assert NetworkConfig.from_settings(data[CHECKPOINT_KEY]["network"]).cell == "gru"


@pytest.mark.parametrize("override", ["hydra/launcher=slurm", "hydra/launcher=submitit_local",
                                      "hydra/launcher=joblib", "hparams_search=optuna",
                                      "hparams_search=long_range"])
def test_sweep_settings_compose_and_name_installed_plugins(override):
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import _locate

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[override], return_hydra_config=True)
    OmegaConf.resolve(cfg.hydra.sweeper)
    node = cfg.hydra.sweeper if override.startswith("hparams_search") else cfg.hydra.launcher
    assert _locate(node._target_) is not None  # the plugin is installed and the class is where the config says
    if override == "hparams_search=optuna":
        assert {"optimizer.lr", "model.dropout"} <= set(cfg.hydra.sweeper.params)
    if override == "hparams_search=long_range":  # one seed, one distance; what suits each cell
        assert set(cfg.hydra.sweeper.params) == {"seed", "data.recall.distance", "optimizer.lr",
                                                 "trainer.gradient_clip_val", "model.init_range"}
