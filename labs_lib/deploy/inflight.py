"""In-flight batching inside the served ``gpt`` model: a scheduler thread running the paged-cache batcher.

With ``batching_strategy`` ``inflight_fused_batching`` (TensorRT-LLM's name; ``V1`` is the static batching of
:class:`~labs_lib.deploy.engine.GptEngine`), the decoupled model's ``execute()`` parses each request, hands it to
this scheduler and returns at once; the scheduler's thread steps
:class:`~labs_lib.inference.inflight.InflightBatcher` and sends each request's tokens through its own ``emit`` (its
response sender) as they come, so requests join and leave the running batch between decode steps::

    scheduler = scheduler_from_parameters(engine, {"batching_strategy": "inflight_fused_batching",
                                                   "batch_scheduler_policy": "max_utilization"})
    scheduler.submit(engine.parse(inputs), emit)   # emit(new token ids or an Exception, final), from the thread
    scheduler.close()

The repository parameters, as TensorRT-LLM's ``tensorrt_llm`` model names them (empty: the default):
``batch_scheduler_policy`` (guaranteed_no_evict | max_utilization), ``max_tokens_in_paged_kv_cache`` (the pool, in
tokens; default 16 full contexts), ``tokens_per_block`` (default 16) and ``max_num_tokens`` (per step, default 256).
A streamed request gets its tokens in whole characters, as the static engine sends them; a request that is not
streamed gets one response when it ends. ``on_step(cache)`` is called in the thread after every step: the served
model sets TensorRT-LLM's ``nv_trt_llm_kv_cache_block_metrics`` gauges from :func:`kv_block_metrics`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from labs_lib.deploy.engine import GenerationRequest, GptEngine, whole_characters
from labs_lib.inference.inflight import POLICIES, InflightBatcher, Sequence, TooLargeForPool
from labs_lib.inference.paged import PagedKVCache

__all__ = ["BATCHING_STRATEGIES", "InflightScheduler", "check_batching", "scheduler_from_parameters",
           "kv_block_metrics"]

BATCHING_STRATEGIES = ("V1", "inflight_fused_batching")

# reply(new token ids or the request's error, final): one call per response to send
Reply = Callable[["list[int] | Exception", bool], None]


class InflightScheduler:
    """A thread that owns an InflightBatcher over ``engine``'s model; :meth:`submit` is safe from any thread."""

    def __init__(self, engine: GptEngine, policy: str = "guaranteed_no_evict",
                 max_tokens_in_paged_kv_cache: int | None = None, tokens_per_block: int = 16,
                 max_num_tokens: int = 256, max_batch_size: int | None = None,
                 on_step: Callable[[PagedKVCache], None] | None = None):
        check_batching("inflight_fused_batching", policy, engine.decoupled,
                       in_process_torch=engine.workers is None and engine.onnx is None)
        self.engine = engine
        tokens = max_tokens_in_paged_kv_cache or 16 * engine.model.config.block_size
        self.settings = dict(model=engine.model, num_blocks=-(-tokens // tokens_per_block), block_size=tokens_per_block,
                             policy=policy, max_num_tokens=max_num_tokens, max_batch_size=max_batch_size)
        self.batcher = InflightBatcher(**self.settings)
        self.on_step = on_step
        self._emits: dict[int, Reply] = {}  # the requests in the batcher, by sequence id
        self._arrivals: list[tuple[GenerationRequest, Reply]] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="inflight-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest | Exception, emit: Reply) -> None:
        """Queue a parsed request (a parse error is answered at once); its responses come from the thread."""
        if isinstance(request, Exception):
            emit(request, True)
            return
        with self._wake:
            if self._closed:
                raise RuntimeError("the in-flight scheduler is closed: load the model again")
            self._arrivals.append((request, emit))
            self._wake.notify()

    def close(self) -> None:
        """Stop the thread after the current step; requests still running get an error."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._arrivals and self.batcher.idle and not self._closed:
                    self._wake.wait()
                if self._closed:
                    break
                arrivals, self._arrivals = self._arrivals, []
            for request, emit in arrivals:
                self._start(request, emit)
            try:
                self.batcher.step()
            except Exception as e:  # a failing step fails the requests in flight; the model stays up
                self._fail_all(ValueError(f"generation failed: {type(e).__name__}: {e}"))
            if self.on_step is not None:
                self.on_step(self.batcher.cache)
        self._fail_all(RuntimeError("the gpt model was unloaded while this request ran: send it again"))

    def _start(self, request: GenerationRequest, emit: Reply) -> None:
        try:
            seq = self.batcher.submit(request.prompt, request.decoding, request.stop, self._replier(request, emit))
        except TooLargeForPool as e:  # this request's answer, naming the served setting
            emit(ValueError(f"{e} (served: raise the gpt model's max_tokens_in_paged_kv_cache parameter, "
                            f"{self.batcher.cache.num_blocks * self.batcher.cache.block_size} tokens now)"), True)
            return
        except ValueError as e:  # beams: this request's answer
            emit(e, True)
            return
        self._emits[seq.id] = emit

    def _replier(self, request: GenerationRequest, emit: Reply) -> Callable[[Sequence], None]:
        """The batcher's per-token callback for this request: streamed pieces of whole characters, or one answer."""
        sent = 0
        eos = request.decoding.eos_token_id

        def on_token(seq: Sequence) -> None:  # as the static engine: a piece for each token but the end id
            nonlocal sent
            if request.stream and seq.generated[-1] != eos and whole_characters(self.engine.tokenizer,
                                                                                seq.generated[sent:]):
                emit(seq.generated[sent:], False)
                sent = len(seq.generated)
            if seq.finished:
                del self._emits[seq.id]
                if self.on_step is not None:  # the gauges show its blocks back before its answer leaves
                    self.on_step(self.batcher.cache)
                rest = [t for t in seq.generated[sent:] if t != eos]  # the prompt never streams
                emit(rest if request.stream else request.output(seq.generated), True)

        return on_token

    def _fail_all(self, error: Exception) -> None:
        """Answer every request in the batcher with ``error`` and start a fresh batcher (an empty pool)."""
        for emit in self._emits.values():
            emit(error, True)
        self._emits.clear()
        self.batcher = InflightBatcher(**self.settings)


def kv_block_metrics(cache: PagedKVCache) -> dict[str, int]:
    """The pool's blocks as TensorRT-LLM's backend reports them (``kv_cache_block_type`` label: value)."""
    return {"max": cache.num_blocks, "free": len(cache.free_blocks), "used": cache.blocks_in_use,
            "tokens_per": cache.block_size}


def check_batching(strategy: str, policy: str, decoupled: bool, in_process_torch: bool = True) -> None:
    """Refuse, naming the fix, a batching strategy and scheduler policy the gpt model cannot serve: in-flight
    batching needs the decoupled model (it answers from a thread) and the torch engine in the model's process."""
    if strategy not in BATCHING_STRATEGIES:
        raise ValueError(f"batching_strategy={strategy!r}: use one of {BATCHING_STRATEGIES}")
    if strategy == "V1":
        return
    if policy not in POLICIES:
        raise ValueError(f"batch_scheduler_policy={policy!r}: use one of {POLICIES}")
    if not decoupled:
        raise ValueError("inflight_fused_batching answers from a thread, which needs the decoupled gpt model: "
                         "render with decoupled=True, or batching_strategy V1")
    if not in_process_torch:
        raise ValueError("inflight_fused_batching runs the torch engine in the model's process: render with "
                         "engine='torch' and tp=1, or batching_strategy V1")


def scheduler_from_parameters(engine: GptEngine, parameters: dict[str, str], decoupled: bool = True,
                              max_batch_size: int | None = None) -> InflightScheduler | None:
    """The scheduler the ``gpt`` model's repository parameters ask for, or None for ``V1`` (static batching)."""
    strategy = parameters.get("batching_strategy") or "V1"
    policy = parameters.get("batch_scheduler_policy") or "guaranteed_no_evict"
    check_batching(strategy, policy, decoupled, in_process_torch=engine.workers is None and engine.onnx is None)
    if strategy == "V1":
        return None

    def number(name: str, default: int | None) -> int | None:
        value = parameters.get(name) or ""
        if value and not value.isdigit():
            raise ValueError(f"{name}={value!r}: give a whole number of tokens, or leave it empty for the default")
        return int(value) if value else default

    return InflightScheduler(engine, policy, number("max_tokens_in_paged_kv_cache", None),
                             number("tokens_per_block", 16), number("max_num_tokens", 256), max_batch_size)
