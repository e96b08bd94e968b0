"""`make bench`: run every benchmark and write BENCHMARKS.md's generated sections.

    python -m bench.report                 # every bench, --quick (what `make bench` runs)
    python -m bench.report --full          # every bench at full size (`make bench FULL=1`)
    python -m bench.report --only fanout   # some of them
    python -m bench.report --render-only   # rewrite the doc from the saved reports

Each bench runs as `epctl bench NAME [--quick] --json` in a process of its own
(its progress goes to this terminal); its JSON report is saved under
out/bench/NAME.json. BENCHMARKS.md is then rewritten between its markers only:

    <!-- BEGIN GENERATED machine ... -->   the machine of the run (CPU, cores, RAM, ...)
    <!-- BEGIN GENERATED NAME ... -->      per bench: how it ran, its table, its notes

Everything outside the markers is hand-written and left as it is; a marker
missing from the document is an error (they are placed by hand, in the
section they belong to). The stall report is also drawn as bench/stall.png
(needs matplotlib, a dev extra). A bench that fails leaves its section as it
was; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from bench.cli import BENCHES

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "BENCHMARKS.md"
RESULTS = ROOT / "out" / "bench"
PLOT = ROOT / "bench" / "stall.png"
# Per bench, generous: a loaded 2-core machine runs `stall` for minutes even quick.
TIMEOUT_S = {"quick": 45 * 60, "full": 4 * 3600}
# A table with more columns than this and few rows reads better turned on its side.
WIDE_COLUMNS = 10
STALL_SYSTEMS = ("ep-recovery", "seed-style", "full-restart", "floor")

MARKER = re.compile(
    r"(?P<begin><!-- BEGIN GENERATED (?P<name>[a-z]+)\b[^>]*-->\n)"
    r"(?P<body>.*?)"
    r"(?P<end><!-- END GENERATED (?P=name) -->)",
    re.DOTALL,
)


class ReportError(RuntimeError):
    """The document cannot be written as asked (a marker is missing, say)."""


# --- running the benches -------------------------------------------------------------


def run_bench(name: str, quick: bool, results: Path, log: TextIO) -> bool:
    """Run one bench and save its report with how it ran; False when it failed."""
    argv = [sys.executable, "-m", "epctl.cli", "bench", name, "--json"]
    if quick:
        argv.append("--quick")
    shown = f"epctl bench {name}{' --quick' if quick else ''} --json"
    log.write(f"make bench: {shown}\n")
    log.flush()
    started_utc = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv,
            cwd=ROOT,
            stdout=subprocess.PIPE,  # the JSON report; progress goes to our stderr
            text=True,
            timeout=TIMEOUT_S["quick" if quick else "full"],
        )
    except subprocess.TimeoutExpired:
        log.write(f"make bench: {name} ran out of time; its section is left as it was\n")
        return False
    wall_s = time.monotonic() - started
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        log.write(f"make bench: {name} exited {done.returncode}; its section is left as it was\n")
        return False
    saved = {
        "report": json.loads(lines[-1]),
        "command": shown,
        "started_utc": started_utc.strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(wall_s, 1),
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(saved, indent=1) + "\n")
    return True


def load_saved(results: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    saved: dict[str, dict[str, Any]] = {}
    for name in names:
        path = results / f"{name}.json"
        if path.exists():
            saved[name] = json.loads(path.read_text())
    return saved


# --- the document ----------------------------------------------------------------------


def replace_sections(text: str, sections: Mapping[str, str]) -> str:
    """`text` with the body between each named pair of markers replaced; all
    else byte for byte as it was. ReportError names a section without markers."""
    found = {m.group("name") for m in MARKER.finditer(text)}
    missing = sorted(set(sections) - found)
    if missing:
        raise ReportError(
            f"no '<!-- BEGIN GENERATED {missing[0]} -->' ... '<!-- END GENERATED {missing[0]} -->' "
            f"markers in the document (missing: {', '.join(missing)})"
        )

    def fill(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in sections:
            return match.group(0)
        body = sections[name].rstrip("\n") + "\n"
        return match.group("begin") + body + match.group("end")

    return MARKER.sub(fill, text)


def cell(value: Any) -> str:
    """A figure as the hand-written tables show them (thousands separators,
    about 3 significant digits)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(records: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of flat records. Keys equal in every record are said
    once below it; a wide table of few records is turned on its side."""
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns]
    constant = {
        c: records[0].get(c)
        for c in columns
        if len(records) > 1 and all(r.get(c) == records[0].get(c) for r in records)
    }
    shown = [c for c in columns if c not in constant]
    out: list[str] = []
    if len(shown) > WIDE_COLUMNS and len(records) <= 6:
        out.append("| | " + " | ".join(f"#{i + 1}" for i in range(len(records))) + " |")
        out.append("|---|" + "---:|" * len(records))
        for c in shown:
            out.append(f"| `{c}` | " + " | ".join(cell(r.get(c)) for r in records) + " |")
    else:
        numeric = [
            all(isinstance(r.get(c), int | float) or r.get(c) is None for r in records)
            for c in shown
        ]
        out.append("| " + " | ".join(shown) + " |")
        out.append("|" + "".join("---:|" if n else "---|" for n in numeric))
        for r in records:
            out.append("| " + " | ".join(cell(r.get(c)) for c in shown) + " |")
    if constant:
        same = ", ".join(f"`{k}` {cell(v)}" for k, v in constant.items())
        out.append("")
        out.append(f"Every row: {same}.")
    return "\n".join(out)


def bench_section(name: str, saved: Mapping[str, Any], plot: Path | None) -> str:
    report = saved["report"]
    machine = report.get("machine", {})
    mode = "quick" if report.get("quick") else "full"
    load = cell(machine.get("load_avg_1min_at_start"))
    lines = [
        f"**Latest `make bench` run** ({mode}: `{saved['command']}`, {saved['started_utc']}, "
        f"{cell(saved['wall_s'])} s wall, 1-minute load {load} at its start; the machine is "
        "described under Machine):",
        "",
        table(report["results"]),
    ]
    if plot is not None:
        lines += ["", f"![{name}: survivor stall against expert bytes]({plot.as_posix()})"]
    notes = report.get("notes") or []
    if notes:
        lines += ["", "How it was measured (the bench's own notes):", ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def machine_section(saved: Mapping[str, Mapping[str, Any]]) -> str:
    """The machine of the latest runs, from the reports' own machine records."""
    first = next(iter(saved.values()))["report"]["machine"]
    ram = first.get("ram_total_bytes")
    free = first.get("ram_available_bytes_at_start")
    ram_text = "-"
    if isinstance(ram, int):
        ram_text = f"{ram / 2**30:.1f} GiB"
        if isinstance(free, int):
            ram_text += f" ({free / 2**30:.1f} GiB available when the first bench started)"
    runs = "; ".join(
        f"`{s['command']}` {s['started_utc']}, {cell(s['wall_s'])} s, load "
        f"{cell(s['report']['machine'].get('load_avg_1min_at_start'))}"
        for s in saved.values()
    )
    rows = [
        ("CPU", f"{first.get('cpu_model')}, {first.get('cores')} cores "
                f"({first.get('cores_usable')} usable)"),
        ("RAM", ram_text),
        ("OS", str(first.get("platform"))),
        ("Python, torch", f"{first.get('python')}, torch {first.get('torch')} "
                          f"({first.get('torch_threads')} threads)"),
        ("etcd", etcd_version()),
        ("runs", f"one after another, each with its 1-minute load average at its start: {runs}"),
    ]  # fmt: skip
    out = ["The latest `make bench` runs, behind the generated sections:", "", "| | |", "|---|---|"]
    out += [f"| {k} | {cell(v)} |" for k, v in rows]
    return "\n".join(out)


def etcd_version() -> str:
    binary = shutil.which("etcd")
    if binary is None:
        return "not found"
    try:
        text = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in text.splitlines():
        if line.lower().startswith("etcd version"):
            return line.split(":", 1)[1].strip()
    return text.strip().splitlines()[0] if text.strip() else "unknown"


# --- the stall plot --------------------------------------------------------------------


def plot_stall(records: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Survivor stall against expert bytes, one panel per rank count: each
    system's median with its min..max range, the floor (a best case) dashed."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rank_counts = sorted({int(r["ranks"]) for r in records})
    fig, axes = plt.subplots(
        1, len(rank_counts), figsize=(4.8 * len(rank_counts) + 1.2, 4.2), squeeze=False
    )
    # marker, line, colour, and a small sideways shift so that ranges at the
    # same size do not hide each other
    styles = {
        "ep-recovery": ("o", "-", "tab:blue", 1.0),
        "seed-style": ("s", "-", "tab:orange", 1.1),
        "full-restart": ("^", "-", "tab:red", 0.91),
        "floor": ("", "--", "tab:gray", 1.0),
    }
    # where each system's figures are written, in points from the point
    label_offsets = {"ep-recovery": (6, -11), "floor": (6, -11)}
    for ax, ranks in zip(axes[0], rank_counts, strict=True):
        sizes: set[float] = set()
        for system in STALL_SYSTEMS:
            rows = sorted(
                (r for r in records if r["system"] == system and int(r["ranks"]) == ranks),
                key=lambda r: float(r["expert_mb"]),
            )
            if not rows:
                continue
            marker, line, color, shift = styles[system]
            x = [float(r["expert_mb"]) * shift for r in rows]
            y = [float(r["stall_ms"]) for r in rows]
            sizes |= {float(r["expert_mb"]) for r in rows}
            if system == "floor":
                # The floor is the best build of its trials: its range says
                # nothing about the floor itself.
                ax.plot(x, y, linestyle=line, color=color, label="floor (bare group build, best)")
            else:
                low = [v - float(r["stall_ms_min"]) for v, r in zip(y, rows, strict=True)]
                high = [float(r["stall_ms_max"]) - v for v, r in zip(y, rows, strict=True)]
                ax.errorbar(
                    x,
                    y,
                    yerr=[[max(0.0, d) for d in low], [max(0.0, d) for d in high]],
                    marker=marker,
                    linestyle=line,
                    color=color,
                    capsize=3,
                    label=system,
                )
            for xi, yi in zip(x, y, strict=True):
                text = f"{yi / 1000:.1f} s" if yi >= 1000 else f"{yi:.0f} ms"
                ax.annotate(
                    text, (xi, yi), textcoords="offset points", fontsize="x-small", color=color,
                    xytext=label_offsets.get(system, (6, 4)),
                )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(sizes), [f"{s:g}" for s in sorted(sizes)])
        ax.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)
        low, high = ax.get_ylim()
        ax.set_ylim(low / 1.5, high * 2.5)  # room for the labels by the extreme points
        ax.set_xlabel("expert MiB per rank")
        ax.set_title(f"{ranks} ranks")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("survivor stall, ms (median; bars: min..max)")
    axes[0][0].legend(loc="upper left", fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------


def render(doc: Path, saved: Mapping[str, Mapping[str, Any]], plot: Path, log: TextIO) -> None:
    if not saved:
        raise ReportError("no saved reports to write from (run the benches first)")
    sections = {"machine": machine_section(saved)}
    for name, s in saved.items():
        drawn: Path | None = None
        if name == "stall":
            try:
                mode = "quick" if s["report"].get("quick") else "full"
                plot_stall(
                    s["report"]["results"],
                    plot,
                    f"epctl bench stall ({mode}), {s['started_utc']}: survivors held per admission",
                )
                drawn = plot.relative_to(doc.parent)
            except ImportError:
                log.write("make bench: matplotlib is not installed; bench/stall.png not drawn\n")
        sections[name] = bench_section(name, s, drawn)
    doc.write_text(replace_sections(doc.read_text(), sections))
    log.write(f"make bench: wrote {', '.join(sections)} in {doc.name}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("--full", action="store_true", help="full sizes (default: --quick)")
    parser.add_argument("--only", nargs="+", choices=tuple(BENCHES), metavar="NAME")
    parser.add_argument("--render-only", action="store_true", help="do not run; write the doc")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    log = sys.stderr
    names = list(args.only or BENCHES)
    failed: list[str] = []
    if not args.render_only:
        for name in names:
            if not run_bench(name, not args.full, args.results, log):
                failed.append(name)
    # Every bench's latest saved report, not only this run's: a run of some
    # benches leaves the others' sections as their own runs wrote them, and the
    # machine section names the run behind each section.
    saved = load_saved(args.results, [n for n in BENCHES if n not in failed])
    try:
        render(args.doc, saved, args.plot, log)
    except ReportError as exc:
        log.write(f"make bench: {exc}\n")
        return 2
    if failed:
        log.write(f"make bench: failed: {', '.join(failed)} (their sections are unchanged)\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
