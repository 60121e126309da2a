"""What the HTTP layer is configured with. The process (qwen_vl.server.settings)
fills it from flags and environment variables; the API only reads it."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    model: str
    served_model_name: str
    api_keys: tuple[str, ...]
    protect_metrics: bool
    cors_origins: tuple[str, ...]
    max_pending_requests: int
    request_timeout: float
    shutdown_grace_period: float
    max_images_per_request: int | None  # None: as many as the context holds
    max_request_bytes: int
    max_image_bytes: int
    max_image_pixels: int
    image_fetch_timeout: float
    image_max_redirects: int
    allow_private_image_urls: bool
    image_local_root: Path | None
    playground: bool
    log_level: str
