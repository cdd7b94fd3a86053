"""``adapterkit serve`` on Ray Serve (src/adapterkit/serve/ray_deploy.py).

Default suite (no Ray needed): one replica's pieces on their own: the in-process ASGI bridge answers exactly as
the HTTP server, and an adapter Ray's multiplexing LRU evicts is detached from the model once unused (still
registered, attached again on its next request; an older claim's eviction never drops a newer claim).

Slow (``make test-ray``, needs ``ray[serve]``): a local Ray instance (2 CPUs, no dashboard, HTTP on 127.0.0.1)
runs 2 replicas; the real ``openai`` client's answers (completions and chat, streamed and not, concurrent, over
the base and 4 adapters of 3 methods) equal the single-process server's, both replicas serve, and each replica
holds at most ``max_adapters_per_replica`` adapters (Ray's LRU) with only those attached to its model.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import adapterkit as ak

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from adapterkit.serve import Server  # noqa: E402
from adapterkit.serve.ray_deploy import REPLICA_HEADER, ReplicaServer, _Resident, asgi_call  # noqa: E402

WORDS = [f"w{i}" for i in range(40)] + ["the", "film", "is", "good", "bad", "user", "assistant"]
KEY = "sk-ray"
PROMPTS = ["the film is good", "w1 w2 w3", "the w5 is bad w7 w9", "film film w11"]
ADAPTERS = ["lora-a", "lora-b", "bn", "prefix"]


def _tokenizer(vocab: list[str]) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", ids["[BOS]"])])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny random LLaMA (hidden 64, 2 layers) with a word tokenizer, and 4 adapters of 3 methods."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("serve_ray")
    vocab = ["[PAD]", "[UNK]", "[BOS]", *WORDS]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2,
                      eos_token_id=None, pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "llama")
    _tokenizer(vocab).save_pretrained(root / "llama")
    adapters = ak.attach(model)
    specs = {
        "lora-a": ak.LoRA(r=4, targets=["attn.q", "attn.v"]),
        "lora-b": ak.LoRA(r=8, targets="all-linear"),
        "bn": "seq_bn",
        "prefix": ak.PrefixTuning(num_virtual_tokens=3),
    }
    for i, (name, spec) in enumerate(specs.items()):
        adapters.add(name, spec)
        gen = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for p in adapters.parameters(name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        adapters.save(name, root / "adapters" / name)
    return {"model": root / "llama", "adapters": root / "adapters"}


# --- one replica without Ray ---------------------------------------------------------------------------------------
async def _call(impl: ReplicaServer, body: dict, path: str = "/v1/completions") -> tuple[int, dict, bytes]:
    headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {KEY}".encode())]
    items = [x async for x in asgi_call(impl.app, "POST", path, b"", headers, json.dumps(body).encode())]
    status, raw = items[0]
    return status, {k.decode(): v.decode() for k, v in raw}, b"".join(items[1:])


def _wait(cond, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_replica_answers_as_the_server_and_detaches_what_ray_evicts(files):
    srv = Server(files["model"], adapters_dir=files["adapters"], port=0, api_key=KEY)
    port = srv.start_in_thread()
    impl = ReplicaServer(files["model"], adapters_dir=files["adapters"], api_key=KEY, threads=1)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
        body = {"model": "lora-a", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
        want = client.completions.create(**body).choices[0].text

        async def scenario() -> None:
            held = _Resident(impl.residency, "lora-a")  # what @serve.multiplexed caches when Ray loads it here
            status, headers, raw = await _call(impl, body)
            assert status == 200 and headers["content-type"] == "application/json"
            assert json.loads(raw)["choices"][0]["text"] == want
            assert impl.pool.get("lora-a").attached and impl.residency.resident() == ["lora-a"]

            held.__del__()  # Ray's LRU unloads it: detached by the engine thread, still registered
            assert await asyncio.to_thread(_wait, lambda: not impl.pool.get("lora-a").attached)
            assert impl.residency.resident() == []
            status, _, raw = await _call(impl, {"model": "x"}, "/v1/models")  # POST: 405 in OpenAI's schema
            assert status == 405 and "error" in json.loads(raw)
            listing = [x async for x in asgi_call(impl.app, "GET", "/v1/models", b"", [
                (b"authorization", f"Bearer {KEY}".encode())], b"")]  # fmt: skip
            states = {m["id"]: m.get("state") for m in json.loads(b"".join(listing[1:]))["data"]}
            assert states["lora-a"] == "on disk" and set(ADAPTERS) <= set(states)

            again = _Resident(impl.residency, "lora-a")  # loaded again (a new claim) ...
            held.__del__()  # ... a late second call of the old claim's __del__ (garbage collection) changes nothing
            status, _, raw = await _call(impl, body)
            assert status == 200 and json.loads(raw)["choices"][0]["text"] == want
            await asyncio.sleep(0.5)  # several idle collect() rounds of the engine
            assert impl.pool.get("lora-a").attached and impl.residency.resident() == ["lora-a"]
            del again

            # errors are the server's: unknown model 404, bad key 401
            status, _, raw = await _call(impl, {**body, "model": "nope"})
            assert status == 404 and json.loads(raw)["error"]["code"] == "model_not_found"
            bad = [
                x async for x in asgi_call(impl.app, "POST", "/v1/completions", b"", [], json.dumps(body).encode())
            ]
            assert bad[0][0] == 401

            # a stream, event by event; closing it early cancels the engine's request
            stream = {**body, "model": "bn", "stream": True, "max_tokens": 55}
            gen = asgi_call(impl.app, "POST", "/v1/completions", b"", [
                (b"authorization", f"Bearer {KEY}".encode())], json.dumps(stream).encode())  # fmt: skip
            status, raw_headers = await gen.__anext__()
            assert status == 200 and dict(raw_headers)[b"content-type"].startswith(b"text/event-stream")
            first = await gen.__anext__()
            assert first.startswith(b"data: {")
            await gen.aclose()
            assert await asyncio.to_thread(_wait, impl.server.engine.idle)
            assert impl.server.metrics.requests_success.labels("abort")._value.get() == 1

        impl.server.engine.step_delay = 0.02  # the 55-token stream (over 1 s) still runs when the client leaves
        asyncio.run(scenario())
    finally:
        impl.stop()
        srv.stop()


def test_bad_arguments_are_refused_before_ray_starts():
    from adapterkit.serve.ray_deploy import app_builder, build_app

    with pytest.raises(ValueError, match="model=PATH is required"):
        app_builder({"adapters": "x"})
    with pytest.raises(ValueError, match="unknown argument 'replicas'"):
        app_builder({"model": "m", "replicas": "2"})
    with pytest.raises(ValueError, match="num_replicas must be at least 1"):
        build_app("m", num_replicas=0)
    with pytest.raises(ValueError, match="max_adapters_per_replica must be at least 1"):
        build_app("m", max_adapters_per_replica=0)
    with pytest.raises(ValueError, match="allow_runtime_adapter_updates is not supported"):
        build_app("m", allow_runtime_adapter_updates=True)
    with pytest.raises(ValueError, match="port is Ray's to set"):
        build_app("m", port=8000)
    with pytest.raises(ValueError, match="drain_timeout must be at least 0"):
        build_app("m", drain_timeout=-1)


# --- two replicas on Ray Serve -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requests(base: str) -> list[tuple[str, dict]]:
    """(kind, arguments) of every request compared: each model, completion and chat, streamed and not."""
    out = []
    for i, name in enumerate([base, *ADAPTERS]):
        prompt = PROMPTS[i % len(PROMPTS)]
        out.append(("completion", {"model": name, "prompt": prompt, "max_tokens": 6 + i, "temperature": 0}))
        out.append(("completion", {"model": name, "prompt": prompt, "max_tokens": 5, "temperature": 0,
                                   "stream": True}))  # fmt: skip
        msgs = [{"role": "user", "content": PROMPTS[(i + 1) % len(PROMPTS)]}]
        out.append(("chat", {"model": name, "messages": msgs, "max_tokens": 5, "temperature": 0}))
        out.append(("chat", {"model": name, "messages": msgs, "max_tokens": 4, "temperature": 0, "stream": True}))
    out.append(("completion", {"model": "lora-b", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0.9,
                               "top_p": 0.8, "seed": 3}))  # fmt: skip
    return out


def _ask(client, kind: str, kw: dict) -> tuple[str, str | None, str | None]:
    """(text, finish_reason, replica that served it) of one request."""
    api = client.completions if kind == "completion" else client.chat.completions
    if kw.get("stream"):
        raw = api.with_raw_response.create(**kw)
        replica = raw.headers.get(REPLICA_HEADER)
        pieces, finish = [], None
        for c in raw.parse():
            if c.choices:
                ch = c.choices[0]
                pieces.append((ch.text if kind == "completion" else ch.delta.content) or "")
                finish = ch.finish_reason or finish
        return "".join(pieces), finish, replica
    raw = api.with_raw_response.create(**kw)
    r = raw.parse()
    text = r.choices[0].text if kind == "completion" else r.choices[0].message.content
    return text, r.choices[0].finish_reason, raw.headers.get(REPLICA_HEADER)


@pytest.mark.slow
def test_two_ray_replicas_equal_the_single_server(files, monkeypatch):
    pytest.importorskip("ray", reason="needs the serve-ray extra: `make test-ray` (requirements/ray.txt)")
    pytest.importorskip("ray.serve", reason="needs ray[serve]: `make test-ray`")
    import ray
    from ray import serve

    from adapterkit.serve.ray_deploy import app_builder

    base = str(files["model"])
    jobs = _requests(base)
    srv = Server(files["model"], adapters_dir=files["adapters"], port=0, api_key=KEY)
    port = srv.start_in_thread()
    try:
        single = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
        want = [_ask(single, kind, kw)[:2] for kind, kw in jobs]
    finally:
        srv.stop()

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    http = _free_port()
    env = {"ADAPTERKIT_SERVE_STEP_DELAY": "0.02"}  # the replicas' engines: a stream is still running when left
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": env})  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http})
        # the arguments of `serve run adapterkit.serve.ray_deploy:app_builder key=value ...`
        app = app_builder({"model": base, "adapters": str(files["adapters"]), "api_key": KEY, "num_replicas": "2",
                           "max_adapters_per_replica": "2", "cpus_per_replica": "1", "drain_timeout": "5"})  # fmt: skip
        serve.run(app, name="adapterkit", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key=KEY, max_retries=0, timeout=60)

        # one at a time, in order
        got = [_ask(client, kind, kw) for kind, kw in jobs]
        assert [g[:2] for g in got] == want
        assert all(g[1] == "length" for g in got[:-1])

        # concurrent: 3 rounds of every greedy request from 8 threads
        greedy = [i for i, (_, kw) in enumerate(jobs) if kw["temperature"] == 0] * 3
        results: dict[int, tuple] = {}
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                c = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key=KEY, max_retries=0, timeout=60)
                for n in range(k, len(greedy), 8):
                    results[n] = _ask(c, *jobs[greedy[n]])
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert [results.get(n, (None,))[:2] for n in range(len(greedy))] == [want[i] for i in greedy]
        replicas = {g[2] for g in got} | {r[2] for r in results.values()}
        assert len(replicas) == 2 and None not in replicas, replicas

        # the same errors as the single server
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="w1", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="bad", max_retries=0).completions.create(
                model="bn", prompt="w1", max_tokens=2
            )
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="bn", prompt="w1", max_tokens=2, n=2)

        # a client that leaves a stream cancels its request on that replica (finished_reason "abort"; steps take
        # 20 ms there, so the 55 tokens would take over a second)
        raw = client.completions.with_raw_response.create(model="lora-a", prompt=PROMPTS[0], max_tokens=55,
                                                          temperature=0, stream=True)  # fmt: skip
        stream = raw.parse()
        assert next(iter(stream)).choices
        stream.close()

        def aborted() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=30) as r:
                if r.headers[REPLICA_HEADER] != raw.headers[REPLICA_HEADER]:
                    return False  # another replica answered
                m = re.search(
                    r'request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)', r.read().decode()
                )
            return m is not None and float(m.group(1)) >= 1

        assert _wait(aborted, 30)

        # backpressure: a second app under a route prefix, 1 replica taking 1 request at a time with 1 waiting
        # in Ray's queue (0 CPUs: the first app holds both); of 6 requests at once some get 429 + Retry-After
        small = app_builder({"model": base, "adapters": str(files["adapters"]), "num_replicas": "1",
                             "cpus_per_replica": "0", "threads": "1", "max_running": "1", "max_queue": "1",
                             "drain_timeout": "5"})  # fmt: skip
        serve.run(small, name="small", route_prefix="/small")
        url = f"http://127.0.0.1:{http}/small/v1/completions"
        statuses: list[tuple[int, str | None, str | None]] = []

        def post(_: int) -> None:
            body = {"model": "bn", "prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0}
            req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"content-type": "application/json"})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    statuses.append((r.status, None, None))
            except urllib.error.HTTPError as e:
                statuses.append((e.code, e.headers.get("retry-after"), json.loads(e.read())["error"]["type"]))

        posts = [threading.Thread(target=post, args=(k,)) for k in range(6)]
        for t in posts:
            t.start()
        for t in posts:
            t.join(timeout=120)
        assert len(statuses) == 6 and (200, None, None) in statuses, statuses
        assert set(statuses) == {(200, None, None), (429, "1", "rate_limit_error")}, statuses
        serve.delete("small")

        # Ray's LRU: at most 2 adapters per replica, and only those stay attached to the replica's model
        handle = serve.get_deployment_handle("AdapterReplica", app_name="adapterkit")
        seen: dict[str, dict] = {}

        def settled() -> bool:
            info = handle.status.remote().result(timeout_s=30)
            seen[info["replica"]] = info
            return len(seen) == 2 and all(
                i["busy"] == 0 and set(i["attached"]) <= set(i["resident"]) for i in seen.values()
            )

        assert _wait(settled, 30), seen
        for info in seen.values():
            assert 1 <= len(info["resident"]) <= 2, info
        assert set().union(*(i["resident"] for i in seen.values())) <= set(ADAPTERS)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
