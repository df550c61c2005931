"""``recvae serve``: serve a model bundle (or an MLflow registry alias) over HTTP.

Starts uvicorn on the app factory by its import string, ``serving.app:app_from_env``, so this
module never imports ``serving``: the flags travel to the app as ``RECVAE_*`` environment
variables (the variables the app reads anyway), which also reach every worker process.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from typing import Any

from pipelines.commands._common import convert_argument, positive_int

APP_FACTORY = "serving.app:app_from_env"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def _port(text: str) -> int:
    value = convert_argument(text, int, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def _seconds(text: str) -> float:
    value = convert_argument(text, float, "a number")
    if not (value == 0 or 1 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be 0 (off) or >= 1 second, got {text}")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve recommendations over HTTP (FastAPI + uvicorn)",
        description=(
            "Serve a model bundle, or an MLflow model URI such as models:/NAME@ALIAS, as a JSON "
            "API with OpenAPI docs at /docs. Every option can also come from a RECVAE_* "
            "environment variable (flags win). The admin reload route needs "
            "RECVAE_ADMIN_TOKEN in the environment (never on the command line)."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bundle", type=Path, help="model bundle directory [RECVAE_BUNDLE]")
    source.add_argument(
        "--model",
        metavar="URI",
        help="MLflow model URI, e.g. models:/recvae@champion [RECVAE_MODEL_URI]",
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI for --model [RECVAE_TRACKING_URI]"
    )
    net = parser.add_argument_group("server")
    net.add_argument("--host", help=f"bind address (default {DEFAULT_HOST}) [RECVAE_HOST]")
    net.add_argument("--port", type=_port, help=f"port (default {DEFAULT_PORT}) [RECVAE_PORT]")
    net.add_argument(
        "--workers",
        type=positive_int,
        help="worker processes, each with its own model copy (default 1) [RECVAE_WORKERS]",
    )
    net.add_argument(
        "--threads",
        type=positive_int,
        help="torch threads per worker (default 1) [RECVAE_TORCH_THREADS]",
    )
    net.add_argument(
        "--micro-batch",
        type=positive_int,
        help="most concurrent requests scored as one batch, 1 = off (default 32) "
        "[RECVAE_MICRO_BATCH]",
    )
    net.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default info)",
    )
    net.add_argument(
        "--no-access-log", action="store_true", help="do not log every request (faster)"
    )
    limits = parser.add_argument_group("requests")
    limits.add_argument(
        "--default-k", type=positive_int, help="k when a request gives none [RECVAE_DEFAULT_K]"
    )
    limits.add_argument("--max-k", type=positive_int, help="largest k allowed [RECVAE_MAX_K]")
    limits.add_argument(
        "--max-history",
        type=positive_int,
        help="most items in one history [RECVAE_MAX_HISTORY]",
    )
    limits.add_argument(
        "--max-batch",
        type=positive_int,
        help="most histories in one batch request [RECVAE_MAX_BATCH]",
    )
    limits.add_argument(
        "--max-body-bytes",
        type=positive_int,
        help="largest request body in bytes, 413 above it (default 16 MiB) [RECVAE_MAX_BODY_BYTES]",
    )
    limits.add_argument(
        "--poll-interval",
        type=_seconds,
        help="seconds between checks of the registry alias of --model, 0 = off "
        "[RECVAE_POLL_INTERVAL]",
    )
    parser.set_defaults(func=run_command)


def _env_int(name: str, default: int) -> int:
    from pipelines.cli import CLIError

    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise CLIError(f"{name}={raw!r} is not an integer") from None


def server_environment(args: argparse.Namespace) -> dict[str, str]:
    """The ``RECVAE_*`` variables that carry the flags to the app (only the flags given)."""
    env: dict[str, str] = {}
    if args.bundle is not None:
        env["RECVAE_BUNDLE"] = str(Path(args.bundle).resolve())
    if args.model is not None:
        env["RECVAE_MODEL_URI"] = args.model
    pairs = {
        "RECVAE_TRACKING_URI": args.tracking_uri,
        "RECVAE_TORCH_THREADS": args.threads,
        "RECVAE_MICRO_BATCH": args.micro_batch,
        "RECVAE_DEFAULT_K": args.default_k,
        "RECVAE_MAX_K": args.max_k,
        "RECVAE_MAX_HISTORY": args.max_history,
        "RECVAE_MAX_BATCH": args.max_batch,
        "RECVAE_MAX_BODY_BYTES": args.max_body_bytes,
        "RECVAE_POLL_INTERVAL": args.poll_interval,
    }
    env.update({name: str(value) for name, value in pairs.items() if value is not None})
    return env


def _run_uvicorn(uvicorn: Any, workers: int, **options: Any) -> None:
    """``uvicorn.run`` of the app factory; with several workers, on a listener that keeps
    ``TCP_NODELAY``.

    uvicorn's multi-worker path binds the listening socket itself with protocol number 0;
    accepted connections inherit it, and asyncio only sets ``TCP_NODELAY`` on sockets that say
    ``IPPROTO_TCP``. Nagle's algorithm then holds each response's second segment until the
    client's delayed ACK: about 40 ms on every keep-alive request after the first (measured
    with ``benchmarks/serve_keepalive.py``, see BENCHMARKS.md; uvicorn issue #3149). The listener
    is rebuilt on the same file descriptor with ``IPPROTO_TCP``.
    """
    if workers == 1:
        uvicorn.run(APP_FACTORY, **options)
        return
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(APP_FACTORY, workers=workers, **options)
    listener = config.bind_socket()
    if listener.family in (socket.AF_INET, socket.AF_INET6) and listener.proto == 0:
        listener = socket.socket(
            listener.family, listener.type, socket.IPPROTO_TCP, fileno=listener.detach()
        )
    Multiprocess(config, sockets=[listener]).run()


def _log_config(uvicorn: Any, level: str) -> dict[str, Any]:
    """uvicorn's logging config plus the app's own loggers (model loads, reloads, errors)."""
    import copy

    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for name in ("serving", "recvae"):
        config["loggers"][name] = {
            "handlers": ["default"],
            "level": level.upper(),
            "propagate": False,
        }
    return config


def run_command(args: argparse.Namespace) -> int:
    from pipelines.cli import CLIError

    env = server_environment(args)
    # A source flag replaces whatever source the environment named.
    if "RECVAE_BUNDLE" in env:
        os.environ.pop("RECVAE_MODEL_URI", None)
    if "RECVAE_MODEL_URI" in env:
        os.environ.pop("RECVAE_BUNDLE", None)
    bundle = env.get("RECVAE_BUNDLE") or os.environ.get("RECVAE_BUNDLE", "").strip()
    model = env.get("RECVAE_MODEL_URI") or os.environ.get("RECVAE_MODEL_URI", "").strip()
    if not bundle and not model:
        raise CLIError(
            "nothing to serve: give --bundle PATH or --model models:/NAME@ALIAS "
            "(or set RECVAE_BUNDLE / RECVAE_MODEL_URI)"
        )
    if bundle and model:
        raise CLIError("RECVAE_BUNDLE and RECVAE_MODEL_URI are both set: keep one")
    if bundle:
        path = Path(bundle)
        if not path.is_dir():
            raise CLIError(f"no model bundle at {path} (expected a directory)")
        if not (path / "meta.json").is_file():
            raise CLIError(f"{path} is not a model bundle: meta.json is missing")
    host = args.host or os.environ.get("RECVAE_HOST", "").strip() or DEFAULT_HOST
    port = args.port if args.port is not None else _env_int("RECVAE_PORT", DEFAULT_PORT)
    workers = args.workers if args.workers is not None else _env_int("RECVAE_WORKERS", 1)
    if workers < 1:
        raise CLIError(f"RECVAE_WORKERS must be >= 1, got {workers}")
    try:
        import uvicorn
    except ImportError as exc:
        raise CLIError(
            f"serving needs the serve extra: pip install 'recvae[serve]' ({exc})"
        ) from exc
    os.environ.update(env)
    try:
        _run_uvicorn(
            uvicorn,
            workers,
            factory=True,
            host=host,
            port=port,
            log_level=args.log_level,
            log_config=_log_config(uvicorn, args.log_level),
            access_log=not args.no_access_log,
        )
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise CLIError(
                "the server did not start (the reason is logged above)", exit_code=3
            ) from None
    return 0
