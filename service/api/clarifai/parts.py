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


def clarifai_parts(native: NativeParts) -> tuple[object, ...]:
    """Every V2 part, over `native`."""
    from service.api.clarifai.annotations import ClarifaiAnnotations
    from service.api.clarifai.concepts import ClarifaiConcepts
    from service.api.clarifai.dataset_inputs import ClarifaiDatasetInputs
    from service.api.clarifai.datasets import ClarifaiDatasets
    from service.api.clarifai.inputs import ClarifaiInputs
    from service.api.clarifai.versions import ClarifaiVersions

    return (
        ClarifaiDatasets(native),
        ClarifaiDatasetInputs(native),
        ClarifaiVersions(native),
        ClarifaiInputs(native),
        ClarifaiAnnotations(native),
        ClarifaiConcepts(native),
    )
