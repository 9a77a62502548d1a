"""TLS contexts for DICOM over TLS, following the BCP 195 profile (PS3.15 B.9 / B.10).

TLS 1.2 is the minimum; TLS 1.2 cipher suites are limited to forward-secret AEAD suites (ECDHE
with AES-GCM or ChaCha20-Poly1305); TLS 1.3 uses OpenSSL's defaults, which are all AEAD. The
listener presents its certificate and, when a CA is configured, verifies client certificates
(required with ``listener.tls_require_client_cert``). The sender verifies the peer's certificate
and host name against the destination's CA (or the system store).
"""

from __future__ import annotations

import ssl
from pathlib import Path

BCP195_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_context(cert: Path, key: Path, ca: Path | None = None, require_client_cert: bool = False) -> ssl.SSLContext:
    """Context for the listener."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_TLS12_CIPHERS)
    ctx.load_cert_chain(str(cert), str(key))
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Context for the sender: verify the peer (certificate and host name)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_TLS12_CIPHERS)
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx
