"""The contracts in schemas/: generated from the models, and agreeing with them.

A third-party validator (jsonschema, draft 2020-12) checks every example event against the schema
files, and the pydantic models must accept and reject exactly the same examples.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from pointsman import contracts
from pointsman.events import EVENT_TYPES, SCHEMA_BASE_URI

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"
EXAMPLES = sorted((SCHEMAS / "examples").glob("*.json"))
INVALID = sorted((SCHEMAS / "examples" / "invalid").glob("*.json"))


def validator_for(event_type: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{event_type}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def event_type_of(path: Path) -> str:
    return path.name.split(".")[0]


def test_committed_schema_files_match_the_models() -> None:
    assert contracts.check(SCHEMAS) == [], "run `make schemas` and commit the result"


def test_every_event_type_has_a_schema_and_an_example() -> None:
    for event_type in EVENT_TYPES:
        assert (SCHEMAS / f"{event_type}.schema.json").is_file()
        assert any(event_type_of(p) == event_type for p in EXAMPLES), event_type
        assert any(event_type_of(p) == event_type for p in INVALID), event_type


def test_schemas_are_draft_2020_12_with_ids() -> None:
    for event_type in EVENT_TYPES:
        schema = json.loads((SCHEMAS / f"{event_type}.schema.json").read_text())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"] == f"{SCHEMA_BASE_URI}{event_type}.schema.json"
        for field in ("schema_version", "event_id"):
            assert field in schema["properties"], (event_type, field)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_for_schema_file_and_model(path: Path) -> None:
    data = json.loads(path.read_text())
    validator_for(event_type_of(path)).validate(data)
    model = EVENT_TYPES[event_type_of(path)]
    event = model.model_validate(data)
    # orjson round trip through the model keeps the example valid
    again = json.loads(event.to_json())  # type: ignore[attr-defined]
    validator_for(event_type_of(path)).validate(again)
    assert model.model_validate(again) == event


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_example_is_rejected_by_schema_file_and_model(path: Path) -> None:
    data = json.loads(path.read_text())
    errors = list(validator_for(event_type_of(path)).iter_errors(data))
    assert errors, f"the schema file accepts {path.name}"
    with pytest.raises(ValueError):
        EVENT_TYPES[event_type_of(path)].model_validate(data)


def test_tagged_query_embeds_a_valid_query() -> None:
    tagged = json.loads((SCHEMAS / "examples" / "tagged_query.json").read_text())
    validator_for("query").validate(tagged["query"])


def test_asyncapi_document_describes_every_channel() -> None:
    doc = yaml.safe_load((SCHEMAS / "asyncapi.yaml").read_text())
    assert doc["asyncapi"] == "3.0.0"
    assert set(doc["channels"]) == {c.role for c in contracts.CHANNELS}
    messages = doc["components"]["messages"]
    for role, channel in doc["channels"].items():
        assert channel["address"] == channel["bindings"]["kafka"]["topic"]
        for ref in channel["messages"].values():
            name = ref["$ref"].rsplit("/", 1)[1]
            payload = messages[name]["payload"]["$ref"]
            assert (SCHEMAS / payload).is_file(), payload
            assert "key" in messages[name]["bindings"]["kafka"]
        actions = {
            op["action"]
            for op in doc["operations"].values()
            if op["channel"]["$ref"] == f"#/channels/{role}"
        }
        assert actions == {"send", "receive"}, role
    for op in doc["operations"].values():
        channel = op["channel"]["$ref"].rsplit("/", 1)[1]
        for ref in op["messages"]:
            assert ref["$ref"].startswith(f"#/channels/{channel}/messages/")


def test_asyncapi_payload_refs_resolve_with_a_registry() -> None:
    """The AsyncAPI payload refs point at the schema files; resolve each one for real."""
    resources = []
    for event_type in EVENT_TYPES:
        schema = json.loads((SCHEMAS / f"{event_type}.schema.json").read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    registry = Registry().with_resources(resources)
    doc = yaml.safe_load((SCHEMAS / "asyncapi.yaml").read_text())
    for message in doc["components"]["messages"].values():
        uri = SCHEMA_BASE_URI + message["payload"]["$ref"].removeprefix("./")
        assert registry.resolver().lookup(uri).contents["title"]


def test_asyncapi_document_is_valid_against_the_official_asyncapi_3_schema() -> None:
    """Validated with the AsyncAPI project's own JSON Schema (npm @asyncapi/specs, fetched by
    `make test` into .state/ and named by POINTSMAN_ASYNCAPI_SPEC)."""
    import os

    found = sorted(ROOT.glob(".state/asyncapi-specs/*/package/schemas/3.0.0.json"))
    spec_path = os.environ.get("POINTSMAN_ASYNCAPI_SPEC") or (str(found[-1]) if found else None)
    assert spec_path, "run `make asyncapi-specs` (make test does) to fetch @asyncapi/specs"
    spec = json.loads(Path(spec_path).read_text())
    assert spec["$id"].endswith("/3.0.0/asyncapi.json")
    validator = jsonschema.validators.validator_for(spec)(spec)
    doc = yaml.safe_load((SCHEMAS / "asyncapi.yaml").read_text())
    assert list(validator.iter_errors(doc)) == []
    broken = yaml.safe_load((SCHEMAS / "asyncapi.yaml").read_text())
    next(iter(broken["operations"].values()))["action"] = "publish"  # AsyncAPI 2 verb
    assert list(validator.iter_errors(broken)), "the official schema should reject this"
