"""Prometheus metrics of the server (prefix `qwen_vl_`), in the default
registry next to vLLM's own `vllm:` families, so one /metrics serves both."""

from prometheus_client import Counter, Gauge, Histogram
from vllm.v1.metrics.loggers import StatLoggerBase

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter("qwen_vl_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"])
TIME_TO_FIRST_TOKEN = Histogram(
    "qwen_vl_time_to_first_token_seconds", "Arrival to first generated token", buckets=LATENCY_BUCKETS
)
INTER_TOKEN_LATENCY = Histogram(
    "qwen_vl_inter_token_latency_seconds", "Gap between consecutive streamed token batches", buckets=TOKEN_GAP_BUCKETS
)
END_TO_END_LATENCY = Histogram(
    "qwen_vl_e2e_request_latency_seconds", "Arrival to last token of a generation request", buckets=LATENCY_BUCKETS
)
PROMPT_TOKENS = Counter("qwen_vl_prompt_tokens", "Prompt tokens processed (258 per image)")
CACHED_PROMPT_TOKENS = Counter(
    "qwen_vl_cached_prompt_tokens", "Prompt tokens served from the prefix cache (usage's cached_tokens)"
)
COMPLETION_TOKENS = Counter("qwen_vl_completion_tokens", "Tokens generated")
IMAGES_PER_REQUEST = Histogram(
    "qwen_vl_images_per_request", "Images in one generation request", buckets=(0, 1, 2, 3, 4, 6, 8, 16, 32)
)
IMAGE_LOAD = Histogram(
    "qwen_vl_image_load_seconds", "Fetching and decoding one request's images", buckets=LATENCY_BUCKETS
)
REQUESTS_RUNNING = Gauge("qwen_vl_requests_running", "Requests the engine is running")
REQUESTS_WAITING = Gauge("qwen_vl_requests_waiting", "Requests waiting in the engine's queue")
KV_CACHE_USAGE = Gauge("qwen_vl_kv_cache_usage_ratio", "Fraction of the KV cache in use (0-1)")
# Read at scrape time from the engine itself (set by the engine's owner):
# unlike the gauges above it does not wait for the next scheduler step.
REQUESTS_UNFINISHED = Gauge("qwen_vl_requests_unfinished", "Requests the engine holds (running or waiting), now")


class EngineGauges(StatLoggerBase):
    """A vLLM stat logger that copies the scheduler's state into our gauges."""

    def __init__(self, vllm_config, engine_index: int = 0):
        self.engine_index = engine_index

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if scheduler_stats is None:
            return
        REQUESTS_RUNNING.set(scheduler_stats.num_running_reqs)
        REQUESTS_WAITING.set(scheduler_stats.num_waiting_reqs)
        KV_CACHE_USAGE.set(scheduler_stats.kv_cache_usage)

    def log_engine_initialized(self):
        pass
