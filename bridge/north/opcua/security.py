"""OPC UA security: the policies offered, the application certificate, trusted clients and users.

``configure_security`` is called by ``OpcUaServer.start`` after the application URI is set and
before the server starts listening. What it sets up (see docs/security.md):

- exactly the SecurityPolicy/mode pairs in ``opcua.security``; None only when listed;
- for Basic256Sha256: a self-signed application certificate and its key in
  ``opcua.certificate_dir``, created on first start (key mode 0600) and kept afterwards, so a
  client that trusted the bridge once keeps trusting it;
- client certificates trusted when they are in ``opcua.trusted_clients_dir`` (DER or PEM; the
  directory is re-read when it changes, no restart needed) or issued by a CA certificate there.
  Checked twice: on CreateSession (asyncua's certificate validator, which also checks validity
  dates and that the certificate names the client's application URI) and on every
  ActivateSession against the certificate the secure channel was actually opened with — asyncua
  only validates the certificate a client *claims* in CreateSession, and lets a session be
  created on a SecurityPolicy None channel even when None is not offered;
- users from ``opcua.users`` (scrypt hashes), anonymous sessions only when ``opcua.anonymous``.

A rejected client certificate is saved in ``<certificate_dir>/rejected`` (at most
``MAX_REJECTED`` files), so trusting it is a matter of moving the file into the trusted directory.
"""
from __future__ import annotations

import asyncio
import datetime
import functools
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.core.errors import BridgeError
from bridge.core.model import OpcUaConfig, OpcUaUser
from bridge.core.passwords import hash_password, verify_password

log = logging.getLogger("bridge.opcua")

POLICIES: dict[str, ua.SecurityPolicyType] = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}
CERT_FILE = "server-cert.der"
KEY_FILE = "server-key.pem"
REJECTED_DIR = "rejected"
MAX_REJECTED = 100  # rejected client certificates kept for the operator; more are only logged
CERT_DAYS = 3650  # validity of the application certificate the bridge creates
KEY_SIZE = 2048
CERT_SUFFIXES = (".der", ".pem", ".crt", ".cer")

# the checks on a client certificate at CreateSession; key usage flags are not checked, since the
# operator trusts a certificate explicitly by putting it in the trusted directory
CLIENT_CHECKS = (CertificateValidatorOptions.TIME_RANGE | CertificateValidatorOptions.URI
                 | CertificateValidatorOptions.TRUSTED | CertificateValidatorOptions.REVOKED
                 | CertificateValidatorOptions.PEER_CLIENT)


async def configure_security(server: Server, cfg: OpcUaConfig) -> None:
    """Set up the security of ``server`` (initialised, application URI set, not started) from ``cfg``."""
    if not cfg.security:
        raise BridgeError("opcua.security: no security mode listed")
    unknown = [s for s in cfg.security if s not in POLICIES]
    if unknown:
        raise BridgeError(f"opcua.security: unknown security mode {unknown[0]!r}")
    offered = list(dict.fromkeys(cfg.security))
    secure = [s for s in offered if s != "None"]
    allow_none = "None" in offered

    trust: ClientTrust | None = None
    cert: ApplicationCertificate | None = None
    if secure:
        cert = await asyncio.to_thread(load_or_create_certificate, Path(cfg.certificate_dir),
                                       server.get_application_uri(), _hostnames(cfg.endpoint))
        # as DER bytes: asyncua takes bytes for DER unless told otherwise
        await server.load_certificate(cert.der, format="der")
        await server.load_private_key(cert.key_der, format="der")
        # "" (a config not read by load_config, which resolves it): the default, <certificate_dir>/trusted
        trusted_dir = Path(cfg.trusted_clients_dir or Path(cfg.certificate_dir) / "trusted")
        trust = ClientTrust(trusted_dir, Path(cfg.certificate_dir) / REJECTED_DIR)
        await trust.refresh()
        server.set_certificate_validator(trust.validate)

    server.set_security_policy([POLICIES[s] for s in offered])
    tokens: list[type] = []
    if cfg.anonymous:
        tokens.append(ua.AnonymousIdentityToken)
    if cfg.users:
        tokens.append(ua.UserNameIdentityToken)
    server.set_identity_tokens(tokens)
    server.iserver.set_user_manager(BridgeUserManager(cfg.users, cfg.anonymous, allow_none, trust))

    # --- what was set up, once
    who = ", ".join(filter(None, ("anonymous" if cfg.anonymous else "",
                                  f"{len(cfg.users)} user(s)" if cfg.users else ""))) or "nobody"
    log.info("OPC UA security: %s; sessions for %s", ", ".join(offered), who)
    if cert is not None and trust is not None:
        log.info("OPC UA application certificate %s (%s, SHA-256 %s, valid until %s); trusted clients in %s "
                 "(%d certificate(s))", cert.cert_path, "created now" if cert.created else "kept",
                 cert.fingerprint, cert.certificate.not_valid_after_utc.date(), trust.directory, trust.count)
    if allow_none and cfg.anonymous:
        log.warning("OPC UA: SecurityPolicy None with anonymous access: anyone who can reach %s can read "
                    "every value", cfg.endpoint)
    if cfg.users and not secure:
        log.warning("OPC UA: users are configured but only SecurityPolicy None is offered: their passwords "
                    "cross the network in plain text")
    if not tokens:
        log.warning("OPC UA: anonymous access is off and no user is configured: no client can open a session")


# ------------------------------------------------------------------------------ our certificate
@dataclass(frozen=True)
class ApplicationCertificate:
    certificate: x509.Certificate
    key: rsa.RSAPrivateKey
    cert_path: Path
    key_path: Path
    created: bool  # made on this start

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def key_der(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, as hex pairs separated by colons (what certificate viewers show)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def load_or_create_certificate(directory: Path, application_uri: str,
                               hostnames: Iterable[str]) -> ApplicationCertificate:
    """The application certificate and key in ``directory``: loaded if there, else created (once).

    A certificate found there is kept as it is, even if the application URI or the host name has
    changed since (clients trust that very certificate); a warning says so. Delete both files to
    have a new pair made on the next start.
    """
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    try:
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True)
        has_cert, has_key = cert_path.exists(), key_path.exists()
        if has_cert and not has_key:
            raise BridgeError(f"OPC UA certificate {cert_path} is there but its key {key_path} is not: restore "
                              "the key, or delete the certificate to have a new pair made (clients then have "
                              "to trust the new certificate)")
        created = not has_key
        if has_key:
            key = _load_key(key_path)
            _check_key_mode(key_path)
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE)
            _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), 0o600)
        if has_cert:
            cert = _load_cert(cert_path)
            if cert.public_key().public_numbers() != key.public_key().public_numbers():
                raise BridgeError(f"OPC UA certificate {cert_path} does not belong to the key {key_path}")
            _check_kept(cert, cert_path, application_uri)
        else:
            created = True
            cert = _self_signed(key, application_uri, list(hostnames))
            _write(cert_path, cert.public_bytes(serialization.Encoding.DER), 0o644)
    except OSError as exc:
        raise BridgeError(f"OPC UA certificate directory {directory}: {exc}") from None
    return ApplicationCertificate(cert, key, cert_path, key_path, created)


def _self_signed(key: rsa.RSAPrivateKey, application_uri: str, hostnames: list[str]) -> x509.Certificate:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return cert_gen.generate_self_signed_app_certificate(
        key, f"modbus-bridge@{hostnames[0]}", {"organizationName": "modbus-bridge"}, names,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], days=CERT_DAYS)


def _hostnames(endpoint: str) -> list[str]:
    """The names a client may reach us by: this host's name first, then the endpoint's host if specific."""
    names = [socket.gethostname()]
    host = urlparse(endpoint).hostname
    if host and host not in ("0.0.0.0", "::") and host not in names:
        names.append(host)
    return names


def _check_kept(cert: x509.Certificate, path: Path, application_uri: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        log.error("OPC UA certificate %s expired on %s: clients will refuse it; delete it and its key to "
                  "have a new pair made", path, cert.not_valid_after_utc.date())
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if application_uri not in uris:
        log.warning("OPC UA certificate %s is for %s, not for the application URI %s (the endpoint's host "
                    "changed?); kept, but clients may refuse it: delete it and its key to have a new pair made",
                    path, ", ".join(uris) or "no URI", application_uri)


def _check_key_mode(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("OPC UA private key %s is readable by others (mode %o); chmod 600 it", path, mode)


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    data = path.read_bytes()
    try:
        key = (serialization.load_pem_private_key(data, None) if data.lstrip().startswith(b"-----")
               else serialization.load_der_private_key(data, None))
    except (ValueError, TypeError) as exc:
        raise BridgeError(f"OPC UA private key {path}: cannot read it ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BridgeError(f"OPC UA private key {path}: not an RSA key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return _parse_cert(path.read_bytes())
    except ValueError as exc:
        raise BridgeError(f"OPC UA certificate {path}: cannot read it ({exc})") from None


def _parse_cert(data: bytes) -> x509.Certificate:
    if data.lstrip().startswith(b"-----"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a new file with ``mode`` from the start, atomically: a crash leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ trusted clients
class ClientTrust(TrustStore):
    """The client certificates in one directory: trusted as they are, or as issuers (CAs).

    Re-read (``refresh``) at every CreateSession when the directory changed. A certificate that is
    in the directory is trusted on an exact match, without asyncua's chain verification (which
    logs a traceback for every certificate it does not trust).
    """

    def __init__(self, directory: Path, rejected_dir: Path | None = None):
        super().__init__([directory], [])
        self.directory = directory
        self.rejected_dir = rejected_dir
        self._snapshot: object = None
        self._exact: set[bytes] = set()
        self._subjects: set[x509.Name] = set()
        self.count = 0
        self._checks = CertificateValidator(CLIENT_CHECKS, self)

    async def refresh(self) -> None:
        await asyncio.to_thread(self._refresh)

    def _refresh(self) -> None:
        try:
            if not self.directory.exists():
                self.directory.mkdir(mode=0o700, parents=True)
            files = sorted(p for p in self.directory.iterdir()
                           if p.is_file() and p.suffix.lower() in CERT_SUFFIXES)
            snapshot = [(p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files]
        except OSError as exc:
            if self._snapshot is None:
                raise BridgeError(f"OPC UA trusted clients directory {self.directory}: {exc}") from None
            log.warning("OPC UA trusted clients directory %s: %s (keeping the certificates read before)",
                        self.directory, exc)
            return
        if snapshot == self._snapshot:
            return
        certs = []
        for path in files:
            try:
                certs.append(_parse_cert(path.read_bytes()))
            except (OSError, ValueError) as exc:
                log.warning("OPC UA trusted client certificate %s ignored: %s", path, exc)
        self._exact = {c.public_bytes(serialization.Encoding.DER) for c in certs}
        self._subjects = {c.subject for c in certs}
        self._trust_store = x509.verification.Store(certs) if certs else None
        if self._snapshot is not None:
            log.info("OPC UA trusted clients re-read from %s: %d certificate(s)", self.directory, len(certs))
        self._snapshot = snapshot
        self.count = len(certs)

    async def load_trust(self) -> None:
        self._snapshot = None
        await self.refresh()

    def is_trusted(self, certificate: x509.Certificate) -> bool:
        if certificate.public_bytes(serialization.Encoding.DER) in self._exact:
            return True
        if certificate.issuer == certificate.subject or certificate.issuer not in self._subjects:
            return False  # self-signed and not in the directory, or no issuer of it there
        return super().is_trusted(certificate)

    def is_trusted_der(self, der: bytes) -> bool:
        if der in self._exact:
            return True
        try:
            return self.is_trusted(x509.load_der_x509_certificate(der))
        except ValueError:
            return False

    async def validate(self, certificate: x509.Certificate, client: ua.ApplicationDescription) -> None:
        """asyncua's certificate validator (CreateSession): raises a ServiceError to refuse the client."""
        await self.refresh()
        try:
            await self._checks.validate(certificate, client)
        except ServiceError as exc:
            self.rejected(certificate, client.ApplicationUri, ua.StatusCode(exc.code).name)
            raise

    def rejected(self, certificate: x509.Certificate, application_uri: str | None, reason: str) -> None:
        """Log a refused client certificate and keep a copy of it for the operator."""
        saved = ""
        if self.rejected_dir is not None:
            name = f"{_common_name(certificate)}-{certificate.fingerprint(hashes.SHA256()).hex()[:16]}.der"
            path = self.rejected_dir / _safe(name)
            try:
                if not path.exists():
                    self.rejected_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                    if sum(1 for _ in self.rejected_dir.glob("*.der")) < MAX_REJECTED:
                        _write(path, certificate.public_bytes(serialization.Encoding.DER), 0o644)
                if path.exists():
                    saved = f"; saved as {path}, move it to {self.directory} to trust it"
            except OSError as exc:
                log.debug("cannot save the rejected certificate: %s", exc)
        log.warning("OPC UA client %s refused: %s (certificate %r, SHA-256 %s)%s", application_uri or "?", reason,
                    _common_name(certificate), fingerprint(certificate), saved)


def _common_name(cert: x509.Certificate) -> str:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else "certificate"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


# ------------------------------------------------------------------------------ users
@functools.cache
def _dummy_hash() -> str:
    """A hash no password matches, checked for unknown users so they take as long as known ones."""
    return hash_password(os.urandom(16).hex())


class BridgeUserManager(UserManager):
    """Who may activate a session, checked at every ActivateSession (asyncua calls it synchronously).

    Refused with a specific status (a ServiceError, which asyncua sends back as the fault):
    a session on a SecurityPolicy None channel when None is not offered, and a secure channel
    opened with a certificate that is not trusted. Refused with BadUserAccessDenied (None):
    anonymous when not allowed, an unknown user or a wrong password.
    """

    def __init__(self, users: Iterable[OpcUaUser], anonymous: bool, allow_none: bool, trust: ClientTrust | None):
        self.users = {u.name: u.password_hash for u in users}
        self.anonymous = anonymous
        self.allow_none = allow_none
        self.trust = trust

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        # ``certificate``: what the secure channel was opened with (identity tokens with a
        # certificate are not offered): empty exactly on a SecurityPolicy None channel
        if not certificate:
            if not self.allow_none:
                log.warning("OPC UA: session refused: SecurityPolicy None is not offered")
                raise ServiceError(ua.StatusCodes.BadSecurityPolicyRejected)
        elif self.trust is not None and not self.trust.is_trusted_der(bytes(certificate)):
            try:
                cert = x509.load_der_x509_certificate(bytes(certificate))
                self.trust.rejected(cert, None, "certificate not trusted (secure channel)")
            except ValueError:
                log.warning("OPC UA: session refused: unreadable channel certificate")
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)
        if username is None:  # anonymous token
            if self.anonymous:
                return User(role=UserRole.User)
            log.warning("OPC UA: anonymous session refused")
            return None
        stored = self.users.get(username)
        ok = verify_password(password or "", stored if stored is not None else _dummy_hash())
        if ok and stored is not None:
            log.info("OPC UA: session for user %r", username)
            return User(role=UserRole.User, name=username)
        log.warning("OPC UA: login refused for %s", f"user {username!r}" if stored is not None else
                    f"unknown user {username[:64]!r}")
        return None


__all__ = ["ApplicationCertificate", "BridgeUserManager", "ClientTrust", "POLICIES", "configure_security",
           "fingerprint", "load_or_create_certificate"]
