"""Scopes (use/route) are per thread and per asyncio task; exits restore exactly; route() checks the batch."""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading

import pytest
import torch

import adapterkit as ak

from conftest import make_inputs, make_model, output_of

BATCH = 3
# (kind, items): "use" -> adapters.use(*items), "route" -> adapters.route(items), "default" -> no scope
SCOPES = [
    ("use", ("a",)),
    ("use", ("b",)),
    ("use", ()),
    ("route", ("a", None, "b")),
    ("route", ("b", "b", "b")),  # uniform plan: the unrouted path
    ("use", (ak.Parallel("a", "b"),)),
    ("default", ()),
    ("use", (ak.Stack("a", "c"),)),
]


def setup():
    model = make_model("bert")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ak.LoRA(r=4, targets="all-linear", init_weights=False))
    adapters.add("b", ak.LoRA(r=2, alpha=5, targets="all-linear", init_weights=False))
    adapters.add("c", ak.LoRA(r=8, targets=["attn.v"], init_weights=False))
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # every adapter far from identity and from the others
    adapters.activate("c")  # the persistent default
    return model, adapters, make_inputs("bert", batch=BATCH)


def scope(adapters, kind, items):
    if kind == "use":
        return adapters.use(*items)
    if kind == "route":
        return adapters.route(list(items))
    return _nothing()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def forward(model, x):
    return model(**x).logits.clone()


def references(model, adapters, x):
    refs = []
    for kind, items in SCOPES:
        with scope(adapters, kind, items):
            refs.append(forward(model, x))
    assert not all(torch.equal(refs[0], r) for r in refs[1:])
    return refs


def assert_clean(model, adapters, refs, x):
    assert adapters.active == ("c",)
    assert adapters.state.routes is None
    assert not adapters.state.replicated
    assert not model._forward_pre_hooks  # Parallel's replicating hook is gone
    assert torch.equal(forward(model, x), refs[SCOPES.index(("default", ()))])


def test_threads_with_different_scopes_each_see_their_own():
    model, adapters, x = setup()
    refs = references(model, adapters, x)
    assert refs[SCOPES.index(("use", (ak.Parallel("a", "b"),)))].shape[0] == 2 * BATCH
    threads, per_thread = 4, 200
    wrong: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                k = (t * 3 + i) % len(SCOPES)
                kind, items = SCOPES[k]
                with scope(adapters, kind, items):
                    got = forward(model, x)
                if got.shape != refs[k].shape or not torch.allclose(got, refs[k], atol=1e-6, rtol=1e-6):
                    wrong.append(f"thread {t} step {i}: {kind}{items}")
        except BaseException as e:  # surfaced below
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # switch threads often, inside forwards
    try:
        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert not any(th.is_alive() for th in pool)
    if errors:
        raise errors[0]
    assert not wrong, f"{len(wrong)} of {threads * per_thread} forwards ran another scope, e.g. {wrong[:3]}"
    assert_clean(model, adapters, refs, x)


def test_out_of_order_exits_leave_state_clean():
    model, adapters, x = setup()
    refs = references(model, adapters, x)
    for first, second in [
        (("route", ("a", None, "b")), ("route", ("b", "b", "b"))),
        (("use", ("a",)), ("use", ("b",))),
        (("use", (ak.Parallel("a", "b"),)), ("route", ("a", None, "b"))),
    ]:
        c1, c2 = scope(adapters, *first), scope(adapters, *second)
        c1.__enter__()
        c2.__enter__()
        c1.__exit__(None, None, None)
        # the scope still open is the one in effect
        assert torch.equal(forward(model, x), refs[SCOPES.index(second)])
        c2.__exit__(None, None, None)
        assert_clean(model, adapters, refs, x)


def test_nested_scopes_restore_exactly():
    model, adapters, x = setup()
    refs = references(model, adapters, x)
    with adapters.use("a"):
        with adapters.route(["a", None, "b"]):
            with adapters.use("b"):
                assert adapters.active == ("b",)
            assert torch.equal(forward(model, x), refs[SCOPES.index(("route", ("a", None, "b")))])
        assert adapters.active == ("a",) and adapters.state.routes is None
    assert_clean(model, adapters, refs, x)


def test_asyncio_tasks_each_see_their_own_scope():
    model, adapters, x = setup()
    refs = references(model, adapters, x)
    seen: dict[str, list[bool]] = {"a": [], "b": []}

    async def task(name: str) -> None:
        with adapters.use(name):
            for _ in range(5):
                await asyncio.sleep(0)  # let the other task enter/run its scope in between
                seen[name].append(
                    adapters.active == (name,)
                    and torch.equal(forward(model, x), refs[SCOPES.index(("use", (name,)))])
                )

    async def main() -> None:
        await asyncio.gather(task("a"), task("b"))

    asyncio.run(main())
    assert seen == {"a": [True] * 5, "b": [True] * 5}
    assert_clean(model, adapters, refs, x)


def test_new_threads_see_the_persistent_default():
    model, adapters, x = setup()
    seen = []

    def look() -> None:
        seen.append(adapters.active)

    with adapters.use("a"):  # a scope of this thread only
        th = threading.Thread(target=look)
        th.start()
        th.join()
        adapters.activate("b")  # the default changes for everyone; this thread's scope still wins here
        assert adapters.active == ("a",)
        th = threading.Thread(target=look)
        th.start()
        th.join()
    assert seen == [("c",), ("b",)]
    assert adapters.active == ("b",)


def test_gradient_checkpointing_recomputes_under_the_scope():
    model, adapters, x = setup()
    model.train()  # checkpointing runs in training mode; no dropout, so both runs are deterministic
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for p in adapters.parameters():
        p.requires_grad_(True)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        if checkpointing:
            model.gradient_checkpointing_enable()
        try:
            with adapters.use("b"):  # not the default ("c")
                model(**x).logits.pow(2).sum().backward()
        finally:
            model.gradient_checkpointing_disable()
        return [p.grad.clone() for p in adapters.parameters("b")]

    for plain, recomputed in zip(grads(False), grads(True)):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)


def test_autograd_worker_threads_see_the_scopes_of_backward():
    """CUDA backward (and the forwards gradient checkpointing re-runs in it) runs on autograd worker threads, which
    get the context torch stashed from the thread that called backward(); simulated here on CPU."""
    stash, remove = getattr(torch._C, "_stash_obj_in_tls", None), getattr(torch._C, "_remove_obj_from_tls", None)
    if stash is None or remove is None:
        pytest.skip("this torch does not hand the backward caller's context to autograd workers")
    model, adapters, x = setup()
    with adapters.route(["a", None, "b"]), adapters.use("b"):
        launched = contextvars.copy_context()  # what torch stashes when backward() starts here
    seen = []

    def worker() -> None:
        seen.append(adapters.active)
        stash("context", launched)
        try:
            seen.append((adapters.active, adapters.state.routes.batch))
        finally:
            remove("context")
        seen.append(adapters.state.routes)

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    assert seen == [("c",), (("b",), BATCH), None]


@pytest.mark.slow
def test_compiled_model_keeps_scopes_per_thread():
    torch._dynamo.reset()
    model, adapters, x = setup()
    refs = references(model, adapters, x)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    wrong: list[str] = []

    def work(name: str, steps: int) -> None:
        for i in range(steps):
            with adapters.use(name), torch.no_grad():
                got = compiled(**x).logits
            if not torch.allclose(got, refs[SCOPES.index(("use", (name,)))], atol=1e-5, rtol=1e-5):
                wrong.append(f"{name} step {i}")

    work("a", 1), work("b", 1)  # compile both variants first
    pool = [threading.Thread(target=work, args=(n, 20)) for n in ("a", "b", "a", "b")]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=120)
    assert not wrong, wrong[:3]
    with torch.no_grad():
        torch.testing.assert_close(compiled(**x).logits, refs[SCOPES.index(("default", ()))], atol=1e-5, rtol=1e-5)


def test_route_with_wrong_number_of_names_raises():
    model, adapters, x = setup()
    for names in (["a", "b"], ["a", None, "b", "a"], ["a"], ["b", "b"]):
        match = rf"given {len(names)} names.*has {BATCH} rows.*expected batch size"
        with pytest.raises(ValueError, match=match), torch.no_grad(), adapters.route(names):
            model(**x)
        assert adapters.state.routes is None
    with pytest.raises(TypeError, match="one adapter name"), adapters.route("a"):
        pass
    with pytest.raises(TypeError, match="composition blocks"), adapters.route([ak.Stack("a", "b"), None]):
        pass
    with pytest.raises(ValueError, match="empty"), adapters.route([]):
        pass
    with pytest.raises(KeyError, match="nope"), adapters.route(["a", "nope", None]):
        pass
    assert adapters.state.routes is None and adapters.active == ("c",)


def test_routed_generate_with_beams_raises():
    model = make_model("gpt2")
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, targets="all-linear", init_weights=False))
    adapters.add("b", ak.LoRA(r=2, targets="all-linear", init_weights=False))
    x = make_inputs("gpt2", batch=2)
    with (
        pytest.raises(ValueError, match="expected batch size 2.*num_beams"),
        torch.no_grad(),
        adapters.route(["a", "b"]),
    ):
        model.generate(**x, max_new_tokens=2, num_beams=2, do_sample=False)


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_read_on_another_thread_then_install_equals_load(fmt, tmp_path):
    """``read`` (the slow half of ``load``) runs on another thread while this one runs forwards, touches nothing
    (same modules, outputs unchanged), and ``install`` of its result gives exactly what ``load`` gives."""
    model, adapters, inputs = setup()
    saver = ak.attach(make_model("bert"))
    torch.manual_seed(5)
    saver.add("n", ak.LoRA(r=4, targets="all-linear", init_weights=False))
    (saver.save if fmt == "native" else saver.export)("n", tmp_path / "n")
    with adapters.use("a"), torch.no_grad():
        before = output_of(model, inputs)
    modules = [n for n, _ in model.named_modules()]
    result: dict[str, object] = {}
    reader = threading.Thread(target=lambda: result.update(r=adapters.read(tmp_path / "n", name="a")))
    reader.start()  # "a" is in use: read() does not mind, install() refuses the name
    with adapters.use("a"), torch.no_grad():
        for _ in range(5):
            assert torch.equal(output_of(model, inputs), before)
    reader.join(timeout=60)
    read = result["r"]
    assert [n for n, _ in model.named_modules()] == modules and adapters.names == ["a", "b", "c"]
    assert read.name == "a" and read.nbytes == read.plan.num_params * 4
    with pytest.raises(ValueError, match="already exists"):
        adapters.install(read.name, read.plan)
    adapters.delete("a")
    adapters.install(read.name, read.plan)
    other = ak.attach(make_model("bert"))
    other.load(tmp_path / "n", name="a")
    with adapters.use("a"), other.use("a"), torch.no_grad():
        assert torch.equal(output_of(model, inputs), output_of(other.model, inputs))
