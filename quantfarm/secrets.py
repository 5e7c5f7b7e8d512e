"""Secrets at rest: a Fernet key ring built from ``QUANTFARM_SECRET_KEY``.

The setting holds one or more keys separated by commas, newest first. The first
key encrypts; every key decrypts, so a key is rotated by putting the new one in
front, running ``quantfarm secrets rotate`` and then dropping the old one. A key
is either a Fernet key (32 url-safe base64 bytes) or any passphrase of at least
16 characters, stretched with SHA-256. The embedded stack with no key set keeps a
generated one in ``QUANTFARM_HOME/secret.key`` (mode 0600).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from quantfarm.errors import QuantfarmError

KEY_FILE = "secret.key"
ENVELOPE = "fernet"  # {"fernet": "<token>"}: how an encrypted JSON value is stored


class SecretKeyError(QuantfarmError):
    code = "secret_key_error"


def _fernet_key(raw: str) -> bytes:
    raw = raw.strip()
    try:
        if len(base64.urlsafe_b64decode(raw.encode())) == 32:
            return raw.encode()
    except (binascii.Error, ValueError):
        pass
    if len(raw) < 16:
        raise SecretKeyError("QUANTFARM_SECRET_KEY: each key must be a Fernet key or a passphrase of at least 16 characters.")
    return base64.urlsafe_b64encode(hashlib.sha256(raw.encode()).digest())


class KeyRing:
    """Encrypt JSON values with the newest key; decrypt with any key of the ring."""

    def __init__(self, keys: list[str]):
        if not keys:
            raise SecretKeyError("QUANTFARM_SECRET_KEY holds no key.")
        raw = [_fernet_key(k) for k in keys]
        self._primary = raw[0]
        self._fernet = MultiFernet([Fernet(k) for k in raw])

    def derive(self, label: bytes) -> bytes:
        """Return a key for another purpose (cookie signing, say), derived from the newest key."""
        import hmac

        return hmac.new(self._primary, label, hashlib.sha256).digest()

    def seal(self, value: Any) -> dict[str, str]:
        """Return ``value`` as an encrypted envelope."""
        return {ENVELOPE: self._fernet.encrypt(json.dumps(value, separators=(",", ":")).encode()).decode()}

    def open(self, stored: Any) -> Any:
        """Return the value inside an envelope (a value stored before encryption passes through).

        Raises SecretKeyError when no key of the ring can decrypt it.
        """
        if not (isinstance(stored, dict) and set(stored) == {ENVELOPE}):
            return stored
        try:
            return json.loads(self._fernet.decrypt(stored[ENVELOPE].encode()))
        except InvalidToken:
            raise SecretKeyError(
                "A stored secret cannot be decrypted with QUANTFARM_SECRET_KEY; was the key changed without keeping the old one?"
            ) from None

    def rotate(self, stored: Any) -> dict[str, str]:
        """Return the envelope re-encrypted under the newest key."""
        return self.seal(self.open(stored))


def keyring_from_settings(settings) -> KeyRing:
    """Build the key ring from settings; the embedded stack creates its own key file once.

    Raises SecretKeyError when no key is set outside the embedded stack (every process
    of a production farm must share one key).
    """
    configured = settings.secret_key.get_secret_value() if settings.secret_key is not None else ""
    keys = [k for k in configured.split(",") if k.strip()]
    if keys:
        return KeyRing(keys)
    if not settings.embedded:
        raise SecretKeyError(
            "Set QUANTFARM_SECRET_KEY (for example the output of `quantfarm secrets new-key`): every API and worker "
            "process of the farm needs the same key to encrypt and read job secrets."
        )
    return KeyRing([_home_key(Path(settings.home))])


def _home_key(home: Path) -> str:
    path = home / KEY_FILE
    if path.exists():
        return path.read_text().strip()
    home.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key().decode()
    tmp = home / f".{KEY_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    try:
        os.link(tmp, path)  # atomic and never overwrites: a process racing us keeps one key for all
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def new_key() -> str:
    """Return a fresh Fernet key."""
    return Fernet.generate_key().decode()
