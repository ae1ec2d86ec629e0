"""Decoding with the next recall window prefetched ``prefetch_steps`` steps ahead of its boundary:
the kernel reads exactly one window, never a token twice, device rows equal the host mirror, the
pool is sized for two windows, and the stats say what was prefetched."""

import math

import pytest
import torch

import flashmem
from flashmem.offload.offload_manager import OffloadManager
from flashmem.wrapper import FlashMemModel


def _config(stats, **kw):
    base = dict(
        budget_tokens=48,
        compaction_interval=16,
        window_tokens=16,
        sink_tokens=4,
        stats_path=stats,
        chunk_size=16,
        indexer="quest",
        chunk_budget=3,
        lookahead=16,
        prefetch_steps=6,
    )
    base.update(kw)
    return flashmem.FlashMemConfig(**base)


def test_bad_prefetch_steps_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"prefetch_steps \(16\) must be < lookahead \(16\)"):
        flashmem.FlashMemConfig(budget_tokens=256, lookahead=16, prefetch_steps=16)
    with pytest.raises(ValueError, match="prefetch_steps must be >= 0"):
        flashmem.FlashMemConfig(budget_tokens=256, prefetch_steps=-1)
    with pytest.raises(TypeError, match="prefetch_steps must be an int"):
        flashmem.FlashMemConfig(budget_tokens=256, prefetch_steps=2.0)
    with pytest.raises(TypeError, match="prefetch_steps must be an int"):
        flashmem.FlashMemConfig(budget_tokens=256, prefetch_steps=True)
    assert flashmem.FlashMemConfig().prefetch_steps == 0
    assert flashmem.FlashMemConfig(lookahead=16, prefetch_steps=15).recall_windows_held == 2


class _Recorder:
    """Wraps the decode forward and the manager's window changes to check every decode step."""

    def __init__(self, monkeypatch):
        self.window: list[int] = []
        self.events: list[tuple[str, int, object]] = []
        self.steps = 0
        self.checked = 0
        self.outdated_swaps = 0
        self.loading = False
        rec = self
        forward = FlashMemModel._forward
        swap, load, prefetch = OffloadManager.swap_window, OffloadManager.load_window, OffloadManager.prefetch
        request = OffloadManager.request

        def _forward(fm, ids, start):
            if ids.shape[1] == 1 and fm.offload is not None:
                rec.check(fm)
                rec.steps += 1
            return forward(fm, ids, start)

        def swap_window(om, **kw):
            rec.outdated_swaps += om.prefetch_masks_outdated
            rec.window = swap(om, **kw)
            if not rec.loading:
                rec.events.append(("swap", rec.steps, list(rec.window)))
            return rec.window

        def load_window(om, chunk_ids, **kw):
            rec.loading = True
            try:
                out = load(om, chunk_ids, **kw)
            finally:
                rec.loading = False
            rec.events.append(("load", rec.steps, list(chunk_ids)))
            return out

        def prefetch_(om, chunk_ids, **kw):
            out = prefetch(om, chunk_ids, **kw)
            rec.events.append(("prefetch", rec.steps, list(chunk_ids)))
            return out

        def request_(om, chunk_ids, **kw):  # the on-demand path of prefetch_steps=0
            out = request(om, chunk_ids, **kw)
            rec.window = list(chunk_ids)
            rec.events.append(("request", rec.steps, list(chunk_ids)))
            return out

        monkeypatch.setattr(FlashMemModel, "_forward", _forward)
        monkeypatch.setattr(OffloadManager, "request", request_)
        monkeypatch.setattr(OffloadManager, "swap_window", swap_window)
        monkeypatch.setattr(OffloadManager, "load_window", load_window)
        monkeypatch.setattr(OffloadManager, "prefetch", prefetch_)

    def check(self, fm):
        om, pool, cache, mirror = fm.offload, fm.pool, fm.cache, fm.mirror
        rs = om.resident
        # the kernel reads the working blocks + resident_blocks(): exactly the current window
        assert rs.resident_chunks() == sorted(self.window)
        blocks, valid = om.resident_blocks()
        assert blocks.tolist() == [b for c in sorted(self.window) for b in rs.blocks(c)]
        pending = om.pending_prefetch or []
        for c in pending:
            assert rs.get(c).pinned
        for c in rs.loading_chunks():
            assert c in pending and not set(rs.blocks(c)) & set(blocks.tolist())
        for layer in range(pool.num_layers):
            k, v, pos = cache.paged.gather(cache.seq_id, layer)
            for h in range(pool.num_kv_heads):
                work = pos[:, h].long()
                assert torch.equal(k[:, h], mirror.keys[layer][work, h])
                assert torch.equal(v[:, h], mirror.values[layer][work, h])
                seen = work.tolist()
                for b, n in zip(blocks.tolist(), valid.tolist()):
                    p = pool.positions[layer][b, :n, h].long()
                    live = p >= 0
                    rows = p[live]
                    assert torch.equal(pool.keys[layer][b, :n, h][live], mirror.keys[layer][rows, h])
                    assert torch.equal(pool.values[layer][b, :n, h][live], mirror.values[layer][rows, h])
                    seen += rows.tolist()
                # never twice; and a recalled token is masked only when the working slots hold it
                assert len(seen) == len(set(seen)), f"token attended twice (layer {layer}, head {h})"
                recalled = {c * 16 + r for c in self.window for r in range(16)}
                assert recalled <= set(seen), "a recalled token is attended nowhere"
        self.checked += 1


@pytest.mark.parametrize("prefill", ["exact", "sparse"])
@pytest.mark.parametrize("prefetch_steps", [0, 6])
def test_prefetched_windows_never_attend_a_token_twice(model_and_stats, monkeypatch, prefill, prefetch_steps):
    model, stats = model_and_stats
    rec = _Recorder(monkeypatch)
    config = _config(stats, prefetch_steps=prefetch_steps, prefill=prefill, prefill_chunk_tokens=32)
    fm = flashmem.wrap(model, config)
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(2))
    steps = 84
    out = fm.generate(ids, steps, eos_token_id=None)
    assert out.shape[1] == 120 + steps and rec.checked == steps - 1
    r = fm.memory_report()
    off = r["offload"]
    assert r["compactions"] > 0
    if prefetch_steps:
        # steps 0..82 are fed: prefetch at 10, 26, ..., 74; swap at 16, 32, ..., 80; the first
        # window on demand
        assert [s for e, s, _ in rec.events if e == "prefetch"] == list(range(10, steps - 1, 16))
        assert [s for e, s, _ in rec.events if e == "swap"] == list(range(16, steps - 1, 16))
        assert ("load", 0) in [(e, s) for e, s, _ in rec.events]
        assert off["prefetches_issued"] == 5 and off["chunks_prefetched"] > 0
        assert off["chunks_loaded_on_demand"] > 0 and off["prefetches_cancelled"] == 0
        assert off["chunk_loads"] == off["chunks_prefetched"] + off["chunks_loaded_on_demand"]
        assert rec.outdated_swaps > 0  # a compaction fell between a prefetch and its swap
    else:
        assert {e for e, _, _ in rec.events} == {"request"}
        assert off["prefetches_issued"] == 0 and off["chunks_prefetched"] == 0
        assert off["chunks_loaded_on_demand"] == off["chunk_loads"] > 0
    assert off["stall_fraction"] == 0.0 and off["stall_time_s"] == 0.0  # CPU copies never stall
    # the pool holds the working set plus one recall window per window held
    held = 2 if prefetch_steps else 1
    # working set: budget + one interval (16), or + one prefill chunk (32) in the sparse prefill
    working = math.ceil((48 + (32 if prefill == "sparse" else 16)) / 16) + 1
    assert r["pool_blocks"] == working + held * 3 * (16 // 16)
    assert r["peak_blocks_in_use"] <= r["pool_blocks"]
    assert r["device_kv_bytes"] == r["blocks_in_use"] * r["kv_block_bytes"]
    assert r["host_kv_bytes"] == r["full_kv_bytes"]


def test_generation_ending_inside_a_prefetch_drops_it(model_and_stats):
    model, stats = model_and_stats
    fm = flashmem.wrap(model, _config(stats))
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(3))
    fm.generate(ids, 13, eos_token_id=None)  # steps 0..11 fed: prefetch at 10, boundary 16 never reached
    assert fm.offload.pending_prefetch is None
    r = fm.memory_report()
    assert r["offload"]["prefetches_issued"] == 1 and r["offload"]["prefetches_cancelled"] == 1
    rs = fm.offload.resident
    assert rs.loading_chunks() == [] and rs.resident_chunks() == rs.pinned_chunks()
    assert r["blocks_in_use"] == len(fm.cache.paged.block_table(fm.cache.seq_id)) + len(rs) * 1


def test_full_budget_with_prefetch_is_exact(model_and_stats):
    """A budget covering the whole context: recalled duplicates are all masked, so prefetching
    windows changes nothing and greedy tokens equal dense attention."""
    model, stats = model_and_stats
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(4))
    dense = flashmem.wrap(model, flashmem.FlashMemConfig())
    ref = dense.generate(ids, 40, eos_token_id=None, collect_logits=True)
    fm = flashmem.wrap(
        model, _config(stats, budget_tokens=512, prefill_chunk_tokens=16, lookahead=8, prefetch_steps=3)
    )
    out = fm.generate(ids, 40, eos_token_id=None, collect_logits=True)
    r = fm.memory_report()
    assert r["compactions"] == 0 and r["offload"]["prefetches_issued"] > 0
    assert torch.equal(out, ref)
    torch.testing.assert_close(fm.step_logits, dense.step_logits, rtol=1e-4, atol=1e-4)


def test_stall_fraction_is_stall_time_over_decode_time(model_and_stats):
    model, stats = model_and_stats
    fm = flashmem.wrap(model, _config(stats))
    fm.generate(
        torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(5)), 20, eos_token_id=None
    )
    r = fm.memory_report()
    for key in (
        "prefetches_issued",
        "chunks_prefetched",
        "chunks_loaded_on_demand",
        "stall_time_s",
        "stalls",
    ):
        assert key in r["offload"]
    fm.offload.engine._stall_timings.total_s = 0.25  # as if the compute stream had waited 0.25 s
    decode_s = r["timings"]["decode_s"]
    assert fm.memory_report()["offload"]["stall_fraction"] == pytest.approx(0.25 / decode_s)
