"""What every V2 part is built from: the native servicer parts it maps onto (so each rule
lives once) and the download links of the HTTP port."""

from __future__ import annotations

from dataclasses import dataclass

from service.api.annotations import AnnotationRpcs
from service.api.datasets import DatasetRpcs
from service.api.exports import ExportRpcs
from service.api.inputs import InputRpcs
from service.api.links import DownloadLinks
from service.api.membership import MembershipRpcs
from service.api.versions import VersionRpcs


@dataclass(frozen=True)
class NativeParts:
    datasets: DatasetRpcs
    membership: MembershipRpcs
    inputs: InputRpcs
    annotations: AnnotationRpcs
    versions: VersionRpcs
    exports: ExportRpcs
    links: DownloadLinks


def part_classes() -> tuple[type, ...]:
    """The V2 part classes (imported here: they import this module)."""
    from service.api.clarifai.annotations import ClarifaiAnnotations
    from service.api.clarifai.apps import ClarifaiApps
    from service.api.clarifai.concepts import ClarifaiConcepts
    from service.api.clarifai.dataset_inputs import ClarifaiDatasetInputs
    from service.api.clarifai.datasets import ClarifaiDatasets
    from service.api.clarifai.inputs import ClarifaiInputs
    from service.api.clarifai.versions import ClarifaiVersions

    return (
        ClarifaiDatasets,
        ClarifaiDatasetInputs,
        ClarifaiVersions,
        ClarifaiInputs,
        ClarifaiAnnotations,
        ClarifaiConcepts,
        ClarifaiApps,
    )


def clarifai_parts(native: NativeParts) -> tuple[object, ...]:
    """Every V2 part, over `native`."""
    return tuple(part(native) for part in part_classes())


def served_methods() -> frozenset[str]:
    """The names of the V2 methods some part implements (the subset datasetd serves)."""
    from service.api.clarifai.service import V2

    return frozenset(
        method.name
        for method in V2.methods
        if any(callable(getattr(part, method.name, None)) for part in part_classes())
    )
