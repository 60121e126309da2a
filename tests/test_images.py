"""load_image / load_images: untrusted image references -> loaded PIL images, or ImageError.

Network tests talk only to servers on 127.0.0.1 started here; public
addresses appear only as arguments to the address predicate.
"""

import asyncio
import base64
import http.server
import io
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib

import httpx
import pytest
from PIL import Image

from qwen_vl.api import images
from qwen_vl.api.images import ImageError, ImageLimits, is_public_address, load_image, load_images
from tests.helpers import data_url, turned_photo

LOCAL = ImageLimits(allow_private_networks=True)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def load(url: str, limits: ImageLimits = ImageLimits(), client: httpx.AsyncClient | None = None) -> Image.Image:
    return asyncio.run(load_image(url, limits, client))


def refusal(url: str, limits: ImageLimits = ImageLimits()) -> ImageError:
    with pytest.raises(ImageError) as caught:
        load(url, limits)
    return caught.value


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height, its image data an empty chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


PNG = encode(Image.new("RGB", (32, 24), (10, 200, 30)), "PNG")


# --- data URLs: what decodes --------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"])
def test_png_modes_come_back_converted_to_rgb_as_the_original_does(mode):
    original = Image.new(mode, (8, 6))
    image = load(data_url(encode(original, "PNG")))
    assert image.mode == "RGB" and image.size == (8, 6)
    assert image.tobytes() == Image.open(io.BytesIO(encode(original, "PNG"))).convert("RGB").tobytes()


def test_png_pixels_survive():
    image = load(data_url(PNG))
    assert image.convert("RGB").getpixel((5, 5)) == (10, 200, 30)


def test_jpeg():
    image = load(data_url(encode(Image.new("RGB", (16, 16), "white"), "JPEG"), "image/jpeg"))
    assert image.format == "JPEG" and image.mode == "RGB"


def test_cmyk_jpeg_is_converted_to_rgb():
    image = load(data_url(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), "image/jpeg"))
    assert image.mode == "RGB"
    assert image.getpixel((8, 8))[0] > 200


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_not_applied_as_the_original_does(orientation):
    data = turned_photo(orientation)
    image = load(data_url(data, "image/jpeg"))
    assert image.size == (96, 64)
    assert image.tobytes() == Image.open(io.BytesIO(data)).convert("RGB").tobytes()


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_gives_its_first_frame_only(fmt):
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    image = load(data_url(encode(red, fmt, save_all=True, append_images=[blue], lossless=True)))
    assert getattr(image, "n_frames", 1) == 1
    assert image.convert("RGB").getpixel((4, 4)) == (255, 0, 0)


# --- data URLs: what is refused -----------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(PNG[: len(PNG) // 2], id="truncated-png"),
        pytest.param(encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:300], id="truncated-jpeg"),
        pytest.param(b"\x00garbage" * 100, id="garbage"),
        pytest.param(PNG[:40] + bytes(200) + PNG[240:], id="corrupt-png"),
        pytest.param(png_header(0, 0), id="0x0"),
        pytest.param(encode(Image.new("RGB", (4, 4)), "PPM"), id="format-not-allowed"),
    ],
)
def test_undecodable_bytes_are_invalid_image(data):
    assert refusal(data_url(data)).code == "invalid_image"


def test_empty_data_is_invalid_image():
    assert refusal("data:image/png;base64,").code == "invalid_image"


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,iVBOR@@@",
        "data:image/png;base64,iVBORw0KGgo",  # missing padding
        "data:image/png;base64,iVBO Rw0K",  # whitespace
        "data:image/png,rawbytes",  # not base64
        "data:text/plain;base64," + base64.b64encode(PNG).decode(),
        "data:image/png;base64",  # no comma
    ],
)
def test_malformed_data_urls_are_invalid_image(url):
    assert refusal(url).code == "invalid_image"


def test_more_bytes_than_max_bytes_is_too_large():
    error = refusal(data_url(PNG), ImageLimits(max_bytes=len(PNG) - 1))
    assert error.code == "image_too_large"


def test_exactly_max_bytes_is_accepted():
    assert load(data_url(PNG), ImageLimits(max_bytes=len(PNG))).size == (32, 24)


def test_pixel_count_is_checked_from_the_header_before_decoding():
    # 8000 x 7000 = 56M pixels: above max_pixels, below Pillow's own guard. The
    # header has no pixel data, so decoding would fail with invalid_image instead.
    error = refusal(data_url(png_header(8000, 7000)))
    assert error.code == "image_too_large" and "pixels" in str(error)


def test_decompression_bomb_header_is_too_large():
    assert refusal(data_url(png_header(100_000, 100_000))).code == "image_too_large"


def test_small_file_of_many_pixels_is_too_large():
    bomb = encode(Image.new("1", (10_000, 6_000)), "PNG", optimize=True)
    assert len(bomb) < 100_000
    assert refusal(data_url(bomb)).code == "image_too_large"


def test_long_strip_is_too_large():
    strip = encode(Image.new("L", (1, 100_000)), "PNG")
    assert refusal(data_url(strip)).code == "image_too_large"


# --- references that are not allowed at all -------------------------------------


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/cat.png", "cat.png", "javascript:alert(1)", "", "C:/cat.png"])
def test_other_schemes_are_not_allowed(url):
    assert refusal(url).code == "url_not_allowed"


# --- the address predicate -----------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fec0::1",  # site-local
        "fc00::1",  # unique local
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::7f00:1",  # IPv4-compatible
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "1.1.1.1"])
def test_public_addresses_are_allowed(address):
    assert is_public_address(address)


# --- http -----------------------------------------------------------------------


class ImageServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a handler still sleeping in /slow must not hold up shutdown

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ImageHandler)
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        self.endless_sent = 0
        self.endless_done = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append((self.path, self.headers["Host"]))
        if self.path.startswith("/ok.png"):
            self.reply(200, PNG)
        elif self.path.startswith("/hop/"):
            left = int(self.path.removeprefix("/hop/"))
            self.redirect(f"/hop/{left - 1}" if left else "/ok.png")
        elif self.path == "/to-file":
            self.redirect("file:///etc/passwd")
        elif self.path == "/to-malformed":
            self.redirect("http://images.test:port/")
        elif self.path == "/to-other-loopback":
            self.redirect(f"http://127.0.0.2:{self.server.server_port}/ok.png")
        elif self.path == "/slow":
            time.sleep(3)
            self.reply(200, PNG)
        elif self.path == "/declared-huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif self.path == "/endless":
            self.endless()
        else:
            self.reply(404, b"not found")

    def reply(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def endless(self):
        """64 MiB without a Content-Length, until the client hangs up."""
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(1024):
                self.wfile.write(bytes(65536))
                self.server.endless_sent += 65536
        except OSError:
            pass
        finally:
            self.server.endless_done.set()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    server = ImageServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_dns(monkeypatch):
    """Resolve names under .test to 127.0.0.1, counting lookups; others as usual."""
    real_getaddrinfo = socket.getaddrinfo
    lookups = []

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".test"):
            lookups.append(host)
            return real_getaddrinfo("127.0.0.1", port, *args, **kwargs)
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_http_download(server):
    assert load(f"{server.url}/ok.png", LOCAL).size == (32, 24)


def test_http_error_status_fails(server):
    error = refusal(f"{server.url}/missing", LOCAL)
    assert error.code == "image_fetch_failed" and "404" in str(error)


def test_redirects_within_the_limit_are_followed(server):
    assert load(f"{server.url}/hop/2", LOCAL).size == (32, 24)  # 3 redirects


def test_redirects_beyond_the_limit_fail(server):
    assert refusal(f"{server.url}/hop/3", LOCAL).code == "image_fetch_failed"  # 4 redirects


def test_redirect_to_a_file_url_is_not_allowed(server):
    assert refusal(f"{server.url}/to-file", LOCAL).code == "url_not_allowed"


def test_redirect_to_a_malformed_url_fails(server):
    assert refusal(f"{server.url}/to-malformed", LOCAL).code == "image_fetch_failed"


@pytest.mark.parametrize("url", ["http://images.test:port/cat.png", "http://\x00/cat.png", "http:///cat.png"])
def test_malformed_http_url_is_invalid(url):
    assert refusal(url).code == "invalid_image"


def test_every_redirect_hop_is_vetted(server, monkeypatch):
    # Pretend 127.0.0.1 is public: the first hop passes, the redirect to
    # 127.0.0.2 must be refused before any connection (no server listens
    # there, so a connection attempt would be image_fetch_failed instead).
    monkeypatch.setattr(images, "is_public_address", lambda address: address == "127.0.0.1")
    assert refusal(f"{server.url}/to-other-loopback").code == "url_not_allowed"


def test_slow_server_times_out(server):
    started = time.monotonic()
    error = refusal(f"{server.url}/slow", ImageLimits(allow_private_networks=True, fetch_timeout=0.3))
    assert error.code == "image_fetch_failed" and "timed out" in str(error)
    assert time.monotonic() - started < 2


def test_declared_oversized_body_fails_without_reading(server):
    assert refusal(f"{server.url}/declared-huge", LOCAL).code == "image_too_large"


def test_oversized_stream_is_cut_off(server):
    error = refusal(f"{server.url}/endless", ImageLimits(allow_private_networks=True, max_bytes=100_000))
    assert error.code == "image_too_large"
    assert server.endless_done.wait(10)
    assert server.endless_sent < 1024 * 65536


def test_loopback_is_refused_by_default_without_a_request(server):
    error = refusal(f"{server.url}/ok.png?refused")
    assert error.code == "url_not_allowed"
    assert not any(path == "/ok.png?refused" for path, _ in server.requests)


def test_name_resolving_to_loopback_is_refused(server):
    assert refusal(f"http://localhost:{server.server_port}/ok.png").code == "url_not_allowed"


def test_request_goes_to_the_vetted_address_with_the_original_host(server, fake_dns, monkeypatch):
    monkeypatch.setattr(images, "is_public_address", lambda address: address == "127.0.0.1")
    assert load(f"http://images.test:{server.server_port}/ok.png?named").size == (32, 24)
    assert fake_dns == ["images.test"]  # resolved once, by the vetting, not again by httpx
    assert ("/ok.png?named", f"images.test:{server.server_port}") in server.requests


def test_unresolvable_host_fails():
    assert refusal("http://nonexistent.invalid/cat.png").code == "image_fetch_failed"


# --- https: the IP in the URL, the name in SNI and in the certificate check ----


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=images.test",
         "-addext", "subjectAltName=DNS:images.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = ImageServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, ssl.create_default_context(cafile=str(cert))
    server.shutdown()
    server.server_close()


def fetch_with(url: str, trust: ssl.SSLContext) -> Image.Image:
    async def fetch():
        async with httpx.AsyncClient(verify=trust) as client:
            return await load_image(url, LOCAL, client)

    return asyncio.run(fetch())


def test_https_certificate_is_checked_against_the_host_name(https_server, fake_dns):
    server, trust = https_server
    assert fetch_with(f"https://images.test:{server.server_port}/ok.png", trust).size == (32, 24)


def test_https_certificate_for_another_name_fails(https_server, fake_dns):
    server, trust = https_server
    with pytest.raises(ImageError) as caught:
        fetch_with(f"https://other.test:{server.server_port}/ok.png", trust)
    assert caught.value.code == "image_fetch_failed"


# --- local files ------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "cat.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    (root / "link.png").symlink_to(outside / "secret.png")
    return root, outside


def test_local_path_under_the_root_is_read(files):
    root, _ = files
    assert load(str(root / "cat.png"), ImageLimits(local_root=root)).size == (32, 24)


def test_file_url_under_the_root_is_read(files):
    root, _ = files
    assert load((root / "cat.png").as_uri(), ImageLimits(local_root=root)).size == (32, 24)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(lambda root, outside: str(outside / "secret.png"), id="outside"),
        pytest.param(lambda root, outside: f"{root}/../outside/secret.png", id="dotdot"),
        pytest.param(lambda root, outside: str(root / "link.png"), id="symlink"),
        pytest.param(lambda root, outside: f"file://{root}/../outside/secret.png", id="file-url-dotdot"),
        pytest.param(lambda root, outside: f"file://elsewhere{root}/cat.png", id="file-url-remote-host"),
    ],
)
def test_paths_leading_outside_the_root_are_not_allowed(files, path):
    root, outside = files
    assert refusal(path(root, outside), ImageLimits(local_root=root)).code == "url_not_allowed"


@pytest.mark.parametrize("path", ["/cat\x00.png", "file:///cat%00.png"])
def test_local_path_with_a_nul_byte_is_invalid(files, path):
    root, _ = files
    assert refusal(path, ImageLimits(local_root=root)).code == "invalid_image"


def test_symlink_loop_is_refused(files):
    root, _ = files
    (root / "loop.png").symlink_to(root / "loop.png")
    # Path.resolve raises on the loop up to Python 3.12; later the open does.
    assert refusal(str(root / "loop.png"), ImageLimits(local_root=root)).code in ("invalid_image", "image_fetch_failed")


def test_scheme_is_case_insensitive(server):
    assert load(f"HTTP://127.0.0.1:{server.server_port}/ok.png", LOCAL).size == (32, 24)


def test_local_paths_are_not_allowed_without_a_root(files):
    root, _ = files
    assert refusal(str(root / "cat.png")).code == "url_not_allowed"


def test_missing_local_file_fails(files):
    root, _ = files
    assert refusal(str(root / "dog.png"), ImageLimits(local_root=root)).code == "image_fetch_failed"


def test_local_file_larger_than_max_bytes_is_too_large(files):
    root, _ = files
    limits = ImageLimits(local_root=root, max_bytes=len(PNG) - 1)
    assert refusal(str(root / "cat.png"), limits).code == "image_too_large"


# --- several images -----------------------------------------------------------------


def test_load_images_keeps_the_order():
    sizes = [(4, 3), (5, 6), (7, 2)]
    urls = [data_url(encode(Image.new("RGB", size), "PNG")) for size in sizes]
    assert [image.size for image in asyncio.run(load_images(urls, ImageLimits()))] == sizes


def test_load_images_names_the_failing_image_by_position():
    with pytest.raises(ImageError) as caught:
        asyncio.run(load_images([data_url(PNG), "data:image/png;base64,@@"], ImageLimits()))
    assert str(caught.value).startswith("image 2: ") and caught.value.code == "invalid_image"


def test_load_images_does_not_wait_for_others_after_a_failure(server):
    started = time.monotonic()
    with pytest.raises(ImageError, match="^image 2: "):
        asyncio.run(load_images([f"{server.url}/slow", "data:image/png;base64,@@"], LOCAL))
    assert time.monotonic() - started < 2
