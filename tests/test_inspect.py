"""rnnlm-inspect: the surprisal of each token sums to the loss rnnlm-score reports, for every built-in cell at every
level; the units are the states of a forward pass; the features and the unit finder say what they should; the page
holds the user's text safely and draws it, its unit rows and the finder in headless Chromium without a JavaScript
error; mistakes are refused in one line."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import PANGRAMS, REPO
from rnnlm.bpe import train_tokenizer
from rnnlm.cells import BUILT_IN
from rnnlm.checkpoint import write_model_section
from rnnlm.commands import score as score_command
from rnnlm.commands.cli import CONF_DIR, quote_free_text
from rnnlm.commands.inspect import inspect_checkpoint
from rnnlm.errors import ConfigError
from rnnlm.inspection import find_units, inspect_text, text_features
from rnnlm.inspection_page import render_page
from rnnlm.loss import bits_per_character
from rnnlm.network import LanguageModel, NetworkConfig
from rnnlm.scoring import sentence_logprobs
from rnnlm.vocab import EOS, UNK, Vocab

KOREAN = "운동을 열심히 하면 근육이 는다"  # three bytes a character: byte-level tokens split some of them
TEXT = f'He said "the quick (brown) fox"!\nThe lazy dog; {KOREAN}\n\n  pack my box'
CHARS = sorted(set(TEXT) | {"\n"})


@functools.cache
def _vocab(level: str) -> Vocab:
    if level == "char":
        return Vocab("char", CHARS)
    if level == "word":
        return Vocab("word", [UNK, EOS, *sorted(set(" ".join(PANGRAMS).split()))])  # "said" and Korean are <unk>
    return train_tokenizer([*PANGRAMS, KOREAN] * 3, vocab_size=300, specials=[])


def _net(vocab: Vocab, cell: str, layers: int = 2, seed: int = 0, **settings) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(NetworkConfig(len(vocab), cell, 8, 12, layers, 0.0, **settings)).eval()


def _checkpoint(path: Path, net: LanguageModel, vocab: Vocab) -> Path:
    """A checkpoint as training writes it (untrained weights: the numbers are checked, not what they mean)."""
    data = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "global_step": 0}
    write_model_section(data, net.config, vocab, carry_state=True, world_size=1)
    torch.save(data, path)
    return path


def _config(name: str, *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.mark.parametrize("level", ["char", "word", "bpe"])
@pytest.mark.parametrize("cell", list(BUILT_IN))
def test_surprisal_sums_to_the_loss_rnnlm_score_reports(cell, level):
    vocab, lines = _vocab(level), [TEXT, *[line for line in TEXT.split("\n") if line.strip()]]
    net = _net(vocab, cell)
    inspection = inspect_text(net, vocab, lines, top_k=4)
    scored = sentence_logprobs(net, vocab, lines)
    log_prob = sum(lp for lp, _ in scored)
    assert inspection.log_prob == log_prob and inspection.scored == sum(n for _, n in scored)
    assert inspection.surprisal.sum() * math.log(2) == pytest.approx(-log_prob, rel=1e-5)
    characters = sum(vocab.text_characters(line) for line in lines)
    assert inspection.bits_per_character == bits_per_character(-log_prob, characters)
    # the pieces are the text bits per character counts, line ends included
    words = "\n".join(" ".join(line.split()) for line in lines) + "\n"
    assert "".join(inspection.pieces) == (words if level == "word" else "\n".join(lines) + "\n")
    assert inspection.top_probs.shape == (inspection.scored, 4)
    assert (np.diff(inspection.top_probs, axis=1) <= 0).all()  # likeliest first
    assert inspection.unknown == [level == "word" and piece != "\n" and piece.strip() not in vocab
                                  for piece in inspection.pieces]


@pytest.mark.parametrize("cell", [*BUILT_IN, "examples.indrnn:IndRNN"])  # a user's cell too
def test_the_units_are_the_states_of_a_forward_pass(cell, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    vocab = _vocab("char")
    net = _net(vocab, cell, layers=2)
    ids = torch.tensor([vocab.encode_text(TEXT) + [vocab.line_end_id]])  # the start, then the scored tokens
    x = net.embed(ids)
    for layer, layer_cell in enumerate(net.backbone.cells, 1):
        outputs, final = layer_cell(x, layer_cell.zero_state(1, x))  # the sequence form: torch's kernel, a scan
        inspection = inspect_text(net, vocab, [TEXT], layer=layer)
        units = {kind: torch.from_numpy(values).float() for kind, values in inspection.activations.items()}
        assert torch.allclose(units["h"], outputs[0, 1:], atol=1e-5)  # after each scored token
        for name, value in zip(layer_cell.state_names, final, strict=True):  # the cell state too
            assert torch.allclose(units[name][-1], value[0], atol=1e-5)
        gates = layer_cell.gates(x[:, 4], tuple(units[name][2:3] for name in layer_cell.state_names))
        assert set(units) == {*layer_cell.state_names, *(f"{g} gate" for g in gates)}
        for name, value in gates.items():  # reading token 4, from the state after token 3
            assert torch.allclose(units[f"{name} gate"][3], value[0], atol=1e-5)
        x = outputs


def test_the_features_of_a_text():
    features = text_features('He said "hi (x)".\nab cd')
    expected = {
        "inside quotes": "00000000111111100000000",
        "bracket depth": "00000000000011000000000",
        "line start": "10000000000000000010000",
        "sentence start": "10000000000000000010000",
    }
    for name, digits in expected.items():
        assert features[name].astype(int).tolist() == [int(d) for d in digits], name
    assert features["position in line"].astype(int).tolist() == [*range(1, 18), 0, *range(1, 6)]
    assert features["since space"].astype(int).tolist() == [1, 2, 0, *range(1, 5), 0, *range(1, 4), 0, *range(1, 6),
                                                            0, 1, 2, 0, 1, 2]


def test_the_unit_finder_finds_the_unit_that_counts_and_says_what_no_unit_can_follow():
    features = text_features("one two\nthree four five\nsix\n" * 4)
    rng = np.random.default_rng(0)
    units = rng.normal(size=(len(features["position in line"]), 6))
    units[:, 4] = 0.5 * features["position in line"] + rng.normal(scale=0.1, size=len(units))
    matches, constant = find_units({"c": units}, features, per_feature=2)
    best = max(matches, key=lambda m: abs(m.r))
    assert (best.feature, best.kind, best.unit) == ("position in line", "c", 4) and best.r > 0.98
    assert constant == ["inside quotes", "bracket depth"]


def test_the_page_holds_the_text_safely_and_asks_for_nothing_on_the_network():
    text = "a </script><script>alert(1)</script> <!-- & b"
    vocab = Vocab("char", sorted(set(text) | {"\n"}))
    page = render_page(inspect_text(_net(vocab, "lstm"), vocab, [text]), "x</script>.ckpt", [1])
    assert page.count("</script>") == render_page(inspect_text(_net(vocab, "lstm"), vocab, ["ab"]), "t", []) \
        .count("</script>")  # none of the text's closes an element
    assert "<!--" not in page and not re.search(r"https?://|<link|\bsrc=", page)


def test_json_and_page_from_the_command(tmp_path, capsys):
    vocab = _vocab("char")
    ckpt = _checkpoint(tmp_path / "m.ckpt", _net(vocab, "lstm"), vocab)
    passage = tmp_path / "passage.txt"
    passage.write_text(TEXT + "\n", encoding="utf-8")
    for read in ("stream", "lines"):  # each with rnnlm-score's numbers for the same reading
        output, inspection = inspect_checkpoint(_config("inspect", f"ckpt_path={ckpt}", f"text_file={passage}",
                                                        f"read={read}", "format=json", f"output={tmp_path / read}",
                                                        "top_k=3"))
        data = json.loads(output.read_text(encoding="utf-8"))
        given = quote_free_text([f"text={TEXT}"], ("text",)) if read == "stream" else [f"text_file={passage}"]
        score_command._hydra_main(_config("score", f"ckpt_path={ckpt}", *given))
        rows = capsys.readouterr().out.strip().splitlines()  # the text's own line ends break score's one row
        totals = (rows[1] if read == "stream" else rows[-1]).split("\t")
        assert [f"{data['perplexity']:.2f}", f"{data['bits_per_character']:.4f}"] == totals[1:3]
        assert data["tokens"] == int(totals[3]) == len(data["token"])
        assert sum(t["surprisal"] for t in data["token"]) == pytest.approx(-data["log_prob"] / math.log(2))
        assert [len(t["top"]) for t in data["token"]] == [3] * data["tokens"]
        assert np.array(data["activations"]["c"]).shape == (data["tokens"], 12)
        assert data["finder"] and {m["feature"] for m in data["finder"]} | set(data["constant_features"]) == \
            set(data["features"])
    assert data["sequences"] == 3 and inspection.sequences == 3


def test_mistakes_are_refused_in_one_line_before_any_file_is_written(tmp_path):
    vocab = _vocab("char")
    ckpt = _checkpoint(tmp_path / "m.ckpt", _net(vocab, "gru"), vocab)
    bilm = _checkpoint(tmp_path / "bilm.ckpt", _net(vocab, "gru", bidirectional=True), vocab)
    out = f"output={tmp_path / 'page.html'}"
    for overrides, message in [
        ([f"ckpt_path={bilm}", "text=ab"], "is a bidirectional model: it predicts each token from both sides"),
        ([f"ckpt_path={ckpt}", "text=ab", "layer=3"], r"layer=3, but the model has 2 layers: give layer=1..2"),
        ([f"ckpt_path={ckpt}", "text=ab", "units=[12]"], r"the layer has units 0..11"),
        ([f"ckpt_path={ckpt}", "text=abcdef", "max_tokens=5"], "the text is 7 tokens, more than max_tokens=5"),
        ([f"ckpt_path={ckpt}"], "give text=... or text_file=FILE, one of the two"),
        ([f"ckpt_path={ckpt}", "text=ab", "format=pdf"], r"format=pdf must be one of html\|json"),
        ([f"ckpt_path={ckpt}", "text=ab", f"output={ckpt}"], "is a checkpoint's name or file, which is never written"),
    ]:
        with pytest.raises(ConfigError, match=message):
            inspect_checkpoint(_config("inspect", out, *overrides))
    assert sorted(tmp_path.iterdir()) == sorted([bilm, ckpt])


def test_the_command_line_writes_the_page_and_names_the_best_unit(tmp_path):
    vocab = _vocab("bpe")
    ckpt = _checkpoint(tmp_path / "m.ckpt", _net(vocab, "minlstm"), vocab)
    result = subprocess.run([sys.executable, str(REPO / "src" / "inspect_model.py"), f"ckpt_path={ckpt}",
                             f"text={KOREAN} (the quick) fox", "output=page.html"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = result.stdout.splitlines()
    assert re.fullmatch(r"page\.html \(.+\): \d+ tokens, \d+\.\d{4} bits per character, perplexity [\d.]+", first)
    assert re.fullmatch(r"unit finder: layer 2 \S+( gate)? unit \d+ follows [a-z ]+, r = [+-]0\.\d{3}", second)
    assert (tmp_path / "page.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def _browser():
    """Headless Chromium through Selenium, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install selenium")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)  # never Selenium Manager's download


def test_the_page_draws_in_a_browser(tmp_path, monkeypatch):
    from PIL import Image

    from rnnlm import inspection_page

    browser = _browser()
    monkeypatch.setattr(inspection_page, "PAGE_TOKENS", 40)  # a text of several pages
    vocab = Vocab("char", sorted(set(TEXT + "</script>&") | {"\n"}))
    text = TEXT + " </script><b>bold</b> & done"
    inspection = inspect_text(_net(vocab, "lstm"), vocab, [text])
    path = tmp_path / "page.html"
    path.write_text(render_page(inspection, "m.ckpt", [2, 5]), encoding="utf-8")
    try:
        browser.get(path.as_uri())
        run = browser.execute_script
        assert run("return window.inspectErrors") == []
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
        assert run("return document.querySelectorAll('#text .t').length") == 40
        shown = 3  # units 2 and 5 of h, and the finder's best unit
        assert run("return document.querySelectorAll('#text .unit-row').length") == 40 * shown
        assert run("return document.getElementById('totals').textContent") == \
            f"{inspection.scored} tokens, {inspection.characters} characters: " \
            f"{inspection.bits_per_character:.4f} bits per character, perplexity {inspection.perplexity:.2f}"
        while run("return document.querySelector('#pager button:last-child').disabled") is False:
            run("document.querySelector('#pager button:last-child').click()")  # to the last page
        drawn = run("return Array.from(document.querySelectorAll('#text .t .c')).map(e => e.textContent).join('')")
        assert drawn.endswith("</script><b>bold</b> & done\u23ce")  # the text as text, not as HTML
        assert run("return document.querySelectorAll('#text b, body > b').length") == 0
        hidden = run("return Array.from(document.querySelectorAll('#finder button.finder-unit'))"
                     ".findIndex(b => !b.classList.contains('on'))")
        run(f"document.querySelectorAll('#finder button.finder-unit')[{hidden}].click()")  # show one more unit
        tokens = run("return document.querySelectorAll('#text .t').length")
        assert run("return document.querySelectorAll('#text .unit-row').length") == tokens * (shown + 1)
        run("document.querySelector('#text .t').click()")
        assert len(run("return document.querySelectorAll('#guesses tr')")) == 5  # the top-k at that token
        assert run("return window.inspectErrors") == []
        screenshot = tmp_path / "page.png"
        browser.save_screenshot(str(screenshot))
    finally:
        browser.quit()
    colours = Image.open(screenshot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, surprisal and unit rows drawn, not a blank page
