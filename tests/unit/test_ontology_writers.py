"""The export writers given a version's ontology, on their own: COCO categories of a
version without members, and Clarifai concept names at every depth of an input (frames
and their regions included, which the e2e test's images do not have)."""

from __future__ import annotations

import io
import json
import zipfile

from clarifai_grpc.grpc.api import resources_pb2
from datasetd.v1 import input_pb2
from google.protobuf import json_format

from service.domain.models import (
    ExportFormat,
    ExportOptions,
    OntologyClass,
    Shape,
    VersionMember,
    VersionOntology,
)
from service.domain.ontologies import number_classes
from service.formats.archives import Archives
from tests.unit.test_export_writers import MODIFIED, Media, Sink

BOX = (Shape.BOUNDING_BOX,)


def ontology() -> VersionOntology:
    classes = (
        OntologyClass(
            "vehicle", "Vehicle", shapes=BOX, sub_classes=(OntologyClass("car", "Car", shapes=BOX),)
        ),
        OntologyClass("person", shapes=BOX),
    )
    inputs = (OntologyClass("night", "Night", shapes=(Shape.CLASSIFICATION,)),)
    (numbered, numbered_inputs), last = number_classes((classes, inputs), {}, 3)
    return VersionOntology("roads", 4, numbered, numbered_inputs, last)


async def written(
    export_format: ExportFormat, members: list[VersionMember], governing: VersionOntology
) -> bytes:
    sink = Sink()
    writer = Archives(Media({})).writer(
        export_format, ExportOptions(), ["all"], sink, MODIFIED, governing
    )
    if writer.needs_census:
        await writer.observe(members)
    if members:
        await writer.write("all", members)
    await writer.finish()
    return bytes(sink.data)


async def test_coco_of_a_version_without_members_has_the_ontology_categories() -> None:
    archive = await written(ExportFormat.COCO, [], ontology())
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        document = json.loads(opened.read("annotations/instances_all.json"))
    # Numbered after a removed class's 1..3: the ids are the classes' own, not 1, 2, ...
    assert document["categories"] == [
        {"id": 4, "name": "vehicle", "supercategory": "", "display_name": "Vehicle"},
        {"id": 5, "name": "car", "supercategory": "vehicle", "display_name": "Car"},
        {"id": 6, "name": "person", "supercategory": "", "display_name": ""},
        {"id": 7, "name": "night", "supercategory": "", "display_name": "Night"},
    ]
    assert document["images"] == document["annotations"] == []


def video_member() -> VersionMember:
    message = input_pb2.Input(id="clip")
    data = message.data
    data.video.url = "https://example.com/clip.mp4"
    data.concepts.add(id="night", value=1.0)
    frame = data.frames.add(id="f1")
    frame.data.concepts.add(id="car", value=1.0)
    frame.data.concepts.add(id="vehicle", name="Truck", value=1.0)
    region = frame.data.regions.add(id="fr1")
    region.data.concepts.add(id="person", value=1.0)  # a class without a display name
    region.data.concepts.add(id="car", value=0.0)
    top = data.regions.add(id="r1")
    top.data.concepts.add(id="bicycle", value=1.0)  # no class of the ontology
    return VersionMember(0, "clip", message.SerializeToString(), None)


async def test_clarifai_names_unnamed_concepts_of_frames_and_their_regions() -> None:
    for export_format in (ExportFormat.CLARIFAI_DATA_PROTOBUF, ExportFormat.CLARIFAI_DATA_JSON):
        archive = await written(export_format, [video_member()], ontology())
        with zipfile.ZipFile(io.BytesIO(archive)) as opened:
            (entry,) = [n for n in opened.namelist() if n != "mimetype"]
            raw = opened.read(entry)
        if export_format is ExportFormat.CLARIFAI_DATA_PROTOBUF:
            batch = resources_pb2.InputBatch.FromString(raw)
        else:
            batch = json_format.Parse(raw, resources_pb2.InputBatch())
        (clip,) = batch.inputs
        frame = clip.data.frames[0]
        assert [(c.id, c.name) for c in clip.data.concepts] == [("night", "Night")]
        assert [(c.id, c.name) for c in frame.data.concepts] == [
            ("car", "Car"),
            ("vehicle", "Truck"),  # a name of its own is kept
        ]
        assert [(c.id, c.name) for c in frame.data.regions[0].data.concepts] == [
            ("person", ""),
            ("car", "Car"),
        ]
        assert [(c.id, c.name) for c in clip.data.regions[0].data.concepts] == [("bicycle", "")]
