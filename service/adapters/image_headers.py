"""The size of a URL image from the first bytes of its file (DATASETD_FETCH_URLS=header): the
domain's ImageHeaders port, on the SSRF-guarded UrlFetcher and the image header probe."""

from __future__ import annotations

from typing import Any

from service.adapters.url_fetch import UrlFetcher
from service.domain.errors import InvalidArgument
from service.media.image_header import probe_image_head

__all__ = ["FIRST_BYTES", "MOST_BYTES", "UrlImageHeaders"]

# Enough for nearly every header; a JPEG's frame header can follow large EXIF or ICC
# segments (a camera's preview image alone can be 100 KiB), hence the one larger retry.
FIRST_BYTES = 64 * 1024
MOST_BYTES = 1024 * 1024


class UrlImageHeaders:
    """Reads the first `first_bytes` of an image's file, and once `most_bytes` when its
    header runs past them; nothing of the image is kept but its media info."""

    def __init__(
        self, fetcher: UrlFetcher, *, first_bytes: int = FIRST_BYTES, most_bytes: int = MOST_BYTES
    ) -> None:
        if not 0 < first_bytes <= most_bytes:
            raise ValueError("need 0 < first_bytes <= most_bytes")
        self._fetcher = fetcher
        self._first = first_bytes
        self._most = most_bytes

    async def image_info(self, url: str, field: str) -> dict[str, Any]:
        size = self._first
        while True:
            head = await self._fetcher.fetch_head(url, field, size)
            probe = probe_image_head(head.data, field, complete=head.complete)
            if probe is not None:
                return {
                    "width": probe.width,
                    "height": probe.height,
                    "format": probe.format,
                    "color_mode": probe.color_mode,
                }
            if size >= self._most:
                raise InvalidArgument.field(
                    field,
                    f"no readable image header in the first {size:,} bytes of {url} (a JPEG "
                    "with that much metadata before its frame header, or a corrupt image); "
                    "give its size in data.image.image_info instead",
                    reason="URL_TOO_LARGE",
                )
            size = self._most
