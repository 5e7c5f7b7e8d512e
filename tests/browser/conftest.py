"""Browser fixtures: the embedded stack (`quantfarm run`) and real headless Chromium via Playwright.

Nothing is faked: the pages are served by the API process of `quantfarm run`, jobs run in
its worker on tiny local models (the Hugging Face Hub is unreachable here, so models are
built on disk with tests/support/models.py and submitted as `local` sources).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import CACHE

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """`quantfarm run` (API + worker + sweeper) with its own home and port; SIGTERM at the end."""
    from tests.support.stack import EmbeddedStack

    s = EmbeddedStack(
        tmp_path_factory.mktemp("qf-home"),
        QUANTFARM_LEASE_SECONDS="5", QUANTFARM_SWEEP_SECONDS="1", QUANTFARM_TORCH_THREADS="1",
    )
    s.start()
    home = s.get("/")
    if not home.headers.get("Content-Type", "").startswith("text/html"):
        s.stop()
        pytest.fail(f"GET / answered {home.status_code} {home.headers.get('Content-Type')}: the web pages are not "
                    "registered; add \"api.web\" to api.app.BLUEPRINT_MODULES")
    yield s
    code = s.stop()
    assert code == 0, f"quantfarm run exited with {code}:\n{s.log.read_text()[-3000:]}"


@pytest.fixture(scope="session")
def small_model(tokenizer_dir) -> Path:
    """A 2-layer Llama: jobs on it finish in seconds."""
    from tests.support.models import make_tiny_model

    return make_tiny_model(CACHE / "browser-llama-2", "llama", tokenizer_dir=tokenizer_dir, layers=2)


@pytest.fixture(scope="session")
def deep_model(tokenizer_dir) -> Path:
    """A 12-layer Llama: a GPTQ job on it is still running when a person clicks Cancel."""
    from tests.support.models import make_tiny_model

    return make_tiny_model(CACHE / "browser-llama-12", "llama", tokenizer_dir=tokenizer_dir, layers=12, seed=1)


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium from apt, launched with the flags this sandbox needs."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing; install it with `apt-get install -y chromium` (make test does)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=10_000)  # two shared CPU cores: page scripts can be slow to run
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, stack):
    """A fresh browser tab on the stack; script errors on the page fail the test."""
    ctx = browser.new_context(base_url=stack.url, viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(20_000)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    ctx.close()
    assert not errors, f"script errors on the page: {errors}"


@pytest.fixture(scope="session")
def shots() -> Path:
    # Old screenshots would hide a test that stopped taking them.
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
