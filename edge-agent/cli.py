"""`edgefleet agent`: enroll the gateway, run the edge agent, check its config, handle its
dead letters.

    edgefleet agent check-config FILE        validate; print a one-paragraph summary
    edgefleet agent run --config FILE        run until SIGTERM/SIGINT
    edgefleet agent dlq --config FILE list   dead-lettered batches (id, device, seqs, …)
    edgefleet agent dlq --config FILE show ID [--json]
    edgefleet agent dlq --config FILE export ID [-o FILE]
    edgefleet agent dlq --config FILE delete ID
    edgefleet agent enroll --url URL --token T --device NAME [--state-dir DIR] [--cert]
                           [--ca-file FILE] [--write-config FILE]

Exit status: 0 done; 2 invalid config or usage (every problem on stderr with its field
path); 1 a runtime failure (the buffer is held by a running agent, an unknown DLQ id, an
enrollment refused or failed).

`enroll` trades a one-time enrollment token for the device's credentials (enroll.py): it
writes them into the state folder and prints the `fleet:` section of the agent config
that uses them (stdout; the rest goes to stderr).

`dlq` opens the buffer file itself, read-write, so it refuses to run while an agent holds
the buffer (one process owns a buffer file at a time, by an exclusive lock): stop the
agent, handle the dead letters, start it again. Dead letters wait in the buffer file for
as long as that takes. `export` writes a batch as wire JSON (`encode_json`), which the
fog's ingest accepts as is, so an operator can fix what the fog refused and replay it.

Module-level imports are the standard library only (`edgefleet --help` stays fast).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .buffer import SqliteBuffer
    from .config import AgentConfig

__all__ = ["add_arguments", "describe_config", "run"]

DEFAULT_STATE_DIR = "/var/lib/edgefleet"
FROM_STDIN = "-"  # `--token -`: read the token from stdin (not in `ps` or shell history)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="agent_action", metavar="ACTION", required=True)

    check = actions.add_parser(
        "check-config", help="validate an agent config and summarise it",
        description="Validate an agent config file; print a summary (exit 0) or every "
        "problem with its field path (exit 2).",
    )
    check.add_argument("file", type=Path, help="the agent's YAML config")

    run_parser = actions.add_parser(
        "run", help="run the agent until SIGTERM/SIGINT",
        description="Run the edge agent: read the sources, buffer, infer, forward to the fog.",
    )
    run_parser.add_argument("--config", type=Path, required=True, help="the agent's YAML config")

    dlq = actions.add_parser(
        "dlq", help="list, show, export or delete dead-lettered batches",
        description="Batches the fog refused for good wait in the buffer file's dead-letter "
        "tables until an operator deletes them. The agent must be stopped (it holds the "
        "buffer).",
    )
    dlq.add_argument("--config", type=Path, required=True, help="the agent's YAML config")
    dlq_actions = dlq.add_subparsers(dest="dlq_action", metavar="DLQ_ACTION", required=True)
    listing = dlq_actions.add_parser("list", help="one line per dead-lettered batch")
    listing.add_argument("--limit", type=int, default=100, help="at most (%(default)s)")
    show = dlq_actions.add_parser("show", help="one batch: summary, or its readings")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true", help="print each reading as a JSON line")
    export = dlq_actions.add_parser("export", help="the batch as wire JSON, for a replay")
    export.add_argument("id", type=int)
    export.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    delete = dlq_actions.add_parser("delete", help="delete a batch (after handling it)")
    delete.add_argument("id", type=int)

    enroll = actions.add_parser(
        "enroll", help="trade a one-time enrollment token for the device's credentials",
        description="POST the token to the control plane's /v1/enroll; write the device "
        "token, the fleet's public key (and with --cert a key made here, its certificate and "
        "the device CA) into the state folder; print the agent config's `fleet:` section. "
        "Exit 0 enrolled, 1 refused or failed (the reason on stderr), 2 bad arguments.",
    )
    enroll.add_argument("--url", required=True, help="the control plane, http(s)://host:port")
    enroll.add_argument("--token", required=True,
                        help="the one-time enrollment token ('-': read it from stdin)")
    enroll.add_argument("--device", required=True, help="this gateway's device name")
    enroll.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE_DIR),
                        help="where the credentials go (default %(default)s)")
    enroll.add_argument("--cert", action="store_true",
                        help="also get a client certificate: a new EC P-256 key is made "
                        "here (device.key, 0600) and only its CSR is sent")
    enroll.add_argument("--ca-file", type=Path,
                        help="the CA of the control plane's TLS certificate (https only)")
    enroll.add_argument("--write-config", type=Path, metavar="FILE",
                        help="write the fleet: section to FILE (a new file, to merge into "
                        "the agent config) instead of stdout")


def run(args: argparse.Namespace) -> int:
    action = args.agent_action
    if action == "check-config":
        config = _load(args.file)
        print(describe_config(config))
        return 0
    if action == "run":
        return _run_agent(_load(args.config))
    if action == "dlq":
        return _dlq(_load(args.config), args)
    if action == "enroll":
        return _enroll(args)
    raise AssertionError(action)  # argparse allows only the actions above


def _load(path: Path) -> AgentConfig:
    from edgefleet.deploy.cli import CliError

    from .config import AgentConfigError, load_agent_config

    try:
        return load_agent_config(path)
    except AgentConfigError as err:
        raise CliError(str(err), 2) from None


# ---- check-config ------------------------------------------------------------------------


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:g} {unit}" if unit == "B" else f"{count:.3g} {unit}"
        count /= 1024
    raise AssertionError


def _describe_source(source: Any) -> str:
    parts = [source.type]
    for attr, noun in (("devices", "device"), ("points", "point"), ("nodes", "node"),
                       ("subscriptions", "subscription")):
        items = getattr(source, attr, None)
        if isinstance(items, list | tuple):
            parts.append(f"{len(items)} {noun}{'s' if len(items) != 1 else ''}")
    interval = getattr(source, "poll_interval_s", None)
    if interval is not None:
        parts.append(f"every {interval:g} s")
    return f"{source.name} ({', '.join(parts)})"


def describe_config(config: AgentConfig) -> str:
    """A one-paragraph summary of a valid config (no secrets)."""
    from .config import FOG_TOKEN_ENV

    buffer = config.buffer
    sources = config.sources
    cap = f"cap {_size(buffer.max_bytes)}"
    if buffer.max_rows is not None:
        cap += f" or {buffer.max_rows} rows"
    model = config.model
    if model is None:
        model_text = "no model (data is forwarded without inference)"
    else:
        model_text = f"model {model.path}"
        if model.threshold is not None:
            model_text += f" (threshold {model.threshold:g})"
        if model.assets:
            model_text += f" on {', '.join(model.assets)}"
    fog = config.fog
    token = getattr(fog, "token", None)
    token_file = getattr(fog, "token_file", None)
    if token is not None:
        token_text = "token set"  # noqa: S105 - a description, not a token
    elif token_file is not None:
        token_text = f"token from {token_file}"
    else:
        token_text = f"no token (set {FOG_TOKEN_ENV} or fog.token_file)"
    metrics = config.metrics
    metrics_text = (
        f"metrics on http://{metrics.host}:{metrics.port}/metrics"
        if metrics.enabled else "metrics off"
    )
    alerts = config.alerts
    targets = [name for name, on in (("MQTT", alerts.mqtt_url is not None),
                                     ("webhook", alerts.webhook_url is not None)) if on]
    alerts_text = f"alerts to {' and '.join(targets)}" if targets else "no alerts"
    return (
        f"agent config OK: device {config.device!r}; "
        f"{len(sources)} source{'s' if len(sources) != 1 else ''}: "
        f"{'; '.join(_describe_source(s) for s in sources)}; "
        f"buffer {buffer.path} ({cap}, min free {_size(buffer.min_free_bytes)}, "
        f"when full: {buffer.when_full}); {model_text}; "
        f"fog {fog.url} ({token_text}); heartbeat every {config.heartbeat.interval_s:g} s; "
        f"{metrics_text}; {alerts_text}; drain {config.drain_timeout_s:g} s on stop."
    )


# ---- run ---------------------------------------------------------------------------------


def _run_agent(config: AgentConfig) -> int:
    import asyncio
    import logging

    from edgefleet.deploy.cli import CliError

    from .agent import run_agent
    from .buffer import BufferLocked, BufferOpenError

    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        status: int = asyncio.run(run_agent(config))
        return status
    except BufferLocked as err:
        raise CliError(
            f"{err}: another agent is running with this buffer; stop it first", 1
        ) from None
    except BufferOpenError as err:
        raise CliError(str(err), 1) from None


# ---- enroll ------------------------------------------------------------------------------


def _enroll(args: argparse.Namespace) -> int:
    import yaml

    from edgefleet.deploy.cli import CliError

    from .enroll import EnrollError, enroll

    token = sys.stdin.readline().strip() if args.token == FROM_STDIN else args.token
    target: Path | None = args.write_config
    if target is not None:  # checked before the token is spent
        if target.exists():
            raise CliError(f"--write-config: {target} exists; choose a new file", 2)
        if not target.parent.is_dir():
            raise CliError(f"--write-config: no folder {target.parent}", 2)
    try:
        result = enroll(args.url, token, args.device, args.state_dir, cert=args.cert,
                        ca_file=args.ca_file)
    except EnrollError as err:
        raise CliError(str(err), err.exit_code) from None
    say = sys.stderr
    print(f"enrolled {result.device} at {result.url}", file=say)
    print(f"  device token:     {result.token_file} (0600)", file=say)
    print(f"  fleet public key: {result.public_key_file} (key id {result.key_id}; trusted "
          "on first use: compare it with the control plane's log, or pin the key)", file=say)
    if result.cert_file is not None:
        print(f"  certificate:      {result.cert_file} (serial {result.cert_serial}, until "
              f"{result.cert_not_after}); key {result.key_file} (0600); CA {result.ca_file}",
              file=say)
    section = yaml.safe_dump({"fleet": result.fleet_section()}, sort_keys=False)
    if target is None:
        sys.stdout.write(section)
        return 0
    try:
        with target.open("x", encoding="utf-8") as handle:
            handle.write(section)
    except OSError as err:  # enrolled all the same: show the section rather than lose it
        sys.stdout.write(section)
        raise CliError(f"--write-config: cannot write {target}: {err.strerror or err} (the "
                       "device is enrolled; the fleet: section is on stdout)", 1) from None
    print(f"wrote the fleet: section to {target}", file=say)
    return 0


# ---- dlq ---------------------------------------------------------------------------------


def _open_buffer(config: AgentConfig) -> SqliteBuffer:
    from edgefleet.deploy.cli import CliError

    from .buffer import BufferLocked, BufferOpenError, SqliteBuffer

    path = config.buffer.path
    if not path.exists():  # opening would create an empty buffer
        raise CliError(f"no buffer at {path}: the agent has not run with this config", 1)
    try:
        return SqliteBuffer.open(config.buffer)
    except BufferLocked:
        raise CliError(
            f"the buffer {path} is held by a running agent; stop the agent (e.g. "
            "`systemctl stop edgefleet-agent`), run this again, then start it: dead letters "
            "stay in the buffer file until deleted",
            1,
        ) from None
    except BufferOpenError as err:
        raise CliError(str(err), 1) from None


def _age(dead_at_ns: int, now_ns: int) -> str:
    seconds = max(0, (now_ns - dead_at_ns) // 1_000_000_000)
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _dlq(config: AgentConfig, args: argparse.Namespace) -> int:
    from edgefleet.deploy.cli import CliError

    buffer = _open_buffer(config)
    try:
        action = args.dlq_action
        if action == "list":
            return _dlq_list(buffer, args.limit)
        try:
            if action == "show":
                return _dlq_show(buffer, args.id, as_json=args.json)
            if action == "export":
                return _dlq_export(buffer, args.id, args.output)
            if action == "delete":
                if not buffer.dlq_delete(args.id):
                    raise KeyError(args.id)
                print(f"deleted dead-lettered batch #{args.id}")
                return 0
        except KeyError:
            raise CliError(
                f"no dead-lettered batch #{args.id} in {config.buffer.path}", 1
            ) from None
        raise AssertionError(action)
    finally:
        buffer.close()


def _dlq_list(buffer: SqliteBuffer, limit: int) -> int:
    letters = buffer.dlq_list(limit=max(1, limit))
    if not letters:
        print("no dead-lettered batches")
        return 0
    now = time.time_ns()
    rows = [("ID", "DEVICE", "SEQS", "ROWS", "AGE", "REASON")]
    rows += [
        (str(d.dlq_id), d.device, f"{d.first_seq}..{d.last_seq}", str(d.rows),
         _age(d.dead_at_ns, now), _clip(d.reason, 70))
        for d in letters
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [row[i].rjust(widths[i]) if i in (0, 3) else row[i].ljust(widths[i])
                 for i in range(5)]
        print("  ".join(cells) + "  " + row[5])
    return 0


def _dlq_show(buffer: SqliteBuffer, dlq_id: int, *, as_json: bool) -> int:
    from edgefleet.protocols.wire import encode_json

    batch = buffer.dlq_batch(dlq_id)
    if as_json:
        out = sys.stdout.buffer
        for reading in batch.readings:
            out.write(encode_json(reading) + b"\n")
        out.flush()
        return 0
    # Ids ascend from 1, so the wanted one is among the first `dlq_id` (oldest first).
    letter = next((d for d in buffer.dlq_list(limit=dlq_id) if d.dlq_id == dlq_id), None)
    reason = letter.reason if letter is not None else "?"
    readings = batch.readings
    first_ts = min(r.ts for r in readings)
    last_ts = max(r.ts for r in readings)
    series = sorted({(r.asset, r.tag) for r in readings})
    assets = sorted({asset for asset, _ in series})
    print(f"dead-lettered batch #{dlq_id}")
    print(f"  device:   {batch.device}")
    print(f"  seqs:     {batch.first_seq}..{batch.last_seq} ({len(readings)} readings)")
    print(f"  refused:  {_iso(batch.sent_at)} ({_age(batch.sent_at, time.time_ns())} ago)")
    print(f"  reason:   {reason}")
    print(f"  readings: {_iso(first_ts)} .. {_iso(last_ts)}")
    print(f"  series:   {len(series)} on {len(assets)} asset(s): {_clip(', '.join(assets), 200)}")
    print("  (--json prints every reading; `export` writes the batch as wire JSON)")
    return 0


def _dlq_export(buffer: SqliteBuffer, dlq_id: int, output: Path | None) -> int:
    from edgefleet.protocols.wire import encode_json

    body = encode_json(buffer.dlq_batch(dlq_id))
    if output is None:
        sys.stdout.buffer.write(body + b"\n")
        sys.stdout.buffer.flush()
    else:
        output.write_bytes(body + b"\n")
        print(f"wrote dead-lettered batch #{dlq_id} to {output}", file=sys.stderr)
    return 0


def _iso(ts_ns: int) -> str:
    moment = datetime.fromtimestamp(ts_ns / 1e9, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
