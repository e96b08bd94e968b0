"""`epctl`: the operator's command line (and the demo)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import bench.cli
from coordinator.pipes import quiet_in_pipes
from epctl.exits import (
    EXIT_DENIED,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)

__all__ = [
    "EXIT_DENIED",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "build_parser",
    "main",
]


def _kill_event(text: str) -> list[int]:
    try:
        ranks = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--kill takes ranks like 2 or 4,5,6,7; got {text!r}"
        ) from None
    if not ranks or len(set(ranks)) != len(ranks):
        raise argparse.ArgumentTypeError(f"--kill needs distinct ranks; got {text!r}")
    return ranks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epctl",
        description=__doc__,
        epilog="exit codes: 0 done, 1 failed, 2 bad usage or request, 3 coordinator "
        "unreachable, 4 not found, 5 refused by the cluster's state, 6 not allowed (no or "
        "a wrong admin credential), 141 its output's reader went away (| head)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a local cluster, kill ranks, rejoin them, report")
    demo.add_argument("--ranks", type=int, default=4, help="ranks in the cluster (default 4)")
    demo.add_argument("--ranks-per-node", type=int, default=1, help="ranks sharing a node")
    demo.add_argument(
        "--kill",
        type=_kill_event,
        action="append",
        metavar="R[,R...]",
        help="one failure event (repeatable); a comma list dies at once, as a node does "
        "(default: one event killing rank 1)",
    )
    demo.add_argument("--requests", type=int, default=48, help="requests to serve")
    demo.add_argument("--seed", type=int, default=1234)
    demo.add_argument("--etcd", help="use this etcd (host:port) instead of starting one")
    demo.add_argument("--lease-ttl", type=int, default=1, help="rank lease TTL in seconds")
    demo.add_argument("--workdir", type=Path, help="keep logs and files here")
    demo.add_argument("--json", action="store_true", help="print the report as JSON (last line)")
    demo.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="[stop:]WHO@PHASE",
        help="inject a fault when the coordinator enters PHASE (repeatable): WHO is rank:N, "
        "joiner, coordinator (a standby then runs too) or etcd (restarted on its data); "
        "SIGKILL, or SIGSTOP with stop:. Killed ranks are relaunched with --rejoin",
    )
    demo.add_argument(
        "--fault-hold",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a stop: fault keeps its process stopped, and an etcd fault keeps etcd down, "
        "this long (default: thawed once the cluster moved on; etcd restarted at once)",
    )
    demo.add_argument(
        "--list-phases", action="store_true", help="print the phase names, in timeline order"
    )

    soak = sub.add_parser(
        "soak", help="a local cluster under random rank and leader kills for M minutes, report"
    )
    soak.add_argument(
        "--minutes", type=_positive_float, required=True, help="how long to inject faults"
    )
    soak.add_argument("--seed", type=int, default=1, help="fixes the schedule of faults")
    soak.add_argument(
        "--cycles", type=_positive_int, help="stop after this many cycles (replaying a seed)"
    )
    soak.add_argument("--ranks", type=int, default=4, help="ranks in the cluster (default 4)")
    soak.add_argument("--ranks-per-node", type=int, default=1, help="ranks sharing a node")
    soak.add_argument(
        "--requests-per-cycle", type=_positive_int, default=8, help="requests sent each cycle"
    )
    soak.add_argument("--workdir", type=Path, help="keep logs and files here")
    soak.add_argument("--json", action="store_true", help="print the report as JSON (last line)")
    soak.add_argument("--verbose", action="store_true", help="show every phase, not only cycles")

    from epctl.admin import add_connection_args

    status = sub.add_parser("status", help="show a coordinator's view of its cluster")
    watch = sub.add_parser(
        "watch", help="stream the cluster's events (phases, operations, failures, admin calls)"
    )
    watch.add_argument(
        "--count", type=_positive_int, help="exit after this many events (past the snapshot)"
    )
    watch.add_argument("--timeout", type=float, help="exit after this many seconds")
    ops = sub.add_parser("ops", help="list recent operations, newest first")
    ops.add_argument("--limit", type=int, default=0, help="at most this many (default: all kept)")
    timeline = sub.add_parser("timeline", help="one operation's phases and each rank's steps")
    timeline.add_argument("op_id", metavar="OP", help="the operation (see `epctl ops`)")
    timeline.add_argument(
        "--trace", type=Path, metavar="FILE", help="write a Chrome/Perfetto trace (JSON)"
    )
    timeline.add_argument(
        "--png", type=Path, metavar="FILE", help="write a Gantt chart (needs matplotlib)"
    )
    for reading in (status, watch, ops, timeline):
        add_connection_args(reading)
        reading.add_argument("-o", "--output", choices=("table", "json"), default="table")

    abort = sub.add_parser("abort", help="roll back the admission or drain in flight")
    abort.add_argument("op_id", help="the operation (see `epctl status`)")
    abort.add_argument("--reason", default="", help="recorded with the rollback")
    rejoin = sub.add_parser("auto-rejoin", help="admit relaunched ranks on their own, or not")
    rejoin.add_argument("state", choices=("on", "off"))
    drain = sub.add_parser(
        "drain", help="remove a live member gracefully; it stays out until `epctl admit`"
    )
    admit = sub.add_parser("admit", help="admit a registered, ready joiner now")
    for by_rank in (drain, admit):
        by_rank.add_argument("rank", type=int, metavar="RANK", help="the rank (0..world_size-1)")
        by_rank.add_argument(
            "--wait", action="store_true", help="return once the operation has ended"
        )
        by_rank.add_argument(
            "--wait-timeout", type=float, default=120.0, help="seconds --wait waits (default 120)"
        )
    for mutating in (abort, rejoin, drain, admit):
        add_connection_args(mutating)
        mutating.add_argument(
            "--request-id",
            help="makes a retried call idempotent (default: a fresh one per call)",
        )
        mutating.add_argument("-o", "--output", choices=("text", "json"), default="text")
    bench.cli.add_parser(sub)
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    # `epctl ... | head -1`: every command ends quietly once its reader is gone.
    return quiet_in_pipes(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "soak":
        return _soak(args)
    if args.command == "bench":
        return bench.cli.run(args)
    from epctl import admin

    commands = {
        "abort": admin.mutate,
        "auto-rejoin": admin.mutate,
        "drain": admin.mutate,
        "admit": admin.mutate,
        "watch": admin.watch,
        "ops": admin.list_operations,
        "timeline": admin.timeline,
        "status": _status,
    }
    try:
        return commands[args.command](args)
    except admin.UsageError as exc:
        sys.stderr.write(f"epctl {args.command}: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _demo(args: argparse.Namespace) -> int:
    from epctl.demo import DemoOptions, check_kills, render_report, report_ok, run_demo
    from epctl.faults import PHASES, check_fault_hold, parse_fault

    if args.list_phases:
        sys.stdout.write("".join(f"{phase}\n" for phase in PHASES))
        return EXIT_OK
    error = _cluster_shape_error("demo", args.ranks, args.ranks_per_node)
    if error:
        sys.stderr.write(error)
        return EXIT_USAGE
    try:
        faults = [parse_fault(text, args.ranks) for text in args.fault]
    except ValueError as exc:
        sys.stderr.write(f"epctl demo: {exc}\n")
        return EXIT_USAGE
    opts = DemoOptions(
        ranks=args.ranks,
        ranks_per_node=args.ranks_per_node,
        kills=args.kill or [[1]],
        requests=args.requests,
        seed=args.seed,
        etcd=args.etcd,
        json_output=args.json,
        lease_ttl_s=args.lease_ttl,
        workdir=args.workdir,
        faults=faults,
        fault_hold_s=args.fault_hold,
    )
    try:
        check_kills(opts)
        check_fault_hold(opts.fault_hold_s, opts.faults)
    except ValueError as exc:
        sys.stderr.write(f"epctl demo: {exc}\n")
        return EXIT_USAGE
    return _run_and_report(
        "demo", lambda: run_demo(opts, sys.stdout), render_report, report_ok, args.json
    )


def _run_and_report(
    command: str,
    run: Callable[[], dict[str, Any]],
    render: Callable[[dict[str, Any], TextIO], None],
    ok: Callable[[dict[str, Any]], bool],
    json_output: bool,
) -> int:
    """Run a local-cluster command; print its report (JSON last, or rendered)."""
    from epctl.local_cluster import ClusterError

    try:
        report = run()
    except KeyboardInterrupt:
        sys.stderr.write(f"epctl {command}: interrupted; everything it started was stopped\n")
        return 130
    except (ClusterError, ValueError) as exc:
        sys.stderr.write(f"epctl {command}: {exc}\n")
        return EXIT_FAILED
    if json_output:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        render(report, sys.stdout)
    return EXIT_OK if ok(report) else EXIT_FAILED


def _cluster_shape_error(command: str, ranks: int, ranks_per_node: int) -> str | None:
    if ranks < 2:
        return f"epctl {command}: --ranks must be at least 2\n"
    if ranks_per_node < 1 or ranks % ranks_per_node:
        return f"epctl {command}: --ranks-per-node {ranks_per_node} must divide --ranks {ranks}\n"
    return None


def _soak(args: argparse.Namespace) -> int:
    from epctl.local_cluster import expert_lost_with
    from epctl.soak import SoakOptions, render_soak, run_soak, soak_ok

    error = _cluster_shape_error("soak", args.ranks, args.ranks_per_node)
    if error:
        sys.stderr.write(error)
        return EXIT_USAGE
    for rank in range(args.ranks):
        expert = expert_lost_with(args.ranks, args.ranks_per_node, args.seed, {rank})
        if expert is not None:
            sys.stderr.write(
                f"epctl soak: losing rank {rank} would lose every replica of expert {expert}; "
                "the soak needs a placement that survives any one rank (more --ranks)\n"
            )
            return EXIT_USAGE
    opts = SoakOptions(
        minutes=args.minutes,
        seed=args.seed,
        max_cycles=args.cycles,
        ranks=args.ranks,
        ranks_per_node=args.ranks_per_node,
        requests_per_cycle=args.requests_per_cycle,
        json_output=args.json,
        verbose=args.verbose,
        workdir=args.workdir,
    )
    return _run_and_report(
        "soak", lambda: run_soak(opts, sys.stdout), render_soak, soak_ok, args.json
    )


def _status(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from epctl.admin import report_error, target_of
    from protos.ep_recovery.v1 import admin_pb2, common_pb2

    target = target_of(args)
    with target.stub() as stub:
        try:
            status = stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        except grpc.RpcError as exc:
            return report_error("status", target.endpoint, exc)
    if args.output == "json":
        sys.stdout.write(json.dumps(MessageToDict(status)) + "\n")
        return EXIT_OK
    phase = common_pb2.Phase.Name(status.phase).removeprefix("PHASE_").lower()
    sys.stdout.write(
        f"cluster {status.cluster}  epoch {status.epoch}  phase {phase}  "
        f"members {list(status.members)}\n"
    )
    if status.HasField("operation"):
        op = status.operation
        sys.stdout.write(f"operation {op.op_id} ({op.kind}) to epoch {op.target_epoch}\n")
    sys.stdout.write(f"{'RANK':>4}  {'STATE':<15}  {'ITERATION':>9}  {'HEARTBEAT':>9}\n")
    for rank in status.ranks:
        state = admin_pb2.RankState.Name(rank.state).removeprefix("RANK_STATE_").lower()
        if rank.ready:
            state += " (ready)"
        beat = f"{rank.last_heartbeat_ms_ago} ms" if rank.last_heartbeat_ms_ago >= 0 else "-"
        sys.stdout.write(f"{rank.rank:>4}  {state:<15}  {rank.iteration:>9}  {beat:>9}\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
