"""`make bench`'s writer (bench/report.py): only the marked sections change,
tables keep the figures readable, and the stall plot is a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import report

HAND = "# Title\n\nHand-written intro, with a | pipe.\n\n"


def _doc(*names: str) -> str:
    parts = [HAND]
    for name in names:
        parts.append(f"## {name}\n\nMethod of {name}.\n\n")
        parts.append(f"<!-- BEGIN GENERATED {name} (note) -->\nold {name}\n")
        parts.append(f"<!-- END GENERATED {name} -->\n\nReading of {name}.\n\n")
    return "".join(parts)


def test_only_the_marked_sections_change() -> None:
    text = _doc("machine", "hook", "stall")
    out = report.replace_sections(text, {"hook": "new hook\n", "machine": "new machine"})
    assert "new hook\n<!-- END GENERATED hook -->" in out
    assert "new machine\n<!-- END GENERATED machine -->" in out
    assert "old hook" not in out and "old machine" not in out
    assert "old stall" in out  # not asked for: left as it was
    # Everything outside the markers is byte for byte the same.
    assert out.replace("new hook\n", "old hook\n").replace("new machine", "old machine") == text
    # Writing again replaces, never stacks.
    again = report.replace_sections(out, {"hook": "newer hook"})
    assert again.count("GENERATED hook") == 2 and "new hook" not in again


def test_a_missing_marker_is_an_error_naming_it() -> None:
    with pytest.raises(report.ReportError, match="fanout"):
        report.replace_sections(_doc("hook"), {"hook": "x", "fanout": "y"})


def test_the_document_has_every_marker_once() -> None:
    text = report.DOC.read_text()
    for name in ("machine", *report.BENCHES):
        assert text.count(f"<!-- BEGIN GENERATED {name} ") == 1, name
        assert text.count(f"<!-- END GENERATED {name} -->") == 1, name


def test_table_factors_out_constants_and_turns_wide_ones() -> None:
    rows: list[dict[str, Any]] = [
        {"system": "a", "ranks": 8, "stall_ms": 1234.5, "ok": True},
        {"system": "b|c", "ranks": 8, "stall_ms": 0.05, "ok": None},
    ]
    text = report.table(rows)
    assert text.splitlines()[0] == "| system | stall_ms | ok |"
    assert "| a | 1,234 | yes |" in text and "| b\\|c | 0.05 | - |" in text
    assert "Every row: `ranks` 8." in text
    wide = [{f"k{i}_ms": float(i + n) for i in range(12)} for n in range(2)]
    turned = report.table(wide).splitlines()
    assert turned[0] == "| | #1 | #2 |"
    assert len(turned) == 2 + 12


def test_render_writes_sections_and_the_stall_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(_doc("machine", "stall"))
    machine = {"cpu_model": "cpu", "cores": 2, "cores_usable": 2, "load_avg_1min_at_start": 1.5}
    records = [
        {"system": s, "ranks": 8, "expert_mb": mb, "stall_ms": v, "stall_ms_min": v * 0.9,
         "stall_ms_max": v * 1.1}
        for s, v in (("ep-recovery", 200.0), ("floor", 70.0), ("seed-style", 300.0))
        for mb in (1, 64)
    ] + [{"system": "full-restart", "ranks": 8, "expert_mb": 64, "stall_ms": 2e4,
          "stall_ms_min": 2e4, "stall_ms_max": 2e4}]  # fmt: skip
    saved = {
        "stall": {
            "report": {"quick": True, "machine": machine, "results": records, "notes": ["n1"]},
            "command": "epctl bench stall --quick --json",
            "started_utc": "2025-01-01 00:00 UTC",
            "wall_s": 12.0,
        }
    }
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stall.json").write_text(json.dumps(saved["stall"]))
    plot = tmp_path / "bench" / "stall.png"
    code = report.main(
        ["--render-only", "--only", "stall", "--doc", str(doc), "--results",
         str(tmp_path / "out"), "--plot", str(plot)]
    )  # fmt: skip
    assert code == 0
    text = doc.read_text()
    assert "![stall: survivor stall against expert bytes](bench/stall.png)" in text
    assert "| cpu, 2 cores (2 usable) |" in text
    assert "- n1" in text and "Method of stall." in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
