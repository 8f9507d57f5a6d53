"""Optional DICOM TLS (PS3.15 Annex B.1, "Basic TLS Secure Transport Connection Profile") for both directions."""

from __future__ import annotations

import ssl

from liverfat.service.config import TlsSection


def server_context(tls: TlsSection) -> ssl.SSLContext | None:
    """The listener's context: our certificate, peers verified against the CA file; ``None`` without TLS."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca_certificates))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(tls: TlsSection) -> ssl.SSLContext | None:
    """The sender's context: destinations verified against the CA file, our certificate offered."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_certificates))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.check_hostname
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context
