"""The RULER-style suite's results log: run keys, result records and the resumable JSONL.

Shared by :mod:`bench.ruler` (full attention and flashmem runs) and :mod:`bench.peers.kvpress_peer`
(the presses' runs), so both write the same records under the same keys.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from bench import common
from bench import ruler_tasks as rt


def ids_hash(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]


def run_key(p: dict, method: dict) -> str:
    """Hash of the prompt ids, the answer budget and the method's resolved configuration."""
    blob = json.dumps(
        {"ids": p["ids_sha"], "new_tokens": p["max_new_tokens"], "method": method["spec"]}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class RunLog:
    """Append-only JSONL of results, one per line with its ``key``; a line cut short (a run killed
    while writing) is ignored."""

    def __init__(self, path: Path, fresh: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            text = self.path.read_text()
            if text and not text.endswith("\n"):
                with self.path.open("a") as f:
                    f.write("\n")  # a line cut short stays alone on its line
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    self.records[rec["key"]] = rec

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def append(self, rec: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(common._jsonable(rec)) + "\n")
        self.records[rec["key"]] = rec


def record(p: dict, m: dict, key: str, run: dict, tok) -> dict:
    output = tok.decode(run["tokens"], skip_special_tokens=True)
    rec = {
        "key": key,
        "method": m["label"],
        "kind": m["kind"],
        "share_target": m.get("share"),
        "id": p["id"],
        "ids_sha": p["ids_sha"],
        "task": p["task"],
        "length": p["target_tokens"],
        "sample": p["sample"],
        "tokens": p["tokens"],
        "references": p["references"],
        "output": output,
        "output_tokens": run["tokens"],
        "score": rt.score(p["metric"], output, p["references"]),
        "unix": int(time.time()),
    }
    for k in (
        "seconds",
        "prefill_s",
        "avg_device_share",
        "peak_device_share",
        "avg_device_kv_share",
        "peak_device_kv_share",
        "kept_share",
        "kept_share_end",
        "keep_share_requested",
        "device_bytes",
        "full_kv_bytes",
        "indexer",
    ):
        if run.get(k) is not None:
            rec[k] = run[k]
    if m["kind"] == "flashmem":
        rec["config"] = m["config"]
        rec["budget_tokens"] = m["config"].get("budget_tokens")
    for k in ("press", "placement"):
        if k in m:
            rec[k] = m[k]
    return rec
