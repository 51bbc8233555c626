"""URL inputs with server-side fetching on: stored like uploads, private targets refused."""

from __future__ import annotations

import http.server
import ipaddress
import secrets
import threading
from collections.abc import Iterator

import pytest

from service.adapters.url_fetch import UrlFetcher
from service.domain.input_drafts import InputDraft, InputSettings, Outcome
from service.domain.inputs import InputService
from service.domain.models import MediaType, Principal
from service.domain.ontology_check import OntologyGate
from service.media.probe import MediaProbes
from service.storage.annotations import PgAnnotationRepository
from service.storage.blobs import ContentAddressedBlobStore
from service.storage.db import Database
from service.storage.inputs import PgInputRepository, PgMembershipRepository
from service.storage.ontologies import PgOntologyRepository
from service.storage.projects import PgProjectRepository
from tests.conftest import Stack, object_store
from tests.helpers import png_bytes

IMAGE = png_bytes(9, 7)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        self.wfile.write(IMAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    server.shutdown()


def service(db: Database, stack: Stack, fetcher: UrlFetcher) -> InputService:
    return InputService(
        PgInputRepository(db),
        PgMembershipRepository(db),
        ContentAddressedBlobStore(db, object_store(stack)),
        db,
        InputSettings(),
        MediaProbes(),
        PgAnnotationRepository(db),
        OntologyGate(PgProjectRepository(db), PgOntologyRepository(db)),
        fetcher=fetcher,
    )


async def test_fetched_url_is_stored_and_private_targets_refused(
    db: Database, stack: Stack, image_server: str
) -> None:
    app = "fetch-" + secrets.token_hex(4)
    principal = Principal("k", app, frozenset({"read", "write"}))
    lenient = service(
        db,
        stack,
        UrlFetcher(
            max_bytes=1 << 20,
            timeout_seconds=5,
            allowed_networks=[ipaddress.ip_network("127.0.0.1/32")],
        ),
    )
    (fetched,) = await lenient.create_batch(
        principal,
        app,
        [InputDraft(id="remote", media=(MediaType.IMAGE,), url=image_server)],
        atomic=False,
    )
    assert fetched.outcome is Outcome.CREATED
    assert fetched.view is not None and fetched.view.input.blob is not None
    assert fetched.view.input.media_info["width"] == 9
    assert fetched.view.input.source_url == image_server

    strict = service(db, stack, UrlFetcher(max_bytes=1 << 20, timeout_seconds=5))
    outcomes = await strict.create_batch(
        principal,
        app,
        [
            InputDraft(id="loop", media=(MediaType.IMAGE,), url=image_server),
            InputDraft(id="meta", media=(MediaType.IMAGE,), url="http://169.254.169.254/x.png"),
            InputDraft(id="lan", media=(MediaType.IMAGE,), url="http://10.1.2.3/x.png"),
        ],
        atomic=False,
    )
    assert [o.outcome for o in outcomes] == [Outcome.INVALID] * 3
    assert {v.field for o in outcomes for v in o.violations} == {
        "inputs[0].data.image.url",
        "inputs[1].data.image.url",
        "inputs[2].data.image.url",
    }


async def test_a_declared_size_must_match_the_fetched_image(
    db: Database, stack: Stack, image_server: str
) -> None:
    app = "fetch-" + secrets.token_hex(4)
    principal = Principal("k", app, frozenset({"read", "write"}))
    fetcher = UrlFetcher(
        max_bytes=1 << 20,
        timeout_seconds=5,
        allowed_networks=[ipaddress.ip_network("127.0.0.1/32")],
    )
    outcomes = await service(db, stack, fetcher).create_batch(
        principal,
        app,
        [
            InputDraft(id="right", media=(MediaType.IMAGE,), url=image_server, image_size=(9, 7)),
            InputDraft(id="wrong", media=(MediaType.IMAGE,), url=image_server, image_size=(90, 7)),
        ],
        atomic=False,
    )
    assert [o.outcome for o in outcomes] == [Outcome.CREATED, Outcome.INVALID]
    right = outcomes[0].view
    assert right is not None and right.input.media_info["format"] == "PNG"
    assert [v.field for v in outcomes[1].violations] == ["inputs[1].data.image.image_info"]
    assert "9x7" in outcomes[1].violations[0].description
