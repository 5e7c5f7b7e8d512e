"""Signing in and out of the pages with an API key, in real Chromium, against `quantfarm run` with auth on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser.conftest import CHROMIUM_ARGS  # noqa: F401 (the browser fixture launches with them)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """A stack that needs keys, and a member key made the way an operator makes the first one (--local)."""
    from tests.support.stack import EmbeddedStack

    home = tmp_path_factory.mktemp("qf-auth-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTFARM_")}
    made = subprocess.run([str(Path(sys.executable).parent / "quantfarm"), "keys", "create", "--local", "--team", "web",
                           "--role", "member"], env={**env, "QUANTFARM_HOME": str(home)}, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    s = EmbeddedStack(home, QUANTFARM_AUTH="on").start()
    yield s, made.stdout.splitlines()[0]
    assert s.stop() == 0


def test_sign_in_with_a_key_then_sign_out(browser, locked, shots):
    stack, key = locked
    ctx = browser.new_context(base_url=stack.url)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto("/jobs")
    assert "/signin" in page.url  # no key, no pages
    page.fill("#f-key", "qf_key_not_a_real_one")
    page.click("#signin")
    assert page.locator("#key-error").inner_text().startswith("The API key is unknown or revoked")
    page.fill("#f-key", key)
    page.click("#signin")
    page.wait_for_url("**/jobs")
    assert page.locator(".who").inner_text() == "member · web"
    page.screenshot(path=str(shots / "signed-in.png"))
    (cookie,) = [c for c in ctx.cookies() if c["name"] == "quantfarm_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and key not in cookie["value"]
    assert "quantfarm_session" not in page.evaluate("document.cookie")  # page scripts cannot read it
    page.click("#signout")
    page.wait_for_url("**/signin")
    page.goto("/jobs")
    assert "/signin" in page.url
    ctx.close()
    assert not errors, errors
