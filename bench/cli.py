"""`epctl bench NAME [--quick] [--json]`: the wiring between epctl and the benchmarks.

A benchmark is a module of this package with `run(quick, log) -> BenchResult`;
adding one is adding its entry to BENCHES. Modules are imported only when
their benchmark runs, so `epctl` stays quick to start.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Protocol, TextIO

from bench.common import BenchError, BenchResult, machine_info, render_table

EXIT_OK = 0
EXIT_FAILED = 1

# name -> (module under bench/, one line for --help)
BENCHES: dict[str, tuple[str, str]] = {
    "hook": ("bench.hook", "idle iteration hook vs seed-style per-iteration checks (ns/call)"),
    "detect": ("bench.detect", "SIGKILL and SIGSTOP of a rank to the coordinator's detection"),
    "resync": ("bench.resync", "expert weight transfer vs loopback copy bound (bytes/s)"),
    "stall": ("bench.stall", "survivor stall per admission vs seed-style, full restart, floor"),
    "fanout": (
        "bench.fanout",
        "one coordinator and 1024 simulated ranks (--quick: 256): pause to all acks, CPU share",
    ),
}


class _BenchModule(Protocol):
    def run(self, quick: bool, log: TextIO | None = None) -> BenchResult: ...


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object."""
    names = ", ".join(BENCHES)
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help=f"measure the recovery path ({names})",
        description="Run one benchmark and report its figures. "
        + " ".join(f"{name}: {text}." for name, (_, text) in BENCHES.items()),
    )
    # An unknown name is argparse's usage error: exit 2, naming the valid names.
    parser.add_argument("name", choices=tuple(BENCHES), metavar="NAME", help=names)
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and sizes (about a minute)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on the last line"
    )
    return parser


def run(args: argparse.Namespace, out: TextIO | None = None, log: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    log = sys.stderr if log is None else log
    module_name, _ = BENCHES[args.name]
    module: _BenchModule = importlib.import_module(module_name)
    machine = machine_info()
    try:
        result = module.run(args.quick, log)
    except KeyboardInterrupt:
        log.write(f"epctl bench {args.name}: interrupted; everything it started was stopped\n")
        return 130
    except BenchError as exc:
        log.write(f"epctl bench {args.name}: {exc}\n")
        return EXIT_FAILED
    if args.json:
        report = {
            "bench": args.name,
            "quick": bool(args.quick),
            "machine": machine,
            "results": result.results,
            "notes": result.notes,
        }
        out.write(json.dumps(report) + "\n")
    else:
        render_table(args.name, machine, result, out)
    out.flush()
    return EXIT_OK
