"""The page ``rnnlm-inspect`` writes: one self-contained HTML file (inline CSS and JavaScript, no network) that draws
an :class:`rnnlm.inspection.Inspection`: the text coloured by surprisal, the model's guesses at each token, the
chosen units as rows of colour under the text, and the unit finder.

The data travels inside the page as JSON in a ``<script type="application/json">`` element, with ``<``, ``>`` and
``&`` escaped so that no text of the user's can end that element; the script writes every piece of text into the
page with ``textContent``, never as HTML. Activations are stored as one byte per value (each unit's values over its
largest magnitude, in 127 steps, base64): about (units x kinds) bytes per token, which keeps a page of 5,000 tokens
of a 2 x 512 LSTM's layer (5 kinds) near 17 MB; ``format=json`` has them to 6 decimals.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np

from rnnlm.inspection import Inspection

PAGE_TOKENS = 2_000  # tokens drawn at once; the page turns to the others, so a long text stays quick to draw


def page_data(inspection: Inspection, title: str, units: list[int]) -> dict:
    """What the page's script reads: the text, the numbers rounded for display, the activations as bytes, and the
    units shown when it opens (``units`` of the hidden state, then the finder's best unit)."""
    used = np.unique(inspection.top_ids)  # the guesses name only these ids: their labels alone travel
    first_kind = next(iter(inspection.activations))
    shown = [[first_kind, u] for u in units]
    if (best := inspection.best()) is not None and [best.kind, best.unit] not in shown:
        shown.append([best.kind, best.unit])
    return {
        "title": title, "cell": inspection.cell, "level": inspection.level, "layer": inspection.layer,
        "layers": inspection.layers, "sequences": inspection.sequences, "tokens": inspection.scored,
        "characters": inspection.characters,
        # as rnnlm-score prints them
        "bpc": f"{inspection.bits_per_character:.4f}", "ppl": f"{inspection.perplexity:.2f}",
        "pieces": inspection.pieces,
        "unknown": [i for i, u in enumerate(inspection.unknown) if u],
        "surprisal": [round(s, 3) for s in inspection.surprisal.tolist()],
        "labels": [inspection.labels[i] for i in used.tolist()],
        "top": np.searchsorted(used, inspection.top_ids).tolist(),
        "top_probs": np.round(inspection.top_probs, 4).tolist(),
        "units": next(iter(inspection.activations.values())).shape[1],
        "activations": {kind: _as_bytes(values) for kind, values in inspection.activations.items()},
        "finder": [vars(m) | {"r": round(m.r, 3)} for m in inspection.finder],
        "constant": inspection.constant,
        "shown": shown,
        "page_tokens": PAGE_TOKENS,
    }


def _as_bytes(values: np.ndarray) -> dict:
    """(T, H) values as each unit's largest magnitude and its T values over it in 127 steps (int8, base64), and
    the magnitude its colours reach full strength at: the 99th percentile, so that one outlier leaves the rest
    visible."""
    magnitude = np.abs(values)
    scale = np.where(magnitude.max(0) > 0, magnitude.max(0), 1.0)
    full = np.percentile(magnitude, 99, axis=0)
    steps = np.round(values / scale * 127).astype(np.int8)  # (T, H)
    return {"scale": [float(f"{s:.4g}") for s in scale.tolist()],
            "full": [float(f"{f:.4g}") if f > 0 else 1.0 for f in full.tolist()],
            "rows": [base64.b64encode(steps[:, u].tobytes()).decode("ascii") for u in range(values.shape[1])]}


def script_json(data: dict) -> str:
    """JSON that is safe inside a ``<script>`` element: nothing in it can close the element or open a comment."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render_page(inspection: Inspection, title: str, units: list[int] = ()) -> str:
    """The whole HTML page."""
    data = page_data(inspection, title, list(units))
    if any(not math.isfinite(s) for s in data["surprisal"]):  # a probability of 0: shown as the largest there is
        data["surprisal"] = [s if math.isfinite(s) else 1e9 for s in data["surprisal"]]
    return PAGE.replace("/*DATA*/", script_json(data))


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>rnnlm-inspect</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fff; }
header { padding: 10px 16px; border-bottom: 1px solid #ddd; background: #fafafa; }
h1 { font-size: 17px; margin: 0 0 4px; }
.meta { color: #555; }
.totals { font-weight: 600; }
main { display: flex; align-items: flex-start; }
#left { flex: 1; min-width: 0; padding: 10px 16px; }
#side { width: 300px; flex: none; position: sticky; top: 0; max-height: 100vh; overflow: auto; padding: 10px 12px;
        border-left: 1px solid #ddd; background: #fcfcfc; font-size: 13px; }
h2 { font-size: 14px; margin: 12px 0 4px; }
#controls { margin: 6px 0; display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
.chip { display: inline-flex; align-items: center; gap: 4px; border: 1px solid #bbb; border-radius: 10px;
        padding: 0 6px; background: #fff; font-size: 12px; }
.chip button { border: none; background: none; cursor: pointer; padding: 0 2px; color: #a00; }
#text { display: flex; flex-wrap: wrap; align-items: flex-start; font: 15px/1.25 ui-monospace, Menlo, Consolas,
        monospace; margin-top: 8px; }
.t { display: inline-flex; flex-direction: column; cursor: pointer; }
.t .c { white-space: pre; padding: 1px 0; min-width: 0.35em; text-align: center; }
.t.unk .c { text-decoration: underline wavy #a00; }
.t.sel .c { outline: 2px solid #333; }
.t .c.end { color: #999; }
.t .c.empty { color: #bbb; }
.bar { height: 8px; margin-top: 1px; }
.br { flex-basis: 100%; height: 6px; }
#finder td, #finder th { padding: 1px 6px 1px 0; text-align: left; vertical-align: top; font-size: 13px; }
#finder button { font: 12px ui-monospace, monospace; margin: 1px; cursor: pointer; border: 1px solid #bbb;
                 border-radius: 3px; background: #fff; }
#finder button.on { background: #ffe7c2; border-color: #d80; }
.muted { color: #888; }
#guesses td { padding: 0 6px 0 0; font: 13px ui-monospace, monospace; white-space: pre; }
.pbar { background: #6a9be0; height: 9px; display: inline-block; }
.legend { display: inline-flex; align-items: center; gap: 4px; font-size: 12px; color: #555; }
.legend .grad { width: 100px; height: 10px; border: 1px solid #ccc; }
#legend .grad { background: linear-gradient(to right, #fff, #ffa514); }
#unit-legend .grad { background: linear-gradient(to right, rgb(31, 119, 180), #fff, rgb(214, 39, 40)); }
#pager button { margin: 0 4px; }
</style>
</head>
<body>
<script>window.inspectErrors = []; window.addEventListener("error", function (e) {
  window.inspectErrors.push(String(e.message)); });</script>
<script type="application/json" id="data">/*DATA*/</script>
<header>
  <h1 id="title"></h1>
  <div class="meta" id="model"></div>
  <div class="totals" id="totals"></div>
</header>
<main>
<div id="left">
  <div id="controls">
    <span class="legend" id="legend">surprisal <span>0</span><span class="grad"></span><span id="legend-max"></span>
      bits</span>
    <span>| unit of layer <span id="layer"></span>:</span>
    <select id="kind"></select>
    <input id="unit" type="number" min="0" value="0" style="width: 5em">
    <button id="show">show</button>
    <span id="pager"></span>
  </div>
  <div><span class="legend" id="unit-legend">rows under the text: below 0<span class="grad"></span>above 0</span>
    <span id="shown"></span></div>
  <div id="text"></div>
</div>
<div id="side">
  <h2>Token</h2>
  <div id="token" class="muted">Hover over or click a token.</div>
  <table id="guesses"></table>
  <div id="values"></div>
  <h2>Unit finder</h2>
  <div class="muted" style="font-size: 12px">Units of this layer whose activation correlates most with a feature of
    the text (Pearson's r over the tokens; the first token read from a fresh state left out). Click to show one.</div>
  <table id="finder"></table>
</div>
</main>
<script>
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("data").textContent);
  var T = D.pieces.length, shown = [], page = 0, pinned = -1, decoded = {};
  var unknown = new Set(D.unknown);
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function shownText(piece) {  // what a piece looks like in a list: its invisible characters named
    return piece.replace(/\\n/g, "\\u23ce").replace(/ /g, "\\u2423").replace(/\\t/g, "\\u21e5");
  }
  function values(kind, unit) {  // a unit's activations over the whole text, decoded once
    var key = kind + "/" + unit;
    if (!decoded[key]) {
      var bytes = atob(D.activations[kind].rows[unit]), scale = D.activations[kind].scale[unit];
      var full = D.activations[kind].full[unit];
      var out = new Float32Array(bytes.length);
      for (var i = 0; i < bytes.length; i++) {
        var b = bytes.charCodeAt(i); out[i] = (b > 127 ? b - 256 : b) / 127 * scale;
      }
      decoded[key] = {values: out, scale: scale, full: full};
    }
    return decoded[key];
  }
  function unitColour(v, full) {  // blue below 0, red above, white at 0, full at 99% of the unit's magnitudes
    var a = Math.min(1, Math.abs(v) / full);
    return v >= 0 ? "rgba(214, 39, 40, " + a.toFixed(3) + ")" : "rgba(31, 119, 180, " + a.toFixed(3) + ")";
  }
  var sorted = D.surprisal.slice().sort(function (a, b) { return a - b; });
  var maxBits = Math.max(1, sorted[Math.floor(0.95 * (sorted.length - 1))] || 1);
  function surprisalColour(bits) {  // white (expected) to orange (surprising), as a highlighter would mark it
    var a = Math.min(1, bits / maxBits);
    return "rgb(255, " + Math.round(255 - 90 * a) + ", " + Math.round(255 - 235 * a) + ")";
  }

  document.getElementById("title").textContent = "rnnlm-inspect: " + D.title;
  document.getElementById("model").textContent = D.cell + ", " + D.level + " level, layer " + D.layer + " of " +
    D.layers + " (" + D.units + " units); read as " + D.sequences + " sequence" + (D.sequences > 1 ? "s" : "") +
    " from a fresh state";
  document.getElementById("totals").textContent = D.tokens + " tokens, " + D.characters + " characters: " +
    D.bpc + " bits per character, perplexity " + D.ppl;
  document.getElementById("legend-max").textContent = maxBits.toFixed(1);
  document.getElementById("layer").textContent = D.layer;
  var kindSelect = document.getElementById("kind");
  Object.keys(D.activations).forEach(function (kind) { kindSelect.appendChild(el("option", {value: kind}, kind)); });
  document.getElementById("unit").max = D.units - 1;

  function isShown(kind, unit) {
    return shown.some(function (s) { return s[0] === kind && s[1] === unit; });
  }
  function toggle(kind, unit, on) {
    if (on && !isShown(kind, unit)) shown.push([kind, unit]);
    if (!on) shown = shown.filter(function (s) { return !(s[0] === kind && s[1] === unit); });
    draw();
  }
  document.getElementById("show").addEventListener("click", function () {
    var unit = parseInt(document.getElementById("unit").value, 10);
    if (unit >= 0 && unit < D.units) toggle(kindSelect.value, unit, true);
  });

  function drawFinder() {
    var table = document.getElementById("finder");
    table.textContent = "";
    var byFeature = {};
    D.finder.forEach(function (m) { (byFeature[m.feature] = byFeature[m.feature] || []).push(m); });
    Object.keys(byFeature).forEach(function (feature) {
      var row = el("tr"), cell = el("td");
      row.appendChild(el("th", {}, feature));
      byFeature[feature].forEach(function (m) {
        var on = isShown(m.kind, m.unit);
        var button = el("button", {"class": on ? "finder-unit on" : "finder-unit", "data-kind": m.kind,
                                   "data-unit": m.unit}, m.kind + " " + m.unit + "  r=" + m.r.toFixed(2));
        button.addEventListener("click", function () { toggle(m.kind, m.unit, !isShown(m.kind, m.unit)); });
        cell.appendChild(button);
      });
      row.appendChild(cell);
      table.appendChild(row);
    });
    D.constant.forEach(function (feature) {
      var row = el("tr");
      row.appendChild(el("th", {}, feature));
      row.appendChild(el("td", {"class": "muted"}, "the same at every token here"));
      table.appendChild(row);
    });
  }

  function drawShown() {
    var box = document.getElementById("shown");
    box.textContent = "";
    shown.forEach(function (s, k) {
      var chip = el("span", {"class": "chip"});
      chip.appendChild(el("span", {}, "row " + (k + 1) + ": " + s[0] + " " + s[1] + " (max |value| " +
                                            values(s[0], s[1]).scale.toPrecision(3) + ")"));
      chip.title = "under each token: blue below 0, red above, full strength at " +
        values(s[0], s[1]).full.toPrecision(3) + " (99% of the values are smaller)";
      var remove = el("button", {title: "hide"}, "\\u00d7");
      remove.addEventListener("click", function () { toggle(s[0], s[1], false); });
      chip.appendChild(remove);
      box.appendChild(chip);
      box.appendChild(document.createTextNode(" "));
    });
  }

  function drawPager() {
    var pager = document.getElementById("pager"), pages = Math.ceil(T / D.page_tokens);
    pager.textContent = "";
    if (pages <= 1) return;
    var previous = el("button", {}, "\\u2190"), next = el("button", {}, "\\u2192");
    previous.disabled = page === 0; next.disabled = page === pages - 1;
    previous.addEventListener("click", function () { page--; draw(); });
    next.addEventListener("click", function () { page++; draw(); });
    pager.appendChild(previous);
    pager.appendChild(el("span", {}, "tokens " + (page * D.page_tokens + 1) + "\\u2013" +
                         Math.min(T, (page + 1) * D.page_tokens) + " of " + T));
    pager.appendChild(next);
  }

  function drawText() {
    var box = document.getElementById("text"), fragment = document.createDocumentFragment();
    var rows = shown.map(function (s) { return values(s[0], s[1]); });
    var end = Math.min(T, (page + 1) * D.page_tokens);
    for (var i = page * D.page_tokens; i < end; i++) {
      var piece = D.pieces[i], token = el("span", {"class": "t" + (unknown.has(i) ? " unk" : ""), "data-i": i});
      if (i === pinned) token.classList.add("sel");
      var isEnd = piece.slice(-1) === "\\n";
      var text = el("span", {"class": "c" + (isEnd ? " end" : piece === "" ? " empty" : "")},
                    isEnd ? piece.slice(0, -1) + "\\u23ce" : piece === "" ? "\\u00b7" : piece);
      text.style.background = surprisalColour(D.surprisal[i]);
      token.appendChild(text);
      rows.forEach(function (row) {
        var bar = el("div", {"class": "bar unit-row"});
        bar.style.background = unitColour(row.values[i], row.full);
        token.appendChild(bar);
      });
      fragment.appendChild(token);
      if (isEnd) fragment.appendChild(el("div", {"class": "br"}));
    }
    box.textContent = "";
    box.appendChild(fragment);
  }

  function describe(i) {
    var box = document.getElementById("token"), bits = D.surprisal[i];
    box.classList.remove("muted");
    box.textContent = "";
    box.appendChild(el("div", {}, "token " + (i + 1) + ": \\u201c" + shownText(D.pieces[i]) + "\\u201d" +
                                   (unknown.has(i) ? " (read as <unk>)" : "")));
    box.appendChild(el("div", {}, "p = " + Math.pow(2, -bits).toPrecision(3) + ", " + bits.toFixed(2) +
                                   " bits of surprisal"));
    box.appendChild(el("div", {"class": "muted"}, "the model's guesses here:"));
    var table = document.getElementById("guesses");
    table.textContent = "";
    D.top[i].forEach(function (id, k) {
      var p = D.top_probs[i][k], row = el("tr");
      row.appendChild(el("td", {}, shownText(D.labels[id])));
      row.appendChild(el("td", {}, p.toFixed(3)));
      var barCell = el("td"), bar = el("span", {"class": "pbar"});
      bar.style.width = Math.round(80 * p) + "px";
      barCell.appendChild(bar);
      row.appendChild(barCell);
      table.appendChild(row);
    });
    var list = document.getElementById("values");
    list.textContent = "";
    shown.forEach(function (s, k) {
      list.appendChild(el("div", {}, "row " + (k + 1) + ", " + s[0] + " " + s[1] + ": " +
                                     values(s[0], s[1]).values[i].toFixed(3)));
    });
  }

  var textBox = document.getElementById("text");
  function tokenOf(event) {
    var node = event.target.closest ? event.target.closest(".t") : null;
    return node ? parseInt(node.getAttribute("data-i"), 10) : -1;
  }
  textBox.addEventListener("mouseover", function (event) {
    var i = tokenOf(event);
    if (i >= 0 && pinned < 0) describe(i);
  });
  textBox.addEventListener("click", function (event) {
    var i = tokenOf(event);
    if (i < 0) return;
    pinned = pinned === i ? -1 : i;
    draw();
    describe(i);
  });

  function draw() { drawShown(); drawFinder(); drawPager(); drawText(); }
  D.shown.forEach(function (s) { shown.push([s[0], s[1]]); });
  draw();
  if (T > 0) describe(0);
})();
</script>
</body>
</html>
"""
