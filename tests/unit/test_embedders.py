"""The installation's embedders: the built-in descriptors' properties, the ONNX loader
against a model the test builds itself, the settings, and the choice of models."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import struct
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from service.app import start
from service.config import Config, ConfigError
from service.domain import embedding_job
from service.domain.embedding_job import EmbeddingIndexer
from service.domain.embeddings import EmbeddingModel, EmbeddingSource, PendingInput
from service.domain.jobs import Job, JobFailed, JobKind
from service.domain.models import MediaType, StoredBlob
from service.embedders import by_id, default_embedder, installation_embedders
from service.embedders.builtin import (
    DIMENSION,
    IMAGE_MODEL_ID,
    TEXT_MODEL_ID,
    BuiltinImageEmbedder,
    BuiltinTextEmbedder,
)
from service.embedders.onnx import OnnxImageEmbedder, OnnxModelError

# --- images made for the tests ---------------------------------------------------------


def _scene(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A photo-like picture: a smooth two-colour background, a few coloured shapes and
    sensor noise, different for every seed."""
    rng = np.random.default_rng(seed)
    width, height = size
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1))
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(4):
        cx, cy = rng.integers(0, width), rng.integers(0, height)
        radius = rng.integers(height // 10, height // 3)
        colour = rng.integers(0, 256, 3)
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
        else:
            mask = (abs(xx - cx) < radius) & (abs(yy - cy) < radius // 2)
        pixels[mask] = colour
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming this size, then a tiny IDAT and IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _vector(result: list[float] | str) -> npt.NDArray[np.float64]:
    assert not isinstance(result, str), result
    return np.asarray(result, dtype=np.float64)


# --- datasetd-image-v1 ---------------------------------------------------------------


def test_image_vectors_are_deterministic_unit_vectors() -> None:
    data = [_encode(_scene(seed)) for seed in range(3)]
    first = BuiltinImageEmbedder().embed_images(data)
    again = BuiltinImageEmbedder().embed_images(list(reversed(data)))[::-1]
    for one, two in zip(first, again, strict=True):
        vector = _vector(one)
        assert vector.shape == (DIMENSION,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
        assert np.array_equal(vector, _vector(two))


def test_a_resized_recompressed_copy_is_nearer_than_any_other_image() -> None:
    scenes = [_scene(seed) for seed in range(8)]
    embedder = BuiltinImageEmbedder()
    originals = np.stack([_vector(v) for v in embedder.embed_images([_encode(s) for s in scenes])])
    copies = [
        _encode(s.resize((s.width * 3 // 5, s.height * 3 // 5)), "JPEG", quality=55) for s in scenes
    ]
    for index, result in enumerate(embedder.embed_images(copies)):
        similarities = originals @ _vector(result)
        assert int(np.argmax(similarities)) == index, similarities
        others = np.delete(similarities, index)
        assert similarities[index] > 0.9
        assert similarities[index] - others.max() > 0.1


def test_orientation_and_transparency_are_applied_before_describing() -> None:
    scene = _scene(11)
    embedder = BuiltinImageEmbedder()
    upright = _vector(embedder.embed_images([_encode(scene)])[0])
    # Stored rotated, with the EXIF orientation (6: rotate 90 clockwise to view) undoing it.
    rotated = scene.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = _vector(embedder.embed_images([_encode(rotated, "JPEG", quality=95, exif=exif)])[0])
    untagged = _vector(embedder.embed_images([_encode(rotated, "JPEG", quality=95)])[0])
    assert upright @ tagged > 0.95
    assert upright @ tagged > upright @ untagged + 0.05
    # Fully transparent pixels are white whatever colour they hold.
    clear = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    assert np.array_equal(
        _vector(embedder.embed_images([_encode(clear)])[0]),
        _vector(embedder.embed_images([_encode(white)])[0]),
    )


def test_a_16_bit_image_is_described_like_its_8_bit_version() -> None:
    gray = np.asarray(_scene(5).convert("L"), dtype=np.uint16)
    wide = Image.fromarray(gray * 257)  # the full 16-bit range
    assert wide.mode.startswith("I;16")
    embedder = BuiltinImageEmbedder()
    deep = _vector(embedder.embed_images([_encode(wide)])[0])
    eight = _vector(embedder.embed_images([_encode(Image.fromarray(gray.astype(np.uint8)))])[0])
    other = _vector(embedder.embed_images([_encode(_scene(6).convert("L"))])[0])
    # Stretched to the full range: the colour block moves a little, the shape does not.
    assert deep @ eight > 0.95, (deep @ eight, deep @ other)
    assert deep @ eight > deep @ other + 0.1


def test_the_first_frame_of_an_animation_is_described() -> None:
    first, second = _scene(1, (96, 96)), _scene(2, (96, 96))
    buffer = io.BytesIO()
    first.save(buffer, "GIF", save_all=True, append_images=[second], duration=100)
    embedder = BuiltinImageEmbedder()
    animated = _vector(embedder.embed_images([buffer.getvalue()])[0])
    still_first = _vector(embedder.embed_images([_encode(first, "GIF")])[0])
    still_second = _vector(embedder.embed_images([_encode(second, "GIF")])[0])
    assert animated @ still_first > 0.99
    assert animated @ still_first > animated @ still_second + 0.05


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"not an image at all", "not a readable image"),
        (b"", "not a readable image"),
        (_encode(_scene(3))[:200], "cannot be decoded"),
        # Over the service's limit (85M pixels), under Pillow's own warning (89M).
        (_png_header(9300, 9300), "at most 85,000,000 pixels"),
        # Far over: Pillow itself refuses it from the header.
        (_png_header(100_000, 100_000), "85,000,000 pixels"),
    ],
    ids=["garbage", "empty", "truncated", "over-the-limit", "bomb"],
)
def test_undecodable_images_get_an_error_and_the_rest_a_vector(data: bytes, words: str) -> None:
    good = _encode(_scene(4))
    results = BuiltinImageEmbedder().embed_images([good, data, good])
    assert isinstance(results[1], str)
    assert words in results[1]
    assert _vector(results[0]) @ _vector(results[2]) == pytest.approx(1.0)


def test_the_image_model_embeds_no_text() -> None:
    embedder = BuiltinImageEmbedder()
    assert embedder.spec.id == IMAGE_MODEL_ID
    assert embedder.spec.accepts_text_queries is False
    assert embedder.spec.media_types == frozenset({MediaType.IMAGE})
    assert isinstance(embedder.embed_texts(["a cat"])[0], str)


# --- datasetd-text-v1 ----------------------------------------------------------------


def test_a_paraphrase_is_nearer_than_an_unrelated_text() -> None:
    embedder = BuiltinTextEmbedder()
    query, paraphrase, unrelated = (
        _vector(v)
        for v in embedder.embed_texts(
            [
                "A photo of a black cat sleeping on the sofa",
                "black cats sleep on a sofa (photo)",
                "Quarterly revenue report for the board of directors",
            ]
        )
    )
    assert query @ paraphrase > 0.4
    assert query @ paraphrase > query @ unrelated + 0.25


def test_text_vectors_are_deterministic_unit_vectors() -> None:
    texts = ["Hello, world", "Zürich straße - ünïcode", "x " * 5000]
    first = BuiltinTextEmbedder().embed_texts(texts)
    again = BuiltinTextEmbedder().embed_texts(texts)
    for one, two in zip(first, again, strict=True):
        assert _vector(one).shape == (DIMENSION,)
        assert np.linalg.norm(_vector(one)) == pytest.approx(1.0, abs=1e-5)
        assert np.array_equal(_vector(one), _vector(two))
    # Case does not matter; word order does a little (bigrams).
    upper, lower, swapped = (
        _vector(v) for v in BuiltinTextEmbedder().embed_texts(["Red Car", "red car", "car red"])
    )
    assert upper @ lower == pytest.approx(1.0)
    assert 0.5 < lower @ swapped < 0.999


def test_the_text_algorithm_is_pinned_to_its_fingerprint() -> None:
    """Vectors stored by one release are compared with queries embedded by the next: a
    change of the algorithm must come with a new fingerprint (which re-embeds every
    input). When this fails after an intended change, bump TEXT_SPEC.fingerprint and the
    digest here together."""
    vector = _vector(BuiltinTextEmbedder().embed_texts(["The quick brown fox, 2024!"])[0])
    digest = hashlib.sha256(np.round(vector, 4).tobytes()).hexdigest()[:16]
    assert (BuiltinTextEmbedder.spec.fingerprint, digest) == ("builtin-text-1", PINNED_TEXT_DIGEST)


PINNED_TEXT_DIGEST = "67d4cee14b388b00"


def test_texts_without_words_get_an_error() -> None:
    results = BuiltinTextEmbedder().embed_texts(["", "  ?! ", "ok"])
    assert isinstance(results[0], str)
    assert isinstance(results[1], str)
    assert not isinstance(results[2], str)
    assert BuiltinTextEmbedder.spec.accepts_text_queries is True
    assert BuiltinTextEmbedder.spec.id == TEXT_MODEL_ID


# --- the ONNX loader -------------------------------------------------------------------

_SIDE = 8
_MEAN = [0.5, 0.4, 0.3]
_STD = [0.25, 0.2, 0.5]


def build_conv_model(
    path: Path, *, layout: str = "NCHW", batch: int | str = "N", out_channels: int = 6
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Conv 3x3 (+bias) → global average pool → flatten; NHWC models transpose first.
    Returns the weights and bias, for the numpy computation of the same graph."""
    rng = np.random.default_rng(7)
    weights = rng.normal(size=(out_channels, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(size=out_channels).astype(np.float32)
    shape = [batch, 3, _SIDE, _SIDE] if layout == "NCHW" else [batch, _SIDE, _SIDE, 3]
    nodes = []
    source = "pixels"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["pixels"], ["chw"], perm=[0, 3, 1, 2]))
        source = "chw"
    nodes += [
        helper.make_node("Conv", [source, "w", "b"], ["conv"], kernel_shape=[3, 3]),
        helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "test-embedder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, out_channels])],
        initializer=[
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(bias, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return weights, bias


def write_settings(path: Path, **overrides: object) -> None:
    settings: dict[str, object] = {
        "model_id": "test-conv",
        "input_size": _SIDE,
        "mean": _MEAN,
        "std": _STD,
        "description": "a conv net the test built",
    }
    settings.update(overrides)
    path.write_text(json.dumps(settings))


def _numpy_embedding(
    image: Image.Image,
    weights: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32],
    *,
    bgr: bool = False,
) -> npt.NDArray[np.float64]:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    mean, std = np.asarray(_MEAN), np.asarray(_STD)
    if bgr:
        pixels, mean, std = pixels[..., ::-1], mean[::-1], std[::-1]
    chw = ((pixels - mean) / std).transpose(2, 0, 1)
    out = np.zeros((weights.shape[0], _SIDE - 2, _SIDE - 2))
    for o in range(weights.shape[0]):
        for y in range(_SIDE - 2):
            for x in range(_SIDE - 2):
                out[o, y, x] = np.sum(chw[:, y : y + 3, x : x + 3] * weights[o]) + bias[o]
    vector: npt.NDArray[np.float64] = out.mean(axis=(1, 2))
    return vector / np.linalg.norm(vector)


def _small_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(0, 256, (_SIDE, _SIDE, 3), dtype=np.uint8), "RGB")
        for _ in range(count)
    ]


@pytest.mark.parametrize(
    ("layout", "batch", "channels"),
    [("NCHW", "N", "RGB"), ("NHWC", "N", "RGB"), ("NCHW", 1, "BGR")],
)
def test_an_onnx_model_gives_the_vectors_numpy_computes(
    tmp_path: Path, layout: str, batch: int | str, channels: str
) -> None:
    model = tmp_path / "conv.onnx"
    weights, bias = build_conv_model(model, layout=layout, batch=batch)
    write_settings(tmp_path / "conv.json", layout=layout, channels=channels)
    embedder = OnnxImageEmbedder(model, tmp_path / "conv.json")
    assert embedder.spec.id == "test-conv"
    assert embedder.spec.dimension == 6
    assert embedder.spec.source is EmbeddingSource.ONNX
    assert embedder.spec.accepts_text_queries is False
    images = _small_images(3)
    results = embedder.embed_images([_encode(images[0]), b"junk", *map(_encode, images[1:])])
    assert isinstance(results[1], str)
    for image, result in zip(images, [results[0], *results[2:]], strict=True):
        expected = _numpy_embedding(image, weights, bias, bgr=channels == "BGR")
        np.testing.assert_allclose(_vector(result), expected, rtol=1e-4, atol=1e-5)


def test_onnx_images_are_centre_cropped_or_stretched(tmp_path: Path) -> None:
    model = tmp_path / "conv.onnx"
    weights, bias = build_conv_model(model)
    # Already at the model's scale (shorter side 8): only the crop or the stretch differ.
    rng = np.random.default_rng(5)
    wide = Image.fromarray(rng.integers(0, 256, (_SIDE, _SIDE * 2, 3), dtype=np.uint8), "RGB")
    write_settings(tmp_path / "crop.json")
    write_settings(tmp_path / "stretch.json", resize="stretch")
    cropped = OnnxImageEmbedder(model, tmp_path / "crop.json").embed_images([_encode(wide)])[0]
    stretched = OnnxImageEmbedder(model, tmp_path / "stretch.json").embed_images([_encode(wide)])
    centre = wide.crop((_SIDE // 2, 0, _SIDE // 2 + _SIDE, _SIDE))
    np.testing.assert_allclose(
        _vector(cropped), _numpy_embedding(centre, weights, bias), rtol=1e-4, atol=1e-5
    )
    assert not np.allclose(_vector(cropped), _vector(stretched[0]), atol=1e-3)


def test_the_onnx_fingerprint_follows_the_model_and_its_settings(tmp_path: Path) -> None:
    model = tmp_path / "conv.onnx"
    build_conv_model(model)
    write_settings(tmp_path / "conv.json")
    first = OnnxImageEmbedder(model, tmp_path / "conv.json").spec.fingerprint
    assert OnnxImageEmbedder(model, tmp_path / "conv.json").spec.fingerprint == first
    write_settings(tmp_path / "conv.json", mean=[0.5, 0.5, 0.5])
    assert OnnxImageEmbedder(model, tmp_path / "conv.json").spec.fingerprint != first
    write_settings(tmp_path / "conv.json")
    build_conv_model(model, out_channels=5)
    assert OnnxImageEmbedder(model, tmp_path / "conv.json").spec.fingerprint != first


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        (lambda d: (d / "missing.onnx", d / "conv.json"), "no such file"),
        (lambda d: (d / "conv.onnx", d / "absent.json"), "settings of ONNX model"),
        (lambda d: (d / "conv.onnx", _write(d / "bad.json", "{nope")), "not valid JSON"),
        (lambda d: (d / "conv.onnx", _write(d / "list.json", "[]")), "expected a JSON object"),
        (
            lambda d: (
                d / "conv.onnx",
                _write(d / "id.json", '{"model_id": "a b", "input_size": 8}'),
            ),
            "model_id must be",
        ),
        (
            lambda d: (
                d / "conv.onnx",
                _write(d / "size.json", '{"model_id": "m", "input_size": 9}'),
            ),
            "the settings give NCHW [3, 9, 9]",
        ),
        (
            lambda d: (
                d / "conv.onnx",
                _write(d / "std.json", '{"model_id": "m", "input_size": 8, "std": [1, 0, 1]}'),
            ),
            "std must be positive",
        ),
        (
            lambda d: (
                d / "conv.onnx",
                _write(d / "out.json", '{"model_id": "m", "input_size": 8, "output_name": "x"}'),
            ),
            "no output 'x'; its outputs: embedding",
        ),
        (
            lambda d: (
                d / "conv.onnx",
                _write(d / "key.json", '{"model_id": "m", "input_size": 8, "meen": 1}'),
            ),
            "unknown setting(s) meen",
        ),
        (lambda d: (_write(d / "text.onnx", "not a model"), d / "conv.json"), "cannot load it"),
    ],
    ids=[
        "no-model",
        "no-settings",
        "bad-json",
        "not-object",
        "bad-id",
        "wrong-size",
        "zero-std",
        "no-output",
        "unknown-key",
        "not-onnx",
    ],
)
def test_a_bad_onnx_configuration_stops_with_a_clear_error(
    tmp_path: Path, setup: Callable[[Path], tuple[Path, Path]], words: str
) -> None:
    build_conv_model(tmp_path / "conv.onnx")
    write_settings(tmp_path / "conv.json")
    model, settings = setup(tmp_path)
    with pytest.raises(OnnxModelError) as raised:
        OnnxImageEmbedder(model, settings)
    assert words in str(raised.value)


def test_an_onnx_output_of_one_dimension_is_refused(tmp_path: Path) -> None:
    build_conv_model(tmp_path / "conv.onnx", out_channels=1)
    write_settings(tmp_path / "conv.json")
    with pytest.raises(OnnxModelError, match="has 1 dimensions"):
        OnnxImageEmbedder(tmp_path / "conv.onnx", tmp_path / "conv.json")


# --- settings and the choice of models ---------------------------------------------------


def test_installation_embedders_follow_the_settings(tmp_path: Path) -> None:
    assert [e.spec.id for e in installation_embedders(Config())] == [IMAGE_MODEL_ID, TEXT_MODEL_ID]
    assert installation_embedders(Config(builtin_embedders=False)) == []
    model = tmp_path / "conv.onnx"
    build_conv_model(model)
    write_settings(tmp_path / "conv.json")
    embedders = installation_embedders(Config(embedder_onnx=str(model)))
    assert [e.spec.id for e in embedders] == [IMAGE_MODEL_ID, TEXT_MODEL_ID, "test-conv"]
    # The image default is the operator's model; texts stay with the built-in one.
    image_default = default_embedder(embedders, MediaType.IMAGE)
    text_default = default_embedder(embedders, MediaType.TEXT)
    assert image_default is not None and image_default.spec.id == "test-conv"
    assert text_default is not None and text_default.spec.id == TEXT_MODEL_ID
    assert default_embedder(embedders, MediaType.VIDEO) is None
    assert set(by_id(embedders)) == {IMAGE_MODEL_ID, TEXT_MODEL_ID, "test-conv"}
    write_settings(tmp_path / "taken.json", model_id=IMAGE_MODEL_ID)
    with pytest.raises(ConfigError, match="id of a built-in model"):
        installation_embedders(
            Config(embedder_onnx=str(model), embedder_onnx_settings=str(tmp_path / "taken.json"))
        )


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"DATASETD_BUILTIN_EMBEDDERS": "maybe"}, "DATASETD_BUILTIN_EMBEDDERS='maybe'"),
        ({"DATASETD_EMBED_BATCH": "0"}, "DATASETD_EMBED_BATCH='0': must be at least 1"),
        ({"DATASETD_EMBED_BATCH": "5000"}, "DATASETD_EMBED_BATCH must be 1..1024"),
        ({"DATASETD_EMBEDDER_ONNX_SETTINGS": "/x.json"}, "DATASETD_EMBEDDER_ONNX (the model)"),
    ],
)
def test_embedding_settings_are_validated(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env(env)
    assert words in str(raised.value)


def test_embedding_settings_are_read() -> None:
    config = Config.from_env(
        {
            "DATASETD_BUILTIN_EMBEDDERS": "off",
            "DATASETD_EMBEDDER_ONNX": "/models/clip.onnx",
            "DATASETD_EMBEDDER_ONNX_SETTINGS": "/models/clip-settings.json",
            "DATASETD_EMBED_BATCH": "16",
        }
    )
    assert config.builtin_embedders is False
    assert config.embedder_onnx == "/models/clip.onnx"
    assert config.embedder_onnx_settings == "/models/clip-settings.json"
    assert config.embed_batch == 16
    defaults = Config.from_env({})
    assert (defaults.builtin_embedders, defaults.embedder_onnx, defaults.embed_batch) == (
        True,
        "",
        64,
    )


# --- the job's handler over an in-memory repository ---------------------------------------


class _Repository:
    """Just what EmbeddingIndexer calls; `sticky` inputs stay pending whatever is stored."""

    def __init__(self, model: EmbeddingModel, pending: list[PendingInput], sticky: bool = False):
        self.model = model
        self.waiting = list(pending)
        self.sticky = sticky
        self.vectors: dict[str, Sequence[float]] = {}
        self.failures: dict[str, str] = {}
        self.indexed = 0

    async def models(self, app_id: str) -> list[EmbeddingModel]:
        return [self.model]

    async def pending(self, model: EmbeddingModel, limit: int) -> list[PendingInput]:
        return self.waiting[:limit]

    async def put_many(
        self, model: EmbeddingModel, vectors: Sequence[tuple[str, str, Sequence[float]]]
    ) -> None:
        self.vectors.update({input_id: vector for _, input_id, vector in vectors})
        self._done({input_id for _, input_id, _ in vectors})

    async def record_failures(
        self, model: EmbeddingModel, failures: Sequence[tuple[str, str, str]]
    ) -> None:
        self.failures.update({input_id: error for _, input_id, error in failures})
        self._done({input_id for _, input_id, _ in failures})

    async def fail_unfetched(self, model: EmbeddingModel, error: str) -> int:
        unfetched = [
            p
            for p in self.waiting
            if p.blob_key is None and p.media_type is not MediaType.TEXT and p.source_url
        ]
        await self.record_failures(model, [(p.app_id, p.input_id, error) for p in unfetched])
        return len(unfetched)

    async def ensure_indexes(self) -> None:
        self.indexed += 1

    def _done(self, ids: set[str]) -> None:
        if not self.sticky:
            self.waiting = [p for p in self.waiting if p.input_id not in ids]


class _Transactions:
    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield


class _Store:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    async def read(self, blob: StoredBlob) -> bytes:
        return self.objects[blob.key]


class _Recording(BuiltinImageEmbedder):
    def __init__(self) -> None:
        self.slices: list[int] = []

    def embed_images(self, images: Sequence[bytes]) -> list[list[float] | str]:
        self.slices.append(sum(map(len, images)))
        return super().embed_images(images)


def _model() -> EmbeddingModel:
    spec = BuiltinImageEmbedder.spec
    return EmbeddingModel(
        "", spec.id, 1, spec.dimension, spec.media_types, False, EmbeddingSource.BUILTIN
    )


async def _noop(percent: int) -> None:
    return None


async def test_the_job_embeds_large_originals_a_slice_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pictures = {f"k{n}": _encode(_scene(n, (160, 120))) for n in range(9)}
    size = max(map(len, pictures.values()))
    # Two originals' worth: a batch of nine is embedded in slices, never all at once.
    monkeypatch.setattr(embedding_job, "MAX_SLICE_BYTES", 2 * size)
    pending = [PendingInput("a", key, MediaType.IMAGE, key, None, "") for key in pictures]
    repository = _Repository(_model(), pending)
    embedder = _Recording()
    indexer = EmbeddingIndexer(
        repository,  # type: ignore[arg-type]
        [embedder],
        _Store(pictures),
        _Transactions(),  # type: ignore[arg-type]
        batch=9,
    )
    await indexer.run(Job(1, JobKind.EMBED_INPUTS, "a"), _noop)
    assert set(repository.vectors) == set(pictures)
    assert sum(embedder.slices) == sum(map(len, pictures.values()))
    assert len(embedder.slices) > 1
    # Each slice stops reading once it holds the cap: at most one read group beyond it.
    assert max(embedder.slices) < 2 * size + embedding_job.READ_CONCURRENCY * size
    assert repository.indexed == 1


async def test_inputs_that_stay_pending_fail_the_job_instead_of_looping() -> None:
    picture = _encode(_scene(1, (64, 64)))
    pending = [PendingInput("a", "p", MediaType.IMAGE, "k", None, "")]
    repository = _Repository(_model(), pending, sticky=True)
    indexer = EmbeddingIndexer(
        repository,  # type: ignore[arg-type]
        [BuiltinImageEmbedder()],
        _Store({"k": picture}),
        _Transactions(),  # type: ignore[arg-type]
    )
    with pytest.raises(JobFailed, match="still reported pending"):
        await indexer.run(Job(1, JobKind.EMBED_INPUTS, "a"), _noop)
    assert list(repository.vectors) == ["p"]


async def test_a_bad_onnx_model_stops_the_server_before_anything_starts(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path / "data", embedder_onnx=str(tmp_path / "missing.onnx"))
    with pytest.raises(OnnxModelError, match="no such file"):
        await start(config)
    # Refused before the embedded PostgreSQL and S3 were started.
    assert not (tmp_path / "data").exists()
