"""Download links served by datasetd's own HTTP port: exports and stored media.

A link is `<base>/v2/downloads/apps/{app_id}/{kind}/{id}?expires=<unix s>&signature=<hex>`
with an HMAC-SHA256 of the path and the expiry under a per-installation secret, so a
client on another host downloads with the link alone (or with `Authorization: Key …`),
even when the object store is private or bound to loopback. `base` is
DATASETD_PUBLIC_URL, else the address the HTTP port listens on (known after it starts)."""

from __future__ import annotations

import hashlib
import hmac
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import timedelta

DOWNLOADS_PREFIX = "/v2/downloads/apps"
EXPORTS = "exports"
INPUTS = "inputs"


@dataclass
class DownloadLinks:
    secret: bytes
    ttl: timedelta
    # "http://host:port" without a trailing slash; set once the HTTP port listens.
    base_url: str = ""
    public: bool = field(default=False)

    def path(self, app_id: str, kind: str, resource_id: str) -> str:
        quote = urllib.parse.quote
        return f"{DOWNLOADS_PREFIX}/{quote(app_id, safe='')}/{kind}/{quote(resource_id, safe='')}"

    def signature(self, path: str, expires: int) -> str:
        return hmac.new(self.secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def link(self, app_id: str, kind: str, resource_id: str) -> str:
        path = self.path(app_id, kind, resource_id)
        expires = int(time.time() + self.ttl.total_seconds())
        query = urllib.parse.urlencode(
            {"expires": expires, "signature": self.signature(path, expires)}
        )
        return f"{self.base_url}{path}?{query}"

    def export_url(self, app_id: str, export_id: str) -> str:
        return self.link(app_id, EXPORTS, export_id)

    def media_url(self, app_id: str, input_id: str) -> str:
        return self.link(app_id, INPUTS, input_id)

    def valid(self, path: str, expires: str, signature: str) -> bool:
        """Whether `signature` signs `path` until `expires`, and that is still ahead."""
        try:
            until = int(expires)
        except ValueError:
            return False
        if until < time.time():
            return False
        return hmac.compare_digest(self.signature(path, until), signature)
