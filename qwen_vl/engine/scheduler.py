"""Bounded pauses: vLLM's scheduler, with each prompt's share of an engine step held to a time
budget while other requests are decoding, so that no stream waits long behind a long prompt.

Why: every engine step runs the decodes of the running requests together with whatever prefill
it schedules, so each decoding stream waits for the whole step. vLLM gives a prompt up to
--max-num-batched-tokens positions of a step (2048), images included, and encodes every image
those positions start. On a GPU that is a fraction of a second; on a 2-core CPU a 2048-position
chunk of the `small` checkpoint takes 1-2 s, and every stream beside the long prompt stalls that
long (BENCHMARKS.md, "Pauses beside a long prompt"). vLLM's lever for it,
--long-prefill-token-threshold, is a number of tokens: right for one machine and checkpoint,
wrong for the next. Here the budget is a time, and the number comes from the engine's own steps.

How: every step is timed (from the scheduler handing it out to its output coming back, and not
before the previous output came back) and recorded with what it held: decoding sequences,
prefill tokens and images whose encoding started. Non-negative least squares over the recent
steps of each kind (`StepCosts`) gives the cost of a step, of a decoding sequence, of a prefill
token and of an image. While requests are decoding, the step's threshold (vLLM applies it to
each prompt) is what a long prompt may add to the step (`chunk_limit`): prompts that fit the
budget whole, such as one-image questions, are not split, so that requests arriving together
still prefill together, as vLLM has them; the long ones share the rest of the budget, each
taking at least a block of positions so that it progresses. When nothing decodes (a prompt
alone, or requests that arrive together after the others finished) there is no threshold, and a
prompt alone is as fast as before. Until prefill has been seen in a few steps its cost is
unknown and nothing is limited.

The budget (`--decode-pause-budget`, vLLM's `additional_config` key `qwen_vl_decode_pause_budget`,
seconds; 0 = vLLM's scheduling) defaults to 0.25 s: on a GPU a 2048-position chunk takes less,
so nothing changes there; on a CPU a stream's pauses stay near a quarter of a second. The
engine's configuration, and so each node's warm-up sizes, is vLLM's: only the scheduler, on the
first node, sets the threshold, step by step. Answers do not change (chunked prefill is exact).
vLLM's `--scheduler-cls` takes this class; `scheduler_class` picks the one built on vLLM's
asynchronous scheduler when the engine schedules asynchronously (GPUs), so that is kept.
"""

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from qwen_vl.model_executor.tokenizer import IMAGE_SPAN

# This runs in vLLM's engine-core process, where only vLLM's own loggers have a handler.
logger = logging.getLogger("vllm.qwen_vl.scheduler")

BUDGET_KEY = "qwen_vl_decode_pause_budget"
DEFAULT_BUDGET = 0.25  # seconds
WINDOW = 128  # recent steps of each kind (decoding only, text prefill, image prefill) fitted over
MIN_SAMPLES = 8  # steps before a step's and a decoding sequence's costs are trusted
# Steps with prefill (or with an image) before its cost is trusted: few where images cost seconds
# (at 16 one-image chats on a CPU without AVX-512, 8 of them took 138 steps, 3 minutes, and
# nothing was limited until then), and each is long beside its timing noise.
MIN_PREFILL_SAMPLES = 3
MIN_PREFILL_TOKENS = 128  # a prompt's chunk never goes below this (a KV-cache block here): it progresses
# A prompt of one image and a block of text (a one-image question) is never split: its image is
# encoded whole with its first chunk anyway, so splitting the rest would shorten no pause by much
# and cost the prompt a step (measured: under uniform one-image load, splits cost up to 8% tok/s).
NEVER_SPLIT = len(IMAGE_SPAN) + MIN_PREFILL_TOKENS


@dataclass(frozen=True)
class Costs:
    """Seconds: of a step, and per decoding sequence, prefill token and image in it."""

    step: float
    decode: float
    token: float | None  # None: not yet measured
    image: float | None

    def __str__(self) -> str:
        def ms(value: float | None) -> str:
            return "not measured yet" if value is None else f"{1000 * value:.2f} ms"

        return (f"step {ms(self.step)}, per decoding sequence {ms(self.decode)}, per prefill token {ms(self.token)}, "
                f"per image {ms(self.image)}")


class StepCosts:
    """The recent steps' durations against what they held, fitted by least squares. Steps are
    kept by kind (decoding only, text prefill, prefill starting an image), the last `window` of
    each, so that a long stretch of decoding does not push the prefill steps out."""

    def __init__(self, window: int = WINDOW, refit_every: int = 16):
        self.kinds: dict[str, deque[tuple[int, int, int, float]]] = {
            kind: deque(maxlen=window) for kind in ("decode", "text", "image")}
        self.refit_every = refit_every
        self.added = 0
        self.costs: Costs | None = None

    @property
    def steps(self) -> list[tuple[int, int, int, float]]:
        return [step for kind in self.kinds.values() for step in kind]

    def add(self, decodes: int, tokens: int, images: int, seconds: float) -> None:
        kind = "image" if images else "text" if tokens else "decode"
        self.kinds[kind].append((decodes, tokens, images, seconds))
        self.added += 1
        # Refitted every few steps, and at once while a prompt's cost is still unknown.
        if self.added % self.refit_every == 0 or self.costs is None or (tokens and self.costs.token is None):
            earlier, self.costs = self.costs, self.fit()
            if self.costs is not None and (earlier is None or self.added % 1024 == 0
                                           or (earlier.token is None) != (self.costs.token is None)
                                           or (earlier.image is None) != (self.costs.image is None)):
                logger.info("scheduling: measured costs over the last %d steps: %s", len(self.steps), self.costs)

    def fit(self) -> Costs | None:
        """Non-negative least squares over the recent steps. A prefill token's cost is told apart
        from an image's once steps of text prefill without an image have been seen; before that,
        the images' cost is folded into the tokens' (each image brings 258 positions), which
        overestimates text and so errs towards short pauses."""
        steps = self.steps
        if len(steps) < MIN_SAMPLES:
            return None
        data = np.array(steps, dtype=np.float64)
        decodes, tokens, images, seconds = data.T
        text_steps = ((tokens > 0) & (images == 0)).sum()
        columns = [0, 1]
        if (tokens > 0).sum() >= MIN_PREFILL_SAMPLES:
            columns.append(2)
        if text_steps >= MIN_PREFILL_SAMPLES and (images > 0).sum() >= MIN_PREFILL_SAMPLES:
            columns.append(3)
        features = np.column_stack([np.ones(len(data)), decodes, tokens, images])[:, columns]
        fitted = dict(zip(columns, nonnegative_least_squares(features, seconds)))
        return Costs(fitted[0], fitted[1], fitted.get(2), fitted.get(3))


def nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin |a x - b| over x >= 0, for a few columns: the best of the least-squares solutions on
    every subset of them whose coefficients are all non-negative (the others zero)."""
    best, best_residual = np.zeros(a.shape[1]), float(np.sum(b * b))
    for mask in range(1, 2 ** a.shape[1]):
        chosen = [i for i in range(a.shape[1]) if mask >> i & 1]
        solution, *_ = np.linalg.lstsq(a[:, chosen], b, rcond=None)
        if np.any(solution < 0):
            continue
        residual = float(np.sum((a[:, chosen] @ solution - b) ** 2))
        if residual < best_residual:
            best, best_residual = np.zeros(a.shape[1]), residual
            best[chosen] = solution
    return best


def chunk_limit(costs: Costs | None, budget: float, decodes: int, prefills: Sequence[int] = ()) -> int | None:
    """The positions a prompt may take in the next step beside `decodes` decoding sequences and
    prompts with `prefills` positions left, so that the step takes about `budget` seconds.

    The time to spare over the decodes buys positions at the cost of a prompt position (an
    image's 258 positions carry its encoding: a position of an image costs a token plus 1/258 of
    an image). Prompts that fit it whole are not split, as vLLM would not split them, nor are
    prompts of up to NEVER_SPLIT positions; the long ones share what is left, and each takes at
    least MIN_PREFILL_TOKENS, so that every prompt progresses. None: not limited, since no prompt
    is long, nothing decodes (nobody waits), the budget is off, or prefill has no measured cost."""
    if costs is None or costs.token is None or budget <= 0 or decodes == 0:
        return None
    spare = max(0.0, budget - costs.step - costs.decode * decodes)
    per_position = costs.token + (costs.image or 0.0) / len(IMAGE_SPAN)
    if per_position <= 0:  # measured as free: limited only when nothing is to spare
        return None if spare > 0 else MIN_PREFILL_TOKENS
    affordable = int(spare / per_position)
    short = [left for left in prefills if left <= max(affordable, NEVER_SPLIT)]
    long = len(prefills) - len(short)
    if not long:
        return None
    share = (affordable - sum(short)) // long
    return max(MIN_PREFILL_TOKENS, max(short, default=0), share)


class _BoundedPauses:
    """The mixin over vLLM's scheduler (either of its two)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        extra = self.vllm_config.additional_config
        self.pause_budget = float(extra.get(BUDGET_KEY, DEFAULT_BUDGET)) if isinstance(extra, dict) else DEFAULT_BUDGET
        self.own_threshold = self.scheduler_config.long_prefill_token_threshold  # the user's, 0 if none
        self.costs = StepCosts()
        self.pending: dict[int, tuple[float, int, int, int]] = {}  # id(step) -> (handed out, decodes, tokens, images)
        self.last_output = 0.0
        logger.info("scheduling: beside decoding requests, a prompt's prefill takes about %.3g s of a step (%s)",
                    self.pause_budget,
                    "off" if self.pause_budget <= 0 else "its costs measured from the engine's steps")

    def schedule(self, *args, **kwargs):
        # vLLM reads its long-prefill threshold afresh at every step, and applies it to each
        # prompt and only when more than one request is in the engine.
        prefills = [r.num_prompt_tokens - r.num_computed_tokens for r in (*self.running, *self.waiting)
                    if r.num_computed_tokens < r.num_prompt_tokens]
        decoding = sum(1 for r in self.running if r.num_computed_tokens >= r.num_prompt_tokens)
        limit = chunk_limit(self.costs.costs, self.pause_budget, decoding, prefills)
        if limit is not None and self.own_threshold:
            limit = min(limit, self.own_threshold)
        self.scheduler_config.long_prefill_token_threshold = self.own_threshold if limit is None else limit
        output = super().schedule(*args, **kwargs)
        if output.total_num_scheduled_tokens:
            prefill = decodes = 0
            for request_id, count in output.num_scheduled_tokens.items():
                request = self.requests[request_id]
                if request.num_computed_tokens - count < request.num_prompt_tokens:
                    prefill += count
                else:
                    decodes += 1
            started = sum(len(inputs) for inputs in output.scheduled_encoder_inputs.values())
            if len(self.pending) >= 16:  # steps whose output never came back (none in vLLM 0.32)
                del self.pending[next(iter(self.pending))]
            self.pending[id(output)] = (time.perf_counter(), decodes, prefill, started)
        return output

    def update_from_output(self, scheduler_output, model_runner_output):
        now = time.perf_counter()
        record = self.pending.pop(id(scheduler_output), None)
        if record is not None:
            handed_out, decodes, prefill, images = record
            self.costs.add(decodes, prefill, images, now - max(handed_out, self.last_output))
        self.last_output = now
        return super().update_from_output(scheduler_output, model_runner_output)


class BoundedPauseScheduler(_BoundedPauses, Scheduler):
    pass


class AsyncBoundedPauseScheduler(_BoundedPauses, AsyncScheduler):
    pass


def scheduler_class(async_scheduling: bool) -> str:
    """The qualified name for vLLM's --scheduler-cls."""
    chosen = AsyncBoundedPauseScheduler if async_scheduling else BoundedPauseScheduler
    return f"{chosen.__module__}.{chosen.__qualname__}"
