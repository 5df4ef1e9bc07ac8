"""The language compilers without a VM: the ELF reader, each compiler's layout rules, real builds."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import stat
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import EXAMPLES, tar_gz
from unik.compilers import AppBundle, BuildSettings, CompilerRegistry, elf
from unik.compilers.linux_cpp import LinuxCppCompiler
from unik.compilers.linux_go import LinuxGoCompiler
from unik.compilers.linux_java import LinuxJavaCompiler, find_jar, find_main_class, parse_modules
from unik.compilers.linux_nodejs import LinuxNodejsCompiler
from unik.compilers.linux_nodejs import find_main as node_main
from unik.compilers.linux_python import LinuxPythonCompiler, find_main, has_requirements
from unik.compilers.linux_rust import VENDOR_CONFIG, LinuxRustCompiler, pick_binary, use_vendor
from unik.compilers.toolchain import copy_tree, image_root, install_file
from unik.config import DaemonConfig
from unik.errors import BadRequest
from unik.services.builds import BuildService

needs = {tool: pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} not installed") for tool in
         ("gcc", "g++", "go", "cargo", "node", "jlink", "musl-gcc")}  # fmt: skip
needs_python = pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no /usr/bin/python3")


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> BuildSettings:
    # One cache for the module: the jlink runtime and Go's build cache are reused across tests.
    return BuildSettings(cache_dir=tmp_path_factory.mktemp("cache"))


def build(compiler: object, project: Path, work: Path) -> AppBundle:
    assert hasattr(compiler, "compile")
    return asyncio.run(compiler.compile(project, work, timeout=300))


def copy_example(lang: str, tmp_path: Path) -> Path:
    target = tmp_path / "src"
    shutil.copytree(EXAMPLES / f"{lang}-http", target)
    return target


def files(root: Path) -> set[str]:
    return {"/" + p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# -- the ELF reader ---------------------------------------------------------------------------


@pytest.fixture
def c_programs(tmp_path: Path) -> Iterator[Path]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    (tmp_path / "foo.c").write_text("int foo(void) { return 42; }\n")
    (tmp_path / "main.c").write_text(
        "#include <math.h>\n#include <stdio.h>\nint foo(void);\n"
        "int main(void) { printf(\"%d %f\\n\", foo(), sqrt(2.0)); return 0; }\n"
    )
    run = lambda *argv: subprocess.run(argv, cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("gcc", "-shared", "-fPIC", "-Wl,-soname,libfoo.so", "-o", "libfoo.so", "foo.c")
    run("gcc", "-o", "dynamic", "main.c", "-Wl,--no-as-needed", "-L.", "-lfoo", "-lm", "-Wl,-rpath,$ORIGIN/../lib")
    run("gcc", "-static", "-o", "static", "main.c", "foo.c", "-lm")
    yield tmp_path


def test_read_elf_sees_interpreter_needed_and_runpath(c_programs: Path) -> None:
    info = elf.read_elf(c_programs / "dynamic")
    assert info.interpreter == "/lib64/ld-linux-x86-64.so.2"
    assert {"libfoo.so", "libm.so.6", "libc.so.6"} <= set(info.needed)
    assert (info.runpath or info.rpath) == ("$ORIGIN/../lib",)
    assert not info.is_static
    assert elf.read_elf(c_programs / "libfoo.so").soname == "libfoo.so"
    assert elf.read_elf(c_programs / "static").is_static


def test_read_elf_refuses_what_is_not_elf(tmp_path: Path) -> None:
    (tmp_path / "script").write_text("#!/bin/sh\necho hi\n")
    assert not elf.is_elf(tmp_path / "script")
    with pytest.raises(ValueError, match="not a readable ELF"):
        elf.read_elf(tmp_path / "script")


def test_closure_follows_runpath_inside_the_image_and_the_host_for_the_rest(c_programs: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "app" / "bin").mkdir(parents=True)
    (root / "app" / "lib").mkdir(parents=True)
    shutil.copy(c_programs / "dynamic", root / "app" / "bin" / "prog")
    shutil.copy(c_programs / "libfoo.so", root / "app" / "lib" / "libfoo.so")
    deps = elf.Resolver(root).resolve(["/app/bin/prog"])
    names = {Path(p).name for p in deps.files}
    # libfoo comes from the image ($ORIGIN/../lib); the loader, libc and libm from the host.
    assert "libfoo.so" not in names
    assert {"ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6"} <= names
    assert "/lib64/ld-linux-x86-64.so.2" in deps.files
    # libc's DT_NEEDED on the loader is the loader already running: one copy only.
    assert sum(1 for p in deps.files if p.endswith("ld-linux-x86-64.so.2")) == 1
    assert deps.library_dirs == [] and deps.env() == {}
    elf.install(root, deps)
    done = subprocess.run(
        ["/lib64/ld-linux-x86-64.so.2", "--list", str(root / "app/bin/prog")], capture_output=True, text=True
    )
    assert "libfoo.so" in done.stdout


def test_a_library_only_ld_so_conf_names_goes_on_ld_library_path(c_programs: Path, tmp_path: Path) -> None:
    libdir = tmp_path / "opt-lib"
    libdir.mkdir()
    shutil.copy(c_programs / "libfoo.so", libdir / "libfoo.so")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(c_programs / "dynamic", root / "bin" / "prog")
    deps = elf.Resolver(root, conf_dirs=[str(libdir)]).resolve(["/bin/prog"])
    assert str(libdir / "libfoo.so") in deps.files
    assert deps.env() == {"LD_LIBRARY_PATH": str(libdir)}


def test_a_missing_library_is_a_bad_request_naming_it(c_programs: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(c_programs / "dynamic", root / "bin" / "prog")
    with pytest.raises(BadRequest, match=r"/bin/prog needs the shared library libfoo\.so"):
        elf.Resolver(root, conf_dirs=[]).resolve(["/bin/prog"])


def test_ld_so_conf_includes_and_comments(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "ld.so.conf").write_text("# top\n/opt/a\ninclude conf.d/*.conf\n/opt/a\n")
    (tmp_path / "conf.d" / "b.conf").write_text("/opt/b/  # trailing\n\n")
    (tmp_path / "conf.d" / "c.conf").write_text("include " + str(tmp_path / "ld.so.conf") + "\n/opt/c\n")
    assert elf.ld_so_conf_dirs(tmp_path / "ld.so.conf") == ["/opt/a", "/opt/b", "/opt/c"]


# -- registry: missing toolchains --------------------------------------------------------------


def test_a_missing_interpreter_hides_the_compiler_and_describe_says_what_to_install(data_dir: Path) -> None:
    config = DaemonConfig(python_interpreter="/nonexistent/python3", node_binary="/nonexistent/node")
    registry = CompilerRegistry(["qemu"], config)
    assert "linux-python-qemu" not in registry.available()
    assert "linux-nodejs-qemu" not in registry.available()
    with pytest.raises(BadRequest, match="python3"):
        registry.require("linux", "python", "qemu")
    text = BuildService.describe_compiler(_WithCompilers(registry), "qemu", "linux", "nodejs")  # type: ignore[arg-type]
    assert "NOT AVAILABLE on this host" in text and "nodejs" in text


class _WithCompilers:
    def __init__(self, registry: CompilerRegistry) -> None:
        self.compilers = registry


@pytest.mark.parametrize("lang", ["go", "cpp", "rust", "python", "nodejs", "java"])
def test_every_language_describes_its_layout(api: TestClient, lang: str) -> None:
    response = api.get("/describe_compiler", params={"provider": "qemu", "base": "linux", "lang": lang})
    assert response.status_code == 200
    assert response.text.startswith(f"linux-{lang}:")
    assert "Prepare the project" in response.text


@needs["go"]
def test_a_failed_build_is_a_400_with_the_toolchains_own_error(api: TestClient) -> None:
    upload = tar_gz({"main.go": "package main\n\nfunc main() {\n\tthis is not go\n}\n"})
    response = api.post(
        "/images/broken/create?base=linux&lang=go&provider=qemu",
        files={"tarfile": ("app.tar.gz", upload, "application/gzip")},
    )
    assert response.status_code == 400
    assert "syntax error" in response.json()["message"]


# -- the image tree (the daemon writes it after the sandboxed build, never through a link) ------


def test_the_image_root_is_made_afresh_in_a_build_folder_that_is_still_a_folder(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "build").mkdir()
    root = image_root(tmp_path / "build", tmp_path / "src")
    assert root == tmp_path / "build" / "root" and list(root.iterdir()) == []
    with pytest.raises(BadRequest, match=r"it made build/root"):
        image_root(tmp_path / "build", tmp_path / "src")
    (tmp_path / "src").rename(tmp_path / "elsewhere")
    (tmp_path / "src").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BadRequest, match=r"replaced its folder src: src is a link"):
        image_root(tmp_path / "build", tmp_path / "src")


def test_files_go_into_the_image_but_never_through_a_link(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    program = tmp_path / "program"
    program.write_text("#!/bin/sh\n")
    assert install_file(root, "/usr/bin/tool", program, mode=0o755, follow_links=False).read_text() == "#!/bin/sh\n"
    assert stat.S_IMODE((root / "usr/bin/tool").stat().st_mode) == 0o755
    (root / "lib").symlink_to(outside)
    (root / "usr" / "bin" / "planted").symlink_to(outside / "planted")
    for guest in ("/lib/libc.so.6", "/lib/sub/libc.so.6", "/usr/bin/planted", "/usr/bin/tool"):
        with pytest.raises(BadRequest):
            install_file(root, guest, program, mode=0o755, follow_links=False)
    with pytest.raises(BadRequest, match=r"\.\."):
        install_file(root, "/usr/../../escape", program, mode=0o755, follow_links=False)
    # The build's own output as a link to a host file is refused, not followed.
    (tmp_path / "app").symlink_to("/etc/passwd")
    with pytest.raises(BadRequest, match="made it a link"):
        install_file(root, "/unik/app", tmp_path / "app", mode=0o755, follow_links=False)
    assert list(outside.iterdir()) == [] and not (tmp_path / "escape").exists()


def test_a_tree_is_copied_with_its_links_kept_and_nothing_but_files_folders_and_links(tmp_path: Path) -> None:
    src, root = tmp_path / "src", tmp_path / "root"
    (src / "static" / "v1").mkdir(parents=True)
    (src / "static" / "v1" / "a.txt").write_text("a\n")
    (src / "static" / "current").symlink_to("v1")
    (src / "etc").symlink_to("/etc")
    (src / "skipped").mkdir()
    root.mkdir()
    copy_tree(src, root, "/unik/app", skip={"skipped"})
    app = root / "unik" / "app"
    assert sorted(p.name for p in app.iterdir()) == ["etc", "static"]
    assert os.readlink(app / "static" / "current") == "v1" and os.readlink(app / "etc") == "/etc"
    assert (app / "static" / "v1" / "a.txt").read_text() == "a\n"
    # A FIFO would hang the daemon reading it (and a device is not the user's to give).
    os.mkfifo(src / "pipe")
    (tmp_path / "root2").mkdir()
    with pytest.raises(BadRequest, match="only files, folders and links"):
        copy_tree(src, tmp_path / "root2", "/")


def test_a_followed_link_brings_only_its_own_tree_or_what_anyone_may_read(tmp_path: Path) -> None:
    src = tmp_path / "runtime"
    (src / "legal" / "java.base").mkdir(parents=True)
    (src / "legal" / "java.base" / "LICENSE").write_text("gpl\n")
    (src / "legal" / "jdk.httpserver").mkdir()
    (src / "legal" / "jdk.httpserver" / "LICENSE").symlink_to("../java.base/LICENSE")
    (src / "cacerts").symlink_to("/etc/passwd")  # any user of the host may read it
    root = tmp_path / "root"
    root.mkdir()
    copy_tree(src, root, "/opt/java", follow_links=True)
    licence = root / "opt/java/legal/jdk.httpserver/LICENSE"
    assert not licence.is_symlink() and licence.read_text() == "gpl\n"
    assert not (root / "opt/java/cacerts").is_symlink()
    secret = tmp_path / "secret"
    secret.write_text("key\n")
    secret.chmod(0o600)
    # Not a file only its owner may read, not a host folder (whatever it holds), not a loop.
    for name, target, reason in (
        ("key", secret, "not for the image"),
        ("etc", Path("/etc"), "not for the image"),
        ("loop", src, "a folder that contains it"),
    ):
        (src / name).symlink_to(target)
        again = tmp_path / f"root-{name}"
        again.mkdir()
        with pytest.raises(BadRequest, match=reason):
            copy_tree(src, again, "/opt/java", follow_links=True)
        (src / name).unlink()


def test_a_library_path_with_dots_stays_inside_the_image() -> None:
    resolver = elf.Resolver(Path("/nonexistent"), conf_dirs=[])
    assert resolver._expand("../../../../etc/cron.d/x", "/unik/app") == "/etc/cron.d/x"
    assert resolver._expand("$ORIGIN/../../../../lib", "/unik/app") == "/lib"


# -- go ----------------------------------------------------------------------------------------


def test_go_uses_vendor_and_stays_offline_unless_allowed(tmp_path: Path) -> None:
    offline = LinuxGoCompiler("qemu", BuildSettings(cache_dir=tmp_path))
    env = offline.build_env(tmp_path)
    assert env["CGO_ENABLED"] == "0" and env["GOPROXY"] == "off" and env["GOFLAGS"] == "-mod=mod"
    assert "GOPROXY" not in LinuxGoCompiler("qemu", BuildSettings(network=True)).build_env(tmp_path)
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "modules.txt").write_text("")
    assert offline.build_env(tmp_path)["GOFLAGS"] == "-mod=vendor"


@needs["go"]
def test_go_example_is_one_static_binary(settings: BuildSettings, tmp_path: Path) -> None:
    bundle = build(LinuxGoCompiler("qemu", settings), copy_example("go", tmp_path), tmp_path / "build")
    assert bundle.entrypoint == ["/unik/app"]
    assert files(bundle.root) == {"/unik/app"}
    assert elf.read_elf(bundle.root / "unik/app").is_static


@needs["go"]
def test_go_without_go_mod_builds_stdlib_programs_and_a_missing_module_is_named(
    settings: BuildSettings, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "main.go").write_text('package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("hi") }\n')
    build(LinuxGoCompiler("qemu", settings), tmp_path / "a", tmp_path / "wa")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "main.go").write_text(
        'package main\n\nimport "example.org/nowhere/pkg"\n\nfunc main() { pkg.Do() }\n'
    )
    with pytest.raises(BadRequest, match=r"example\.org/nowhere"):
        build(LinuxGoCompiler("qemu", settings), tmp_path / "b", tmp_path / "wb")


@needs["go"]
def test_go_builds_offline_from_the_vendor_folder(settings: BuildSettings, tmp_path: Path) -> None:
    project = tmp_path / "src"
    (project / "vendor" / "example.com" / "dep").mkdir(parents=True)
    (project / "go.mod").write_text("module example.com/app\n\ngo 1.19\n\nrequire example.com/dep v1.0.0\n")
    (project / "main.go").write_text(
        'package main\n\nimport "example.com/dep"\n\nfunc main() { println(dep.Hello()) }\n'
    )
    # What `go mod vendor` writes for a module nobody could download here.
    (project / "vendor" / "modules.txt").write_text("# example.com/dep v1.0.0\n## explicit\nexample.com/dep\n")
    (project / "vendor" / "example.com" / "dep" / "dep.go").write_text(
        'package dep\n\nfunc Hello() string { return "vendored" }\n'
    )
    bundle = build(LinuxGoCompiler("qemu", settings), project, tmp_path / "build")
    done = subprocess.run([str(bundle.root / "unik/app")], capture_output=True, text=True, check=True)
    assert done.stderr.strip() == "vendored"


# -- cpp ---------------------------------------------------------------------------------------


@needs["g++"]
def test_cpp_example_is_static(settings: BuildSettings, tmp_path: Path) -> None:
    bundle = build(LinuxCppCompiler("qemu", settings), copy_example("cpp", tmp_path), tmp_path / "build")
    assert files(bundle.root) == {"/unik/app"} and bundle.env == {}
    assert elf.read_elf(bundle.root / "unik/app").is_static


@needs["g++"]
def test_cpp_makefile_linking_dynamically_brings_its_libraries(settings: BuildSettings, tmp_path: Path) -> None:
    project = tmp_path / "src"
    project.mkdir()
    (project / "main.cpp").write_text('#include <iostream>\nint main() { std::cout << "hi" << std::endl; }\n')
    (project / "Makefile").write_text("app: main.cpp\n\t$(CXX) -O2 -o app main.cpp\n")
    bundle = build(LinuxCppCompiler("qemu", settings), project, tmp_path / "build")
    names = {Path(p).name for p in files(bundle.root)}
    assert {"app", "libstdc++.so.6", "libc.so.6", "ld-linux-x86-64.so.2"} <= names


def test_cpp_without_sources_is_a_bad_request(settings: BuildSettings, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "README").write_text("nothing\n")
    with pytest.raises(BadRequest, match="no C\\+\\+ sources"):
        build(LinuxCppCompiler("qemu", settings), tmp_path / "src", tmp_path / "build")


# -- rust --------------------------------------------------------------------------------------


def test_rust_vendor_folder_becomes_the_crates_io_source(tmp_path: Path) -> None:
    (tmp_path / "vendor").mkdir()
    use_vendor(tmp_path)
    assert (tmp_path / ".cargo" / "config.toml").read_text() == VENDOR_CONFIG
    # A project that configures its own sources (cargo vendor's snippet) is left alone.
    (tmp_path / ".cargo" / "config.toml").write_text("# mine\n")
    use_vendor(tmp_path)
    assert (tmp_path / ".cargo" / "config.toml").read_text() == "# mine\n"


def test_rust_binary_choice() -> None:
    def meta(*bins: str) -> str:
        targets = [{"name": b, "kind": ["bin"]} for b in bins] + [{"name": "lib", "kind": ["lib"]}]
        return "warning: something\n" + json.dumps({"packages": [{"targets": targets}]})

    assert pick_binary(meta("server"), None) == "server"
    assert pick_binary(meta("a", "b"), "b") == "b"
    with pytest.raises(BadRequest, match="bin: NAME"):
        pick_binary(meta("a", "b"), None)
    with pytest.raises(BadRequest, match="no binary target"):
        pick_binary(meta(), None)
    with pytest.raises(BadRequest, match="names bin 'c'"):
        pick_binary(meta("a"), "c")


@needs["cargo"]
def test_rust_builds_offline_from_vendored_crates(settings: BuildSettings, tmp_path: Path) -> None:
    project = tmp_path / "src"
    (project / "src").mkdir(parents=True)
    (project / "vendor" / "tinydep" / "src").mkdir(parents=True)
    (project / "Cargo.toml").write_text(
        '[package]\nname = "uses-dep"\nversion = "0.1.0"\nedition = "2021"\n\n[dependencies]\ntinydep = "1"\n'
    )
    (project / "src" / "main.rs").write_text('fn main() { println!("{}", tinydep::hello()); }\n')
    # The shape `cargo vendor` leaves: the crate's sources and a checksum file per crate.
    dep = project / "vendor" / "tinydep"
    (dep / "Cargo.toml").write_text('[package]\nname = "tinydep"\nversion = "1.0.0"\nedition = "2021"\n')
    (dep / "src" / "lib.rs").write_text('pub fn hello() -> &\'static str { "vendored crate" }\n')
    (dep / ".cargo-checksum.json").write_text(json.dumps({"files": {}, "package": "0" * 64}))
    bundle = build(LinuxRustCompiler("qemu", settings), project, tmp_path / "build")
    done = subprocess.run([str(bundle.root / "unik/app")], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "vendored crate"


@needs["cargo"]
def test_rust_example_is_a_static_release_binary(settings: BuildSettings, tmp_path: Path) -> None:
    bundle = build(LinuxRustCompiler("qemu", settings), copy_example("rust", tmp_path), tmp_path / "build")
    assert files(bundle.root) == {"/unik/app"}
    assert elf.read_elf(bundle.root / "unik/app").is_static


# -- python ------------------------------------------------------------------------------------


def test_python_main_file_rules(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("")
    assert find_main(tmp_path, None) == (tmp_path / "a.py").resolve()
    (tmp_path / "b.py").write_text("")
    with pytest.raises(BadRequest, match=r"main_file"):
        find_main(tmp_path, None)
    (tmp_path / "app.py").write_text("")
    assert find_main(tmp_path, None).name == "app.py"
    assert find_main(tmp_path, "b.py").name == "b.py"
    with pytest.raises(BadRequest, match="not a file in the project"):
        find_main(tmp_path, "../etc/passwd")
    (tmp_path / "requirements.txt").write_text("# nothing\n\n")
    assert not has_requirements(tmp_path)


def make_wheel(folder: Path) -> None:
    """A pure-Python wheel by hand: what `pip wheel` would make, without needing an index."""
    folder.mkdir(parents=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr("tinypkg/__init__.py", "import json\n\nVALUE = json.dumps({'tiny': 42})\n")
        wheel.writestr("tinypkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n")
        wheel.writestr(
            "tinypkg-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(
            "tinypkg-1.0.dist-info/RECORD",
            "tinypkg/__init__.py,,\ntinypkg-1.0.dist-info/METADATA,,\ntinypkg-1.0.dist-info/WHEEL,,\n"
            "tinypkg-1.0.dist-info/RECORD,,\n",
        )
    (folder / "tinypkg-1.0-py3-none-any.whl").write_bytes(buffer.getvalue())


@needs_python
def test_python_packs_the_imported_stdlib_and_wheels_offline(settings: BuildSettings, tmp_path: Path) -> None:
    project = copy_example("python", tmp_path)
    (project / "app.py").write_text("import tinypkg\n" + (project / "app.py").read_text())
    (project / "requirements.txt").write_text("tinypkg==1.0\n")
    make_wheel(project / "wheels")
    bundle = build(LinuxPythonCompiler("qemu", settings), project, tmp_path / "build")
    got = files(bundle.root)
    assert bundle.entrypoint[0] == "/usr/bin/python3.11" and bundle.entrypoint[1:] == ["-u", "/unik/app/app.py"]
    assert bundle.env["PYTHONHOME"] == "/usr" and bundle.env["PYTHONPATH"] == "/unik/site-packages"
    stdlib = "/usr/lib/python3.11"
    # Imported (http.server, json), needed at start-up (site, encodings), bytecode only.
    assert {f"{stdlib}/http/server.pyc", f"{stdlib}/json/__init__.pyc", f"{stdlib}/site.pyc"} <= got
    assert f"{stdlib}/encodings/utf_8.pyc" in got and f"{stdlib}/encodings/cp1252.pyc" in got
    assert not any(p.endswith(".py") for p in got if p.startswith(stdlib))
    # Development-only packages stay out.
    assert not any(p.startswith((f"{stdlib}/unittest", f"{stdlib}/pydoc", f"{stdlib}/lib2to3")) for p in got)
    assert "/unik/site-packages/tinypkg/__init__.py" in got
    assert any(p.startswith("/unik/site-packages/tinypkg/__pycache__/") for p in got)
    assert not any(p.startswith("/unik/app/wheels") for p in got)
    assert {"/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6"} <= got
    assert 64 <= bundle.memory_mb <= 512
    # The packed tree really runs: the host's loader with the image's stdlib only.
    done = subprocess.run(
        [str(bundle.root / "usr/bin/python3.11"), "-c", "import http.server, tinypkg; print(tinypkg.VALUE)"],
        env={"PYTHONHOME": str(bundle.root / "usr"), "PYTHONPATH": str(bundle.root / "unik/site-packages")},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '{"tiny": 42}'


@needs_python
def test_python_requirement_without_a_wheel_offline_is_pips_error(settings: BuildSettings, tmp_path: Path) -> None:
    project = tmp_path / "src"
    project.mkdir()
    (project / "main.py").write_text("print('hi')\n")
    (project / "requirements.txt").write_text("surely-not-a-package-unik==9.9\n")
    with pytest.raises(BadRequest, match="surely-not-a-package-unik"):
        build(LinuxPythonCompiler("qemu", settings), project, tmp_path / "build")


# -- nodejs ------------------------------------------------------------------------------------


def test_node_main_rules(tmp_path: Path) -> None:
    (tmp_path / "index.js").write_text("")
    assert node_main(tmp_path, None, {}).name == "index.js"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "start.js").write_text("")
    assert node_main(tmp_path, None, {"main": "lib/start"}).name == "start.js"
    with pytest.raises(BadRequest, match=r"package\.json main"):
        node_main(tmp_path, None, {"main": "missing.js"})
    assert node_main(tmp_path, "lib/start.js", {"main": "missing.js"}).name == "start.js"


@needs["node"]
def test_node_dependencies_without_node_modules_offline_is_refused(settings: BuildSettings, tmp_path: Path) -> None:
    project = tmp_path / "src"
    project.mkdir()
    (project / "index.js").write_text("require('left-pad')\n")
    (project / "package.json").write_text(json.dumps({"dependencies": {"left-pad": "1.3.0"}}))
    with pytest.raises(BadRequest, match="node_modules"):
        build(LinuxNodejsCompiler("qemu", settings), project, tmp_path / "build")


@needs["node"]
def test_node_example_brings_node_and_its_libraries(settings: BuildSettings, tmp_path: Path) -> None:
    project = copy_example("nodejs", tmp_path)
    (project / "node_modules" / "dep").mkdir(parents=True)
    (project / "node_modules" / "dep" / "index.js").write_text("module.exports = 1\n")
    bundle = build(LinuxNodejsCompiler("qemu", settings), project, tmp_path / "build")
    node = str(elf.Path(shutil.which("node") or "").resolve())
    assert bundle.entrypoint == [node, "/unik/app/server.js"]
    got = files(bundle.root)
    assert {node, "/unik/app/node_modules/dep/index.js", "/lib/x86_64-linux-gnu/libstdc++.so.6"} <= got
    # About twice the tree (the initrd and its unpacked copy) plus the kernel and V8's heap.
    assert bundle.memory_mb >= 2 * elf.Path(bundle.root / node.lstrip("/")).stat().st_size / 2**20


# -- java --------------------------------------------------------------------------------------


def test_java_jar_rules(tmp_path: Path) -> None:
    assert find_jar(tmp_path, None) is None
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "a.jar").write_bytes(b"PK")
    assert find_jar(tmp_path, None) == tmp_path / "target" / "a.jar"
    (tmp_path / "b.jar").write_bytes(b"PK")
    with pytest.raises(BadRequest, match="main_file"):
        find_jar(tmp_path, None)
    assert find_jar(tmp_path, "b.jar") == (tmp_path / "b.jar").resolve()


def test_java_main_class_and_jdeps_output(tmp_path: Path) -> None:
    (tmp_path / "A.java").write_text("package p.q;\nclass A { public static void main(String[] a) {} }\n")
    (tmp_path / "B.java").write_text("class B { void run() {} }\n")
    assert find_main_class([tmp_path / "A.java", tmp_path / "B.java"]) == "p.q.A"
    with pytest.raises(BadRequest, match="main_class"):
        find_main_class([tmp_path / "B.java"])
    assert parse_modules("Warning: split package\njava.base,jdk.httpserver\n") == ["java.base", "jdk.httpserver"]


@needs["jlink"]
def test_java_example_gets_a_jlinked_runtime(settings: BuildSettings, tmp_path: Path) -> None:
    bundle = build(LinuxJavaCompiler("qemu", settings), copy_example("java", tmp_path), tmp_path / "build")
    assert bundle.entrypoint[0] == "/opt/java/bin/java" and bundle.entrypoint[-2:] == ["-jar", "/unik/app/app.jar"]
    got = files(bundle.root)
    assert {"/opt/java/lib/modules", "/opt/java/lib/server/libjvm.so", "/unik/app/app.jar"} <= got
    assert "/lib/x86_64-linux-gnu/libstdc++.so.6" in got
    listed = subprocess.run(
        [str(bundle.root / "opt/java/bin/java"), "--list-modules"], capture_output=True, text=True, check=True
    ).stdout
    assert {line.split("@")[0] for line in listed.split()} == {"java.base", "jdk.httpserver"}
