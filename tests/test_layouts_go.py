"""Go projects from before modules (no go.mod): built in GOPATH mode, as the original UniK built them."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Daemon, requires_vm, serve_probe_routes
from unik.client import UnikClient
from unik.compilers import AppBundle, BuildSettings, elf
from unik.compilers.linux_go import DEFAULT_IMPORT_PATH, LinuxGoCompiler, find_import_path
from unik.errors import BadRequest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "layouts" / "go-gopath"
needs_go = pytest.mark.skipif(shutil.which("go") is None, reason="go not installed")
# Boot to "listening" under TCG on a busy 2-core host (as tests/test_languages_vm.py allows Go).
BOOT_TIMEOUT = 60.0


def tree_tar_gz(folder: Path) -> bytes:
    """The whole folder, sub-folders too (conftest's folder_tar_gz packs only the top files)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return buffer.getvalue()


def build(settings: BuildSettings, project: Path, work: Path) -> AppBundle:
    return asyncio.run(LinuxGoCompiler("qemu", settings).compile(project, work, timeout=300))


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> BuildSettings:
    # One Go build cache for the module: the standard library is compiled once.
    return BuildSettings(cache_dir=tmp_path_factory.mktemp("cache"))


# -- the import path ---------------------------------------------------------------------------


def test_the_import_path_comes_from_godeps_then_manifest_then_the_default(tmp_path: Path) -> None:
    assert find_import_path(tmp_path) == DEFAULT_IMPORT_PATH
    write(tmp_path, {"manifest.yaml": "import_path: example.org/team/app\n"})
    assert find_import_path(tmp_path) == "example.org/team/app"
    write(tmp_path, {"Godeps/Godeps.json": '{"ImportPath": "github.com/org/repo", "Deps": []}'})
    assert find_import_path(tmp_path) == "github.com/org/repo"
    assert find_import_path(FIXTURE) == "github.com/example/gohello"


@pytest.mark.parametrize("path", ["../../etc", "/abs/path", "github.com/org/../x", "a//b", "a/.hidden", "a b"])
def test_an_import_path_that_could_leave_the_gopath_is_refused(tmp_path: Path, path: str) -> None:
    write(tmp_path, {"manifest.yaml": f"import_path: {path!r}\n"})
    with pytest.raises(BadRequest, match="not a Go import path"):
        find_import_path(tmp_path)


def test_manifest_keys_are_checked(tmp_path: Path) -> None:
    write(tmp_path, {"manifest.yaml": "main_file: x.go\n"})
    with pytest.raises(BadRequest, match="unknown key"):
        find_import_path(tmp_path)


def test_gopath_mode_is_offline_and_adds_the_godep_workspace(tmp_path: Path) -> None:
    compiler = LinuxGoCompiler("qemu", BuildSettings(cache_dir=tmp_path / "cache"))
    env = compiler.gopath_env(tmp_path, tmp_path / "gopath")
    assert env["GO111MODULE"] == "off" and env["GOFLAGS"] == "" and env["CGO_ENABLED"] == "0"
    assert env["GOPATH"] == str(tmp_path / "gopath")
    (tmp_path / "Godeps" / "_workspace" / "src").mkdir(parents=True)
    env = compiler.gopath_env(tmp_path, tmp_path / "gopath")
    assert env["GOPATH"] == f"{tmp_path / 'gopath'}:{tmp_path / 'Godeps' / '_workspace'}"


@pytest.mark.parametrize("network", [False, True])
def test_go_get_fetches_missing_packages_only_when_the_network_is_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, network: bool
) -> None:
    commands: list[list[str]] = []

    async def fake_run_tool(argv: list[str], *, cwd: Path, timeout: float, env: dict[str, str]) -> str:
        commands.append(argv)
        if argv[1] == "build":
            raise BadRequest("stopped before the binary is read")
        return ""

    monkeypatch.setattr("unik.compilers.linux_go.run_tool", fake_run_tool)
    project = write(tmp_path / "src", {"manifest.yaml": "import_path: example.org/x\n", "main.go": "package main\n"})
    with pytest.raises(BadRequest, match="stopped"):
        build(BuildSettings(network=network, cache_dir=tmp_path / "cache"), project, tmp_path / "build")
    fetch = [["go", "get", "-d", "example.org/x"]] if network else []
    assert commands[:-1] == fetch and commands[-1][-1] == "example.org/x"
    assert (tmp_path / "build" / "gopath" / "src" / "example.org" / "x").resolve() == project.resolve()


# -- real builds -------------------------------------------------------------------------------


@needs_go
def test_the_fixture_builds_one_static_binary(settings: BuildSettings, tmp_path: Path) -> None:
    project = tmp_path / "src"
    shutil.copytree(FIXTURE, project)
    bundle = build(settings, project, tmp_path / "build")
    assert bundle.entrypoint == ["/unik/app"]
    assert elf.read_elf(bundle.root / "unik/app").is_static
    # GOPATH mode leaves the project as it was: no go.mod written into it.
    assert not (project / "go.mod").exists()


@needs_go
def test_the_old_godep_workspace_and_sub_packages_by_import_path(settings: BuildSettings, tmp_path: Path) -> None:
    project = write(
        tmp_path / "src",
        {
            "Godeps/Godeps.json": '{"ImportPath": "example.org/old/tool"}',
            "Godeps/_workspace/src/example.org/dep/dep.go": 'package dep\n\nfunc Word() string { return "ws" }\n',
            "util/util.go": 'package util\n\nimport "example.org/dep"\n\nfunc Say() string { return dep.Word() }\n',
            "main.go": 'package main\n\nimport "example.org/old/tool/util"\n\nfunc main() { println(util.Say()) }\n',
        },
    )
    bundle = build(settings, project, tmp_path / "build")
    done = subprocess.run([str(bundle.root / "unik/app")], capture_output=True, text=True, check=True)
    assert done.stderr.strip() == "ws"


@needs_go
def test_a_missing_package_is_named_and_never_fetched_offline(settings: BuildSettings, tmp_path: Path) -> None:
    project = write(
        tmp_path / "src",
        {
            "manifest.yaml": "import_path: github.com/example/lonely\n",
            "main.go": 'package main\n\nimport "github.com/nobody/nowhere"\n\nfunc main() { nowhere.Do() }\n',
        },
    )
    with pytest.raises(BadRequest, match=r"cannot find package \"github\.com/nobody/nowhere\""):
        build(settings, project, tmp_path / "build")


@needs_go
@requires_vm  # a build needs the kernel (its digest is part of the build cache key)
def test_the_fixture_builds_through_the_api(api: TestClient) -> None:
    response = api.post(
        "/images/gopath/create?base=linux&lang=go&provider=qemu",
        files={"tarfile": ("app.tar.gz", tree_tar_gz(FIXTURE), "application/gzip")},
    )
    assert response.status_code == 201, response.text
    assert response.json()["RunSpec"]["Compiler"] == "linux-go-qemu"
    guide = api.get("/describe_compiler", params={"provider": "qemu", "base": "linux", "lang": "go"}).text
    assert "GOPATH" in guide and "Godeps/Godeps.json" in guide and "import_path" in guide


# -- in a VM -----------------------------------------------------------------------------------


@needs_go
@pytest.mark.vm
@requires_vm
def test_the_gopath_fixture_answers_in_a_vm(client: UnikClient, daemon: Daemon, tmp_path: Path) -> None:
    image = client.images.build("gopath", FIXTURE, "linux", "go", "qemu", mounts=["/data"])
    assert image.RunSpec.Compiler == "linux-go-qemu"
    logs = serve_probe_routes(client, "gopath", tmp_path, BOOT_TIMEOUT)
    assert "hello from go-gopath (vendored greeting)" in logs
