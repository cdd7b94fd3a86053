"""Faults around adapter files (issue 14): ``kill -9`` during a save, two processes saving to one directory at
once, and broken files.

Invariant: whatever happens to a save, ``load`` of the directory returns one complete version (config and
tensors of the same save) or raises ``AdapterFileError``, never a mix; temp files of killed saves do not pile up.
The save tests fork the test process (no interpreter start-up per trial); the forked child only writes files.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit as ak

from conftest import make_model

SIGKILL = getattr(signal, "SIGKILL", None)
posix_fork = pytest.mark.skipif(
    SIGKILL is None or "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork() and SIGKILL"
)
FORMATS = ("native", "peft")
FINAL = {"adapter_config.json", "adapter.safetensors", "adapter_model.safetensors"}
ALPHAS = {"v0": 8.0, "v1": 16.0}  # the versions differ in config (alpha) and in every tensor


# --- helpers -----------------------------------------------------------------------------------------------
def two_versions() -> ak.Adapters:
    """One model with two LoRA adapters of ~4 MB each (large enough for a kill to land inside a save)."""
    adapters = ak.attach(make_model("llama"))
    torch.manual_seed(1)
    for name, alpha in ALPHAS.items():
        adapters.add(name, ak.LoRA(r=1024, alpha=alpha, targets="all-linear", init_weights=False))
    return adapters


def write(adapters: ak.Adapters, name: str, path: Path, fmt: str) -> None:
    if fmt == "native":
        adapters.save(name, path)
    else:
        adapters.export(name, path, format="peft")


def site_and_weight(adapters: ak.Adapters, name: str) -> tuple[str, torch.Tensor]:
    site, comp = sorted(adapters.components(name).items())[0]
    return site, comp.lora_A.detach().clone()


class Reader:
    """Loads a directory onto a second model and says which version it holds, checking its tensors belong to
    its config."""

    def __init__(self, writer: ak.Adapters) -> None:
        self.adapters = ak.attach(make_model("llama"))
        self.expected = {ALPHAS[n]: (n, *site_and_weight(writer, n)) for n in ALPHAS}

    def version(self, path: Path) -> str:
        self.adapters.load(path, name="x")
        try:
            alpha = self.adapters.config("x").alpha
            assert alpha in self.expected, f"config of no known version (alpha {alpha})"
            version, site, weight = self.expected[alpha]
            loaded = self.adapters.components("x")[site].lora_A.detach()
            assert torch.equal(loaded, weight), f"config of {version} with tensors of another save: a mix"
            return version
        finally:
            self.adapters.delete("x")


def temp_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name not in FINAL) if path.is_dir() else []


def save_loop(
    adapters: ak.Adapters, path: Path, fmt: str, names: tuple[str, ...], seconds: float, enough: Any = None
) -> None:
    """Save for ``seconds``, and past that (up to 30 s more) until ``enough`` (an Event) is set."""
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end or (enough is not None and not enough.is_set() and time.monotonic() < end + 30):
        write(adapters, names[i % len(names)], path, fmt)
        i += 1


def fork(target: Any, *args: Any) -> multiprocessing.Process:
    process = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def kill(process: multiprocessing.Process) -> None:
    os.kill(process.pid, SIGKILL)
    process.join()


# --- kill -9 during a save ---------------------------------------------------------------------------------
@posix_fork
@pytest.mark.parametrize("fmt", FORMATS)
def test_kill_9_at_random_times_during_saves(fmt: str, tmp_path: Path) -> None:
    """A process saving two versions in turn to one directory is killed at random times, 10 times."""
    adapters = two_versions()
    reader = Reader(adapters)
    path = tmp_path / "a"
    rng = random.Random(14)
    seen: list[str] = []
    for trial in range(10):
        process = fork(save_loop, adapters, path, fmt, ("v0", "v1"), 60.0)
        time.sleep(rng.uniform(0.05, 0.5))
        kill(process)
        try:
            seen.append(reader.version(path))
        except ak.AdapterFileError:
            # only before anything was saved: once a version is complete, a killed save never loses it
            assert not seen, f"trial {trial}: the directory lost its complete version: {temp_files(path)}"
        # the killed save's temp directory only: the ones before were removed
        assert len(temp_files(path)) <= 1, temp_files(path)
    assert seen
    write(adapters, "v0", path, fmt)
    assert temp_files(path) == []
    assert reader.version(path) == "v0"


def _save_and_die(adapters: ak.Adapters, path: Path, fmt: str, name: str, after: int) -> None:
    """Save ``name``, killing this process with SIGKILL right after its ``after``-th rename (0: before any)."""
    done = 0
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        nonlocal done
        if done == after:
            os.kill(os.getpid(), SIGKILL)
        real(src, dst)
        done += 1

    os.replace = replace
    write(adapters, name, path, fmt)
    if done == after:
        os.kill(os.getpid(), SIGKILL)


@posix_fork
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("after", [0, 1, 2])
@pytest.mark.parametrize("first", [False, True], ids=["overwrite", "first-save"])
def test_kill_9_between_the_renames_of_a_save(fmt: str, after: int, first: bool, tmp_path: Path) -> None:
    """Kill a save of v1 before, between and after its two renames, over v0 or into an empty directory."""
    adapters = two_versions()
    reader = Reader(adapters)
    path = tmp_path / "a"
    if not first:
        write(adapters, "v0", path, fmt)
    process = fork(_save_and_die, adapters, path, fmt, "v1", after)
    process.join()
    assert process.exitcode == -SIGKILL
    if first and after == 0:
        with pytest.raises(ak.AdapterFileError):
            reader.version(path)
    else:
        # the tensors' rename commits the save: from then on the directory reads as v1
        assert reader.version(path) == ("v1" if after else "v0")
    assert len(temp_files(path)) <= 1
    write(adapters, "v0", path, fmt)  # the next save removes what the killed one left
    assert temp_files(path) == []
    assert reader.version(path) == "v0"


# --- two writers -------------------------------------------------------------------------------------------
@posix_fork
@pytest.mark.parametrize("fmt", FORMATS)
def test_two_processes_saving_to_one_directory(fmt: str, tmp_path: Path) -> None:
    """Two processes save different versions to one directory for 2 s while this one keeps loading it."""
    adapters = two_versions()
    reader = Reader(adapters)
    path = tmp_path / "a"
    enough = multiprocessing.get_context("fork").Event()  # 4 reads seen: a loaded machine reads slowly
    writers = [fork(save_loop, adapters, path, fmt, (name,), 2.0, enough) for name in ALPHAS]
    seen = []
    while any(w.is_alive() for w in writers):
        try:
            seen.append(reader.version(path))
            if len(seen) > 3:
                enough.set()
        except ak.AdapterFileError:
            assert not seen, "a complete version was lost"  # only before the first save completes
            time.sleep(0.01)
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert reader.version(path) in ALPHAS
    assert temp_files(path) == []
    assert len(seen) > 3


# --- broken files: each load succeeds or raises AdapterFileError naming the directory -----------------------
def _adapter(kind: str) -> ak.Adapters:
    cfg = {
        "lora": ak.LoRA(r=4, init_weights=False),
        "ia3": ak.IA3(),
        "vera": ak.VeRA(r=8),
        "prompt": ak.PromptTuning(num_virtual_tokens=3),
        "prefix": ak.PrefixTuning(num_virtual_tokens=3),
    }[kind]
    adapters = ak.attach(make_model("llama"))
    adapters.add("a", cfg)
    return adapters


FUZZ_CASES = [("native", "lora"), ("peft", "lora"), ("peft", "ia3"), ("peft", "vera"), ("peft", "prompt"),
              ("peft", "prefix")]  # fmt: skip
BAD_VALUES = [None, "x", -1, 0, 1.5, True, [], {}, [1], {"a": 1}]


def _stem(path: Path) -> str:
    return "adapter" if (path / "adapter.safetensors").exists() else "adapter_model"


def _rewrite(path: Path, stem: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write a config and tensors as one save (the tensors' copy of the config is the config), so that the
    loaders' own checks are reached."""
    from adapterkit.formats import io

    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, path / f"{stem}.safetensors", metadata={"format": "pt", io.CONFIG_KEY: json.dumps(config)})


def _config_mutations(config: dict[str, Any]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    keys = [(k,) for k in config] + [("config", k) for k in config.get("config", {})]
    for key in keys:
        for value in [*BAD_VALUES, "<missing>"]:
            data = json.loads(json.dumps(config))
            holder = data if len(key) == 1 else data[key[0]]
            if value == "<missing>":
                holder.pop(key[-1])
            else:
                holder[key[-1]] = value
            out.append((f"{'.'.join(key)}={value!r}", data))
    return out


def _tensor_mutations(tensors: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    out = []
    for key, t in sorted(tensors.items()):
        for label, bad in [
            ("int64", (t * 100).long()),
            ("bool", t > 0),
            ("complex", t.to(torch.complex64)),
            ("flat", t.reshape(-1) if t.dim() > 1 else t[:-1]),
            ("extra-dim", t.unsqueeze(0)),
            ("empty", t.new_zeros(0)),
            ("scalar", t.new_tensor(1.0)),
            ("missing", None),
        ]:
            changed = dict(tensors)
            if bad is None:
                del changed[key]
            else:
                changed[key] = bad
            out.append((f"{key}:{label}", changed))
    some = next(iter(tensors.values()))
    out.append(("unknown-key", {**tensors, "base_model.model.nope.weight": some.clone()}))
    out.append(("no-tensors", {}))
    return out


def _problem(adapters: ak.Adapters, path: Path, label: str, must_fail: bool = False) -> str | None:
    """Load ``path``: None when it loads (unless ``must_fail``) or raises an AdapterFileError naming it and
    leaving the model without adapters; else what went wrong."""
    try:
        name = adapters.load(path)
    except ak.AdapterFileError as e:
        assert adapters.names == [], label
        return None if str(path) in str(e) else f"{label}: the message names no file: {e}"
    except Exception as e:  # noqa: BLE001 - the point of the test
        return f"{label}: {type(e).__name__} instead of AdapterFileError: {e}"
    adapters.delete(name)
    return f"{label}: loaded" if must_fail else None


@pytest.mark.parametrize(("fmt", "kind"), FUZZ_CASES, ids=[f"{f}-{k}" for f, k in FUZZ_CASES])
def test_bad_config_values_raise_adapter_file_error(fmt: str, kind: str, tmp_path: Path) -> None:
    path = tmp_path / "a"
    write(_adapter(kind), "a", path, fmt)
    stem = _stem(path)
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(path / f"{stem}.safetensors")
    reader = ak.attach(make_model("llama"))
    problems = []
    for label, data in _config_mutations(config):
        _rewrite(path, stem, data, tensors)
        problems.append(_problem(reader, path, label))
    assert [p for p in problems if p] == []


@pytest.mark.parametrize(("fmt", "kind"), FUZZ_CASES, ids=[f"{f}-{k}" for f, k in FUZZ_CASES])
def test_bad_tensors_raise_adapter_file_error(fmt: str, kind: str, tmp_path: Path) -> None:
    path = tmp_path / "a"
    write(_adapter(kind), "a", path, fmt)
    stem = _stem(path)
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(path / f"{stem}.safetensors")
    reader = ak.attach(make_model("llama"))
    problems = []
    for label, changed in _tensor_mutations(tensors):
        _rewrite(path, stem, config, changed)
        # VeRA's projections are regenerated from the seed; an (IA)^3 file without a module's vector adapts one
        # module less (each module has one tensor, so nothing is inconsistent)
        optional = label in ("base_model.vera_A:missing", "base_model.vera_B:missing") or (
            kind == "ia3" and label.endswith(":missing")
        )
        problems.append(_problem(reader, path, label, must_fail=not optional))
    assert [p for p in problems if p] == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_broken_files_raise_adapter_file_error(fmt: str, tmp_path: Path) -> None:
    good = tmp_path / "good"
    write(_adapter("lora"), "a", good, fmt)
    stem = _stem(good)
    reader = ak.attach(make_model("llama"))
    config_bytes = (good / "adapter_config.json").read_bytes()
    tensor_bytes = (good / f"{stem}.safetensors").read_bytes()
    problems = []
    cases = {
        "config-truncated": ("adapter_config.json", config_bytes[: len(config_bytes) // 2]),
        "config-empty": ("adapter_config.json", b""),
        "config-list": ("adapter_config.json", b"[1, 2]"),
        "config-null": ("adapter_config.json", b"null"),
        "config-not-utf8": ("adapter_config.json", b"\xff\xfe\x00garbage"),
        "config-deep": ("adapter_config.json", b"[" * 100000 + b"]" * 100000),
        "tensors-truncated": (f"{stem}.safetensors", tensor_bytes[: len(tensor_bytes) // 2]),
        "tensors-header-only": (f"{stem}.safetensors", tensor_bytes[:8]),
        "tensors-empty": (f"{stem}.safetensors", b""),
        "tensors-garbage": (f"{stem}.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "),
        "config-missing": ("adapter_config.json", None),
        "tensors-missing": (f"{stem}.safetensors", None),
    }
    for label, (name, content) in cases.items():
        path = tmp_path / label
        path.mkdir()
        for other in (f"{stem}.safetensors", "adapter_config.json"):
            (path / other).write_bytes((good / other).read_bytes())
        if content is None:
            (path / name).unlink()
        else:
            (path / name).write_bytes(content)
        problems.append(_problem(reader, path, label, must_fail=True))
    path = tmp_path / "config-is-a-directory"
    path.mkdir()
    (path / f"{stem}.safetensors").write_bytes(tensor_bytes)
    (path / "adapter_config.json").mkdir()
    problems.append(_problem(reader, path, "config-is-a-directory", must_fail=True))
    assert [p for p in problems if p] == []


# --- the config copy in the tensors file --------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_files_without_a_config_copy_still_load(fmt: str, tmp_path: Path) -> None:
    """Directories written by earlier adapterkit versions (or by peft) have no copy of the config."""
    adapters = two_versions()
    write(adapters, "v1", tmp_path, fmt)
    stem = _stem(tmp_path)
    save_file(load_file(tmp_path / f"{stem}.safetensors"), tmp_path / f"{stem}.safetensors")  # no metadata
    assert Reader(adapters).version(tmp_path) == "v1"


def test_edited_config_is_refused_naming_the_field_except_labels(tmp_path: Path) -> None:
    adapters = two_versions()
    write(adapters, "v1", tmp_path, "peft")
    reader = Reader(adapters)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # labels (the base model's path, peft's task) may be edited; so may the layout of the JSON
    config["base_model_name_or_path"] = "/elsewhere/base"
    config["task_type"] = "FEATURE_EXTRACTION"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert reader.version(tmp_path) == "v1"
    # values the tensors are read with may not
    config["lora_alpha"] = 8.0
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ak.AdapterFileError, match=r"'lora_alpha' is 8\.0 here but was 16\.0") as info:
        reader.version(tmp_path)
    assert "adapter_config.json does not belong to" in str(info.value)
    assert reader.adapters.names == []


def test_save_removes_temp_files_of_killed_saves(tmp_path: Path) -> None:
    """Including those of earlier versions (mkstemp names) and of safetensors inside a temp directory."""
    adapters = two_versions()
    (tmp_path / ".adapter.safetensors.k2j4_x9a").write_bytes(b"partial")
    (tmp_path / ".adapter_config.json.abcdefgh").write_bytes(b"{")
    (tmp_path / ".adapterkit-tmp-1-00000000").mkdir()
    (tmp_path / ".adapterkit-tmp-1-00000000" / ".tmpAbC123").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not ours")
    write(adapters, "v0", tmp_path, "native")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
        "notes.txt",
    ]
