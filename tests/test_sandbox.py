"""Builds run the user's toolchain inside bubblewrap: the host read-only, the data dir hidden."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import tar_gz
from unik.compilers import base as compilers_base
from unik.compilers import linux_go
from unik.compilers.base import Sandbox, build_sandbox, sandbox_available
from unik.compilers.linux_python import LinuxPythonCompiler

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


def test_a_build_reads_no_host_secret(api: TestClient) -> None:
    """The host is visible read-only, but not its secrets: a C file that includes /etc/shadow
    compiles against an empty file instead of having the compiler quote it back."""
    assert Path("/etc/shadow").stat().st_size > 0
    response = build(api, "include-shadow", {"main.c": '#include "/etc/shadow"\n' + MAIN_C})
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    recipe = makefile("test ! -s /etc/shadow", "test -z \"$$(ls -A /root/.ssh 2>/dev/null)\"")
    response = build(api, "read-shadow", {"main.c": MAIN_C, "Makefile": recipe})
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]


def test_a_build_reads_neither_the_daemons_config_nor_its_tls_key(data_dir: Path) -> None:
    """The config file (it may hold the API token) and the TLS key, kept outside the data dir:
    not there for a build, and read as empty where their folder is visible to builds (here:
    named as a toolchain's)."""
    from unik.daemon import build_app

    elsewhere = Path(tempfile.mkdtemp(prefix="unik-etc-", dir="/tmp"))
    try:
        key, config, public = elsewhere / "tls.key", elsewhere / "daemon-config.yaml", elsewhere / "public"
        key.write_text("PRIVATE KEY\n")
        config.write_text(f"build_timeout: 300  # not for builds to read\ntls_keyfile: {key}\n")
        public.write_text("visible\n")
        recipe = makefile(f"test ! -e {config}", f"test ! -e {key}")
        with TestClient(build_app(data_dir, config), raise_server_exceptions=False) as api:
            response = build(api, "no-config", {"main.c": MAIN_C, "Makefile": recipe})
        assert response.status_code == 201, response.text  # type: ignore[attr-defined]
        assert config.read_text().startswith("build_timeout")

        work = data_dir / "work"
        sandbox = Sandbox(data_dir, (work,), private=(config, key), toolchains=(elsewhere,))
        check = f"test -s {public} && test -e {key} && test ! -s {key} && test ! -s {config}"
        assert subprocess.run(sandbox.wrap(["sh", "-c", check], work)).returncode == 0
    finally:
        shutil.rmtree(elsewhere)


def test_a_build_sees_the_system_and_the_toolchains_not_the_rest_of_the_host(api: TestClient) -> None:
    """Of the host, a build sees /usr, /etc, /opt and the toolchain managers' folders: not the
    homes' other files, nor /var, /srv or /run (the host's service sockets)."""
    recipe = makefile(
        "test -x /usr/bin/musl-gcc",
        "test ! -e /run && test ! -e /srv && test ! -e /var/lib",
        "test -z \"$$(ls -A /root | grep -v -x -e .cargo -e .rustup -e .pyenv)\"",
        "! touch /unik-escape 2>/dev/null",
    )
    response = build(api, "host-view", {"main.c": MAIN_C, "Makefile": recipe})
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]


def test_a_build_gets_none_of_the_daemons_secret_environment(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIK_AUTH_TOKEN", "s3cret-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-key")
    recipe = makefile("env | grep -q s3cret && exit 1 || true", 'test -n "$$PATH"')
    response = build(api, "env-secrets", {"main.c": MAIN_C, "Makefile": recipe})
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]


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


# -- links a build plants for the daemon to write through ---------------------------------------
#
# The build's folder is writable inside the sandbox; the daemon assembles the image tree there
# afterwards, as root and outside it. The links below point at `outside` (and `escape`, a file
# that must never appear): inside the sandbox /tmp is a fresh tmpfs, so only the daemon would
# ever find what they point to.


def build_lang(api: TestClient, lang: str, files: dict[str, str]) -> object:
    return api.post(
        f"/images/planted-{lang}/create?base=linux&lang={lang}&provider=qemu",
        files={"tarfile": ("app.tar.gz", tar_gz(files), "application/gzip")},
    )


def assert_refused_and_nothing_outside(api: TestClient, response: object, outside: Path, escape: Path) -> None:
    assert response.status_code == 400, response.text  # type: ignore[attr-defined]
    assert not escape.exists() and not escape.is_symlink()
    assert list(outside.iterdir()) == []
    assert api.get("/images").json() == []


@pytest.mark.skipif(shutil.which("go") is None, reason="go not installed")
@pytest.mark.parametrize(
    "plant",
    [
        # The program's place in the image tree, made before the daemon makes the tree.
        "mkdir -p ../build/root/unik && ln -s {escape} ../build/root/unik/app",
        # The image tree itself.
        "ln -s {outside} ../build/root",
        # The whole output folder, with the program the daemon would read in it.
        "mv ../build ../build.old && ln -s {outside} ../build",
    ],
    ids=["program", "tree", "folder"],
)
def test_a_go_build_cannot_have_the_daemon_write_through_a_planted_link(
    api: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plant: str
) -> None:
    """`go build` runs none of the user's code, but a build step that does (a poisoned toolchain
    cache, cgo one day) must not matter: the plant runs right after it, in the same sandbox."""
    outside, escape = tmp_path / "outside", tmp_path / "escape"
    outside.mkdir()
    real_run_tool = linux_go.run_tool

    async def go_then_plant(argv: list[str], *, cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
        out = await real_run_tool(argv, cwd=cwd, timeout=timeout, env=env)
        await real_run_tool(["sh", "-c", plant.format(outside=outside, escape=escape)], cwd=cwd, timeout=timeout)
        return out

    monkeypatch.setattr(linux_go, "run_tool", go_then_plant)
    response = build_lang(api, "go", {"main.go": "package main\n\nfunc main() {}\n"})
    assert_refused_and_nothing_outside(api, response, outside, escape)
    assert "the build" in response.json()["message"]  # type: ignore[attr-defined]


# A package whose build backend (run by pip, in the sandbox: the user's own code) plants links
# in the build's folder (unless PLANT is "nothing"), then builds a wheel as if nothing happened.
HOSTILE_BACKEND = """\
import base64, hashlib, os, pathlib, zipfile

BUILD = pathlib.Path(__file__).resolve().parents[2] / "build"
PLANT, TARGET = {plant!r}, {target!r}


def plant():
    if PLANT == "nothing":
        return
    if PLANT == "tree":
        # The image tree's folder, or what will become it.
        BUILD.mkdir(exist_ok=True)
        os.symlink(TARGET, BUILD / "root")
    else:
        # Where the daemon puts the program's loader, in every folder pip's output goes to
        # (the image tree, or whatever the daemon makes it from).
        for folder in BUILD.iterdir():
            if folder.is_dir() and not folder.is_symlink() and not (folder / "lib64").is_symlink():
                os.symlink(TARGET, folder / "lib64")


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    if not (BUILD / "root").is_symlink():
        plant()
    name = "planter-1.0-py3-none-any.whl"
    files = {{"planter/__init__.py": b"", "planter-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\\nName: planter\\n"
             b"Version: 1.0\\n", "planter-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\n"
             b"Tag: py3-none-any\\n"}}
    record = "".join(
        f"{{path}},sha256={{base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()}},{{len(data)}}\\n"
        for path, data in files.items()
    ) + "planter-1.0.dist-info/RECORD,,\\n"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
        wheel.writestr("planter-1.0.dist-info/RECORD", record)
    return name
"""

PLANTER_PYPROJECT = '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'


def python_project(backend: str) -> dict[str, str]:
    return {
        "main.py": "import planter\nprint('hi')\n",
        "requirements.txt": "./planter\n",
        "planter/pyproject.toml": PLANTER_PYPROJECT,
        "planter/backend.py": backend,
    }


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no /usr/bin/python3")
@pytest.mark.parametrize("plant", ["tree", "component"])
def test_a_python_package_build_cannot_have_the_daemon_write_through_a_planted_link(
    api: TestClient, tmp_path: Path, plant: str
) -> None:
    outside, escape = tmp_path / "outside", tmp_path / "escape"
    outside.mkdir()
    backend = HOSTILE_BACKEND.format(plant=plant, target=str(outside))
    response = build_lang(api, "python", python_project(backend))
    assert_refused_and_nothing_outside(api, response, outside, escape)


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no /usr/bin/python3")
def test_a_sandboxed_python_build_still_packs_its_packages_and_keeps_the_users_links(
    tmp_path: Path, data_dir: Path
) -> None:
    """The steps that run the user's code (pip) now write to a staging tree, in the sandbox."""
    work = tmp_path / "build-1"
    files = {**python_project(HOSTILE_BACKEND.format(plant="nothing", target="")), "static/v1/a.txt": "a\n"}
    for name, text in files.items():
        (work / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (work / "src" / name).write_text(text)
    # The user's own links (the upload may hold links inside itself): kept as links in the image.
    (work / "src" / "static" / "current").symlink_to("v1")
    (work / "src" / "latest.txt").symlink_to("static/v1/a.txt")
    token = build_sandbox.set(Sandbox(data_dir, (work,)))
    try:
        bundle = asyncio.run(LinuxPythonCompiler("qemu").compile(work / "src", work / "build", timeout=300))
    finally:
        build_sandbox.reset(token)
    app = bundle.root / "unik" / "app"
    assert os.readlink(app / "latest.txt") == "static/v1/a.txt"
    assert os.readlink(app / "static" / "current") == "v1"
    assert (bundle.root / "unik/site-packages/planter/__init__.py").is_file()
    done = subprocess.run(
        [str(bundle.root / bundle.entrypoint[0].lstrip("/")), "-c", "import planter; print('ok')"],
        env={"PYTHONHOME": str(bundle.root / "usr"), "PYTHONPATH": str(bundle.root / "unik/site-packages")},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_build_with_the_network_finds_a_resolv_conf_that_links_out_of_its_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd-resolved's /etc/resolv.conf is a link into /run, which builds do not see: with
    `build_network` its target is bound, so a build that fetches packages can resolve names."""
    resolver = Path(tempfile.mkdtemp(prefix="resolved-", dir="/tmp"))  # /tmp: a fresh tmpfs in builds
    try:
        (resolver / "stub-resolv.conf").write_text("nameserver 127.0.0.53\n")
        link = tmp_path / "resolv.conf"
        link.symlink_to(resolver / "stub-resolv.conf")
        monkeypatch.setattr(compilers_base, "RESOLV_CONF", link)
        work = tmp_path / "data" / "work"
        work.mkdir(parents=True)
        read = ["cat", str(resolver / "stub-resolv.conf")]
        for network, expected in ((True, "nameserver 127.0.0.53\n"), (False, "")):
            sandbox = Sandbox(hidden=tmp_path / "data", writable=(work,), network=network)
            run = subprocess.run(sandbox.wrap(read, work), capture_output=True, text=True)
            assert run.stdout == expected, run.stderr
    finally:
        shutil.rmtree(resolver)
