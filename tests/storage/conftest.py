"""Storage fixtures: a real ``moto_server`` on loopback (one per session) and a fault proxy per test."""

from __future__ import annotations

import pytest

from tests.support.s3server import FaultProxy, MotoServer, s3_settings_for


@pytest.fixture(scope="session")
def moto():
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3_proxy(moto):
    proxy = FaultProxy(moto.port).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def s3_settings(tmp_path, moto):
    """Settings for a fresh bucket on moto_server, talked to directly."""
    return s3_settings_for(tmp_path, moto.url)


@pytest.fixture
def faulty_s3_settings(tmp_path, s3_proxy):
    """Settings for a fresh bucket on moto_server, through the fault proxy."""
    return s3_settings_for(tmp_path, s3_proxy.url)
