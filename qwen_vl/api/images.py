"""Untrusted image references (data URLs, http(s) URLs, local paths) -> PIL images.

Everything here assumes hostile input: sizes are bounded before bytes are read
and pixel counts before pixels are decoded; URLs may only reach public
addresses (SSRF); local files only under one directory. Every refusal is an
`ImageError`, whose message is meant for the client (a 400 response).

Decoding runs in a worker thread, off the event loop, and ends with the
original's `convert("RGB")` (alpha dropped, not composited): the image comes
back as RGB, and one that cannot convert fails the request early.
"""

import asyncio
import base64
import io
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
from PIL import Image

# Web and camera formats only. Pillow can open several dozen more; the exotic
# ones add attack surface without serving users (EPS even runs Ghostscript).
# JPEG includes MPO, the multi-picture JPEG many phones write.
Image.init()
ALLOWED_FORMATS = tuple(f for f in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "AVIF") if f in Image.OPEN)

_REDIRECT_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class ImageLimits:
    """What an image reference may cost and reach."""

    max_bytes: int = 20 * 1024 * 1024  # encoded size: download, file or decoded data URL
    # Checked from the header, before any pixel is decoded. Pillow's own guard
    # (Image.MAX_IMAGE_PIXELS, ~89M, an error at twice that) stays in force too.
    max_pixels: int = 50_000_000
    # The model sees 448x448; sides beyond this are strips no one means to send.
    max_side: int = 20_000
    fetch_timeout: float = 10.0  # seconds for a whole download, redirects included
    max_redirects: int = 3
    allow_private_networks: bool = False
    local_root: Path | None = None  # local paths are refused unless this is set


class ImageError(ValueError):
    """An image reference that cannot be served; `str()` is the client-facing message.

    `code` is one of "invalid_image", "image_too_large", "image_fetch_failed",
    "url_not_allowed".
    """

    def __init__(self, message: str, code: str = "invalid_image"):
        super().__init__(message)
        self.code = code


def new_client(limits: ImageLimits) -> httpx.AsyncClient:
    """A client for image downloads. Making one costs milliseconds (it loads
    the CA certificates): a server keeps one for its lifetime."""
    return httpx.AsyncClient(trust_env=False, timeout=limits.fetch_timeout)


async def load_image(url: str, limits: ImageLimits, client: httpx.AsyncClient | None = None) -> Image.Image:
    """Load one image from a data URL, an http(s) URL or a local path.

    `client` is reused for downloads when given (a long-lived one pools
    connections); any client is safe, because requests go to addresses vetted
    here, not to names the client would resolve itself. (Behind an https
    proxy from the environment, https downloads fail the certificate check:
    httpx sends the proxy the IP, not the name. Hence trust_env=False.)
    """
    scheme = url[: url.find(":") + 1].lower()  # "" for a plain path
    if scheme == "data:":
        return await asyncio.to_thread(lambda: _decode(_data_url_bytes(url, limits), limits))
    if scheme in ("http:", "https:"):
        if client is None:
            async with new_client(limits) as own_client:
                data = await _download(url, limits, own_client)
        else:
            data = await _download(url, limits, client)
    elif scheme == "file:" or url.startswith("/"):
        data = await asyncio.to_thread(_read_local, url, limits)
    else:
        raise ImageError("image URL must be a data:image/...;base64 URL or an http(s) URL", "url_not_allowed")
    return await asyncio.to_thread(_decode, data, limits)


async def load_images(
    urls: list[str], limits: ImageLimits, client: httpx.AsyncClient | None = None
) -> list[Image.Image]:
    """Load several images concurrently; the first failure cancels the rest.

    Errors name the image by its 1-based position ("image 2: ..."), as the
    prompt numbers them ("Picture 2:").
    """
    async def numbered(position: int, url: str) -> Image.Image:
        try:
            return await load_image(url, limits, client)
        except ImageError as error:
            raise ImageError(f"image {position}: {error}", error.code) from error

    tasks = [asyncio.ensure_future(numbered(i + 1, url)) for i, url in enumerate(urls)]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # gather leaves the others running when one fails
            task.cancel()


def is_public_address(address: str) -> bool:
    """Whether an IP address is on the public internet: what a URL may reach.

    `is_global` already excludes loopback, RFC 1918, link-local (cloud metadata
    at 169.254.169.254), unspecified, shared (100.64/10) and documentation
    ranges. It lets multicast, IPv6 site-local and parts of the IPv6 reserved
    space through, so those are refused explicitly; IPv6 addresses that embed
    an IPv4 one (::ffff:a.b.c.d, 6to4) are judged by the IPv4 address.
    """
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip.ipv4_mapped or ip.sixtofour or ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


# --- data URLs ---------------------------------------------------------------


def _data_url_bytes(url: str, limits: ImageLimits) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    params = header.split(";")
    if not comma or not params[0].lower().startswith("image/") or params[-1].lower() != "base64":
        raise ImageError("data URL must have the form data:image/<type>;base64,<data>")
    # Refuse by the encoded length first (4 characters per 3 bytes, rounded up),
    # so an oversized payload is never decoded.
    if len(payload) > (limits.max_bytes + 2) // 3 * 4:
        raise ImageError(f"image is larger than {limits.max_bytes} bytes", "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:  # binascii.Error, or a plain ValueError for non-ASCII characters
        raise ImageError("data URL is not valid base64") from None
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is larger than {limits.max_bytes} bytes", "image_too_large")
    return data


# --- http(s) -----------------------------------------------------------------


async def _download(url: str, limits: ImageLimits, client: httpx.AsyncClient) -> bytes:
    try:
        return await asyncio.wait_for(_follow_redirects(httpx.URL(url), limits, client), limits.fetch_timeout)
    except httpx.InvalidURL:  # httpx checks a redirect's Location itself (an HTTPError)
        raise ImageError("image URL is malformed") from None
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise ImageError("image download timed out", "image_fetch_failed") from None
    except httpx.HTTPError as error:
        reason = str(error) or type(error).__name__
        raise ImageError(f"image download failed: {reason}", "image_fetch_failed") from None


async def _follow_redirects(url: httpx.URL, limits: ImageLimits, client: httpx.AsyncClient) -> bytes:
    # Redirects are followed here, not by httpx, so that every hop is resolved
    # and vetted like the first.
    for _ in range(limits.max_redirects + 1):
        result = await _get(url, limits, client)
        if isinstance(result, bytes):
            return result
        url = result
        if url.scheme not in _REDIRECT_SCHEMES:
            raise ImageError("image URL redirects to a non-http(s) URL", "url_not_allowed")
    raise ImageError(f"image URL redirects more than {limits.max_redirects} times", "image_fetch_failed")


async def _get(url: httpx.URL, limits: ImageLimits, client: httpx.AsyncClient) -> bytes | httpx.URL:
    """One GET: the body, or the URL a redirect points to.

    DNS rebinding defence: the host is resolved once, here; all its addresses
    are vetted, and the request is sent to a vetted address itself (the URL
    carries the IP). The name travels only where the server needs it: the Host
    header, and for https the TLS server name (SNI), which is also the name the
    certificate is verified against. So no second lookup can swap in an
    internal address between the check and the connection.
    """
    host = url.raw_host.decode("ascii")
    if not host:
        raise ImageError("image URL has no host")
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = await _resolve(host, port, limits)
    for address in addresses[:-1]:  # the next address when one does not answer
        try:
            return await _get_from(address, url, limits, client)
        except httpx.ConnectError:
            continue
    return await _get_from(addresses[-1], url, limits, client)


async def _get_from(
    address: str, url: httpx.URL, limits: ImageLimits, client: httpx.AsyncClient
) -> bytes | httpx.URL:
    async with client.stream(
        "GET",
        url.copy_with(host=address),
        headers={"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity"},
        extensions={"sni_hostname": url.raw_host.decode("ascii")},
        follow_redirects=False,
    ) as response:
        if response.is_redirect:
            return url.join(response.headers["location"])
        if not response.is_success:
            raise ImageError(f"image URL returned HTTP {response.status_code}", "image_fetch_failed")
        return await _read_body(response, limits.max_bytes)


async def _resolve(host: str, port: int, limits: ImageLimits) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ImageError(f"image host {host!r} cannot be resolved", "image_fetch_failed") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    # All addresses, not just the first: a host may publish one public and one
    # internal address and hope the client picks the second.
    if not limits.allow_private_networks and not all(map(is_public_address, addresses)):
        raise ImageError(f"image host {host!r} is not on the public internet", "url_not_allowed")
    return addresses


async def _read_body(response: httpx.Response, max_bytes: int) -> bytes:
    too_large = ImageError(f"image is larger than {max_bytes} bytes", "image_too_large")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    # Counted after any content decoding: a small compressed body cannot expand
    # past the limit (and identity was asked for).
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


# --- local files -------------------------------------------------------------


def _read_local(url: str, limits: ImageLimits) -> bytes:
    if limits.local_root is None:
        raise ImageError("local image paths are not allowed", "url_not_allowed")
    if url.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ImageError("file URLs must name a local path", "url_not_allowed")
        url = unquote(parts.path)
    # Both sides resolved (symlinks and "..") before comparing, so neither a
    # "../" nor a symlink under the root can lead outside it.
    try:
        path = Path(url).resolve()
    except (ValueError, RuntimeError):  # a NUL byte; a symlink loop
        raise ImageError("local image path is malformed") from None
    if not path.is_relative_to(limits.local_root.resolve()):
        raise ImageError("local image path is outside the allowed directory", "url_not_allowed")
    if not path.is_file():  # also keeps a FIFO from blocking the read forever
        raise ImageError("local image file does not exist", "image_fetch_failed")
    try:
        with path.open("rb") as file:
            data = file.read(limits.max_bytes + 1)
    except OSError:
        raise ImageError("local image file cannot be read", "image_fetch_failed") from None
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is larger than {limits.max_bytes} bytes", "image_too_large")
    return data


# --- decoding ----------------------------------------------------------------


def _decode(data: bytes, limits: ImageLimits) -> Image.Image:
    """Bytes -> a loaded image whose convert("RGB") is known to work. Blocking."""
    if not data:
        raise ImageError("image is empty")
    # Decoders for untrusted bytes fail in many ways (OSError, SyntaxError,
    # struct.error, ValueError, ...), each meaning "not a valid image"; the
    # broad excepts below cover only Pillow calls.
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard (the warning only under -W error); ours is tighter by default.
        raise ImageError(f"image has more than {limits.max_pixels} pixels", "image_too_large") from None
    except Exception:
        raise ImageError(f"image is not a valid {'/'.join(ALLOWED_FORMATS)} file") from None

    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max(width, height) > limits.max_side:
        raise ImageError(f"image side is longer than {limits.max_side} pixels ({width}x{height})", "image_too_large")
    if width * height > limits.max_pixels:
        raise ImageError(f"image has more than {limits.max_pixels} pixels ({width}x{height})", "image_too_large")

    try:
        image.load()  # the first frame: open() leaves animations there
        if getattr(image, "n_frames", 1) > 1:
            # A plain single-frame copy: nothing downstream can step to frame 2.
            image = image.copy()
        # The original's conversion, done once here, off the event loop.
        if image.mode != "RGB":
            image = image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image has more than {limits.max_pixels} pixels", "image_too_large") from None
    except Exception:
        raise ImageError("image data is corrupt or truncated, or its pixel format is not supported") from None
    return image
