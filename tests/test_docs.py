"""The documentation: the generated reference pages match the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from hpc_sparse.cli import _parser, main
from hpc_sparse.config import describe
from hpc_sparse.reference import REGENERATE, cli_reference_markdown, config_reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def _load_tool(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_match_the_code():
    stale = _load_tool("gen_reference_docs").stale_pages()
    assert not stale, (f"{', '.join(str(p.relative_to(ROOT)) for p in stale)} differ from what the code "
                       f"generates; fix: run `{REGENERATE}` and commit the result")


def test_config_reference_has_every_key():
    page = config_reference_markdown()
    for key, default, text in describe():
        row = next(line for line in page.splitlines() if f'<a id="{key}"></a>' in line)
        assert f"`{default}`" in row and row.count(" | ") == 4, row
    assert "| `data.name`" not in page  # the anchor comes first: every row was generated
    assert "\\|" in page  # a '|' inside a help text is escaped, so it does not split the row


def test_cli_reference_has_every_subcommand_and_option():
    parser = _parser()
    page = cli_reference_markdown(parser)
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert {"train", "evaluate", "info", "convert", "config-help"} <= set(subs)
    for name, sub in subs.items():
        section = page.split(f"## `hpc-sparse {name}`")[1].split("\n## ")[0]
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}`" in section, (name, option)


def test_config_help_markdown_prints_the_page(capsys):
    assert main(["config-help", "--markdown"]) == 0
    assert capsys.readouterr().out == config_reference_markdown()
