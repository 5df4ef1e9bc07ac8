"""Access: the bearer token, the upload bound, the running-instance cap, the bind warning."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import EXAMPLES, requires_vm
from unik.client import UnikAPIError, UnikClient
from unik.daemon import _is_loopback, build_app

TOKEN = "s3cret-token-for-tests"


def app_with(data_dir: Path, config: str) -> TestClient:
    (data_dir / "daemon-config.yaml").write_text(config)
    return TestClient(build_app(data_dir), raise_server_exceptions=False)


@pytest.fixture
def guarded(data_dir: Path) -> Iterator[TestClient]:
    with app_with(data_dir, f"auth_token: {TOKEN}\n") as client:
        yield client


def test_every_route_wants_the_token(guarded: TestClient) -> None:
    for method, path in [("GET", "/images"), ("GET", "/instances"), ("POST", "/instances/run"),
                         ("GET", "/openapi.json"), ("DELETE", "/volumes/x"), ("GET", "/version")]:  # fmt: skip
        response = guarded.request(method, path)
        assert response.status_code == 401, (method, path)
        assert "token" in response.json()["message"]
        assert response.headers["www-authenticate"] == "Bearer"
    wrong = guarded.get("/images", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    right = guarded.get("/images", headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200 and right.json() == []
    assert guarded.get("/_ping").text == "OK"  # health checks stay open
    # The dashboard page holds no data and must load to ask for the token; its API calls are guarded.
    assert guarded.get("/").status_code == 200 and guarded.get("/ui/app.js").status_code == 200


def test_token_from_the_environment(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIK_AUTH_TOKEN", TOKEN)
    with TestClient(build_app(data_dir)) as api:
        assert api.get("/images").status_code == 401
        assert api.get("/images", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_client_sends_its_token(guarded: TestClient) -> None:
    transport = guarded._transport  # the in-process app behind the test client
    with UnikClient("http://testserver", token=TOKEN, transport=transport) as client:
        assert client.images.list() == []
    with UnikClient("http://testserver", transport=transport) as anonymous, pytest.raises(UnikAPIError) as refused:
        anonymous.images.list()
    assert refused.value.status_code == 401


def test_upload_over_the_limit_is_413_and_leaves_nothing(data_dir: Path) -> None:
    with app_with(data_dir, "max_upload_mb: 1\n") as api:
        big = io.BytesIO(b"\0" * (2 << 20))
        response = api.post(
            "/images/big/create?base=linux&lang=c&provider=qemu", files={"tarfile": ("big.tar.gz", big)}
        )
        assert response.status_code == 413
        assert "1 MB" in response.json()["message"]
        assert api.get("/images").json() == []
    assert list((data_dir / "tmp").iterdir()) == []


def test_chunked_upload_over_the_limit_is_413(data_dir: Path) -> None:
    with app_with(data_dir, "max_upload_mb: 1\n") as api:

        def chunks() -> Iterator[bytes]:
            yield b'--x\r\nContent-Disposition: form-data; name="tarfile"; filename="a.tgz"\r\n\r\n'
            for _ in range(40):
                yield b"\0" * (64 << 10)

        response = api.post(
            "/images/big/create?base=linux&lang=c&provider=qemu",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert response.status_code == 413
        assert api.get("/images").json() == []


def test_loopback_detection_for_the_bind_warning() -> None:
    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.0.2.1")


@requires_vm
@pytest.mark.vm
def test_running_instance_cap(data_dir: Path) -> None:
    with app_with(data_dir, "max_running_instances: 1\n") as api:
        client = UnikClient("http://testserver", transport=api._transport)
        client.images.build("hello", EXAMPLES / "c-hello", "linux", "c", "qemu")
        client.instances.run("one", "hello")
        with pytest.raises(UnikAPIError) as refused:
            client.instances.run("two", "hello")
        assert refused.value.status_code == 409
        assert "max_running_instances" in str(refused.value)
        assert [i.Name for i in client.instances.list()] == ["one"]
        client.instances.stop("one")
        client.instances.run("two", "hello")
        with pytest.raises(UnikAPIError):
            client.instances.start("one")
        client.instances.delete("two", force=True)
        client.instances.delete("one")
