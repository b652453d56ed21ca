"""Command line: ``python -m runtime COMMAND``.

Parses arguments, reads the settings once, sets up logging and runs one command.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence

from runtime.errors import ConfigurationError, OcrRuntimeError
from runtime.log import configure_logging
from runtime.settings import Settings, redact_url

Command = Callable[[argparse.Namespace, Settings], int]


def _config(args: argparse.Namespace, settings: Settings) -> int:
    shown = settings.redacted()
    width = max(map(len, shown))
    for variable, value in shown.items():
        print(f"{variable.ljust(width)}  {value}")
    print(f"{'(fleet budget)'.ljust(width)}  {settings.rpm_budget} requests and "
          f"{settings.tpm_budget} tokens per {settings.gemini_window_s:g} s")  # fmt: skip
    if settings.redis_url is None:
        print(
            "warning: REDIS_URL is unset: the limiter is in-process, which is only safe "
            "for a single worker process",
            file=sys.stderr,
        )
    return 0


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from runtime import db
    from runtime.services import local_services

    with local_services(None, settings.database_url, with_redis=False) as urls:
        if settings.database_url is None:
            print("DATABASE_URL is unset: using a throw-away embedded Postgres", file=sys.stderr)
        if args.db_command == "init":
            asyncio.run(db.init_schema(urls.database_url))
        else:
            asyncio.run(db.migrate(urls.database_url, notify=args.notify))
        print(f"db {args.db_command}: schema is up to date on {redact_url(urls.database_url)}")
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.worker import run_worker

    return asyncio.run(run_worker(settings))


def _monitor(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.ops.cli import run_monitor

    return run_monitor(args, settings)


def _capacity(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.ops.cli import run_capacity

    return run_capacity(args, settings)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.ops.demo import run

    return run(args, settings)


def _emulator(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.emulator.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime",
        description="OCR worker runtime for the Quebec land registry, under one Gemini quota.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from runtime.ops.cli import configure_capacity, configure_monitor
    from runtime.ops.demo import configure_parser as configure_demo

    demo = commands.add_parser("demo", help="a whole fleet on this machine, in about a minute")
    configure_demo(demo)
    demo.set_defaults(handler=_demo)

    worker = commands.add_parser("worker", help="run one OCR worker process (Procfile: worker)")
    worker.set_defaults(handler=_worker)

    monitor = commands.add_parser("monitor", help="live view of quota, workers and queue")
    configure_monitor(monitor)
    monitor.set_defaults(handler=_monitor)

    capacity = commands.add_parser("capacity", help="how many workers the quota can carry")
    configure_capacity(capacity)
    capacity.set_defaults(handler=_capacity)

    config = commands.add_parser("config", help="print the effective settings, secrets redacted")
    config.set_defaults(handler=_config)

    db = commands.add_parser("db", help="create or migrate the queue schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("init", help="create extraction_queue and extraction_status (dev)")
    migrate = db_commands.add_parser(
        "migrate", help="add the runtime's columns and tables, additively"
    )
    migrate.add_argument(
        "--notify",
        action="store_true",
        help="also install a trigger that wakes idle workers when a row becomes ready",
    )
    db.set_defaults(handler=_db)

    try:
        from runtime.emulator.cli import configure_parser
    except ImportError:  # pragma: no cover - the emulator ships with the package
        pass
    else:
        emulator = commands.add_parser("emulator", help="run the Gemini API emulator")
        configure_parser(emulator)
        emulator.set_defaults(handler=_emulator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(
        log_format=settings.log_format, level=settings.log_level, secrets=settings.secrets()
    )
    handler: Command = args.handler
    try:
        return handler(args, settings)
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except OcrRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
