"""Decoding with the next recall window prefetched ``prefetch_steps`` steps ahead of its boundary:
the kernel reads exactly one window, never a token twice, device rows equal the host mirror, the
pool is sized for two windows, and the stats say what was prefetched."""

import math

import pytest
import torch

import flashmem
from flashmem.offload.offload_manager import OffloadManager
from flashmem.offload.transfer import TransferEngine
from flashmem.recall import RecallController
from flashmem.wrapper import FlashMemModel

PREFETCH = dict(indexer="quest", chunk_budget=3, lookahead=16, prefetch_steps=6, recall_mode="shared")


def test_bad_prefetch_steps_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"prefetch_steps \(16\) must be < lookahead \(16\)"):
        flashmem.FlashMemConfig(budget_tokens=256, lookahead=16, prefetch_steps=16)
    with pytest.raises(ValueError, match="prefetch_steps must be >= 0"):
        flashmem.FlashMemConfig(budget_tokens=256, prefetch_steps=-1)
    with pytest.raises(TypeError, match="prefetch_steps must be an int"):
        flashmem.FlashMemConfig(budget_tokens=256, prefetch_steps=2.0)
    with pytest.raises(TypeError, match="prefetch_steps must be an int"):
        flashmem.FlashMemConfig(budget_tokens=256, prefetch_steps=True)
    assert flashmem.FlashMemConfig().prefetch_steps == 0  # the default: each window loaded at its boundary
    assert (
        flashmem.FlashMemConfig(lookahead=16, prefetch_steps=15, recall_mode="shared").recall_windows_held
        == 2
    )


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
        forward = FlashMemModel._decode_forward
        swap, load, prefetch = OffloadManager.swap_window, OffloadManager.load_window, OffloadManager.prefetch
        request = OffloadManager.request
        copy, select = TransferEngine.load, RecallController.select

        def _forward(fm, ids):
            if fm.offload is not None:
                rec.check(fm)
                rec.steps += 1
            return forward(fm, ids)

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

        def copy_(engine, chunk_ids, *args, **kw):  # every host-to-device copy, with its step
            rec.events.append(("copy", rec.steps, list(chunk_ids)))
            return copy(engine, chunk_ids, *args, **kw)

        def select_(controller, position):  # what recall chose, with its step
            out = select(controller, position)
            rec.events.append(("select", rec.steps, list(out)))
            return out

        monkeypatch.setattr(TransferEngine, "load", copy_)
        monkeypatch.setattr(RecallController, "select", select_)
        monkeypatch.setattr(FlashMemModel, "_decode_forward", _forward)
        monkeypatch.setattr(OffloadManager, "request", request_)
        monkeypatch.setattr(OffloadManager, "swap_window", swap_window)
        monkeypatch.setattr(OffloadManager, "load_window", load_window)
        monkeypatch.setattr(OffloadManager, "prefetch", prefetch_)

    def check(self, fm):
        om, pool, cache, mirror = fm.offload, fm.pool, fm.cache, fm.mirror
        rs = om.resident
        cache.flush()  # decode tokens reach the mirror in batches: compare against all of them
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


def _windows_and_copies(events):
    """``(kind, step, chunk_ids, copied)`` per window choice (request, prefetch, on-demand load),
    with the chunks whose copies it issued; a copy issued anywhere else fails."""
    out, pending = [], []
    for e, s, ids in events:
        if e == "copy":
            pending.append((s, ids))
        elif e in ("request", "prefetch", "load"):
            copied = [c for step, chunk_ids in pending for c in chunk_ids]
            assert all(step == s for step, _ in pending) and set(copied) <= set(ids), (
                f"copies {pending} were not issued by the {e} of chunks {ids} at step {s}"
            )
            out.append((e, s, ids, copied))
            pending = []
    assert not pending, f"copies {pending} were issued outside a request, prefetch or window load"
    return out


@pytest.mark.parametrize("prefill", ["exact", "sparse"])
@pytest.mark.parametrize("prefetch_steps", [0, 6])
def test_prefetched_windows_never_attend_a_token_twice(
    model_and_stats, monkeypatch, prefill, prefetch_steps, budget_config
):
    model, _ = model_and_stats
    rec = _Recorder(monkeypatch)
    config = budget_config(PREFETCH, prefetch_steps=prefetch_steps, prefill=prefill, prefill_chunk_tokens=32)
    fm = flashmem.wrap(model, config)
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(2))
    steps = 84
    out = fm.generate(ids, steps, eos_token_id=None)
    assert out.shape[1] == 120 + steps and rec.checked == steps - 1
    r = fm.memory_report()
    off = r["offload"]
    assert r["compactions"] > 0
    issued = _windows_and_copies(rec.events)
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
        selected = {s: ids for e, s, ids in rec.events if e == "select"}
        # copies are issued only when a window is chosen: on demand at step 0, then 6 steps ahead
        # of each boundary, never at the boundary itself (decoding overlaps them)
        assert {(e, s) for e, s, _, copied in issued if copied} <= {("load", 0)} | {
            ("prefetch", s) for s in range(10, steps - 1, 16)
        }
        prefetched = {s: ids for e, s, ids, _ in issued if e == "prefetch"}
        for e, step, window in rec.events:
            if e == "swap":
                # the window swapped in is what recall selected when its prefetch was issued
                ahead = step - prefetch_steps
                assert prefetched[ahead] == selected[ahead] and window == selected[ahead]
        assert sum(len(c) for e, _, _, c in issued if e == "prefetch") == off["chunks_prefetched"]
    else:
        assert {e for e, _, _ in rec.events} == {"request", "select", "copy"}
        # on demand: copies are issued at the window boundaries (and prefill refreshes at step 0)
        assert {s for e, s, _, copied in issued if copied} <= set(range(0, steps, 16))
        assert off["prefetches_issued"] == 0 and off["chunks_prefetched"] == 0
        assert off["chunks_loaded_on_demand"] == off["chunk_loads"] > 0
    # the pool holds the working set plus one recall window per window held
    held = 2 if prefetch_steps else 1
    # working set: budget + interval - 1 slots before a forward, which adds one token (decode) or
    # one prefill chunk (32, the sparse prefill); slots are packed from the front of the blocks
    working = math.ceil((48 + 16 - 1 + (32 if prefill == "sparse" else 1)) / 16)
    assert r["pool_blocks"] == working + held * 3 * (16 // 16)
    assert r["peak_blocks_in_use"] <= r["pool_blocks"]
    assert r["device_kv_bytes"] == r["blocks_in_use"] * r["kv_block_bytes"]
    assert r["host_kv_bytes"] == r["full_kv_bytes"]


def test_generation_ending_inside_a_prefetch_drops_it(model_and_stats, budget_config):
    model, _ = model_and_stats
    fm = flashmem.wrap(model, budget_config(PREFETCH))
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(3))
    fm.generate(ids, 13, eos_token_id=None)  # steps 0..11 fed: prefetch at 10, boundary 16 never reached
    assert fm.offload.pending_prefetch is None
    r = fm.memory_report()
    assert r["offload"]["prefetches_issued"] == 1 and r["offload"]["prefetches_cancelled"] == 1
    rs = fm.offload.resident
    assert rs.loading_chunks() == [] and rs.resident_chunks() == rs.pinned_chunks()
    assert r["blocks_in_use"] == len(fm.cache.paged.block_table(fm.cache.seq_id)) + len(rs) * 1


def test_full_budget_with_prefetch_is_exact(model_and_stats, budget_config):
    """A budget covering the whole context: recalled duplicates are all masked, so prefetching
    windows changes nothing and greedy tokens equal dense attention."""
    model, _ = model_and_stats
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(4))
    dense = flashmem.wrap(model, flashmem.FlashMemConfig())
    ref = dense.generate(ids, 40, eos_token_id=None, collect_logits=True)
    fm = flashmem.wrap(
        model,
        budget_config(PREFETCH, budget_tokens=512, prefill_chunk_tokens=16, lookahead=8, prefetch_steps=3),
    )
    out = fm.generate(ids, 40, eos_token_id=None, collect_logits=True)
    r = fm.memory_report()
    assert r["compactions"] == 0 and r["offload"]["prefetches_issued"] > 0
    assert torch.equal(out, ref)
    torch.testing.assert_close(fm.step_logits, dense.step_logits, rtol=1e-4, atol=1e-4)


class _TimingEvent:
    """Stands in for a CUDA timing event: fires only when the host synchronizes on it (a start
    event is recorded before its end on the same stream, so the end firing implies the start's)."""

    def __init__(self, fired_ms: float = 0.0):
        self.fired = False
        self.ms = fired_ms

    def query(self) -> bool:
        return self.fired

    def synchronize(self) -> None:
        self.fired = True

    def elapsed_time(self, end) -> float:
        assert end.fired, "elapsed_time before the end event fired"
        return end.ms - self.ms


def test_stall_time_is_resolved_from_pending_events_at_the_report(model_and_stats, budget_config):
    """A stall measured on CUDA is a pair of timing events on the compute stream that may not have
    fired when generate returns: the report waits for them, converts ms to s, and divides by the
    decode time only (a CPU run has no stall of its own; the events here stand in for one)."""
    model, _ = model_and_stats
    fm = flashmem.wrap(model, budget_config(PREFETCH))
    fm.generate(
        torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(5)), 20, eos_token_id=None
    )
    engine = fm.offload.engine
    engine._stall_timings.pending.append((_TimingEvent(1000.0), _TimingEvent(1250.0), 0))
    unresolved = engine.stats()  # without sync: an event that has not fired is not counted yet
    assert unresolved["stall_time_s"] == 0.0 and unresolved["pending_timings"] == 1
    r = fm.memory_report()
    off = r["offload"]
    assert off["pending_timings"] == 0 and off["stall_time_s"] == pytest.approx(0.25)
    t = r["timings"]
    assert t["prefill_s"] > 0 and t["decode_s"] > 0
    assert off["stall_fraction"] == pytest.approx(0.25 / t["decode_s"])
    for key in ("prefetches_issued", "chunks_prefetched", "chunks_loaded_on_demand", "stalls"):
        assert key in off
