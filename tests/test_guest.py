"""The initramfs writer, the kernel's module closure, and real boots of the guest init."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import micro_kernel_reads_fw_cfg
from unik.guest import (
    DHCP,
    EXIT_LINE,
    FW_CFG_RUN_ARCHIVE,
    CpioWriter,
    assemble_initrd,
    ensure_init_binary,
    run_config_cpio,
)
from unik.kernel import BOOT_ARGS, Kernel, default_kernel_root, load
from unik.providers.qemu import boot_argv
from unik.providers.qemu.config import QemuProviderConfig

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")
needs_musl = pytest.mark.skipif(shutil.which("musl-gcc") is None, reason="needs musl-gcc (musl-tools)")

BOOT_DEADLINE = 60.0


def _kernel_or_none() -> Kernel | None:
    try:
        return load(default_kernel_root())
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def kernel() -> Kernel:
    found = _kernel_or_none()
    if found is None:
        pytest.skip(f"no kernel fetched in {default_kernel_root()}: run `make setup`")
    return found


@pytest.fixture
def vm_kernel(kernel: Kernel) -> Kernel:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    if shutil.which("musl-gcc") is None:
        pytest.skip("musl-gcc is not installed (apt-get install -y musl-tools)")
    return kernel


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # A QMP unix socket path must fit in 108 bytes; pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="unik-g-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- cpio


def _cpio_list(archive: Path) -> list[str]:
    out = subprocess.run(["cpio", "-it", "--quiet"], input=archive.read_bytes(), capture_output=True, check=True)
    return out.stdout.decode().splitlines()


def _write_sample(path: Path, host_file: Path) -> None:
    with open(path, "wb") as f:
        w = CpioWriter(f)
        w.add_dir("/etc", 0o755)
        w.add_file("/etc/hello.txt", b"hello\n", 0o644)
        w.add_file("bin/tool", host_file, 0o755)  # parent "bin" is added implicitly
        w.add_symlink("/bin/alias", "tool")
        w.add_char_device("/dev/console", 5, 1, 0o600)
        w.add_dir("etc")  # a repeated directory is written once
        w.close()


@needs_cpio
def test_cpio_lists_and_extracts_same_bytes(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 3))  # odd size: exercises the padding
    archive = tmp_path / "a.cpio"
    _write_sample(archive, big)

    assert _cpio_list(archive) == [
        "etc",
        "etc/hello.txt",
        "bin",
        "bin/tool",
        "bin/alias",
        "dev",
        "dev/console",
    ]
    verbose = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive.read_bytes(), capture_output=True, check=True
    ).stdout.decode()
    console = next(line for line in verbose.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console

    out = tmp_path / "out"
    out.mkdir()
    # Device nodes need root to extract; leave that one out.
    subprocess.run(["cpio", "-id", "--quiet", "-f", "dev/console"], cwd=out, input=archive.read_bytes(), check=True)
    assert (out / "etc/hello.txt").read_bytes() == b"hello\n"
    assert (out / "bin/tool").read_bytes() == big.read_bytes()
    assert os.access(out / "bin/tool", os.X_OK)
    assert os.readlink(out / "bin/alias") == "tool"

    again = tmp_path / "b.cpio"
    _write_sample(again, big)
    assert archive.read_bytes() == again.read_bytes(), "archives must be reproducible"


def test_cpio_rejects_duplicates_and_escapes() -> None:
    w = CpioWriter(io.BytesIO())
    w.add_file("a", b"x")
    with pytest.raises(ValueError):
        w.add_file("/a", b"y")
    with pytest.raises(ValueError):
        w.add_dir("a")
    with pytest.raises(ValueError):
        w.add_file("../etc/passwd", b"")


@needs_cpio
def test_assemble_initrd_layout(tmp_path: Path) -> None:
    init = tmp_path / "init"
    init.write_bytes(b"\x7fELF fake init")
    app_root = tmp_path / "root"
    (app_root / "unik").mkdir(parents=True)
    (app_root / "unik/app").write_bytes(b"app")
    (app_root / "unik/app").chmod(0o755)
    (app_root / "unik/data.txt").write_text("data")
    (app_root / "etc").mkdir()
    (app_root / "etc/link").symlink_to("/unik/data.txt")
    mod_a = tmp_path / "mods/a.ko"
    mod_a.parent.mkdir()
    mod_a.write_bytes(b"A")
    mod_b = tmp_path / "mods/b-x.ko"
    mod_b.write_bytes(b"B")
    out = tmp_path / "initrd.cpio"

    assemble_initrd(
        out,
        init_binary=init,
        app_root=app_root,
        entrypoint=["/unik/app", "--flag"],
        args=["one", "two words"],
        env={"A": "1", "B": "x=y"},
        modules=[mod_a, mod_b],
    )
    names = _cpio_list(out)
    for expected in [
        "init",
        "dev",
        "dev/console",
        "proc",
        "sys",
        "tmp",
        "unik",
        "unik/entrypoint",
        "unik/args",
        "unik/env",
        "unik/modules",
        "lib/modules/a.ko",
        "lib/modules/b-x.ko",
        "unik/app",
        "unik/data.txt",
        "etc",
        "etc/link",
    ]:
        assert expected in names
    assert len(names) == len(set(names))

    x = tmp_path / "x"
    x.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "-f", "dev/console"], cwd=x, input=out.read_bytes(), check=True)
    assert (x / "unik/entrypoint").read_bytes() == b"/unik/app\0--flag\0"
    assert (x / "unik/args").read_bytes() == b"one\0two words\0"
    assert (x / "unik/env").read_bytes() == b"A=1\0B=x=y\0"
    assert (x / "unik/modules").read_text() == "/lib/modules/a.ko\n/lib/modules/b-x.ko\n"
    assert os.access(x / "unik/app", os.X_OK) and os.access(x / "init", os.X_OK)
    assert not os.access(x / "unik/data.txt", os.X_OK)
    assert os.readlink(x / "etc/link") == "/unik/data.txt"


@needs_cpio
def test_run_config_cpio(tmp_path: Path) -> None:
    archive = tmp_path / "run.cpio"
    archive.write_bytes(run_config_cpio(env={"K": "v"}, args=[], hostname="box", stop_timeout=7))
    assert _cpio_list(archive) == [
        "unik",
        "unik/run",
        "unik/run/env",
        "unik/run/args",
        "unik/run/hostname",
        "unik/run/stop_timeout",
    ]
    x = tmp_path / "x"
    x.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], cwd=x, input=archive.read_bytes(), check=True)
    assert (x / "unik/run/env").read_bytes() == b"K=v\0"
    assert (x / "unik/run/args").read_bytes() == b""
    assert (x / "unik/run/hostname").read_text() == "box\n"
    assert (x / "unik/run/stop_timeout").read_text() == "7\n"
    assert _cpio_list_bytes(run_config_cpio(env={})) == ["unik", "unik/run", "unik/run/env"]


def _cpio_list_bytes(data: bytes) -> list[str]:
    out = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True, check=True)
    return out.stdout.decode().splitlines()


@needs_musl
def test_init_binary_is_small_and_cached(tmp_path: Path) -> None:
    first = ensure_init_binary(tmp_path)
    assert first.read_bytes()[:4] == b"\x7fELF"
    assert first.stat().st_size < 100_000
    mtime = first.stat().st_mtime_ns
    assert ensure_init_binary(tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name], "no temp files left behind"


# ---------------------------------------------------------------- kernel


def test_module_closure_order(kernel: Kernel) -> None:
    rel = [
        p.relative_to(kernel.modules_dir).as_posix()
        for p in kernel.module_closure(["virtio_blk", "virtio-net", "virtio_pci", "virtio_console"])
    ]
    names = [r.rsplit("/", 1)[-1] for r in rel]
    assert len(names) == len(set(names)), "each module once"
    for dep, user in [
        ("virtio_ring.ko", "virtio.ko"),
        ("virtio.ko", "virtio_blk.ko"),
        ("failover.ko", "net_failover.ko"),
        ("net_failover.ko", "virtio_net.ko"),
        ("virtio_pci_modern_dev.ko", "virtio_pci.ko"),
        ("virtio_pci_legacy_dev.ko", "virtio_pci.ko"),
        ("virtio.ko", "virtio_console.ko"),
    ]:
        assert names.index(dep) < names.index(user), (dep, user, names)
    assert all((kernel.modules_dir / r).is_file() for r in rel)
    # ext4 is built into the cloud kernel: nothing to load, and no error.
    assert kernel.module_closure(["ext4"]) == []
    with pytest.raises(ValueError):
        kernel.module_closure(["no_such_module_anywhere"])


def test_kernel_files(kernel: Kernel) -> None:
    assert kernel.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert kernel.bzimage.is_file()
    assert kernel.root.name == kernel.version


def test_load_missing_kernel_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make setup"):
        load(tmp_path)


# ---------------------------------------------------------------- real boots

APP_PRINT = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char host[65] = "";
    for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    const char *g = getenv("GREETING");
    printf("GREETING=%s\n", g ? g : "(unset)");
    printf("BAKED=%s\n", getenv("BAKED") ? getenv("BAKED") : "(unset)");
    gethostname(host, sizeof host - 1);
    printf("hostname=%s\n", host);
    printf("virtio_blk=%s\n", access("/sys/module/virtio_blk", F_OK) == 0 ? "loaded" : "missing");
    extern char **environ;
    int envc = 0;
    for (char **e = environ; *e; e++) envc++;
    printf("envc=%d FILL2999=%s\n", envc, getenv("FILL2999") ? getenv("FILL2999") : "(unset)");
    const char *names[] = {"PATH", "HOME", "TERM"};
    for (int i = 0; i < 3; i++) printf("%s=%s\n", names[i], getenv(names[i]) ? getenv(names[i]) : "(unset)");
    FILE *tmp = fopen("/tmp/probe", "w");
    printf("tmp=%s\n", tmp && fputs("x", tmp) >= 0 && fclose(tmp) == 0 ? "writable" : "read-only");
    char line[80] = "(none)\n";
    FILE *resolv = fopen("/etc/resolv.conf", "r");
    if (resolv && !fgets(line, sizeof line, resolv)) line[0] = 0;
    printf("resolv=%s", line);
    return 3;
}
"""

APP_SLEEP = r"""
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static void on_term(int sig) {
    static const char msg[] = "app: got SIGTERM\n";
    (void)sig;
    write(1, msg, sizeof msg - 1);
    _exit(0);
}
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "ignore") == 0) signal(SIGTERM, SIG_IGN);
    else signal(SIGTERM, on_term);
    printf("app: ready\n");
    fflush(stdout);
    for (;;) pause();
}
"""


def _build_image(
    workdir: Path, kernel: Kernel, source: str, *, modules: list[str] | None = None, env: dict[str, str] | None = None
) -> Path:
    (workdir / "app.c").write_text(source)
    app_root = workdir / "root"
    (app_root / "unik").mkdir(parents=True)
    subprocess.run(
        ["musl-gcc", "-static", "-Os", "-s", "-o", str(app_root / "unik/app"), str(workdir / "app.c")],
        check=True,
        capture_output=True,
    )
    initrd = workdir / "initrd.cpio"
    assemble_initrd(
        initrd,
        init_binary=ensure_init_binary(workdir / "cache"),
        app_root=app_root,
        entrypoint=["/unik/app"],
        args=["default-arg"],
        env=env or {},
        modules=kernel.module_closure(modules or []),
    )
    return initrd


def _boot(
    workdir: Path, kernel: Kernel, initrd: Path, run_config: bytes, *, qmp: Path | None = None, fw_cfg: bool = False
) -> tuple[subprocess.Popen[bytes], Path]:
    """What the host does at each boot: the image's archive, then the per-boot one after it, or
    (`fw_cfg`, a big image's way) the image's archive alone and the per-boot one through fw_cfg."""
    run_archive = workdir / "run.cpio"
    if fw_cfg:
        run_archive.write_bytes(run_config)
        boot_initrd = initrd
    else:
        boot_initrd = workdir / "boot.cpio"
        boot_initrd.write_bytes(initrd.read_bytes() + run_config)
    log = workdir / "console.log"
    cmd = [
        "qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-m", "128",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(kernel.vmlinux), "-initrd", str(boot_initrd),
        "-append", " ".join(BOOT_ARGS),
        "-chardev", f"file,id=c0,path={log},append=on", "-serial", "chardev:c0",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
    ]  # fmt: skip
    if qmp is not None:
        cmd += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if fw_cfg:
        cmd += ["-fw_cfg", f"name={FW_CFG_RUN_ARCHIVE},file={run_archive}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), log


def _wait_for_line(proc: subprocess.Popen[bytes], log: Path, needle: bytes, deadline: float) -> None:
    while time.monotonic() < deadline:
        if log.exists() and needle in log.read_bytes():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    text = log.read_bytes().decode(errors="replace") if log.exists() else ""
    raise AssertionError(f"{needle!r} never reached the console:\n{text}")


def _wait_exit(proc: subprocess.Popen[bytes], deadline: float) -> int:
    try:
        return proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("qemu did not exit before the deadline") from None


def _console_lines(log: Path) -> list[str]:
    return [line.rstrip("\r") for line in log.read_bytes().decode(errors="replace").split("\n")]


def _boot_app_print(tmp: Path, kernel: Kernel, modules: list[str], *, fw_cfg: bool = False) -> None:
    """APP_PRINT booted with a run config: what it prints is what init gave it."""
    initrd = _build_image(tmp, kernel, APP_PRINT, modules=modules, env={"BAKED": "yes", "GREETING": "baked"})
    deadline = time.monotonic() + BOOT_DEADLINE
    proc, log = _boot(
        tmp,
        kernel,
        initrd,
        run_config_cpio(
            # ~150 KB of environment: more than init's boot arena, so its heap fallback runs too.
            env={"GREETING": "hi", **{f"FILL{i:04d}": "x" * 40 for i in range(3000)}},
            args=["one", "two words"],
            hostname="guest1",
            net={"address": "10.0.2.15/24", "gateway": "10.0.2.2", "dns": "10.0.2.3"},
        ),
        fw_cfg=fw_cfg,
    )
    try:
        code = _wait_exit(proc, deadline)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = _console_lines(log)
    for expected in [
        "argv[0]=/unik/app",
        "argv[1]=one",
        "argv[2]=two words",
        "GREETING=hi",
        "BAKED=yes",
        "envc=3004 FILL2999=" + "x" * 40,  # the fillers, GREETING, BAKED, PATH and HOME
        "PATH=/unik:/bin:/usr/bin",
        "HOME=/",
        "TERM=(unset)",  # the kernel gives init TERM=linux: it is not the app's
        "tmp=writable",
        "resolv=nameserver 10.0.2.3",
        "hostname=guest1",
        "virtio_blk=loaded",
        "unik: exit status 3",
    ]:
        assert expected in lines, f"{expected!r} missing from console:\n" + "\n".join(lines)
    assert not any(line.startswith("argv[3]") or "default-arg" in line for line in lines)
    matches = EXIT_LINE.findall(log.read_bytes())
    assert matches == [(b"exit status", b"3")]
    assert code == (3 << 1) | 1, (proc.stdout.read() if proc.stdout else b"").decode(errors="replace")


@pytest.mark.vm
def test_boot_runs_app_and_reports_exit_status(vm_kernel: Kernel, short_tmp: Path) -> None:
    _boot_app_print(short_tmp, vm_kernel, ["virtio_blk", "virtio_net", "virtio_pci", "virtio_console"])


@pytest.mark.vm
def test_dhcp_gives_the_nic_its_address_route_and_dns(vm_kernel: Kernel, short_tmp: Path) -> None:
    """address=dhcp (exported disks): slirp's DHCP server leases 10.0.2.15 via 10.0.2.2, DNS 10.0.2.3."""
    initrd = _build_image(short_tmp, vm_kernel, APP_PRINT, modules=["virtio_pci", "virtio_net"])
    proc, log = _boot(short_tmp, vm_kernel, initrd, run_config_cpio(env={}, net=DHCP))
    try:
        _wait_exit(proc, time.monotonic() + BOOT_DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = _console_lines(log)
    assert "unik: eth0 has 10.0.2.15/24 via 10.0.2.2 by DHCP (lease 86400 s)" in lines, lines
    assert "resolv=nameserver 10.0.2.3" in lines, lines


@pytest.mark.vm
def test_run_config_through_fw_cfg(vm_kernel: Kernel, short_tmp: Path) -> None:
    """A big image's way: the image's own initrd, the run archive as a fw_cfg file init unpacks."""
    if not micro_kernel_reads_fw_cfg():
        pytest.skip("no micro kernel with fw_cfg in sysfs: run `make setup`")
    _boot_app_print(short_tmp, load(default_kernel_root(), "micro"), [], fw_cfg=True)


def _boot_on_providers_machine(
    tmp: Path, kernel: Kernel, config: QemuProviderConfig, source: str, run_config: bytes, modules: list[str]
) -> tuple[list[str], list[str]]:
    """`source` booted on boot_argv's machine until it exits: (the qemu command line, the console)."""
    initrd = _build_image(tmp, kernel, source, modules=modules)
    boot_initrd = tmp / "boot.cpio"
    boot_initrd.write_bytes(initrd.read_bytes() + run_config)
    log = tmp / "console.log"
    argv = boot_argv(config, "tcg", kernel=kernel.vmlinux, initrd=boot_initrd, memory_mb=128, console=log)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_exit(proc, time.monotonic() + BOOT_DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    return argv, _console_lines(log)


@pytest.mark.vm
def test_the_providers_machine_boots_the_cloud_kernel(vm_kernel: Kernel, short_tmp: Path) -> None:
    """boot_argv for `kernel: cloud` (its default firmware: qboot never reaches that kernel)."""
    config = QemuProviderConfig(kernel="cloud")
    argv, lines = _boot_on_providers_machine(
        short_tmp, vm_kernel, config, APP_PRINT, run_config_cpio(env={"GREETING": "cloud"}), ["virtio_blk"]
    )
    assert "qboot.rom" not in argv
    assert "GREETING=cloud" in lines
    assert "qboot.rom" in boot_argv(QemuProviderConfig(), "tcg", kernel=vm_kernel.vmlinux, initrd=short_tmp / "i",
                                    memory_mb=128, console=short_tmp / "c")  # fmt: skip


def test_micro_kernel_instances_get_a_balloon_that_takes_freed_ram_back(tmp_path: Path) -> None:
    """The micro kernel reports the pages it frees to virtio-balloon (test_e2e measures what the
    host gets back); Debian's kernel has the driver as a module nobody loads: no device."""
    balloon = "virtio-balloon-pci,free-page-reporting=on"
    files = {"kernel": tmp_path / "k", "initrd": tmp_path / "i", "memory_mb": 64, "console": tmp_path / "c"}
    assert balloon in boot_argv(QemuProviderConfig(), "tcg", **files)  # type: ignore[arg-type]
    assert balloon not in boot_argv(QemuProviderConfig(kernel="cloud"), "tcg", **files)  # type: ignore[arg-type]
    # An image keeps the kernel it was built with: its release decides, not the config.
    on_cloud = boot_argv(QemuProviderConfig(), "tcg", kernel_version="6.1.0-56-cloud-amd64", **files)  # type: ignore[arg-type]
    assert balloon not in on_cloud


APP_RANDOM = r"""
#include <errno.h>
#include <stdio.h>
#include <sys/random.h>
int main(void) {
    char buf[16];
    ssize_t n = getrandom(buf, sizeof buf, GRND_NONBLOCK);
    printf("getrandom=%s\n", n == (ssize_t)sizeof buf ? "ready" : errno == EAGAIN ? "EAGAIN" : "failed");
    return 0;
}
"""


@pytest.mark.vm
@pytest.mark.parametrize("flavour", ["micro", "cloud"])
def test_random_numbers_are_ready_when_the_app_starts(flavour: str, vm_kernel: Kernel, short_tmp: Path) -> None:
    """The guest kernel's CRNG is seeded at boot. Unseeded, an app's first getrandom() or read
    of /dev/urandom runs the kernel's jitter entropy collection: ~1 s of CPython's and
    Node.js's start-up under TCG. Non-blocking, the call says which it would be."""
    if flavour == "micro":
        try:
            kernel = load(default_kernel_root(), "micro")
        except FileNotFoundError:
            pytest.skip("no micro kernel: run `make setup`")
    else:
        kernel = vm_kernel
    _, lines = _boot_on_providers_machine(
        short_tmp, kernel, QemuProviderConfig(kernel=flavour), APP_RANDOM, run_config_cpio(env={}), []
    )
    assert "getrandom=ready" in lines, "\n".join(lines)


@pytest.mark.parametrize(
    ("setting", "ksm", "memfd"),
    [("auto", "0\n", True), ("auto", "1\n", False), ("auto", None, True), ("memfd", "1\n", True),
     ("anonymous", "0\n", False)],
)  # fmt: skip
def test_guest_ram_is_a_memfd_unless_ksm_would_merge_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str, ksm: str | None, memfd: bool
) -> None:
    from unik.providers.qemu import boot as qemu

    run = tmp_path / "run"
    if ksm is not None:
        run.write_text(ksm)
    monkeypatch.setattr(qemu, "KSM_RUN", run)
    config = QemuProviderConfig(guest_memory=setting)  # type: ignore[arg-type]
    argv = boot_argv(config, "tcg", kernel=tmp_path / "k", initrd=tmp_path / "i", memory_mb=64, console=tmp_path / "c")
    machine = argv[argv.index("-machine") + 1]
    if memfd:
        assert machine == "pc,memory-backend=guest-ram"
        assert "memory-backend-memfd,id=guest-ram,size=64M" in argv
    else:
        assert machine == "pc" and not any("memory-backend" in a for a in argv)


async def _ctrl_alt_del(sock: Path) -> None:
    from qemu.qmp import QMPClient

    qmp = QMPClient("unik-test")
    await qmp.connect(str(sock))
    try:
        keys = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
        await qmp.execute("send-key", {"keys": keys})
    finally:
        await qmp.disconnect()


def _ctrl_alt_del_after_ready(kernel: Kernel, tmp: Path, run_config: bytes) -> tuple[list[str], int]:
    """Boot APP_SLEEP, wait until it is ready, press ctrl-alt-del over QMP: (console lines, qemu exit code)."""
    initrd = _build_image(tmp, kernel, APP_SLEEP)
    sock = tmp / "qmp.sock"
    deadline = time.monotonic() + BOOT_DEADLINE
    proc, log = _boot(tmp, kernel, initrd, run_config, qmp=sock)
    try:
        _wait_for_line(proc, log, b"app: ready", deadline)
        asyncio.run(_ctrl_alt_del(sock))
        code = _wait_exit(proc, deadline)
    finally:
        if proc.poll() is None:
            proc.kill()
    return _console_lines(log), code


@pytest.mark.vm
def test_ctrl_alt_del_stops_app_gracefully(vm_kernel: Kernel, short_tmp: Path) -> None:
    lines, code = _ctrl_alt_del_after_ready(vm_kernel, short_tmp, run_config_cpio(env={}, args=[]))
    assert "app: got SIGTERM" in lines, "\n".join(lines)
    assert "unik: exit status 0" in lines, "\n".join(lines)
    assert code == 1


@pytest.mark.vm
def test_stop_timeout_escalates_to_sigkill(vm_kernel: Kernel, short_tmp: Path) -> None:
    run_config = run_config_cpio(env={}, args=["ignore"], stop_timeout=1)
    lines, code = _ctrl_alt_del_after_ready(vm_kernel, short_tmp, run_config)
    assert "app: got SIGTERM" not in lines
    assert "unik: killed by signal 9" in lines, "\n".join(lines)
    assert code == (((128 + 9) << 1) | 1) & 0xFF


@pytest.mark.vm
def test_missing_entrypoint_exits_127(vm_kernel: Kernel, short_tmp: Path) -> None:
    app_root = short_tmp / "root"
    app_root.mkdir()
    initrd = short_tmp / "initrd.cpio"
    assemble_initrd(
        initrd,
        init_binary=ensure_init_binary(short_tmp / "cache"),
        app_root=app_root,
        entrypoint=["/unik/nope"],
        args=[],
        env={},
        modules=[],
    )
    deadline = time.monotonic() + BOOT_DEADLINE
    proc, log = _boot(short_tmp, vm_kernel, initrd, run_config_cpio(env={}))
    try:
        code = _wait_exit(proc, deadline)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = _console_lines(log)
    assert "unik: cannot run /unik/nope: No such file or directory" in lines, "\n".join(lines)
    assert "unik: exit status 127" in lines
    assert code == ((127 << 1) | 1) & 0xFF
