"""The engine's lifecycle: one vLLM AsyncLLM for the served model, started and
stopped by the app's lifespan, with the few facts the API layer needs (the
checkpoint's among them: `Engine.checkpoint`); on the other nodes of a
multi-node engine, their workers (run_headless)."""

import logging
from collections.abc import AsyncIterator

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.outputs import RequestOutput
from vllm.v1.engine.async_llm import AsyncLLM

from qwen_vl.model_executor.checkpoint_facts import CheckpointFacts
from qwen_vl.model_executor.tokenizer import IMAGE_TOKENS_PER_IMAGE

from .metrics import REQUESTS_UNFINISHED, EngineGauges
from .scheduler import BUDGET_KEY, MIN_PREFILL_TOKENS, scheduler_class

logger = logging.getLogger("qwen_vl.engine")


def engine_config(engine_args: AsyncEngineArgs, images_per_step: int | None, pause_budget: float = 0.0,
                  headless: bool = False):
    """vLLM's configuration for `engine_args`; with `images_per_step`, the vision encoder takes at
    most that many images in one engine step (vLLM's encoder compute budget, which it otherwise
    sets to --max-num-batched-tokens: 8 images at 2048). Chunked prefill stops a prompt just
    before an image that does not fit and goes on in the next step. With `pause_budget` (seconds,
    > 0) and no --scheduler-cls of the user's, the scheduler holds a step's prefill and vision
    work beside decoding requests to that time (qwen_vl.engine.scheduler).

    Every node of a multi-node engine builds its configuration here (`headless`: a node of rank
    > 0, run_headless), because all of them must arrive at the same one: each node's workers warm
    up with dummy batches of max_num_batched_tokens tokens, max_num_seqs sequences and as many
    images as the encoder budget holds, in collectives with the other nodes' workers. Sizes that
    differ hang those collectives or crash them. vLLM picks the first two by "usage context"
    when they are not given (on the CPU: 2048 and 128 with none, as here; 2048 and 128 per rank
    for its API server and its headless runner; 4096 and 256 per rank offline), and applies no
    --images-per-step of ours."""
    vllm_config = engine_args.create_engine_config(headless=headless)
    scheduler_config = vllm_config.scheduler_config
    if images_per_step is not None:
        scheduler_config.max_num_encoder_input_tokens = images_per_step * IMAGE_TOKENS_PER_IMAGE
    if pause_budget > 0 and scheduler_config.scheduler_cls is None:
        scheduler_config.scheduler_cls = scheduler_class(bool(scheduler_config.async_scheduling))
        vllm_config.additional_config[BUDGET_KEY] = pause_budget
    return vllm_config


def run_headless(engine_args: AsyncEngineArgs, images_per_step: int | None, pause_budget: float = 0.0) -> None:
    """This node's engine workers only, until they exit (multi-node, a node of rank > 0: node 0
    schedules and serves the API). What vLLM's own `serve --headless` runs for such a node
    (vllm/entrypoints/cli/serve.py, run_headless), but on the configuration of engine_config:
    vLLM's runner builds its own, with its API server's usage context and without our image
    budget, which node 0 does not share."""
    import signal

    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    vllm_config = engine_config(engine_args, images_per_step, pause_budget, headless=True)
    if vllm_config.parallel_config.node_rank_within_dp == 0:
        raise ValueError("--headless runs the engine workers of a node after the first: --nnodes N --node-rank R > 0")

    def stop(signum, frame):
        # Once: the executor's finalizer then stops the workers as the interpreter exits.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    executor = MultiprocExecutor(vllm_config, monitor_workers=False)
    executor.start_worker_monitor(inline=True)


def configuration_error(error: ValueError) -> str:
    """The message of a refusal raised while vLLM builds its configuration: vLLM's config
    classes are pydantic dataclasses, which wrap it in a ValidationError."""
    for detail in getattr(error, "errors", lambda: [])():
        cause = detail.get("ctx", {}).get("error")
        if cause is not None:
            return str(cause)
    return str(error)


class Engine:
    """The configuration is built (and checked: a configuration that cannot run is refused
    here, before any process starts) and the checkpoint's facts are read when the Engine is
    made; the engine starts in `start`."""

    def __init__(self, engine_args: AsyncEngineArgs, images_per_step: int | None = None, pause_budget: float = 0.0):
        self.engine_args = engine_args
        self.vllm_config = engine_config(engine_args, images_per_step, pause_budget)
        self.checkpoint = CheckpointFacts(self.vllm_config.model_config)
        self.llm: AsyncLLM | None = None

    def start(self) -> None:
        vllm_config = self.vllm_config
        budget = vllm_config.scheduler_config.max_num_encoder_input_tokens
        logger.info("vision encoder: at most %d image(s) per engine step (%d encoder tokens)",
                    max(1, budget // IMAGE_TOKENS_PER_IMAGE), budget)
        pause = vllm_config.additional_config.get(BUDGET_KEY) if isinstance(vllm_config.additional_config, dict) else None
        if pause is not None:
            logger.info("scheduling: beside decoding requests, a prompt's prefill takes about %.3g s of an engine step "
                        "(at least %d positions), its costs measured from the engine's steps; a prompt alone, up to "
                        "%d positions a step (--decode-pause-budget)", pause, MIN_PREFILL_TOKENS,
                        vllm_config.scheduler_config.max_num_batched_tokens)
        else:
            logger.info("scheduling: vLLM's (%s)", vllm_config.scheduler_config.scheduler_cls or "its default scheduler")
        self.llm = AsyncLLM.from_vllm_config(
            vllm_config, stat_loggers=[EngineGauges], enable_log_requests=self.engine_args.enable_log_requests,
            disable_log_stats=self.engine_args.disable_log_stats,
        )
        REQUESTS_UNFINISHED.set_function(self.unfinished_requests)

    def stop(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()

    @property
    def serving(self) -> bool:
        return self.llm is not None and not self.llm.errored

    def unfinished_requests(self) -> int:
        """Requests the engine holds now (running or waiting); an abort lowers it at once."""
        return self.llm.get_num_unfinished_requests()

    @property
    def max_model_len(self) -> int:
        return self.llm.model_config.max_model_len

    @property
    def tokenizer(self):
        return self.llm.get_tokenizer()

    @property
    def priority_scheduling(self) -> bool:
        """Whether requests' `priority` orders them (vLLM's --scheduling-policy priority)."""
        return self.llm.vllm_config.scheduler_config.policy == "priority"

    def generate(
        self, prompt_ids: list[int], images: list, params: SamplingParams, request_id: str, *,
        priority: int = 0, cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        prompt = {"prompt_token_ids": prompt_ids}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        if cache_salt is not None:
            prompt["cache_salt"] = cache_salt
        # Cancelling the consumer (client gone) makes vLLM abort the request.
        return self.llm.generate(prompt, params, request_id, priority=priority)
