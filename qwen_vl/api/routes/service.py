"""GET /health, /version, /metrics and /v1/models: what operators and clients ask of the service."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import error_body
from ..protocol import ErrorResponse, ModelCard, ModelList
from ..state import Api

VERSION = "0.1.0"

router = APIRouter()


@router.get("/health", response_class=Response,
            responses={200: {"description": "the engine serves"}, 503: {"model": ErrorResponse}})
async def health(api: Api):
    if api.engine.serving:
        return Response(status_code=200)
    return JSONResponse(error_body(503, "the engine is not serving"), status_code=503)


@router.get("/version")
async def version():
    import vllm

    return {"version": VERSION, "vllm": vllm.__version__}


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus():
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(api: Api) -> ModelList:
    return ModelList(data=[ModelCard(id=api.settings.served_model_name, max_model_len=api.engine.max_model_len)])
