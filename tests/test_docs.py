"""The documentation a user reads first: every relative link in README.md and docs/ leads somewhere (a file, and a
heading of it when the link names one), and every command README.md quotes is one the product accepts (its config
composes and passes the checks every command runs before any work), so the page cannot drift from the code."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from rnnlm.reference import CHECKOUT_SCRIPTS

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
COMMAND = re.compile(r"^(?:python src/(\w+)\.py|rnnlm-(\w+))(\s.*)?$")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#+ (.+)$", text, re.M)}


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))  # code blocks hold code, not links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    assert not broken, f"{page.relative_to(REPO)} links to: " + "; ".join(broken)


def test_the_docs_index_lists_every_page():
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    pages = {p.name for p in (REPO / "docs").glob("*.md")} - {"README.md"}
    assert not sorted(p for p in pages if f"]({p})" not in index), "pages missing from docs/README.md"


def quoted_commands(page: Path) -> list[tuple[str, list[str]]]:
    """Each rnnlm command line a page quotes in its code blocks: (command, its arguments), with continued lines
    joined, environment variables in front and comments removed."""
    found = []
    for block in FENCE.findall(page.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^(\w+=\S*\s+)+", "", line.strip())  # OMP_NUM_THREADS=1 python ...
            match = COMMAND.match(line)
            if match:  # a synopsis's optional parts, [key=value], are left out
                arguments = [a for a in shlex.split(match[3] or "", comments=True) if not re.fullmatch(r"\[.*\]", a)]
                script = {name: command for command, name in CHECKOUT_SCRIPTS.items()}.get(match[1], match[1])
                found.append((script or match[2], arguments))
    return found


def readme_commands() -> list[tuple[str, list[str]]]:
    return quoted_commands(REPO / "README.md")


def all_quoted_commands() -> list:
    """README's commands in the default suite, the other pages' in the slow one."""
    return [pytest.param(str(page.relative_to(REPO)), command, arguments,
                         marks=() if page.name == "README.md" and page.parent == REPO else pytest.mark.slow)
            for page in PAGES for command, arguments in quoted_commands(page)]


def test_the_readme_quotes_the_everyday_commands():
    quoted = {command for command, _ in readme_commands()}
    assert {"train", "generate", "eval", "score", "report"} <= quoted


@pytest.mark.parametrize("page, command, arguments", all_quoted_commands(),
                         ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_every_quoted_command_is_accepted(page, command, arguments, tmp_path, monkeypatch, shared_data):
    """Composed and checked as the command does before any work (no training, nothing written): a renamed or
    removed setting, an unknown choice, a value out of range or an unreadable override in a quoted command fails
    here. What depends on the reader's machine and files passes: a placeholder (``<run>``, ``...``) or a file the
    reader names, a checkpoint not trained yet, a GPU or bfloat16 this machine lacks."""
    import importlib

    from rnnlm.commands.cli import check_command_line, quote_free_text
    from rnnlm.errors import UserError

    monkeypatch.chdir(tmp_path)  # relative outputs/ land here
    monkeypatch.syspath_prepend(str(REPO))  # examples.indrnn:IndRNN, as from the repository's folder
    monkeypatch.setenv("RNNLM_DATA_DIR", str(shared_data))
    arguments = [re.sub(r"<\w+>", "x", a) for a in arguments]
    if command == "report":
        from rnnlm.commands.report import parse_arguments

        (tmp_path / arguments[0]).mkdir(parents=True)  # the reader's sweep folder
        assert parse_arguments(arguments)
        return
    module = importlib.import_module(f"rnnlm.commands.{command}")
    arguments = quote_free_text(arguments, **getattr(module, "FREE_TEXT", {"text_keys": ()}))  # as its main() does
    try:
        check_command_line(command, arguments)
    except UserError as err:
        if not READERS_OWN.search(str(err)):
            raise


# Refusals that depend on the reader's files and machine, not on how the command is written.
READERS_OWN = re.compile(r"does not exist|must be an existing (file|folder)|found no run with checkpoints|"
                         r"needs a CUDA GPU|no GPU is available|this CPU cannot run .* in bfloat16")


def readme_block_after(marker: str) -> list[str]:
    """The lines of the first README code block after the paragraph that contains ``marker``."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return FENCE.search(text, text.index(marker))[1].splitlines()


def test_the_readme_inference_commands_run_on_the_main_jobs_model(tmp_path, shared_data, cache_dir):
    """"After the main job" means it: README's generate, eval and score lines, run as quoted, on a checkpoint of
    the main job's own model and data (shrunk to a few steps), as a reader who followed the page has it."""
    from helpers import compose_train
    from rnnlm.commands.train import train

    main_job = next(arguments for command, arguments in readme_commands() if command == "train")
    assert main_job == ["model=gru", "data=char"], "the README's first training command is the main job"
    train(compose_train([*main_job, "test=false"], tmp_path / "outputs" / "train" / "runs" / "main", shared_data,
                        cache_dir))
    lines = [line for line in readme_block_after("**Generate, evaluate, score.**") if line.strip()]
    env = {**os.environ, "RNNLM_DATA_DIR": str(shared_data), "RNNLM_CACHE_DIR": str(cache_dir)}
    for line in lines:  # run by the shell as quoted, with this checkout's commands
        done = subprocess.run(line.replace("python src/", f"{sys.executable} {REPO}/src/"), shell=True, cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
