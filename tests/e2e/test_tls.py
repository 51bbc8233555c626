"""TLS and mutual TLS on the gRPC and HTTP ports (DATASETD_TLS_CERT, DATASETD_TLS_KEY,
DATASETD_TLS_CLIENT_CA), with certificates this module makes: a CA, a server certificate for
127.0.0.1 and localhost, a client certificate, and a client certificate of another CA."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from datasetd.client import Client as ViClient
from datasetd.v1 import dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc

from service.api.tls import load_server_tls
from service.app import Resources, Running, banner, start
from service.client import Client
from service.config import Config, ConfigError
from service.storage.db import Database
from tests.conftest import Caller, Stack, new_caller, object_store, stack_env
from tests.processes import ROOT, clean_env

# --- certificates ---------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert_path.read_bytes()

    @property
    def key_pem(self) -> bytes:
        return self.key_path.read_bytes()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    folder: Path,
    stem: str,
    common_name: str,
    issuer: Issued | None = None,
    *,
    server: bool = False,
) -> Issued:
    """A CA (no issuer) or a leaf certificate signed by `issuer`, written as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name) if issuer is None else issuer.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
    cert = builder.sign(key if issuer is None else issuer.key, hashes.SHA256())
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Issued(cert, key, cert_path, key_path)


@dataclass(frozen=True)
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    # A client certificate the servers' client CA did not sign.
    stranger: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _issue(folder, "ca", "datasetd test CA")
    other_ca = _issue(folder, "other-ca", "another CA")
    return Pki(
        ca=ca,
        server=_issue(folder, "server", "datasetd test server", ca, server=True),
        client=_issue(folder, "client", "datasetd test client", ca),
        stranger=_issue(folder, "stranger", "someone else", other_ca),
    )


# --- servers ----------------------------------------------------------------------------


def _config(stack: Stack, pki: Pki, *, mutual: bool) -> Config:
    return Config(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        data_dir=stack.data_dir,
        database_url=stack.dsn,
        s3_endpoint=stack.s3.endpoint,
        s3_access_key=stack.s3.access_key,
        s3_secret_key=stack.s3.secret_key,
        s3_bucket=stack.s3.bucket,
        auth_cache_seconds=0.0,
        builtin_embedders=False,
        tls_cert=str(pki.server.cert_path),
        tls_key=str(pki.server.key_path),
        tls_client_ca=str(pki.ca.cert_path) if mutual else "",
    )


async def _start(config: Config, stack: Stack) -> Running:
    resources = Resources(await Database.connect(stack.dsn, min_size=1), object_store(stack))
    return await start(config, resources)


@pytest.fixture(scope="module")
async def tls_server(stack: Stack, pki: Pki) -> AsyncIterator[Running]:
    running = await _start(_config(stack, pki, mutual=False), stack)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="module")
async def mtls_server(stack: Stack, pki: Pki) -> AsyncIterator[Running]:
    running = await _start(_config(stack, pki, mutual=True), stack)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def tls_caller(tls_server: Running) -> Caller:
    return await new_caller(tls_server.resources.db)


def _credentials(pki: Pki, client: Issued | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem,
        private_key=client.key_pem if client is not None else None,
        certificate_chain=client.cert_pem if client is not None else None,
    )


def _stub(channel: grpc.aio.Channel) -> dataset_service_pb2_grpc.DatasetServiceAsyncStub:
    return dataset_service_pb2_grpc.DatasetServiceStub(channel)


async def _list(channel: grpc.aio.Channel, caller: Caller) -> list[str]:
    stub = _stub(channel)
    response = await stub.ListDatasets(
        dataset_service_pb2.ListDatasetsRequest(app_id=caller.app_id),
        metadata=caller.metadata,
        timeout=10,
    )
    return [dataset.id for dataset in response.datasets]


async def _create(channel: grpc.aio.Channel, caller: Caller, dataset_id: str) -> None:
    stub = _stub(channel)
    await stub.CreateDataset(
        dataset_service_pb2.CreateDatasetRequest(
            app_id=caller.app_id, dataset=dataset_pb2.Dataset(id=dataset_id)
        ),
        metadata=caller.metadata,
        timeout=10,
    )


async def _refused(channel: grpc.aio.Channel, caller: Caller) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _list(channel, caller)
    code: grpc.StatusCode = raised.value.code()
    return code


# --- gRPC -------------------------------------------------------------------------------


async def test_tls_call_works_and_plaintext_or_an_untrusted_server_fails(
    tls_server: Running, tls_caller: Caller, pki: Pki
) -> None:
    address = f"127.0.0.1:{tls_server.port}"
    async with grpc.aio.secure_channel(address, _credentials(pki)) as channel:
        await _create(channel, tls_caller, "over-tls")
        assert await _list(channel, tls_caller) == ["over-tls"]
    # Through the name in the certificate too.
    async with grpc.aio.secure_channel(
        f"localhost:{tls_server.port}", _credentials(pki)
    ) as channel:
        assert await _list(channel, tls_caller) == ["over-tls"]
    async with grpc.aio.insecure_channel(address) as channel:
        assert await _refused(channel, tls_caller) == grpc.StatusCode.UNAVAILABLE
    # The system's CAs did not sign the test CA: the client refuses the server.
    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials()) as channel:
        assert await _refused(channel, tls_caller) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate_of_the_client_ca(
    mtls_server: Running, pki: Pki
) -> None:
    caller = await new_caller(mtls_server.resources.db)
    address = f"127.0.0.1:{mtls_server.port}"
    async with grpc.aio.secure_channel(address, _credentials(pki, pki.client)) as channel:
        await _create(channel, caller, "mutual")
        assert await _list(channel, caller) == ["mutual"]
    for credentials in (_credentials(pki), _credentials(pki, pki.stranger)):
        async with grpc.aio.secure_channel(address, credentials) as channel:
            assert await _refused(channel, caller) == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(address) as channel:
        assert await _refused(channel, caller) == grpc.StatusCode.UNAVAILABLE


async def test_banner_shows_tls_commands(tls_server: Running, mtls_server: Running) -> None:
    shown = banner(tls_server.config, tls_server)
    assert "-plaintext" not in shown
    assert f"-cacert {tls_server.config.tls_cert} " in shown
    assert f"https://127.0.0.1:{tls_server.http_port}/metrics" in shown
    assert "client certificates required" not in shown
    mutual = banner(mtls_server.config, mtls_server)
    assert "client certificates required" in mutual and " -cert " in mutual


# --- HTTP -------------------------------------------------------------------------------


def _client_context(pki: Pki, client: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    if client is not None:
        context.load_cert_chain(client.cert_path, client.key_path)
    return context


async def _http_status(url: str, context: ssl.SSLContext | bool) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=context, timeout=aiohttp.ClientTimeout(total=10)) as response,
    ):
        await response.read()
        return response.status


async def test_http_port_serves_tls_and_refuses_plaintext(tls_server: Running, pki: Pki) -> None:
    port = tls_server.http_port
    assert await _http_status(f"https://127.0.0.1:{port}/healthz", _client_context(pki)) == 200
    assert await _http_status(f"https://localhost:{port}/metrics", _client_context(pki)) == 200
    with pytest.raises(aiohttp.ClientError):
        await _http_status(f"http://127.0.0.1:{port}/healthz", False)
    # Not signed by a CA the client trusts.
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await _http_status(f"https://127.0.0.1:{port}/healthz", ssl.create_default_context())


async def test_http_port_with_mutual_tls_needs_a_client_certificate(
    mtls_server: Running, pki: Pki
) -> None:
    url = f"https://127.0.0.1:{mtls_server.http_port}/healthz"
    assert await _http_status(url, _client_context(pki, pki.client)) == 200
    for context in (_client_context(pki), _client_context(pki, pki.stranger)):
        with pytest.raises(aiohttp.ClientError):
            await _http_status(url, context)


# --- the client library and the CLI -------------------------------------------------------


async def test_client_library_over_tls_and_mutual_tls(
    tls_server: Running, mtls_server: Running, pki: Pki
) -> None:
    caller = await new_caller(tls_server.resources.db)

    def listed(port: int, ca_file: str, client_cert: str = "", client_key: str = "") -> list[str]:
        with Client(
            f"127.0.0.1:{port}",
            caller.key,
            caller.app_id,
            ca_file=ca_file,
            client_cert=client_cert or None,
            client_key=client_key or None,
        ) as client:
            client.datasets.create("lib")
            return [info.id for page in client.datasets.list() for info in page.items]

    ca = str(pki.ca.cert_path)
    assert await asyncio.to_thread(listed, tls_server.port, ca_file=ca) == ["lib"]
    client_files = {
        "client_cert": str(pki.client.cert_path),
        "client_key": str(pki.client.key_path),
    }
    # Another app on the mutual TLS server: the same database, its own datasets.
    caller = await new_caller(mtls_server.resources.db)
    assert await asyncio.to_thread(listed, mtls_server.port, ca_file=ca, **client_files) == ["lib"]
    with pytest.raises(ValueError, match="client-key"):
        Client("127.0.0.1:1", caller.key, caller.app_id, client_cert=client_files["client_cert"])

    def vi_listed() -> list[str]:
        # The Vi-shaped client takes the same files.
        with ViClient(
            caller.key,
            caller.app_id,
            f"127.0.0.1:{mtls_server.port}",
            ca_file=ca,
            client_cert=client_files["client_cert"],
            client_key=client_files["client_key"],
        ) as client:
            return [d.dataset_id for d in client.datasets.list().all_items()]

    assert await asyncio.to_thread(vi_listed) == ["lib"]


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str


async def _run(env: dict[str, str], *args: str) -> Ran:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


async def test_cli_over_tls_and_mutual_tls(
    tls_server: Running, mtls_server: Running, pki: Pki
) -> None:
    caller = await new_caller(tls_server.resources.db)
    env = clean_env(DATASETD_APP=caller.app_id, DATASETD_API_KEY=caller.key, COLUMNS="200")
    ca = str(pki.ca.cert_path)
    tls_address = f"127.0.0.1:{tls_server.port}"
    created = await _run(env, "--address", tls_address, "--ca-file", ca, "datasets", "create", "c")
    assert created.code == 0, created.stderr
    listed = await _run(
        env, "--address", tls_address, "--ca-file", ca, "--json", "datasets", "list"
    )
    assert listed.code == 0 and '"c"' in listed.stdout, listed.stderr
    plaintext = await _run(env, "--address", tls_address, "datasets", "list")
    assert plaintext.code == 1 and "Traceback" not in plaintext.stderr
    mutual = {**env, "DATASETD_ADDRESS": f"127.0.0.1:{mtls_server.port}", "DATASETD_CA_FILE": ca}
    with_cert = await _run(
        mutual,
        "--client-cert",
        str(pki.client.cert_path),
        "--client-key",
        str(pki.client.key_path),
        "--json",
        "datasets",
        "list",
    )
    assert with_cert.code == 0 and '"c"' in with_cert.stdout, with_cert.stderr
    # The same through the environment.
    by_env = {
        **mutual,
        "DATASETD_CLIENT_CERT": str(pki.client.cert_path),
        "DATASETD_CLIENT_KEY": str(pki.client.key_path),
    }
    assert (await _run(by_env, "--json", "datasets", "list")).code == 0
    without = await _run(mutual, "datasets", "list")
    assert without.code == 1 and "Traceback" not in without.stderr
    half = await _run(mutual, "--client-cert", str(pki.client.cert_path), "datasets", "list")
    assert half.code == 2 and "--client-key" in half.stderr


# --- bad configuration -------------------------------------------------------------------


def _broken(config: Config, tmp_path: Path, pki: Pki) -> list[tuple[Config, str]]:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    missing = str(tmp_path / "missing.pem")
    replace = dataclasses.replace
    return [
        (replace(config, tls_key=""), "DATASETD_TLS_KEY"),
        (replace(config, tls_cert=""), "DATASETD_TLS_CERT"),
        (replace(config, tls_cert="", tls_key=""), "DATASETD_TLS_CLIENT_CA"),
        (replace(config, tls_cert=missing), "DATASETD_TLS_CERT"),
        (replace(config, tls_key=missing), "DATASETD_TLS_KEY"),
        (replace(config, tls_client_ca=missing), "DATASETD_TLS_CLIENT_CA"),
        (replace(config, tls_cert=str(text)), "DATASETD_TLS_CERT"),
        (replace(config, tls_cert=str(garbage)), "DATASETD_TLS_CERT"),
        (replace(config, tls_key=str(pki.server.cert_path)), "DATASETD_TLS_KEY"),
        # A key, but of another certificate.
        (replace(config, tls_key=str(pki.client.key_path)), "DATASETD_TLS_KEY"),
        (replace(config, tls_client_ca=str(garbage)), "DATASETD_TLS_CLIENT_CA"),
    ]


async def test_bad_tls_settings_stop_the_start_naming_the_variable(
    stack: Stack, pki: Pki, tmp_path: Path
) -> None:
    good = _config(stack, pki, mutual=True)
    assert load_server_tls(good) is not None
    for config, variable in _broken(good, tmp_path, pki):
        with pytest.raises(ConfigError, match=variable):
            load_server_tls(config)
        # start() checks them before it opens anything.
        with pytest.raises(ConfigError, match=variable):
            await start(config)


async def test_serve_with_a_bad_tls_setting_exits_with_a_message(
    stack: Stack, pki: Pki, tmp_path: Path
) -> None:
    base = {
        **stack_env(stack),
        "DATASETD_LISTEN": "127.0.0.1:0",
        "DATASETD_HTTP_LISTEN": "off",
        "DATASETD_DATA_DIR": str(tmp_path),
        "DATASETD_BUILTIN_EMBEDDERS": "off",
    }
    cases = [
        ({"DATASETD_TLS_CERT": str(pki.server.cert_path)}, "DATASETD_TLS_KEY"),
        (
            {
                "DATASETD_TLS_CERT": str(tmp_path / "missing.pem"),
                "DATASETD_TLS_KEY": str(pki.server.key_path),
            },
            "DATASETD_TLS_CERT",
        ),
    ]
    for settings, variable in cases:
        ran = await _run({**base, **settings}, "serve")
        assert ran.code != 0
        assert "configuration error" in ran.stderr and variable in ran.stderr, ran.stderr
        assert "Traceback" not in ran.stderr
