"""``python -m conveyor.api``: the same as ``conveyor api``."""

from conveyor.api.server import run
from conveyor.runtime import entry

if __name__ == "__main__":
    entry(run, "api")
