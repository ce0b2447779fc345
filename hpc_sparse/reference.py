"""Reference pages generated from the code, so that they cannot drift from it.

- :func:`config_reference_markdown`: every config key, from the dataclasses of
  :mod:`hpc_sparse.config` (type, default, allowed values, help text, section docstrings).
- :func:`cli_reference_markdown`: every ``hpc-sparse`` subcommand and option, from the CLI's
  argparse parser (subcommands found in the parser, not listed by hand).

``python tools/gen_reference_docs.py`` writes both into ``docs/``; a test fails when the
committed pages differ from what the code generates. ``hpc-sparse config-help --markdown``
prints the first.
"""

from __future__ import annotations

import argparse
import inspect
import json
from typing import Any, get_type_hints

from hpc_sparse import config as config_mod

REGENERATE = "python tools/gen_reference_docs.py"

_TYPE_NAMES = {bool: "true/false", int: "integer", float: "number", str: "string", list[int]: "list of integers"}


def _header(title: str, source: str, change: str) -> list[str]:
    """Title and the note that tells contributors how to regenerate the page."""
    return [f"# {title}", "",
            f"<!-- Generated from {source} by `{REGENERATE}`; do not edit by hand. -->", "",
            '!!! note "Generated page"',
            f"    This page is generated from {source}; do not edit it by hand. After {change}, run",
            f"    `{REGENERATE}` and commit the result: `tests/test_docs.py` fails while the page is out of date.",
            ""]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no column breaks, no accidental emphasis or HTML."""
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")
            .replace("\n", " "))


def _allowed(meta: dict[str, Any]) -> str:
    """The bounds a key's value must keep, e.g. ``> 0``, ``0 to 1``, ``"a" | "b"``."""
    if meta.get("choices"):
        return ", ".join(f"`{json.dumps(c)}`" for c in meta["choices"])
    lo, hi, open_lo = meta.get("min"), meta.get("max"), meta.get("exclusive_min", False)
    if lo is not None and hi is not None:
        return f"> {lo}, ≤ {hi}" if open_lo else f"{lo} to {hi}"
    if lo is not None:
        return f"> {lo}" if open_lo else f"≥ {lo}"
    if hi is not None:
        return f"≤ {hi}"
    return ""


def _section_class(section: str) -> type:
    """The dataclass of a dotted section name, e.g. ``"train"`` -> :class:`TrainConfig`."""
    cls: type = config_mod.Config
    for name in section.split("."):
        cls = get_type_hints(cls)[name]
    return cls


def config_reference_markdown() -> str:
    """The configuration reference page: one table per section, one row per key."""
    out = _header("Configuration reference", "the config dataclasses in `hpc_sparse/config.py`",
                  "adding or changing a config key (its default, bounds or help text)")
    out += ["A run reads one TOML file (`--config`) and `--set section.key=value` overrides; the "
            "precedence is command line > file > defaults. Unknown keys, wrong types and values out of "
            "range stop the run before it starts, with one line naming the key and the fix. "
            "`hpc-sparse config-help` prints the same keys in a terminal.", ""]
    sections: dict[str, list[tuple[str, Any, Any, Any]]] = {}
    for key, field, ftype, default in config_mod.iter_keys():
        section = key.rpartition(".")[0]
        sections.setdefault(section, []).append((key, field, ftype, default))
    for section, rows in sections.items():
        if section:
            out += [f"## [{section}]", "", inspect.getdoc(_section_class(section)) or "", ""]
        else:
            out += ["## Top level", "", "Keys outside any `[section]` of the file.", ""]
        out += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for key, field, ftype, default in rows:
            meta = dict(field.metadata)
            out.append(f"| <a id=\"{key}\"></a>`{key}` | {_TYPE_NAMES.get(ftype, str(ftype))} | "
                       f"`{json.dumps(default)}` | {_cell(_allowed(meta))} | {_cell(meta.get('help', ''))} |")
        out.append("")
    return "\n".join(out)


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` of every subcommand, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    return f"`{action.metavar or action.dest.upper()}`"


def _option_row(action: argparse.Action) -> str:
    name = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
    notes = []
    if action.required or not action.option_strings:
        notes.append("required")
    if isinstance(action, argparse._AppendAction) and "repeatable" not in (action.help or ""):
        notes.append("repeatable")
    shown_default = action.nargs != 0 and not (action.default is None or action.default == []
                                               or action.default == argparse.SUPPRESS)
    default = f"`{action.default}`" if shown_default else ""
    text = _cell(action.help or "")
    if notes:
        text = f"({', '.join(notes)}) {text}"
    return f"| {name} | {_value(action)} | {default} | {text} |"


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    actions = [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    if not actions:
        return ["No options.", ""]
    return ["| option | value | default | meaning |", "|---|---|---|---|", *map(_option_row, actions), ""]


def cli_reference_markdown(parser: argparse.ArgumentParser) -> str:
    """The CLI reference page: the program's own options, then every subcommand's."""
    prog = parser.prog
    out = _header("CLI reference", "the command-line parser in `hpc_sparse/cli.py`",
                  "adding or changing a subcommand or an option")
    out += [f"`{prog}` and `python -m hpc_sparse` are the same program; under MPI run it as "
            "`mpiexec -n P python -m mpi4py -m hpc_sparse ...` (see [Running](running.md)). "
            f"`{prog} SUBCOMMAND --help` prints a subcommand's options in a terminal.", "",
            f"## `{prog}`", "", parser.description or "", "", *_options_table(parser)]
    subs = _subcommands(parser)
    out += ["| subcommand | what it does |", "|---|---|",
            *(f"| [`{name}`](#{prog}-{name}) | {_cell(text)} |" for name, text, _ in subs), ""]
    for name, text, sub in subs:
        out += [f"## `{prog} {name}` {{#{prog}-{name}}}", "", text[:1].upper() + text[1:] + ".", "",
                *_options_table(sub)]
    return "\n".join(out)
