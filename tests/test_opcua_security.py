"""OPC UA security (SPEC §2.5, docs/security.md) as real asyncua clients meet it, on loopback.

One bridge with the default security (Basic256Sha256 Sign and SignAndEncrypt, no None), anonymous
access off and one user is shared by most tests of this module, per event loop (an asyncua
server takes over a second to start). The tests that need another configuration start their own.
Client certificates are made with asyncua's own certificate helpers.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import pytest_asyncio
from asyncua import Client, ua
from asyncua.crypto import cert_gen
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from bridge.core.errors import BridgeError
from bridge.core.model import OpcUaConfig, OpcUaUser
from bridge.north.opcua.security import load_or_create_certificate
from bridge.core.passwords import hash_password
from bridge.testing import Harness, MeterSpec, running_bridge

pytestmark = pytest.mark.asyncio(loop_scope="module")

NAMESPACE = "urn:modbus-bridge"
LAYOUT = {"line": [MeterSpec("m1", 1, 1, poll_interval=0.1)]}
VOLTAGE = 231.25  # exact in float32: what every client that gets in must read
USER, PASSWORD = "operator", "correct horse battery staple"
USERS = (OpcUaUser(USER, hash_password(PASSWORD)),)
SIGN = ua.MessageSecurityMode.Sign
SIGN_AND_ENCRYPT = ua.MessageSecurityMode.SignAndEncrypt
NONE_URI = "http://opcfoundation.org/UA/SecurityPolicy#None"


# ------------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class ClientCert:
    uri: str
    cert: Path  # DER
    key: Path  # PEM

    @property
    def der(self) -> bytes:
        return self.cert.read_bytes()


def make_client_cert(directory: Path, name: str) -> ClientCert:
    """A self-signed OPC UA client application certificate, as asyncua makes them."""
    uri = f"urn:test:{name}"
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName(socket.gethostname())],
        [ExtendedKeyUsageOID.CLIENT_AUTH], days=30)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    (directory / f"{name}-key.pem").write_bytes(cert_gen.dump_private_key_as_pem(key))
    return ClientCert(uri, directory / f"{name}.der", directory / f"{name}-key.pem")


async def secure_client(url: str, cert: ClientCert, mode: ua.MessageSecurityMode = SIGN_AND_ENCRYPT,
                        user: str | None = None, password: str | None = None) -> Client:
    """A client set up as an operator would: the server certificate comes from its endpoints."""
    client = Client(url, timeout=5)
    client.application_uri = cert.uri  # must be the URI in its certificate
    await client.set_security(SecurityPolicyBasic256Sha256, str(cert.cert), str(cert.key), mode=mode)
    if user is not None:
        client.set_user(user)
        client.set_password(password or "")
    return client


async def read_voltage(client: Client) -> float:
    ns = await client.get_namespace_index(NAMESPACE)
    dv = await client.get_node(ua.NodeId("m1.voltage", ns)).read_attribute(ua.AttributeIds.Value,
                                                                              raise_on_bad_status=False)
    assert dv.StatusCode.is_good(), dv.StatusCode
    return dv.Value.Value


async def reads_voltage(client: Client) -> float:
    async with client:
        return await read_voltage(client)


async def refused(client: Client) -> str:
    """The status the server refuses ``client``'s connection with (the test fails if it gets in)."""
    try:
        await client.connect()
    except ua.UaStatusCodeError as exc:
        return ua.StatusCode(exc.code).name
    await client.disconnect()
    pytest.fail("the client got a session")


def sha256(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex()


async def served_certificates(url: str) -> dict[tuple[str, int], bytes]:
    """(SecurityPolicyUri, mode) -> the server certificate of each endpoint the server offers."""
    endpoints = await Client(url, timeout=5).connect_and_get_server_endpoints()
    return {(e.SecurityPolicyUri, e.SecurityMode): e.ServerCertificate for e in endpoints}


async def set_voltage(h: Harness) -> None:
    h.sims["m1"].set_value("voltage", VOLTAGE)
    await h.polls("m1", 3)


# ------------------------------------------------------------------------------- the shared bridge
@dataclass
class Plant:
    h: Harness
    pki: Path
    trusted: Path
    alice: ClientCert  # trusted
    mallory: ClientCert  # not trusted
    carol: ClientCert  # not trusted at start; a test trusts her while the bridge runs

    @property
    def url(self) -> str:
        return self.h.opcua_endpoint


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plant(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("security")
    pki = base / "pki"
    trusted = base / "trusted-clients"
    certs = await asyncio.to_thread(lambda: [make_client_cert(base / "clients", n)
                                             for n in ("alice", "mallory", "carol")])
    trusted.mkdir()
    shutil.copy(certs[0].cert, trusted / "alice.der")
    options = dict(security=OpcUaConfig().security, certificate_dir=str(pki), trusted_clients_dir=str(trusted),
                   anonymous=False, users=USERS)
    async with running_bridge(LAYOUT, opcua=True, opcua_options=options) as h:
        await set_voltage(h)
        yield Plant(h, pki, trusted, *certs)


# ------------------------------------------------------------------------------- trusted clients
@pytest.mark.parametrize("mode", [SIGN_AND_ENCRYPT, SIGN], ids=["SignAndEncrypt", "Sign"])
async def test_trusted_client_with_password_reads_a_measurement(plant: Plant, mode):
    client = await secure_client(plant.url, plant.alice, mode, USER, PASSWORD)
    assert await reads_voltage(client) == VOLTAGE


async def test_untrusted_client_certificate_is_refused_and_kept_for_the_operator(plant: Plant):
    for mode in (SIGN_AND_ENCRYPT, SIGN):
        client = await secure_client(plant.url, plant.mallory, mode, USER, PASSWORD)
        assert await refused(client) == "BadCertificateUntrusted"
    # kept in <certificate_dir>/rejected, so trusting it is a move into the trusted directory
    assert [p.read_bytes() for p in (plant.pki / "rejected").iterdir()] == [plant.mallory.der]


async def test_a_trusted_certificate_claimed_on_an_untrusted_channel_is_refused(plant: Plant):
    """asyncua's validator only sees the certificate a client names in CreateSession; the bridge
    also checks the one the secure channel was opened with."""
    for claimed in (plant.alice.der, None):  # someone else's (public) certificate, or none at all
        client = await secure_client(plant.url, plant.mallory, SIGN_AND_ENCRYPT, USER, PASSWORD)
        client.application_uri = plant.alice.uri if claimed else plant.mallory.uri
        send = client.uaclient.create_session

        async def create_session(params, send=send, claimed=claimed):
            params.ClientCertificate = claimed
            return await send(params)

        client.uaclient.create_session = create_session
        assert await refused(client) == "BadCertificateUntrusted"


async def test_the_trusted_directory_is_reread_without_a_restart(plant: Plant):
    client = await secure_client(plant.url, plant.carol, SIGN_AND_ENCRYPT, USER, PASSWORD)
    assert await refused(client) == "BadCertificateUntrusted"
    # PEM works as well as DER
    pem = x509.load_der_x509_certificate(plant.carol.der).public_bytes(serialization.Encoding.PEM)
    (plant.trusted / "carol.pem").write_bytes(pem)
    client = await secure_client(plant.url, plant.carol, SIGN_AND_ENCRYPT, USER, PASSWORD)
    assert await reads_voltage(client) == VOLTAGE


# ------------------------------------------------------------------------------- users
@pytest.mark.parametrize("mode", [SIGN_AND_ENCRYPT, SIGN], ids=["SignAndEncrypt", "Sign"])
@pytest.mark.parametrize("user, password", [(USER, "wrong"), (USER, ""), ("intruder", PASSWORD),
                                            (USER.upper(), PASSWORD)],
                         ids=["wrong-password", "empty-password", "unknown-user", "name-is-case-sensitive"])
async def test_bad_credentials_are_refused(plant: Plant, mode, user, password):
    client = await secure_client(plant.url, plant.alice, mode, user, password)
    assert await refused(client) == "BadUserAccessDenied"


async def test_anonymous_is_refused_when_not_allowed(plant: Plant):
    client = await secure_client(plant.url, plant.alice, SIGN_AND_ENCRYPT)
    assert await refused(client) == "BadIdentityTokenRejected"
    endpoints = await Client(plant.url, timeout=5).connect_and_get_server_endpoints()
    for e in endpoints:
        assert [t.TokenType for t in e.UserIdentityTokens] == [ua.UserTokenType.UserName]


# ------------------------------------------------------------------------------- SecurityPolicy None
async def test_security_none_is_not_offered_by_default(plant: Plant, monkeypatch: pytest.MonkeyPatch):
    served = await served_certificates(plant.url)
    assert set(served) == {(SecurityPolicyBasic256Sha256.URI, SIGN), (SecurityPolicyBasic256Sha256.URI,
                                                                      SIGN_AND_ENCRYPT)}
    # a client asking for None finds no such endpoint
    with pytest.raises(ua.UaError, match="No matching endpoints"):
        await Client(plant.url, timeout=5).connect()
    # and one that ignores the endpoints and opens a session on a None channel anyway is refused,
    # whatever its credentials (asyncua itself would let it in)
    monkeypatch.setattr(Client, "find_endpoint", staticmethod(lambda endpoints, mode, uri: endpoints[0]))
    client = Client(plant.url, timeout=5)
    client.set_user(USER)
    client.set_password(PASSWORD)
    assert await refused(client) == "BadSecurityPolicyRejected"


async def test_security_none_and_anonymous_when_configured(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="bridge.opcua")
    options = dict(security=("None", "Basic256Sha256_SignAndEncrypt"), certificate_dir=str(tmp_path / "pki"),
                   trusted_clients_dir=str(tmp_path / "pki" / "trusted"), anonymous=True, users=USERS)
    async with running_bridge(LAYOUT, opcua=True, opcua_options=options) as h:
        await set_voltage(h)
        assert (NONE_URI, ua.MessageSecurityMode.None_) in await served_certificates(h.opcua_endpoint)
        assert await reads_voltage(Client(h.opcua_endpoint, timeout=5)) == VOLTAGE  # anonymous, no certificate
        # a user on the None endpoint: the password is encrypted with the bridge's certificate
        client = Client(h.opcua_endpoint, timeout=5)
        client.set_user(USER)
        client.set_password(PASSWORD)
        assert await reads_voltage(client) == VOLTAGE
        client = Client(h.opcua_endpoint, timeout=5)
        client.set_user(USER)
        client.set_password("wrong")
        assert await refused(client) == "BadUserAccessDenied"
    warnings = [r.getMessage() for r in caplog.records if r.name == "bridge.opcua" and r.levelno == logging.WARNING]
    assert any("SecurityPolicy None with anonymous access" in w for w in warnings), warnings
    assert any("OPC UA security: None, Basic256Sha256_SignAndEncrypt" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------- the application certificate
async def test_certificate_created_on_first_start_and_kept_across_restarts(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="bridge.opcua")
    pki = tmp_path / "var" / "pki"  # its parent is missing too
    options = dict(security=("Basic256Sha256_Sign",), certificate_dir=str(pki),
                   trusted_clients_dir=str(tmp_path / "trusted"))
    cert_file, key_file = pki / "server-cert.der", pki / "server-key.pem"
    async with running_bridge(LAYOUT, opcua=True, opcua_options=options) as h:
        assert stat.S_IMODE(pki.stat().st_mode) == 0o700
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert (tmp_path / "trusted").is_dir()
        first = cert_file.read_bytes()
        cert = x509.load_der_x509_certificate(first)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:modbus-bridge:127.0.0.1"]
        assert socket.gethostname() in san.get_values_for_type(x509.DNSName)
        assert cert.public_key().key_size == 2048
        assert cert.not_valid_after_utc - datetime.now(timezone.utc) > timedelta(days=9 * 365)
        served = await served_certificates(h.opcua_endpoint)
        assert served == {(SecurityPolicyBasic256Sha256.URI, SIGN): first}
        key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert any(f"{cert_file} (created now" in r.getMessage() for r in caplog.records)
    caplog.clear()

    async with running_bridge(LAYOUT, opcua=True, opcua_options=options) as h:
        assert cert_file.read_bytes() == first
        served = await served_certificates(h.opcua_endpoint)
        assert sha256(served[(SecurityPolicyBasic256Sha256.URI, SIGN)]) == sha256(first)
    logged = [r.getMessage() for r in caplog.records if r.name == "bridge.opcua"]
    assert not any("created now" in m for m in logged)
    assert any(f"{cert_file} (kept" in m for m in logged), logged


async def test_a_certificate_is_never_silently_replaced(tmp_path: Path):
    """Clients trust that very certificate: a missing or foreign key stops the start, saying what to do."""
    first = load_or_create_certificate(tmp_path, "urn:modbus-bridge:test", ["host"])
    assert first.created and load_or_create_certificate(tmp_path, "urn:modbus-bridge:test", ["host"]).created is False
    cert_file, key_file = tmp_path / "server-cert.der", tmp_path / "server-key.pem"
    der = cert_file.read_bytes()
    key_file.rename(tmp_path / "saved-key.pem")
    with pytest.raises(BridgeError, match="restore the key, or delete the certificate"):
        load_or_create_certificate(tmp_path, "urn:modbus-bridge:test", ["host"])
    other = tmp_path / "other"
    load_or_create_certificate(other, "urn:modbus-bridge:test", ["host"])
    shutil.copy(other / "server-key.pem", key_file)
    with pytest.raises(BridgeError, match="does not belong to the key"):
        load_or_create_certificate(tmp_path, "urn:modbus-bridge:test", ["host"])
    assert cert_file.read_bytes() == der
