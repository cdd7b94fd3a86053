"""``adapterkit serve`` scaled out on Ray Serve: N replicas of the single-process server behind one ingress.

Each replica is a whole :class:`~adapterkit.serve.Server` (the same engine, adapter pool and OpenAI-compatible
FastAPI app; no second generation loop) that is never bound to a socket: the replica feeds each request to the
app in-process through ASGI, so validation, errors, streaming and outputs are exactly the single server's.
The ingress deployment reads the OpenAI ``model`` field and calls a replica with
``handle.options(multiplexed_model_id=model)``: Ray routes the request to a replica that already holds that
adapter (falling back to the replica holding the fewest adapters), and the replica declares which adapters it
holds through ``@serve.multiplexed`` with ``max_num_models_per_replica`` (Ray's per-replica LRU). When Ray evicts
an adapter from a replica's LRU, the replica's pool detaches it from the model once no running request uses it
(it stays registered: a later request for it attaches it again). Base-model requests and ``/v1/models``,
``/health``, ``/metrics`` go to any replica.

Ray is imported lazily: ``import adapterkit.serve`` never needs it. Launch (see docs/serving_ray.md)::

    serve run adapterkit.serve.ray_deploy:app_builder model=./llama adapters=./adapters num_replicas=2

or from Python: ``serve.run(build_app("./llama", adapters_dir="./adapters", num_replicas=2))``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .pool import AdapterPool

__all__ = ["ReplicaServer", "app_builder", "asgi_call", "build_app"]

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-adapterkit-replica"


# --- per-replica adapter residency (no Ray needed: tested in the default suite) --------------------------------
class _Residency:
    """Ray's residency on one replica's :class:`AdapterPool`: adapters Ray's multiplexing LRU evicted are detached
    from the model by the engine thread once unpinned (:meth:`AdapterPool.detach_when_unused`) and stay registered
    (on disk), so ``/v1/models`` and 404s are the single server's.

    Residency is counted per *claim*: :meth:`claim` (Ray loaded the adapter on this replica) returns a token;
    :meth:`evict` with that token (Ray unloaded it) marks the adapter for detaching unless a newer claim exists.
    """

    def __init__(self, pool: AdapterPool) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.claims: dict[str, int] = {}
        self.next = 0

    def claim(self, name: str) -> int:
        with self.lock:
            self.next += 1
            self.claims[name] = self.next
            self.pool.keep_attached(name)
            return self.next

    def evict(self, name: str, token: int) -> None:
        with self.lock:
            if self.claims.get(name) == token:
                del self.claims[name]
                self.pool.detach_when_unused(name)

    def resident(self) -> list[str]:
        """Adapters Ray currently counts on this replica (claimed, not evicted)."""
        with self.lock:
            return sorted(self.claims)


class _Resident:
    """What ``@serve.multiplexed`` caches for one adapter on one replica. Ray calls ``__del__`` when its LRU
    unloads the adapter (and Python may call it again at garbage collection: only the first call counts)."""

    def __init__(self, residency: _Residency, name: str) -> None:
        self.residency, self.name = residency, name
        self.token = residency.claim(name)
        self._gone = False

    def __del__(self) -> None:
        if not self._gone:
            self._gone = True
            self.residency.evict(self.name, self.token)


# --- in-process ASGI -------------------------------------------------------------------------------------------
async def asgi_call(
    app: Any, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> AsyncIterator[tuple[int, list[tuple[bytes, bytes]]] | bytes]:
    """Run one HTTP request through the ASGI ``app`` in this event loop: yields ``(status, headers)`` first, then
    the body's chunks as the app sends them (a stream's events one by one). Closing the generator early is a
    client disconnect: the app sees ``http.disconnect`` and is cancelled (the engine request is cancelled)."""
    out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await out.put(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
        "root_path": "", "headers": [(k.lower(), v) for k, v in headers], "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0), "state": {},
    }  # fmt: skip

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception:
            log.exception("the app failed on %s %s", method, path)
        finally:
            await out.put(None)

    task = asyncio.ensure_future(run())
    started = False
    try:
        while True:
            message = await out.get()
            if message is None:
                if not started:  # the app failed before it answered
                    yield 500, [(b"content-type", b"application/json")]
                    yield json.dumps({"error": {"message": "internal server error", "type": "server_error",
                                                "param": None, "code": None}}).encode()  # fmt: skip
                return
            if message["type"] == "http.response.start":
                started = True
                yield int(message["status"]), [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    yield bytes(chunk)
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


# --- the replica (a whole Server, never bound to a socket) --------------------------------------------------------
class ReplicaServer:
    """One replica: a :class:`~adapterkit.serve.Server` whose engine runs but whose uvicorn never starts; the
    app is called in-process (:func:`asgi_call`). ``server_kwargs`` are :class:`Server`'s keyword arguments
    (``adapters_dir``, ``adapters``, ``api_key``, ``dtype``, ``max_running``, ...); runtime adapter updates are
    refused (each replica has its own registry: a load/unload would reach only one of them)."""

    def __init__(
        self, model: str | Path, *, threads: int | None = None, base_name: str | None = None, **server_kwargs: Any
    ) -> None:
        import torch

        from . import Server

        if server_kwargs.get("allow_runtime_adapter_updates"):
            raise ValueError(
                "allow_runtime_adapter_updates is not supported behind Ray Serve (each replica has its own "
                "registry); put the adapter under the adapters directory on every node and redeploy instead"
            )
        if threads is not None:
            torch.set_num_threads(int(threads))
        server_kwargs = {**server_kwargs, "host": "127.0.0.1", "port": 0}
        self.server = Server(model, **server_kwargs)
        self.pool = self.server.pool
        self.residency = _Residency(self.pool)  # Ray's per-replica LRU, on top of the pool
        if base_name is not None:  # the name requests use for the base model (the path as the user wrote it)
            self.server.state.base_name = base_name
        self.app = self.server.app
        self.base_name = self.server.state.base_name
        self.server.engine.start()
        self._stopped = threading.Event()

    def known(self, name: str) -> bool:
        """``name`` is a registered adapter here (not the base, not unknown)."""
        return name != self.base_name and self.pool.get(name) is not None

    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            self.server.engine.stop()


def _replica_deployment(
    max_adapters: int, max_running: int, max_queue: int, num_replicas: int, cpus: float, drain_timeout: float
) -> Any:
    from ray import serve

    class AdapterReplica:
        """Ray Serve replica of ``adapterkit serve`` (see :mod:`adapterkit.serve.ray_deploy`)."""

        def __init__(self, model: str, server_kwargs: dict[str, Any]) -> None:
            self.impl = ReplicaServer(model, **server_kwargs)
            self.replica_id = serve.get_replica_context().replica_id.unique_id

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, name: str) -> _Resident:
            # the weights are attached on the engine thread when the first request of this adapter is admitted
            return _Resident(self.impl.residency, name)

        async def handle(
            self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
        ) -> AsyncIterator[tuple[int, list[tuple[bytes, bytes]]] | bytes]:
            name = serve.get_multiplexed_model_id()
            if name and self.impl.known(name):  # unknown names are the app's 404, never cached by Ray
                await self.adapter(name)
            first = True
            async for item in asgi_call(self.impl.app, method, path, query, headers, body):
                if first:
                    status, hdrs = item  # type: ignore[misc]
                    item = (status, [*hdrs, (REPLICA_HEADER.encode(), self.replica_id.encode())])
                    first = False
                yield item

        def status(self) -> dict[str, Any]:
            """This replica's id, the adapters Ray counts on it, those attached to its model, and its requests
            in the engine (running + waiting)."""
            pool, engine = self.impl.pool, self.impl.server.engine
            attached = sorted(e.name for e in pool.listing() if e.attached)
            with engine.cond:
                busy = len(engine.running) + len(engine.waiting)
            resident = self.impl.residency.resident()
            return {"replica": self.replica_id, "resident": resident, "attached": attached, "busy": busy}

        def check_health(self) -> None:
            dead = self.impl.server.engine.dead
            if dead is not None:
                raise RuntimeError(f"the engine stopped: {dead}")

        def __del__(self) -> None:
            impl = getattr(self, "impl", None)
            if impl is not None:
                impl.stop()

    return serve.deployment(
        AdapterReplica,
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": cpus},
        max_ongoing_requests=max_running,  # more wait in Ray's queue and go to whichever replica frees first
        max_queued_requests=max_queue,  # waiting at the ingress; past it the ingress answers 429
        graceful_shutdown_timeout_s=drain_timeout,  # in-flight requests finish before a replica stops
    )


def _ingress_deployment(max_ongoing: int) -> Any:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse

    def error(status: int, message: str, kind: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}

    class AdapterIngress:
        """Reads the OpenAI ``model`` field and forwards the request to a replica holding that adapter."""

        def __init__(self, replica: Any, base_name: str) -> None:
            self.replica, self.base_name = replica, base_name

        def _model_of(self, body: bytes) -> str:
            try:
                parsed = json.loads(body) if body else None
            except ValueError:
                return ""
            model = parsed.get("model") if isinstance(parsed, dict) else None
            return model if isinstance(model, str) and model != self.base_name else ""

        async def __call__(self, request: Request) -> Response:
            from ray.serve.exceptions import BackPressureError

            body = await request.body()
            model = self._model_of(body) if request.method == "POST" else ""
            path, root = request.url.path, request.scope.get("root_path", "")
            if root and path.startswith(root):  # deployed under a route prefix: the app's paths start at /v1
                path = path[len(root) :] or "/"
            handle = self.replica.options(stream=True, multiplexed_model_id=model)
            try:
                gen = handle.handle.remote(
                    request.method, path, request.url.query.encode(), list(request.headers.raw), body
                )
                status, raw = await gen.__anext__()
            except BackPressureError:
                body = error(429, "too many waiting requests; retry later", "rate_limit_error")
                return JSONResponse(body, status_code=429, headers={"Retry-After": "1"})
            except Exception as e:  # the replica failed (Ray restarts it): OpenAI's schema, not Ray's text
                log.exception("replica call failed")
                body = error(503, f"the replica failed: {type(e).__name__}", "service_unavailable_error")
                return JSONResponse(body, status_code=503)
            headers = {
                k.decode("latin-1"): v.decode("latin-1")
                for k, v in raw
                if k.lower() not in (b"content-length", b"transfer-encoding")
            }
            if headers.get("content-type", "").startswith("text/event-stream"):

                async def rest() -> AsyncIterator[bytes]:
                    done = False
                    try:
                        async for chunk in gen:
                            yield chunk
                        done = True
                    except Exception as e:  # the replica failed mid-stream: an error event, as the server's
                        log.exception("replica stream failed")
                        failed = error(503, f"the replica failed: {type(e).__name__}", "service_unavailable_error")
                        yield f"data: {json.dumps(failed)}\n\ndata: [DONE]\n\n".encode()
                        done = True
                    finally:
                        if not done:  # the client went away: cancel the replica's request (frees its row)
                            gen.cancel()

                return StreamingResponse(rest(), status_code=status, headers=headers)
            content = b"".join([chunk async for chunk in gen])
            return Response(content, status_code=status, headers=headers)

    return serve.deployment(AdapterIngress, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=max_ongoing)


def build_app(
    model: str | Path,
    *,
    num_replicas: int = 2,
    max_adapters_per_replica: int = 8,
    cpus_per_replica: float = 1.0,
    threads: int | None = None,
    drain_timeout: float = 30.0,
    **server_kwargs: Any,
) -> Any:
    """The Ray Serve application (``serve.run(build_app(...))``): ``num_replicas`` replicas of ``adapterkit
    serve`` for base ``model`` (a path every node can read), each holding at most ``max_adapters_per_replica``
    adapters in Ray's multiplexing LRU, behind one ingress. ``cpus_per_replica``: Ray CPUs reserved per replica;
    ``threads``: torch threads per replica (default: ``cpus_per_replica`` rounded, at least 1);
    ``drain_timeout``: seconds in-flight requests get to finish when a replica stops (Ray's
    ``graceful_shutdown_timeout_s``).
    ``server_kwargs``: :class:`~adapterkit.serve.Server`'s (``adapters_dir``, ``adapters``, ``api_key``,
    ``dtype``, ``max_running``, ``max_queue``, ``max_active_adapters``, ``adapter_pool_mb``)."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    if max_adapters_per_replica < 1:
        raise ValueError(f"max_adapters_per_replica must be at least 1, got {max_adapters_per_replica}")
    if server_kwargs.get("allow_runtime_adapter_updates"):
        raise ValueError(
            "allow_runtime_adapter_updates is not supported behind Ray Serve (see docs/serving_ray.md)"
        )
    if drain_timeout < 0:
        raise ValueError(f"drain_timeout must be at least 0, got {drain_timeout}")
    for key in ("host", "port"):
        if key in server_kwargs:
            raise ValueError(f"{key} is Ray's to set behind Ray Serve (serve.start(http_options=...)); drop it")
    for key in ("adapters_dir",):
        if server_kwargs.get(key) is not None:
            server_kwargs[key] = str(Path(server_kwargs[key]).resolve())
    if server_kwargs.get("adapters"):
        server_kwargs["adapters"] = {k: str(Path(v).resolve()) for k, v in server_kwargs["adapters"].items()}
    # requests name the base model by the string given here, as with `adapterkit serve --model`; replicas load
    # it by absolute path (their working directory is Ray's)
    base_name = str(model)
    path = str(Path(model).resolve()) if Path(model).exists() else base_name
    max_running = int(server_kwargs.get("max_running", 32))
    max_queue = int(server_kwargs.get("max_queue", 256))
    threads = threads if threads is not None else max(1, round(cpus_per_replica))
    kwargs = {**server_kwargs, "threads": threads, "base_name": base_name}
    replica = _replica_deployment(
        max_adapters_per_replica, max_running, max_queue, num_replicas, cpus_per_replica, drain_timeout
    )
    ingress = _ingress_deployment(num_replicas * (max_running + max_queue))
    return ingress.bind(replica.bind(path, kwargs), base_name)


_INT = ("num_replicas", "max_adapters_per_replica", "threads", "max_running", "max_queue", "max_active_adapters")
_FLOAT = ("cpus_per_replica", "adapter_pool_mb", "drain_timeout")
_STR = ("adapters", "api_key", "dtype")


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run adapterkit.serve.ray_deploy:app_builder model=PATH [adapters=DIR] [num_replicas=2]
    [max_adapters_per_replica=8] [cpus_per_replica=1] [threads=N] [drain_timeout=30] [api_key=KEY] [dtype=auto]
    [max_running=32]
    [max_queue=256] [max_active_adapters=8] [adapter_pool_mb=MB] [adapter.NAME=PATH ...]`` (or a config
    file's ``args``)."""
    args = dict(args)
    model = args.pop("model", None)
    if not model:
        raise ValueError("model=PATH is required (the base causal LM directory)")
    kw: dict[str, Any] = {}
    extra = {k.split(".", 1)[1]: v for k, v in args.items() if k.startswith("adapter.")}
    for k in [k for k in args if k.startswith("adapter.")]:
        del args[k]
    for key, value in args.items():
        if key in _INT:
            kw[key] = int(value)
        elif key in _FLOAT:
            kw[key] = float(value)
        elif key in _STR:
            kw["adapters_dir" if key == "adapters" else key] = str(value)
        else:
            known = ", ".join(("model", *_INT, *_FLOAT, *_STR, "adapter.NAME"))
            raise ValueError(f"unknown argument {key!r}; known: {known}")
    if extra:
        kw["adapters"] = extra
    return build_app(model, **kw)
