"""The Clarifai protobuf writer with an ontology copies the stored bytes of an input with
nothing to name (found from the bytes, without parsing them) and names the rest."""

from __future__ import annotations

import io
import zipfile

from datasetd.v1 import data_pb2, input_pb2

from service.domain.models import ExportFormat, VersionMember
from service.formats.clarifai.writer import _Unnamed
from tests.unit.test_ontology_writers import ontology, written


def member(position: int, *concepts: data_pb2.Concept, input_id: str = "") -> VersionMember:
    message = input_pb2.Input(id=input_id or f"in-{position}")
    message.data.image.url = f"s3://bucket/{position}.png"
    region = message.data.regions.add(id=f"r{position}")
    region.region_info.bounding_box.bottom_row = 0.5
    region.data.concepts.extend(concepts)
    # A concept in a frame's region too, at the deepest place a concept can be.
    frame = message.data.frames.add()
    frame.data.regions.add(id=f"f{position}").data.concepts.extend(concepts)
    return VersionMember(position, message.id, message.SerializeToString(), None)


def inputs(archive: bytes) -> list[bytes]:
    """The serialized inputs of the archive's one batch, as written."""
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        [name] = [n for n in opened.namelist() if n.startswith("all/")]
        batch = input_pb2.InputBatch.FromString(opened.read(name))
    return [item.SerializeToString() for item in batch.inputs]


async def test_inputs_with_nothing_to_name_are_copied_and_the_others_named() -> None:
    members = [
        # Named already, though of a class with a display name.
        member(0, data_pb2.Concept(id="car", name="My car", value=1)),
        # Of no class of the ontology; and a class without a display name.
        member(1, data_pb2.Concept(id="truck", value=1), data_pb2.Concept(id="person")),
        # A class id in another field (the input id) is no concept to name.
        member(2, data_pb2.Concept(id="bus", value=1), input_id="car"),
        member(3, data_pb2.Concept(id="car", value=1)),
    ]
    written_inputs = inputs(await written(ExportFormat.CLARIFAI_DATA_PROTOBUF, members, ontology()))
    assert written_inputs[:3] == [m.data for m in members[:3]]
    named = input_pb2.Input.FromString(written_inputs[3])
    assert named.data.regions[0].data.concepts[0].name == "Car"
    assert named.data.frames[0].data.regions[0].data.concepts[0].name == "Car"


def test_unnamed_concepts_are_found_among_many_classes_and_only_those() -> None:
    unnamed = _Unnamed({f"class-{n}": f"Class {n}" for n in range(5000)})
    for found, concept in (
        (True, data_pb2.Concept(id="class-4999")),
        (True, data_pb2.Concept(id="class-7", value=1)),
        (False, data_pb2.Concept(id="class-7", name="Seven", value=1)),
        # A prefix or an extension of a class id is another id.
        (False, data_pb2.Concept(id="class-", value=1)),
        (False, data_pb2.Concept(id="class-49999", value=1)),
    ):
        data = data_pb2.Data(concepts=[concept]).SerializeToString()
        assert unnamed.found(data) is found, concept
