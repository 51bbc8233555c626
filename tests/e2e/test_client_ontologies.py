"""`client.ontologies` and `client.projects` of the synchronous library against the real server.

As in test_client.py, every blocking client call runs in a thread (`run`), since the server
answers on the test's event loop.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.app import Running
from service.client import (
    AbortedError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from tests.conftest import Caller
from tests.e2e.test_client import fails, run
from tests.readme import fenced_block, heredoc, street_ontology

README_CLIENT = 'Client("127.0.0.1:50051", api_key="dsd_...", app="main")'


@pytest.fixture
def client(server: Running, caller: Caller) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}", caller.key, caller.app_id) as opened:
        yield opened


async def test_the_readme_example_runs_as_written(
    client: Client,
    server: Running,
    caller: Caller,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = fenced_block("python", "client.ontologies.create(")
    assert README_CLIENT in example
    example = example.replace(
        README_CLIENT, f"Client({f'127.0.0.1:{server.port}'!r}, {caller.key!r}, {caller.app_id!r})"
    )
    (tmp_path / "street-ontology.json").write_text(heredoc("street-ontology.json"))
    monkeypatch.chdir(tmp_path)
    await run(lambda: exec(compile(example, "README.md", "exec"), {}))

    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "1 ['vehicle', 'person', 'bicycle', 'night']"
    assert printed[1] == "street ['street-photos']"
    assert printed[2] == "2 1"
    assert printed[3].startswith("UNKNOWN_CLASS note-2 data.concepts[0].id 'nigth' is not a class")
    assert printed[3].endswith("allowed: 'night'")
    assert printed[4].startswith("3 {") and "'archived': True" in printed[4]
    assert printed[5] == "['street'] ['street-labelling']"
    assert printed[6] == "ONTOLOGY_IN_USE"
    assert len(printed) == 7
    # A clean upload leaves neither a failure log nor a state file behind.
    assert sorted(os.listdir(tmp_path)) == ["street-ontology.json"]
    street = await run(lambda: client.ontologies.get("street"))
    assert street.revision == 3
    assert street.find_class("bicycle") == {
        "id": "bicycle",
        "display_name": "Bicycle",
        "shapes": ["SHAPE_BOUNDING_BOX"],
        "archived": True,
    }
    assert street.class_ids() == ["vehicle", "person", "bicycle", "scooter", "night"]
    project = await run(lambda: client.projects.get("street-labelling"))
    assert project.description == "Street scenes, spring" and project.dataset_ids == []


async def test_create_from_a_dict_text_or_file_and_list_every_page(
    client: Client, tmp_path: Path
) -> None:
    ontology = street_ontology()
    created = await run(lambda: client.ontologies.create(ontology, ontology_id="street"))
    assert created.id == "street" and created.app_id == client.app and created.revision == 1
    assert created.created_at is not None and created.created_at.tzinfo is not None
    # Numbered by the server in tree order (COCO category ids), so output only: the content
    # leaves them out and can be sent again as it is.
    assert [c["category_id"] for c in created.classes] == [1, 2, 3]
    # What went in comes back.
    assert created.content == {"id": "street", **ontology}
    vehicle = created.find_class("vehicle")
    assert vehicle is not None and vehicle["attributes"][0]["enum_type"]["options"] == [
        "car",
        "bus",
        "truck",
    ]

    generated = await run(lambda: client.ontologies.create(json.dumps({"description": "text"})))
    assert len(generated.id) == 32 and generated.description == "text"
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"id": "from-file", "classes": ontology["classes"][:1]}))
    from_file = await run(lambda: client.ontologies.create(path))
    assert from_file.id == "from-file" and from_file.class_ids() == ["vehicle"]

    got = await run(lambda: client.ontologies.get("street"))
    assert got == created
    listed = await run(lambda: [o.id for o in client.ontologies.list(page_size=1)])
    assert listed == ["street", generated.id, "from-file"]


async def test_update_replaces_the_content_at_the_expected_revision(client: Client) -> None:
    ontology = street_ontology()
    await run(lambda: client.ontologies.create(ontology, ontology_id="street"))
    changed = copy.deepcopy(ontology)
    changed["classes"] = changed["classes"][:2]
    del changed["input_classifications"]
    updated = await run(lambda: client.ontologies.update("street", changed, expected_revision=1))
    # Replaced as a whole: the input classification the new content leaves out is gone.
    assert updated.revision == 2 and updated.class_ids() == ["vehicle", "person"]

    stale = await fails(lambda: client.ontologies.update("street", ontology, expected_revision=1))
    assert isinstance(stale, AbortedError) and stale.reason == "REVISION_MISMATCH"
    described = await run(
        lambda: client.ontologies.update("street", {"description": "new"}, fields=("description",))
    )
    assert described.revision == 3 and described.description == "new"
    assert described.class_ids() == ["vehicle", "person"]

    with pytest.raises(ValueError, match="fields must name some of"):
        client.ontologies.update("street", {}, fields=("revision",))
    with pytest.raises(ValueError, match="'other' is not the ontology 'street'"):
        client.ontologies.update("street", {"id": "other"})


async def test_archive_class_at_any_depth(client: Client) -> None:
    ontology = street_ontology()
    ontology["classes"][0]["sub_classes"] = [{"id": "car", "shapes": ["SHAPE_BOUNDING_BOX"]}]
    await run(lambda: client.ontologies.create(ontology, ontology_id="street"))

    archived = await run(lambda: client.ontologies.archive_class("street", "car"))
    assert archived.revision == 2
    assert archived.classes[0]["sub_classes"][0]["archived"] is True
    night = await run(lambda: client.ontologies.archive_class("street", "night"))
    assert night.revision == 3 and night.input_classifications[0]["archived"] is True
    again = await run(lambda: client.ontologies.archive_class("street", "night"))
    assert again.revision == 3

    unknown = await fails(lambda: client.ontologies.archive_class("street", "cta"))
    assert isinstance(unknown, NotFoundError) and unknown.reason == "ONTOLOGY_CLASS_NOT_FOUND"
    assert "no class 'cta'" in unknown.message and "vehicle, car, person" in unknown.message
    missing = await fails(lambda: client.ontologies.archive_class("nope", "car"))
    assert isinstance(missing, NotFoundError)


async def test_bad_ontologies_are_refused_with_their_path(client: Client) -> None:
    duplicate = {
        "classes": [
            {"id": "cat", "shapes": ["SHAPE_BOUNDING_BOX"]},
            {"id": "cat", "shapes": ["SHAPE_POLYGON"]},
        ]
    }
    refused = await fails(lambda: client.ontologies.create(duplicate, ontology_id="pets"))
    assert isinstance(refused, InvalidArgumentError)
    assert "duplicate class id 'cat'" in refused.field_violations["ontology.classes[1].id"]

    with pytest.raises(ValueError, match=r"Invalid enum value SHAPE_CIRCLE .*classes\[0\]"):
        client.ontologies.create({"classes": [{"id": "c", "shapes": ["SHAPE_CIRCLE"]}]})
    with pytest.raises(ValueError, match='no field named "colour"'):
        client.ontologies.create({"classes": [{"id": "c", "colour": "#FFFFFF"}]})
    with pytest.raises(ValueError, match="must be a JSON object"):
        client.ontologies.create("[1, 2]")
    with pytest.raises(ValueError, match="not valid JSON"):
        client.ontologies.create("{")
    with pytest.raises(ValueError, match="its id 'a' is not the ontology 'b'"):
        client.ontologies.create({"id": "a"}, ontology_id="b")
    assert await run(lambda: list(client.ontologies.list())) == []

    gone = await fails(lambda: client.ontologies.get("pets"))
    assert isinstance(gone, NotFoundError)


async def test_projects_lifecycle(client: Client) -> None:
    unknown = await fails(lambda: client.projects.create("road", ontology_id="nope"))
    assert isinstance(unknown, NotFoundError) and "project.ontology_id" in unknown.message

    await run(lambda: client.ontologies.create(street_ontology(), ontology_id="street"))
    await run(lambda: client.ontologies.create({"id": "spare"}))
    await run(lambda: client.datasets.create("photos"))
    created = await run(
        lambda: client.projects.create("road", ontology_id="street", description="Roads")
    )
    assert (created.id, created.ontology_id, created.description) == ("road", "street", "Roads")
    assert created.app_id == client.app and created.dataset_ids == []
    generated = await run(lambda: client.projects.create("", ontology_id="spare"))
    assert len(generated.id) == 32

    attached = await run(lambda: client.projects.attach_dataset("road", "photos"))
    again = await run(lambda: client.projects.attach_dataset("road", "photos"))
    assert attached.dataset_ids == again.dataset_ids == ["photos"]
    not_a_dataset = await fails(lambda: client.projects.attach_dataset("road", "nope"))
    assert isinstance(not_a_dataset, NotFoundError) and "dataset_id" in not_a_dataset.message

    in_use = await fails(lambda: client.ontologies.delete("street"))
    assert isinstance(in_use, FailedPreconditionError) and in_use.reason == "ONTOLOGY_IN_USE"

    updated = await run(lambda: client.projects.update("road", ontology_id="spare"))
    assert updated.ontology_id == "spare" and updated.description == "Roads"
    cleared = await run(lambda: client.projects.update("road", description=""))
    assert cleared.description == "" and cleared.ontology_id == "spare"
    with pytest.raises(ValueError, match="at least one of"):
        client.projects.update("road")

    assert await run(lambda: [p.id for p in client.projects.list(page_size=1)]) == [
        "road",
        generated.id,
    ]
    detached = await run(lambda: client.projects.detach_dataset("road", "photos"))
    assert detached.dataset_ids == []
    await run(lambda: client.projects.delete("road"))
    assert isinstance(await fails(lambda: client.projects.get("road")), NotFoundError)
    # No project uses it any more.
    await run(lambda: client.ontologies.delete("street"))
    assert isinstance(await fails(lambda: client.ontologies.get("street")), NotFoundError)
