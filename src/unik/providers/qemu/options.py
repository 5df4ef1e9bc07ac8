"""QEMU command-line options as typed values that format themselves, and the one quoting rule.

Every option whose value is a `key=value,...` list (-chardev, -device, -blockdev, -netdev,
-machine, -accel, -object, -fw_cfg, -qmp, -name) is built here from its parts, each value going
through `quote`; options QEMU takes whole (-kernel, -initrd, -append, -pidfile, -bios) are `Arg`s
and pass unquoted. Every value has an explicit key (`-qmp unix:path=PATH`, `-name guest=NAME`):
where QEMU lets the first value go without one, an `=` in that value would make what precedes
it a key, which no quoting can prevent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

# One property value; a bool is QEMU's on/off.
Value = str | int | bool | Path
# A tuple repeats the key, once per item (`hostfwd=...,hostfwd=...`); None leaves the key out.
PropValue = Value | tuple[Value, ...] | None
Props = Mapping[str, PropValue]


def quote(value: Value) -> str:
    """`value` as it must appear after `key=` in a QEMU option.

    Both of QEMU's parsers of such lists (QemuOpts and keyval) end a value at a single comma
    and read a doubled one as a comma of the value. Nothing else is special there: qemu gets
    its argv from exec, not from a shell, so spaces, quotes and `=` pass as they are."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")


def _word(name: str) -> str:
    """A key, driver or id: written as is, so it must not be able to end or split the list."""
    if not name or "," in name or "=" in name:
        raise ValueError(f"{name!r} cannot be a QEMU option key or name")
    return name


def format_props(head: str | None, props: Props) -> str:
    """`head,key=value,...`: the driver or backend first (QEMU's implied key) when there is one."""
    parts = [] if head is None else [_word(head)]
    for key, value in props.items():
        if value is None:
            continue
        for item in value if isinstance(value, tuple) else (value,):
            parts.append(f"{_word(key)}={quote(item)}")
    return ",".join(parts)


class Option(Protocol):
    def argv(self) -> list[str]: ...


def flatten(options: Iterable[Option]) -> list[str]:
    return [word for option in options for word in option.argv()]


@dataclass(frozen=True)
class Arg:
    """A flag alone (`-daemonize`) or with a value QEMU takes whole, never split at commas
    (`-kernel PATH`, `-initrd PATH`, `-pidfile PATH`, `-append CMDLINE`): no quoting."""

    flag: str
    value: str | int | Path | None = None

    def argv(self) -> list[str]:
        return [self.flag] if self.value is None else [self.flag, str(self.value)]


@dataclass(frozen=True)
class ChardevFile:
    """Guest output appended to a file (`append` keeps it across restarts of the VM)."""

    id: str
    path: Path
    append: bool = True

    def argv(self) -> list[str]:
        return ["-chardev", format_props("file", {"id": self.id, "path": self.path, "append": self.append})]


@dataclass(frozen=True)
class ChardevSocket:
    """A unix socket qemu listens on; `wait=False` lets the VM start before anyone connects."""

    id: str
    path: Path
    server: bool = True
    wait: bool = False

    def argv(self) -> list[str]:
        props = {"id": self.id, "path": self.path, "server": self.server, "wait": self.wait}
        return ["-chardev", format_props("socket", props)]


@dataclass(frozen=True)
class Serial:
    """The next serial port of the guest (ttyS0, ttyS1, ... in the order given), on a chardev."""

    chardev: str

    def argv(self) -> list[str]:
        return ["-serial", f"chardev:{_word(self.chardev)}"]


@dataclass(frozen=True)
class Qmp:
    """A QMP monitor on a unix socket qemu listens on. `path=` is spelled out: QEMU reads the
    legacy `unix:PATH,...` with PATH as the implied first value, where an `=` in it makes
    everything before it a key."""

    path: Path

    def argv(self) -> list[str]:
        return ["-qmp", "unix:" + format_props(None, {"path": self.path, "server": True, "wait": False})]


@dataclass(frozen=True)
class Name:
    """The VM's name (process listings, QMP's query-name)."""

    guest: str

    def argv(self) -> list[str]:
        return ["-name", format_props(None, {"guest": self.guest})]


@dataclass(frozen=True)
class Device:
    driver: str
    props: Props = field(default_factory=dict)

    def argv(self) -> list[str]:
        return ["-device", format_props(self.driver, self.props)]

    def qmp(self) -> dict[str, Any]:
        """The same device as `device_add` arguments (JSON: nothing to quote)."""
        return {"driver": self.driver, **{k: _json(v) for k, v in self.props.items() if v is not None}}


@dataclass(frozen=True)
class Blockdev:
    """A disk image file as a block node, in `format` (raw: the guest sees the file's bytes)."""

    node_name: str
    filename: str | Path
    format: str = "raw"

    def argv(self) -> list[str]:
        props = {"node-name": self.node_name, "file.driver": "file", "file.filename": self.filename}
        return ["-blockdev", format_props(None, {"driver": self.format, **props})]

    def qmp(self) -> dict[str, Any]:
        """The same node as `blockdev-add` arguments."""
        return {
            "driver": self.format,
            "node-name": self.node_name,
            "file": {"driver": "file", "filename": str(self.filename)},
        }


@dataclass(frozen=True)
class Netdev:
    backend: Literal["user", "tap"]
    id: str
    props: Props = field(default_factory=dict)

    def argv(self) -> list[str]:
        return ["-netdev", format_props(self.backend, {"id": self.id, **self.props})]


@dataclass(frozen=True)
class Machine:
    type: str
    props: Props = field(default_factory=dict)

    def argv(self) -> list[str]:
        return ["-machine", format_props(self.type, self.props)]


@dataclass(frozen=True)
class Accel:
    type: str
    props: Props = field(default_factory=dict)

    def argv(self) -> list[str]:
        return ["-accel", format_props(self.type, self.props)]


@dataclass(frozen=True)
class MemoryBackend:
    """Guest RAM as a QOM object a -machine names (`memory-backend=ID`)."""

    id: str
    size_mb: int
    kind: Literal["memfd", "file", "ram"] = "memfd"
    props: Props = field(default_factory=dict)

    def argv(self) -> list[str]:
        props = {"id": self.id, "size": f"{self.size_mb}M", **self.props}
        return ["-object", format_props(f"memory-backend-{self.kind}", props)]


@dataclass(frozen=True)
class FwCfg:
    """A host file the guest reads as /sys/firmware/qemu_fw_cfg/by_name/NAME/raw."""

    name: str
    file: Path

    def argv(self) -> list[str]:
        return ["-fw_cfg", format_props(None, {"name": self.name, "file": self.file})]


def _json(value: PropValue) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_json(item) for item in value]
    return value
