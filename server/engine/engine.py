"""The engine: a thread that runs continuous-batching steps, and the thread-safe API around it.

``submit`` validates and tokenizes on the caller's thread and raises typed errors at once (bad input, unknown
adapter, full queue, draining); accepted sequences travel through an inbox to the engine thread, which owns the
scheduler, KV cache and device slots. ``generate`` wraps ``submit`` as an async iterator of events for asyncio
callers (the gRPC layer): it decides a full server's refusal on the event loop, a count and a comparison before any
other work (so refusals stay fast under overload), then validates and tokenizes on the submitter thread; leaving the
iterator early cancels the request, which frees its sequence at the next step.
A failure inside a step fails the requests of that step, never the engine.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from loraplex.server.config import Settings
from loraplex.server.core.errors import (
    AdapterRejected,
    Cancelled,
    DeadlineExceeded,
    EngineError,
    InternalError,
    InvalidRequest,
    Overloaded,
    ShuttingDown,
)
from loraplex.server.core.events import EngineListener
from loraplex.server.core.types import (
    AdapterInfo,
    ChatMessage,
    EngineStats,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
    Usage,
)
from loraplex.server.engine.batch import build_decode, build_step
from loraplex.server.engine.constraints import ConstraintCompiler
from loraplex.server.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from loraplex.server.engine.fairness import InFlight
from loraplex.server.engine.sampler import SamplerState, sample
from loraplex.server.engine.scheduler import ScheduledChunk, Scheduler
from loraplex.server.engine.sequence import EventSink, Sequence, Status
from loraplex.server.engine.staging import StepUpload
from loraplex.server.lora.cache import AdapterManager, AdapterVersion
from loraplex.server.lora.format import AdapterLimits
from loraplex.server.lora.layers import layer_shape
from loraplex.server.lora.ops import lora_stack_dtype, select_kernels
from loraplex.server.lora.pool import DeviceSlots, rank_bucket
from loraplex.server.lora.sources import AdapterRoots, StoreCost
from loraplex.server.model.decode_graphs import DecodeGraphs, graphs_wanted
from loraplex.server.model.dora import dora_scales_for
from loraplex.server.model.forward import DecoderForward
from loraplex.server.model.kv_cache import KVCache
from loraplex.server.model.loader import LoadedBase
from loraplex.server.model.paged_attention import DecodeAttentionChoice, choose_decode_attention

log = logging.getLogger(__name__)

_MAX_SEED = 2**63 - 1
_MAX_TEMPERATURE = 100.0
_MAX_REPETITION_PENALTY = 100.0
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


def _not_accepting() -> ShuttingDown:
    """The refusal of a request that arrives while the engine drains or after it stopped."""
    return ShuttingDown("the server is draining or stopped; retry on another replica")


class LoopHandoff:
    """Events bound for one event loop, gathered while the engine steps and handed over in one
    ``call_soon_threadsafe`` per step (not one per token: each call wakes the loop and contends for the GIL)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[AsyncSink, GenerationEvent | EngineError]] = []
        self._lock = threading.Lock()

    def put(self, sink: AsyncSink, item: GenerationEvent | EngineError) -> None:
        with self._lock:
            self._pending.append((sink, item))

    def flush(self) -> bool:
        """Hands the gathered events to the loop; False when the loop is closed (their sinks are closed too, so
        the engine cancels their sequences at the next push)."""
        with self._lock:
            items, self._pending = self._pending, []
        if not items:
            return True
        try:
            self.loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the loop is closed: nobody reads any more
            for sink, _ in items:
                sink.closed = True
            return False
        return True


def _deliver(items: list[tuple[AsyncSink, GenerationEvent | EngineError]]) -> None:
    for sink, item in items:
        sink.deliver(item)


class AsyncSink:
    """An :class:`EventSink` feeding an asyncio queue through its loop's :class:`LoopHandoff`, bounded by
    ``max_backlog`` undelivered events. Events pushed on the engine thread wait for the end of the step; any
    other thread's are handed over at once."""

    def __init__(self, handoff: LoopHandoff, max_backlog: int, engine_thread: Callable[[], bool]) -> None:
        self._handoff = handoff
        self._queue: asyncio.Queue[GenerationEvent | EngineError] = asyncio.Queue()
        self._max_backlog = max_backlog
        self._backlog = 0
        self._lock = threading.Lock()
        self._on_engine_thread = engine_thread
        self.closed = False

    def _put(self, item: GenerationEvent | EngineError) -> bool:
        self._handoff.put(self, item)
        if not self._on_engine_thread():
            return self._handoff.flush()
        return True

    def push(self, event: GenerationEvent) -> bool:
        if self.closed:
            return False
        with self._lock:
            if self._backlog >= self._max_backlog:
                return False
            self._backlog += 1
        return self._put(event)

    def fail(self, error: EngineError) -> None:
        self._put(error)

    def deliver(self, item: GenerationEvent | EngineError) -> None:
        """On the event loop: the item reaches the reader."""
        self._queue.put_nowait(item)

    async def get(self) -> GenerationEvent | EngineError:
        item = await self._queue.get()
        if not isinstance(item, EngineError):
            with self._lock:
                self._backlog -= 1
        return item


def validate_sampling(params: SamplingParams, settings: Settings) -> None:
    eng = settings.engine
    problems: list[str] = []
    if not 1 <= params.max_new_tokens <= eng.max_new_tokens:
        problems.append(f"max_new_tokens must be 1..{eng.max_new_tokens} (got {params.max_new_tokens})")
    if not (math.isfinite(params.temperature) and 0 <= params.temperature <= _MAX_TEMPERATURE):
        problems.append(f"temperature must be 0..{_MAX_TEMPERATURE} (0 = greedy; got {params.temperature})")
    if not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        problems.append(f"top_p must be in (0, 1] (got {params.top_p})")
    if params.top_k < 0:
        problems.append(f"top_k must be >= 0 (0 = off; got {params.top_k})")
    if params.seed is not None and not 0 <= params.seed <= _MAX_SEED:
        problems.append(f"seed must be 0..2^63-1 (got {params.seed})")
    if not (math.isfinite(params.repetition_penalty) and 0 < params.repetition_penalty <= _MAX_REPETITION_PENALTY):
        problems.append(f"repetition_penalty must be in (0, {_MAX_REPETITION_PENALTY}] (1 = off)")
    if len(params.stop) > eng.max_stop_sequences:
        problems.append(f"at most {eng.max_stop_sequences} stop sequences (got {len(params.stop)})")
    if any(not s or len(s) > eng.max_stop_length for s in params.stop):
        problems.append(f"stop sequences must be 1..{eng.max_stop_length} characters")
    if problems:
        raise InvalidRequest("; ".join(problems))


class Engine:
    """Owns the base model, adapters, KV cache and the engine thread."""

    def __init__(self, base: LoadedBase, settings: Settings, listener: EngineListener | None = None) -> None:
        self.base = base
        self.settings = settings
        self.listener = listener or EngineListener()
        eng, ad = settings.engine, settings.adapters
        shape = base.shape
        self.kv = KVCache(
            shape.num_layers,
            shape.num_kv_heads,
            shape.head_dim,
            eng.kv_cache_tokens,
            base.dtype,
            base.device,
            eng.kv_block_size,
        )
        lora_dtype = lora_stack_dtype(base.device, base.dtype, eng.lora_dtype)
        self.slots = DeviceSlots(shape, ad.device_slots, ad.device_bytes, lora_dtype, base.device)
        self.adapters = AdapterManager(
            roots=AdapterRoots.of(ad.roots),
            shape=shape,
            limits=AdapterLimits(max_rank=ad.max_rank, max_file_bytes=ad.max_file_bytes),
            slots=self.slots,
            host_bytes=ad.host_bytes,
            loader_threads=ad.loader_threads,
            base_fingerprint=base.fingerprint,
            dora_scales_fn=lambda weights: dora_scales_for(base, weights),
            listener=self.listener,
            store_cost=StoreCost(ad.fetch_latency_ms / 1e3, ad.fetch_bytes_per_s),
        )
        calibrated = layer_shape(shape, rank_bucket(min(eng.lora_calibration_rank, ad.max_rank)))
        self.lora_kernels = select_kernels(base.device, lora_dtype, eng.lora_kernel, calibrated)
        self.upload = StepUpload(base.device)  # the eager step's index tensors: one host -> device copy
        self.forward = DecoderForward(base, self.kv, self.lora_kernels)
        self.decode_attention: DecodeAttentionChoice | None = None
        self.graphs: DecodeGraphs | None = None  # the static decode step (engine.cuda_graphs), None = eager only
        if graphs_wanted(eng.cuda_graphs, base.device):
            self.decode_attention = choose_decode_attention(
                base.device,
                self.kv.k[0].dtype,
                shape.num_heads,
                shape.num_kv_heads,
                shape.head_dim,
                self.kv.block_size,
                self.kv.blocks_for(eng.max_seq_len),
            )
            max_rows = min(eng.cuda_graph_max_rows or eng.max_running, eng.max_running)
            self.graphs = DecodeGraphs(self.forward, max_rows, eng.max_seq_len, self.decode_attention.attend)
        self.scheduler = Scheduler(eng, self.kv, self.adapters)
        self.tokenizer = base.tokenizer
        self._backend_tokenizer = base.tokenizer.backend_tokenizer
        self._tokenizer_lock = threading.Lock()
        self.eos_ids = self._eos_ids()
        self.constraints = ConstraintCompiler(self.tokenizer, shape.vocab_size, self.eos_ids)
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._live: dict[str, Sequence] = {}
        self._pending_submits = 0  # accepted by generate(), not yet through the submitter thread (a drain waits)
        self._in_flight = InFlight()  # per tenant: the _live requests and the pending submits
        self._handoffs: dict[asyncio.AbstractEventLoop, LoopHandoff] = {}
        self._submitter = ThreadPoolExecutor(1, thread_name_prefix="engine-submit")  # one: keeps arrival order
        self._running_count = 0
        self._accepting = False
        self._stopping = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._runner: threading.Thread | None = None  # the thread running the step loop
        self._loop_done = threading.Event()
        self._loop_done.set()  # no loop is running
        self.adapters.add_load_listener(self._wake.set)
        self.steps = 0
        log.info(
            "engine ready: LoRA kernels %s over %s slot stacks, KV cache %d tokens in blocks of %d (%.0f MiB), "
            "decode %s",
            self.lora_kernels.describe(),
            str(self.slots.dtype).removeprefix("torch."),
            self.kv.capacity,
            self.kv.block_size,
            self.kv.nbytes / 2**20,
            self.describe_decode(),
        )

    def describe_decode(self) -> str:
        """How decode-only steps run: the static step (graphs or eager, its buckets and counts) and its attention."""
        if self.graphs is None or self.decode_attention is None:
            return "eager (engine.cuda_graphs off)"
        return f"{self.graphs.describe()}, decode attention {self.decode_attention.name}"

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        configured = getattr(self.base.model.generation_config, "eos_token_id", None)
        for value in (configured, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Runs the step loop on a new thread (in-process callers and tests); the server uses :meth:`run`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        self.open()

    def open(self) -> None:
        """Starts accepting requests and reads the preloaded adapters (waiting for them)."""
        self._accepting = True
        for adapter_id in self.settings.adapters.preload:
            self.adapters.load(adapter_id, pin=None).result()

    def run(self) -> None:
        """Runs the step loop on the calling thread until :meth:`stop`; call :meth:`open` first.

        The server calls it on the process's main thread, the one that loaded the model: with torch's OpenMP
        (libgomp) backend, once a second thread has started a parallel region, parallel regions started by any
        thread other than the main one slow down (the grouped LoRA matmul 2.6-43x, see loadtests/BENCHMARKS.md),
        while the main thread keeps its speed. So every step's torch work runs on the main thread.
        """
        self._loop()

    def begin_drain(self) -> None:
        """Stops accepting requests; those already accepted keep running."""
        self._accepting = False

    def wait_idle(self, timeout: float) -> bool:
        """Waits until every accepted request has finished (those still on the submitter thread included); False
        on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._live and not self._pending_submits:
                    return True
            time.sleep(0.02)
        with self._lock:
            return not self._live and not self._pending_submits

    def stop(self) -> None:
        """Stops the step loop (waiting for it); requests still live fail with ShuttingDown. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._accepting = False
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        elif threading.current_thread() is not self._runner:
            self._loop_done.wait(timeout=30)
        with self._lock:
            leftovers = list(self._live.values())
        for seq in leftovers:
            self._forget(seq)
        for seq in leftovers:
            seq.sink.fail(ShuttingDown("the server is shutting down"))
        self._submitter.shutdown(wait=False, cancel_futures=True)
        self.adapters.shutdown()

    @property
    def accepting(self) -> bool:
        return self._accepting

    # --------------------------------------------------------------------------------------------- requests

    def tokenize(self, prompt: str | None = None, messages: tuple[ChatMessage, ...] | None = None) -> list[int]:
        """Token ids of a prompt (with the tokenizer's special tokens) or of chat messages (chat template)."""
        with self._tokenizer_lock:
            if messages:
                bad = sorted({m.role for m in messages} - CHAT_ROLES)
                if bad:
                    raise InvalidRequest(f"unknown chat roles {bad}; use {sorted(CHAT_ROLES)}")
                if self.tokenizer.chat_template is None:
                    raise InvalidRequest("this base model's tokenizer has no chat template; send a plain prompt")
                text = self.tokenizer.apply_chat_template(
                    [{"role": m.role, "content": m.content} for m in messages],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                return ids
            ids = self.tokenizer(prompt or "", add_special_tokens=True)["input_ids"]
            return ids

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        given = [request.prompt, request.messages, request.prompt_token_ids]
        if sum(1 for g in given if g) != 1:
            raise InvalidRequest("send exactly one non-empty prompt: text, chat messages or token ids")
        if request.prompt_token_ids:
            ids = list(request.prompt_token_ids)
            vocab = self.base.shape.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequest(f"prompt token ids must be in 0..{vocab - 1}")
        else:
            ids = self.tokenize(request.prompt, request.messages)
        if not ids:
            raise InvalidRequest("the prompt is empty after tokenization")
        limit = self.settings.engine.max_prompt_tokens
        if len(ids) > limit:
            raise InvalidRequest(f"prompt has {len(ids)} tokens, more than the limit of {limit}")
        return ids

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        """Accepts a request or raises its error at once. Events then arrive at ``sink`` from the engine thread."""
        if not self._accepting:
            raise _not_accepting()
        with self._lock:
            self._refuse_if_full(request)  # before tokenizing: under overload a refusal must cost next to nothing
        self._validate_and_queue(request, sink, reserved=False)

    def _submit_accepted(self, request: GenerationRequest, sink: EventSink) -> None:
        """The submitter thread's half of :meth:`generate`: the request was accepted when it arrived (its place
        reserved; a drain that began since does not refuse it), so only its own errors refuse it now."""
        try:
            self._validate_and_queue(request, sink, reserved=True)
        except BaseException:
            self._release_reservation(request)
            raise

    def _release_reservation(self, request: GenerationRequest) -> None:
        """Gives back the place :meth:`generate` reserved for a request that never reached the queue."""
        with self._lock:
            self._pending_submits -= 1
            self._in_flight.remove(_tenant_of(request))

    def _validate_and_queue(self, request: GenerationRequest, sink: EventSink, reserved: bool) -> None:
        """Validates and tokenizes ``request`` and hands it to the engine thread; ``reserved``: its place in flight
        was taken when it arrived (by :meth:`generate`), else it is taken here (or refused when the server is full)."""
        submitted_at = time.monotonic()  # the engine's clock: validation and tokenization are engine work
        if not request.request_id:
            raise InvalidRequest("request_id must not be empty")
        validate_sampling(request.sampling, self.settings)
        prompt_ids = self._prompt_ids(request)
        max_len = self.settings.engine.max_seq_len
        if len(prompt_ids) + request.sampling.max_new_tokens > max_len:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) exceeds "
                f"the maximum sequence length {max_len}; shorten the prompt or lower max_new_tokens"
            )
        if request.deadline is not None and request.deadline <= time.monotonic():
            raise DeadlineExceeded("the deadline passed before the request was accepted")
        if request.adapter_id:
            self.adapters.check(request.adapter_id)  # the lookup (a disk read) starts near the queue's front
        constraint = request.sampling.constraint
        matcher = self.constraints.matcher(constraint) if constraint is not None else None  # compiled off the loop
        seq = Sequence(
            request=request,
            prompt_ids=prompt_ids,
            sink=sink,
            sampler=SamplerState.create(request.sampling, prompt_ids, self.base.device, matcher),
            detokenizer=IncrementalDetokenizer(self._backend_tokenizer, prompt_ids),
            stop=StopMatcher(request.sampling.stop),
            eos_ids=frozenset() if request.sampling.ignore_eos else self.eos_ids,
            adapter_future=None,
            submitted_at=submitted_at,
        )
        with self._lock:
            if request.request_id in self._live:
                raise InvalidRequest(f"request_id '{request.request_id}' is already in flight")
            if reserved:
                self._pending_submits -= 1  # its place in flight passes to _live
            else:
                self._refuse_if_full(request)
                self._in_flight.add(_tenant_of(request), request.tenant_weight)
            self._live[request.request_id] = seq
        self._inbox.put(seq)
        self._wake.set()

    def _refuse_if_full(self, request: GenerationRequest) -> None:
        """Raises Overloaded when the requests in flight fill ``engine.max_running + engine.max_queue`` (with fair
        share, when the request's tenant holds its share of them: :class:`~.fairness.InFlight`); call it holding
        the lock.

        It bounds the requests in flight, not the ones not yet stepped: a request that finds a free running slot
        waits for no one, even before the next step moves it from the inbox into the batch.
        """
        eng = self.settings.engine
        why = self._in_flight.refusal(
            _tenant_of(request), request.tenant_weight, eng.max_running, eng.max_queue, eng.fair_share
        )
        if why is not None:
            raise Overloaded(why)

    def _forget(self, seq: Sequence) -> None:
        """Takes a finished or failed sequence out of the requests in flight."""
        with self._lock:
            if self._live.get(seq.request_id) is seq:
                del self._live[seq.request_id]
                self._in_flight.remove(_tenant_of(seq.request))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Submits ``request`` and yields its events; closing the iterator early cancels the request."""
        loop = asyncio.get_running_loop()
        sink = AsyncSink(self._handoff(loop), self.settings.engine.max_stream_backlog, self._on_engine_thread)
        with self._lock:  # accepted now, on arrival: a drain from here on waits for it instead of refusing it
            if not self._accepting:
                raise _not_accepting()
            self._refuse_if_full(request)  # on the loop, before any work: a refusal under overload costs a count
            self._pending_submits += 1
            self._in_flight.add(_tenant_of(request), request.tenant_weight)
        try:  # validation and tokenization (their cost grows with the prompt) off the event loop, in arrival order
            submitted = self._submitter.submit(self._submit_accepted, request, sink)
        except RuntimeError as exc:  # the submitter is shut down: the engine has stopped
            self._release_reservation(request)
            if not self._stopped:
                raise
            raise _not_accepting() from exc
        try:
            await asyncio.wrap_future(submitted)
        except asyncio.CancelledError:
            sink.closed = True  # if it is accepted after all, the engine cancels it at its first event
            if submitted.cancelled():  # it never ran, so its reservation was never used or given back
                self._release_reservation(request)
            self.cancel(request.request_id)
            raise
        finished = False
        try:
            while True:
                item = await sink.get()
                if isinstance(item, EngineError):
                    finished = True
                    raise item
                yield item
                if isinstance(item, Finished):
                    finished = True
                    return
        finally:
            sink.closed = True
            if not finished:
                self.cancel(request.request_id)

    def _handoff(self, loop: asyncio.AbstractEventLoop) -> LoopHandoff:
        with self._lock:
            handoff = self._handoffs.get(loop)
            if handoff is None:
                handoff = self._handoffs[loop] = LoopHandoff(loop)
            return handoff

    def _on_engine_thread(self) -> bool:
        return threading.current_thread() is self._runner and not self._loop_done.is_set()

    def _flush_events(self) -> None:
        """Hands the step's events to their event loops, one call per loop; forgets closed loops."""
        with self._lock:
            handoffs = list(self._handoffs.values())
        closed = [handoff.loop for handoff in handoffs if not handoff.flush() or handoff.loop.is_closed()]
        if closed:
            with self._lock:
                for loop in closed:
                    self._handoffs.pop(loop, None)

    def cancel(self, request_id: str, reason: EngineError | None = None) -> bool:
        """Marks a live request cancelled; the engine frees it at the next step. False if it is not live."""
        with self._lock:
            seq = self._live.get(request_id)
        if seq is None:
            return False
        seq.cancel(reason or Cancelled("the request was cancelled"))
        self._wake.set()
        return True

    def stats(self) -> EngineStats:
        with self._lock:
            live = [(seq.request.adapter_id, seq.status) for seq in self._live.values()]
        running = {adapter for adapter, status in live if adapter and status is Status.RUNNING}
        waiting = {adapter for adapter, status in live if adapter and status is Status.WAITING}
        on_device, on_host = self.adapters.counts()
        return EngineStats(
            running=self._running_count,
            waiting=max(0, len(live) - self._running_count),
            kv_cache_usage=self.kv.usage,
            adapters_on_device=on_device,
            adapters_on_host=on_host,
            running_adapters=tuple(sorted(running)),
            waiting_adapters=tuple(sorted(waiting)),
            device_slots=self.settings.adapters.device_slots,
            prefix_cache_blocks=self.kv.allocator.num_cached,
        )

    # ----------------------------------------------------------------------------------------------- admin

    def load_adapter(self, adapter_id: str, pin: bool | None = None) -> Future[AdapterVersion]:
        future = self.adapters.load(adapter_id, pin)
        self._wake.set()
        return future

    def unload_adapter(self, adapter_id: str) -> None:
        self.adapters.unload(adapter_id)
        self._wake.set()

    def adapter_info(self, adapter_id: str) -> AdapterInfo:
        return self.adapters.info(adapter_id)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.adapters.infos()

    def first_loads(self) -> frozenset[str]:
        """Adapters whose first read from disk is running (not in ``list_adapters`` yet)."""
        return self.adapters.first_loads()

    # ------------------------------------------------------------------------------------------ engine loop

    def _loop(self) -> None:
        self._runner = threading.current_thread()
        self._loop_done.clear()
        try:
            self._steps_until_stopped()
        finally:
            self._loop_done.set()

    def _steps_until_stopped(self) -> None:
        while not self._stopping:
            try:
                worked = self._iterate()
            except Exception:  # the loop must survive anything; the step's requests were failed already
                log.exception("engine iteration failed")
                worked = False
            self._flush_events()
            try:  # after the tokens went out: the next admissions find their adapters placed
                self.scheduler.prefetch()
            except Exception:
                log.exception("adapter prefetch failed")
            if not worked:
                self._wake.wait(self.settings.engine.idle_poll_s)
                self._wake.clear()

    def _iterate(self) -> bool:
        while True:
            try:
                self.scheduler.add(self._inbox.get_nowait())
            except queue.Empty:
                break
        self._reap()
        self.adapters.place_pinned()
        chunks, failed = self.scheduler.schedule()
        for tokens in self.scheduler.preempted_tokens:
            self.listener.preempted(tokens)
        for prompt_tokens, cached_tokens in self.scheduler.prefix_lookups:
            self.listener.prefix_lookup(prompt_tokens, cached_tokens)
        if self.scheduler.prefix_evictions:
            self.listener.prefix_evicted(self.scheduler.prefix_evictions)
        for seq, error in failed:
            self._fail(seq, error)
        self._running_count = len(self.scheduler.running)
        if not chunks:
            return bool(failed)
        try:
            self._run_step(chunks)
        except Exception as exc:
            log.exception("engine step failed; failing its %d requests", len(chunks))
            for chunk in chunks:
                self._fail(chunk.seq, InternalError(f"the engine step failed: {type(exc).__name__}"))
        self._running_count = len(self.scheduler.running)
        return True

    def _reap(self) -> None:
        now = time.monotonic()
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            deadline = seq.request.deadline
            if seq.cancel_reason is not None:
                self._fail(seq, seq.cancel_reason)
            elif deadline is not None and now >= deadline:
                self._fail(
                    seq,
                    DeadlineExceeded(
                        f"deadline exceeded after {len(seq.output_ids)} generated tokens; the sequence was freed"
                    ),
                )
            elif seq.status is Status.WAITING:
                try:
                    self.scheduler.resolve_adapter(seq)
                except EngineError as error:
                    self._fail(seq, error)

    def _step_logits(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, tuple[ScheduledChunk, ...], tuple[ScheduledChunk, ...]]:
        """The step's logits of its sampled chunks, its chunks in batch order and the sampled ones in logits order:
        through the static decode step where it is on and takes the step, else the eager forward."""
        if self.graphs is not None:
            decode = build_decode(chunks, self.kv)
            if decode is not None and self.graphs.accepts(decode.rows):
                logits = self.graphs.run(decode.rows)
                if logits is not None:
                    return logits, decode.chunks, decode.chunks
        built = build_step(chunks, self.kv, self.upload)
        return self.forward(built.batch).logits, built.chunks, built.sampled

    def _run_step(self, chunks: list[ScheduledChunk]) -> None:
        started = time.perf_counter()
        logits, ordered, sampled = self._step_logits(chunks)
        self.steps += 1
        adapters = {id(chunk.seq.adapter) for chunk in chunks if chunk.seq.adapter is not None}
        tokens, logprobs = sample(logits, [chunk.seq.sampler for chunk in sampled])
        for chunk in ordered:
            chunk.seq.num_computed += chunk.num_tokens
            self.scheduler.computed(chunk.seq, chunk.num_tokens)
        for chunk, token, logprob in zip(sampled, tokens, logprobs, strict=True):
            if math.isfinite(logprob):
                self._emit(chunk.seq, token, logprob)
            else:
                self._fail_non_finite(chunk.seq)
        rows = sum(chunk.num_tokens for chunk in chunks)
        self.listener.step(rows, len(chunks), len(adapters), time.perf_counter() - started)

    def _fail_non_finite(self, seq: Sequence) -> None:
        """Fails a row whose logits held NaN or +Inf (an adapter whose finite weights overflow): its token's raw
        log-probability is then NaN or -Inf, which no finite row gives. The row neither crashes the sampler for
        the whole batch (it samples from cleaned scores) nor answers a garbage token."""
        error: EngineError = (
            InternalError("the base model produced NaN or Inf logits")
            if seq.adapter is None
            else AdapterRejected(
                f"adapter '{seq.request.adapter_id}' produced NaN or Inf logits (its weights overflow when "
                "applied); re-train or re-export it with smaller weights"
            )
        )
        self._fail(seq, error)

    def _emit(self, seq: Sequence, token: int, logprob: float) -> None:
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.output_ids.append(token)
        if not seq.sampler.observe(token):
            self._fail(seq, InternalError("the structured-output constraint refused a sampled token"))
            return
        seq.logprob_sum += logprob
        reason: FinishReason | None = None
        if token in seq.eos_ids:
            reason = FinishReason.STOP
            text = seq.stop.feed(seq.detokenizer.flush())
        else:
            text = seq.stop.feed(seq.detokenizer.push(token))
            if seq.stop.stopped:
                reason = FinishReason.STOP
            elif seq.sampler.matcher is not None and seq.sampler.matcher.complete:  # the grammar allows only EOS
                reason = FinishReason.STOP
                text += seq.stop.feed(seq.detokenizer.flush())
        if reason is None and len(seq.output_ids) >= seq.request.sampling.max_new_tokens:
            reason = FinishReason.LENGTH
            text += seq.stop.feed(seq.detokenizer.flush())
        if reason is not None and not seq.stop.stopped:
            text += seq.stop.flush()
        delta = TokenDelta(text, (token,), (logprob,) if seq.request.sampling.logprobs else None)
        if not self._push(seq, delta):
            self._fail(seq, Cancelled("the stream's reader stopped reading (backlog full or gone)"))
            return
        if reason is not None:
            self._finish(seq, reason, now)

    def _finish(self, seq: Sequence, reason: FinishReason, now: float) -> None:
        count = len(seq.prompt_ids)
        embedding = self.forward.prompt_embedding(seq.blocks[: self.kv.blocks_for(count)], count)
        self.scheduler.remove(seq, served=True)
        self._forget(seq)
        self._push(
            seq,
            Finished(
                finish_reason=reason,
                usage=Usage(prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids)),
                timings=seq.timings(now),
                adapter_id=seq.request.adapter_id or None,
                adapter_version=seq.adapter.version if seq.adapter is not None else 0,
                text=seq.stop.text,
                mean_logprob=seq.logprob_sum / len(seq.output_ids) if seq.output_ids else None,
                prompt_embedding=embedding,
            ),
        )

    def _fail(self, seq: Sequence, error: EngineError) -> None:
        if seq.status is not Status.FINISHED:
            self.scheduler.remove(seq, served=False)
        self._forget(seq)
        try:
            seq.sink.fail(error)
        except Exception:  # a broken sink must not break the engine
            log.exception("event sink of %s failed", seq.request_id)

    @staticmethod
    def _push(seq: Sequence, event: GenerationEvent) -> bool:
        try:
            return seq.sink.push(event)
        except Exception:  # a broken sink must not break the engine; the request is cancelled instead
            log.exception("event sink of %s failed", seq.request_id)
            return False


def _tenant_of(request: GenerationRequest) -> str:
    return request.tenant or ""


def describe(engine: Engine) -> dict[str, Any]:
    """Facts about the running engine for logs and metadata endpoints."""
    base = engine.base
    return {
        "base_model": base.name,
        "model_type": base.shape.model_type,
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "quantization": base.quantization,
        "lora_kernels": engine.lora_kernels.describe(),
        "lora_dtype": str(engine.slots.dtype).removeprefix("torch."),
        "attention": "paged: one SDPA call per layer (padded or flat layout per step)",
        "decode_step": engine.describe_decode(),
        "kv_cache_tokens": engine.kv.capacity,
        "kv_block_size": engine.kv.block_size,
        "prefix_cache": engine.settings.engine.prefix_cache,
        "torch_threads": torch.get_num_threads(),
    }
