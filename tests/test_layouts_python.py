"""Python projects laid out for the original UniK: packages from `pip install --prefix=<project>`
in lib/python3.X/site-packages/ and bin/, importable in the guest with their stdlib imports."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Daemon, requires_vm, serve_probe_routes, tar_gz
from unik.client import UnikClient
from unik.compilers import CompilerRegistry
from unik.compilers.linux_python import prefix_folders

PREFIX = Path(__file__).parent / "fixtures" / "layouts" / "python-prefix"
SITE = "/unik/app/lib/python3.7/site-packages"
needs_python = pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no /usr/bin/python3")


def project_tar_gz(folder: Path) -> bytes:
    """The whole tree (conftest's folder_tar_gz takes only the top-level files)."""
    files = {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }
    return tar_gz(files)


def read_newc(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """The entries of an uncompressed newc initrd: path -> (mode, data; a link's target)."""
    entries: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while True:
        assert archive[offset : offset + 6] == b"070701", f"no newc header at {offset}"
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name = archive[offset + 110 : offset + 110 + name_size - 1].decode()
        offset += 110 + name_size
        offset += -offset % 4
        if name == "TRAILER!!!":
            return entries
        entries["/" + name] = (mode, archive[offset : offset + size])
        offset += size + (-size % 4)


def unpack(entries: dict[str, tuple[int, bytes]], root: Path) -> None:
    for name, (mode, data) in entries.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if stat.S_ISDIR(mode):
            path.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(mode):
            path.symlink_to(data.decode())
        elif stat.S_ISREG(mode):
            path.write_bytes(data)
            path.chmod(stat.S_IMODE(mode))


def test_prefix_folders_are_the_site_packages_then_bin(tmp_path: Path) -> None:
    assert prefix_folders(PREFIX) == ["lib/python3.7/site-packages", "bin"]
    (tmp_path / "lib" / "python3.12" / "site-packages").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "lib" / "python3.5").symlink_to(tmp_path / "elsewhere")  # a link is never followed out
    (tmp_path / "elsewhere" / "site-packages").mkdir()
    (tmp_path / "bin").write_text("a file, not the scripts folder\n")
    assert prefix_folders(tmp_path) == ["lib/python3.12/site-packages"]


@needs_python
def test_a_pip_prefix_project_packs_its_packages_and_their_stdlib(
    api: TestClient, data_dir: Path, tmp_path: Path
) -> None:
    response = api.post(
        "/images/python-prefix/create?base=linux&lang=python&provider=qemu",
        files={"tarfile": ("app.tar.gz", project_tar_gz(PREFIX), "application/gzip")},
    )
    assert response.status_code == 201, response.text
    entries = read_newc((data_dir / "images" / response.json()["Id"] / "initrd").read_bytes())
    env = dict(word.split("=", 1) for word in entries["/unik/env"][1].decode().split("\0") if word)
    assert env["PYTHONPATH"] == f"{SITE}:/unik/app/bin"
    packages = {f"{SITE}/pongkit/__init__.py", f"{SITE}/pongkit/words.py", f"{SITE}/pongkit-1.0.dist-info/METADATA"}
    assert packages <= set(entries)
    assert any(name.startswith(f"{SITE}/pongkit/__pycache__/words.cpython-") for name in entries)
    assert any(name.startswith("/unik/app/bin/__pycache__/greet.cpython-") for name in entries)
    stdlib = env["PYTHONHOME"] + "/lib/python3.11"
    # Imported only by the package (shlex) and by the bin/ module (platform): found all the same.
    assert {f"{stdlib}/shlex.pyc", f"{stdlib}/platform.pyc", f"{stdlib}/http/server.pyc"} <= set(entries)

    # The image's own stdlib and PYTHONPATH, run on the host: nothing the app imports is missing.
    root = tmp_path / "root"
    unpack(entries, root)
    python = entries["/unik/entrypoint"][1].decode().split("\0")[0]
    app_path = [str(root / p.lstrip("/")) for p in ["/unik/app", *env["PYTHONPATH"].split(":")]]
    done = subprocess.run(
        [str(root / python.lstrip("/")), "-s", "-c", "import main; print(main.pongkit.command_line(['a b']))"],
        env={"PYTHONHOME": str(root / env["PYTHONHOME"].lstrip("/")), "PYTHONPATH": ":".join(app_path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "started as 'a b'\n"


# -- in a VM --------------------------------------------------------------------------------------

BOOT_TIMEOUT = 90.0  # CPython to "listening" under TCG on a busy 2-core host


@pytest.mark.vm
@requires_vm
def test_a_pip_prefix_project_answers_in_a_vm(client: UnikClient, daemon: Daemon, tmp_path: Path) -> None:
    if "linux-python-qemu" not in CompilerRegistry(["qemu"]).available():
        pytest.skip("no python toolchain on this host")
    client.images.build("python-prefix", PREFIX, "linux", "python", "qemu", mounts=["/data"])
    logs = serve_probe_routes(client, "python-prefix", tmp_path, BOOT_TIMEOUT)
    assert "started as /unik/app/main.py" in logs  # pongkit's shlex, in the guest
