"""Operator-facing security settings, on a server started with them: keys
from a file (several accepted), /metrics behind the key, CORS for one origin,
and image URLs to private addresses refused (the default)."""

import httpx
import pytest

from tests.helpers import SERVED_MODEL, image_part, pattern_image, start_server

KEYS = ("first-key", "second-key")
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def hardened(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardened")
    key_file = folder / "keys"
    key_file.write_text("\n".join(KEYS) + "\n")
    server = start_server(
        tiny_checkpoint, folder / "server.log",
        "--api-key-file", str(key_file), "--protect-metrics", "--cors-origin", ORIGIN,
    )
    yield server.url
    server.stop()


def chat(url: str, key: str | None, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    payload = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=payload, headers=headers, timeout=60)


def test_every_key_from_the_file_is_accepted(hardened):
    for key in KEYS:
        assert chat(hardened, key).status_code == 200
    assert chat(hardened, "test-key").status_code == 200  # --api-key still counts too


def test_a_key_not_in_the_file_is_refused(hardened):
    response = chat(hardened, "third-key")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_protected_metrics_need_a_key_but_health_does_not(hardened):
    assert httpx.get(f"{hardened}/metrics").status_code == 401
    assert httpx.get(f"{hardened}/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 200
    assert httpx.get(f"{hardened}/health").status_code == 200


def test_cors_allows_the_configured_origin_only(hardened):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{hardened}/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{hardened}/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_image_urls_to_loopback_are_refused_by_default(hardened, image_host):
    url = image_host("private.png", pattern_image(3, (64, 64)))
    for target in (url, url.replace("127.0.0.1", "localhost")):
        content = [image_part(target), {"type": "text", "text": "?"}]
        response = chat(hardened, KEYS[0], messages=[{"role": "user", "content": content}])
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "url_not_allowed"
