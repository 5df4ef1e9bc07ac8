"""Projects laid out for the original UniK: a C Makefile naming its program (`binary_name:`), and
`build_command:` in manifest.yaml (Java first) run in the build sandbox before packaging."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import EXAMPLES, Daemon, requires_vm, serve_probe_routes, tar_gz
from unik.client import UnikClient
from unik.compilers import AppBundle, BuildSettings, CompilerRegistry, elf
from unik.compilers.base import sandbox_available
from unik.compilers.linux_c import LinuxCCompiler
from unik.compilers.linux_java import LinuxJavaCompiler
from unik.compilers.linux_nodejs import LinuxNodejsCompiler
from unik.errors import BadRequest

LAYOUTS = Path(__file__).parent / "fixtures" / "layouts"
AVAILABLE = set(CompilerRegistry(["qemu"]).available())
needs_c = pytest.mark.skipif("linux-c-qemu" not in AVAILABLE, reason="musl-gcc not installed")
needs_java = pytest.mark.skipif("linux-java-qemu" not in AVAILABLE, reason="no JDK with jlink")
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None, reason="no gcc/make")
needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap cannot create namespaces here")
# The in-process app, started with the daemon config given.
MakeApi = Callable[[str], TestClient]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> BuildSettings:
    # One cache for the module: the jlink runtime is made once.
    return BuildSettings(cache_dir=tmp_path_factory.mktemp("cache"))


# The c-makefile layout builds examples/c-http's server: its source comes from there.
SHARED_SOURCES = {"c-makefile": {"src/http.c": EXAMPLES / "c-http" / "http.c"}}


def layout(name: str, tmp_path: Path) -> Path:
    """A copy of a fixture project (builds write into their project folder), with the example
    sources it shares."""
    project = Path(shutil.copytree(LAYOUTS / name, tmp_path / "src"))
    for relative, source in SHARED_SOURCES.get(name, {}).items():
        shutil.copyfile(source, project / relative)
    return project


def folder_tgz(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(folder).as_posix())
    return buffer.getvalue()


def post_build(api: TestClient, name: str, lang: str, upload: bytes) -> httpx.Response:
    return api.post(
        f"/images/{name}/create?base=linux&lang={lang}&provider=qemu",
        files={"tarfile": ("app.tar.gz", upload, "application/gzip")},
    )


def build(compiler: LinuxCCompiler | LinuxJavaCompiler | LinuxNodejsCompiler, project: Path, work: Path) -> AppBundle:
    return asyncio.run(compiler.compile(project, work, timeout=300))


@pytest.fixture
def configured_api(data_dir: Path) -> Iterator[MakeApi]:
    """The in-process app with a daemon config of the test's own (build_app reads it at start)."""
    from unik.daemon import build_app

    clients: list[TestClient] = []

    def make(config: str) -> TestClient:
        (data_dir / "daemon-config.yaml").write_text(config)
        client = TestClient(build_app(data_dir), raise_server_exceptions=False)
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


# -- C: a Makefile with the default $(CC), the program named by binary_name -----------------------


@needs_c
def test_the_makefile_project_builds_through_the_api(api: TestClient, tmp_path: Path) -> None:
    started = time.monotonic()
    response = post_build(api, "c-makefile", "c", folder_tgz(layout("c-makefile", tmp_path)))
    assert response.status_code == 201, response.text
    print(f"c-makefile build: {time.monotonic() - started:.1f} s")


@needs_c
def test_the_makefile_program_is_static_and_the_one_binary_name_picks(tmp_path: Path) -> None:
    bundle = build(LinuxCCompiler("qemu"), layout("c-makefile", tmp_path), tmp_path / "build")
    app = bundle.root / "unik" / "app"
    assert bundle.entrypoint == ["/unik/app"] and bundle.env == {}
    assert elf.read_elf(app).is_static
    # The server (hello), not the other program the Makefile made (version).
    assert b"c-http: listening on port" in app.read_bytes()
    assert {p.name for p in bundle.root.rglob("*") if p.is_file()} == {"app"}


@needs_c
@needs_gcc
def test_a_makefile_calling_gcc_itself_brings_its_shared_libraries(tmp_path: Path) -> None:
    project = layout("c-makefile", tmp_path)
    (project / "Makefile").write_text("hello: src/http.c\n\tgcc -O2 -o hello src/http.c\n")
    bundle = build(LinuxCCompiler("qemu"), project, tmp_path / "build")
    info = elf.read_elf(bundle.root / "unik" / "app")
    assert info.interpreter == "/lib64/ld-linux-x86-64.so.2"
    names = {p.name for p in bundle.root.rglob("*") if p.is_file()}
    assert {"app", "libc.so.6", "ld-linux-x86-64.so.2"} <= names


@needs_c
def test_a_makefile_linking_dynamically_with_musl_brings_musls_loader(tmp_path: Path) -> None:
    project = layout("c-makefile", tmp_path)
    # CC is the Makefile's own (`override` beats the command line): musl, but dynamic.
    (project / "Makefile").write_text("override CC = musl-gcc\nhello: src/http.c\n\t$(CC) -o hello src/http.c\n")
    bundle = build(LinuxCCompiler("qemu"), project, tmp_path / "build")
    info = elf.read_elf(bundle.root / "unik" / "app")
    assert info.interpreter is not None and "ld-musl" in info.interpreter
    loader = bundle.root / info.interpreter.lstrip("/")
    assert loader.is_file() and not loader.is_symlink() and elf.is_elf(loader)


@needs_c
def test_binary_name_that_the_build_did_not_make_is_a_bad_request(tmp_path: Path) -> None:
    project = layout("c-makefile", tmp_path)
    (project / "manifest.yaml").write_text("binary_name: server\n")
    with pytest.raises(BadRequest, match=r"binary_name 'server' is not a file in the project"):
        build(LinuxCCompiler("qemu"), project, tmp_path / "build")


@needs_c
def test_a_c_build_command_replaces_make(api: TestClient) -> None:
    files = {
        "manifest.yaml": "build_command: mkdir -p out && $CC -O2 -o out/server main.c\nbinary_name: out/server\n",
        "main.c": "int main(void) { return 0; }\n",
        "Makefile": "all:\n\texit 1\n",  # never run: build_command stands for it
    }
    response = post_build(api, "c-command", "c", tar_gz(files))
    assert response.status_code == 201, response.text


# -- build_command: Java ------------------------------------------------------------------------


@needs_java
def test_the_java_build_command_project_builds_through_the_api(api: TestClient) -> None:
    started = time.monotonic()
    response = post_build(api, "java-build-command", "java", folder_tgz(LAYOUTS / "java-build-command"))
    assert response.status_code == 201, response.text
    print(f"java-build-command build: {time.monotonic() - started:.1f} s")


@needs_java
def test_the_jar_build_sh_made_is_the_program_with_its_runtime_args(settings: BuildSettings, tmp_path: Path) -> None:
    project = layout("java-build-command", tmp_path)
    bundle = build(LinuxJavaCompiler("qemu", settings), project, tmp_path / "build")
    assert (project / "target" / "app.jar").is_file()  # build.sh ran in the project folder
    jar = bundle.root / "unik" / "app" / "app.jar"
    assert jar.read_bytes() == (project / "target" / "app.jar").read_bytes()
    entry = bundle.entrypoint
    assert entry[-2:] == ["-jar", "/unik/app/app.jar"]
    assert entry[-4:-2] == ["-Xmx64m", "-Dfixture.name=java-build-command"]


@needs_java
def test_a_failing_build_command_is_a_400_carrying_its_last_lines(api: TestClient) -> None:
    script = (
        "i=0; while [ $i -lt 1000 ]; do echo noise line $i; i=$((i+1)); done; echo 'error: no pom here' >&2; exit 3"
    )
    files = {"manifest.yaml": f'build_command: "{script}"\nmain_file: target/app.jar\n'}
    response = post_build(api, "java-broken", "java", tar_gz(files))
    assert response.status_code == 400
    message = response.json()["message"]
    assert "build_command" in message and "exited with 3" in message
    assert "error: no pom here" in message and "noise line 999" in message
    assert "noise line 0\n" not in message  # the last lines, not the whole log
    assert api.get("/images").json() == []


@needs_java
@needs_sandbox
def test_a_build_command_reaching_for_the_network_fails_in_its_own_words(configured_api: MakeApi) -> None:
    # A listener on the host's loopback: the sandbox has a loopback of its own, so it is refused.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        fetch = f"python3 -c \\\"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=20)\\\""
        files = {"manifest.yaml": f'build_command: "{fetch}"\nmain_file: app.jar\n'}
        api = configured_api("build_sandbox: bwrap\n")
        response = post_build(api, "java-offline", "java", tar_gz(files))
    assert response.status_code == 400
    message = response.json()["message"]
    assert "ConnectionRefusedError" in message
    assert "no network" in message and "build_network" in message


@needs_java
@needs_sandbox
@pytest.mark.skipif(shutil.which("mvn") is None, reason="maven not installed")
def test_mvn_package_without_the_network_fails_saying_so(configured_api: MakeApi) -> None:
    pom = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>test</groupId><artifactId>x</artifactId><version>1</version>
  <properties><maven.compiler.release>17</maven.compiler.release></properties>
</project>
"""
    files = {
        "pom.xml": pom,
        "src/main/java/x/Main.java": "package x; public class Main { public static void main(String[] a) {} }\n",
        "manifest.yaml": "build_command: mvn -B package\nmain_file: target/x-1.jar\n",
    }
    # Sandboxed or refused (bwrap): the sandbox's network has nothing but its own loopback.
    api = configured_api("build_sandbox: bwrap\nbuild_timeout: 300\n")
    response = post_build(api, "java-mvn", "java", tar_gz(files))
    assert response.status_code == 400
    message = response.json()["message"]
    assert "BUILD FAILURE" in message and "Could not transfer artifact" in message, message
    assert "no network" in message


@needs_java
def test_a_build_command_that_never_ends_is_stopped_at_the_build_timeout(configured_api: MakeApi) -> None:
    api = configured_api("build_timeout: 2\n")
    files = {"manifest.yaml": "build_command: sleep 60\nmain_file: app.jar\n"}
    response = post_build(api, "java-slow", "java", tar_gz(files))
    assert response.status_code == 400
    assert "timed out after 2 s" in response.json()["message"]


@pytest.mark.skipif("linux-nodejs-qemu" not in AVAILABLE, reason="node not installed")
def test_a_nodejs_build_command_makes_the_main_file(settings: BuildSettings, tmp_path: Path) -> None:
    project = tmp_path / "src"
    (project / "src").mkdir(parents=True)
    (project / "src" / "server.js").write_text("console.log('hi');\n")
    (project / "manifest.yaml").write_text(
        "build_command: mkdir -p dist && cp src/server.js dist/server.js\nmain_file: dist/server.js\n"
    )
    bundle = build(LinuxNodejsCompiler("qemu", settings), project, tmp_path / "build")
    assert bundle.entrypoint[-1] == "/unik/app/dist/server.js"
    assert (bundle.root / "unik" / "app" / "dist" / "server.js").is_file()


@pytest.mark.skipif("linux-python-qemu" not in AVAILABLE, reason="no python")
def test_a_python_build_command_makes_the_main_file(api: TestClient) -> None:
    manifest = "build_command: mkdir -p gen && printf 'print(1)\\n' > gen/main.py\nmain_file: gen/main.py\n"
    files = {"manifest.yaml": manifest}
    response = post_build(api, "python-command", "python", tar_gz(files))
    assert response.status_code == 201, response.text


@pytest.mark.skipif("linux-go-qemu" not in AVAILABLE, reason="no go")
def test_a_go_build_command_runs_before_go_build(api: TestClient) -> None:
    files = {
        "go.mod": "module example.com/gen\n\ngo 1.19\n",
        # main.go alone does not build: the command writes the function it calls.
        "main.go": "package main\n\nfunc main() { greet() }\n",
        "manifest.yaml": "build_command: printf 'package main\\n\\nfunc greet() {}\\n' > greet.go\n",
    }
    response = post_build(api, "go-command", "go", tar_gz(files))
    assert response.status_code == 201, response.text


# -- manifest.yaml keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lang", "files"),
    [
        ("c", {"main.c": "int main(void){return 0;}\n", "manifest.yaml": "binary_name: app\nbuild: make\n"}),
        ("java", {"manifest.yaml": "build_command: sh build.sh\nbuild_cmd: mvn package\n"}),
    ],
)
def test_unknown_manifest_keys_are_still_rejected(api: TestClient, lang: str, files: dict[str, str]) -> None:
    if f"linux-{lang}-qemu" not in AVAILABLE:
        pytest.skip(f"no {lang} toolchain")
    response = post_build(api, f"{lang}-unknown", lang, tar_gz(files))
    assert response.status_code == 400
    message = response.json()["message"]
    assert "unknown key(s)" in message and "build_command" in message


@pytest.mark.parametrize("lang", ["c", "cpp", "java", "rust", "nodejs"])
def test_the_guides_describe_build_command(api: TestClient, lang: str) -> None:
    response = api.get("/describe_compiler", params={"provider": "qemu", "base": "linux", "lang": lang})
    assert response.status_code == 200
    assert "build_command:" in response.text
    if lang in ("c", "cpp"):
        assert "binary_name:" in response.text


# -- in a VM ------------------------------------------------------------------------------------

BOOT_TIMEOUT = {"c": 60.0, "java": 150.0}


@pytest.mark.vm
@requires_vm
@pytest.mark.parametrize(("fixture", "lang"), [("c-makefile", "c"), ("java-build-command", "java")])
def test_the_layout_serves_its_routes_in_a_vm(
    client: UnikClient, daemon: Daemon, tmp_path: Path, fixture: str, lang: str
) -> None:
    if f"linux-{lang}-qemu" not in AVAILABLE:
        pytest.skip(f"no {lang} toolchain on this host")
    started = time.monotonic()
    client.images.build(fixture, layout(fixture, tmp_path), "linux", lang, "qemu", mounts=["/data"])
    print(f"{fixture}: built in {time.monotonic() - started:.1f} s")
    started = time.monotonic()
    logs = serve_probe_routes(client, fixture, tmp_path, BOOT_TIMEOUT[lang])
    print(f"{fixture}: served {time.monotonic() - started:.1f} s after run")
    if lang == "java":
        assert "as java-build-command" in logs  # runtime_args reached the JVM
