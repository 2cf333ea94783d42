"""The ``conveyor`` command line: the parser and entry (:mod:`conveyor.cli.main`), and the
commands that are not long-running processes — ``check``, ``migrate``, ``status`` (rendered by
:mod:`conveyor.cli.tables`) and ``dev`` (:mod:`conveyor.cli.dev`).

The long-running processes (``api``, ``worker``, ``scheduler``, ``timers``) live in
:mod:`conveyor.api` and :mod:`conveyor.workers`; the CLI starts them, they never import it.
"""

from conveyor.cli.main import COMMANDS, Command, build_parser, main

__all__ = ["COMMANDS", "Command", "build_parser", "main"]
