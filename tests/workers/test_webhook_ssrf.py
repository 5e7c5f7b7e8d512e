"""Webhook SSRF guards: private addresses refused at submit, at send time and at connect (DNS rebinding).

The DNS-rebinding tests fake the resolver in-process, since no DNS server can be
controlled here; the connection they make is still real (a loopback receiver).
"""

from __future__ import annotations

import socket

import pytest

from quantfarm.errors import ValidationFailed
from quantfarm.netguard import (
    URLRefused,
    address_problem,
    check_webhook_url,
    check_webhook_urls,
    guarded_session,
    is_public_address,
)
from tests.support.receiver import Receiver
from workers.webhooks import WebhookSender
from tests.workers.test_webhooks import attempts_of, ended_job, make_settings, secret  # noqa: F401 (secret: a fixture)


# --- SSRF -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://10.1.2.3/hook", "10.1.2.3 is a private address"),
        ("http://127.0.0.1:8080/hook", "127.0.0.1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254 is a link-local address"),
        ("http://[::1]/hook", "::1 is a loopback address"),
        ("http://[::ffff:127.0.0.1]/hook", "127.0.0.1 is a loopback address (embedded in ::ffff:7f00:1)"),
        ("http://[::ffff:10.0.0.1]/hook", "10.0.0.1 is a private address"),
        ("http://[fe80::1]/hook", "fe80::1 is a link-local address"),
        ("http://[fd00::1]/hook", "fd00::1 is a private address"),
        ("http://0.0.0.0/hook", "0.0.0.0 is an unspecified address"),
        ("http://224.0.0.1/hook", "224.0.0.1 is a multicast address"),
        ("http://100.64.0.1/hook", "100.64.0.1 is a shared (carrier-grade NAT) address"),
        ("http://localhost/hook", "is a loopback address"),
    ],
)
def test_private_urls_are_refused_at_submit(url, why):
    with pytest.raises(ValidationFailed) as err:
        check_webhook_url(url, allow_private=False, field="webhooks.2.url")
    assert list(err.value.fields) == ["webhooks.2.url"]
    assert why in err.value.fields["webhooks.2.url"] and "only public addresses" in err.value.fields["webhooks.2.url"]
    assert err.value.http_status == 422 and err.value.code == "validation_error"
    check_webhook_url(url, allow_private=True)  # the setting lets them through


def test_public_addresses_pass_and_bad_urls_fail():
    assert is_public_address("93.184.216.34") and is_public_address("2606:4700:4700::1111")
    assert not is_public_address("192.168.1.1") and not is_public_address("2002:0a00:0001::1")  # 6to4 of 10.0.0.1
    check_webhook_url("https://93.184.216.34/hooks", allow_private=False)
    with pytest.raises(ValidationFailed) as err:
        check_webhook_urls(["https://93.184.216.34/", "ftp://example.com/", "http://10.0.0.1/"], allow_private=False)
    assert err.value.fields == {
        "webhooks.1.url": "must be an http(s) URL",
        "webhooks.2.url": "the host '10.0.0.1' resolves to 10.0.0.1 is a private address; only public addresses may be called",
    }
    with pytest.raises(URLRefused) as err:
        check_webhook_url("http://no-such-host.invalid/", allow_private=False)
    assert err.value.transient and "does not resolve" in err.value.reason
    check_webhook_url("http://no-such-host.invalid/", allow_private=True)  # nothing to vet: no lookup


def test_private_url_is_refused_at_send_time(db, tmp_path, secret):
    with Receiver(secret) as rx:
        _, (did,) = ended_job(db, [{"url": rx.url, "secret": secret}])
        out = WebhookSender(db, make_settings(tmp_path, webhook_allow_private=False)).deliver(did)
    assert (out.status, out.sent, out.retry) == ("failed", False, False)
    assert out.error.startswith("refused: the host '127.0.0.1' resolves to 127.0.0.1 is a loopback address")
    assert rx.received == []
    _, log = attempts_of(db, did)
    assert [(x.status_code, x.error) for x in log] == [(None, out.error)]


def _resolver(answers: list[str]):
    """A fake DNS: each lookup returns the next answer (the last one repeats)."""
    calls = []

    def resolve(host, port, type=0, **kw):
        ip = answers[min(len(calls), len(answers) - 1)]
        calls.append((host, ip))
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        return [(fam, socket.SOCK_STREAM, 6, "", (ip, port))]

    resolve.calls = calls
    return resolve


def test_dns_rebinding_is_refused_at_connect(db, tmp_path, secret):
    with Receiver(secret) as rx:
        port = rx.server.server_address[1]
        _, (did,) = ended_job(db, [{"url": f"http://hooks.example:{port}/h", "secret": secret}])
        resolver = _resolver(["93.184.216.34", "127.0.0.1"])  # public when checked, loopback when connecting
        settings = make_settings(tmp_path, webhook_allow_private=False)
        sender = WebhookSender(db, settings, guarded_session(False, resolver=resolver), resolver=resolver)
        out = sender.deliver(did)
    assert (out.status, out.sent) == ("failed", False)
    assert "127.0.0.1 is a loopback address" in out.error
    assert [ip for _, ip in resolver.calls] == ["93.184.216.34", "127.0.0.1"]
    assert rx.received == []


def test_guarded_session_connects_to_the_address_it_vetted(monkeypatch, secret):
    """With the check relaxed for loopback only, the request lands on the vetted IP.

    hooks.example does not resolve in real DNS: reaching the receiver proves the
    connection used the guard's answer rather than a second, unchecked lookup.
    """
    import quantfarm.netguard as ng

    real = ng.address_problem
    monkeypatch.setattr(ng, "address_problem", lambda ip: None if str(ip) == "127.0.0.1" else real(ip))
    with Receiver(secret) as rx:
        resolver = _resolver(["127.0.0.1"])
        http = guarded_session(False, resolver=resolver)
        resp = http.post(f"http://hooks.example:{rx.server.server_address[1]}/x", data=b"{}", timeout=5)
    assert resp.status_code == 200 and len(rx.received) == 1
    assert resolver.calls == [("hooks.example", "127.0.0.1")]
    assert address_problem("127.0.0.1") == "127.0.0.1 is a loopback address"


# --- secrets ------------------------------------------------------------------------------------------
