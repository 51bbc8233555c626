"""Download links served by datasetd's own HTTP port: exports and stored media.

A link is `<base>/v2/downloads/apps/{app_id}/{kind}/{id}?expires=<unix s>&signature=<hex>`
with an HMAC-SHA256 of the path and the expiry under a per-installation secret, so a
client on another host downloads with the link alone (or with `Authorization: Key …`),
even when the object store is private or bound to loopback. `base` is
DATASETD_PUBLIC_URL, else the address the HTTP port listens on (known after it starts)."""

from __future__ import annotations

import contextlib
import contextvars
import enum
import hashlib
import hmac
import re
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta

from service.domain.models import ExportView

DOWNLOADS_PREFIX = "/v2/downloads/apps"
EXPORTS = "exports"
INPUTS = "inputs"
# Stored originals by their `hosted` suffix: `.../blobs` is the `hosted.prefix` export
# archives carry, and Clarifai clients fetch prefix + "/orig/" + suffix with their key.
BLOBS = "blobs"
HOSTED_SIZE = "orig"


LINKS_WANTED: contextvars.ContextVar[bool] = contextvars.ContextVar("links_wanted", default=False)
_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*")


def _segment(value: str) -> str:
    """`value` as one path segment; ids are nearly always plain, and quote is slow."""
    if _PLAIN.fullmatch(value):
        return value
    return urllib.parse.quote(value, safe="")


class LinkProblem(enum.Enum):
    # Authentic but past its expiry: the client should ask the API for a fresh URL.
    EXPIRED = "expired"
    # Not signed by this installation for this path and expiry (edited or made up).
    TAMPERED = "tampered"


@dataclass
class DownloadLinks:
    secret: bytes
    ttl: timedelta
    # "http://host:port" without a trailing slash; set once the HTTP port listens.
    base_url: str = ""
    public: bool = field(default=False)

    def path(self, app_id: str, kind: str, resource_id: str) -> str:
        return f"{DOWNLOADS_PREFIX}/{_segment(app_id)}/{kind}/{_segment(resource_id)}"

    def signature(self, path: str, expires: int) -> str:
        return hmac.new(self.secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def link(self, app_id: str, kind: str, resource_id: str) -> str:
        # A link per listed input: built by hand (the query is digits and hex), as
        # urlencode's quoting cost more than the signature.
        path = self.path(app_id, kind, resource_id)
        expires = int(time.time() + self.ttl.total_seconds())
        return f"{self.base_url}{path}?expires={expires}&signature={self.signature(path, expires)}"

    def export_url(self, app_id: str, export_id: str) -> str:
        return self.link(app_id, EXPORTS, export_id)

    def media_url(self, app_id: str, input_id: str) -> str:
        return self.link(app_id, INPUTS, input_id)

    def hosted_prefix(self, app_id: str) -> str | None:
        """The domain's MediaLinks: the `hosted.prefix` of the app's stored originals,
        under the HTTP port's address; None until that address is known."""
        if not self.base_url:
            return None
        return f"{self.base_url}{DOWNLOADS_PREFIX}/{urllib.parse.quote(app_id, safe='')}/{BLOBS}"

    def valid(self, path: str, expires: str, signature: str) -> bool:
        """Whether `signature` signs `path` until `expires`, and that is still ahead."""
        return self.problem(path, expires, signature) is None

    def problem(self, path: str, expires: str, signature: str) -> LinkProblem | None:
        """What is wrong with a link, None when it is valid. The signature is checked
        before the time, so a link whose expiry was edited is TAMPERED, not EXPIRED."""
        try:
            until = int(expires)
        except ValueError:
            return LinkProblem.TAMPERED
        # As bytes: compare_digest refuses str with non-ASCII characters (a query may hold any).
        if not hmac.compare_digest(self.signature(path, until).encode(), signature.encode()):
            return LinkProblem.TAMPERED
        if until < time.time():
            return LinkProblem.EXPIRED
        return None

    def export_view(self, view: ExportView) -> ExportView:
        """`view` with its URL a link of this port under DATASETD_PUBLIC_URL when that is
        set (the object store may be private or on loopback); as it is otherwise."""
        export = view.export
        if not self.public or export.blob is None:
            return view
        return replace(view, url=self.export_url(export.app_id, export.id))

    def input_link(self, app_id: str, input_id: str) -> str | None:
        """The domain's MediaLinks: the URL of an input's stored original when clients get
        links of this port (DATASETD_PUBLIC_URL is set, or the call is a Clarifai one);
        None: the domain presigns an object-store URL."""
        if not (self.public or LINKS_WANTED.get()):
            return None
        return self.media_url(app_id, input_id)

    @staticmethod
    @contextlib.contextmanager
    def wanted() -> Iterator[None]:
        """Within: stored originals are named by links of this port (the Clarifai API's
        calls: its clients download with their key, and presigning would be wasted)."""
        token = LINKS_WANTED.set(True)
        try:
            yield
        finally:
            LINKS_WANTED.reset(token)
