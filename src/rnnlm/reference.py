"""Every command's settings and every config group's choices, described by the configs themselves: each command's
``--help`` (:func:`command_help`) and ``docs/configuration.md`` (:func:`reference`), so that neither is a second
list to keep up to date.

What a setting means is the comment on the lines just above it in its YAML file under ``conf/``; what it accepts
is its entry in :mod:`rnnlm.schema`. The comment that opens a file (followed by a blank line, ``defaults:`` or
``_target_:``) says what the file is: for a choice of a group, what picking it does. A comment above an entry of
``conf/train.yaml``'s defaults list says what that group is for. ``tests/test_reference.py`` fails when a setting
has no comment, or when ``docs/configuration.md`` differs from what this module writes::

    python -m rnnlm.reference > docs/configuration.md
"""

from __future__ import annotations

import functools
import itertools
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnlm import CONF_DIR

COMMANDS = ("train", "eval", "generate", "score", "export", "inspect")  # Hydra's; rnnlm-report reads plain arguments
# A command's script in a checkout is src/<command>.py, but for these: a src/inspect.py would stand in for Python's
# own inspect module in every script of src/ (a script's folder comes first on the module search path).
CHECKOUT_SCRIPTS = {"inspect": "inspect_model"}
UPDATE = "python -m rnnlm.reference > docs/configuration.md"
HIDDEN = ("_target_", "_partial_")  # how a section is built, not a setting to change: shown as the choice's class


@dataclass
class ConfigFile:
    """What one YAML file of ``conf/`` says about itself, read from its comments."""

    header: list[str] = field(default_factory=list)  # the comment that opens the file, line by line
    comments: dict[str, str] = field(default_factory=dict)  # key (dotted, within the file's package) -> its comment
    group_comments: dict[str, str] = field(default_factory=dict)  # a defaults-list group (experiment) -> its comment
    bases: list[str] = field(default_factory=list)  # defaults-list entries of the file's own group (- _recurrent)
    groups: list[str] = field(default_factory=list)  # defaults-list entries that pick a group's choice (- model: lstm)
    global_package: bool = False  # ``# @package _global_``: its keys start at the top of the config

    @property
    def prose(self) -> str:
        """The header without its example command lines, as one line."""
        return " ".join(line for line in self.header if not re.match(r"\s*(python|rnnlm-)\S* ", line)).strip()

    @property
    def summary(self) -> str:
        """The header's first sentence."""
        return first_sentence(self.prose)


def first_sentence(text: str) -> str:
    """``text`` up to the end of its first sentence: a full stop before a capital letter, not one of ``e.g.``."""
    text = text.strip()
    for end in re.finditer(r"\.\s+(?=[A-Z])", text):
        if not re.search(r"\b(e\.g|i\.e|al|cf|vs)$", text[: end.start()]):
            return text[: end.start() + 1]
    return text


_KEY = re.compile(r"( *)([A-Za-z_][\w-]*|'[^']*'|\"[^\"]*\")\s*:(?:\s|$)")
_ENTRY = re.compile(r"\s*-\s+(override\s+)?([\w/.@-]+)\s*(?::\s*(\S*))?\s*$")  # - model: lstm, - _recurrent


@functools.cache
def read_config_file(path: Path) -> ConfigFile:
    """The comments of a YAML file of ``conf/``: its header, the comment above each key and each defaults entry."""
    doc = ConfigFile()
    pending: list[str] = []  # comment lines since the last line that was not a comment
    stack: list[tuple[int, str]] = []  # (indent, name) of the mappings the next key may be inside
    seen_key = in_defaults = False
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped:
            if not seen_key and pending and not doc.header:
                doc.header = pending
            pending = []
        elif stripped.startswith("#"):
            text = stripped[1:].strip()
            if text.startswith("@package"):
                doc.global_package = text.split()[-1] == "_global_"
            elif not text.startswith("---"):  # a heading over several keys, not one key's comment
                pending.append(text)
        elif in_defaults and (entry := _ENTRY.fullmatch(line)):
            override, name, choice = entry.groups()
            if choice is None:
                doc.bases.append(name)
            elif not override:
                doc.groups.append(name)
                if pending:
                    doc.group_comments[name] = " ".join(pending)
            pending = []
        elif key := _KEY.match(line):
            indent, name = len(key[1]), key[2].strip("'\"")
            while stack and stack[-1][0] >= indent:
                stack.pop()
            if not seen_key and not doc.header and pending and name in ("defaults", "_target_"):
                doc.header, pending = pending, []
            seen_key = True
            if indent == 0:
                in_defaults = name == "defaults"
            if pending and not in_defaults:
                doc.comments[".".join([n for _, n in stack] + [name])] = " ".join(pending)
            stack.append((indent, name))
            pending = []
        else:  # an item of a list value
            pending = []
    if not seen_key and pending and not doc.header:
        doc.header = pending
    return doc


def config_file(group: str | None, name: str) -> ConfigFile:
    """``conf/<group>/<name>.yaml``, or ``conf/<name>.yaml`` without a group."""
    return read_config_file(CONF_DIR / (f"{group}/{name}.yaml" if group else f"{name}.yaml"))


def choices(group: str) -> list[str]:
    """The choices of a config group: its files, without the shared bases (``_recurrent``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def groups(command: str) -> list[str]:
    """The config groups a user picks from for ``command`` (``conf/<command>.yaml``'s defaults list, without
    Hydra's)."""
    if command != "train":  # the others take the settings of paths=default alone
        return []
    return [name for name in config_file(None, command).groups if name != "hydra"]


def _chain(group: str, choice: str) -> Iterator[ConfigFile]:
    """The file of a choice, then the files of its group it builds on (``gru`` -> ``_recurrent``)."""
    seen: set[str] = set()
    todo = [choice]
    while todo:
        name = todo.pop(0)
        if name in seen or name == "_self_" or not (CONF_DIR / group / f"{name}.yaml").is_file():
            continue
        seen.add(name)
        doc = config_file(group, name)
        yield doc
        todo += doc.bases


def describe(key: str, command: str, chosen: dict[str, str]) -> str:
    """The comment that describes ``key`` of ``command``'s config, with ``chosen``: group -> choice (the key's
    group's choice first, the files it builds on next, then ``conf/<command>.yaml``, where a group's own comment
    describes the group's key); empty if there is none."""
    group, _, rest = key.partition(".")
    if rest and group in chosen:
        for doc in _chain(group, chosen[group]):
            if (text := doc.comments.get(key if doc.global_package else rest)) is not None:
                return text
    own = config_file(None, command)
    return own.comments.get(key) or own.group_comments.get(key, "")  # a group set to null: scheduler=none


# ---------------------------------------------------------------- composed configs


def composed(command: str, overrides: list[str] = ()) -> tuple[dict, dict[str, str]]:
    """``conf/<command>.yaml`` composed with ``overrides`` as plain data, interpolations as written (without the
    ``hydra`` section), and the choice of each group.

    Raises:
        ConfigError: an override Hydra refuses (one line, as the commands say it).
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from rnnlm.errors import ConfigError

    with initialize_config_dir(str(CONF_DIR), job_name=command, version_base="1.3"):
        try:  # a sweep's values are left out, as the commands check a sweep's command line
            cfg = GlobalHydra.instance().hydra.compose_config(command, list(overrides), run_mode=RunMode.MULTIRUN,
                                                              validate_sweep_overrides=False)
        except HydraException as err:
            from rnnlm.commands.cli import describe_hydra_error

            raise ConfigError(describe_hydra_error(err, command)) from None
    chosen = {group: str(choice) for group, choice in cfg.hydra.runtime.choices.items()
              if not group.startswith("hydra") and choice is not None}
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    return plain, chosen


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of every setting under ``node``: mappings are entered, anything else is a value."""
    if isinstance(node, dict) and node:
        for name, value in node.items():
            yield from leaves(value, f"{prefix}{name}.")
    elif prefix:
        yield prefix[:-1], node


def shown(value: Any) -> str:
    """A value as it is typed on the command line."""
    from rnnlm.schema import shown as typed

    return "{}" if value == {} else typed(value)


# ---------------------------------------------------------------- --help


def command_help(command: str, overrides: list[str] = ()) -> str:
    """What ``rnnlm-<command> --help`` prints: how to call it, its config groups with their choices (train), and
    each of its settings, one line each, with its value for these ``overrides`` and what it means."""
    cfg, chosen = composed(command, overrides)
    header = config_file(None, command).header
    lines = [f"usage: rnnlm-{command} {'[-m] [GROUP=CHOICE ...] ' if command == 'train' else ''}[KEY=VALUE ...]",
             "", *header]
    train = config_file(None, "train")
    if names := groups(command):
        lines += ["", "groups (GROUP=CHOICE, as now chosen; the choices in brackets):"]
        rows = [(f"{name}={chosen.get(name, 'null')}", f"[{', '.join(choices(name))}] "
                 f"{first_sentence(train.group_comments.get(name, ''))}") for name in names]
        lines += _columns(rows)
    rows = [(f"{key}={shown(value)}", first_sentence(describe(key, command, chosen)))
            for key, value in leaves(cfg) if key.rpartition(".")[2] not in HIDDEN]
    lines += ["", "settings (KEY=VALUE, as now set):", *_columns(rows), ""]
    if command == "train":
        lines.append("-m runs a sweep: one job per value (model=rnn,lstm,gru). GROUP=CHOICE --help shows the "
                     "settings of that choice.")
    lines.append("--cfg job prints the composed config; --hydra-help, Hydra's own options. Every choice and "
                 "setting: docs/configuration.md.")
    return "\n".join(lines)


def _columns(rows: list[tuple[str, str]], width: int = 34) -> list[str]:
    """``left  right`` lines, the right parts aligned where the left ones are short enough."""
    pad = min(width, max((len(left) for left, _ in rows), default=0))
    return [f"  {left.ljust(pad)}  {right}".rstrip() for left, right in rows]


# ---------------------------------------------------------------- docs/configuration.md


def _cell(text: str) -> str:
    """Prose for a table cell: its ``|`` do not end the cell, and ``<run>``, ``**``, ``~key`` stay as written
    (not an HTML tag, bold, struck through); code spans are left as they are."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(part.replace("|", "\\|") if part.startswith("`") else
                   re.sub(r"([*~\\])", r"\\\1", part).replace("<", "&lt;").replace("|", "\\|") for part in parts)


def _code(value: Any) -> str:
    return f"`{shown(value).replace('|', chr(92) + '|')}`"


def _accepts(key: str, command: str) -> str:
    from rnnlm.schema import declared

    if (setting := declared(key, command)) is None:
        return ""
    return _cell(setting.expects + (" (or null)" if setting.null and "null" not in setting.expects else ""))


def _settings_table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    return ["| key | default | accepts | what it means |", "|---|---|---|---|",
            *(f"| `{key}` | {default} | {accepts} | {_cell(text)} |" for key, default, accepts, text in rows)]


def _defaults_by_choice(values: dict[str, Any], names: list[str]) -> str:
    """One value when every choice has it alike, else ``choice: value`` for each choice that has it."""
    distinct = {shown(v) for v in values.values()}
    if len(values) == len(names) and len(distinct) == 1:
        return _code(next(iter(values.values())))
    return ", ".join(f"{name}: {_code(values[name])}" for name in names if name in values)


def _group_section(group: str) -> list[str]:
    """A group's choices (what each builds and does) and its settings, with each choice's default."""
    names = choices(group)
    files = {name: config_file(group, name) for name in names}
    built: dict[str, dict] = {}
    for name in names:
        cfg, _ = composed("train", [f"{group}={name}"])
        built[name] = cfg.get(group)
    keyed = not all(doc.global_package for doc in files.values())
    lines = [f"### `{group}`", "", _cell(config_file(None, "train").group_comments.get(group, "")), ""]
    if keyed:
        lines += ["| choice | builds | what it does |", "|---|---|---|"]
        for name in names:
            target = built[name].get("_target_") if isinstance(built[name], dict) else None
            targets = {v for k, v in leaves(built[name]) if k.endswith("_target_")} if not target else {target}
            lines.append(f"| `{group}={name}` | {', '.join(f'`{t}`' for t in sorted(targets))} | "
                         f"{_cell(files[name].prose)} |")
        values: dict[str, dict[str, Any]] = {}
        for name in names:
            for key, value in leaves(built[name], f"{group}.") if isinstance(built[name], dict) else ():
                if key.rpartition(".")[2] not in HIDDEN:
                    values.setdefault(key, {})[name] = value
        rows = []
        for key, by_choice in values.items():
            text = next((t for name in names if name in by_choice
                         and (t := describe(key, "train", {group: name}))), "")
            rows.append((key, _defaults_by_choice(by_choice, names), _accepts(key, "train"), text))
        lines += ["", *_settings_table(rows)]
    else:
        lines += ["| choice | what it does |", "|---|---|"]
        lines += [f"| `{group}={name}` | {_cell(files[name].prose)} |" for name in names]
    return lines + [""]


def _command_section(command: str) -> list[str]:
    cfg, chosen = composed(command)
    doc = config_file(None, command)
    script = CHECKOUT_SCRIPTS.get(command, command)
    lines = [f"## rnnlm-{command}", "", f"`conf/{command}.yaml`; `python src/{script}.py` in a checkout.", ""]
    lines += _header_markdown(doc.header)
    own = [(key, value) for key, value in leaves(cfg)
           if key.partition(".")[0] not in groups(command) and key.rpartition(".")[2] not in HIDDEN]
    if command == "train":
        train = config_file(None, "train")
        lines += ["| group | choices (default in bold) | what it is for |", "|---|---|---|"]
        for group in groups(command):
            names = [f"**`{n}`**" if n == chosen.get(group) else f"`{n}`" for n in choices(group)]
            lines.append(f"| `{group}` | {', '.join(names)} | {_cell(train.group_comments.get(group, ''))} |")
        lines += ["", "Settings of train itself:", ""]
    lines += _settings_table([(key, _code(value), _accepts(key, command), describe(key, command, chosen))
                              for key, value in own])
    lines.append("")
    if command == "train":
        for group in groups(command):
            lines += _group_section(group)
        launchers = choices("hydra/launcher")
        lines += ["### `hydra/launcher`", "", "How a sweep's jobs run: Hydra's basic launcher (one after another) "
                  "unless one is chosen, such as Hydra's `joblib` (parallel local processes) or:", "",
                  "| choice | what it does |", "|---|---|"]
        lines += [f"| `hydra/launcher={n}` | {_cell(config_file('hydra/launcher', n).prose)} |" for n in launchers]
        lines.append("")
    return lines


def _header_markdown(header: list[str]) -> list[str]:
    """A command's header comment: its example command lines as code, the rest as paragraphs."""
    lines: list[str] = []
    for is_command, block in itertools.groupby(header, key=lambda line: bool(re.match(r"(python|rnnlm-)\S* ", line))):
        block = list(block)
        lines += ["```bash", *block, "```", ""] if is_command else [_cell(" ".join(block)), ""]
    return lines


def _report_section() -> list[str]:
    from rnnlm.commands import report

    purpose, details = report.__doc__.split("\n\n", 1)
    return ["## rnnlm-report", "", f"`{report.USAGE}`; `python src/report.py` in a checkout. "
            f"{purpose.partition(': ``')[0]}.", "", "| argument | what it means |", "|---|---|",
            *(f"| `{name}` | {_cell(text)} |" for name, text in report.ARGUMENTS), "",
            *(" ".join(paragraph.split()).replace("``", "`") + "\n" for paragraph in details.strip().split("\n\n"))]


def reference() -> str:
    """``docs/configuration.md``: every command's settings and every group's choices, from the configs."""
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Written by `{UPDATE}` from conf/ and src/rnnlm/schema.py: do not edit it by hand. -->",
        "",
        "Each command takes `key=value` (and train `group=choice`) on its command line; `--help` lists its own "
        "settings with their values for the rest of the command line (`python src/train.py model=gru --help`). "
        "What a setting means is the comment above it in its YAML file under `conf/`; what it accepts is its "
        "entry in `src/rnnlm/schema.py`, which every command checks before any work. To change this page, change "
        f"those and run `{UPDATE}`: `tests/test_reference.py` fails while the two disagree.",
        "",
    ]
    for command in COMMANDS:
        lines += _command_section(command)
    lines += _report_section()
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
