"""Sphinx directives that render references from the code, so nothing is written twice.

``argparse-table``: the flags of an ``argparse`` parser (and of its
subcommands) as tables.  Its argument is ``module:function`` and any further
words are passed to the function as strings::

    ```{argparse-table} pop3proto.transports._cli:build_parser anyio
    ```

``server-options``: ``pop3proto.options.OPTIONS`` as a table (name, default,
accepted values, meaning, and whether the command line can set it).
"""

from __future__ import annotations

import argparse
import importlib
import logging
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

Cell = nodes.Node | str


def _table(headers: list[str], rows: list[list[Cell]], widths: list[int]) -> nodes.table:
    table = nodes.table(classes=["longtable"])
    group = nodes.tgroup(cols=len(headers))
    table += group
    for width in widths:
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    row = nodes.row()
    for text in headers:
        row += nodes.entry("", nodes.paragraph(text=text))
    head += row
    body = nodes.tbody()
    group += body
    for cells in rows:
        row = nodes.row()
        for cell in cells:
            content = cell if isinstance(cell, nodes.Node) else nodes.Text(cell)
            row += nodes.entry("", nodes.paragraph("", "", content))
        body += row
    return table


def _literal(text: str) -> nodes.literal:
    return nodes.literal(text=text)


def _default_text(value: Any) -> str:
    if isinstance(value, logging.Logger):
        return f'logging.getLogger("{value.name}")'
    return repr(value)


class ArgparseTable(SphinxDirective):
    """Render a parser's actions (and its subcommands') as tables."""

    required_arguments = 1
    optional_arguments = 10

    def run(self) -> list[nodes.Node]:
        target, *args = self.arguments
        module_name, _, func_name = target.partition(":")
        parser = getattr(importlib.import_module(module_name), func_name)(*args)
        return self._render(parser)

    def _render(self, parser: argparse.ArgumentParser) -> list[nodes.Node]:
        from pop3proto.options import OPTIONS

        out: list[nodes.Node] = []
        usage = parser.format_usage().strip()
        out.append(nodes.literal_block(usage, usage))
        if parser.description:
            out.append(nodes.paragraph(text=parser.description))
        rows: list[list[Cell]] = []
        subparsers: list[argparse._SubParsersAction[Any]] = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                subparsers.append(action)
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            flags = ", ".join(action.option_strings) or str(action.metavar or action.dest)
            if action.nargs == 0 or not action.option_strings:
                value = ""
            else:
                value = action.metavar or action.dest.upper()
            if action.choices:
                accepts = " | ".join(str(c) for c in action.choices)
            elif action.nargs == 0:
                accepts = "(a switch)"
            else:
                accepts = getattr(action.type, "__name__", "str")
            default = "" if action.default in (None, False, argparse.SUPPRESS) else repr(
                action.default)
            meaning = action.help or ""
            if not meaning and action.dest in OPTIONS:  # the Server option the flag sets
                meaning = OPTIONS[action.dest].doc
            rows.append([_literal(f"{flags} {value}".strip()), default, accepts, meaning])
        if rows:
            out.append(_table(["flag", "default", "accepts", "meaning"], rows, [30, 12, 20, 45]))
        for sub in subparsers:
            for name, subparser in sub.choices.items():
                section = nodes.rubric(text=f"{parser.prog} {name}")
                out.append(section)
                out.extend(self._render(subparser))
        return out


class ServerOptions(SphinxDirective):
    """Render ``pop3proto.options.OPTIONS`` as one table."""

    def run(self) -> list[nodes.Node]:
        from pop3proto.options import OPTIONS

        rows: list[list[Cell]] = []
        for option in OPTIONS.values():
            notes = []
            if option.listen:
                notes.append("takes effect at the next up()")
            notes.append("command line/config file" if option.cli else "code only")
            rows.append([
                _literal(option.name),
                _literal(_default_text(option.default)),
                option.accepts,
                f"{option.doc} ({'; '.join(notes)})",
            ])
        return [_table(["option", "default", "accepts", "meaning"], rows, [18, 18, 20, 44])]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("argparse-table", ArgparseTable)
    app.add_directive("server-options", ServerOptions)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
