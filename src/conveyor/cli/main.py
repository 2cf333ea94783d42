"""The ``conveyor`` command. Subcommands are listed only once they work.

Each subcommand lives in its own module and exposes ``run(args, settings) -> int``; this
module parses arguments, builds the one :class:`~conveyor.settings.Settings` object for the
process, configures logging, and turns configuration errors into exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.errors import ConfigError
from conveyor.logs import configure_logging
from conveyor.settings import Settings, load_settings


@dataclass(frozen=True)
class Command:
    name: str
    module: str
    help: str


COMMANDS: list[Command] = [
    Command("check", "conveyor.cli.check", "validate the settings and check that Redis is usable"),
    Command("migrate", "conveyor.cli.migrate", "bring the database schema up to date"),
    Command("api", "conveyor.api.server", "run the HTTP API"),
    Command(
        "worker",
        "conveyor.workers.fleet",
        "run the execution worker (--processes N: N of them under one supervisor)",
    ),
    Command("scheduler", "conveyor.workers.scheduler", "run the cron scheduler (leader-elected)"),
    Command("timers", "conveyor.workers.timer_dispatcher", "run the durable timer dispatcher"),
    Command("dev", "conveyor.cli.dev", "run all processes locally (embedded Redis + SQLite)"),
    Command(
        "status", "conveyor.cli.status", "show queue depths, live processes, scheduler and timers"
    ),
    Command(
        "prune",
        "conveyor.cli.prune",
        "delete finished executions past their retention now (--dry-run: only print)",
    ),
    Command(
        "secrets",
        "conveyor.cli.secrets",
        "reencrypt: re-encrypt every stored secret with the first key of SECRETS_KEY",
    ),
    Command("pause", "conveyor.cli.queues", "pause a region's execution queue (no jobs are taken)"),
    Command("resume", "conveyor.cli.queues", "resume a paused region's execution queue"),
]


SETTINGS_NOTE = (
    "Settings are read from the environment (QUEUE_REDIS_HOST, QUEUE_PREFIX, DATABASE_URL, "
    "ADMIN_TOKEN, ...; the README's configuration table lists them all). A malformed value "
    "stops the command with exit code 2 and one line naming the variable."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor",
        description="Conveyor: durable, fair workflow execution on BullMQ/Redis.",
        epilog=SETTINGS_NOTE,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        module = importlib.import_module(command.module)
        add = getattr(module, "add_arguments", None)
        if add is not None:
            add(p)
        p.epilog = f"{p.epilog}\n\n{SETTINGS_NOTE}" if p.epilog else SETTINGS_NOTE
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"conveyor {args.command}: {exc}", file=sys.stderr)
        return 2
    return run_command(args.command, args, settings)


def run_command(name: str, args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings)
    command = next(c for c in COMMANDS if c.name == name)
    module = importlib.import_module(command.module)
    result: int = module.run(args, settings)
    return result
