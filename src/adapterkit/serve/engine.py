"""The engine of ``adapterkit serve``: one thread owns the model and runs iteration-level (continuous) batching.

Requests enter a queue (:meth:`Engine.submit`). At every step the engine thread

1. drops finished and cancelled requests (their adapters are unpinned),
2. admits waiting requests in arrival order while fewer than ``max_running`` run and the step would hold at
   most ``max_active_adapters`` distinct adapters (a request whose adapter would exceed it, or does not fit
   the pool yet, waits; later ones may pass it meanwhile), attaching adapters on first use
   (:class:`~adapterkit.serve.pool.AdapterPool`), and prefills each admitted request alone (batch of one),
3. decodes one token for every running request: **one** forward over all rows whose adapters act token-wise
   (LoRA family, bottleneck, (IA)^3, VeRA, ...) and base rows, routed per row with ``adapters.route(names)``.
   Each request keeps its own KV cache; for the batched step the caches are left-padded to the longest,
   with an attention mask that hides the padding and explicit ``position_ids`` (each row's own length), and
   split back afterwards. Requests of *model-level* adapters (prompt/prefix tuning, LoReFT, UniPELT gates:
   they change sequence lengths or caches) decode in forwards of their own (batch of one) in the same step:
   they are never refused, only not batched with other rows yet.

Greedy (temperature 0) outputs equal the same request served alone (float32; masked padding contributes
exactly zero attention weight).
"""

from __future__ import annotations

import collections
import inspect
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .pool import AdapterPool, PoolError

__all__ = ["Engine", "EngineError", "Request"]

log = logging.getLogger(__name__)


class EngineError(Exception):
    """A request cannot enter the engine (``status``: 429 queue full, 503 draining or dead)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Request:
    """One generation. ``emit`` receives ``("token", id)``, then ``("done", finish_reason)`` or
    ``("error", message, status)``; it is called on the engine thread and must not block."""

    model: str | None  # adapter name; None: the base model
    prompt: list[int]
    max_tokens: int
    emit: Callable[[tuple[Any, ...]], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # engine state
    tokens: list[int] = field(default_factory=list)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    cache: Any = None
    length: int = 0
    solo: bool = False
    pinned: bool = False
    skipped: int = 0
    generator: torch.Generator | None = None
    last_token_at: float = 0.0


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if n == 0 else torch.cat([t.new_zeros(*t.shape[:2], n, *t.shape[3:]), t], dim=2)


class Engine:
    def __init__(
        self,
        model: Any,
        adapters: Any,
        pool: AdapterPool,
        *,
        eos_ids: set[int],
        metrics: Any = None,
        max_running: int = 32,
        max_queue: int = 256,
        max_active_adapters: int = 8,
        max_prefill_tokens: int = 2048,
    ) -> None:
        attn = str(getattr(model.config, "_attn_implementation", None) or "")
        if "paged" in attn:  # left by transformers' continuous batching: our per-request caches are not paged
            raise ValueError(
                f"the model's attention implementation is {attn!r} (transformers' continuous batching); this engine "
                "keeps a DynamicCache per request: set model.set_attn_implementation('sdpa') (or 'eager') first"
            )
        self.model = model
        self.adapters = adapters
        self.pool = pool
        self.eos_ids = set(eos_ids)
        self.metrics = metrics
        self.max_running = max_running
        self.max_queue = max_queue
        self.max_active_adapters = max_active_adapters
        # prompt tokens admitted per step (at least one request): a burst of arrivals is prefilled over several
        # steps instead of stalling every running request for one long prefill
        self.max_prefill_tokens = max_prefill_tokens
        self.max_skips = 2 * max_running  # steps a request waits for an adapter slot before it blocks others
        self.stats = {
            "steps": 0,
            "batched_rows": 0,
            "mixed_steps": 0,
            "max_batch": 0,
            "prefill_batches": 0,
            "max_adapters": 0,
            "group_steps": 0,
            "group_prefills": 0,
            "plan_reuses": 0,
        }
        # the decode batch carried from step to step while its rows stay the same
        self._brows: list[Request] | None = None
        self._bcache: Any = None
        self._bwidth = 0
        self._bmask: Any = None
        # the route plan of the last decode step (rows' adapters in order, pool generation): reused while equal,
        # so its gathered/stacked adapter weights are built once for a run of steps, not at every step
        self._plan: Any = None
        self._plan_key: Any = None
        self.cache_arg = (
            "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        )
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.cond = threading.Condition()
        self.accepting = True
        self.dead: str | None = None
        self._stop = False
        self._seeds = itertools.count(int(time.time() * 1000) % (2**31))
        self.thread = threading.Thread(target=self._loop, name="adapterkit-engine", daemon=True)
        pool.on_read = self._wake
        # testing aid: seconds slept after each step, so a test can act while a tiny model is mid-generation
        self.step_delay = float(os.environ.get("ADAPTERKIT_SERVE_STEP_DELAY", "0") or 0)

    # --- any thread -------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.cond:
            if self.dead is not None:
                raise EngineError(f"the engine stopped: {self.dead}", 503)
            if not self.accepting:
                raise EngineError("the server is shutting down", 503)
            if len(self.waiting) >= self.max_queue:
                raise EngineError(f"too many waiting requests ({self.max_queue}); retry later", 429)
            self.waiting.append(req)
            self.cond.notify_all()

    def _wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self.cond:
            self.cond.notify_all()

    def idle(self) -> bool:
        with self.cond:
            return not self.waiting and not self.running

    def drain(self, timeout: float) -> None:
        """Stop admission, wait up to ``timeout`` s for queued and running requests, then end the rest with
        an error and stop the engine thread."""
        with self.cond:
            self.accepting = False
        deadline = time.monotonic() + timeout
        while not self.idle() and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.02)
        self.stop()

    def stop(self) -> None:
        with self.cond:
            self.accepting = False
            self._stop = True
            self.cond.notify_all()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=30)
        self.pool.close()

    # --- engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.no_grad():
                while True:
                    with self.cond:
                        while not self._stop and not self.waiting and not self.running:
                            self.cond.wait(0.2)
                            self.pool.collect()
                        if self._stop:
                            break
                    ran = self.step()
                    if self.step_delay:
                        time.sleep(self.step_delay)
                    elif not ran:  # nothing admissible yet (adapters loading): wait for a read or a request
                        with self.cond:
                            self.cond.wait(0.02)
            reason = "the server is shutting down"
        except BaseException as e:  # the engine died: fail everything, /health reports it
            log.exception("engine failed")
            reason = f"{type(e).__name__}: {e}"
            self.dead = reason
        with self.cond:
            left = list(self.running) + list(self.waiting)
            self.running.clear()
            self.waiting.clear()
        for req in left:
            self._release(req)
            req.emit(("error", reason, 503))
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is None:
            return
        self.metrics.running.set(len(self.running))
        self.metrics.waiting.set(len(self.waiting))
        self.metrics.set_lora_info(
            [r.model for r in self.running if r.model], [r.model for r in self.waiting if r.model],
            self.max_active_adapters,
        )  # fmt: skip

    def _release(self, req: Request) -> None:
        if req.pinned and req.model is not None:
            self.pool.release(req.model)
        req.pinned = False
        req.kv = req.cache = None

    def _finish(self, req: Request, reason: str) -> None:
        self._release(req)
        if req in self.running:
            self.running.remove(req)
        if self.metrics is not None:
            self.metrics.e2e.observe(time.monotonic() - req.arrival)
            self.metrics.requests_success.labels(reason).inc()
        req.emit(("done", reason))

    def step(self) -> bool:
        """One scheduling step: retire, admit and prefill, decode one token for every running request.
        Returns whether any forward ran."""
        for req in [r for r in self.running if r.cancelled]:
            self._finish(req, "abort")
        self.pool.collect()
        admitted = []
        for req in self._admit():
            try:
                if req.model is not None:
                    req.solo = self.pool.acquire(req.model).model_level
                    req.pinned = True
            except PoolError as e:
                req.emit(("error", str(e), e.status))
                continue
            if self.metrics is not None:
                self.metrics.queue_time.observe(time.monotonic() - req.arrival)
            self.running.append(req)
            admitted.append(req)
        shared = [r for r in admitted if not r.solo]
        if len(shared) > 1:
            try:
                self._prefill_batch(shared)
                admitted = [r for r in admitted if r.solo]
            except Exception:
                log.exception("batched prefill failed; prefilling its %d rows one by one", len(shared))
        same: dict[Any, list[Request]] = {}
        for req in admitted:  # rows of one adapter with prompts of one length prefill together
            same.setdefault((req.model, len(req.prompt)) if req.solo else id(req), []).append(req)
        for group in same.values():
            if len(group) > 1:
                try:
                    self._prefill_group(group)
                    continue
                except Exception:
                    log.exception("grouped prefill failed; prefilling its %d rows one by one", len(group))
            for req in group:
                self._guarded(req, self._prefill)
        self._gauges()
        batch = [r for r in self.running if not r.solo]
        ran = bool(self.running)
        if batch:
            try:
                self._decode_batch(batch)
            except Exception:  # a combination that cannot share a forward: decode each row alone instead
                log.exception("batched decode failed; decoding its %d rows one by one", len(batch))
                for req in batch:
                    req.solo = True
        self._decode_groups([r for r in self.running if r.solo])
        self._gauges()
        return ran

    def _guarded(self, req: Request, fn: Callable[[Request], None]) -> None:
        """``fn(req)``; an exception fails this request only (500), not the engine."""
        try:
            fn(req)
        except Exception as e:
            log.exception("request %s failed", req.id)
            self._release(req)
            if req in self.running:
                self.running.remove(req)
            req.emit(("error", f"generation failed: {type(e).__name__}: {e}", 500))

    def _admit(self) -> list[Request]:
        out: list[Request] = []
        failed: dict[str, tuple[list[Request], PoolError]] = {}
        with self.cond:
            active = {r.model for r in self.running if r.model is not None}
            keep: collections.deque[Request] = collections.deque()
            budget = self.max_prefill_tokens
            while self.waiting:
                req = self.waiting.popleft()
                if req.cancelled:
                    continue
                full = len(self.running) + len(out) >= self.max_running
                if full or (out and budget - len(req.prompt) < 0):  # prompt tokens per step are bounded too
                    keep.append(req)
                    keep.extend(self.waiting)
                    self.waiting.clear()
                    break
                if req.model is not None and req.model not in active:
                    if req.model in failed:
                        failed[req.model][0].append(req)
                        continue
                    try:
                        where = self.pool.prepare(req.model)  # starts reading its files on a loader thread
                    except PoolError as e:  # the read failed: its waiting requests fail, nobody else
                        failed[req.model] = ([req], e)
                        continue
                    if where == "loading":  # steps go on; later requests may pass it meanwhile
                        keep.append(req)
                        continue
                    entry = self.pool.get(req.model)
                    if entry is not None and (
                        len(active) >= self.max_active_adapters or not self.pool.can_acquire(req.model)
                    ):
                        # waits for a slot (acquire() reports unknown adapters); later requests may pass it for
                        # a while, then admission stops behind it until it fits (no starvation)
                        req.skipped += 1
                        keep.append(req)
                        if req.skipped > self.max_skips:
                            keep.extend(self.waiting)
                            self.waiting.clear()
                            break
                        continue
                    active.add(req.model)
                budget -= len(req.prompt)
                out.append(req)
            self.waiting = keep
        for reqs, error in failed.values():
            for req in reqs:
                req.emit(("error", str(error), error.status))
        return out

    def _scope(self, names: list[str | None]) -> Any:
        if all(n is None for n in names):
            return self.adapters.use()
        return self.adapters.route(names)

    def _forward(self, names: list[str | None], **kw: Any) -> tuple[torch.Tensor, Any]:
        with self._scope(names):
            out = self.model(use_cache=True, **kw)
        return out.logits[:, -1, :], self._cache_of(out)

    @staticmethod
    def _cache_of(out: Any) -> Any:
        cache = out.get("cache", None)
        return out.get("past_key_values", None) if cache is None else cache

    def _prefill(self, req: Request) -> None:
        from transformers import DynamicCache

        ids = torch.tensor([req.prompt], dtype=torch.long, device=self._device())
        logits, cache = self._forward([req.model], input_ids=ids, **{self.cache_arg: DynamicCache()})
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(req.prompt))
        req.length = len(req.prompt)
        layers = getattr(cache, "layers", None)
        if not req.solo and layers and all(type(lay).__name__ == "DynamicLayer" for lay in layers):
            req.kv = [(lay.keys, lay.values) for lay in layers]
        else:  # model-level adapter or a cache this engine cannot combine: decoded alone
            req.solo = True
            req.cache = cache
        self._token(req, logits[0])

    def _prefill_group(self, rows: list[Request]) -> None:
        """Rows of one model-level adapter with prompts of one length: one forward, nothing padded."""
        from transformers import DynamicCache

        ids = torch.tensor([r.prompt for r in rows], dtype=torch.long, device=self._device())
        logits, cache = self._forward([r.model for r in rows], input_ids=ids, **{self.cache_arg: DynamicCache()})
        if self._group_key_of(cache) is None:
            raise RuntimeError(f"cannot split a {type(cache).__name__} per row")
        self.stats["group_prefills"] += 1
        for i, r in enumerate(rows):
            r.cache = self._row_cache(cache, i)
            r.length = len(r.prompt)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in rows))
        self._tokens(rows, logits)

    @staticmethod
    def _row_cache(cache: Any, i: int) -> Any:
        """Row ``i`` of a batch's DynamicCache as a cache of its own, with adapterkit's marks on it (the virtual
        tokens' record of prompt/prefix tuning)."""
        from transformers import DynamicCache

        own = DynamicCache()
        for layer, lay in enumerate(cache.layers):
            own.update(lay.keys[i : i + 1].clone(), lay.values[i : i + 1].clone(), layer)
        for k, v in vars(cache).items():
            if k.startswith("_adapterkit_"):
                setattr(own, k, v.copy() if isinstance(v, dict) else v)
        return own

    @staticmethod
    def _group_key_of(cache: Any) -> Any:
        layers = getattr(cache, "layers", None)
        if not layers or not all(type(lay).__name__ == "DynamicLayer" for lay in layers):
            return None
        if getattr(cache, "_adapterkit_routed_rows", None) is not None:
            return None
        return int(cache.get_seq_length())

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _decode_groups(self, rows: list[Request]) -> None:
        """Rows decoded apart from the shared batch (model-level adapters): rows of one adapter whose caches have
        the same length share a forward (caches stacked along the batch, nothing padded, so each row sees exactly
        its own run); the others run alone."""
        groups: dict[Any, list[Request]] = {}
        for r in rows:
            groups.setdefault(self._group_key(r), []).append(r)
        for key, group in groups.items():
            if key is None or len(group) == 1:
                for r in group:
                    self._guarded(r, self._decode_solo)
                continue
            try:
                self._decode_group(group)
            except Exception:
                log.exception("grouped decode failed; decoding its %d rows one by one", len(group))
                for r in group:
                    self._guarded(r, self._decode_solo)

    def _group_key(self, req: Request) -> Any:
        length = self._group_key_of(req.cache)
        return None if length is None else (req.model, length)

    def _decode_group(self, rows: list[Request]) -> None:
        from transformers import DynamicCache

        first = rows[0].cache
        marks = {k: v for k, v in vars(first).items() if k.startswith("_adapterkit_")}
        cache = DynamicCache()
        for layer in range(len(first.layers)):
            cache.update(torch.cat([r.cache.layers[layer].keys for r in rows]),
                         torch.cat([r.cache.layers[layer].values for r in rows]), layer)  # fmt: skip
        for k, v in marks.items():
            setattr(cache, k, v.copy() if isinstance(v, dict) else v)
        ids = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long, device=self._device())
        logits, new = self._forward([r.model for r in rows], input_ids=ids, **{self.cache_arg: cache})
        self.stats["group_steps"] += 1
        for i, r in enumerate(rows):
            r.cache = self._row_cache(new, i)
            r.length += 1
        self._tokens(rows, logits)

    def _decode_solo(self, req: Request) -> None:
        if req.cache is None:  # a row of the shared batch decoded alone (its batch failed)
            from transformers import DynamicCache

            req.cache = DynamicCache()
            for layer, (k, v) in enumerate(req.kv or []):
                req.cache.update(k, v, layer)
            req.kv = None
        ids = torch.tensor([[req.tokens[-1]]], dtype=torch.long, device=self._device())
        logits, cache = self._forward([req.model], input_ids=ids, **{self.cache_arg: req.cache})
        req.cache = cache
        req.length += 1
        self._token(req, logits[0])

    def _prefill_batch(self, rows: list[Request]) -> None:
        """Prefill token-wise rows in one routed forward: prompts left-padded to the longest, with an attention
        mask and explicit position ids; each row's cache is cut back out of the batch's."""
        from transformers import DynamicCache

        device = self._device()
        longest = max(len(r.prompt) for r in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, longest - len(r.prompt) :] = torch.tensor(r.prompt, dtype=torch.long)
            mask[i, longest - len(r.prompt) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(
            [r.model for r in rows], input_ids=ids, attention_mask=mask, position_ids=pos,
            **{self.cache_arg: DynamicCache()},
        )  # fmt: skip
        layers = getattr(cache, "layers", None)
        if not layers or not all(type(lay).__name__ == "DynamicLayer" for lay in layers):
            raise RuntimeError(f"cannot split a {type(cache).__name__} per row")
        for i, r in enumerate(rows):
            start = longest - len(r.prompt)
            r.kv = [
                (lay.keys[i : i + 1, :, start:].clone(), lay.values[i : i + 1, :, start:].clone())
                for lay in layers
            ]
            r.length = len(r.prompt)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in rows))
        self.stats["prefill_batches"] += 1
        self._tokens(rows, logits)

    def _unbatch(self) -> None:
        """Cut the rows of the persistent batch cache that still run back into per-row caches (membership
        changes, or a failed step: columns past the batch's width, appended by a half-run forward, are left out)."""
        if self._brows is not None and self._bcache is not None:
            width = self._bwidth
            for i, r in enumerate(self._brows):
                if r in self.running and r.kv is None and r.cache is None:
                    a, b = width - r.length, width
                    r.kv = [
                        (lay.keys[i : i + 1, :, a:b].clone(), lay.values[i : i + 1, :, a:b].clone())
                        for lay in self._bcache.layers
                    ]
        self._brows = self._bcache = self._bmask = None
        self._bwidth = 0

    def _decode_batch(self, rows: list[Request]) -> None:
        """One routed forward over ``rows``. While the rows stay the same from step to step the batch's cache,
        mask and width carry over (each step appends one column); when rows join or leave, the per-row caches
        are left-padded to the longest and combined again."""
        from transformers import DynamicCache

        device = self._device()
        same = self._brows is not None and len(rows) == len(self._brows)
        same = same and all(a is b for a, b in zip(rows, self._brows or []))
        if same:
            cache, width = self._bcache, self._bwidth
            mask = torch.cat([self._bmask, self._bmask.new_ones(len(rows), 1)], dim=1)
        else:
            self._unbatch()
            width = max(r.length for r in rows)
            cache = DynamicCache()
            assert rows[0].kv is not None
            for layer in range(len(rows[0].kv)):
                keys = torch.cat([_pad_left(r.kv[layer][0], width - r.length) for r in rows])  # type: ignore[index]
                values = torch.cat([_pad_left(r.kv[layer][1], width - r.length) for r in rows])  # type: ignore[index]
                cache.update(keys, values, layer)
            for r in rows:
                r.kv = None
            mask = torch.zeros(len(rows), width + 1, dtype=torch.long, device=device)
            for i, r in enumerate(rows):
                mask[i, width - r.length :] = 1
            self._brows, self._bcache, self._bwidth, self._bmask = list(rows), cache, width, mask[:, :-1]
        pos = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=device)
        ids = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long, device=device)
        self.stats["steps"] += 1
        self.stats["batched_rows"] += len(rows)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(rows))
        self.stats["mixed_steps"] += len({r.model for r in rows}) > 1
        self.stats["max_adapters"] = max(
            self.stats["max_adapters"], len({r.model for r in self.running if r.model is not None})
        )
        names = [r.model for r in rows]
        key = (tuple(names), self.pool.generation)
        try:
            if key == self._plan_key and self._plan is not None:  # same adapters per row: reuse the route plan
                scope: Any = self.adapters.state.routed(self._plan)
                self.stats["plan_reuses"] += 1
            else:
                scope, self._plan, self._plan_key = self._scope(names), None, None
            with scope:
                if self._plan_key is None and any(n is not None for n in names):
                    self._plan, self._plan_key = self.adapters.state.routes, key
                out = self.model(
                    use_cache=True, input_ids=ids, attention_mask=mask, position_ids=pos, **{self.cache_arg: cache}
                )
            logits, new = out.logits[:, -1, :], self._cache_of(out)
        except Exception:
            self._unbatch()
            self._plan = self._plan_key = None
            raise
        self._bcache, self._bwidth, self._bmask = new, width + 1, mask
        for r in rows:
            r.length += 1
        self._tokens(rows, logits)

    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        logits = logits.float()
        if req.temperature <= 0:
            return int(logits.argmax())
        if req.generator is None:
            req.generator = torch.Generator(device=logits.device)
            req.generator.manual_seed(req.seed if req.seed is not None else next(self._seeds))
        probs = torch.softmax(logits / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < req.top_p  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=req.generator))

    def _tokens(self, rows: list[Request], logits: torch.Tensor) -> None:
        """One token per row from ``logits: (rows, vocab)``; greedy rows take one batched argmax."""
        greedy = logits.float().argmax(-1).tolist() if any(r.temperature <= 0 for r in rows) else None
        for i, r in enumerate(rows):
            self._token(r, logits[i], greedy[i] if greedy is not None and r.temperature <= 0 else None)

    def _token(self, req: Request, logits: torch.Tensor, tok: int | None = None) -> None:
        if tok is None:
            tok = self._sample(req, logits)
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.generation_tokens.inc()
            if req.tokens:
                self.metrics.itl.observe(now - req.last_token_at)
            else:
                self.metrics.ttft.observe(now - req.arrival)
        req.last_token_at = now
        req.tokens.append(tok)
        req.emit(("token", tok))
        if tok in self.eos_ids:
            self._finish(req, "stop")
        elif len(req.tokens) >= req.max_tokens:
            self._finish(req, "length")
        elif req.cancelled:
            self._finish(req, "abort")
