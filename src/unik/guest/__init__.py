"""The guest side of an image: the init program and the initramfs it runs from.

An image's initrd is an uncompressed cpio ``newc`` archive written here without root (device
nodes are just archive entries) and reproducibly (mtime 0, uid/gid 0, sorted walk). At each boot
the host concatenates a second, tiny archive (``run_config_cpio``) after it; the kernel unpacks
both, the second on top of the first. A big image's instances instead all boot the image's own
initrd file, and each gets its run archive as the qemu fw_cfg file ``FW_CFG_RUN_ARCHIVE``,
which init unpacks the same way before it reads anything from it (kernels with fw_cfg in sysfs).

Guest protocol (read by init.c, PID 1)::

    /init                   the init program (static musl binary built from init.c)
    /dev/console            char device 5,1 so the kernel can give init a console
    /dev /proc /sys         mount points (devtmpfs, proc, sysfs)
    /tmp                    a directory of the root, which is already a tmpfs
    /unik/modules           kernel modules to load, one absolute path per line, in load order
    /lib/modules/NAME.ko    the modules themselves
    /unik/entrypoint        argv prefix, NUL-terminated words (e.g. "/unik/app\\0")
    /unik/args              default arguments, NUL-terminated words
    /unik/env               baked environment, NUL-terminated KEY=VALUE words
    /unik/...               the app itself, from the compiler's app_root (e.g. /unik/app)

    per boot, from the second archive:
    /unik/run/env           environment applied after /unik/env (wins on conflicts)
    /unik/run/args          when present, replaces /unik/args (may be empty: no arguments)
    /unik/run/hostname      one line
    /unik/run/stop_timeout  integer seconds between SIGTERM and SIGKILL on a graceful stop
    /unik/run/net           the network interface's setup, "key=value" lines: address=A.B.C.D/N,
                            gateway=A.B.C.D, dns=A.B.C.D; or address=dhcp alone (the address,
                            route, DNS and MTU from the network's DHCP server); absent: loopback only
                            config=imds (only with address=dhcp, see ``DHCP_IMDS``): once leased, init
                            fetches EC2 user-data from the instance metadata service (IMDSv2) and
                            unpacks it as a run archive over this one (hostname, env, args, mounts,
                            mount and stop timeouts; not the network, already up); without user-data
                            (404) or no answer within ~10 s, the baked run configuration stays
    /etc/resolv.conf        "nameserver DNS" when the network has a dns
    /unik/run/mounts        volumes to mount before the app starts: "SERIAL MOUNTPOINT FSTYPE" lines
                            (SERIAL is the disk's serial: virtio-blk's, or an NVMe controller's such as
                            an EBS volume's "vol0123..."; FSTYPE ext2/ext4/vfat, or auto)
    /unik/run/mount_timeout integer seconds (0..3600) to wait for the mounts' disks to appear, all
                            together (default 15): EBS volumes are attached only once the instance runs

Init's defaults: PATH=/unik:/bin:/usr/bin, HOME=/, stop timeout 5 s, mount timeout 15 s. When the
app is gone it prints ``\\nunik: exit status N\\n`` or ``\\nunik: killed by signal N\\n`` on the
console (see ``EXIT_LINE``), then exits qemu through isa-debug-exit (port 0xf4) with code N, or
128+N for a signal, so qemu's own exit status is ``((code << 1) | 1) & 0xff``; without that device
it powers off (qemu status 0).
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import BinaryIO

from unik.errors import BadRequest, Conflict

__all__ = [
    "DHCP",
    "DHCP_IMDS",
    "EXIT_LINE",
    "FW_CFG_RUN_ARCHIVE",
    "CpioWriter",
    "assemble_initrd",
    "check_control_answer",
    "ensure_init_binary",
    "guest_fs_type",
    "run_config_cpio",
]

# init.c's bound on /unik/run/mount_timeout (it would ignore a larger value and wait 15 s).
MAX_MOUNT_TIMEOUT = 3600

# The fw_cfg name of a boot's run archive; init.c reads it under /sys/firmware/qemu_fw_cfg/by_name.
FW_CFG_RUN_ARCHIVE = "opt/unik/run"

# Matches init's final console line; the serial tty turns "\n" into "\r\n".
EXIT_LINE = re.compile(rb"^unik: (exit status|killed by signal) (\d+)\r?$", re.MULTILINE)

_INIT_SOURCE = Path(__file__).with_name("init.c")
_CC_FLAGS = ["-static", "-Os", "-s", "-Wall"]
_CHUNK = 1 << 20


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    """A minimal cpio ``newc`` writer (the format the kernel's initramfs unpacker reads).

    Paths are given relative to the archive root (a leading "/" is dropped). Missing parent
    directories are added automatically (the kernel does not create them), a directory added
    twice is written once, and any other duplicate path is an error.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._ino = 0
        self._dirs: set[str] = set()
        self._others: set[str] = set()
        self._closed = False

    @staticmethod
    def _norm(path: str) -> str:
        parts = [p for p in str(path).split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise ValueError(f"bad archive path {path!r}")
        return "/".join(parts)

    def _header(self, name: str, mode: int, size: int, nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise ValueError("archive already closed")
        encoded = name.encode() + b"\0"
        if name == "TRAILER!!!":
            ino = 0
        else:
            self._ino += 1
            ino = self._ino
        fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._f.write(header + encoded + b"\0" * _pad(len(header) + len(encoded)))

    def _claim(self, name: str, is_dir: bool) -> bool:
        """Record a path; False if it is a directory already written."""
        if is_dir:
            if name in self._dirs:
                return False
            if name in self._others:
                raise ValueError(f"{name!r} is already in the archive as a non-directory")
        elif name in self._dirs or name in self._others:
            raise ValueError(f"{name!r} is already in the archive")
        parent = name.rpartition("/")[0]
        if parent and parent not in self._dirs:
            self.add_dir(parent, 0o755)
        (self._dirs if is_dir else self._others).add(name)
        return True

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = self._norm(path)
        if self._claim(name, is_dir=True):
            self._header(name, stat.S_IFDIR | stat.S_IMODE(mode), 0, nlink=2)

    def add_file(self, path: str, data: bytes | Path, mode: int = 0o644) -> None:
        name = self._norm(path)
        self._claim(name, is_dir=False)
        if isinstance(data, bytes):
            self._header(name, stat.S_IFREG | stat.S_IMODE(mode), len(data))
            self._f.write(data)
            self._f.write(b"\0" * _pad(len(data)))
            return
        with open(data, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            self._header(name, stat.S_IFREG | stat.S_IMODE(mode), size)
            left = size
            while left:
                chunk = src.read(min(_CHUNK, left))
                if not chunk:
                    raise OSError(f"{data} shrank while being archived")
                self._f.write(chunk)
                left -= len(chunk)
        self._f.write(b"\0" * _pad(size))

    def add_symlink(self, path: str, target: str, mode: int = 0o777) -> None:
        name = self._norm(path)
        self._claim(name, is_dir=False)
        encoded = target.encode()
        self._header(name, stat.S_IFLNK | stat.S_IMODE(mode), len(encoded))
        self._f.write(encoded + b"\0" * _pad(len(encoded)))

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = self._norm(path)
        self._claim(name, is_dir=False)
        self._header(name, stat.S_IFCHR | stat.S_IMODE(mode), 0, rdev=(major, minor))

    def add_tree(self, root: Path) -> None:
        """Everything under ``root`` at the same relative path, sorted for reproducibility."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            rel_base = base.relative_to(root)
            # os.walk lists symlinks to directories as dirs; they must stay symlinks.
            entries = sorted([*dirnames, *filenames])
            for entry in entries:
                host = base / entry
                rel = (rel_base / entry).as_posix()
                st = host.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self.add_symlink(rel, os.readlink(host))
                elif stat.S_ISDIR(st.st_mode):
                    self.add_dir(rel, st.st_mode)
                elif stat.S_ISREG(st.st_mode):
                    self.add_file(rel, host, st.st_mode)
                else:
                    raise ValueError(f"{host}: only files, directories and symlinks can go in an image")

    def close(self) -> None:
        if not self._closed:
            self._header("TRAILER!!!", 0, 0)
            self._closed = True


def _words(words: list[str]) -> bytes:
    out = bytearray()
    for word in words:
        if "\0" in word:
            raise ValueError(f"argument or variable contains a NUL byte: {word!r}")
        out += word.encode() + b"\0"
    return bytes(out)


def _env_words(env: dict[str, str]) -> bytes:
    for key in env:
        if not key or "=" in key:
            raise ValueError(f"bad environment variable name {key!r}")
    return _words([f"{k}={v}" for k, v in env.items()])


def ensure_init_binary(cache_dir: Path) -> Path:
    """The compiled init for the current init.c, built once per source version."""
    source = _INIT_SOURCE.read_bytes()
    target = Path(cache_dir) / f"init-{hashlib.sha256(source).hexdigest()[:16]}"
    if target.is_file():
        return target
    compiler = shutil.which("musl-gcc")
    if compiler is None:
        raise RuntimeError("musl-gcc not found: install it with `apt-get install -y musl-tools`")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_s = tempfile.mkstemp(prefix=".init-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_s)
    try:
        proc = subprocess.run(
            [compiler, *_CC_FLAGS, "-o", str(tmp), str(_INIT_SOURCE)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the guest init failed:\n{proc.stdout}{proc.stderr}")
        tmp.chmod(0o755)
        # Concurrent builders write identical bytes, so whichever rename lands last is fine.
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def assemble_initrd(
    out: Path,
    *,
    init_binary: Path,
    app_root: Path,
    entrypoint: list[str],
    args: list[str],
    env: dict[str, str],
    modules: list[Path],
) -> None:
    """Write the image's initrd (uncompressed newc) to ``out``, atomically."""
    out = Path(out)
    names = [m.name for m in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"kernel modules with the same file name: {names}")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            w = CpioWriter(f)
            w.add_file("init", Path(init_binary), 0o755)
            w.add_dir("dev", 0o755)
            w.add_char_device("dev/console", 5, 1, 0o600)
            w.add_dir("proc", 0o555)
            w.add_dir("sys", 0o555)
            w.add_dir("tmp", 0o1777)
            w.add_dir("unik", 0o755)
            w.add_file("unik/entrypoint", _words(entrypoint))
            w.add_file("unik/args", _words(args))
            w.add_file("unik/env", _env_words(env))
            _add_modules(w, modules)
            w.add_tree(Path(app_root))
            w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _add_modules(w: CpioWriter, modules: list[Path]) -> None:
    w.add_file("unik/modules", "".join(f"/lib/modules/{m.name}\n" for m in modules).encode())
    for module in modules:
        w.add_file(f"lib/modules/{module.name}", Path(module), 0o644)


def modules_cpio(modules: list[Path], *, init_binary: Path | None = None) -> bytes:
    """An archive that, concatenated after an image's initrd, replaces the modules it loads
    (`/unik/modules`) and, given ``init_binary``, init itself: a later member of the same name
    overwrites an earlier one."""
    buf = io.BytesIO()
    w = CpioWriter(buf)
    if init_binary is not None:
        w.add_file("init", init_binary, 0o755)
    w.add_dir("unik", 0o755)
    w.add_dir("lib", 0o755)
    w.add_dir("lib/modules", 0o755)
    _add_modules(w, modules)
    w.close()
    return buf.getvalue()


def run_config_cpio(
    *,
    env: dict[str, str],
    args: list[str] | None = None,
    hostname: str | None = None,
    stop_timeout: int | None = None,
    mounts: list[tuple[str, str, str]] | None = None,
    mount_timeout: int | None = None,
    net: dict[str, str] | None = None,
) -> bytes:
    """The per-boot archive (``/unik/run/...``) to concatenate after an image's initrd."""
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_dir("unik", 0o755)
    w.add_dir("unik/run", 0o755)
    w.add_file("unik/run/env", _env_words(env))
    if args is not None:
        w.add_file("unik/run/args", _words(args))
    if hostname is not None:
        if not hostname or len(hostname) > 64 or any(c in hostname for c in "\0\r\n/ "):
            raise ValueError(f"bad hostname {hostname!r}")
        w.add_file("unik/run/hostname", hostname.encode() + b"\n")
    if stop_timeout is not None:
        if stop_timeout < 0:
            raise ValueError("stop_timeout must be >= 0")
        w.add_file("unik/run/stop_timeout", str(int(stop_timeout)).encode() + b"\n")
    if mounts:
        lines = []
        for words in mounts:
            if any(not word or any(c.isspace() or c == "\0" for c in word) for word in words):
                raise ValueError(f"bad mount {words!r}: no empty words, no whitespace")
            lines.append(" ".join(words) + "\n")
        w.add_file("unik/run/mounts", "".join(lines).encode())
    if mount_timeout is not None:
        if not 0 <= mount_timeout <= MAX_MOUNT_TIMEOUT:
            raise ValueError(f"mount_timeout must be 0..{MAX_MOUNT_TIMEOUT} seconds")
        w.add_file("unik/run/mount_timeout", str(int(mount_timeout)).encode() + b"\n")
    if net is not None:
        w.add_file("unik/run/net", _net_lines(net))
        if "dns" in net:
            # Written here rather than by init: a file in the archive costs the boot nothing.
            w.add_dir("etc", 0o755)
            w.add_file("etc/resolv.conf", f"nameserver {net['dns']}\n".encode())
    w.close()
    return buf.getvalue()


def check_control_answer(command: str, answer: str) -> None:
    """A control-channel answer (init.c's `TAG ok` / `TAG err WHY`, after the tag) as the
    daemon's errors: a busy unmount is a Conflict, any other refusal a BadRequest."""
    if answer == "ok":
        return
    why = answer.removeprefix("err ").strip() or "no answer (is the guest still booting?)"
    if why.startswith("busy"):
        raise Conflict(f"the guest cannot unmount {command.split()[-1]}: {why}")
    raise BadRequest(f"the guest refused {command.split()[0]!r}: {why}")


def guest_fs_type(fs_type: str) -> str:
    """The guest's name for a volume's filesystem (a /unik/run/mounts FSTYPE); raw disks are probed."""
    return {"fat": "vfat", "raw": "auto"}.get(fs_type, fs_type)


NET_KEYS = ("address", "gateway", "dns")
# The network config of a boot that asks the network's DHCP server.
DHCP: dict[str, str] = {"address": "dhcp"}
# The same, then the run archive from EC2's instance metadata service: user-data is a run archive.
DHCP_IMDS: dict[str, str] = {"address": "dhcp", "config": "imds"}


def _net_lines(net: dict[str, str]) -> bytes:
    """``/unik/run/net``: checked here so init.c can trust every line it parses."""
    if net == DHCP:
        return b"address=dhcp\n"
    if net == DHCP_IMDS:
        return b"address=dhcp\nconfig=imds\n"
    unknown = set(net) - set(NET_KEYS)
    if unknown or "address" not in net:
        raise ValueError(f"network config needs 'address' and only {NET_KEYS}: got {sorted(net)}")
    ipaddress.IPv4Interface(net["address"])
    if "/" not in net["address"]:
        raise ValueError(f"address {net['address']!r} needs a prefix length, e.g. 10.0.2.15/24")
    for key in ("gateway", "dns"):
        if key in net:
            ipaddress.IPv4Address(net[key])
    return "".join(f"{key}={net[key]}\n" for key in NET_KEYS if key in net).encode()
