"""V2 RPCs of this part (being written)."""

from __future__ import annotations

from dataclasses import dataclass

from service.api.clarifai.parts import NativeParts


@dataclass
class ClarifaiDatasetInputs:
    parts: NativeParts
