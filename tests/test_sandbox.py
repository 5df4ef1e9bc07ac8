"""Builds run the user's toolchain inside bubblewrap: the host read-only, the data dir hidden."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import tar_gz
from unik.compilers.base import sandbox_available

pytestmark = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap cannot create namespaces here")

MAIN_C = "int main(void) { return 0; }\n"


def makefile(*recipe: str) -> str:
    return "app: main.c\n" + "".join(f"\t{line}\n" for line in recipe) + "\tmusl-gcc -static -o app main.c\n"


def build(api: TestClient, name: str, files: dict[str, str]) -> object:
    return api.post(
        f"/images/{name}/create?base=linux&lang=c&provider=qemu",
        files={"tarfile": ("app.tar.gz", tar_gz(files), "application/gzip")},
    )


def test_a_build_sees_nothing_of_the_daemon_and_writes_nowhere_else(api: TestClient, data_dir: Path) -> None:
    canary = data_dir.parent / f"{data_dir.name}-canary"
    recipe = makefile(
        f"test ! -e {data_dir}/unik.db",  # the daemon's state is hidden
        f"test ! -e {data_dir}/images",  # so are other images
        f"touch {canary} 2>/dev/null || true",  # /tmp is the build's own, thrown away
        "! touch /etc/unik-escape 2>/dev/null",  # the host is read-only
        "touch $$PWD/written-in-own-folder",  # its own folder is writable
    )
    response = build(api, "sandboxed", {"main.c": MAIN_C, "Makefile": recipe})
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    assert not canary.exists()
    assert not Path("/etc/unik-escape").exists()


def test_a_build_that_pokes_at_the_daemon_fails_with_its_own_words(api: TestClient, data_dir: Path) -> None:
    recipe = makefile(f"cat {data_dir}/unik.db")
    response = build(api, "nosy", {"main.c": MAIN_C, "Makefile": recipe})
    assert response.status_code == 400  # type: ignore[attr-defined]
    assert "No such file or directory" in response.json()["message"]  # type: ignore[attr-defined]
    assert api.get("/images").json() == []


@pytest.mark.parametrize(
    "plant",
    [
        "mkdir -p ../build/root/unik && ln -s {escape} ../build/root/unik/app",  # the program's place
        "rm -rf ../build && ln -s {outside} ../build",  # the whole output folder
    ],
    ids=["file", "folder"],
)
def test_a_build_cannot_have_the_daemon_write_through_a_planted_link(
    api: TestClient, data_dir: Path, plant: str
) -> None:
    """The build folder is writable inside the sandbox; the daemon writes there after, outside it."""
    escape = data_dir.parent / f"{data_dir.name}-escape"
    outside = data_dir.parent / f"{data_dir.name}-outside"
    outside.mkdir()
    recipe = makefile(plant.format(escape=escape, outside=outside))
    response = build(api, "planted", {"main.c": MAIN_C, "Makefile": recipe})
    assert response.status_code == 400, response.text  # type: ignore[attr-defined]
    assert "the build" in response.json()["message"]  # type: ignore[attr-defined]
    assert not escape.exists()
    assert list(outside.iterdir()) == []
    assert api.get("/images").json() == []
