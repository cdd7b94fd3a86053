"""``adapterkit serve``: one base model, many adapters of any method, one OpenAI-compatible server.

Layers: :mod:`.api` (HTTP, OpenAI schema) -> :mod:`.engine` (scheduler, continuous batching, one thread owns
the model) -> :mod:`.pool` (registered adapters, in-memory tier, LRU) -> the controller (``ak.attach``).

``Server(model=...)`` builds everything; ``Server.run()`` serves until SIGTERM/SIGINT (SIGTERM drains:
``/health`` and new requests answer 503, in-flight requests get up to ``drain_timeout`` seconds, the process
exits 0); ``Server.start_in_thread()`` / ``Server.stop()`` serve from a background thread (tests).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["Server"]

log = logging.getLogger(__name__)


class Server:
    def __init__(
        self,
        model: str | Path,
        *,
        adapters_dir: str | Path | None = None,
        adapters: dict[str, str | Path] | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        dtype: str = "auto",
        max_running: int = 32,
        max_queue: int = 256,
        max_active_adapters: int = 8,
        adapter_pool_mb: float | None = None,
        allow_runtime_adapter_updates: bool = False,
        drain_timeout: float = 30.0,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import adapterkit as ak

        from .api import ServerState, create_app
        from .engine import Engine
        from .metrics import Metrics
        from .pool import AdapterPool

        self.host, self.port, self.drain_timeout = host, port, drain_timeout
        torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        self.adapters = ak.attach(self.model)
        base_name = str(model)
        self.metrics = Metrics(base_name)
        budget = None if adapter_pool_mb is None else int(adapter_pool_mb * 2**20)
        self.pool = AdapterPool(
            self.adapters,
            root=Path(adapters_dir) if adapters_dir is not None else None,
            extra={k: Path(v) for k, v in (adapters or {}).items()},
            budget_bytes=budget,
            metrics=self.metrics,
        )
        eos: set[int] = set()
        for source in (self.tokenizer.eos_token_id, self.model.config.eos_token_id,
                       getattr(self.model.generation_config, "eos_token_id", None)):  # fmt: skip
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, (list, tuple)):
                eos.update(int(x) for x in source)
        text = self.model.config.get_text_config()
        context = int(
            getattr(text, "max_position_embeddings", 0) or getattr(self.tokenizer, "model_max_length", 2048)
        )
        self.engine = Engine(
            self.model, self.adapters, self.pool, eos_ids=eos, metrics=self.metrics, max_running=max_running,
            max_queue=max_queue, max_active_adapters=max_active_adapters,
        )  # fmt: skip
        self.state = ServerState(
            engine=self.engine, pool=self.pool, tokenizer=self.tokenizer, base_name=base_name,
            base_path=str(model), context_len=context, metrics=self.metrics, api_key=api_key,
            allow_runtime_updates=allow_runtime_adapter_updates,
        )  # fmt: skip
        self.app = create_app(self.state)
        self._uvicorn: Any = None
        self._thread: threading.Thread | None = None
        self._draining = threading.Event()

    # --- lifecycle -----------------------------------------------------------------------------------------
    def _make_uvicorn(self) -> Any:
        import uvicorn

        server = self

        class _Uvicorn(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                if sig == signal.SIGTERM and not server._draining.is_set():
                    server.begin_drain()  # not recorded: uvicorn would re-raise it after shutdown (exit 143)
                    return
                super().handle_exit(sig, frame)

        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=5)  # fmt: skip
        return _Uvicorn(config)

    def begin_drain(self) -> None:
        """Stop admission (503), let in-flight requests finish up to ``drain_timeout``, then stop serving."""
        if self._draining.is_set():
            return
        self._draining.set()
        self.state.draining = True

        def drain() -> None:
            self.engine.drain(self.drain_timeout)
            time.sleep(0.2)  # let the last responses flush
            if self._uvicorn is not None:
                self._uvicorn.should_exit = True

        threading.Thread(target=drain, name="adapterkit-drain", daemon=True).start()

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        return sock

    def run(self) -> None:
        """Serve in this thread until stopped (SIGTERM drains; a second signal or SIGINT stops at once)."""
        sock = self._socket()
        self._uvicorn = self._make_uvicorn()
        self.engine.start()
        log.warning("adapterkit serve: http://%s:%d/v1 (%d adapters registered)", self.host, self.port,
                    len(self.pool.listing()))  # fmt: skip
        try:
            self._uvicorn.run(sockets=[sock])
        finally:
            self.engine.stop()
            sock.close()

    def start_in_thread(self, timeout: float = 30.0) -> int:
        """Serve from a background thread; returns the port once the server accepts connections."""
        sock = self._socket()
        self._uvicorn = self._make_uvicorn()
        self.engine.start()
        self._sock = sock
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.port

    def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.engine.stop()
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()
