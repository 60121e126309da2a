"""What the HTTP layer is configured with, each setting declared once (qwen_vl.options): the
process (qwen_vl.server.settings) turns these fields into flags and environment variables and
fills them; the API only reads them."""

from dataclasses import dataclass
from pathlib import Path

from qwen_vl.options import option

MIB = 1024 * 1024


@dataclass(frozen=True)
class ApiSettings:
    model: str  # vLLM's --model
    served_model_name: str  # the first of vLLM's --served-model-name, else the model
    api_keys: tuple[str, ...] = option(
        (), "accepted API key (repeat for several; env: space-separated); none = no auth", flag="--api-key",
    )
    api_key_file: Path | None = option(
        None, "file with accepted API keys, one per line (added to --api-key)",
    )
    protect_metrics: bool = option(False, "require an API key on /metrics too")
    cors_origins: tuple[str, ...] = option(
        (), "allowed CORS origin (repeat for several, '*' for any); unset = CORS off", flag="--cors-origin",
    )
    max_pending_requests: int = option(
        256, "generation requests admitted at once (running, waiting or fetching images); beyond it new ones "
        "get 503 with Retry-After",
    )
    request_timeout: float = option(
        600.0, "deadline of one generation request in seconds (0 = none); past it the request is aborted",
    )
    max_images_per_request: int | None = option(
        None, "images in one request, at most (400 beyond). Unset: as many as the context holds, 258 positions "
        "each (31 at 8192), as the original answers them", metavar="N", minimum=1,
    )
    max_request_bytes: int = option(32 * MIB, "request body size limit (413 beyond)")
    max_image_bytes: int = option(20 * MIB, "size limit of one image, encoded")
    max_image_pixels: int = option(40_000_000, "width x height limit (decompression-bomb guard)")
    image_fetch_timeout: float = option(10.0, "connect/read timeout of image URLs, s")
    image_max_redirects: int = option(3, "redirects followed for an image URL")
    allow_private_image_urls: bool = option(
        False, "allow image URLs that resolve to loopback/private/link-local/reserved addresses",
    )
    image_local_root: Path | None = option(
        None, "directory under which local image paths (file://) may be read; unset = none",
    )
    playground: bool = option(
        True, "do not serve the playground page at / (API-only deployments; / is then 404)", flag="--no-playground",
        negated=True,
    )

    def __post_init__(self):
        if self.api_key_file is not None:
            from_file = [line.strip() for line in self.api_key_file.read_text().splitlines() if line.strip()]
            object.__setattr__(self, "api_keys", self.api_keys + tuple(from_file))
