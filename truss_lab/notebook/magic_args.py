"""What `%truss` takes: its subcommands and options (one argparse parser, so `%truss --help` and each
subcommand's help come from the same declarations), and how a line splits into options and the Python
expression after them."""

from __future__ import annotations

import argparse
import keyword
import re
import shlex
from pathlib import Path

from IPython.core.error import UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as one UsageError line instead of exiting the kernel."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status=0, message=None):
        if message:
            raise UsageError(message.strip())
        raise _HelpShown()


class _HelpShown(Exception):
    pass


def build_parser() -> _Parser:
    parser = _Parser(prog="%truss", description="Develop a Truss in this notebook (truss_lab).", add_help=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("init", help="write a new Truss scaffold (as `truss init` does)")
    p.add_argument("path")
    p.add_argument("--name")
    p.add_argument("--python-config", action="store_true", help="a single-file ModelBase model")
    p = sub.add_parser("load", help="load a Truss; binds it to a variable and watches it for edits")
    p.add_argument("path")
    p.add_argument("--as", dest="var", metavar="VAR", help="variable name (default: from the folder name)")
    p.add_argument("--concurrency", type=int, metavar="N", help="lock size (overrides runtime.predict_concurrency)")
    p.add_argument("--no-watch", action="store_true", help="do not reload on save")
    p.add_argument("--no-guard", action="store_true", help="do not watch predict for lock misuse")
    p = sub.add_parser("predict", help="run preprocess -> predict -> postprocess on EXPR and show the result")
    p.add_argument("--model", metavar="VAR", help="a LiveModel variable (default: the last loaded)")
    p.add_argument("--method", default="predict", metavar="NAME",
                   help="predict (default), or an OpenAI-compatible method: chat_completions, completions, embeddings, messages, responses")
    p.add_argument("expr", nargs=argparse.REMAINDER, help="a Python value, a path, a URL, or example:NAME")
    p = sub.add_parser("reload", help="reload edited code now")
    p.add_argument("--model", metavar="VAR")
    p.add_argument("--full", action="store_true", help="rebuild and re-run load() even if only methods changed")
    p = sub.add_parser("watch", help="turn reload-on-save on or off")
    p.add_argument("state", choices=("on", "off"))
    p.add_argument("--model", metavar="VAR")
    p.add_argument("--examples", action="store_true", help="after every reload, re-run examples.yaml and show what changed")
    p = sub.add_parser("status", help="version, last reload, lock size, traces kept, last report")
    p.add_argument("--model", metavar="VAR")
    p = sub.add_parser("bench", help="send N requests from C workers; show the report")
    p.add_argument("-n", type=int, default=100, help="requests (default 100)")
    p.add_argument("-c", type=int, default=8, help="concurrent workers (default 8)")
    p.add_argument("--as", dest="var", metavar="VAR", help="also bind the report to VAR (for %%truss compare)")
    p.add_argument("--model", metavar="VAR")
    p.add_argument("expr", nargs=argparse.REMAINDER, help="input (default: cycle over examples.yaml)")
    p = sub.add_parser("profile", help="profile N requests per stage: where inside each stage the time goes")
    p.add_argument("-n", type=int, default=1, help="requests (default 1)")
    p.add_argument("--model", metavar="VAR")
    p.add_argument("--as", dest="var", metavar="VAR", help="also bind the Profile to VAR")
    p.add_argument("expr", nargs=argparse.REMAINDER, help="input (default: the examples in turn)")
    p = sub.add_parser("timeline", help="the lock timeline of the last bench (or the last N traces)")
    p.add_argument("--model", metavar="VAR")
    p.add_argument("--last", type=int, metavar="N", help="the model's last N traces instead of the last bench")
    p.add_argument("--by", choices=("request", "worker"), default="request", help="one row per request or per worker")
    p = sub.add_parser("compare", help="two reports side by side: throughput, p95, lock utilization, ratios")
    p.add_argument("a", metavar="A", help="a Report variable (e.g. from %%truss bench --as A)")
    p.add_argument("b", metavar="B")
    p = sub.add_parser("guard", help="turn the lock-misuse guard on or off")
    p.add_argument("state", choices=("on", "off"))
    p.add_argument("--model", metavar="VAR")
    p = sub.add_parser("check", help="run the examples on the real Truss server and here, compare, and lint for deploy")
    p.add_argument("--model", metavar="VAR")
    p.add_argument("--input", action="append", metavar="JSON", help="a request to send (repeatable; default: every example)")
    p = sub.add_parser("widget", help="an interactive panel for this model")
    p.add_argument("--model", metavar="VAR")
    p = sub.add_parser("traceback", help="the last error's traceback, filtered to your files")
    p.add_argument("--model", metavar="VAR")
    return parser


def strip_comment(line: str) -> str:
    """`line` without a trailing `# comment` (a `#` at the start of a word, outside quotes), as a
    shell and Python both read it: `%truss load my-truss   # watches it` loads `my-truss`."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote is not None:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        i += 1
    return line


def split_line(line: str) -> list[str]:
    """The words of a line for commands without EXPR, as a shell splits them (quotes kept together)."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    return list(lexer)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def split_expr(rest: str, parser: argparse.ArgumentParser) -> tuple[list[str], str]:
    """(option words, EXPR): the leading words of `rest` that are `parser`'s options (and their
    values), then everything after them, verbatim. `--` ends the options."""
    takes_value = {o: a.nargs != 0 for a in parser._actions for o in a.option_strings}
    tokens: list[str] = []
    pos = 0
    while True:
        m = re.compile(r"\s*(\S+)").match(rest, pos)
        if m is None:
            return tokens, ""
        word = m.group(1)
        if word == "--":
            return tokens, rest[m.end(1):].strip()
        name = word.split("=", 1)[0]
        if name not in takes_value:
            return tokens, rest[m.start(1):].strip()
        tokens.append(word)
        pos = m.end(1)
        if takes_value[name] and "=" not in word:
            value = re.compile(r"\s*(\S+)").match(rest, pos)
            if value is not None:
                tokens.append(value.group(1))
                pos = value.end(1)


def variable_name(path: str) -> str:
    name = re.sub(r"\W", "_", Path(path).resolve().name).strip("_") or "model"
    if name[0].isdigit() or keyword.iskeyword(name):
        name = f"truss_{name}"
    return name


def _is_file(text: str) -> bool:
    """Whether `text` names an existing file (a 300-character dict literal is not a path: no OSError)."""
    if len(text) > 4096 or "\n" in text:
        return False
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError, RuntimeError):  # name too long, NUL byte, no home for ~user
        return False
