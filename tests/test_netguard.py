"""The SSRF guard: which addresses may be reached, and how a fetch behaves."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from producer.core.netguard import EgressRefused, fetch, parse_allowlist, resolve_checked

PRIVATE = [
    "127.0.0.1",
    "127.1.2.3",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # carrier-grade NAT
    "0.0.0.0",
    "224.0.0.1",  # multicast
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata address
    "64:ff9b:1::1",  # local-use NAT64
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
    "::7f00:1",  # IPv4-compatible 127.0.0.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "localhost",
]

#: For each refused host, an allowlist entry (a host or a CIDR) that lets it through.
ALLOWED_BY = [
    ("127.0.0.1", "127.0.0.1"),
    ("127.0.0.1", "127.0.0.0/8"),
    ("10.0.0.1", "10.0.0.0/8"),
    ("10.0.0.1", "10.0.0.1"),
    ("169.254.169.254", "169.254.0.0/16"),
    ("192.168.1.1", "192.168.1.0/24"),
    ("::1", "::1"),
    ("::1", "::1/128"),
    ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
    ("::ffff:127.0.0.1", "::ffff:0:0/96"),
    ("localhost", "localhost"),
    ("localhost", "LocalHost"),  # host names compare case-insensitively
]


@pytest.mark.parametrize("host", PRIVATE)
def test_non_global_addresses_are_refused(host: str) -> None:
    with pytest.raises(EgressRefused):
        resolve_checked(host, 443)


@pytest.mark.parametrize("host", PRIVATE)
def test_refused_with_an_unrelated_allowlist(host: str) -> None:
    with pytest.raises(EgressRefused):
        resolve_checked(host, 443, allowlist="example.com, 203.0.113.0/24")


@pytest.mark.parametrize(("host", "allowlist"), ALLOWED_BY)
def test_allowlist_lets_a_host_or_network_through(host: str, allowlist: str) -> None:
    addr = resolve_checked(host, 443, allowlist=f" other.example , {allowlist} ")
    if host != "localhost":
        assert ipaddress.ip_address(addr) == ipaddress.ip_address(host)
    else:
        assert addr in ("127.0.0.1", "::1")


def test_allowlisted_network_does_not_cover_its_neighbours() -> None:
    with pytest.raises(EgressRefused):
        resolve_checked("10.0.0.1", 443, allowlist="10.0.1.0/24")
    with pytest.raises(EgressRefused):
        resolve_checked("127.0.0.2", 443, allowlist="127.0.0.1")


@pytest.mark.parametrize("host", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888"])
def test_public_literals_are_accepted(host: str) -> None:
    # A literal address resolves without any network access.
    assert resolve_checked(host, 443) == host


def test_unresolvable_host_is_refused() -> None:
    with pytest.raises(EgressRefused):
        resolve_checked("no-such-host.invalid", 443)


def test_parse_allowlist() -> None:
    hosts, nets = parse_allowlist(" A.example ,10.0.0.0/8,, ::1 ,127.0.0.1")
    assert hosts == {"a.example"}
    assert [str(n) for n in nets] == ["10.0.0.0/8", "::1/128", "127.0.0.1/32"]


# -- fetch, against a local http.server --------------------------------------------

BODY = b"\x89PNG fake image bytes " * 10
BIG = b"x" * 5000


class _Handler(BaseHTTPRequestHandler):
    paths: list[str]

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        if self.path == "/img.png":
            self._send(200, BODY)
        elif self.path == "/img.png?v=2":
            self._send(200, BODY[::-1])
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/trickle":
            # A byte at a time, each within the socket timeout: only a total deadline
            # stops it.
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
        elif self.path == "/big":
            self._send(200, BIG)
        elif self.path == "/big-unannounced":
            # No Content-Length: the body ends when the connection closes.
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BIG)
            self.close_connection = True
        else:
            self._send(404, b"not found")

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.paths: list[str] = []


@pytest.fixture
def http_server() -> Iterator[_Server]:
    server = _Server()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def url(server: _Server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_fetch_with_allowlist_and_http(http_server: _Server) -> None:
    body = fetch(
        url(http_server, "/img.png"),
        max_bytes=1024,
        allowlist="127.0.0.1",
        allow_http=True,
        timeout=5,
    )
    assert body == BODY
    assert (
        fetch(
            url(http_server, "/img.png?v=2"),
            max_bytes=1024,
            allowlist="127.0.0.0/8",
            allow_http=True,
            timeout=5,
        )
        == BODY[::-1]
    )
    assert http_server.paths == ["/img.png", "/img.png?v=2"]


def test_fetch_of_loopback_is_refused_without_allowlist(http_server: _Server) -> None:
    with pytest.raises(EgressRefused):
        fetch(url(http_server, "/img.png"), max_bytes=1024, allow_http=True, timeout=5)
    # By name too.
    port = http_server.server_address[1]
    with pytest.raises(EgressRefused):
        fetch(f"http://localhost:{port}/img.png", max_bytes=1024, allow_http=True, timeout=5)
    assert http_server.paths == []  # refused before connecting


def test_fetch_of_http_is_refused_unless_allowed(http_server: _Server) -> None:
    with pytest.raises(EgressRefused):
        fetch(url(http_server, "/img.png"), max_bytes=1024, allowlist="127.0.0.1", timeout=5)
    for bad in ("ftp://127.0.0.1/x", "file:///etc/passwd", "gopher://127.0.0.1/"):
        with pytest.raises(EgressRefused):
            fetch(bad, max_bytes=1024, allowlist="127.0.0.1", allow_http=True, timeout=5)
    assert http_server.paths == []


def test_fetch_does_not_follow_redirects(http_server: _Server) -> None:
    with pytest.raises(ValueError, match="302"):
        fetch(
            url(http_server, "/redirect"),
            max_bytes=1024,
            allowlist="127.0.0.1",
            allow_http=True,
            timeout=5,
        )
    assert http_server.paths == ["/redirect"]  # the target was never requested


def test_fetch_error_status_raises(http_server: _Server) -> None:
    with pytest.raises(ValueError, match="404"):
        fetch(
            url(http_server, "/missing"),
            max_bytes=1024,
            allowlist="127.0.0.1",
            allow_http=True,
            timeout=5,
        )


@pytest.mark.parametrize("path", ["/big", "/big-unannounced"])
def test_fetch_caps_the_body(http_server: _Server, path: str) -> None:
    with pytest.raises(ValueError, match="larger than"):
        fetch(
            url(http_server, path),
            max_bytes=len(BIG) - 1,
            allowlist="127.0.0.1",
            allow_http=True,
            timeout=5,
        )
    # Exactly at the cap is fine.
    assert (
        fetch(
            url(http_server, path),
            max_bytes=len(BIG),
            allowlist="127.0.0.1",
            allow_http=True,
            timeout=5,
        )
        == BIG
    )


def test_fetch_has_a_total_deadline(http_server: _Server) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="longer than"):
        fetch(
            url(http_server, "/trickle"),
            max_bytes=1000,
            timeout=1.0,
            total_timeout=1.0,
            allowlist="127.0.0.1",
            allow_http=True,
        )
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("host", ["64:ff9b::808:808", "2002:808:808::"])
def test_public_ipv4_behind_nat64_or_6to4_is_accepted(host: str) -> None:
    assert resolve_checked(host, 443) == host
