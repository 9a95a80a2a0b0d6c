"""Offloaded experts: the same numbers as a fully loaded model, within a RAM budget."""

from __future__ import annotations

import functools
import os
import shutil

import pytest
import torch

import mixtral
from mixtral.cache_policy import POLICIES, make, replay
from mixtral.checkpoint import CheckpointError, inspect, quantize_checkpoint, save
from mixtral.cli import main
from mixtral.config import ModelArgs
from mixtral.engine import Engine
from mixtral.generate import GenerationParams, generate
from mixtral.model import Transformer
from mixtral.offload import (
    RUNTIME_RESERVE,
    OffloadedExperts,
    drop_page_cache,
    load_offloaded,
    parse_size,
    plan,
)

ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256,
                 vocab_size=32000, max_seq_len=256)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("offload")
    model = Transformer(ARGS)
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    save(model.to(torch.bfloat16).state_dict(), ARGS, d / "float")
    quantize_checkpoint(d / "float", d / "q4", 4)
    quantize_checkpoint(d / "float", d / "q8", 8)
    return d


def expert_bytes(path) -> int:
    info = inspect(path)
    return sum(e.dtype.itemsize * torch.Size(e.shape).numel() for n, e in info.entries.items()
               if ".experts." in n) // (ARGS.n_layers * ARGS.num_experts)


@pytest.mark.parametrize("name", ["q4", "q8"])
def test_offloaded_equals_loaded(checkpoints, name):
    path = checkpoints / name
    resident, _ = plan(inspect(path), 2**40)
    budget = resident + RUNTIME_RESERVE + 3 * expert_bytes(path)  # 3 of the 16 experts fit
    full = mixtral.load(path)
    off = mixtral.load(path, max_ram=budget)
    assert isinstance(off.layers[0].feed_forward.experts, OffloadedExperts)
    assert off.expert_cache.reader is None  # no read-ahead unless asked (DEFAULT_PREFETCH)
    tokens = torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(off(tokens), full(tokens))
    prompt = [1, 415, 2936, 9060]
    assert list(generate(off, prompt, GenerationParams(max_tokens=16))) == \
        list(generate(full, prompt, GenerationParams(max_tokens=16)))
    cache = off.expert_cache
    assert cache.used <= cache.budget and cache.misses > 3 * 2 and cache.hits > 0
    assert cache.store.bytes_read >= cache.misses * expert_bytes(path) * 0.99


@pytest.mark.parametrize("name", ["q4", "q8"])
def test_offloaded_experts_page_in_on_the_fast_paths(checkpoints, name):
    """After mixtral.fast.optimize, each paged-in expert is swapped for its fast form (our
    kernels: int4 read as the file stores it, its scales converted in place) and the logits
    stay those of the fast fully loaded model."""
    from mixtral import kernels
    from mixtral.fast import optimize
    from mixtral.projections import Int4Rows, Int8Rows
    from mixtral.quant import Int4Linear, Int8Linear

    path = checkpoints / name
    resident, _ = plan(inspect(path), 2**40)
    off = optimize(mixtral.load(path, max_ram=resident + RUNTIME_RESERVE + 3 * expert_bytes(path)))
    full = optimize(mixtral.load(path))
    tokens = torch.randint(0, 32000, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(off(tokens), full(tokens), atol=1e-5, rtol=1e-5)
    paged = off.expert_cache.get(0, 0)  # each projection on its own, where it was read
    # what it holds is what the budget counts it as: no copy of the file's scales stays
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*paged.parameters(), *paged.buffers(),
                          *(v for m in paged.modules() for v in vars(m).values()
                            if isinstance(v, torch.Tensor))]}
    # (the read buffer has up to two pages of slack for each of its six regions, one to align)
    assert sum(storages.values()) <= expert_bytes(path) + 13 * 4096
    kinds = {type(m) for w in ("w1", "w2", "w3") for m in getattr(paged, w)}
    assert kinds == ({Int4Rows if name == "q4" else Int8Rows} if kernels.available() else
                     {Int4Linear if name == "q4" else Int8Linear})


@pytest.mark.parametrize("name", ["q4", "q8"])
def test_an_expert_on_pytorchs_modules_holds_its_bytes_once(checkpoints, name):
    """Without our kernels (no fast paths: the generic tier, ARM) PyTorch's int4 module packs
    a copy of the weight, and the read buffer goes back to the pool instead of staying held
    beside it (it did: 2.6x an expert's bytes); int8 computes where it was read."""
    path = checkpoints / name
    resident, _ = plan(inspect(path), 2**40)
    off = load_offloaded(path, resident + RUNTIME_RESERVE + 3 * expert_bytes(path))
    cache = off.expert_cache
    paged = cache.get(0, 0)
    tensors = [*paged.parameters(), *paged.buffers()]
    raw = cache._held[(0, 0)][2]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors + ([raw] if raw is not None else [])}
    assert sum(storages.values()) <= expert_bytes(path) + 13 * 4096
    assert (raw is None) == (name == "q4")
    if name == "q4":
        assert len(cache.store._pool) == 1  # its buffer, ready for the next read
    tokens = torch.randint(0, 32000, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(off(tokens), mixtral.load(path)(tokens))  # buffers reused safely


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("fit", [2, 5, 16])
def test_every_policy_and_budget_gives_the_resident_tokens(checkpoints, policy, fit, prefetch):
    """`fit` of the 16 experts in the cache, read ahead or not: outputs never depend on what
    it holds. Without read-ahead its misses are those of the policy replayed offline on the
    uses it saw (benchmarks/cache_policy.py's figures are the live cache's); with it, every
    expert read is counted once (tests/test_prefetch.py has the rest)."""
    path = checkpoints / "q4"
    resident, _ = plan(inspect(path), 2**40)
    off = load_offloaded(path, resident + RUNTIME_RESERVE + fit * expert_bytes(path),
                         policy=policy, prefetch=prefetch)
    cache = off.expert_cache
    cache.trace = []
    prompt = [1, 415, 2936, 9060, 28705, 28740]
    params = GenerationParams(max_tokens=24)
    assert list(generate(off, prompt, params)) == list(generate(resident_q4(path), prompt,
                                                                 params))
    assert cache.hits + cache.misses == len(cache.trace) > 0
    if prefetch:
        reads = cache.misses - cache.waited + cache.prefetched
        assert cache.store.bytes_read == reads * expert_bytes(path)
    else:
        assert cache.misses == replay(cache.trace, fit, make(policy))
    assert cache.used <= cache.budget


def test_evicted_experts_buffers_are_read_into_again(checkpoints):
    """An evicted expert's buffer is reused by the next read unless something still holds the
    expert (a use in progress): then it is left to be freed, never overwritten. (int8: its
    modules compute on the bytes where they were read.)"""
    path = checkpoints / "q8"
    resident, _ = plan(inspect(path), 2**40)
    off = load_offloaded(path, resident + RUNTIME_RESERVE + 2 * expert_bytes(path),
                         policy="lru", prefetch=False)
    cache = off.expert_cache
    prompt = [1, 415, 2936, 9060, 28705, 28740]
    params = GenerationParams(max_tokens=12)
    assert list(generate(off, prompt, params)) == list(generate(mixtral.load(path), prompt,
                                                                 params))
    reads = cache.misses
    assert reads > 20 and cache.store.buffers_made <= 2 + cache.store.POOL
    kept = cache.get(0, 3)  # held by this test: a use in progress
    weight = kept.w1[0].weight.clone()
    for e in range(8):  # evicts (0, 3) while it is held
        cache.get(1, e)
    assert (0, 3) not in cache._held and torch.equal(kept.w1[0].weight, weight)


@functools.cache
def resident_q4(path):
    return mixtral.load(path)


@pytest.mark.parametrize("direct", [True, False])
def test_a_truncated_expert_file_ends_the_request_with_an_error(checkpoints, tmp_path, direct):
    """The file shrinks under a running model: the request fails, naming the short read; the
    engine does not hang and goes on serving. With O_DIRECT reads (aligned windows) and
    through the page cache."""
    for f in (checkpoints / "q4").iterdir():
        shutil.copy(f, tmp_path / f.name)
    off = mixtral.load(tmp_path, max_ram=2 * 2**30)
    off.expert_cache.store.direct = direct
    info = inspect(tmp_path)
    first_expert = min(e.start for n, e in info.entries.items() if ".experts." in n)
    for file in {e.file for e in info.entries.values()}:
        os.truncate(file, first_expert + 10)
    engine = Engine(off, max_queue=2, max_batch=1, thread=False)
    outcomes: list[BaseException | None] = []
    try:
        engine.submit([1, 415, 2936], GenerationParams(max_tokens=4), lambda t: None,
                      outcomes.append)
        engine.run(until_idle=True)
    finally:
        engine.stop()
    assert len(outcomes) == 1 and isinstance(outcomes[0], CheckpointError)
    assert "short read of layers.0.feed_forward.experts." in str(outcomes[0])


@pytest.mark.parametrize("refuse", [None, "open", "read"])
def test_experts_read_the_same_with_o_direct_or_without(checkpoints, monkeypatch, refuse):
    """Every expert slice equals the file's tensor, read with O_DIRECT (aligned windows, the
    tensor a view into one), through the page cache, and where the file system refuses
    O_DIRECT at open or only at the read (then remembered: the file goes buffered)."""
    import errno

    from mixtral.checkpoint import reader
    from mixtral.expert_store import ExpertStore

    info = inspect(checkpoints / "q4")
    if refuse is not None:
        real_open, real_preadv, direct_fds = os.open, os.preadv, set()

        def fake_open(path, flags, *args):
            if flags & os.O_DIRECT and refuse == "open":
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = real_open(path, flags, *args)
            if flags & os.O_DIRECT:
                direct_fds.add(fd)
            return fd

        def fake_preadv(fd, buffers, offset):
            if fd in direct_fds:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "preadv", fake_preadv)
    read = reader(info)
    for direct in (True, False):
        store = ExpertStore(info, direct=direct)
        for layer, expert in ((0, 0), (1, 7), (0, 5)):
            got, raw = store.read(layer, expert)
            for w in ("w1", "w2", "w3"):
                base = f"layers.{layer}.feed_forward.experts.{w}"
                for part, name in zip(got[w], (f"{base}.qweight", f"{base}.scales_and_zeros"),
                                      strict=True):
                    assert torch.equal(part, read(name)[expert])
            store.recycle(raw)  # the next read reuses it
        assert store.bytes_read == 3 * store.expert_bytes and store.buffers_made == 1
        if not direct:  # through the page cache only
            assert not any(d for _, d in store._files)
        elif refuse is not None:  # refused once, then the page cache
            assert {d for (_, d), fd in store._files.items() if fd is None} == {True}


def test_drop_page_cache_reads_every_file(checkpoints):
    drop_page_cache(checkpoints / "q4")  # the clean pages forgotten; nothing changes
    with pytest.raises(CheckpointError):
        drop_page_cache(checkpoints / "missing")


def test_budget_errors(checkpoints):
    with pytest.raises(ValueError, match=r"--max-ram 0.1 GiB is too small .* need"):
        mixtral.load(checkpoints / "q4", max_ram="100MB")
    with pytest.raises(ValueError, match="unknown cache policy 'mru'"):
        load_offloaded(checkpoints / "q4", "8GiB", policy="mru")
    with pytest.raises(CheckpointError, match="offloading reads quantized experts"):
        mixtral.load(checkpoints / "float", max_ram="8GiB")
    assert parse_size("16GiB") == 16 * 2**30 and parse_size("500MB") == 500 * 10**6
    with pytest.raises(ValueError, match="is not a size"):
        parse_size("lots")


@pytest.mark.parametrize("flags", [[], ["--cache-policy", "lru", "--no-prefetch"],
                                   ["--cache-policy", "lfu", "--prefetch"]])
def test_cli_generate_offloaded(checkpoints, capsys, flags):
    assert main(["generate", "--model", str(checkpoints / "q4"), "--max-ram", "2GiB", *flags,
                 "--prompt", "Hi", "--max-tokens", "4", "--json"]) == 0
    assert '"completion_tokens": 4' in capsys.readouterr().out


@pytest.mark.parametrize("flags,error", [
    (["--cache-policy", "lru"], "--cache-policy tunes the experts cache of --max-ram"),
    (["--no-prefetch"], "--[no-]prefetch tunes the experts cache of --max-ram"),
    (["--max-ram", "2GiB", "--cache-policy", "mru"], "invalid choice: 'mru'")])
def test_cli_cache_flags_are_checked(checkpoints, capsys, flags, error):
    try:  # argparse's own errors exit; the command's return 2
        code = main(["generate", "--model", str(checkpoints / "q4"), *flags, "--prompt", "Hi"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and error in err and "Traceback" not in err
