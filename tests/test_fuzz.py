"""Fuzzing: schemathesis against the daemon's own /openapi.json, and hypothesis over lookups.

The fuzzed daemon can do no harm: a fresh data dir (no image, so `run` is a 404 and nothing
boots), no compiler reachable by a random base/lang/provider, small volumes, and the hub
routes left out, since they would send requests to whatever URL the fuzzer writes.
"""

from __future__ import annotations

import atexit
import shutil
import string
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import volume_meta
from unik.daemon import build_app
from unik.models import Volume, is_valid_name, now_rfc3339
from unik.store import Record, Store

# Every route that takes hub credentials contacts the URL in the body: never fuzzed.
HUB_ROUTES = r"^/(images/(push|pull|remote-delete)/|hub/search)"

# Invalid input must be a 4xx; nothing may be a 5xx; every response (status, content type,
# body) must be one the schema describes.
CHECKS = [
    not_a_server_error,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]


# Built at import: schemathesis makes one test per operation from the schema at collection
# time (its fixture-based lazy loading does not work with this pytest). The folder goes at exit
# even when these tests are deselected.
FUZZ_DIR = Path(tempfile.mkdtemp(prefix="unik-fuzz-", dir="/tmp"))
atexit.register(shutil.rmtree, FUZZ_DIR, True)
# Small volumes: an empty one of the biggest size the fuzzer may ask for is made in a blink.
(FUZZ_DIR / "daemon-config.yaml").write_text("max_volume_mb: 16\nmax_upload_mb: 8\n")
APP = build_app(FUZZ_DIR)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP).exclude(path_regex=HUB_ROUTES)


@schema.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_route_answers_within_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)


def test_the_hub_routes_are_the_only_ones_left_out() -> None:
    fuzzed = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    everything = schemathesis.openapi.from_asgi("/openapi.json", APP)
    left_out = {(op.ok().method.upper(), op.ok().path) for op in everything.get_all_operations()} - fuzzed
    assert left_out == {
        ("POST", "/images/push/{name}"),
        ("POST", "/images/pull/{name}"),
        ("POST", "/images/remote-delete/{name}"),
        ("POST", "/hub/search"),
    }
    assert len(fuzzed) >= 20


# -- lookups: exact name, exact id, unique id prefix; an ambiguous prefix is a 409 ----------------

NAME_CHARS = string.ascii_letters + string.digits + "_.-"
names = st.text(alphabet=NAME_CHARS, min_size=0, max_size=70)
valid_names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(string.ascii_letters + string.digits),
    st.text(alphabet=NAME_CHARS, max_size=63),
)


@pytest.fixture(scope="module")
def lookup_api() -> Iterator[tuple[TestClient, Path]]:
    data_dir = Path(tempfile.mkdtemp(prefix="unik-lookup-", dir="/tmp"))
    with TestClient(build_app(data_dir), raise_server_exceptions=False) as client:
        yield client, data_dir
    shutil.rmtree(data_dir, ignore_errors=True)


def _plant_volume(data_dir: Path, name: str, volume_id: str) -> None:
    # Straight into the store: a lookup does not care how the volume was made.
    store = Store(data_dir / "unik.db")
    try:
        volume = Volume(Id=volume_id, Name=name, SizeMb=1, Attachment="", Infrastructure="QEMU", Created=now_rfc3339())
        store.volumes.insert(Record(volume, volume_meta()))
    finally:
        store.close()


@given(name=names)
@settings(max_examples=150, deadline=None, database=None, derandomize=True)
def test_creating_with_a_name_is_400_exactly_when_the_name_is_invalid(
    lookup_api: tuple[TestClient, Path], name: str
) -> None:
    api, _ = lookup_api
    # An empty volume of 0 MB is a 400 for a valid name too, but with a message about the size.
    response = api.post(f"/volumes/{name}?size=0", content=b"null")
    if name in ("", ".", ".."):
        # Not a name in a URL at all: the path is a different route (or none).
        return
    message = response.json()["message"]
    assert response.status_code == 400
    assert ("name" in message) == (not is_valid_name(name)), message


@given(name=valid_names, prefix_len=st.integers(min_value=1, max_value=31))
@settings(
    max_examples=40,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_lookup_by_name_id_and_prefix(lookup_api: tuple[TestClient, Path], name: str, prefix_len: int) -> None:
    api, data_dir = lookup_api
    for volume in api.get("/volumes").json():
        api.delete(f"/volumes/{volume['Id']}")
    shared = uuid.uuid4().hex[:prefix_len]
    # Two ids sharing a prefix; the name never equals either id or the prefix.
    first_id = shared + uuid.uuid4().hex[prefix_len:]
    second_id = shared + uuid.uuid4().hex[prefix_len:]
    hypothesis.assume(first_id[: prefix_len + 1] != second_id[: prefix_len + 1])
    hypothesis.assume(name not in (first_id, second_id) and not first_id.startswith(name))
    hypothesis.assume(not second_id.startswith(name))
    _plant_volume(data_dir, name, first_id)
    _plant_volume(data_dir, "other-" + uuid.uuid4().hex[:8], second_id)

    for ref in (name, first_id, first_id[: prefix_len + 1]):
        found = api.get(f"/volumes/{ref}")
        assert found.status_code == 200, (ref, found.text)
        assert found.json()["Id"] == first_id
    ambiguous = api.get(f"/volumes/{shared}")
    if shared == name:
        assert ambiguous.json()["Id"] == first_id  # an exact name wins over any prefix
    else:
        assert ambiguous.status_code == 409
        assert "ambiguous" in ambiguous.json()["message"]
    # A prefix is of an id, never of a name, and never a substring.
    assert api.get(f"/volumes/{first_id[1:]}").status_code == 404
    if len(name) > 1 and name[:-1] not in (first_id[: len(name) - 1], second_id[: len(name) - 1]):
        assert api.get(f"/volumes/{name[:-1]}").status_code == 404
