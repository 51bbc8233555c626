"""An image model the operator supplies: DATASETD_EMBEDDER_ONNX, run through onnxruntime.

The model's preprocessing is described by a JSON file beside it (`<model>.json`, or
DATASETD_EMBEDDER_ONNX_SETTINGS):

    {
      "model_id": "clip-vit-b32",          # the id callers name (required)
      "input_size": 224,                    # square side, or [height, width] (required)
      "mean": [0.481, 0.458, 0.408],        # per channel, after scaling (default 0)
      "std": [0.269, 0.261, 0.276],         # per channel (default 1)
      "scale": 0.00392156862745098,         # pixel multiplier before mean/std (1/255)
      "layout": "NCHW",                     # or "NHWC"
      "channels": "RGB",                    # or "BGR"
      "resize": "center_crop",              # or "stretch"
      "input_name": "pixel_values",         # default: the model's first input
      "output_name": "image_embeds",        # default: the model's first output
      "description": "CLIP ViT-B/32 image tower"
    }

The model is loaded and run once on a blank image at startup, so that a missing file,
bad JSON or an output that is not one vector per image stops the server with a clear
message instead of failing every input later. Its fingerprint hashes the model file and
the settings: a new export or new preprocessing re-embeds every input. Vectors are
L2-normalized (cosine). Image-only: text queries need a tokenizer this loader does not
carry, so `accepts_text_queries` is false.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from service.config import ConfigError
from service.domain.embeddings import MAX_DIMENSION, EmbeddingSource, ModelSpec
from service.domain.models import MediaType
from service.embedders.builtin import decode_image

# Model ids are the ids of the API (data.embeddings model_id, rank model_id).
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LAYOUTS: Final = ("NCHW", "NHWC")
_CHANNELS: Final = ("RGB", "BGR")
_RESIZES: Final = ("center_crop", "stretch")
_MAX_SIDE: Final = 2048
_KNOWN_KEYS: Final = frozenset(
    {
        "model_id",
        "input_size",
        "mean",
        "std",
        "scale",
        "layout",
        "channels",
        "resize",
        "input_name",
        "output_name",
        "description",
    }
)


class OnnxModelError(ConfigError):
    """The configured ONNX model or its settings cannot be used (the message says why)."""


@dataclass(frozen=True)
class OnnxSettings:
    model_id: str
    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float
    layout: str
    channels: str
    resize: str
    input_name: str | None
    output_name: str | None
    description: str

    @classmethod
    def parse(cls, raw: Any, where: str) -> OnnxSettings:
        if not isinstance(raw, dict):
            raise OnnxModelError(f"{where}: expected a JSON object")
        unknown = sorted(set(raw) - _KNOWN_KEYS)
        if unknown:
            raise OnnxModelError(
                f"{where}: unknown setting(s) {', '.join(unknown)}; known: "
                + ", ".join(sorted(_KNOWN_KEYS))
            )
        model_id = raw.get("model_id")
        if not isinstance(model_id, str) or not _MODEL_ID.match(model_id):
            raise OnnxModelError(
                f"{where}: model_id must be 1..64 letters, digits, '_', '.', '-', got {model_id!r}"
            )
        height, width = _size(raw.get("input_size"), where)
        return cls(
            model_id=model_id,
            height=height,
            width=width,
            mean=_triple(raw.get("mean", 0.0), where, "mean", positive=False),
            std=_triple(raw.get("std", 1.0), where, "std", positive=True),
            scale=_number(raw.get("scale", 1 / 255), where, "scale"),
            layout=_choice(raw.get("layout", "NCHW"), _LAYOUTS, where, "layout"),
            channels=_choice(raw.get("channels", "RGB"), _CHANNELS, where, "channels"),
            resize=_choice(raw.get("resize", "center_crop"), _RESIZES, where, "resize"),
            input_name=_optional_text(raw.get("input_name"), where, "input_name"),
            output_name=_optional_text(raw.get("output_name"), where, "output_name"),
            description=_optional_text(raw.get("description"), where, "description") or "",
        )


def _size(value: Any, where: str) -> tuple[int, int]:
    sides = [value, value] if isinstance(value, int) else value
    if (
        not isinstance(sides, list)
        or len(sides) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in sides)
        or not all(1 <= s <= _MAX_SIDE for s in sides)
    ):
        raise OnnxModelError(
            f"{where}: input_size must be a side or [height, width] of 1..{_MAX_SIDE} pixels, "
            f"got {value!r}"
        )
    return sides[0], sides[1]


def _number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OnnxModelError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)


def _triple(value: Any, where: str, name: str, *, positive: bool) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, int | float) else value
    if not isinstance(values, list) or len(values) != 3:
        raise OnnxModelError(f"{where}: {name} must be a number or 3 numbers, got {value!r}")
    numbers = [_number(v, where, name) for v in values]
    if positive and any(v <= 0 for v in numbers):
        raise OnnxModelError(f"{where}: {name} must be positive, got {value!r}")
    return numbers[0], numbers[1], numbers[2]


def _choice(value: Any, choices: tuple[str, ...], where: str, name: str) -> str:
    if value not in choices:
        raise OnnxModelError(f"{where}: {name} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _optional_text(value: Any, where: str, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise OnnxModelError(f"{where}: {name} must be a non-empty string, got {value!r}")
    return value


def settings_path(model: Path, explicit: str = "") -> Path:
    return Path(explicit) if explicit else model.with_suffix(".json")


class OnnxImageEmbedder:
    """Runs an image model on CPU (1-2 intra-op threads: the job runs beside the server)."""

    spec: ModelSpec

    def __init__(self, model: Path, settings_file: Path, *, threads: int | None = None) -> None:
        import onnxruntime  # type: ignore[import-untyped]

        if not model.is_file():
            raise OnnxModelError(f"DATASETD_EMBEDDER_ONNX={str(model)!r}: no such file")
        if not settings_file.is_file():
            raise OnnxModelError(
                f"the settings of ONNX model {str(model)!r} are missing: expected "
                f"{str(settings_file)!r} (or set DATASETD_EMBEDDER_ONNX_SETTINGS)"
            )
        settings_text = settings_file.read_bytes()
        try:
            raw = json.loads(settings_text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise OnnxModelError(f"{settings_file}: not valid JSON ({exc})") from None
        self.settings = OnnxSettings.parse(raw, str(settings_file))
        model_bytes = model.read_bytes()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        try:
            self._session = onnxruntime.InferenceSession(
                model_bytes, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise OnnxModelError(f"{model}: onnxruntime cannot load it ({exc})") from None
        self._input, self._output, self._batched = self._check_graph(model)
        dimension = self._probe_dimension(model)
        digest = hashlib.sha256(model_bytes)
        digest.update(b"\0settings\0")
        digest.update(json.dumps(raw, sort_keys=True).encode())
        self.spec = ModelSpec(
            id=self.settings.model_id,
            dimension=dimension,
            media_types=frozenset({MediaType.IMAGE}),
            accepts_text_queries=False,
            source=EmbeddingSource.ONNX,
            description=self.settings.description or f"ONNX image model {model.name}",
            fingerprint=f"onnx-sha256-{digest.hexdigest()}",
        )

    def _check_graph(self, model: Path) -> tuple[str, str, bool]:
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        settings = self.settings
        input_names = [i.name for i in inputs]
        output_names = [o.name for o in outputs]
        input_name = settings.input_name or input_names[0]
        output_name = settings.output_name or output_names[0]
        if input_name not in input_names:
            raise OnnxModelError(
                f"{model}: no input {input_name!r}; its inputs: {', '.join(input_names)}"
            )
        if output_name not in output_names:
            raise OnnxModelError(
                f"{model}: no output {output_name!r}; its outputs: {', '.join(output_names)}"
            )
        if len(inputs) != 1:
            raise OnnxModelError(
                f"{model}: has {len(inputs)} inputs ({', '.join(input_names)}); an image "
                "model with one image input is needed"
            )
        source = inputs[0]
        if source.type != "tensor(float)":
            raise OnnxModelError(f"{model}: input {input_name!r} is {source.type}, not float32")
        shape = list(source.shape)
        if len(shape) != 4:
            raise OnnxModelError(
                f"{model}: input {input_name!r} has shape {shape}; expected 4 dimensions "
                f"({settings.layout})"
            )
        expected = (
            [3, settings.height, settings.width]
            if settings.layout == "NCHW"
            else [settings.height, settings.width, 3]
        )
        for axis, (declared, wanted) in enumerate(zip(shape[1:], expected, strict=True), 1):
            if isinstance(declared, int) and declared != wanted:
                raise OnnxModelError(
                    f"{model}: input {input_name!r} has shape {shape}, the settings give "
                    f"{settings.layout} {expected} (axis {axis}: {declared} != {wanted})"
                )
        # A fixed batch of 1 runs image by image; a symbolic batch takes a whole batch.
        batched = not (isinstance(shape[0], int) and shape[0] == 1)
        return input_name, output_name, batched

    def _probe_dimension(self, model: Path) -> int:
        blank = Image.new("RGB", (self.settings.width, self.settings.height), (127, 127, 127))
        try:
            output = self._run(self._tensor([blank]))
        except Exception as exc:
            raise OnnxModelError(f"{model}: running it on a blank image failed ({exc})") from None
        if output.shape[0] != 1 or output.ndim != 2:
            raise OnnxModelError(
                f"{model}: output {self._output!r} is not one vector per image "
                f"(shape {list(output.shape)} for one image)"
            )
        dimension = int(output.shape[1])
        if not 2 <= dimension <= MAX_DIMENSION:
            raise OnnxModelError(
                f"{model}: output {self._output!r} has {dimension} dimensions; "
                f"2..{MAX_DIMENSION} are supported"
            )
        return dimension

    def embed_images(self, images: Sequence[bytes]) -> list[list[float] | str]:
        results: list[list[float] | str] = [""] * len(images)
        decoded: list[tuple[int, Image.Image]] = []
        for index, data in enumerate(images):
            image = self._load(data)
            if isinstance(image, str):
                results[index] = image
            else:
                decoded.append((index, image))
        if not decoded:
            return results
        groups = [decoded] if self._batched else [[item] for item in decoded]
        for group in groups:
            output = self._run(self._tensor([image for _, image in group]))
            for (index, _), row in zip(group, output, strict=True):
                results[index] = _unit_or_error(row)
        return results

    def embed_texts(self, texts: Sequence[str]) -> list[list[float] | str]:
        return [f"{self.spec.id} embeds images only" for _ in texts]

    def _load(self, data: bytes) -> Image.Image | str:
        settings = self.settings
        # Decoded near the target size; cropped or stretched below.
        side = max(settings.height, settings.width)
        image = decode_image(data, side, keep_aspect=True)
        if isinstance(image, str):
            return image
        if settings.resize == "center_crop":
            return _center_crop(image, settings.height, settings.width)
        return image.resize((settings.width, settings.height), Image.Resampling.BICUBIC)

    def _tensor(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        settings = self.settings
        pixels = np.stack([np.asarray(image, dtype=np.float32) for image in images])
        if settings.channels == "BGR":
            pixels = pixels[..., ::-1]
            mean, std = settings.mean[::-1], settings.std[::-1]
        else:
            mean, std = settings.mean, settings.std
        scaled = pixels * np.float32(settings.scale) - np.asarray(mean, np.float32)
        batch = (scaled / np.asarray(std, np.float32)).astype(np.float32)
        if settings.layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(batch, dtype=np.float32)

    def _run(self, tensor: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        (output,) = self._session.run([self._output], {self._input: tensor})
        values = np.asarray(output, dtype=np.float32)
        # [N, D, 1, 1] (a pooled conv map) is one vector per image too.
        return values.reshape(values.shape[0], -1) if values.ndim > 2 else values


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scales the shorter side to fit, then crops the centre (CLIP's preprocessing)."""
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        Image.Resampling.BICUBIC,
    )
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _unit_or_error(row: npt.NDArray[np.float32]) -> list[float] | str:
    if not np.all(np.isfinite(row)):
        return "the model produced a non-finite vector"
    norm = float(np.linalg.norm(row))
    if norm < 1e-12:
        return "the model produced a zero vector"
    unit: list[float] = (row / np.float32(norm)).tolist()
    return unit
