"""`edgefleet fog …`: run the gateway, manage device tokens, read completeness.

    edgefleet fog run [--config fog.yaml] [--port N] [--store URL]
    edgefleet fog add-device NAME [--config fog.yaml | --tokens FILE]   # prints the token once
    edgefleet fog remove-device NAME [--config fog.yaml | --tokens FILE]
    edgefleet fog completeness [--config fog.yaml | --store URL] [--json]

Only the standard library is imported at module level (see deploy/cli.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import FogConfig

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="fog_command", required=True, metavar="COMMAND")

    def config_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", type=Path, help="fog.yaml (default: all defaults, "
                         "files relative to the working directory)")

    serve = commands.add_parser("run", help="serve the ingest (and bridge, sink) until SIGTERM")
    config_option(serve)
    serve.add_argument("--host", help="listen address (overrides listen.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides listen.port; 0: any)")
    serve.add_argument("--store", help="store URL (overrides store)")
    serve.add_argument("--ready-file", type=Path,
                       help="write the bound port here once serving (for scripts and tests)")

    for name, text in (("add-device", "create or rotate a device's token and print it"),
                       ("remove-device", "revoke a device's token")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("device")
        config_option(sub)
        sub.add_argument("--tokens", type=Path, help="the token file (overrides tokens_file)")

    completeness = commands.add_parser(
        "completeness", help="rows received ÷ rows expected per device, with gaps and duplicates"
    )
    config_option(completeness)
    completeness.add_argument("--store", help="store URL (overrides store)")
    completeness.add_argument("--json", action="store_true", help="one JSON object per device")


def _config(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> FogConfig:
    from edgefleet.deploy.cli import CliError

    from .config import FogConfigError, load_fog_config

    try:
        return load_fog_config(args.config, overrides)
    except FogConfigError as err:
        where = f"{args.config}: " if args.config else ""
        raise CliError(where + "\n  ".join(["invalid fog config:", *err.problems])) from None


def _tokens_path(args: argparse.Namespace) -> Path:
    return args.tokens if args.tokens is not None else _config(args).tokens_file


def run(args: argparse.Namespace) -> int:
    from edgefleet.deploy.cli import CliError

    command = args.fog_command
    if command == "add-device":
        from .auth import TokenFileError, add_device

        path = _tokens_path(args)
        try:
            token = add_device(path, args.device)
        except (ValueError, TokenFileError) as err:
            raise CliError(str(err)) from None
        print(token)
        print(f"token for {args.device!r} stored (hashed) in {path}; it is shown only once: "
              "give it to the agent as fog.token_file or $EDGEFLEET_FOG_TOKEN", file=sys.stderr)
        return 0
    if command == "remove-device":
        from .auth import TokenFileError, remove_device

        try:
            removed = remove_device(_tokens_path(args), args.device)
        except TokenFileError as err:
            raise CliError(str(err)) from None
        if not removed:
            raise CliError(f"no token for device {args.device!r}", 1)
        return 0
    if command == "completeness":
        return _completeness(args)
    return _serve(args)


def _completeness(args: argparse.Namespace) -> int:
    from edgefleet.deploy.cli import CliError

    from .store import StoreUnavailable, open_store

    config = _config(args, {"store": args.store} if args.store else None)
    try:
        store = open_store(config.store)
        rows = store.completeness()
        store.close()
    except StoreUnavailable as err:
        raise CliError(str(err), 1) from None
    if args.json:
        for row in rows:
            print(json.dumps({"device": row.device, "received": row.received,
                              "expected": row.expected, "missing": row.missing,
                              "duplicates": row.duplicates, "ratio": row.ratio}))
        return 0
    print(f"{'device':<24} {'received':>12} {'expected':>12} {'missing':>10} "
          f"{'duplicates':>10} {'ratio':>8}")
    for row in rows:
        print(f"{row.device:<24} {row.received:>12} {row.expected:>12} {row.missing:>10} "
              f"{row.duplicates:>10} {row.ratio:>8.4f}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from edgefleet.deploy.cli import CliError

    from .auth import TokenFileError
    from .gateway import serve, setup_logging
    from .store import StoreUnavailable

    overrides: dict[str, Any] = {}
    if args.store:
        overrides["store"] = args.store
    config = _config(args, overrides)
    if args.host is not None or args.port is not None:
        listen = config.listen.model_copy(update={
            key: value for key, value in (("host", args.host), ("port", args.port))
            if value is not None
        })
        config = config.model_copy(update={"listen": listen})
    setup_logging(config.log_format, config.log_level)

    def ready(port: int) -> None:
        if args.ready_file is not None:
            temporary = args.ready_file.with_name(args.ready_file.name + ".tmp")
            temporary.write_text(str(port))
            temporary.replace(args.ready_file)

    try:
        return asyncio.run(serve(config, on_ready=ready))
    except StoreUnavailable as err:
        raise CliError(f"cannot start: {err}", 1) from None
    except TokenFileError as err:
        raise CliError(str(err), 1) from None
