"""The ``recvae`` command. Subcommands live in their own modules and register here.

Start-up stays fast: this module imports only the standard library; torch, polars and mlflow
are imported inside the commands that need them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

# Each module defines ``register(subparsers)``; the order is the order in --help.
COMMAND_MODULES = (
    "pipelines.commands.train",
    "pipelines.commands.evaluate",
    "pipelines.commands.recommend",
    "pipelines.commands.datasets",
    "pipelines.commands.experiment",
    "pipelines.commands.tune",
    "pipelines.commands.runs",
    "pipelines.commands.serve",
    "pipelines.commands.retrain",
    "pipelines.commands.anomalies",
)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's stop, ``torchrun`` stopping its workers), raised in
    the main thread like Ctrl-C, so that runs close (MLflow ``KILLED``, locks released,
    checkpoints kept) instead of dying in the middle."""


# SIGTERMs that arrived inside terminations_deferred() blocks, raised when the outermost ends.
_deferring = 0
_pending: list[int] = []


@contextmanager
def terminations_deferred() -> Iterator[None]:
    """A SIGTERM inside the block is raised as :class:`Terminated` when the block ends, not in
    its middle: for calls to a tracking store, where a transaction cut short can leave the
    database locked, and the run then cannot be ended ``KILLED``. If the block raised, the
    termination replaces its exception."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            _pending.clear()
            raise Terminated


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    if _deferring:
        _pending.append(signum)
        return
    raise Terminated


class CLIError(Exception):
    """A user-facing error: printed as ``recvae: error: ...`` with an exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def check_bundle_dir(path: Path) -> None:
    """Refuse a run folder given where its bundle is expected, naming the bundle inside.

    ``recvae train -o RUN`` writes the bundle to ``RUN/bundle``, so ``RUN`` itself is an easy
    slip; other problems are left to ``Recommender.load``, whose messages name them.

    Raises:
        CLIError: ``path`` has no ``meta.json`` but ``path/bundle`` is a bundle.
    """
    if path.is_dir() and not (path / "meta.json").is_file():
        inner = path / "bundle"
        if (inner / "meta.json").is_file():
            raise CLIError(f"{path} is a run folder, not a model bundle: did you mean {inner}?")


# A negative number, in every form ``float()`` reads (``-5``, ``-.5``, ``-1e3``, ``-inf``,
# ``-Infinity``, ``-nan``): a value, never an option. argparse's own rule knows only the first
# two, so ``--threshold -inf`` was "expected one argument" (only ``--threshold=-inf`` worked).
_DIGITS = r"\d(?:_?\d)*"  # digits, with single underscores between them as float() reads
NEGATIVE_NUMBER = re.compile(
    rf"^-(?:(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:e[+-]?{_DIGITS})?|inf(?:inity)?|nan)\Z",
    re.IGNORECASE,
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, taking every :data:`NEGATIVE_NUMBER` for a value (the subcommands'
    parsers are of this class too: ``add_subparsers`` makes them of the parent's class).

    So a negative number works after any flag that takes a value (``--threshold -1e3``) and
    as a positional (``recommend B -inf`` is an item id), unless a parser has an option that
    looks like a negative number (argparse's own exception; recvae has none). Unknown options
    are still "unrecognized arguments", and a stray number an unexpected positional.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def _parse_optional(self, arg_string: str) -> Any:
        # Before argparse's prefix matching, which would read "-inf" as "-i nf" in a parser
        # with a "-i" option.
        if (
            NEGATIVE_NUMBER.match(arg_string)
            and arg_string not in self._option_string_actions
            and not self._has_negative_number_optionals
        ):
            return None
        return super()._parse_optional(arg_string)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="recvae",
        description=(
            "Variational autoencoders for collaborative filtering: train, evaluate and serve "
            "Mult-VAE / Mult-DAE recommenders."
        ),
    )
    from recvae import __version__

    parser.add_argument("--version", action="version", version=f"recvae {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    # Imported lazily: these modules pull in numpy/scipy (and torch for the bundle error).
    errors: list[type[BaseException]] = [CLIError, ValueError, FileNotFoundError, KeyError]
    return tuple(errors)


_OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory", re.IGNORECASE)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[command]
            return found
    raise AssertionError(f"no subcommand {command}")  # pragma: no cover


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that ``recommend`` takes options among its item ids.

    argparse fills ``recommend``'s ``items`` (``nargs="*"``) with the first run of positional
    tokens only, and ``parse_intermixed_args`` does not support subcommands; so the ids left
    over after an option (``recommend B -k 5 1 2``, ``recommend B 1 --json 2``) are appended
    here, in order. Tokens that look like options are still errors, with ``recommend``'s usage.
    """
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    if args.command != "recommend":
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    # After a "--" every token is an item id, as argparse reads one before the first ids.
    before, after = _split_at_dashes(extras)
    unknown = [t for t in before if t.startswith("-") and not NEGATIVE_NUMBER.match(t)]
    if unknown:
        _subparser(parser, "recommend").error(f"unrecognized arguments: {' '.join(unknown)}")
    args.items = [*args.items, *before, *after]
    return args


def _split_at_dashes(tokens: list[str]) -> tuple[list[str], list[str]]:
    """The tokens before and after the first ``--`` (none after when there is none)."""
    if "--" not in tokens:
        return tokens, []
    at = tokens.index("--")
    return tokens[:at], tokens[at + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    previous = _on_sigterm(_raise_terminated)
    try:
        return int(args.func(args) or 0)
    except Terminated:
        print("recvae: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("recvae: interrupted", file=sys.stderr)
        return 130
    except CLIError as exc:
        print(f"recvae: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (
        ValueError,
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
    ) as exc:
        if args.verbose >= 2:
            raise
        print(f"recvae: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # e.g. no tracking server at the address given
        print(f"recvae: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine's: a full disk, a read-only file system, an I/O error
        if args.verbose >= 2:
            raise
        print(f"recvae: error: {exc}", file=sys.stderr)
        return 1
    except FloatingPointError as exc:  # training diverged: not a usage error
        print(f"recvae: error: {exc}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as exc:
        # torch reports a failed allocation (CPU or CUDA) as a RuntimeError; anything else
        # raised as RuntimeError is a bug and keeps its traceback.
        text = str(exc)
        if not isinstance(exc, MemoryError) and not _OUT_OF_MEMORY.search(text):
            raise
        reason = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        print(
            f"recvae: error: out of memory ({reason}); use a smaller model or batch "
            "(--latent-dim, --batch-size), or a machine with more memory",
            file=sys.stderr,
        )
        return 1
    except KeyError as exc:  # UnknownUserError and friends
        print(f"recvae: error: unknown id {exc}", file=sys.stderr)
        return 2
    finally:
        _on_sigterm(previous)


_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _on_sigterm(handler: _Handler) -> _Handler:
    """Install ``handler`` for SIGTERM and return the previous one (main thread only: signal
    handlers cannot be set elsewhere; uvicorn installs its own while ``serve`` runs)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
