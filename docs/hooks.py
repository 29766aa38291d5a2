"""MkDocs hooks: the Command line page is written from the CLI's own parser, so it always matches
`truss-lab --help` (a `<!-- cli-help -->` marker is replaced by every command's help); the home page
is the README (a `<!-- readme -->` marker), its links to `docs/...` made the site's own: one text,
two places."""

from __future__ import annotations

import re
from pathlib import Path

MARKER = "<!-- cli-help -->"
README = "<!-- readme -->"
ROOT = Path(__file__).resolve().parent.parent


def cli_help() -> str:
    import argparse
    import os

    from truss_lab.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: the page is the same wherever it is built
    parser = build_parser()
    parts = [f"```text\n{parser.format_help().rstrip()}\n```"]
    for action in parser._actions:  # argparse keeps its subcommands here and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                parts.append(f"## `truss-lab {name}`\n\n```text\n{sub.format_help().rstrip()}\n```")
    return "\n\n".join(parts)


def readme() -> str:
    text = (ROOT / "README.md").read_text()
    return re.sub(r"\]\(docs/", "](", text)  # the README's links into docs/ are the site's pages


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_help())
    if README in markdown:  # the whole page: what follows the marker is for a reader of the file on GitHub
        markdown = readme()
    return markdown
