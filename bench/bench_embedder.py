"""The built-in embedding models: throughput on this machine and retrieval quality.

No server: the embedders are pure CPU (numpy + Pillow), measured as the embedding job
runs them (batches in worker threads). Figures:

- images/s of `datasetd-image-v1` on scikit-learn's digits (8x8 upscaled to 64x64 PNG,
  encoded like uploads) and on 640x480 photo-like JPEGs, with 1 and 2 threads;
- texts/s of `datasetd-text-v1` on captions (~12 words) and paragraphs (~150 words);
- precision@10 on the 1,797 digits (the share of each image's 10 nearest neighbours, by
  cosine, of the same digit), beside a random baseline (random unit vectors: ~0.10, the
  share of a class) and a raw-pixel baseline (the 64 original values, mean-removed).

    .venv/bin/python -m bench.bench_embedder            # ~1 minute
    .venv/bin/python -m bench.bench_embedder --quick    # ~15 s
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image
from sklearn.datasets import load_digits  # type: ignore[import-untyped]

from bench.common import environment, load_average
from service.embedders.builtin import BuiltinImageEmbedder, BuiltinTextEmbedder

BATCH: Final = 64
NEIGHBOURS: Final = 10
WORDS: Final = (
    "cat",
    "dog",
    "car",
    "tree",
    "house",
    "road",
    "river",
    "mountain",
    "city",
    "street",
    "person",
    "bicycle",
    "boat",
    "sky",
    "cloud",
    "red",
    "green",
    "blue",
    "small",
    "large",
    "old",
    "new",
    "bright",
    "dark",
    "sitting",
    "running",
    "parked",
    "near",
    "under",
    "over",
    "beside",
    "a",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "photo",
    "picture",
    "image",
    "view",
    "scene",
    "morning",
    "evening",
    "winter",
)


def digit_pngs() -> tuple[list[bytes], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The digits as 64x64 grayscale PNGs (dark ink on white, as a scan), their labels
    and their raw 8x8 values."""
    digits = load_digits()
    encoded = []
    for values in digits.images:
        ink = (255 - values * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(ink, "L").resize((64, 64), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    return encoded, digits.target.astype(np.int64), digits.data.astype(np.float64)


def photo_jpegs(count: int) -> list[bytes]:
    rng = np.random.default_rng(1)
    photos = []
    for _ in range(count):
        base = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(base, "RGB").resize((640, 480), Image.Resampling.BICUBIC)
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (480, 640, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB").save(
            buffer, "JPEG", quality=85
        )
        photos.append(buffer.getvalue())
    return photos


def texts(count: int, words: int) -> list[str]:
    rng = np.random.default_rng(2)
    return [" ".join(rng.choice(WORDS, words)) for _ in range(count)]


def throughput(
    embed: Callable[[Sequence[Any]], list[list[float] | str]],
    items: Sequence[Any],
    threads: int,
) -> float:
    """Items per second, in batches of BATCH spread over `threads` worker threads."""
    batches = [items[i : i + BATCH] for i in range(0, len(items), BATCH)]
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for results in pool.map(embed, batches):
            assert not any(isinstance(r, str) for r in results), results
    return len(items) / (time.perf_counter() - started)


def precision_at_10(vectors: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]) -> float:
    similarities = vectors @ vectors.T
    np.fill_diagonal(similarities, -np.inf)
    nearest = np.argpartition(-similarities, NEIGHBOURS, axis=1)[:, :NEIGHBOURS]
    return float((labels[nearest] == labels[:, None]).mean())


def unit_rows(matrix: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    result: npt.NDArray[np.float64] = matrix / np.maximum(norms, 1e-12)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer photos and texts")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    load_before = load_average()
    image_model, text_model = BuiltinImageEmbedder(), BuiltinTextEmbedder()

    digits, labels, raw = digit_pngs()
    photos = photo_jpegs(64 if args.quick else 256)
    captions = texts(1000 if args.quick else 5000, 12)
    paragraphs = texts(200 if args.quick else 1000, 150)

    rows: list[tuple[str, float, float]] = []
    for name, embed, items in (
        ("image, digits 64x64 PNG", image_model.embed_images, digits),
        ("image, photos 640x480 JPEG", image_model.embed_images, photos),
        ("text, captions (12 words)", text_model.embed_texts, captions),
        ("text, paragraphs (150 words)", text_model.embed_texts, paragraphs),
    ):
        throughput(embed, items[:BATCH], 1)  # warm-up: imports, caches
        rows.append((name, throughput(embed, items, 1), throughput(embed, items, 2)))

    embedded = image_model.embed_images(digits)
    builtin = np.asarray(embedded, dtype=np.float64)
    rng = np.random.default_rng(3)
    quality = {
        "datasetd-image-v1": precision_at_10(builtin, labels),
        "raw 8x8 pixels (mean-removed)": precision_at_10(
            unit_rows(raw - raw.mean(axis=1, keepdims=True)), labels
        ),
        "random unit vectors": precision_at_10(
            unit_rows(rng.normal(size=(len(labels), builtin.shape[1]))), labels
        ),
    }

    cores = os.cpu_count()
    print(f"\nbuilt-in embedders on {cores} cores (batches of {BATCH})")
    print(f"{'workload':<32}{'1 thread':>12}{'2 threads':>12}")
    for name, one, two in rows:
        print(f"{name:<32}{one:>10.0f}/s{two:>10.0f}/s")
    print(f"\nprecision@{NEIGHBOURS} on sklearn digits ({len(labels)} images, 10 classes)")
    for name, value in quality.items():
        print(f"{name:<34}{value:>8.3f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "throughput": [
                        {"workload": n, "one_thread": a, "two_threads": b} for n, a, b in rows
                    ],
                    "precision_at_10": quality,
                    "environment": environment(load_before),
                },
                out,
                indent=2,
            )


if __name__ == "__main__":
    main()
