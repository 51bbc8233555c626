"""The built-in models: classical descriptors in numpy and Pillow, no weights to download.

`datasetd-image-v1` concatenates three blocks computed on a 64x64 rendering of the image
(first frame, EXIF orientation applied, transparency over white):

- a 16x16 gray thumbnail, mean-removed (layout and shape);
- a gradient-orientation histogram, 4x4 cells x 8 unsigned orientations, magnitude
  weighted with linear interpolation between bins (edges and strokes; HOG-like);
- a joint HSV colour histogram, 8 hues x 4 saturations x 4 values (colour).

Each block is L2-normalized and weighted, the whole is power-normalized (signed square
root, as Hellinger kernels do) and L2-normalized: cosine similarity is its metric.

`datasetd-text-v1` hashes lower-cased word unigrams, word bigrams and character 3-grams
of words into 512 signed buckets (blake2b: stable across processes, unlike `hash`), with
sublinear term frequency (1 + ln tf), and L2-normalizes.

Change either algorithm and its fingerprint must change: the service then embeds every
input again.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from service.domain.embeddings import EmbeddingSource, ModelSpec
from service.domain.models import MediaType
from service.media.images import MAX_IMAGE_PIXELS

IMAGE_MODEL_ID: Final = "datasetd-image-v1"
TEXT_MODEL_ID: Final = "datasetd-text-v1"
DIMENSION: Final = 512

_SIDE: Final = 64
_THUMB: Final = 16
_CELLS: Final = 4
_ORIENTATIONS: Final = 8
_HUES, _SATURATIONS, _VALUES = 8, 4, 4
# Relative weights of the blocks, tuned for precision@10 on scikit-learn's digits while
# keeping colour for photos (bench/bench_embedder.py measures it).
_WEIGHTS: Final = (0.7, 1.0, 0.5)
# Gradients below this (in 0..1 gray units) are sensor noise, not edges.
_MIN_GRADIENT: Final = 1e-3
# Clipping of the orientation histogram before its renormalization (as SIFT does): one
# strong edge does not drown the rest.
_HOG_CLIP: Final = 0.3

_WORD = re.compile(r"\w+", re.UNICODE)
# Character n-grams carry morphology (cat / cats) but are many: they weigh less.
_CHAR_WEIGHT: Final = 0.5
_BIGRAM_WEIGHT: Final = 0.7

IMAGE_SPEC: Final = ModelSpec(
    id=IMAGE_MODEL_ID,
    dimension=DIMENSION,
    media_types=frozenset({MediaType.IMAGE}),
    accepts_text_queries=False,
    source=EmbeddingSource.BUILTIN,
    description=(
        "built-in classical image descriptor (gray thumbnail, gradient orientations, HSV "
        "colour), 512-d, cosine; no learned weights"
    ),
    fingerprint="builtin-image-1",
)
TEXT_SPEC: Final = ModelSpec(
    id=TEXT_MODEL_ID,
    dimension=DIMENSION,
    media_types=frozenset({MediaType.TEXT}),
    accepts_text_queries=True,
    source=EmbeddingSource.BUILTIN,
    description=(
        "built-in hashed bag of words, word bigrams and character trigrams, 512-d, cosine; "
        "lexical, no learned weights"
    ),
    fingerprint="builtin-text-1",
)

Vector = npt.NDArray[np.float32]


class BuiltinImageEmbedder:
    """`datasetd-image-v1`: deterministic, pure numpy + Pillow."""

    spec: ModelSpec = IMAGE_SPEC

    def embed_images(self, images: Sequence[bytes]) -> list[list[float] | str]:
        results: list[list[float] | str] = []
        for data in images:
            decoded = decode_image(data, _SIDE)
            if isinstance(decoded, str):
                results.append(decoded)
            else:
                results.append(image_descriptor(decoded).tolist())
        return results

    def embed_texts(self, texts: Sequence[str]) -> list[list[float] | str]:
        return ["datasetd-image-v1 embeds images only" for _ in texts]


class BuiltinTextEmbedder:
    """`datasetd-text-v1`: deterministic feature hashing."""

    spec: ModelSpec = TEXT_SPEC

    def embed_images(self, images: Sequence[bytes]) -> list[list[float] | str]:
        return ["datasetd-text-v1 embeds texts only" for _ in images]

    def embed_texts(self, texts: Sequence[str]) -> list[list[float] | str]:
        results: list[list[float] | str] = []
        for text in texts:
            vector = text_descriptor(text)
            results.append(vector.tolist() if vector is not None else "the text has no words")
        return results


def decode_image(data: bytes, side: int, *, keep_aspect: bool = False) -> Image.Image | str:
    """The image's first frame in RGB, or why it cannot be decoded: side x side, or with
    `keep_aspect` its shorter side brought down to `side` (never up). Images over the
    service's pixel limit are refused from their header, before any pixel is decoded (a
    decompression bomb costs nothing)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width <= 0 or height <= 0 or width * height > MAX_IMAGE_PIXELS:
                    return (
                        f"image is {width}x{height}; at most {MAX_IMAGE_PIXELS:,} pixels "
                        "are embedded"
                    )
                # JPEG decodes at 1/2..1/8 scale for free, staying at or above the
                # size asked for (twice the side when squashing: less aliasing).
                wanted = side if keep_aspect else side * 2
                image.draft("RGB", (wanted, wanted))
                frame = ImageOps.exif_transpose(image) or image
                rgb = _to_rgb(frame)
                if not keep_aspect:
                    return rgb.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
                scale = side / min(rgb.width, rgb.height)
                if scale >= 1:
                    return rgb
                size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
                return rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    except UnidentifiedImageError:
        return "not a readable image"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"image has more than {MAX_IMAGE_PIXELS:,} pixels"
    except Exception as exc:
        # Pillow's decoders report damage through many exception types (OSError,
        # SyntaxError, struct.error, ValueError, ...): for untrusted bytes all mean the same.
        return f"the image cannot be decoded ({type(exc).__name__}: {exc})"[:500]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Transparent pixels over white, as a viewer shows them; 16-bit and float gray
    stretched to 8 bits (Pillow's own conversion clips them, mostly to white)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        stretched = (values - low) * (255.0 / (high - low)) if high > low else values * 0.0
        return Image.fromarray(stretched.astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_descriptor(rgb: Image.Image) -> Vector:
    """The 512-d unit vector of a side x side RGB image (see the module docstring)."""
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    gray = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    blocks = (
        _thumbnail(gray),
        _orientations(gray),
        _colours(np.asarray(rgb.convert("HSV"), dtype=np.uint8)),
    )
    whole = np.concatenate([weight * block for weight, block in zip(_WEIGHTS, blocks, strict=True)])
    whole = np.sign(whole) * np.sqrt(np.abs(whole))
    return _unit(whole)


def _thumbnail(gray: npt.NDArray[np.float32]) -> Vector:
    side = gray.shape[0]
    step = side // _THUMB
    thumb = gray.reshape(_THUMB, step, _THUMB, step).mean(axis=(1, 3)).ravel()
    return _unit(thumb - thumb.mean())


def _orientations(gray: npt.NDArray[np.float32]) -> Vector:
    gx = np.zeros_like(gray)
    gy = np.zeros_like(gray)
    gx[:, 1:-1] = gray[:, 2:] - gray[:, :-2]
    gy[1:-1, :] = gray[2:, :] - gray[:-2, :]
    magnitude = np.hypot(gx, gy)
    magnitude[magnitude < _MIN_GRADIENT] = 0.0
    # Unsigned orientation: a dark stroke on light and a light one on dark look alike.
    angle = np.mod(np.arctan2(gy, gx), np.pi) * (_ORIENTATIONS / np.pi)
    low = np.floor(angle).astype(np.int64)
    upper = angle - low
    low %= _ORIENTATIONS
    high = (low + 1) % _ORIENTATIONS
    side = gray.shape[0]
    rows = (np.arange(side) * _CELLS // side)[:, None]
    cols = (np.arange(side) * _CELLS // side)[None, :]
    cell = (rows * _CELLS + cols) * _ORIENTATIONS
    size = _CELLS * _CELLS * _ORIENTATIONS
    counts = np.bincount(
        (cell + low).ravel(), weights=(magnitude * (1.0 - upper)).ravel(), minlength=size
    ) + np.bincount((cell + high).ravel(), weights=(magnitude * upper).ravel(), minlength=size)
    return _unit(np.minimum(_unit(counts), _HOG_CLIP))


def _colours(hsv: npt.NDArray[np.uint8]) -> Vector:
    hue = hsv[..., 0].astype(np.int64) * _HUES // 256
    saturation = hsv[..., 1].astype(np.int64) * _SATURATIONS // 256
    value = hsv[..., 2].astype(np.int64) * _VALUES // 256
    index = (hue * _SATURATIONS + saturation) * _VALUES + value
    counts = np.bincount(index.ravel(), minlength=_HUES * _SATURATIONS * _VALUES)
    return _unit(counts.astype(np.float32))


def _unit(vector: npt.ArrayLike) -> Vector:
    values = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(values))
    if norm < 1e-12:
        return np.zeros_like(values)
    return values / np.float32(norm)


def text_descriptor(text: str) -> Vector | None:
    """The 512-d unit vector of a text; None when it has no word characters."""
    words = _WORD.findall(text.lower())
    if not words:
        return None
    features: Counter[tuple[str, float]] = Counter()
    for word in words:
        features["w:" + word, 1.0] += 1
        padded = f" {word} "
        for start in range(len(padded) - 2):
            features["c:" + padded[start : start + 3], _CHAR_WEIGHT] += 1
    for first, second in itertools.pairwise(words):
        features[f"b:{first} {second}", _BIGRAM_WEIGHT] += 1
    vector = np.zeros(DIMENSION, dtype=np.float32)
    for (feature, weight), count in features.items():
        bucket, sign = _bucket(feature)
        vector[bucket] += sign * weight * (1.0 + math.log(count))
    unit = _unit(vector)
    # Collisions could cancel every feature out; a vector must be a unit vector.
    return unit if float(np.linalg.norm(unit)) > 0.5 else None


@functools.lru_cache(maxsize=65536)
def _bucket(feature: str) -> tuple[int, float]:
    digest = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest())
    return digest % DIMENSION, 1.0 if (digest >> 63) & 1 else -1.0
