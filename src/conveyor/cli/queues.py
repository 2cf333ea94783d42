"""``conveyor pause REGION`` / ``conveyor resume REGION``: stop or restart consumption of a
region's execution queue, through the admin API (``POST /api/admin/queues/{region}/pause``).

Pausing sets BullMQ's own ``paused`` flag, the one BullMQ dashboards set: every worker, ours or
any BullMQ client's, stops taking jobs from the queue (jobs in progress finish; waiting jobs
stay waiting, and triggers keep being accepted). ``resume`` clears it. Exit 0 with the new
state; exit 1 with one clear line when the API is unreachable, refuses the token or does not
know the region.
"""

from __future__ import annotations

import argparse
import sys

import httpx

from conveyor.cli.status import StatusError, admin_target, call_admin
from conveyor.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("region", help="the region whose queue (workflow.execute.REGION) to act on")
    parser.add_argument("--url", help="API base URL (default: http://API_HOST:API_PORT)")
    parser.add_argument("--token", help="admin token (default: ADMIN_TOKEN)")
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="HTTP timeout (default 5)"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    action = str(args.command)
    url, token = admin_target(args, settings)
    if not token:
        print(
            f"conveyor {action}: no admin token: set ADMIN_TOKEN or pass --token", file=sys.stderr
        )
        return 1
    try:
        with httpx.Client(timeout=args.timeout) as client:
            doc = call_admin(
                client, "POST", url, f"/api/admin/queues/{args.region}/{action}", token
            )
    except StatusError as exc:
        print(f"conveyor {action}: {exc.message}", file=sys.stderr)
        return 1
    data = doc.get("data") or {}
    state = "paused" if data.get("paused") else "consuming"
    print(f"{data.get('queue', args.region)}: {state}")
    return 0
