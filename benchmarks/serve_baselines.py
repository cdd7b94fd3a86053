"""Baseline engines for ``benchmarks/serve.py``: what a multi-adapter server does without adapterkit's routed
continuous batching, behind the **same** HTTP front end (:func:`adapterkit.serve.api.create_app`).

Both classes are duck-typed stand-ins for :class:`adapterkit.serve.engine.Engine`, with what the front end and
:class:`adapterkit.serve.Server` use of it: ``start()``, ``submit(req)`` (raises
:class:`~adapterkit.serve.engine.EngineError`: 429 queue full, 503 stopping/dead), ``cancel(req)``, ``idle()``,
``drain(timeout)``, ``stop()``, the attributes ``dead``, ``cond`` (a ``threading.Condition``) and ``stats``; each
request gets ``req.emit(("token", id))`` per token, then ``("done", reason)`` or ``("error", message, status)``.

* :class:`NaivePeftEngine` -- a peft ``PeftModel`` holding every LoRA adapter; one request at a time in arrival
  order (FIFO); ``set_adapter(name)`` per request (``disable_adapter()`` for the base model), then a plain greedy
  decode with a KV cache (``DynamicCache``), one forward per token, as ``generate`` does. This is what a
  ``transformers`` + ``peft`` server written the obvious way does.
* :class:`MergeSwapEngine` -- the same ``PeftModel``; the adapter of the oldest waiting request is merged into the
  base weights (``merge_adapter``, W <- W + s B A) and every waiting request of that adapter (up to
  ``max_batch``) is decoded together as one static batch (prompts left-padded, attention mask, explicit position
  ids), with no adapter compute in the forward; on a switch to another adapter the weights are unmerged first.
  Requests that arrive during a batch wait for the next one (no joining mid-batch).

Both serve LoRA adapters in peft's format only (peft has no bottleneck adapters; its (IA)^3 would work with the
naive engine, but the benchmark's mixed run keeps the baselines LoRA-only). Greedy decoding only: a request with
``temperature > 0`` fails with 400.
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from adapterkit.serve.engine import EngineError, Request

__all__ = ["MergeSwapEngine", "NaivePeftEngine", "load_peft_model"]

log = logging.getLogger(__name__)


def load_peft_model(model_dir: str | Path, adapters: dict[str, Path], dtype: torch.dtype = torch.float32) -> Any:
    """The base causal LM of ``model_dir`` wrapped in a ``PeftModel`` that holds every adapter of ``adapters``
    (name -> directory in peft's format), in eval mode. Without adapters, the plain base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    items = sorted(adapters.items())
    if not items:
        return model
    name, path = items[0]
    peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)
    for name, path in items[1:]:
        peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    return peft_model.eval()


class _BaselineEngine:
    """Queue, thread and lifecycle shared by the baselines; subclasses implement :meth:`_work` (one unit of
    work: pop requests from ``self.waiting`` under ``self.cond`` and serve them)."""

    def __init__(self, model: Any, *, eos_ids: set[int] | None = None, metrics: Any = None, max_queue: int = 256,
                 loaded: int = 0) -> None:  # fmt: skip
        self.model = model
        self.eos_ids = set(eos_ids or ())
        self.metrics = metrics
        self.max_queue = max_queue
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.cond = threading.Condition()
        self.accepting = True
        self.dead: str | None = None
        self._stop = False
        self.stats: dict[str, int] = {"requests": 0, "forwards": 0, "batched_rows": 0, "max_batch": 0}
        # transformers 5.24 renamed the forward's KV-cache argument past_key_values -> cache (old name deprecated)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache_arg = (
            "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
        )
        self.thread = threading.Thread(target=self._loop, name=f"{type(self).__name__}", daemon=True)
        if metrics is not None and loaded:
            metrics.adapter_loads.inc(loaded)  # every adapter is loaded at start (no pool, no eviction)

    # --- any thread: the interface adapterkit.serve's front end uses --------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, req: Request) -> None:
        if req.temperature > 0:
            raise EngineError("this baseline server decodes greedily only: send temperature=0", 400)
        with self.cond:
            if self.dead is not None:
                raise EngineError(f"the engine stopped: {self.dead}", 503)
            if not self.accepting:
                raise EngineError("the server is shutting down", 503)
            if len(self.waiting) >= self.max_queue:
                raise EngineError(f"too many waiting requests ({self.max_queue}); retry later", 429)
            self.waiting.append(req)
            self.cond.notify_all()

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self.cond:
            self.cond.notify_all()

    def idle(self) -> bool:
        with self.cond:
            return not self.waiting and not self.running

    def drain(self, timeout: float) -> None:
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

    # --- engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.no_grad():
                while True:
                    with self.cond:
                        while not self._stop and not self.waiting:
                            self.cond.wait(0.2)
                        if self._stop:
                            break
                    self._work()
            reason = "the server is shutting down"
        except BaseException as e:  # the engine died: fail everything, /health reports it
            log.exception("baseline engine failed")
            reason = f"{type(e).__name__}: {e}"
            self.dead = reason
        with self.cond:
            left = list(self.running) + list(self.waiting)
            self.running.clear()
            self.waiting.clear()
        for req in left:
            req.emit(("error", reason, 503))

    def _work(self) -> None:
        raise NotImplementedError

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _emit_token(self, req: Request, tok: int) -> bool:
        """Emit ``tok`` for ``req``; True (and the done event) when the request has finished."""
        req.tokens.append(tok)
        req.emit(("token", tok))
        if self.metrics is not None:
            self.metrics.generation_tokens.inc()
        reason = (
            "stop" if tok in self.eos_ids else "length" if len(req.tokens) >= req.max_tokens
            else "abort" if req.cancelled else None
        )  # fmt: skip
        if reason is not None:
            req.emit(("done", reason))
            return True
        return False

    def _forward(self, cache: Any, **kw: Any) -> tuple[torch.Tensor, Any]:
        """``model(**kw)`` with the KV cache ``cache``: the last position's logits ``(B, vocab)`` and the cache."""
        out = self.model(use_cache=True, **kw, **{self.cache_arg: cache})
        new = out.get("cache", None)
        return out.logits[:, -1], out.get("past_key_values", None) if new is None else new

    def _count(self, rows: int) -> None:
        self.stats["forwards"] += 1
        self.stats["batched_rows"] += rows
        self.stats["max_batch"] = max(self.stats["max_batch"], rows)


class NaivePeftEngine(_BaselineEngine):
    """FIFO, one request at a time: ``set_adapter`` then a greedy decode with a KV cache (see the module doc).

    Args:
        model: a ``PeftModel`` holding every adapter (:func:`load_peft_model`), or a plain model (base only).
        loaded: adapters loaded at start (reported as ``adapter_loads``).
    """

    def __init__(self, model: Any, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.stats["adapter_switches"] = 0
        self._active: str | None = None

    def _work(self) -> None:
        with self.cond:
            req = self.waiting.popleft()
            if req.cancelled:
                return
            self.running = [req]
        try:
            self._generate(req)
        except Exception as e:  # a failing request fails alone
            log.exception("request %s failed", req.id)
            req.emit(("error", f"generation failed: {type(e).__name__}: {e}", 500))
        finally:
            with self.cond:
                self.running = []

    def _generate(self, req: Request) -> None:
        """Prefill ``req.prompt`` (1, prompt) and decode one token per forward (1, 1) with a DynamicCache."""
        import contextlib

        from transformers import DynamicCache

        model = self.model
        if req.model is None:
            scope: Any = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        else:
            if req.model != self._active:
                self.stats["adapter_switches"] += 1
            model.set_adapter(req.model, inference_mode=True)
            self._active = req.model
            scope = contextlib.nullcontext()
        self.stats["requests"] += 1
        device = self._device()
        ids = torch.tensor([req.prompt], dtype=torch.long, device=device)
        cache = DynamicCache()
        with scope:
            while True:
                logits, cache = self._forward(cache, input_ids=ids)
                self._count(1)
                tok = int(logits[0].argmax())
                if self._emit_token(req, tok):
                    return
                ids = torch.tensor([[tok]], dtype=torch.long, device=device)


class MergeSwapEngine(_BaselineEngine):
    """Same-adapter static batches on merged weights, unmerged on a switch (see the module doc).

    Args:
        model: a ``PeftModel`` holding every adapter (:func:`load_peft_model`), or a plain model (base only).
        max_batch: requests decoded together at most.
        pad_id: token id used for left padding (masked out).
    """

    def __init__(self, model: Any, *, max_batch: int = 64, pad_id: int = 0, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.max_batch = max_batch
        self.pad_id = pad_id
        self.merged: str | None = None
        self.stats.update({"batches": 0, "merges": 0, "unmerges": 0, "merge_ms": 0})

    def _take(self) -> list[Request]:
        """The oldest waiting request's adapter and every waiting request of it (arrival order, ``max_batch``)."""
        with self.cond:
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft()
            if not self.waiting:
                return []
            name = self.waiting[0].model
            batch, keep = [], collections.deque()
            for r in self.waiting:
                if r.cancelled:
                    continue
                (batch if r.model == name and len(batch) < self.max_batch else keep).append(r)
            self.waiting = keep
            self.running = list(batch)
            return batch

    def _switch(self, name: str | None) -> None:
        """Make the weights those of ``name`` (None: the base model): unmerge the merged adapter, merge ``name``."""
        if name == self.merged:
            return
        t0 = time.perf_counter()
        if self.merged is not None:
            self.model.unmerge_adapter()
            self.stats["unmerges"] += 1
            self.merged = None
        if name is not None:  # merged layers compute base_layer(x) only, whatever adapter is active
            self.model.merge_adapter(adapter_names=[name])
            self.stats["merges"] += 1
            self.merged = name
        self.stats["merge_ms"] += round((time.perf_counter() - t0) * 1000)

    def _work(self) -> None:
        batch = self._take()
        if not batch:
            return
        try:
            self._switch(batch[0].model)
            if batch[0].model is None and hasattr(self.model, "disable_adapter"):
                with self.model.disable_adapter():  # nothing merged: the base weights, adapters off
                    self._generate(batch)
            else:
                self._generate(batch)
        except Exception as e:  # the batch fails, the engine goes on
            log.exception("batch of %d failed", len(batch))
            for r in batch:
                if len(r.tokens) < r.max_tokens:
                    r.emit(("error", f"generation failed: {type(e).__name__}: {e}", 500))
        finally:
            with self.cond:
                self.running = []

    def _generate(self, rows: list[Request]) -> None:
        """Static batch: prompts left-padded to the longest, ``ids (B, L)``, ``attention_mask (B, L)``,
        ``position_ids (B, L)``; then one forward per step over ``(B, 1)`` until every row has finished (finished
        rows ride along without emitting)."""
        from transformers import DynamicCache

        self.stats["batches"] += 1
        self.stats["requests"] += len(rows)
        device = self._device()
        longest = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, longest - len(r.prompt) :] = torch.tensor(r.prompt, dtype=torch.long)
            mask[i, longest - len(r.prompt) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        lengths = torch.tensor([len(r.prompt) for r in rows], dtype=torch.long, device=device)
        done = [False] * len(rows)
        cache = DynamicCache()
        while True:
            logits, cache = self._forward(cache, input_ids=ids, attention_mask=mask, position_ids=pos)
            self._count(len(rows))
            toks = logits.argmax(-1).tolist()
            for i, r in enumerate(rows):
                if not done[i]:
                    done[i] = self._emit_token(r, toks[i])
            if all(done):
                return
            ids = torch.tensor(toks, dtype=torch.long, device=device)[:, None]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            pos = lengths[:, None]
            lengths = lengths + 1
