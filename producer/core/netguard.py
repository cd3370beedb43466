"""Outbound HTTP to user-given URLs (init images, webhooks), guarded against SSRF.

The host is resolved once; every address must be global (no loopback, private,
link-local, cloud metadata, multicast, reserved, or IPv4-mapped IPv6 of those) unless
``ATELIER_EGRESS_ALLOWLIST`` names the host or a network holding the address. The
connection then goes to the address that was checked (no second lookup that DNS
rebinding could answer differently), with TLS verified against the URL's host name.
Redirects are not followed.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class EgressRefused(Exception):
    """The URL may not be fetched: its address is not global, or the scheme is wrong."""


def parse_allowlist(
    value: str,
) -> tuple[set[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    hosts: set[str] = set()
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            hosts.add(item.lower())
    return hosts, nets


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REFUSED_V6 = (
    ipaddress.ip_network("::/96"),  # IPv4-compatible (deprecated)
    ipaddress.ip_network("64:ff9b:1::/48"),  # local-use NAT64
)


def is_public(addr: IPAddress) -> bool:
    """Whether ``addr`` is a global unicast address, looking through IPv6 forms that
    carry an IPv4 address (mapped, NAT64, 6to4) at the IPv4 address itself."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return is_public(addr.ipv4_mapped)
        if addr in _NAT64:  # DNS64/NAT64 networks translate these to the IPv4 inside
            return is_public(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        if addr.sixtofour is not None:
            return is_public(addr.sixtofour)
        if addr.teredo is not None or any(addr in net for net in _REFUSED_V6):
            return False
    return addr.is_global and not addr.is_multicast


def resolve_checked(host: str, port: int, allowlist: str = "") -> str:
    """An address for ``host`` that may be connected to, or :class:`EgressRefused`."""
    hosts, nets = parse_allowlist(allowlist)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise EgressRefused(f"cannot resolve {host}: {exc}") from exc
    addrs = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addrs:
        raise EgressRefused(f"{host} has no address")
    allowed_host = host.lower() in hosts
    for addr in addrs:
        if allowed_host or any(addr in net for net in nets):
            continue
        if not is_public(addr):
            raise EgressRefused(f"{host} resolves to {addr}, which is not a public address")
    return str(addrs[0])


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(
        self,
        host: str,
        address: str,
        port: int,
        timeout: float,
        connect_timeout: float | None = None,
    ) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._address = address
        self._connect_timeout = connect_timeout or timeout

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self._connect_timeout)
        sock.settimeout(self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(
        self,
        host: str,
        address: str,
        port: int,
        timeout: float,
        connect_timeout: float | None = None,
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self._connect_timeout = connect_timeout or timeout

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self._connect_timeout)
        self.sock.settimeout(self.timeout)


def _open(
    url: str,
    *,
    timeout: float,
    connect_timeout: float | None,
    allowlist: str,
    allow_http: bool,
) -> tuple[http.client.HTTPConnection, str]:
    """A connection to the checked address of ``url``'s host, and the request path."""
    parts = urlsplit(url)
    if parts.scheme not in (("https", "http") if allow_http else ("https",)):
        raise EgressRefused(f"scheme {parts.scheme!r} is not allowed")
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = resolve_checked(host, port, allowlist)
    cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return cls(host, address, port, timeout, connect_timeout), path


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    connect_timeout: float = 5.0,
    read_timeout: float = 15.0,
    allowlist: str = "",
    allow_http: bool = False,
) -> tuple[int, dict[str, str]]:
    """POST ``body`` to ``url`` through the guard; return the status and headers.

    The response (headers and at most 64 KiB of body, which is discarded) must arrive
    within ``read_timeout`` seconds in all. Redirects are returned, not followed.
    Raises :class:`EgressRefused`, or OSError (TimeoutError included) for transport
    failures.
    """
    conn, path = _open(
        url,
        timeout=read_timeout,
        connect_timeout=connect_timeout,
        allowlist=allowlist,
        allow_http=allow_http,
    )
    try:
        conn.connect()
        deadline = time.monotonic() + read_timeout
        conn.request(
            "POST",
            path,
            body=body,
            headers={
                "User-Agent": "atelier-webhooks",
                "Content-Type": "application/json",
                **headers,
            },
        )
        resp = conn.getresponse()
        _read_body(resp, "POST", url, deadline, read_timeout, 64 * 1024, strict=False)
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def fetch(
    url: str,
    *,
    max_bytes: int,
    timeout: float = 10.0,
    total_timeout: float = 30.0,
    allowlist: str = "",
    allow_http: bool = False,
) -> bytes:
    """GET ``url`` through the guard; at most ``max_bytes`` within ``total_timeout``
    seconds; no redirects.

    Raises :class:`EgressRefused`, or OSError (TimeoutError included) / ValueError for
    transport failures.
    """
    deadline = time.monotonic() + total_timeout
    conn, path = _open(
        url, timeout=timeout, connect_timeout=None, allowlist=allowlist, allow_http=allow_http
    )
    try:
        conn.request("GET", path, headers={"User-Agent": "atelier", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise ValueError(
                f"GET {url} answered {resp.status}"
                + (" (redirects are not followed)" if 300 <= resp.status < 400 else "")
            )
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise ValueError(f"{url} is larger than {max_bytes} bytes")
        return _read_body(resp, "GET", url, deadline, total_timeout, max_bytes, strict=True)
    finally:
        conn.close()


def _read_body(
    resp: http.client.HTTPResponse,
    method: str,
    url: str,
    deadline: float,
    seconds: float,
    max_bytes: int,
    *,
    strict: bool,
) -> bytes:
    """The response body, up to ``max_bytes`` (more: ValueError if ``strict``, else the
    rest is left unread), before ``deadline``.

    The socket timeout bounds each wait; the deadline bounds the whole read, so a
    server that trickles a byte at a time cannot hold the caller for long.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{method} {url} took longer than {seconds} s")
        chunk = resp.read1(64 * 1024)
        if not chunk:
            break
        size += len(chunk)
        if size > max_bytes:
            if strict:
                raise ValueError(f"{url} is larger than {max_bytes} bytes")
            break
        chunks.append(chunk)
    return b"".join(chunks)
