"""bench.prefill_cost on a tiny model: checks correctness before timing, reports traffic per length."""

import json

from bench import prefill_cost


def test_quick_entry_reports_exact_logits_and_constant_upload(tmp_path):
    out = tmp_path / "prefill_cost.json"
    assert prefill_cost.main(["--quick", "--lengths", "300,600", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["part_a"]["rows"]
    assert [r["tokens"] for r in rows] == [300, 600]
    assert all(r["first_token_logits_rel_diff"] < 1e-4 for r in rows)
    # device-to-host: every prompt row once; host-to-device: nothing, whatever the length (the default
    # keeps per layer, written from the layer's buffer; per_head's read-back: test_layer_major_prefill)
    assert rows[1]["prefill_d2h_bytes"] == 2 * rows[0]["prefill_d2h_bytes"] == 2 * rows[0]["full_kv_bytes"]
    assert rows[0]["prefill_h2d_bytes"] == rows[1]["prefill_h2d_bytes"] == 0
    assert data["summary"]["max_ratio"] == max(r["ratio"] for r in rows)
    assert (tmp_path / "prefill_cost.png").is_file()
