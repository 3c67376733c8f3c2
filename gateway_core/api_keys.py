"""API key format (SPEC §3.1): `nz_` + 43 URL-safe base64 characters of 32 random bytes."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

from attrs import frozen

KEY_PREFIX_MARK = "nz_"
KEY_LENGTH = 46
PREFIX_LENGTH = 12

_KEY_RE = re.compile(r"^nz_[A-Za-z0-9_-]{43}$")
_PREFIX_RE = re.compile(r"^nz_[A-Za-z0-9_-]{9}$")


@frozen
class NewKey:
    """A freshly generated key: `secret` is shown once and never stored."""

    secret: str

    @property
    def prefix(self) -> str:
        return self.secret[:PREFIX_LENGTH]


def generate_key() -> NewKey:
    """32 bytes from the OS CSPRNG, encoded without padding (43 characters)."""
    body = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    return NewKey(secret=KEY_PREFIX_MARK + body)


def is_well_formed_key(candidate: str) -> bool:
    return bool(_KEY_RE.match(candidate))


def is_well_formed_prefix(candidate: str) -> bool:
    return bool(_PREFIX_RE.match(candidate))


def prefix_of(key: str) -> str:
    return key[:PREFIX_LENGTH]


def cache_digest(key: str) -> str:
    """Digest of the *full* key under which a verified key is cached (never the prefix alone)."""
    return hashlib.sha256(key.encode("ascii", "replace")).hexdigest()
