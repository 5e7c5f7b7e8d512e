"""The SSRF guard refuses every non-global range, in every IPv6 disguise of a private IPv4 address."""

from __future__ import annotations

import socket

import pytest

from quantfarm.errors import ValidationFailed
from quantfarm.netguard import address_problem, check_webhook_url, is_public_address

REFUSED = [
    ("fec0::1", "fec0::1 is a site-local address"),  # passed the guard before: Python 3.11 calls it global
    ("feff:ffff::1", "feff:ffff::1 is a site-local address"),
    ("::ffff:192.168.0.1", "192.168.0.1 is a private address (embedded in ::ffff:c0a8:1)"),
    ("::ffff:100.64.0.1", "100.64.0.1 is a shared (carrier-grade NAT) address (embedded in ::ffff:6440:1)"),
    ("2002:a9fe:a9fe::1", "169.254.169.254 is a link-local address (embedded in 2002:a9fe:a9fe::1)"),  # 6to4
    ("64:ff9b::a9fe:a9fe", "169.254.169.254 is a link-local address (embedded in 64:ff9b::a9fe:a9fe)"),  # NAT64
    ("64:ff9b::7f00:1", "127.0.0.1 is a loopback address (embedded in 64:ff9b::7f00:1)"),
    ("64:ff9b:1::a00:1", "64:ff9b:1::a00:1 is a reserved address"),  # local-use NAT64
    ("::127.0.0.1", "::7f00:1 is a reserved address"),  # IPv4-compatible, deprecated
    ("192.0.0.8", "192.0.0.8 is an IETF protocol assignment address"),  # global to Python 3.11
    ("3fff::1", "3fff::1 is a documentation address"),  # global to Python 3.11
    ("2001:db8::1", "2001:db8::1 is a private address"),
    ("198.18.0.1", "198.18.0.1 is a private address"),
    ("240.0.0.1", "240.0.0.1 is a private address"),
    ("255.255.255.255", "255.255.255.255 is a private address"),
    ("0.1.2.3", "0.1.2.3 is a private address"),
]


@pytest.mark.parametrize("ip,why", REFUSED)
def test_non_global_addresses_are_refused(ip, why):
    assert address_problem(ip) == why and not is_public_address(ip)


@pytest.mark.parametrize("ip", ["8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8"])
def test_global_addresses_and_their_ipv6_forms_pass(ip):
    assert address_problem(ip) is None


def test_site_local_ipv6_url_is_refused_at_submit_and_by_dns():
    """``http://[fec0::1]/`` passed the guard; a name resolving to it must be refused too."""
    with pytest.raises(ValidationFailed) as err:
        check_webhook_url("http://[fec0::1]/hook", allow_private=False, field="webhooks.0.url")
    assert err.value.fields == {"webhooks.0.url": "the host 'fec0::1' resolves to fec0::1 is a site-local address; "
                                                  "only public addresses may be called"}

    def resolver(host, port, **_):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fec0::2", port, 0, 0))]

    with pytest.raises(ValidationFailed, match="fec0::2 is a site-local address"):
        check_webhook_url("https://hooks.example.com/x", allow_private=False, resolver=resolver)
