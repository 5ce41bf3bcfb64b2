"""Command line: ``napari-diffcut segment IMAGE [IMAGE ...] --out DIR`` (and further subcommands).

A user mistake (bad option value, missing file or model) prints one line
``napari-diffcut: error: ...`` in command-line spelling (``--device auto``,
not ``device='auto'``) and exits with status 2, never a traceback and never
the full usage. Heavy imports happen only once a command runs, and the model
is checked before torch is imported, so ``--help`` and mistakes answer at once.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from importlib import import_module
from typing import NoReturn

from napari_diffcut.core.errors import DiffCutError
from napari_diffcut.core.version import __version__
from napari_diffcut.pipeline.options import SETTING_OPTIONS, UserError

PROG = "napari-diffcut"

#: Subcommands living in other modules: name -> module with ``add_parser(subparsers)``
#: returning the parser, whose ``func`` default runs the command.
EXTRA_COMMANDS: dict[str, str] = {
    "batch": "napari_diffcut.batch.command",
    "evaluate": "napari_diffcut.evaluation.command",
}

#: Python names of options as the library spells them in messages (``min_size``);
#: the command line says ``--min-size``.
OPTION_NAMES = (*SETTING_OPTIONS, "levels", "overwrite", "out", "sample")

_NAME = "|".join(sorted(OPTION_NAMES, key=len, reverse=True))
#: ``name=value`` with a quoted, bracketed or plain value.
_ASSIGNMENT = re.compile(rf"\b({_NAME})=('[^']*'|\"[^\"]*\"|\[[^\]]*\]|[^\s,;)]+)")
#: ``name must ...`` at the start of a message or of a clause.
_SUBJECT = re.compile(rf"(^|[;:] )({_NAME}) (must|is|has)\b")
#: ``name (--name)``: the library's way of naming both spellings.
_BOTH = re.compile(rf"\b({_NAME}) \((--[\w-]+)\)")
#: Any ``snake_case`` option name left (unambiguous, unlike ``model`` or ``power``).
_SNAKE = re.compile(r"\b(" + "|".join(n for n in OPTION_NAMES if "_" in n) + r")\b")
#: ``--x V (--x V)`` once both spellings have become the same.
_TWICE = re.compile(r"(--[\w-]+(?: [^\s()]+)?) \(\1\)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _assignment(match: re.Match[str]) -> str:
    name, value = match.group(1), match.group(2)
    if value == "True":
        return _flag(name)
    if value[:1] in "'\"":
        value = value[1:-1]
    elif value.startswith("["):
        value = ",".join(v.strip() for v in value[1:-1].split(","))
    return f"{_flag(name)} {value}"


def cli_message(message: str) -> str:
    """One line in command-line spelling from a library message.

    Only the first line is kept (decoders append install hints on further
    lines); ``device='auto'`` becomes ``--device auto``, ``min_size must``
    becomes ``--min-size must``, and ``model (--model)`` becomes ``--model``.

    Examples
    --------
    >>> cli_message("device='cuda' was asked for; use device='auto' or 'cpu'")
    "--device cuda was asked for; use --device auto or 'cpu'"
    >>> cli_message("power must be an integer >= 1, got 0")
    '--power must be an integer >= 1, got 0'
    >>> cli_message("pass model=DIR (--model DIR), or allow_pickle=True (--allow-pickle)")
    'pass --model DIR, or --allow-pickle'
    """
    lines = str(message).strip().splitlines()
    text = lines[0].strip() if lines else ""
    text = _BOTH.sub(lambda m: m.group(2), text)
    text = _ASSIGNMENT.sub(_assignment, text)
    text = _SUBJECT.sub(lambda m: f"{m.group(1)}{_flag(m.group(2))} {m.group(3)}", text)
    text = _SNAKE.sub(lambda m: _flag(m.group(1)), text)
    return _TWICE.sub(lambda m: m.group(1), text)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, as every other error.

    argparse prints the whole usage (20 lines for ``segment``) before the
    message; here the message names ``--help`` instead.
    """

    #: The subcommand parsers by name (set by :func:`build_parser`).
    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        """Print ``napari-diffcut: error: MESSAGE (see ... --help)`` and exit with 2."""
        text = cli_message(message)
        # "argument --device: --device must ..." says the name twice.
        text = re.sub(r"^argument (--[\w-]+)(?:/-\w)?: \1 ", r"\1 ", text)
        self.exit(2, f"{PROG}: error: {text} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (subcommands registered by module)."""
    from napari_diffcut.cli.segment import add_segment_parser

    parser = OneLineParser(
        prog=PROG,
        description="Zero-shot segmentation from Stable Diffusion self-attention "
        "(diffuse, walk, cut). See README.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_segment_parser(sub)
    for module in EXTRA_COMMANDS.values():
        import_module(module).add_parser(sub)
    parser.commands = dict(sub.choices)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-diffcut`` console script; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand, whose --help lists what it takes
        command = parser.commands.get(getattr(args, "command", None) or "", parser)
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, DiffCutError, ValueError, FileNotFoundError) as exc:
        print(f"{PROG}: error: {cli_message(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
