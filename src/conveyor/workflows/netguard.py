"""Which addresses outbound ``http`` steps may reach (the SSRF policy, without any I/O).

* :func:`parse_ip_literal` reads a host the way ``connect()``/``inet_aton`` would: ``[::1]``,
  ``::ffff:127.0.0.1``, and the legacy IPv4 forms ``127.1``, ``0x7f000001``, ``2130706433``,
  ``0177.0.0.1``.
* :func:`address_refusal` says why an address is not public: loopback, private (RFC 1918,
  fc00::/7), CGNAT 100.64/10, link-local (169.254/16, fe80::/10) and the cloud metadata
  addresses, unspecified, multicast, reserved, anything not globally routable — also when an
  IPv4 address is embedded in IPv6 (IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96, 6to4).
* :class:`AllowList` holds ``settings.http_allowlist``: host names (``name`` or
  ``*.suffix``), single addresses and CIDR ranges, each for one destination port or for any
  (:func:`conveyor.settings.parse_allowlist_entry` reads the entries).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from conveyor.settings import AllowlistEntry, parse_allowlist_entry

__all__ = ["AllowList", "IPAddress", "address_refusal", "parse_ip_literal"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPAT = ipaddress.ip_network("::/96")
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$", re.IGNORECASE)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` denotes if it is an IP literal in any form ``connect()`` accepts.

    ``[::1]``, ``::ffff:127.0.0.1``, ``127.0.0.1`` and the legacy IPv4 forms of
    ``inet_aton`` (``127.1``, ``0x7f000001``, ``2130706433``, ``0177.0.0.1``). Answers for
    host names of DNS length are kept (every request asks again for the same few hosts).
    """
    if len(host) <= 255:
        return _cached_ip_literal(host)
    return _ip_literal(host)


@lru_cache(maxsize=4096)
def _cached_ip_literal(host: str) -> IPAddress | None:
    return _ip_literal(host)


def _ip_literal(host: str) -> IPAddress | None:
    text = host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    if "%" in text:  # IPv6 zone id
        text = text.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if _LEGACY_IPV4.match(text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPAT and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be reached (ignoring any allow-list), or ``None`` if it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            reason = address_refusal(embedded)
            return f"{reason} (embedded in {ip})" if reason else None
    if ip in _METADATA:
        return "a cloud metadata address"
    checks = (
        (ip.is_loopback, "a loopback address"),
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT, "a shared (CGNAT) address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "not a globally routable address"),
    )
    for failed, reason in checks:
        if failed:
            return reason
    return None


@dataclass(frozen=True, slots=True)
class AllowList:
    """The destinations that ``http`` steps may reach although they are not public.

    Every question names the destination port (the URL's, or 80/443 from its scheme): an entry
    with a port opens only that port, an entry without one opens them all.
    """

    entries: tuple[AllowlistEntry, ...]

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> AllowList:
        """Parse ``settings.http_allowlist`` (already validated when the settings were loaded)."""
        return cls(tuple(parse_allowlist_entry(entry) for entry in entries))

    def names_host(self, host: str, port: int) -> bool:
        """Whether an entry names ``host`` (exactly or by ``*.suffix``) on ``port``."""
        return any(
            _opens(entry, port) and _names(entry.target, host)
            for entry in self.entries
            if isinstance(entry.target, str)
        )

    def contains(self, ip: IPAddress, port: int) -> bool:
        """Whether an entry's address range holds ``ip`` (or the IPv4 address it embeds) on
        ``port``."""
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)):
            candidates.append(embedded)
        return any(
            _opens(entry, port) and c.version == entry.target.version and c in entry.target
            for entry in self.entries
            if not isinstance(entry.target, str)
            for c in candidates
        )


def _opens(entry: AllowlistEntry, port: int) -> bool:
    return entry.port is None or entry.port == port


def _names(target: str, host: str) -> bool:
    return host.endswith(target) if target.startswith(".") else host == target
