"""unik.compilers: the registry, /describe_compiler, and linux-c really building (no VM)."""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from unik.aio import use_pidfd_child_watcher
from unik.compilers import AppBundle, CompilerRegistry, base, linux_c
from unik.compilers.linux_c import LinuxCCompiler
from unik.errors import BadRequest

requires_musl = pytest.mark.skipif(shutil.which("musl-gcc") is None, reason="musl-gcc not installed")

HELLO = '#include <stdio.h>\nint main(void) { puts("hello from unik"); return 0; }\n'


# -- registry -------------------------------------------------------------------------------


@requires_musl
def test_available_lists_linux_c_qemu() -> None:
    # The language compilers are listed too when their toolchains are installed.
    assert [n for n in CompilerRegistry(["qemu"]).available() if n.startswith("linux-c-")] == ["linux-c-qemu"]


@requires_musl
def test_available_is_sorted_per_provider() -> None:
    available = CompilerRegistry(["zz", "qemu"]).available()
    assert available == sorted(available)
    assert {"linux-c-qemu", "linux-c-zz"} <= set(available)


def test_no_providers_no_compilers() -> None:
    registry = CompilerRegistry([])
    assert registry.available() == []
    with pytest.raises(BadRequest, match="available: none"):
        registry.require("linux", "c", "qemu")


@requires_musl
def test_lookup_and_require_find_the_compiler() -> None:
    registry = CompilerRegistry(["qemu"])
    found = registry.lookup("linux", "c", "qemu")
    assert isinstance(found, LinuxCCompiler)
    assert found.name == "linux-c-qemu"
    assert registry.require("linux", "c", "qemu") is found


@pytest.mark.parametrize(
    ("base", "lang", "provider", "bad"),
    [
        ("rump", "c", "qemu", "'rump'"),
        ("linux", "cobol", "qemu", "'cobol'"),
        ("linux", "c", "virtualbox", "'virtualbox'"),
        ("", "", "", "''"),
    ],
)
@requires_musl
def test_unknown_base_lang_or_provider_is_a_bad_request_listing_what_is_available(
    base: str, lang: str, provider: str, bad: str
) -> None:
    registry = CompilerRegistry(["qemu"])
    assert registry.lookup(base, lang, provider) is None

    with pytest.raises(BadRequest) as info:
        registry.require(base, lang, provider)

    assert bad in info.value.message
    assert "available: " in info.value.message and "linux-c-qemu" in info.value.message


def test_a_missing_toolchain_hides_the_compiler_and_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linux_c.shutil, "which", lambda _name: None)
    registry = CompilerRegistry(["qemu"])

    assert registry.available() == []
    assert registry.lookup("linux", "c", "qemu") is not None
    with pytest.raises(BadRequest) as info:
        registry.require("linux", "c", "qemu")
    assert "linux-c-qemu" in info.value.message
    assert "musl" in info.value.message


# -- /describe_compiler ---------------------------------------------------------------------


@requires_musl
def test_describe_compiler_returns_the_layout_text(api: TestClient) -> None:
    response = api.get("/describe_compiler", params={"provider": "qemu", "base": "linux", "lang": "c"})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert text == LinuxCCompiler("qemu").description()
    assert "musl-gcc" in text
    assert "Makefile" in text
    assert "NOT AVAILABLE" not in text


@pytest.mark.parametrize(
    "params",
    [
        {"provider": "qemu", "base": "linux", "lang": "cobol"},
        {"provider": "qemu", "base": "rump", "lang": "c"},
        {"provider": "aws", "base": "linux", "lang": "c"},
    ],
)
def test_describe_an_unknown_compiler_is_a_400_naming_those_available(
    api: TestClient, params: dict[str, str]
) -> None:
    response = api.get("/describe_compiler", params=params)
    assert response.status_code == 400
    message = response.json()["message"]
    assert params["provider"] in message and params["base"] in message and "linux-c-qemu" in message


def test_describe_compiler_without_its_parameters_is_a_400(api: TestClient) -> None:
    response = api.get("/describe_compiler", params={"provider": "qemu"})
    assert response.status_code == 400
    assert "base" in response.json()["message"]


def test_available_compilers_endpoint(api: TestClient) -> None:
    response = api.get("/available_compilers")
    assert response.status_code == 200
    assert response.json() == CompilerRegistry(["qemu"]).available()
    assert ("linux-c-qemu" in response.json()) == bool(shutil.which("musl-gcc"))


# -- linux-c compiling for real -------------------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def compile_tree(tmp_path: Path, files: dict[str, str], *, timeout: float = 120) -> AppBundle:
    source = write_tree(tmp_path / "src", files)
    return asyncio.run(LinuxCCompiler("qemu").compile(source, tmp_path / "build", timeout=timeout))


def has_interpreter(path: Path) -> bool:
    data = path.read_bytes()
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def assert_static_app(bundle: AppBundle, expected_output: str) -> None:
    app = bundle.root / "unik" / "app"
    assert bundle.entrypoint == ["/unik/app"]
    assert app.is_file()
    assert app.stat().st_mode & 0o777 == 0o755
    assert app.read_bytes()[:4] == b"\x7fELF"
    assert not has_interpreter(app)
    # A static x86-64 program also runs on the (x86-64) host: that is what the guest will print.
    run = subprocess.run([str(app)], capture_output=True, text=True, timeout=30, check=False)
    assert run.stdout == expected_output


MAKEFILE_APP = "app: main.c\n\t$(CC) -O2 -o app main.c $(LDFLAGS)\n"


@requires_musl
def test_a_folder_of_c_files_becomes_a_static_elf(tmp_path: Path) -> None:
    bundle = compile_tree(
        tmp_path,
        {
            "main.c": '#include <stdio.h>\n#include "lib/util.h"\nint main(void){printf("%d\\n", twice(21));}\n',
            "lib/util.h": "int twice(int);\n",
            "lib/util.c": "int twice(int x){return 2*x;}\n",
            ".hidden/broken.c": "this is not C\n",
        },
    )
    assert_static_app(bundle, "42\n")


@requires_musl
def test_math_library_is_linked(tmp_path: Path) -> None:
    bundle = compile_tree(
        tmp_path,
        {
            "m.c": "#include <math.h>\n#include <stdio.h>\n"
            'int main(void){volatile double x=2; printf("%.0f\\n", pow(x,10));}\n'
        },
    )
    assert_static_app(bundle, "1024\n")


@requires_musl
def test_a_single_top_level_folder_is_the_project(tmp_path: Path) -> None:
    bundle = compile_tree(tmp_path, {"myapp/main.c": HELLO, "myapp/Makefile.txt": "not a makefile"})
    assert_static_app(bundle, "hello from unik\n")


@requires_musl
def test_a_makefile_producing_app(tmp_path: Path) -> None:
    bundle = compile_tree(tmp_path, {"Makefile": MAKEFILE_APP, "main.c": HELLO})
    assert_static_app(bundle, "hello from unik\n")


@requires_musl
def test_a_makefile_in_a_single_top_level_folder(tmp_path: Path) -> None:
    bundle = compile_tree(tmp_path, {"proj/Makefile": MAKEFILE_APP, "proj/main.c": HELLO})
    assert_static_app(bundle, "hello from unik\n")


@requires_musl
def test_a_makefile_producing_one_other_executable(tmp_path: Path) -> None:
    bundle = compile_tree(
        tmp_path,
        {
            "Makefile": "all: bin/server\nbin/server: main.c\n"
            "\tmkdir -p bin\n\t$(CC) -o bin/server main.c $(LDFLAGS)\n",
            "main.c": HELLO,
        },
    )
    assert_static_app(bundle, "hello from unik\n")


@requires_musl
def test_a_prebuilt_executable_in_the_upload_is_not_taken_for_the_new_one(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"tool.c": "int main(void){return 3;}\n"})
    subprocess.run(["musl-gcc", "-static", "-o", "tool", "tool.c"], cwd=source, check=True)
    write_tree(
        source,
        {"Makefile": "hello: main.c\n\t$(CC) -o hello main.c $(LDFLAGS)\n", "main.c": HELLO},
    )
    bundle = asyncio.run(LinuxCCompiler("qemu").compile(source, tmp_path / "build", timeout=120))
    assert_static_app(bundle, "hello from unik\n")


@requires_musl
def test_a_makefile_producing_two_executables_is_a_bad_request(tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as info:
        compile_tree(
            tmp_path,
            {
                "Makefile": "all: one two\none: main.c\n\t$(CC) -o one main.c $(LDFLAGS)\n"
                "two: main.c\n\t$(CC) -o two main.c $(LDFLAGS)\n",
                "main.c": HELLO,
            },
        )
    message = info.value.message
    assert "app" in message
    assert "one" in message
    assert "two" in message


@requires_musl
def test_a_makefile_producing_nothing_is_a_bad_request(tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as info:
        compile_tree(tmp_path, {"Makefile": "all:\n\t@echo nothing to do\n", "main.c": HELLO})
    assert "found: none" in info.value.message


@requires_musl
def test_a_compile_error_carries_gccs_own_message(tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as info:
        compile_tree(tmp_path, {"main.c": "int main(void) { return undeclared_thingy + 1; }\n"})
    message = info.value.message
    assert "undeclared_thingy" in message
    assert "main.c" in message
    assert "musl-gcc" in message


@requires_musl
def test_a_make_error_carries_the_compiler_message(tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as info:
        compile_tree(tmp_path, {"Makefile": MAKEFILE_APP, "main.c": "int main(void){ return not_declared_here; }\n"})
    assert "not_declared_here" in info.value.message
    assert "make" in info.value.message


@requires_musl
def test_two_mains_is_a_bad_request(tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as info:
        compile_tree(tmp_path, {"a.c": "int main(void){return 0;}\n", "b.c": "int main(void){return 1;}\n"})
    assert "main" in info.value.message


@requires_musl
def test_a_non_elf_app_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as info:
        compile_tree(tmp_path, {"Makefile": "app:\n\tprintf '#!/bin/sh\\necho hi\\n' > app\n\tchmod +x app\n"})
    assert "ELF" in info.value.message


@pytest.mark.parametrize(
    "files",
    [{}, {"README.md": "# nothing to build\n"}, {"main.h": "int x;\n", "notes.txt": "x"}, {".git/x.c": "int x;"}],
)
@requires_musl
def test_no_sources_is_a_bad_request(tmp_path: Path, files: dict[str, str]) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(BadRequest) as info:
        compile_tree(tmp_path, files)
    assert "no C sources" in info.value.message


@requires_musl
def test_a_build_that_runs_too_long_is_stopped(tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as info:
        compile_tree(tmp_path, {"Makefile": "app:\n\tsleep 30\n"}, timeout=1)
    assert "timed out" in info.value.message


def test_describe_compiler_says_when_the_toolchain_is_missing(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linux_c.shutil, "which", lambda _name: None)
    response = api.get("/describe_compiler", params={"provider": "qemu", "base": "linux", "lang": "c"})
    assert response.status_code == 200
    assert response.text.startswith(LinuxCCompiler("qemu").description())
    assert "NOT AVAILABLE on this host" in response.text
    assert "musl-tools" in response.text


# -- run_tool: how every compiler runs its toolchain -----------------------------------------


@pytest.fixture(params=["pidfd", "threads"])
def watching(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both ways asyncio can wait for a tool: a pidfd on the loop (what the daemon sets up,
    unik.aio.use_pidfd_child_watcher) or a thread per process (Python 3.11's default)."""
    before = asyncio.get_child_watcher()
    if request.param == "pidfd":
        use_pidfd_child_watcher()
        if asyncio.get_child_watcher() is before:
            pytest.skip("pidfd_open is not available here")
    else:
        asyncio.set_child_watcher(asyncio.ThreadedChildWatcher())
    yield str(request.param)
    asyncio.set_child_watcher(before)


def test_run_tool_returns_all_output_and_reports_the_exit_status(tmp_path: Path, watching: str) -> None:
    # More than a pipe buffer, on stdout and stderr: nothing may block or get lost.
    chatty = "head -c 300000 /dev/zero | tr '\\0' o; head -c 300000 /dev/zero | tr '\\0' e >&2"
    assert asyncio.run(base.run_tool(["sh", "-c", chatty], cwd=tmp_path, timeout=30)).count("o") == 300000
    with pytest.raises(BadRequest) as info:
        asyncio.run(base.run_tool(["sh", "-c", "echo broken; exit 3"], cwd=tmp_path, timeout=30))
    assert "exited with 3" in info.value.message
    assert "broken" in info.value.message


def test_run_tool_kills_the_whole_group_on_timeout(tmp_path: Path, watching: str) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 30 & echo $! > {pids}; echo $$ >> {pids}; wait"
    with pytest.raises(BadRequest, match="timed out"):
        asyncio.run(base.run_tool(["sh", "-c", script], cwd=tmp_path, timeout=0.5))
    # The shell is reaped by run_tool; its orphaned child is killed (whoever reaps it).
    shell, child = reversed([int(pid) for pid in pids.read_text().split()])
    assert not _alive(shell)
    assert _gone(child)


def test_a_cancelled_run_tool_kills_and_reaps_the_tool(tmp_path: Path, watching: str) -> None:
    pid_file = tmp_path / "pid"

    async def cancel_midway() -> int:
        task = asyncio.ensure_future(
            base.run_tool(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 30"], cwd=tmp_path, timeout=60)
        )
        while not pid_file.exists() or not pid_file.read_text().strip():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pid = int(pid_file.read_text())
        for _ in range(200):  # the loop reaps it once it is gone
            if not _alive(pid):
                break
            await asyncio.sleep(0.01)
        return pid

    assert not _alive(asyncio.run(cancel_midway()))


def _gone(pid: int) -> bool:
    """Killed (a zombie or reaped), within a moment: SIGKILL lands asynchronously."""
    for _ in range(200):
        if not _alive(pid) or _state(pid) == "Z":
            return True
        time.sleep(0.01)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "X"


def _alive(pid: int) -> bool:
    """Running, or dead but not reaped (a zombie): either way not cleaned up."""
    return _state(pid) != "X"
