"""Process settings: every environment variable, read and validated once per process.

``load_settings()`` is called by each entry point's ``main()`` and the resulting
:class:`Settings` object is passed down; nothing reads the environment at import time.
A malformed value raises :class:`~conveyor.errors.ConfigError` whose message is one line
naming the variable and the bad value; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from conveyor.errors import ConfigError

_REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_DB_SCHEMES = (
    "postgresql://",
    "postgresql+asyncpg://",
    "postgres://",
    "sqlite://",
    "sqlite+aiosqlite://",
)

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]

MIN_RETENTION_S = 60
"""The shortest EXECUTION_RETENTION (or tenant override) accepted."""
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """Seconds of a duration written ``<n><unit>`` (unit ``s``, ``m``, ``h``, ``d`` or ``w``)
    or a bare number of seconds: ``14d``, ``36h``, ``90m``, ``3600``. Raises ValueError."""
    match = _DURATION_RE.match(text.lower())
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: write a number of seconds or <n>s, <n>m, <n>h, <n>d, "
            "<n>w (e.g. 14d, 36h)"
        )
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_duration(seconds: int) -> str:
    """The shortest exact ``<n><unit>`` form of ``seconds`` (``1209600`` → ``14d``)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True, slots=True)
class KeepPolicy:
    """How many finished jobs of one kind (completed or failed) BullMQ keeps per queue: at most
    ``count`` of them and none older than ``age_s`` (BullMQ's ``removeOnComplete`` /
    ``removeOnFail`` ``{count, age}``)."""

    count: int
    age_s: int

    @classmethod
    def parse(cls, text: str) -> KeepPolicy:
        """``COUNT,AGE``: ``1000,24h``; the age in :func:`parse_duration`'s format."""
        count, comma, age = text.partition(",")
        if not comma or not count.strip().isdigit():
            raise ValueError(f"{text!r}: write COUNT,AGE, e.g. 1000,24h")
        seconds = parse_duration(age)
        if seconds < 1:
            raise ValueError(f"{text!r}: the age must be at least 1s")
        return cls(int(count), seconds)

    def job_option(self) -> dict[str, int]:
        """BullMQ's ``removeOnComplete``/``removeOnFail`` value."""
        return {"age": self.age_s, "count": self.count}

    def __str__(self) -> str:
        return f"{self.count},{format_duration(self.age_s)}"


class Settings(BaseSettings):
    """Conveyor's configuration. Field names are the environment variables, lower-cased."""

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", frozen=True, validate_default=True
    )

    # --- Redis / BullMQ ------------------------------------------------------------------------
    queue_redis_host: str = "127.0.0.1"
    queue_redis_port: Annotated[int, Field(ge=1, le=65535)] = 6379
    queue_redis_db: NonNegativeInt = 0
    queue_redis_username: str | None = None
    queue_redis_password: SecretStr | None = None
    queue_redis_tls: bool = False
    queue_redis_tls_ca_file: str | None = None
    """CA bundle used to verify the Redis server's certificate (default: system CAs)."""
    queue_redis_tls_insecure: bool = False
    """Skip certificate verification. Only for throwaway test servers."""
    queue_redis_sentinels: Annotated[tuple[tuple[str, int], ...], NoDecode] = ()
    """Sentinels (``host:port,…``) to discover the master from; empty: connect to
    ``queue_redis_host``/``queue_redis_port`` directly."""
    queue_redis_sentinel_master: str | None = None
    """The master's name in the sentinels' configuration (``sentinel monitor <name> …``)."""
    queue_redis_sentinel_username: str | None = None
    queue_redis_sentinel_password: SecretStr | None = None
    queue_redis_sentinel_tls: bool = False
    """Talk to the sentinels over TLS (verified with ``queue_redis_tls_ca_file``, or not at all
    with ``queue_redis_tls_insecure``, as the data connections)."""
    queue_redis_cluster_nodes: Annotated[tuple[tuple[str, int], ...], NoDecode] = ()
    """Redis Cluster nodes (``host:port,…``; some of them suffice, the rest is discovered);
    empty: a single Redis (or Sentinel). Excludes ``queue_redis_sentinels``."""
    queue_redis_connect_timeout_ms: PositiveInt = 2000
    queue_redis_socket_timeout_ms: PositiveInt = 5000
    queue_prefix: str = "bull"
    """BullMQ key prefix. On Redis Cluster each queue's keys get a hash tag of their own
    (``bull:{executions-us}:…``); a prefix with braces would put every key in one slot."""
    queue_metrics_interval_ms: PositiveInt = 60000
    queue_driver: Literal["", "bullmq", "inmemory"] = ""
    execution_worker_concurrency: PositiveInt = 2
    execution_worker_processes: PositiveInt = 1
    """Worker processes ``conveyor worker`` runs under one supervisor (``--processes``)."""
    execution_tenant_concurrency: PositiveInt | None = None
    """Executions of one tenant running at once across ALL workers (Redis leases); defaults to
    ``execution_worker_concurrency``. A tenant may override it (``tenant_limits``)."""
    execution_tenant_concurrency_per_process: PositiveInt | None = None
    """Executions of one tenant running at once in one worker process; unset: no cap below the
    worker's concurrency."""
    execution_tenant_start_rate: Annotated[float, Field(gt=0, le=1_000_000)] | None = None
    """Executions of one tenant started per second, across all workers (a token bucket in
    Redis); unset: no rate limit. A tenant may override it."""
    execution_tenant_start_burst: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """Starts allowed at once after an idle period; unset: one second's worth of the rate."""
    execution_lock_duration_ms: Annotated[int, Field(ge=1000)] = 30000
    """BullMQ job lock of the execution worker; a crashed worker's jobs return after about this."""
    execution_stalled_interval_ms: Annotated[int, Field(ge=1000)] = 30000
    """How often the execution worker looks for stalled jobs (locks that expired)."""

    # --- Conveyor ----------------------------------------------------------------------------
    database_url: str = "sqlite:///./.conveyor/conveyor.db"
    database_pool_size: PositiveInt = 10
    """Most database connections one process opens (per pool; see ``conveyor.store``)."""
    database_connect_timeout_ms: PositiveInt = 5000
    admin_token: SecretStr | None = None
    api_host: str = "127.0.0.1"
    api_port: Annotated[int, Field(ge=0, le=65535)] = 8000
    api_max_body_bytes: PositiveInt = 1024 * 1024
    execution_regions: Annotated[tuple[str, ...], NoDecode] = ("us",)
    default_region: str = "us"
    shutdown_grace_ms: NonNegativeInt = 30000
    log_format: Literal["json", "text"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    http_allowlist: Annotated[tuple[str, ...], NoDecode] = ()
    """Destinations ``http`` steps may reach although private/loopback: ``host``, ``host:port``,
    ``cidr``, ``cidr:port`` (see :func:`parse_allowlist_entry`); without a port, any port."""
    http_dns_cache_s: Annotated[float, Field(ge=0, le=3600)] = 10.0
    """Seconds a process reuses the DNS answer for an ``http`` step's host (0: a lookup per
    request). Every request still checks the addresses it connects to."""
    step_output_max_bytes: PositiveInt = 256 * 1024
    workflow_max_depth: Annotated[int, Field(ge=1, le=50)] = 5
    """Deepest nesting of sub-workflows (``workflow`` steps): a top-level execution is depth 0;
    a ``workflow`` step that would start a child deeper than this fails (``parallel`` branches
    and ``foreach`` items are children too)."""
    workflow_cache_size: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    """Workflow versions one process keeps parsed (its ``DefinitionCache``) and, in a worker,
    compiled into plans (the engine's ``PlanCache``): each an LRU of this many entries, made
    only for versions actually used. A version costs about 2 KB for a one-step workflow and
    17 KB for five ``http`` steps (docs/operations.md); a miss costs one batched fetch."""
    workflow_max_fanout: Annotated[int, Field(ge=1, le=100_000)] = 10_000
    """Most child executions one ``foreach`` step may start (its items); more fails the step
    with ``fanout_exceeded``. A ``parallel`` step's branches are bounded on save."""
    secrets_key: SecretStr | None = None
    """Keys of the tenants' secrets (``/api/secrets``): comma list of base64-encoded 32-byte
    keys; the first encrypts, all decrypt (rotation). Read through :attr:`secrets_keys`."""
    heartbeat_interval_ms: PositiveInt = 5000

    # --- scheduler, timer dispatcher, reconciler (docs/scheduling.md) -----------------------
    scheduler_lock_strategy: Literal["auto", "postgres", "redis"] = "auto"
    """``auto``: a Postgres session advisory lock when the database is Postgres, else Redis."""
    scheduler_lock_ttl_ms: Annotated[int, Field(ge=300)] = 4000
    """Redis lock expiry: a killed leader's lock frees itself after at most this long."""
    scheduler_poll_interval_ms: PositiveInt = 500
    """How often a standby tries the lock and the leader re-reads the schedules."""
    scheduler_misfire_policy: Literal["fire_once", "skip"] = "fire_once"
    """Ticks older than the grace: run once (the latest) or skip; per schedule if it says."""
    scheduler_misfire_grace_ms: NonNegativeInt = 15000
    """Ticks at most this late (a failover) are all fired; older ones are a misfire."""
    scheduler_lookahead_ms: Annotated[int, Field(ge=100, le=60_000)] = 10000
    """Ticks due within this window are recorded ahead and staged as delayed jobs."""
    scheduler_lookahead_max_ms: Annotated[int, Field(ge=100, le=600_000)] = 60000
    """The leader looks further ahead, up to this, when the ticks coming up would take it
    longer than ``SCHEDULER_LOOKAHEAD_MS`` to record at its measured rate (a large boundary)."""
    reconcile_interval_ms: PositiveInt = 5000
    """How often the leading scheduler re-enqueues executions whose queue job is missing."""
    reconcile_min_age_ms: NonNegativeInt = 5000
    """Only executions untouched for this long are checked (an enqueue may be in flight)."""
    timer_lookahead_ms: PositiveInt = 3000
    """Timers due within this window are held in memory and fired at their exact instant."""
    timer_poll_interval_ms: PositiveInt = 250
    """How often the timer dispatcher looks for newly due (or newly created) timers."""
    timer_batch_size: PositiveInt = 500
    """Most timers loaded or fired per database round trip."""

    # --- data lifecycle (docs/operations.md#capacity-and-retention) -------------------------
    execution_retention: Annotated[int, Field(ge=MIN_RETENTION_S)] = 14 * 86400
    """Seconds a finished execution (and its step runs, ticks, timers) is kept; written as a
    duration (``14d``, ``36h``, ``90m``, ``45s``) or a number of seconds. A tenant may
    override it (admin API)."""
    execution_retention_max_per_tenant: PositiveInt | None = None
    """Most finished executions one tenant keeps (the oldest go first); unset: no cap."""
    retention_interval_ms: Annotated[int, Field(ge=1000)] = 60000
    """How often the leading scheduler runs a retention pass."""
    retention_batch_size: Annotated[int, Field(ge=1, le=5000)] = 1000
    """Executions deleted per transaction (with their step runs, ticks and timers)."""
    retention_pause_ms: NonNegativeInt = 100
    """Pause between two batches of a pass (triggers and workers get the database)."""
    queue_keep_completed: Annotated[KeepPolicy, NoDecode] = KeepPolicy(1000, 24 * 3600)
    """Completed jobs BullMQ keeps per queue: ``COUNT,AGE`` (``1000,24h``), whichever is less."""
    queue_keep_failed: Annotated[KeepPolicy, NoDecode] = KeepPolicy(10000, 7 * 86400)
    """Failed jobs BullMQ keeps per queue: ``COUNT,AGE`` (``10000,7d``)."""
    queue_events_max_len: Annotated[int, Field(ge=100)] = 10000
    """Approximate cap of each queue's BullMQ events stream (``streams.events.maxLen``)."""

    @field_validator("queue_driver", mode="before")
    @classmethod
    def _lower_driver(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator(
        "queue_redis_username",
        "queue_redis_password",
        "queue_redis_sentinel_username",
        "queue_redis_sentinel_password",
        "admin_token",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("secrets_key", mode="before")
    @classmethod
    def _check_secrets_key(cls, value: Any) -> Any:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            raise ValueError("must be a comma list of base64-encoded 32-byte keys")
        parts = [part.strip() for part in value.split(",")]
        for index, part in enumerate(parts, start=1):
            decode_secrets_key(part, index)
        return ",".join(parts)

    @field_validator("queue_redis_sentinels", mode="before")
    @classmethod
    def _split_sentinels(cls, value: Any) -> Any:
        """``host:port,host:port`` (IPv6 in brackets: ``[::1]:26379``) as ``(host, port)`` pairs."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        addresses = [parse_host_port(v) if isinstance(v, str) else tuple(v) for v in value]
        return tuple(dict.fromkeys(addresses))

    @field_validator("queue_redis_cluster_nodes", mode="before")
    @classmethod
    def _split_cluster_nodes(cls, value: Any, info: ValidationInfo) -> Any:
        """``host:port,host:port`` as ``(host, port)`` pairs; not with Sentinel, only db 0."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        nodes = tuple(
            dict.fromkeys(parse_host_port(v) if isinstance(v, str) else tuple(v) for v in value)
        )
        if nodes and info.data.get("queue_redis_sentinels"):
            raise ValueError(
                "QUEUE_REDIS_CLUSTER_NODES and QUEUE_REDIS_SENTINELS are both set: a Redis "
                "Cluster fails over by itself, set only one of them"
            )
        if nodes and info.data.get("queue_redis_db"):
            raise ValueError("Redis Cluster has only database 0: leave QUEUE_REDIS_DB unset")
        return nodes

    @field_validator("queue_redis_sentinel_master", mode="before")
    @classmethod
    def _master_name(cls, value: Any, info: ValidationInfo) -> Any:
        name = value.strip() if isinstance(value, str) else value
        sentinels = info.data.get("queue_redis_sentinels")
        if not name:
            if sentinels:
                raise ValueError(
                    "must name the master the sentinels monitor (QUEUE_REDIS_SENTINELS is set)"
                )
            return None
        if any(c.isspace() for c in name):
            raise ValueError("must be a master name without spaces")
        if "queue_redis_sentinels" in info.data and not sentinels:
            raise ValueError("is set but QUEUE_REDIS_SENTINELS is empty")
        return name

    @field_validator(
        "execution_tenant_concurrency",
        "execution_tenant_concurrency_per_process",
        "execution_tenant_start_rate",
        "execution_tenant_start_burst",
        "execution_retention_max_per_tenant",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("execution_retention", mode="before")
    @classmethod
    def _parse_retention(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("queue_keep_completed", "queue_keep_failed", mode="before")
    @classmethod
    def _parse_keep(cls, value: Any) -> Any:
        return KeepPolicy.parse(value) if isinstance(value, str) else value

    @field_validator("execution_regions", mode="before")
    @classmethod
    def _split_regions(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        regions = tuple(value)
        if not regions:
            raise ValueError("must name at least one region, e.g. 'us' or 'us,eu'")
        for region in regions:
            _check_region(region)
        return tuple(dict.fromkeys(regions))

    @field_validator("default_region")
    @classmethod
    def _check_default_region(cls, value: str) -> str:
        return _check_region(value)

    @field_validator("http_allowlist", mode="before")
    @classmethod
    def _split_allowlist(cls, value: Any) -> Any:
        """A comma list becomes lower-case entries; a malformed entry is named in the error."""
        parts = value.split(",") if isinstance(value, str) else value
        entries = tuple(str(part).strip().lower() for part in parts if str(part).strip())
        for entry in entries:
            parse_allowlist_entry(entry)
        return tuple(dict.fromkeys(entries))

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value.startswith(_DB_SCHEMES):
            raise ValueError("must start with postgresql:// or sqlite:///")
        return value

    @field_validator("queue_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value or ":" in value or any(c.isspace() for c in value):
            raise ValueError("must be non-empty, without ':' or spaces")
        return value

    @model_validator(mode="after")
    def _tenant_default(self) -> Settings:
        if self.execution_tenant_concurrency is None:
            object.__setattr__(
                self, "execution_tenant_concurrency", self.execution_worker_concurrency
            )
        return self

    @model_validator(mode="after")
    def _lookahead_covers_a_pass(self) -> Settings:
        # A window shorter than the interval between two passes would leave ticks unstaged.
        if self.scheduler_lookahead_ms < self.scheduler_poll_interval_ms:
            raise ValueError(
                "SCHEDULER_LOOKAHEAD_MS must be at least SCHEDULER_POLL_INTERVAL_MS "
                f"({self.scheduler_lookahead_ms} < {self.scheduler_poll_interval_ms})"
            )
        if self.scheduler_lookahead_max_ms < self.scheduler_lookahead_ms:
            raise ValueError(
                "SCHEDULER_LOOKAHEAD_MAX_MS must be at least SCHEDULER_LOOKAHEAD_MS "
                f"({self.scheduler_lookahead_max_ms} < {self.scheduler_lookahead_ms})"
            )
        return self

    # --- derived values ----------------------------------------------------------------------
    @property
    def driver(self) -> Literal["bullmq", "inmemory"]:
        """The effective queue driver (``bullmq`` unless ``QUEUE_DRIVER=inmemory``)."""
        return "inmemory" if self.queue_driver == "inmemory" else "bullmq"

    @property
    def uses_sentinel(self) -> bool:
        """The Redis master is discovered through Sentinel (``QUEUE_REDIS_SENTINELS``)."""
        return bool(self.queue_redis_sentinels)

    @property
    def uses_cluster(self) -> bool:
        """The queues live on a Redis Cluster (``QUEUE_REDIS_CLUSTER_NODES``)."""
        return bool(self.queue_redis_cluster_nodes)

    @property
    def tenant_concurrency(self) -> int:
        """One tenant's executions running at once across all workers (cluster-wide)."""
        assert self.execution_tenant_concurrency is not None
        return self.execution_tenant_concurrency

    @property
    def tenant_concurrency_per_process(self) -> int:
        """One tenant's executions running at once in one worker process."""
        cap = self.execution_tenant_concurrency_per_process or self.execution_worker_concurrency
        return min(cap, self.execution_worker_concurrency)

    @property
    def secrets_keys(self) -> tuple[bytes, ...]:
        """The decoded ``SECRETS_KEY`` keys, the encrypting one first; empty when unset."""
        if self.secrets_key is None:
            return ()
        text = self.secrets_key.get_secret_value()
        return tuple(decode_secrets_key(part, i) for i, part in enumerate(text.split(","), 1))

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith(("postgresql", "postgres:"))

    @property
    def shutdown_grace_s(self) -> float:
        return self.shutdown_grace_ms / 1000.0


SECRETS_KEY_BYTES = 32


def decode_secrets_key(text: str, index: int = 1) -> bytes:
    """One ``SECRETS_KEY`` entry: standard or URL-safe base64 of 32 bytes. Raises ValueError
    (never showing the key)."""
    where = f"key {index}"
    if not text:
        raise ValueError(f"{where} is empty (write base64 keys separated by commas)")
    try:
        raw = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{where} is not base64 (generate one with: "
            "python -c 'import base64,os; print(base64.b64encode(os.urandom(32)).decode())')"
        ) from None
    if len(raw) != SECRETS_KEY_BYTES:
        raise ValueError(f"{where} decodes to {len(raw)} bytes, expected {SECRETS_KEY_BYTES}")
    return raw


def _check_region(value: str) -> str:
    if not _REGION_RE.match(value):
        raise ValueError(f"region {value!r} must be lower-case letters, digits and '-'")
    return value


@dataclass(frozen=True, slots=True)
class AllowlistEntry:
    """One ``HTTP_ALLOWLIST`` entry, parsed: what it lets ``http`` steps reach, and on which port.

    ``target`` is a host name (``api.internal``), a domain suffix with its leading dot
    (``.internal``, written ``*.internal``) or an address range (a single address is a /32 or
    /128 range). ``port`` is the one destination port the entry opens; ``None`` opens every
    port of the target.
    """

    target: str | ipaddress.IPv4Network | ipaddress.IPv6Network
    port: int | None = None


_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_PORT = re.compile(r"^[0-9]{1,5}$")


def parse_allowlist_entry(text: str) -> AllowlistEntry:
    """Read one ``HTTP_ALLOWLIST`` entry: ``host``, ``host:port``, ``cidr`` or ``cidr:port``.

    A host is a name, ``*.suffix``, an IPv4 address or an IPv6 address; with a port, an IPv6
    address or range goes in brackets (``[::1]:8080``, ``[fd00::/8]:443``). Raises
    :class:`ValueError` whose message names the entry and what is wrong with it.
    """
    entry = text.strip().lower()
    try:
        where, port = _split_port(entry)
        return AllowlistEntry(_allowlist_target(where, bracketed=entry.startswith("[")), port)
    except ValueError as exc:
        raise ValueError(f"entry {entry!r}: {exc}") from None


def _split_port(entry: str) -> tuple[str, int | None]:
    """``(host or range, port or None)``; an IPv6 literal with a port is in brackets."""
    if "://" in entry:
        raise ValueError("write host, host:port, cidr or cidr:port, not a URL")
    if entry.startswith("["):
        inside, closed, rest = entry[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError("write an IPv6 address with a port as [address]:port")
        return inside, _allowlist_port(rest[1:]) if rest else None
    if entry.count(":") == 1:
        where, _, port = entry.partition(":")
        return where, _allowlist_port(port)
    return entry, None  # a name, an IPv4 address/range, or an IPv6 one without a port


def _allowlist_port(text: str) -> int:
    if not _PORT.match(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def _allowlist_target(
    where: str, *, bracketed: bool
) -> str | ipaddress.IPv4Network | ipaddress.IPv6Network:
    if "/" in where:
        try:
            network = ipaddress.ip_network(where, strict=False)
        except ValueError:
            raise ValueError("not a valid CIDR range") from None
    else:
        try:
            network = ipaddress.ip_network(ipaddress.ip_address(where))
        except ValueError:
            if bracketed or ":" in where:
                raise ValueError("not a valid IPv6 address") from None
            return _allowlist_host_name(where)
    if bracketed and network.version != 6:
        raise ValueError("brackets are only for IPv6 addresses")
    return network


def _allowlist_host_name(where: str) -> str:
    """``name`` or ``.suffix`` (from ``*.suffix``); numeric forms other than dotted-decimal
    IPv4 (``127.1``, ``0x7f000001``) are refused rather than read as names."""
    wildcard = where.startswith(("*.", "."))
    name = where.removeprefix("*").removeprefix(".").removesuffix(".")
    if not name or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        raise ValueError("not a host name, IP address or CIDR range")
    try:
        socket.inet_aton(name)
    except OSError:
        return f".{name}" if wildcard else name
    raise ValueError("write an IPv4 address as four decimal numbers, e.g. 127.0.0.1")


def parse_host_port(text: str) -> tuple[str, int]:
    """``host:port`` (an IPv6 address in brackets) as ``(host, port)``; ``ValueError`` naming
    the entry otherwise."""
    entry = text.strip()
    if "://" in entry:
        raise ValueError(f"entry {entry!r}: write host:port, not a URL")
    if entry.startswith("["):
        host, closed, rest = entry[1:].partition("]")
        port = rest[1:] if closed and rest.startswith(":") else ""
    else:
        host, _, port = entry.rpartition(":")
        if ":" in host:
            raise ValueError(f"entry {entry!r}: write an IPv6 address as [address]:port")
    if not host or any(c.isspace() or c in "/@" for c in host):
        raise ValueError(f"entry {entry!r}: write host:port, e.g. 10.0.0.5:26379")
    if not _PORT.match(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"entry {entry!r}: port {port!r} is not a number from 1 to 65535")
    return host, int(port)


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read and validate the settings from ``environ`` (default: ``os.environ``).

    Raises :class:`ConfigError` with a one-line message naming the first bad variable.
    """
    env = dict(os.environ if environ is None else environ)
    known = {name.upper() for name in Settings.model_fields}
    values: dict[str, Any] = {k.lower(): v for k, v in env.items() if k.upper() in known}
    values.update(overrides)
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(
            _describe(exc, {**env, **{k.upper(): v for k, v in overrides.items()}})
        ) from exc


def _describe(exc: ValidationError, env: Mapping[str, str]) -> str:
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else "settings"
    name = field.upper()
    raw = env.get(name, env.get(field, error.get("input")))
    reason = str(error["msg"]).removeprefix("Value error, ")
    if name in {
        "QUEUE_REDIS_PASSWORD",
        "QUEUE_REDIS_SENTINEL_PASSWORD",
        "ADMIN_TOKEN",
        "SECRETS_KEY",
    }:
        raw = "***"
    elif raw is None:
        raw = ""
    return f"invalid setting {name}={raw}: {reason}"


def client_url(host: str, port: int) -> str:
    """The URL a local client uses to reach a server listening on ``host:port``."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"
