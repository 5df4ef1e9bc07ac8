"""The content-addressed build cache: unchanged inputs reuse the image files, anything else rebuilds.

Whether a build was served from the cache is read from the image record's metadata
`build_cache` field ("hit", "miss", "off") and the daemon's log line, never from timing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import requires_vm, services_of, tar_gz
from unik.build_cache import BuildCache, CachedBuild
from unik.models import Artifact

pytestmark = requires_vm  # a build needs the kernel (its digest is part of every key)

BUILD = "base=linux&lang=c&provider=qemu"
HELLO = {"hello.c": '#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n'}


def build(api: TestClient, name: str, tgz: bytes, extra: str = "") -> dict[str, object]:
    response = api.post(
        f"/images/{name}/create?{BUILD}&force=true{extra}", files={"tarfile": ("app.tar.gz", tgz, "application/gzip")}
    )
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


def digest_of(api: TestClient, name: str) -> str:
    return services_of(api).ctx.store.images.find(name).meta.digest


def cache_state(api: TestClient, name: str) -> str:
    return str(services_of(api).ctx.store.images.find(name).meta.build_cache)


def entries(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "cache" / "images").iterdir() if not p.name.startswith(".")]


def test_unchanged_rebuild_reuses_the_files(api: TestClient, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = build(api, "app", tar_gz(HELLO))
    assert cache_state(api, "app") == "miss"
    digest = digest_of(api, "app")
    with caplog.at_level(logging.INFO, logger="unik.services.builds"):
        second = build(api, "app", tar_gz(HELLO))
    assert cache_state(api, "app") == "hit"
    assert any("build cache hit for image app" in r.getMessage() for r in caplog.records)
    assert second["Id"] != first["Id"]
    assert digest_of(api, "app") == digest
    [entry] = entries(data_dir)
    initrd = data_dir / "images" / str(second["Id"]) / "initrd"
    assert initrd.stat().st_ino == (entry / "initrd").stat().st_ino  # a hard link, not a copy
    assert not (data_dir / "images" / str(first["Id"])).exists()  # force replaced the old image
    # The reused image is a complete one: same size, same default memory.
    assert second["SizeMb"] == first["SizeMb"]
    assert second["RunSpec"] == first["RunSpec"]


@pytest.mark.parametrize(
    ("files", "extra"),
    [
        ({"hello.c": HELLO["hello.c"].replace("hi", "hello")}, ""),
        (HELLO, "&args=one+two"),
        (HELLO, "&mounts=/data"),
    ],
    ids=["source", "args", "mounts"],
)
def test_a_changed_input_rebuilds(api: TestClient, data_dir: Path, files: dict[str, str], extra: str) -> None:
    build(api, "app", tar_gz(HELLO))
    build(api, "app", tar_gz(files), extra)
    assert cache_state(api, "app") == "miss"
    assert len(entries(data_dir)) == 2


def test_a_corrupt_entry_is_ignored_and_rebuilt(api: TestClient, data_dir: Path) -> None:
    build(api, "app", tar_gz(HELLO))
    digest = digest_of(api, "app")
    [entry] = entries(data_dir)
    # A new file, not a write through the link: the image built first must stay intact.
    (entry / "initrd").unlink()
    (entry / "initrd").write_bytes(b"not an initrd")
    build(api, "app", tar_gz(HELLO))
    assert cache_state(api, "app") == "miss"
    assert digest_of(api, "app") == digest
    # The rebuild stored a good entry again, which the next build uses.
    build(api, "app", tar_gz(HELLO))
    assert cache_state(api, "app") == "hit"

    [entry] = entries(data_dir)
    (entry / "meta.json").write_text("{not json")
    build(api, "app", tar_gz(HELLO))
    assert cache_state(api, "app") == "miss"


def test_the_cache_survives_a_daemon_restart(data_dir: Path) -> None:
    from unik.daemon import build_app

    with TestClient(build_app(data_dir), raise_server_exceptions=False) as first:
        build(first, "app", tar_gz(HELLO))
        assert cache_state(first, "app") == "miss"
    with TestClient(build_app(data_dir), raise_server_exceptions=False) as second:
        build(second, "again", tar_gz(HELLO))
        assert cache_state(second, "again") == "hit"


def test_the_cache_is_bounded(api: TestClient, data_dir: Path) -> None:
    services_of(api).builds.cache.max_entries = 2
    for n in range(4):
        build(api, "app", tar_gz(HELLO), f"&args=round{n}")
    assert len(entries(data_dir)) == 2
    # The most recent stay: the last build's inputs still hit, the first's were evicted.
    build(api, "app", tar_gz(HELLO), "&args=round3")
    assert cache_state(api, "app") == "hit"
    build(api, "app", tar_gz(HELLO), "&args=round0")
    assert cache_state(api, "app") == "miss"


@pytest.fixture
def networked_api(data_dir: Path) -> Iterator[TestClient]:
    from unik.daemon import build_app

    (data_dir / "daemon-config.yaml").write_text("build_network: true\n")
    with TestClient(build_app(data_dir), raise_server_exceptions=False) as client:
        yield client


def test_networked_builds_are_not_cached(networked_api: TestClient, data_dir: Path) -> None:
    build(networked_api, "app", tar_gz(HELLO))
    build(networked_api, "app", tar_gz(HELLO))
    assert cache_state(networked_api, "app") == "off"
    assert entries(data_dir) == []


def test_eviction_by_bytes_counts_only_what_the_cache_alone_holds(tmp_path: Path) -> None:
    cache = BuildCache(tmp_path / "cache", max_entries=10, max_bytes=2500)
    for n in range(3):
        staging = tmp_path / f"staging{n}"
        staging.mkdir()
        (staging / "kernel").write_bytes(b"k" * 1000)
        (staging / "initrd").write_bytes(b"i" * 1000)
        built = CachedBuild(artifact=Artifact(), digest="d", size=2000, memory_mb=0, kernel_version="v")
        cache.store(f"key{n}", staging, built)
    # Every file is still linked from its staging folder: the cache holds no bytes of its own.
    assert len(cache.entries()) == 3
    for n in range(3):
        for name in ("kernel", "initrd"):
            (tmp_path / f"staging{n}" / name).unlink()
    cache.evict()
    assert [e.name for e in cache.entries()] == ["key2"]
    assert json.loads((tmp_path / "cache" / "key2" / "meta.json").read_text())["size"] == 2000
