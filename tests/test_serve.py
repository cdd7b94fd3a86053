"""``adapterkit serve`` end to end: a live server on 127.0.0.1 (uvicorn in a thread; a subprocess for SIGTERM)
with a tiny random LLaMA and a word tokenizer, adapters of several methods saved with ``adapters.save``, and
the real ``openai`` client: completions and chat (streamed and not), concurrent mixed-adapter clients equal to
their single-request references, errors in OpenAI's schema, runtime load/unload, eviction, 429, metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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

WORDS = [f"w{i}" for i in range(48)] + ["the", "film", "is", "good", "bad", "user", "assistant", "system"]
KEY = "sk-test"
PROMPTS = ["the film is good", "w1 w2 w3", "the w5 is bad w7 w9", "film film w11", "w20 w21 w22 w23 w24 w25"]


def _tokenizer(vocab: list[str]) -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", ids["[BOS]"])])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("serve")
    vocab = ["[PAD]", "[UNK]", "[BOS]", *WORDS]
    tok = _tokenizer(vocab)
    assert tok("the film is good")["input_ids"] == [2, *(vocab.index(w) for w in ["the", "film", "is", "good"])]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2,
                      eos_token_id=None, pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    adapters = ak.attach(model)
    specs = {
        "lora-a": ak.LoRA(r=4, targets=["attn.q", "attn.v"]),
        "lora-b": ak.LoRA(r=8, targets="all-linear"),
        "bn": "seq_bn",
        "ia3": ak.IA3(),
        "prompt": ak.PromptTuning(num_virtual_tokens=4),
        "prefix": ak.PrefixTuning(num_virtual_tokens=3),
        "vera": ak.VeRA(r=4),
        "reft": ak.LoReFT(r=2, prefix=2, suffix=2),
        "mam": "mam",  # a union: prefix tuning + a parallel bottleneck
    }
    out = root / "adapters"
    for i, (name, spec) in enumerate(specs.items()):
        adapters.add(name, spec)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in adapters.parameters(name):
                p.add_(torch.randn(p.shape, generator=gen) * (0.5 if name != "ia3" else 0.8))
        adapters.save(name, out / name)
    return {"root": root, "model": root / "llama", "adapters": out}


def _reference(files: dict[str, Path], name: str | None, prompt: str, n: int) -> list[int]:
    """Greedy tokens by full recomputation without a cache (no server), for ``name`` alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    tok = AutoTokenizer.from_pretrained(files["model"])
    adapters = ak.attach(model)
    if name is not None:
        adapters.load(files["adapters"] / name, name=name)
    ids = list(tok(prompt)["input_ids"])
    out: list[int] = []
    with torch.no_grad(), adapters.use(name) if name else adapters.use():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits
            out.append(int(logits[0, -1].argmax()))
    return out


@pytest.fixture(scope="module")
def server(files):
    srv = Server(files["model"], adapters_dir=files["adapters"], port=0, api_key=KEY, max_running=32,
                 allow_runtime_adapter_updates=True)  # fmt: skip
    port = srv.start_in_thread()
    yield srv, port
    srv.stop()


def _client(port: int, key: str = KEY, **kw) -> object:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=30, **kw)


def _together(srv: Server, fn, n: int) -> None:
    """Run ``fn(0..n-1)`` in threads whose requests the engine admits in one step: admission is held
    (``max_running = 0``) until all ``n`` wait."""
    limit, srv.engine.max_running = srv.engine.max_running, 0
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(srv.engine.waiting) < n and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        srv.engine.max_running = limit
    for t in threads:
        t.join(timeout=30)


def _tokens(srv: Server, text: str) -> list[int]:
    return srv.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_completion_equals_reference_and_adapters_differ(server, files):
    srv, port = server
    client = _client(port)
    base = str(files["model"])
    answers = {}
    for name in [base, "lora-a", "bn", "prompt", "prefix"]:
        r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
        assert r.usage.prompt_tokens == 5
        answers[name] = r.choices[0].text
        ref = _reference(files, None if name == base else name, PROMPTS[0], 8)
        assert _tokens(srv, answers[name]) == ref, name
    assert len(set(answers.values())) == len(answers), answers  # every adapter changes the output


def test_streaming_completion_and_chat(server, files):
    srv, port = server
    client = _client(port)
    whole = client.completions.create(model="lora-b", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    chunks = list(
        client.completions.create(
            model="lora-b",
            prompt=PROMPTS[1],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6

    messages = [{"role": "user", "content": "the film is good"}]
    chat = client.chat.completions.create(model="ia3", messages=messages, max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    stream = client.chat.completions.create(
        model="ia3", messages=messages, max_tokens=5, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content
    # the fallback template (the tokenizer has none): "role: content" lines, then "assistant:"
    plain = client.completions.create(model="ia3", prompt="user: the film is good\nassistant:", max_tokens=5,
                                      temperature=0)  # fmt: skip
    assert plain.choices[0].text == chat.choices[0].message.content
    # stop strings end the answer early
    words = whole.choices[0].text.split()
    cut = client.completions.create(
        model="lora-b", prompt=PROMPTS[1], max_tokens=6, temperature=0, stop=[words[2]]
    )
    assert cut.choices[0].finish_reason == "stop" and words[2] not in cut.choices[0].text.split()
    # sampling with a seed repeats
    a, b = (
        client.completions.create(model="bn", prompt=PROMPTS[2], max_tokens=6, temperature=1.0, top_p=0.9, seed=7)
        for _ in range(2)
    )
    assert a.choices[0].text == b.choices[0].text


def test_concurrent_mixed_adapters_equal_single_requests(server, files):
    srv, port = server
    client = _client(port)
    names = [str(files["model"]), "lora-a", "lora-b", "bn", "ia3", "prompt", "prefix", "vera", "reft", "mam"]
    jobs = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)], 4 + (i * 3) % 9) for i in range(32)]
    ref = {}
    for job in set(jobs):
        r = client.completions.create(model=job[0], prompt=job[1], max_tokens=job[2], temperature=0)
        ref[job] = r.choices[0].text
    before = dict(srv.engine.stats)
    srv.engine.step_delay = 0.003  # steps slow enough that requests arriving together share them
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            c = _client(port)
            for i in range(k, len(jobs), 16):
                name, prompt, n = jobs[i]
                if i % 3 == 0:  # some streamed
                    s = c.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0, stream=True)
                    got[i] = "".join(ch.choices[0].text for ch in s if ch.choices)
                else:
                    got[i] = (
                        c.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)
                        .choices[0]
                        .text
                    )
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    _together(srv, worker, 16)  # 16 first requests start in one step; the second ones join running batches
    srv.engine.step_delay = 0.0
    assert not errors, errors
    assert {i: got.get(i) for i in range(len(jobs))} == {i: ref[j] for i, j in enumerate(jobs)}
    assert srv.metrics.running._value.get() == 0
    # rows of different adapters (and base rows) shared decode forwards
    assert srv.engine.stats["mixed_steps"] > before["mixed_steps"] and srv.engine.stats["max_batch"] >= 4
    assert srv.engine.stats["prefill_batches"] > before["prefill_batches"]
    assert srv.engine.stats["plan_reuses"] > before["plan_reuses"]


def test_model_level_rows_of_one_adapter_share_forwards(server, files):
    srv, port = server
    client = _client(port)
    jobs = [(m, p) for m in ["prompt", "prefix"] for p in ["w1 w2 w3", "w4 w5 w6", "the film is"]]
    ref = [
        client.completions.create(model=m, prompt=p, max_tokens=7, temperature=0).choices[0].text for m, p in jobs
    ]
    before, prefills = srv.engine.stats["group_steps"], srv.engine.stats["group_prefills"]
    srv.engine.step_delay = 0.01
    try:
        got: dict[int, str] = {}

        def one(i: int) -> None:
            m, p = jobs[i]
            got[i] = (
                _client(port).completions.create(model=m, prompt=p, max_tokens=7, temperature=0).choices[0].text
            )

        _together(srv, one, len(jobs))
    finally:
        srv.engine.step_delay = 0.0
    assert [got.get(i) for i in range(len(jobs))] == ref
    assert srv.engine.stats["group_steps"] > before
    assert srv.engine.stats["group_prefills"] > prefills


def test_a_failing_batched_forward_falls_back_to_rows_alone(server, files):
    srv, port = server
    client = _client(port)
    jobs = [("lora-a", PROMPTS[0]), ("bn", PROMPTS[1]), (str(files["model"]), PROMPTS[2]), ("ia3", PROMPTS[3])]
    ref = [
        client.completions.create(model=m, prompt=p, max_tokens=6, temperature=0).choices[0].text for m, p in jobs
    ]
    forward = srv.engine._forward

    def flaky(names, **kw):
        if len(names) > 1:
            raise RuntimeError("this mix cannot share a forward")
        return forward(names, **kw)

    srv.engine._forward = flaky
    srv.engine.step_delay = 0.003
    try:
        got: dict[int, str] = {}

        def one(i: int) -> None:
            m, p = jobs[i]
            got[i] = (
                _client(port).completions.create(model=m, prompt=p, max_tokens=6, temperature=0).choices[0].text
            )

        _together(srv, one, len(jobs))
    finally:
        srv.engine._forward = forward
        srv.engine.step_delay = 0.0
    assert [got.get(i) for i in range(len(jobs))] == ref
    assert srv.engine.dead is None


def test_chat_template_of_the_tokenizer(server, files):
    srv, port = server
    client = _client(port)
    messages = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "the film is good"}]
    srv.tokenizer.chat_template = "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}assistant"
    try:
        chat = client.chat.completions.create(model="lora-a", messages=messages, max_tokens=5, temperature=0)
    finally:
        srv.tokenizer.chat_template = None
    ids = srv.tokenizer("system w1 w2 user the film is good assistant", add_special_tokens=False)["input_ids"]
    plain = client.completions.create(model="lora-a", prompt=ids, max_tokens=5, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == len(ids)


def test_chat_uses_the_template_an_adapter_was_trained_with(server, files):
    """An adapter trained with ``--chat-template`` carries it in its run.json; chats with that adapter use it
    (issue 19, item 10: ``generate`` and ``serve`` render like training), other models keep the tokenizer's."""
    srv, port = server
    client = _client(port)
    run = files["adapters"] / "lora-b" / "run.json"
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    run.write_text(json.dumps({"chat_template": template}))
    messages = [{"role": "user", "content": "the film is good"}]
    try:
        chat = client.chat.completions.create(model="lora-b", messages=messages, max_tokens=5, temperature=0)
        other = client.chat.completions.create(model="lora-a", messages=messages, max_tokens=5, temperature=0)
    finally:
        run.unlink()
    ids = srv.tokenizer("<user>the film is good<assistant>", add_special_tokens=False)["input_ids"]
    plain = client.completions.create(model="lora-b", prompt=ids, max_tokens=5, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text and chat.usage.prompt_tokens == len(ids)
    fallback = client.completions.create(model="lora-a", prompt="user: the film is good\nassistant:", max_tokens=5,
                                         temperature=0)  # fmt: skip
    assert other.choices[0].message.content == fallback.choices[0].text


def test_client_disconnect_cancels_its_request(server):
    srv, port = server
    srv.engine.step_delay = 0.02
    try:
        stream = _client(port).completions.create(model="bn", prompt=PROMPTS[0], max_tokens=50, temperature=0,
                                                  stream=True)  # fmt: skip
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 10
        while srv.engine.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not srv.engine.running
    finally:
        srv.engine.step_delay = 0.0


def test_errors_in_openai_schema(server, files):
    srv, port = server
    client = _client(port)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="the", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="lora-a", prompt="the", max_tokens=2, n=2)
    assert e.value.body["param"] == "n" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="lora-a", prompt="the", max_tokens=2, extra_body={"beam_width": 3})
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="lora-a", prompt="the", max_tokens=200)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        _client(port, key="wrong").completions.create(model="lora-a", prompt="the", max_tokens=2)
    with pytest.raises(openai.NotFoundError):  # runtime updates are on, but the name must exist
        client.post("/unload_lora_adapter", body={"lora_name": "nope"}, cast_to=str)
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {
        str(files["model"]),
        "lora-a",
        "lora-b",
        "bn",
        "ia3",
        "prompt",
        "prefix",
        "vera",
        "reft",
        "mam",
    }
    assert listed["lora-a"].parent == str(files["model"]) and listed["bn"].method == "bottleneck"
    assert listed["prompt"].method == "prompt_tuning"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        assert r.status == 200
    client.completions.create(model="lora-b", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for metric in ["num_requests_running", "num_requests_waiting", "time_to_first_token_seconds_count",
                   "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                   "request_queue_time_seconds_count", "prompt_tokens_total", "generation_tokens_total",
                   "request_success_total", "lora_requests_info", "adapter_loads_total", "adapter_evictions_total",
                   "adapter_pool_bytes"]:  # fmt: skip
        assert f"adapterkit:{metric}" in text, metric
    generated = [ln for ln in text.splitlines() if ln.startswith("adapterkit:generation_tokens_total")]
    assert float(generated[0].split()[-1]) > 0


def test_load_unload_and_same_name_reload(server, files):
    srv, port = server
    client = _client(port)
    with pytest.raises(openai.BadRequestError):  # outside --adapters
        client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": str(files["model"])}, cast_to=str)
    client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "lora-a"}, cast_to=str)
    a = client.completions.create(model="x", prompt=PROMPTS[3], max_tokens=6, temperature=0).choices[0].text
    assert (
        a
        == client.completions.create(model="lora-a", prompt=PROMPTS[3], max_tokens=6, temperature=0)
        .choices[0]
        .text
    )
    client.post("/unload_lora_adapter", body={"lora_name": "x"}, cast_to=str)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="x", prompt=PROMPTS[3], max_tokens=6, temperature=0)
    # the same name again, other weights: no stale answer
    client.post(
        "/load_lora_adapter", body={"lora_name": "x", "lora_path": str(files["adapters"] / "bn")}, cast_to=str
    )
    b = client.completions.create(model="x", prompt=PROMPTS[3], max_tokens=6, temperature=0).choices[0].text
    assert (
        b == client.completions.create(model="bn", prompt=PROMPTS[3], max_tokens=6, temperature=0).choices[0].text
    )
    assert b != a
    client.post("/unload_lora_adapter", body={"lora_name": "x"}, cast_to=str)


def test_unload_while_in_use_waits_for_its_requests(server, files):
    srv, port = server
    client = _client(port)
    with pytest.raises(openai.BadRequestError):  # the name is taken
        client.post("/load_lora_adapter", body={"lora_name": "bn", "lora_path": "ia3"}, cast_to=str)
    with pytest.raises(openai.BadRequestError):  # no adapter there
        client.post("/load_lora_adapter", body={"lora_name": "z", "lora_path": "missing"}, cast_to=str)
    client.post("/load_lora_adapter", body={"lora_name": "z", "lora_path": "ia3"}, cast_to=str)
    ref = client.completions.create(model="ia3", prompt=PROMPTS[2], max_tokens=20, temperature=0).choices[0].text
    srv.engine.step_delay = 0.02
    try:
        stream = client.completions.create(model="z", prompt=PROMPTS[2], max_tokens=20, temperature=0, stream=True)
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        client.post("/unload_lora_adapter", body={"lora_name": "z"}, cast_to=str)
        assert "z" not in {m.id for m in client.models.list()}
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="z", prompt=PROMPTS[2], max_tokens=2)
        text += "".join(c.choices[0].text for c in chunks if c.choices)
    finally:
        srv.engine.step_delay = 0.0
    assert text == ref  # the running request finished with its adapter
    deadline = time.monotonic() + 5
    while "z" in srv.adapters and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "z" not in srv.adapters  # then the engine deleted it from the model


def test_eviction_under_tiny_pool_then_reload(files):
    # a file holds its tensors plus a header: the larger file's size fits either adapter alone, never both
    sizes = {n: (files["adapters"] / n / "adapter.safetensors").stat().st_size for n in ["lora-a", "bn"]}
    srv = Server(
        files["model"], adapters_dir=files["adapters"], port=0, adapter_pool_mb=max(sizes.values()) / 2**20
    )
    port = srv.start_in_thread()
    try:
        client = _client(port)
        first = (
            client.completions.create(model="lora-a", prompt=PROMPTS[0], max_tokens=5, temperature=0)
            .choices[0]
            .text
        )
        client.completions.create(model="bn", prompt=PROMPTS[0], max_tokens=5, temperature=0)
        states = {m.id: m.state for m in client.models.list()}
        assert states["lora-a"] == "on disk" and states["bn"] == "attached"
        again = (
            client.completions.create(model="lora-a", prompt=PROMPTS[0], max_tokens=5, temperature=0)
            .choices[0]
            .text
        )
        assert again == first
        with pytest.raises(openai.NotFoundError):  # off without --allow-runtime-adapter-updates
            client.post("/load_lora_adapter", body={"lora_name": "y", "lora_path": "bn"}, cast_to=str)
        assert srv.metrics.adapter_evictions._value.get() == 2 and srv.metrics.adapter_loads._value.get() == 3
    finally:
        srv.stop()


def test_max_active_adapters_bounds_each_step(files):
    srv = Server(files["model"], adapters_dir=files["adapters"], port=0, max_active_adapters=2)
    port = srv.start_in_thread()
    try:
        client = _client(port)
        jobs = [(["lora-a", "lora-b", "bn", "ia3"][i % 4], PROMPTS[i % len(PROMPTS)]) for i in range(8)]
        ref = {j: client.completions.create(model=j[0], prompt=j[1], max_tokens=8, temperature=0).choices[0].text
               for j in set(jobs)}  # fmt: skip
        srv.engine.step_delay = 0.003
        got: dict[int, str] = {}

        def one(i: int) -> None:
            m, p = jobs[i]
            got[i] = (
                _client(port).completions.create(model=m, prompt=p, max_tokens=8, temperature=0).choices[0].text
            )

        _together(srv, one, len(jobs))
        assert [got.get(i) for i in range(len(jobs))] == [ref[j] for j in jobs]
        assert srv.engine.stats["max_adapters"] == 2
    finally:
        srv.stop()


def test_bad_fields_are_refused(server):
    srv, port = server
    client = _client(port)
    bad = [
        {"stream_options": {"include_usage": True}},  # without stream
        {"temperature": 3},
        {"top_p": 0},
        {"max_tokens": 0},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"logprobs": 2},
        {"echo": True},
        {"prompt": ["the film", "w1"]},  # several prompts in one request
    ]
    for extra in bad:
        body = {"model": "lora-a", "prompt": "the film", "max_tokens": 2, **extra}
        with pytest.raises(openai.BadRequestError) as e:
            client.post("/completions", body=body, cast_to=object)
        assert set(e.value.body) == {"message", "type", "param", "code"}, extra


def test_a_failed_load_fails_only_its_requests(files, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(files["adapters"] / "lora-a", broken)
    (broken / "adapter.safetensors").write_bytes(b"not a safetensors file")
    srv = Server(files["model"], adapters={"broken": broken, "good": files["adapters"] / "lora-a"}, port=0)
    port = srv.start_in_thread()
    try:
        client = _client(port)
        with pytest.raises(openai.BadRequestError, match="failed to load"):
            client.completions.create(model="broken", prompt=PROMPTS[0], max_tokens=3)
        ok = client.completions.create(model="good", prompt=PROMPTS[0], max_tokens=3, temperature=0)
        assert ok.usage.completion_tokens == 3 and srv.engine.dead is None
        assert {m.id: m.state for m in client.models.list()}["broken"] == "on disk"
    finally:
        srv.stop()


def test_adapter_reads_run_off_the_engine_thread(files):
    """While one adapter's files are being read (held here by an event), requests of an attached adapter keep
    decoding; the held adapter's requests then complete, equal to their reference, and its state goes from
    "on disk" through "in memory" (read, not installed yet) to "attached"."""
    srv = Server(files["model"], adapters_dir=files["adapters"], port=0)
    release, reading = threading.Event(), threading.Event()
    read = srv.adapters.read
    readers: list[str] = []

    def held_read(path, name=None, **kw):
        readers.append(threading.current_thread().name)
        if name == "bn":
            reading.set()
            assert release.wait(30)
        return read(path, name, **kw)

    srv.adapters.read = held_read
    port = srv.start_in_thread()
    try:
        client = _client(port)
        client.completions.create(model="lora-a", prompt=PROMPTS[0], max_tokens=1)  # attached from now on
        result: dict[str, object] = {}
        waiter = threading.Thread(target=lambda: result.update(
            bn=client.completions.create(model="bn", prompt=PROMPTS[1], max_tokens=4, temperature=0)))  # fmt: skip
        waiter.start()
        assert reading.wait(30)
        steps = srv.engine.stats["steps"]
        other = client.completions.create(model="lora-a", prompt=PROMPTS[2], max_tokens=6, temperature=0)
        assert other.usage.completion_tokens == 6 and srv.engine.stats["steps"] >= steps + 5  # decoded meanwhile
        assert "bn" not in result and {m.id: m.state for m in client.models.list()}["bn"] == "on disk"
        release.set()
        waiter.join(timeout=60)
        bn = result["bn"]
        assert bn.choices[0].text == srv.tokenizer.decode(_reference(files, "bn", PROMPTS[1], 4))  # type: ignore[attr-defined]
        assert {m.id: m.state for m in client.models.list()}["bn"] == "attached"
        assert readers and all(n.startswith("adapterkit-load") for n in readers), readers
    finally:
        release.set()
        srv.stop()


def test_adapterhub_directories_are_served(tmp_path):
    """A directory written by AdapterHub's ``adapters`` library (committed fixture: LoRA on a tiny LLaMA) is
    registered from ``--adapters`` like ours and served; greedy tokens equal the adapter loaded in-process."""
    import shutil

    hub = Path(__file__).parent / "fixtures" / "adapterhub"
    if not (hub / "llama_lora" / "adapter").is_dir():
        pytest.skip("the AdapterHub fixtures are missing (tests/fixtures/adapterhub)")
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "llama"
    shutil.copytree(hub / "base" / "llama", model_dir)
    (model_dir / "expected.safetensors").unlink(missing_ok=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["eos_token_id"] = None  # run to max_tokens
    (model_dir / "config.json").write_text(json.dumps(cfg))
    _tokenizer(["[PAD]", "[UNK]", "[BOS]", *[f"t{i}" for i in range(cfg["vocab_size"] - 3)]]).save_pretrained(
        model_dir
    )
    (tmp_path / "adapters").mkdir()
    shutil.copytree(hub / "llama_lora" / "adapter", tmp_path / "adapters" / "hub-lora")
    prompt = [2, 17, 43, 5, 88, 9]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    adapters = ak.attach(model)
    adapters.load(tmp_path / "adapters" / "hub-lora", name="hub-lora")
    ref: list[int] = []
    with torch.no_grad(), adapters.use("hub-lora"):
        for _ in range(6):
            ref.append(int(model(input_ids=torch.tensor([prompt + ref])).logits[0, -1].argmax()))
    with torch.no_grad(), adapters.use(None):
        base = [int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())]
    srv = Server(model_dir, adapters_dir=tmp_path / "adapters", port=0)
    port = srv.start_in_thread()
    try:
        client = _client(port)
        out = client.completions.create(model="hub-lora", prompt=prompt, max_tokens=6, temperature=0)
        assert out.choices[0].text == srv.tokenizer.decode(ref)
        assert {m.id: m.method for m in client.models.list() if m.id == "hub-lora"} == {"hub-lora": "lora"}
        first = client.completions.create(model=str(model_dir), prompt=prompt, max_tokens=1, temperature=0)
        assert first.choices[0].text == srv.tokenizer.decode(base)
    finally:
        srv.stop()


def test_engine_refuses_a_paged_attention_implementation(files):
    """transformers' continuous batching leaves a paged attention implementation on the model; our per-request
    DynamicCaches would then decode wrong tokens silently, so the engine refuses it and names the fix."""
    from transformers import AutoModelForCausalLM

    from adapterkit.serve.engine import Engine
    from adapterkit.serve.pool import AdapterPool

    model = AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    model.config._attn_implementation = "paged|sdpa"
    pool = AdapterPool(ak.attach(model))
    with pytest.raises(ValueError, match="set_attn_implementation"):
        Engine(model, pool.adapters, pool, eos_ids=set())


def test_pool_states_on_disk_in_memory_attached(files):
    """The pool's tiers through its own API: prepare() reads on a loader thread, acquire() installs."""
    from transformers import AutoModelForCausalLM

    from adapterkit.serve.pool import AdapterPool

    model = AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    pool = AdapterPool(ak.attach(model), root=files["adapters"])
    try:
        assert pool.get("ia3").state == "on disk" and pool.prepare("nope") == "unknown"
        deadline = time.monotonic() + 30
        while pool.prepare("ia3") == "loading" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.get("ia3").state == "in memory" and "ia3" not in pool.adapters
        entry = pool.acquire("ia3")
        assert entry.state == "attached" and entry.pins == 1 and "ia3" in pool.adapters and entry.digest
        assert entry.nbytes == sum(p.numel() * p.element_size() for p in pool.adapters.parameters("ia3"))
        assert pool.acquire("vera").state == "attached"  # never prepared: acquire reads it itself
    finally:
        pool.close()


def test_429_when_queue_is_full(files):
    srv = Server(files["model"], adapters_dir=files["adapters"], port=0, max_running=1, max_queue=1)
    port = srv.start_in_thread()
    try:
        statuses: list[int] = []
        lock = threading.Lock()

        def one() -> None:
            body = json.dumps(
                {"model": "lora-a", "prompt": PROMPTS[4], "max_tokens": 40, "temperature": 0}
            ).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    code = r.status
            except urllib.error.HTTPError as e:
                code = e.code
                if code == 429:
                    assert e.headers["Retry-After"] and json.loads(e.read())["error"]["type"] == "rate_limit_error"
            with lock:
                statuses.append(code)

        srv.engine.max_running = 0
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20  # admission held: one request waits, the other 7 are refused
        while len(statuses) < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.engine.max_running = 1
        for t in threads:
            t.join(timeout=60)
        assert sorted(statuses) == [200] + [429] * 7, statuses
    finally:
        srv.stop()


def test_drain_timeout_ends_the_rest_with_an_error(files):
    srv = Server(files["model"], adapters_dir=files["adapters"], port=0, drain_timeout=0.3)
    port = srv.start_in_thread()
    srv.engine.step_delay = 0.05
    try:
        client = _client(port)
        stream = client.completions.create(
            model="bn", prompt=PROMPTS[0], max_tokens=50, temperature=0, stream=True
        )
        chunks = iter(stream)
        next(chunks)
        srv.begin_drain()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        assert e.value.code == 503
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="bn", prompt=PROMPTS[0], max_tokens=2)
        assert e.value.status_code == 503
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in chunks:
                pass
        srv._thread.join(timeout=10)
        assert not srv._thread.is_alive()  # the server stopped by itself after the drain
    finally:
        srv.stop()


def test_cli_help_and_bad_adapter_spec(files):
    from typer.testing import CliRunner

    from adapterkit.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"]).output
    for flag in ["--adapters", "--adapter", "--api-key", "--max-queue", "--drain-timeout"]:
        assert flag in out
    bad = CliRunner().invoke(app, ["serve", "--model", str(files["model"]), "--adapter", "nopath"])
    assert bad.exit_code != 0 and "NAME=PATH" in bad.output


def test_sigterm_drains_a_stream_and_exits_0(files, tmp_path):
    env = {**os.environ, "ADAPTERKIT_QUANT_LIBS": "1", "ADAPTERKIT_SERVE_STEP_DELAY": "0.05"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapterkit.cli", "serve", "--model", str(files["model"]), "--adapters",
         str(files["adapters"]), "--adapter", f"extra={files['adapters'] / 'ia3'}", "--port", "0", "--drain-timeout", "20", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        port = None
        # a cold start imports torch, transformers and torchao: over a minute on 2 loaded cores
        deadline = time.monotonic() + 180
        lines = []
        while time.monotonic() < deadline and port is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "http://127.0.0.1:" in line:
                port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert port is not None, "".join(lines)
        client = _client(port)
        assert "extra" in {m.id for m in client.models.list()}
        stream = client.completions.create(model="extra", prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                           stream=True)  # fmt: skip
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        assert e.value.code == 503
        rest = [c for c in stream if c.choices]
        assert rest[-1].choices[0].finish_reason == "length"
        assert len(_tokens_of(first.choices[0].text + "".join(c.choices[0].text for c in rest))) >= 1
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _tokens_of(text: str) -> list[str]:
    return text.split()


def test_incremental_detokenization_equals_full_decode():
    """Byte-level BPE (multi-byte characters split across tokens): the streamed pieces add up to the full
    decoding after every token."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from adapterkit.serve.api import _Run

    text = "héllo wörld, 日本語のテキスト and émojis 🙂🙃 mixed with plain words " * 3
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=300, min_frequency=1)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    ids = tok(text)["input_ids"]
    run = _Run.__new__(_Run)
    run.state = type("S", (), {"tokenizer": tok})()
    run.tokens, run._decoded, run._prefix, run._read = [], "", 0, 0
    for i, t in enumerate(ids):
        run.tokens.append(t)
        got = run._text(final=i == len(ids) - 1)
        full = tok.decode(run.tokens)
        assert full.startswith(got) and (len(full) - len(got) <= 1 or full.endswith("\ufffd"))
    assert got == text
