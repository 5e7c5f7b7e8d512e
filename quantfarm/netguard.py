"""Server-side request forgery guard for outgoing webhook calls.

A webhook URL comes from a user, and the farm's workers sit inside a network
(metadata services, databases, the broker). So a URL may only reach public
addresses unless ``QUANTFARM_WEBHOOK_ALLOW_PRIVATE`` is on. The check runs at
submit time (a clear 422) and again when each request is sent: the guarded
HTTP session resolves the host itself and connects to the very address it
vetted, so a DNS answer that changes between check and send (rebinding) cannot
slip through.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from typing import Callable, Iterable, Iterator
from urllib.parse import urlsplit

from quantfarm.errors import ValidationFailed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# Special-purpose ranges that are not globally reachable (the IANA IPv4 and IPv6 special-purpose
# registries, which Python 3.13's ``is_global`` follows; 3.11's lists are older and miss some),
# plus IPv6 site-local (fec0::/10), deprecated but still routed inside some networks. Stricter
# than 3.13 in one way: all of 2001::/23 is refused (bar Teredo, judged by the IPv4 it carries).
_NOT_GLOBAL = [(ipaddress.ip_network(net), label) for net, label in (
    ("0.0.0.0/8", "a 'this network' address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a 6to4 relay anycast address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("240.0.0.0/4", "a reserved address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("100::/64", "a discard-only address"),
    ("2001::/23", "an IETF protocol assignment address"),
    ("2001:db8::/32", "a documentation address"),
    ("3fff::/20", "a documentation address"),
    ("5f00::/16", "a segment-routing (SRv6) address"),
    ("fc00::/7", "a private address"),
    ("fec0::/10", "a site-local address"),
)]


class URLRefused(ValidationFailed):
    """A webhook URL that may not be called; ``transient`` when DNS merely failed."""

    def __init__(self, field: str, reason: str, *, transient: bool = False):
        super().__init__({field: reason}, f"Webhook URL refused: {reason}.")
        self.reason = reason
        self.transient = transient


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    # An IPv6 address can carry an IPv4 one that the network stack (or a translator) will reach.
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


_CHECKS = (
    ("is_unspecified", "an unspecified address"),
    ("is_loopback", "a loopback address"),
    ("is_link_local", "a link-local address"),
    ("is_multicast", "a multicast address"),
    ("is_site_local", "a site-local address"),
    ("is_private", "a private address"),
    ("is_reserved", "a reserved address"),
)


def address_problem(ip: str | IPAddress) -> str | None:
    """Return why ``ip`` is not a public unicast address, or None if it is."""
    addr = ip if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(str(ip).split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner is not None:
            why = address_problem(inner)
            return f"{why} (embedded in {addr})" if why else None
    for attr, label in _CHECKS:
        if getattr(addr, attr, False):
            return f"{addr} is {label}"
    for net, label in _NOT_GLOBAL:
        if addr.version == net.version and addr in net:
            return f"{addr} is {label}"
    if not addr.is_global:
        return f"{addr} is not a public address"
    return None


def is_public_address(ip: str | IPAddress) -> bool:
    """Return whether ``ip`` is a public unicast address (IPv4 or IPv6)."""
    return address_problem(ip) is None


def _host_and_port(url: str, field: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise URLRefused(field, "must be an http(s) URL")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise URLRefused(field, "has an invalid port") from None
    if not host:
        raise URLRefused(field, "has no host")
    return host, port or (443 if parts.scheme == "https" else 80)


def resolve_public(
    host: str, port: int, *, allow_private: bool, field: str = "url", resolver: Resolver = socket.getaddrinfo
) -> list[tuple[int, str]]:
    """Resolve ``host`` and return its ``(family, ip)`` pairs, all of them allowed.

    Raises URLRefused when the host does not resolve (transient) or when any of
    its addresses is not public and ``allow_private`` is off: one bad address is
    enough, since the client may pick it.
    """
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise URLRefused(field, f"the host {host!r} does not resolve ({exc.__class__.__name__})", transient=True) from None
    pairs: list[tuple[int, str]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        ip = sockaddr[0]
        if not allow_private:
            why = address_problem(ip)
            if why:
                raise URLRefused(field, f"the host {host!r} resolves to {why}; only public addresses may be called")
        if (family, ip) not in pairs:
            pairs.append((family, ip))
    if not pairs:
        raise URLRefused(field, f"the host {host!r} does not resolve", transient=True)
    return pairs


def check_webhook_url(url: str, allow_private: bool, field: str = "webhooks.0.url", *, resolver: Resolver = socket.getaddrinfo) -> None:
    """Refuse a webhook URL that is malformed or reaches a non-public address.

    With ``allow_private`` only the URL's shape is checked (no DNS lookup).
    Raises URLRefused (a ValidationFailed, HTTP 422) naming ``field`` and why;
    a host that does not resolve is refused too, since it cannot be vetted.
    """
    host, port = _host_and_port(url, field)
    if not allow_private:
        resolve_public(host, port, allow_private=False, field=field, resolver=resolver)


def check_webhook_urls(urls: Iterable[str], allow_private: bool, *, resolver: Resolver = socket.getaddrinfo) -> None:
    """Check every URL of a job's ``webhooks`` list; report all bad ones at once.

    Raises ValidationFailed with one entry per refused ``webhooks.N.url``.
    """
    fields: dict[str, str] = {}
    for i, url in enumerate(urls):
        try:
            check_webhook_url(url, allow_private, f"webhooks.{i}.url", resolver=resolver)
        except URLRefused as exc:
            fields.update(exc.fields)
    if fields:
        raise ValidationFailed(fields)


# --- a requests session that connects only to vetted addresses --------------------


class AddressRefused(Exception):
    """Raised inside the HTTP stack when a connection would reach a refused address.

    Deliberately not an OSError, so urllib3 does not retry it or wrap it away.
    """

    def __init__(self, refusal: URLRefused):
        super().__init__(refusal.reason)
        self.refusal = refusal


def guarded_session(allow_private: bool, *, resolver: Resolver = socket.getaddrinfo):
    """Return a ``requests.Session`` whose every connection goes to a vetted public address.

    With ``allow_private`` the session is a plain one. Environment proxies are
    ignored: the guard must see the address it actually connects to.
    """
    import requests

    session = requests.Session()
    session.trust_env = False
    adapter = _adapter(None if allow_private else resolver)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class SocketWatch:
    """The sockets one thread opens inside ``watch_sockets``, so a watchdog can cut them all."""

    def __init__(self):
        self.sockets: list[socket.socket] = []
        self.cut = False
        self._lock = threading.Lock()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)
            if self.cut:
                _shutdown(sock)

    def cut_all(self) -> None:
        """Shut every watched socket down: a read blocked on one returns at once."""
        with self._lock:
            self.cut = True
            for sock in self.sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already, or handed over to TLS
        pass


_watching = threading.local()


@contextlib.contextmanager
def watch_sockets() -> Iterator[SocketWatch]:
    """Collect the sockets this thread's session connects while the block runs."""
    previous = getattr(_watching, "watch", None)
    watch = _watching.watch = SocketWatch()
    try:
        yield watch
    finally:
        _watching.watch = previous


def _watched(sock):
    watch = getattr(_watching, "watch", None)
    if watch is not None and sock is not None:
        watch.add(sock)
    return sock


def _adapter(resolver: Resolver | None):
    """An adapter whose connections are watched, and vetted first unless ``resolver`` is None."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
    from urllib3.util import connection as u3conn

    def new_conn(self):
        if resolver is None:
            return _watched(HTTPConnection._new_conn(self))
        return _watched(guarded_new_conn(self))

    def connect(self, base):
        base.connect(self)
        _watched(self.sock)  # the TLS socket, once wrapped

    def guarded_new_conn(self):
        try:
            pairs = resolve_public(self._dns_host, self.port, allow_private=False, field="url", resolver=resolver)
        except URLRefused as exc:
            if exc.transient:
                raise NewConnectionError(self, exc.reason) from None
            raise AddressRefused(exc) from None
        last: OSError | None = None
        for _family, ip in pairs:
            try:
                return u3conn.create_connection(
                    (ip, self.port), self.timeout, source_address=self.source_address, socket_options=self.socket_options
                )
            except socket.timeout as exc:
                raise ConnectTimeoutError(self, f"Connection to {self.host} timed out.") from exc
            except OSError as exc:  # try the next vetted address, as create_connection would
                last = exc
        raise NewConnectionError(self, f"Failed to establish a new connection: {last}")

    class GuardedHTTPConnection(HTTPConnection):
        _new_conn = new_conn

    class GuardedHTTPSConnection(HTTPSConnection):
        _new_conn = new_conn

        def connect(self):
            connect(self, HTTPSConnection)

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}

    return GuardedAdapter()
