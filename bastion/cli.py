"""The `bastion` command line: one program, one module per subcommand in `bastion.commands`.

Exit codes: 0 when the command did its job (a report written, a verdict given), 1 when a
pass criterion the user asked for fails, 2 on bad input or an output that cannot be written
(one line on stderr, no traceback). A `BastionWarning` prints as one line `bastion: warning: …`.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from bastion.commands.common import EXIT_BAD_INPUT, EXIT_OK, Parser
from bastion.errors import BastionError, BastionWarning

# Each module has `register(subparsers)`, which adds its subcommands with a `handler`.
_COMMAND_MODULES = (
    "bastion.commands.report",
    "bastion.commands.defend",
    "bastion.commands.fool",
    "bastion.commands.scaling",
    "bastion.commands.verify",
)
_DEFAULT_COMMAND = "report"  # `bastion [MODEL] [options]` is `bastion report …`


def build_parser() -> Parser:
    """The parser of every subcommand."""
    parser = Parser(
        prog="bastion", description="Adversarial robustness testing for PyTorch image classifiers."
    )
    parser.add_argument(
        "--version", action="version", version=f"bastion {__import__('bastion').__version__}"
    )
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    parser.commands = frozenset(sub.choices)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `bastion` with `argv` (default: sys.argv) and return the exit code."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if words[:2] == ["attack", "fooling"]:  # the generative attack has its own command
        words = ["fool", *words[2:]]
    if not words or words[0] not in {*parser.commands, "-h", "--help", "--version"}:
        words = [_DEFAULT_COMMAND, *words]
    args = parser.parse_args(words)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.handler(args))
    except BastionError as exc:
        print(f"bastion: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `bastion … | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        # the output folder became unwritable (or full) mid-run
        log = Path(getattr(args, "out", None) or ".") / "results.jsonl"
        kept = (
            f"; the finished work in {log} is kept: fix that, then rerun the same command "
            "with --resume to finish"
            if getattr(args, "resume", None) is not None and log.is_file()
            else "; fix that and rerun"
        )
        where = f" {exc.filename}" if exc.filename else ""
        print(f"bastion: error: cannot write{where} ({exc.strerror}){kept}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            "bastion: interrupted; rerun the same command with --resume to continue",
            file=sys.stderr,
        )
        return 130


_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
_default_showwarning = warnings.showwarning


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A `BastionWarning` as one line `bastion: warning: …`; other warnings as Python shows them."""
    if issubclass(category, BastionWarning):
        print(f"bastion: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


if __name__ == "__main__":
    sys.exit(main())
