"""Smoke tests of the benchmark CLI on tiny models: the dispatcher, the shared helpers, and the
memory and throughput entries end to end in their quick mode (reduced further)."""

import json

import pytest
import torch

import flashmem
from bench import common, metrics, run


def test_list_and_unknown_entry(capsys):
    assert run.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "memory",
        "passkey",
        "fidelity",
        "throughput",
        "freed-blocks",
        "bandwidth",
        "paged-decode",
        "prefetch-overlap",
        "indexer",
        "kvpress",
    ):
        assert name in out
    with pytest.raises(SystemExit, match="unknown benchmark"):
        run.main(["nope"])


def test_dispatch_calls_main_with_argv(monkeypatch):
    seen = {}

    class Fake:
        RESULTS = "original"

        @staticmethod
        def main(argv):
            seen["argv"] = argv
            seen["results"] = Fake.RESULTS
            return {"ok": True}  # a dict result counts as success

    monkeypatch.setitem(run.ENTRIES, "fake", ("fake_module", "a fake", [], []))
    monkeypatch.setattr(run, "_import_module", lambda name: Fake)
    assert run.main(["fake", "--x", "1"]) == 0
    assert seen["argv"] == ["--x", "1"] and seen["results"] == "original"
    assert run.run_entry("fake", [], results_dir="elsewhere") == 0
    assert seen["results"] == "elsewhere" and Fake.RESULTS == "original"


def test_all_records_failures_and_goes_on(monkeypatch, tmp_path):
    calls = []

    class Ok:
        @staticmethod
        def main(argv):
            calls.append(("ok", argv))
            return 0

    class Bad:
        @staticmethod
        def main(argv):
            calls.append(("bad", argv))
            raise RuntimeError("boom")

    monkeypatch.setattr(
        run,
        "ENTRIES",
        {"a": ("a", "ok one", [], []), "b": ("b", "bad one", [], []), "c": ("c", "ok again", [], [])},
    )
    monkeypatch.setattr(run, "_import_module", lambda name: Bad if name == "b" else Ok)
    monkeypatch.setattr(common, "QUICK_RESULTS", tmp_path)
    assert run.main(["all", "--quick"]) == 1
    assert [c[0] for c in calls] == ["ok", "bad", "ok"]
    assert all("--quick" in c[1] for c in calls)
    record = json.loads((tmp_path / "all.json").read_text())
    assert [e["status"] for e in record["entries"]] == [0, 1, 0]
    assert "boom" in record["entries"][1]["error"]


def test_parse_configs_validates_before_work():
    assert common.parse_configs(None, [{"budget_tokens": 256}]) == [{"budget_tokens": 256}]
    assert common.parse_configs('{"budget_tokens": 300}', []) == [{"budget_tokens": 300}]
    assert common.parse_configs('[{}, {"budget_tokens": 300}]', []) == [{}, {"budget_tokens": 300}]
    with pytest.raises(ValueError, match="not valid JSON"):
        common.parse_configs("{budget", [])
    with pytest.raises(ValueError, match="not a FlashMemConfig"):
        common.parse_configs('{"no_such_field": 1}', [])
    with pytest.raises(ValueError):
        common.parse_configs('{"budget_tokens": 10}', [])  # below sink + window


def test_machine_stamp_and_header():
    h = common.header("x", quick=True, model="m", budget=3)
    for key in ("platform", "cpu", "torch", "triton", "transformers", "gpu"):
        assert key in h["machine"]
    assert h["settings"] == {"budget": 3} and h["model"] == "m"


def test_compare_logits_and_helpers():
    a = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    same = metrics.compare_logits(a, a.clone())
    assert same["top1_agreement"] == 1.0 and abs(same["mean_kl"]) < 1e-12
    b = a.clone()
    b[2] = -b[2]
    diff = metrics.compare_logits(a, b)
    assert diff["top1_agreement"] == pytest.approx(0.8) and diff["mean_kl"] > 0
    assert metrics.token_agreement([1, 2, 3, 4], [1, 9, 3, 4]) == 0.75
    assert metrics.extract_digits(" 27611.<|im_end|>") == "27611"
    assert metrics.extract_digits("no key") == ""


def test_teacher_forcing_matches_hf_and_forced_tokens():
    model, stats, _ = common.tiny_bench_model(2048)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    forced = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    ref = common.hf_decode(model, ids, 12, forced=forced)
    run_ = common.flashmem_decode(model, {}, ids, 12, forced=forced, stats_path=stats)
    assert run_["tokens"] == forced == ref["tokens"]
    m = metrics.compare_logits(ref["logits"], run_["logits"])
    assert m["top1_agreement"] == 1.0 and m["max_kl"] < 1e-6
    # greedy without forcing equals Hugging Face too, and the trace has one entry per fed token
    g = common.flashmem_decode(model, {}, ids, 12, stats_path=stats)
    assert g["tokens"] == common.hf_decode(model, ids, 12)["tokens"]
    assert len(g["trace"]) == 12


def test_memory_entry_quick(tmp_path):
    from bench import memory

    out = tmp_path / "memory.json"
    assert memory.main(["--quick", "--tiny-contexts", "600", "--steps", "140", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["check"]["trace_equals_whole_blocks"] and data["check"]["tokens_equal_hf"]
    (r,) = data["runs"]
    assert len(r["device_kv_trace"]) == 140 and r["compactions"] >= 1
    # never more than the pool; once decoding, never more than budget + interval + recalled chunks
    # (+ a partial block) per head
    per_tok = r["full_kv_trace"][0] // r["prompt_tokens"]
    assert r["trace_max_bytes"] <= r["pool_capacity_bytes"] < r["full_kv_trace"][-1]
    cfg = flashmem.FlashMemConfig(budget_tokens=256)
    recalled = (
        getattr(cfg, "effective_chunk_budget", 0) * cfg.chunk_size if getattr(cfg, "recall_enabled", 0) else 0
    ) * getattr(cfg, "recall_windows_held", 1)  # 2 windows while a prefetch overlaps the current one
    assert max(r["device_kv_trace"][2:]) <= (256 + 128 + 16 + recalled) * per_tok
    assert r["device_kv_trace"][-1] < r["full_kv_trace"][-1]
    assert out.with_suffix(".png").is_file()
    assert data["machine"]["torch"] == torch.__version__


def test_throughput_entry_quick(tmp_path):
    from bench import throughput

    out = tmp_path / "throughput.json"
    argv = [
        "--quick",
        "--context",
        "300",
        "--steps",
        "6",
        "--short",
        "200",
        "--long",
        "600",
        # the sparse prefill compacts as it goes: those compactions must stay out of the per-step figures
        "--budget-config",
        '{"budget_tokens": 256, "prefill": "sparse"}',
        "--json",
        str(out),
    ]
    assert throughput.main(argv) == 0
    data = json.loads(out.read_text())
    a = data["part_a"]
    assert a["check_tokens_equal"] and a["full_attention"]["tokens_per_s"] > 0
    assert {r["method"] for r in a["flashmem"]} == {"flashmem (no budget)", "flashmem budget_tokens=256"}
    assert data["part_b"]["flashmem_long_over_short"] > 0
    # the per-step breakdown counts decode steps only: its parts fit inside the decode time, and the
    # long prompt's sparse-prefill compactions (hundreds of tokens over a 256 budget) are not in it
    long_fm = data["part_b"]["runs"]["long"]["flashmem"]
    per_step = long_fm["timings_per_step_ms"]
    assert per_step["compaction_s"] + per_step["recall_s"] <= per_step["decode_s"]
    assert long_fm["timings"]["compaction_s"] > 0
    assert per_step["compaction_s"] * long_fm["decode_steps"] < 1000 * long_fm["timings"]["compaction_s"]
    assert out.with_suffix(".png").is_file()


def test_passkey_entry_tiny(tmp_path):
    from bench import passkey

    out = tmp_path / "passkey.json"
    argv = [
        "--model",
        "tiny",
        "--lengths",
        "320",
        "--depths",
        "0.2,0.8",
        "--flashmem-config",
        '{"budget_tokens": 160, "recent_tokens": 64, "compaction_interval": 64}',
        "--json",
        str(out),
    ]
    assert passkey.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["check"]["tokens_equal"]
    full, fm = data["summaries"]
    assert full["method"] == "full attention" and full["trials"] == 2 and fm["trials"] == 2
    rows = [t for t in data["trials"] if t["method"] == fm["method"]]
    for t in rows:
        # KV shares are whole 16-token blocks over the dense cache's tokens: at most one partial block
        # over 1 (the peak also counts the exact prefill's one layer of prompt K/V: 2 layers here)
        assert 0 < t["avg_device_kv_share"] <= 1 + 16 / t["tokens"]
        assert 0 < t["peak_device_kv_share"] <= 1.5 + 16 / t["tokens"]
        # the total counts every device byte (index, stats, prefill scratch) beside the KV
        assert t["peak_device_share"] >= t["peak_device_kv_share"]
        assert t["device_bytes"]["peak_total"] >= t["device_bytes"]["scratch_peak"] > 0
        assert 0 <= t["top1_agreement_with_full"] <= 1
    # the same ids for every method: context then question, split recorded
    assert {t["tokens"] for t in data["trials"]} == set(data["settings"]["prompt_tokens"]["320"])
    assert out.with_suffix(".png").is_file()


@pytest.mark.parametrize("text", ["code", "prose"])
def test_fidelity_entry_tiny(tmp_path, text):
    from bench import fidelity

    out = tmp_path / "fidelity.json"
    argv = [
        "--model",
        "tiny",
        "--text",
        text,
        "--tokens",
        "400",
        "--docs",
        "1",
        "--new-tokens",
        "24",
        "--flashmem-config",
        '{"budget_tokens": 160, "recent_tokens": 64, "compaction_interval": 64}',
        "--json",
        str(out),
    ]
    assert fidelity.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["check"]["top1_agreement"] == 1.0 and data["check"]["max_kl"] < 1e-6
    (s,) = data["summary"]
    assert 0 <= s["top1_agreement"] <= 1 and s["mean_kl"] >= 0
    assert data["rows"][0]["compactions"] >= 1
    assert data["rows"][0]["indexer"] == "quest"  # what indexer="auto" resolved to, recorded
    assert out.with_suffix(".png").is_file()
    assert data["settings"]["text"] == text
    assert data["settings"]["docs"][0].startswith("prose[") == (text == "prose")
    # the hash of the continuation every row was compared on, per document
    (ref,) = data["references"]
    assert ref["doc"] == data["settings"]["docs"][0] and len(ref["tokens_sha"]) == len(ref["ids_sha"]) == 16
    assert fidelity.reference_sha([1, 2]) != fidelity.reference_sha([2, 1])
    assert fidelity.reference_sha(torch.tensor([1, 2])) == fidelity.reference_sha([1, 2])


def test_kvpress_peer_records_why_it_did_not_run(monkeypatch, tmp_path):
    from bench.peers import kvpress_env, kvpress_peer

    monkeypatch.setattr(kvpress_env, "VENV", tmp_path / "no-venv")
    assert kvpress_env._probe() is None  # a missing venv is detected, not assumed
    monkeypatch.setattr(
        kvpress_env, "ensure_env", lambda: {"ok": False, "error": "pip failed: no kvpress", "log": []}
    )
    prompts = [{"id": "p", "context_ids": [1, 2], "question_ids": [3], "target_tokens": 100}]
    out = kvpress_peer.run_passkey(prompts, {"100": 0.2})
    assert out["status"] == "not run" and out["reason"] == "pip failed: no kvpress" and out["trials"] == []


def test_prefetch_overlap_skips_without_cuda_and_runs_on_cpu(tmp_path, monkeypatch, capsys):
    from bench import prefetch_overlap

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "prefetch_overlap.json"
    assert prefetch_overlap.main(["--json", str(out)]) == 0
    assert "skipped" in capsys.readouterr().out and not out.exists()
    argv = ["--device", "cpu", "--quick", "--tokens", "400", "--new-tokens", "34", "--json", str(out)]
    assert prefetch_overlap.main(argv) == 0
    data = json.loads(out.read_text())
    s = data["summary"]
    assert s["correct"] and s["prefetch_steps"] == 8 and s["lookahead"] == 16
    # the CPU backend copies synchronously inside the prefetch: nothing is ever waited on
    assert s["stall_fraction_prefetch"] == 0.0 == s["stall_fraction_on_demand"]
    on_demand, ahead = data["runs"]
    assert on_demand["prefetches_issued"] == 0 and on_demand["chunks_loaded_on_demand"] > 0
    assert ahead["prefetches_issued"] == 2 and ahead["chunks_prefetched"] > 0
    assert ahead["host_equals_full"] and ahead["decode_steps"] == 33
    with pytest.raises(SystemExit):
        prefetch_overlap.main(["--device", "cpu", "--lookahead", "8", "--prefetch-steps", "8"])


def test_long_context_entry_small(tmp_path, monkeypatch):
    from bench import long_context

    monkeypatch.setattr(long_context, "RESULTS", tmp_path)
    out = tmp_path / "lc.json"
    argv = [
        "--tokens",
        "3000",
        "--new-tokens",
        "10",
        "--budget-tokens",
        "256",
        "--prefill-chunk-tokens",
        "512",
    ]
    assert long_context.main(argv + ["--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["correctness_exact"] and data["host_equals_full"]
    assert data["host_kv_bytes"] == 3009 * data["report"]["kv_bytes_per_token"]  # every token seen, lossless
    trace = data["device_kv_trace"]
    assert len(trace) == 1 + data["report"]["decode_steps"]  # after prefill, then after each step
    assert max(trace) <= data["peak_device_kv_bytes"] < data["full_kv_bytes"]
    b = data["decode_breakdown_ms_per_step"]
    assert b["steps"] == data["report"]["decode_steps"]
    parts = b["forward_and_attention"] + b["recall_refresh"] + b["compaction"]
    assert abs(parts - b["total"]) < 1e-6 * max(1.0, b["total"])
    assert 0 <= b["h2d_copy_time_in_recall"] <= b["recall_refresh"] + 1e-9
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / ".long_context_stats.safetensors").exists()  # temporary stats removed


def test_pre_rope_keys_are_the_projected_keys():
    """Layer 0's keys before RoPE depend on the token alone: k_proj(input_layernorm(embedding))."""
    from flashmem.testing import pre_rope_keys, tiny_model

    model = tiny_model("llama", layers=2, seed=3)
    ids = torch.randint(0, 128, (37,), generator=torch.Generator().manual_seed(8))
    got = pre_rope_keys(model, ids, 0, window=16)  # three windows, positions restart in each
    layer = model.model.layers[0]
    with torch.no_grad():
        want = layer.self_attn.k_proj(layer.input_layernorm(model.model.embed_tokens(ids)))
    assert got.shape == (37, 2, 16)
    torch.testing.assert_close(got, want.view(37, 2, 16), rtol=1e-5, atol=1e-5)
    # a later layer sees the context: its keys differ with the window
    assert not torch.allclose(
        pre_rope_keys(model, ids, 1, window=16), pre_rope_keys(model, ids, 1, window=64)
    )


def test_median_ms_and_the_kernel_timings_on_cpu():
    """One timer (bench.common.median_ms) for the kernel timings of freed-blocks --gpu-timing and
    paged-decode; on a CPU both run their correctness checks and time under the Triton interpreter."""
    from bench import freed_blocks, paged_decode_timing

    calls = []
    assert common.median_ms(lambda: calls.append(1), torch.device("cpu"), 2, 5) >= 0
    assert len(calls) == 7  # warm-up calls, then the timed ones
    r = freed_blocks.time_kernels_cuda(
        1024, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16, budget=128,
        dtype=torch.float32, repeats=2, device="cpu",
    )  # fmt: skip
    assert r["compaction_matches_reference"] and r["score_max_rel_error_vs_fp64_reference"] < 1e-5
    assert r["score_one_layer_ms"] > 0 and r["compaction_all_layers_ms"] > 0
    argv = ["--lengths", "40", "--q-heads", "4", "--kv-heads", "2", "--head-dim", "16", "--dtype", "fp32"]
    args = paged_decode_timing._parse(argv + ["--warmup", "1", "--iters", "2"])
    r = paged_decode_timing.run_length(40, args, torch.device("cpu"), torch.float32)
    assert r["correct"] and r["kernel_ms"] > 0 and r["sdpa_best_ms"] > 0


def test_recall_granularity_what_if_reproduces_the_engine(tmp_path):
    """The what-if's masked forward is the engine's decode: in shared mode (queries barely drift on
    the tiny model) its next-token KL equals the engine's to 1e-4 relative over three recall windows;
    per head, where the engine ranks with its own drifted queries, within 5%."""
    from bench import recall_granularity

    out = tmp_path / "rg.json"
    argv = ["--model", "tiny", "--tokens", "640", "--docs", "1", "--new-tokens", "150", "--json", str(out)]
    assert recall_granularity.main(argv) == 0
    data = json.loads(out.read_text())
    kl = {s["method"]: s["mean_kl"] for s in data["summary"]}
    assert data["check"][0]["top1_agreement"] == 1.0 and data["check"][0]["max_kl"] < 1e-6
    assert kl["what-if shared_quest"] == pytest.approx(kl["engine recall_mode=shared"], rel=1e-4)
    assert kl["what-if per_head"] == pytest.approx(kl["engine recall_mode=per_layer_per_head"], rel=0.05)
    assert kl["what-if per_head"] != kl["what-if shared_quest"]  # three windows: the modes did differ
    assert out.with_suffix(".png").is_file()


def test_recall_granularity_variants_select_what_they_say():
    """The diagnostic variants on a synthetic state: ``oracle_first``/``oracle_later`` take the
    oracle's chunks in exactly their windows and the default's elsewhere; ``first_mixed`` gives every
    head the shared top chunk first; the exact-attention estimate is a brute-force softmax's mass."""
    from bench import recall_granularity as rg

    g = torch.Generator().manual_seed(0)
    L, h_kv, G, D, cs, P, look, total = 2, 2, 3, 8, 4, 64, 8, 88
    n = total // cs
    rg._STATE.clear()
    rg._STATE.update(
        prompt=P, chunk=cs, lookahead=look, recent=16, observe=4,
        q={l: torch.randn(h_kv * G, total, D, generator=g) for l in range(L)},
        k={l: torch.randn(h_kv, total, D, generator=g) for l in range(L)},
        observed={l: torch.rand(h_kv, P // cs, generator=g) for l in range(L)},
        future={l: torch.rand(h_kv, 3, n, generator=g) for l in range(L)},
    )  # fmt: skip
    k = 2
    base, oracle = rg.select("per_head", L, h_kv, total, k), rg.select("per_head_oracle", L, h_kv, total, k)
    first, later = (
        rg.select(m, L, h_kv, total, k) for m in ("per_head_oracle_first", "per_head_oracle_later")
    )
    for layer in range(L):
        assert len(base[layer]) == 3
        assert torch.equal(first[layer][0], oracle[layer][0]) and torch.equal(later[layer][0], base[layer][0])
        for w in (1, 2):
            assert torch.equal(first[layer][w], base[layer][w]) and torch.equal(
                later[layer][w], oracle[layer][w]
            )
    assert not all(torch.equal(base[l][0], oracle[l][0]) for l in range(L))  # the windows do differ
    mixed = rg.select("per_head_first_mixed", L, h_kv, total, k)
    shared_top = base[0][0][0]  # the default's first window is the shared top-k, the same for every head
    prior = torch.stack([rg._STATE["observed"][l] for l in range(L)])
    prior[..., 1:] = torch.maximum(prior[..., 1:], prior[..., :-1].clone())
    top = int(prior[..., : -(-(P - 16) // cs)].amax((0, 1)).argmax())
    assert top in shared_top.tolist()
    for layer in range(L):
        assert all(top in row.tolist() for row in mixed[layer][0])
    # the exact estimate against a brute-force loop over query heads
    position, hi, r = P + look, 10, 3
    est = rg._exact(0, position, hi, queries=r)  # the last r queries, each causal
    for h in range(h_kv):
        ref = 0
        for row in range(position - r, position):
            q, kk = rg._STATE["q"][0][:, row], rg._STATE["k"][0][h, : row + 1]
            ref = ref + sum(
                torch.softmax(kk @ q[h * G + j] / D**0.5, 0)[: hi * cs].reshape(hi, cs).sum(1)
                for j in range(G)
            )
        assert torch.allclose(est[h], ref / (G * r), atol=1e-6)


def test_recall_granularity_oracle_counts_no_resident_sink():
    """The oracle's label per window, KV head and chunk is its queries' full-attention mass summed over
    the window's rows and the query group, the sinks' share left out (they are resident: a chunk is
    no better a recall for holding them); checked against a brute-force softmax."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from bench import recall_granularity as rg

    g = torch.Generator().manual_seed(1)
    h_kv, G, D, cs, P, look, T, sinks = 2, 2, 8, 4, 16, 3, 22, 2
    q, k = torch.randn(1, h_kv * G, T, D, generator=g), torch.randn(1, h_kv, T, D, generator=g)
    k[0, :, 0] = q[0, :, P:].mean((0, 1)) * 4  # a sink most decode queries attend to
    rg._STATE.clear()
    rg._STATE.update(
        prompt=P, chunk=cs, lookahead=look, observe=4, sinks=sinks, recent=8, mode="record",
        q={}, k={}, observed={}, tokens={}, future={},
    )  # fmt: skip
    rg._attention(SimpleNamespace(layer_idx=0), q, k, torch.randn(1, h_kv, T, D, generator=g), None)
    future = rg._STATE["future"][0]  # [H_kv, windows, N]
    assert future.shape == (h_kv, 2, T // cs)
    for h in range(h_kv):
        for w, rows in enumerate((range(P, P + look), range(P + look, T))):
            want = torch.zeros(T // cs)
            for row in rows:
                for j in range(G):
                    p = torch.softmax(k[0, h, : row + 1] @ q[0, h * G + j, row] / D**0.5, 0)
                    p[:sinks] = 0
                    want += F.pad(p, (0, T - row - 1))[: T // cs * cs].reshape(-1, cs).sum(1)
            torch.testing.assert_close(future[h, w], want, rtol=1e-5, atol=1e-6)
    assert future[:, :, 0].max() < 0.5 * future.sum(-1).min()  # the sink's large share is not chunk 0's


def test_recall_granularity_plots_a_folder_of_what_ifs(tmp_path):
    """``--plot-dir`` draws every row of every what-if JSON in the folder into one summary.png, and an
    empty folder is a clear error."""
    from bench import recall_granularity

    settings = {"chunk_size": 64, "chunk_budget": 2, "lookahead": 64}
    for name, kl in (("a", 0.3), ("b", 0.2)):
        row = {"method": "what-if per_head", "top1_agreement": 0.8, "mean_kl": kl, "docs": 2}
        (tmp_path / f"{name}.json").write_text(json.dumps({"settings": settings, "summary": [row]}))
    assert recall_granularity.main(["--plot-dir", str(tmp_path)]) == 0
    assert (tmp_path / "summary.png").stat().st_size > 1000
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no what-if JSON"):
        recall_granularity.main(["--plot-dir", str(empty)])
