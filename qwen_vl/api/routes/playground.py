"""GET /: the playground page; its assets are served under /static (create_app mounts STATIC).
No key to load it: the page holds no secret, and asks for a key when the API answers 401."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

# The playground page and its assets; everything it loads or calls is this server.
STATIC = Path(__file__).parents[1] / "static"
CSP = "default-src 'self'; img-src 'self' data: blob:"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground():
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": CSP})
