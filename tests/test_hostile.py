"""Hostile uploads over HTTP, against a real daemon: image builds and volume creates alike.

Every case must be refused with a 4xx and a message that says why, record nothing, leave
`<data>/tmp` empty (the daemon spools uploads there) and leave a canary directory beside the
data dir exactly as it was. tests/test_archive.py covers the unpacking rules one by one; this
is what a client sees.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import Daemon, free_port, tar_gz

UPLOAD_MB = 2
UNPACKED_MB = 16
BUILD = "base=linux&lang=c&provider=qemu"
MAIN_C = "int main(void) { return 0; }\n"


@dataclass
class Site:
    daemon: Daemon
    http: httpx.Client
    canary: Path

    @property
    def data_dir(self) -> Path:
        return self.daemon.data_dir


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    root = Path(tempfile.mkdtemp(prefix="unik-hostile-", dir="/tmp"))
    data_dir, canary = root / "data", root / "canary"
    data_dir.mkdir()
    canary.mkdir()
    (canary / "secret").write_text("do not touch\n")
    (canary / "secret").chmod(0o600)
    (data_dir / "daemon-config.yaml").write_text(f"max_upload_mb: {UPLOAD_MB}\nmax_unpacked_mb: {UNPACKED_MB}\n")
    daemon = Daemon(data_dir, free_port())
    daemon.start()
    try:
        with httpx.Client(base_url=f"http://{daemon.host}", timeout=60) as http:
            yield Site(daemon, http, canary)
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry below root (and beside it): mode and content."""
    found: dict[str, tuple[int, bytes | None]] = {}
    for path in [*sorted(root.parent.iterdir()), *sorted(root.rglob("*"))]:
        if path.name == "data":
            continue
        st = path.lstat()
        found[str(path)] = (st.st_mode, path.read_bytes() if stat.S_ISREG(st.st_mode) else None)
    return found


# -- archives ----------------------------------------------------------------------------------


def members(*entries: tarfile.TarInfo, data: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.addfile(_file("main.c", MAIN_C.encode()), io.BytesIO(MAIN_C.encode()))
        for entry in entries:
            content = (data or {}).get(entry.name, b"pwned\n")
            tar.addfile(entry, io.BytesIO(content) if entry.isreg() else None)
    return buffer.getvalue()


def _file(name: str, content: bytes = b"pwned\n") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mode = 0o644
    return info


def _special(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o777
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 8, 0  # /dev/sda
    return info


def decompression_bomb(unpacked_mb: int = 1024) -> bytes:
    """A tar.gz of one file of zeros, `unpacked_mb` big, about 1/1000 of that on the wire.

    Built as a multi-member gzip (valid, and what `cat a.gz b.gz` makes) so that the test
    need not compress a gigabyte: one 16 MB block of zeros, compressed once, repeated."""
    chunk = 16
    header = _file("zeros.bin", b"")
    header.size = unpacked_mb << 20
    end = bytes(1024)  # two zero blocks: the end of the archive
    zeros = gzip.compress(bytes(chunk << 20), 9)
    parts = [gzip.compress(header.tobuf(format=tarfile.GNU_FORMAT)), *[zeros] * (unpacked_mb // chunk)]
    return b"".join([*parts, gzip.compress(end)])


def cases(outside: Path) -> list[tuple[str, bytes, int, str]]:
    """(id, upload, status, what the message says); `outside` is the canary's path."""
    up = "../" * 8  # from any folder the daemon unpacks into, far above the data dir
    valid = tar_gz({"main.c": MAIN_C, "big.bin": os.urandom(64 << 10)})
    # A link to inside, a link through it to outside, then a file written through both.
    chain = [
        _special("sub", tarfile.DIRTYPE),
        _special("sub/link", tarfile.SYMTYPE, ".."),
        _special("sub/link/link2", tarfile.SYMTYPE, f"../{up}canary"),
        _file("sub/link/link2/pwned"),
    ]
    return [
        ("dotdot", members(_file("../escape")), 400, "escapes"),
        ("dotdot-deep", members(_file(f"src/{up}canary/pwned")), 400, "escapes"),
        ("absolute", members(_file(f"{outside}/pwned")), 400, "absolute path"),
        ("symlink-absolute", members(_special("link", tarfile.SYMTYPE, str(outside))), 400, "absolute path"),
        ("symlink-up", members(_special("link", tarfile.SYMTYPE, f"{up}canary")), 400, "outside"),
        ("write-through-symlink", members(*chain), 400, "outside"),
        ("hardlink-absolute", members(_special("hard", tarfile.LNKTYPE, f"{outside}/secret")), 400, "outside"),
        ("hardlink-up", members(_special("hard", tarfile.LNKTYPE, f"{up}canary/secret")), 400, "outside"),
        ("char-device", members(_special("sda", tarfile.CHRTYPE)), 400, "device file or fifo"),
        ("block-device", members(_special("sda", tarfile.BLKTYPE)), 400, "device file or fifo"),
        ("fifo", members(_special("pipe", tarfile.FIFOTYPE)), 400, "device file or fifo"),
        ("truncated", valid[: len(valid) // 2], 400, "not a valid tar.gz"),
        ("not-gzip", b"PK\x03\x04 this is a zip, not a tar.gz" * 100, 400, "not a readable tar.gz"),
        ("empty", b"", 400, "tar"),
        ("bomb", decompression_bomb(), 413, f"more than {UNPACKED_MB} MB"),
        ("over-the-upload-limit", os.urandom((UPLOAD_MB << 20) + 4096), 413, f"larger than {UPLOAD_MB} MB"),
    ]


CASE_IDS = [c[0] for c in cases(Path("/x"))]


def upload(site: Site, route: str, blob: bytes) -> httpx.Response:
    url = f"/images/hostile/create?{BUILD}" if route == "image" else "/volumes/hostile"
    return site.http.post(url, files={"tarfile": ("upload.tar.gz", blob, "application/gzip")})


def assert_nothing_made(site: Site, before: dict[str, tuple[int, bytes | None]]) -> None:
    assert site.http.get("/images").json() == []
    assert site.http.get("/volumes").json() == []
    for folder in ("images", "volumes", "tmp"):
        assert list((site.data_dir / folder).iterdir()) == [], folder
    assert snapshot(site.canary) == before


@pytest.mark.parametrize("route", ["image", "volume"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_hostile_upload_is_refused_and_leaves_nothing(site: Site, route: str, case: str) -> None:
    _, blob, status, fragment = next(c for c in cases(site.canary) if c[0] == case)
    before = snapshot(site.canary)
    response = upload(site, route, blob)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["message"]
    assert fragment.lower() in message.lower(), message
    assert "Traceback" not in message
    assert_nothing_made(site, before)


@pytest.mark.parametrize("route", ["image", "volume"])
def test_a_chunked_upload_over_the_limit_is_413(site: Site, route: str) -> None:
    """No Content-Length to judge up front: counted as it arrives, cut off past the bound."""
    before = snapshot(site.canary)

    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="tarfile"; filename="a.tgz"\r\n\r\n'
        for _ in range(UPLOAD_MB * 16 + 16):
            yield os.urandom(64 << 10)
        yield b"\r\n--b--\r\n"

    url = f"/images/hostile/create?{BUILD}" if route == "image" else "/volumes/hostile"
    response = site.http.post(url, content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413, response.text
    assert f"larger than {UPLOAD_MB} MB" in response.json()["message"]
    assert_nothing_made(site, before)


def test_the_daemon_still_works_after_all_that(site: Site) -> None:
    made = site.http.post("/volumes/fine", files={"tarfile": ("ok.tar.gz", tar_gz({"a.txt": "a\n"}))})
    assert made.status_code == 201, made.text
    assert [v["Name"] for v in site.http.get("/volumes").json()] == ["fine"]
    assert site.http.delete("/volumes/fine").status_code == 204
    assert list((site.data_dir / "tmp").iterdir()) == []
