"""Pinned numbers of whole training runs: tiny seeded runs through ``train()``, whose logged losses and final
weights were recorded from the training loop before it learned to train several chunks per Lightning call
(one ``training_step`` per chunk, Lightning's automatic optimization). A change that moves any of them changes
what training computes, whatever ``trainer.chunks_per_call`` is.

Regenerate (only when a change is meant to move them): ``python tests/test_pinned_training.py FILE`` writes them
to FILE as JSON.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, SHARED_DATA, compose_train, scalars, write_tiny_corpus

# 24 steps of a tiny char LSTM with dropout, validated every 8 steps; each case adds what it pins.
COMMON = ["model.dropout=0.2", "trainer.max_steps=24", "trainer.max_epochs=3", "trainer.val_check_interval=8",
          "trainer.limit_val_batches=3", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=4",
          "test=false", "~callbacks.text_samples", "~callbacks.progress_bar"]
CASES = {
    "stream": [],
    "variable-bptt-ar-tar": ["data.variable_seq_len=true", "model.activation_reg=2.0",
                             "model.temporal_activation_reg=1.0"],
    # averaging starts at the 4th validation (step 12)
    "ntasgd-weight-drop": ["optimizer=ntasgd", "optimizer.lr=30", "optimizer.nonmono=1", "scheduler=none",
                           "model.weight_drop=0.3", "trainer.val_check_interval=3", "trainer.gradient_clip_val=0.25"],
    "accumulate": ["trainer.accumulate_grad_batches=2", "trainer.max_steps=12", "trainer.val_check_interval=10"],
    "epochs-step-scheduler": ["trainer.limit_train_batches=7", "trainer.val_check_interval=null", "scheduler=step",
                              "trainer.max_steps=-1"],
    "sentence": ["data.mode=sentence", "data.batch_size=8", "trainer.val_check_interval=null",
                 "trainer.limit_train_batches=12", "trainer.max_steps=-1", "trainer.max_epochs=2"],
}


def fingerprint(run: Path) -> dict:
    """What a user sees of a run: its logged training and validation losses (and whether NT-ASGD averages), its step
    count, and its final weights (each parameter's sum and sum of squares, in float64)."""
    logged = scalars(run)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    weights = {name: [float(w.double().sum()), float(w.double().square().sum())]
               for name, w in sorted(checkpoint["state_dict"].items()) if w.is_floating_point()}
    return {"train_loss": logged["train/loss"], "val_loss": logged.get("val/loss", []),
            "averaging": logged.get("train/averaging", []),
            "global_step": checkpoint["global_step"], "weights": weights}


def run_case(case: str, folder: Path, corpus: Path, cache_dir: Path, *extra: str) -> dict:
    from rnnlm.commands.train import train  # imports Lightning: only tests that train pay for it

    run = folder / case
    train(compose_train([f"data.path={corpus}", *COMMON, *CASES[case], *extra], run, SHARED_DATA, cache_dir))
    return fingerprint(run)


def assert_same(got: dict, expected: dict, case: str) -> None:
    assert got["global_step"] == expected["global_step"], case
    assert got["averaging"] == expected["averaging"], case
    assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5), f"{case}: train/loss"
    assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5), f"{case}: val/loss"
    assert got["weights"].keys() == expected["weights"].keys(), case
    for name, sums in expected["weights"].items():
        assert got["weights"][name] == pytest.approx(sums, rel=1e-5, abs=1e-6), f"{case}: {name}"


# Recorded from the loop before chunks_per_call (one training_step per chunk, automatic optimization).
PINNED: dict[str, dict] = {'stream': {'train_loss': [3.3244733810424805, 3.3179123401641846, 3.294476270675659,
                                                   3.2746851444244385,
                           3.268599033355713, 3.195582389831543],
            'val_loss': [3.3088550567626953, 3.273866653442383, 3.1999926567077637],
            'averaging': [],
            'global_step': 24,
            'weights': {'net.backbone.cells.0.bias_hh': [3.569221278419718, 1.5748697961144529],
                        'net.backbone.cells.0.bias_ih': [1.622458738507703, 1.5078359129902403],
                        'net.backbone.cells.0.weight_hh': [-7.706577119592112, 46.51555551008975],
                        'net.backbone.cells.0.weight_ih': [0.9507066945661791, 22.828399152157566],
                        'net.decoder.bias': [-0.4006716636940837, 0.023030244285585685],
                        'net.decoder.weight': [3.4992381256015506, 3.562803857718322],
                        'net.embedding.weight': [-2.4570834636397194, 2.0798722252077195]}},
 'variable-bptt-ar-tar': {'train_loss': [3.327643871307373, 3.3239734172821045, 3.309727907180786,
                                         3.306361675262451, 3.3000290393829346, 3.2904934883117676],
                          'val_loss': [3.3163681030273438, 3.3019490242004395, 3.287468433380127],
                          'averaging': [],
                          'global_step': 24,
                          'weights': {'net.backbone.cells.0.bias_hh': [0.6463051099563017, 1.2699479296950011],
                                      'net.backbone.cells.0.bias_ih': [-1.300457542296499, 1.227440840886252],
                                      'net.backbone.cells.0.weight_hh': [-11.609942921597394, 43.96471488162855],
                                      'net.backbone.cells.0.weight_ih': [5.822847196133807, 22.37717708122601],
                                      'net.decoder.bias': [-0.3290458098053932, 0.01889616764271935],
                                      'net.decoder.weight': [3.3770599222480087, 3.5074548356433706],
                                      'net.embedding.weight': [-2.5611139116517734, 1.9414846954276888]}},
 'ntasgd-weight-drop': {'train_loss': [5.32456111907959, 3.6670920848846436, 4.061776161193848, 3.776620864868164,
                                       3.6146185398101807, 4.0547356605529785],
                        'val_loss': [4.941836833953857, 3.794440746307373, 3.2871365547180176, 3.9449548721313477,
                                     3.197277069091797, 3.1802144050598145, 3.204148769378662, 3.20039701461792],
                        'averaging': [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                        'global_step': 24,
                        'weights': {'net.backbone.cells.0.bias_hh': [-58.90625995770097, 45.050996672729354],
                                    'net.backbone.cells.0.bias_ih': [-60.851726607768796, 46.14479087917394],
                                    'net.backbone.cells.0.weight_hh': [-15.608744376542745, 101.71760739550702],
                                    'net.backbone.cells.0.weight_ih': [10.6719160385328, 24.119505711546353],
                                    'net.decoder.bias': [6.742775440216064e-07, 1.6566804947771292],
                                    'net.decoder.weight': [4.046436300373898, 23.6853116644726],
                                    'net.embedding.weight': [-3.935569179164304, 4.6654541400316605]}},
 'accumulate': {'train_loss': [3.3264715671539307, 3.3056397438049316, 3.2795746326446533],
                'val_loss': [3.3155570030212402, 3.2936789989471436, 3.283081531524658],
                'averaging': [],
                'global_step': 12,
                'weights': {'net.backbone.cells.0.bias_hh': [2.2033773466246203, 1.3918042283901053],
                            'net.backbone.cells.0.bias_ih': [0.2566149365156889, 1.376214101481969],
                            'net.backbone.cells.0.weight_hh': [-8.757550106034614, 43.539454218675424],
                            'net.backbone.cells.0.weight_ih': [3.14445087974309, 21.720752585231722],
                            'net.decoder.bias': [-0.34190297219902277, 0.01165945546230035],
                            'net.decoder.weight': [3.6199937625206076, 3.25981892488033],
                            'net.embedding.weight': [-1.9859072649851441, 1.753709692624136]}},
 'epochs-step-scheduler': {'train_loss': [3.3244733810424805, 3.3161776065826416, 3.31084942817688,
                                          3.3023548126220703, 3.2924249172210693],
                           'val_loss': [3.3123269081115723, 3.2993414402008057, 3.2916500568389893],
                           'averaging': [],
                           'global_step': 21,
                           'weights': {'net.backbone.cells.0.bias_hh': [2.021254073246382, 1.3768430740760764],
                                       'net.backbone.cells.0.bias_ih': [0.07449151342734694, 1.3614466437049821],
                                       'net.backbone.cells.0.weight_hh': [-10.084343541326234, 43.256986578480564],
                                       'net.backbone.cells.0.weight_ih': [3.7546210362634156, 21.545596658336837],
                                       'net.decoder.bias': [-0.21612946735695004, 0.007093112785594424],
                                       'net.decoder.weight': [3.934944934764644, 3.1615347914138034],
                                       'net.embedding.weight': [-1.9448738021892495, 1.6707542327204392]}},
 'sentence': {'train_loss': [3.364882707595825, 3.3409838676452637, 3.3196656703948975, 3.281371831893921,
                             3.229700803756714, 3.1430861949920654],
              'val_loss': [3.34151554107666, 3.285094738006592],
              'averaging': [],
              'global_step': 24,
              'weights': {'net.backbone.cells.0.bias_hh': [2.9007000867277384, 1.466562986393829],
                          'net.backbone.cells.0.bias_ih': [2.3411525799892843, 1.6288218600539173],
                          'net.backbone.cells.0.weight_hh': [-19.468037895363523, 47.39130048487388],
                          'net.backbone.cells.0.weight_ih': [4.643859738658648, 24.205792921665655],
                          'net.decoder.bias': [-0.20460006222128868, 0.042228585825469095],
                          'net.decoder.weight': [3.624714017554652, 4.209281436486287],
                          'net.embedding.weight': [0.8666730824043043, 2.232727578610803]}}}


# Two processes (DDP on the CPU, gloo), through the command line as a user starts them.
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "model.hidden_size=32", "model.embedding_dim=16",
       "data.seq_len=8", "data.batch_size=4", "data.eval_batch_size=3", "model.dropout=0.3", "test=false",
       "trainer.max_steps=15", "trainer.val_check_interval=6", "trainer.log_every_n_steps=3", "~callbacks.progress_bar",
       "~callbacks.text_samples"]
PINNED_DDP = {'train_loss': [3.327366352081299, 3.3226401805877686, 3.2925286293029785, 3.283865451812744,
                             3.2795093059539795],
 'val_loss': [3.306002140045166, 3.2716240882873535, 3.243475914001465],
 'averaging': [],
 'global_step': 15,
 'weights': {'net.backbone.cells.0.bias_hh': [2.6171583738178015, 1.3576201881902001],
             'net.backbone.cells.0.bias_ih': [0.6703958724392578, 1.418100078568233],
             'net.backbone.cells.0.weight_hh': [-9.333984771452378, 43.94621697103217],
             'net.backbone.cells.0.weight_ih': [7.9213422986795194, 21.645887170470807],
             'net.backbone.cells.1.bias_hh': [0.05995911872014403, 1.5665842976701827],
             'net.backbone.cells.1.bias_ih': [1.7665955752599984, 1.4555068730308922],
             'net.backbone.cells.1.weight_hh': [15.614488471415825, 45.213314598836334],
             'net.backbone.cells.1.weight_ih': [1.1490782077380572, 44.14412500691657],
             'net.decoder.bias': [-0.2036127126775682, 0.007815809036351394],
             'net.decoder.weight': [-1.070418297429569, 3.22922613152882],
             'net.embedding.weight': [2.468480437528342, 1.545326967979964]}}


def run_ddp(run: Path, corpus: Path, cache_dir: Path, *extra: str) -> dict:
    args = [*DDP, f"data.path={corpus}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}", *extra]
    done = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *args], cwd=run.parent,
                          env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return fingerprint(run)


@pytest.mark.parametrize("case", list(CASES))
def test_a_seeded_run_computes_what_it_computed_before(case, tmp_path, session_corpus, cache_dir):
    assert_same(run_case(case, tmp_path, session_corpus, cache_dir), PINNED[case], case)


def test_a_seeded_ddp_run_computes_what_it_computed_before(tmp_path, session_corpus, cache_dir):
    assert_same(run_ddp(tmp_path / "run", session_corpus, cache_dir), PINNED_DDP, "ddp")


if __name__ == "__main__":  # PINNED from the code as it is, as JSON in the file named
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_tiny_corpus(Path(tmp))
        pinned = {case: run_case(case, Path(tmp) / "runs", corpus, Path(tmp) / "cache") for case in CASES}
        pinned["ddp"] = run_ddp(Path(tmp) / "ddp", corpus, Path(tmp) / "cache")
    Path(sys.argv[1]).write_text(json.dumps(pinned, indent=1))
