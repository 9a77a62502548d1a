"""Login for the worklist page: a PBKDF2 password hash or a token from the configuration, and a
signed session cookie.

There is no default password: beyond loopback the node refuses to start without one of them
(worker/settings.py). The hash is ``pbkdf2_sha256$<iterations>$<salt>$<digest>`` (base64, as
written by ``cxr-triage hash-password``), compared in constant time. The session cookie is
``<expiry>.<HMAC-SHA256>`` under a key drawn at start-up, so a restart logs everybody out and
nothing secret is stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

ITERATIONS = 260_000
COOKIE = "cxr_triage_session"
SESSION_SECONDS = 12 * 3600


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """The value for ``web.password_hash``."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode("ascii")

    return f"pbkdf2_sha256${iterations}${b64(salt)}${b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches ``encoded`` (a malformed hash matches nothing)."""
    try:
        scheme, iterations, salt, digest = encoded.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), base64.b64decode(salt), int(iterations))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


class Gate:
    """Checks a password or token, and issues and checks session cookies."""

    def __init__(self, password_hash: str, token: str) -> None:
        self.password_hash, self.token = password_hash, token
        self._key = secrets.token_bytes(32)

    @property
    def enabled(self) -> bool:
        return bool(self.password_hash or self.token)

    def accepts(self, secret: str) -> bool:
        """A login with the password (or the token)."""
        ok = False
        if self.token:
            ok = hmac.compare_digest(secret.encode(), self.token.encode())
        if not ok and self.password_hash:
            ok = verify_password(secret, self.password_hash)
        return ok

    def bearer_ok(self, header: str | None) -> bool:
        """``Authorization: Bearer <token>`` for scripts reading ``/api/studies``."""
        if not self.token or not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self.token.encode())

    def issue(self, now: float | None = None) -> str:
        expiry = str(int((now or time.time()) + SESSION_SECONDS))
        return f"{expiry}.{hmac.new(self._key, expiry.encode(), hashlib.sha256).hexdigest()}"

    def session_ok(self, cookie: str | None, now: float | None = None) -> bool:
        if not cookie or "." not in cookie:
            return False
        expiry, sig = cookie.split(".", 1)
        good = hmac.new(self._key, expiry.encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(sig, good) and expiry.isdigit() and int(expiry) > (now or time.time())
