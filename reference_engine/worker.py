"""One rank of the reference EP cluster: `python -m reference_engine.worker`.

The serving loop is what an engine integration looks like: the agent's hook at
every iteration boundary, and `on_step_failed` when a collective raised.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from coordinator.logs import configure_logging, fields
from reference_engine.adapter import ReferenceEngineAdapter
from reference_engine.config import ModelConfig
from reference_engine.engine import EPEngine
from reference_engine.frontend import FrontendClient
from reference_engine.model import CheckpointExperts, derive_weights, load_checkpoint
from reference_engine.placement import build_placement
from worker_agent.adapter import StepAborted
from worker_agent.agent import (
    EVERY_EPOCH,
    AgentConfig,
    AgentDrained,
    AgentStopped,
    ClientTls,
    EtcdAccess,
    RegistrationRefused,
    WorkerAgent,
)
from worker_agent.groups import CollectiveFailed

log = logging.getLogger("reference_engine.worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reference_engine.worker", description=__doc__)
    p.add_argument("--cluster", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--ranks-per-node", type=int, default=1)
    p.add_argument(
        "--coordinator",
        default="",
        help="coordinator host:port (default: the leader named in etcd, found again after "
        "a fail-over)",
    )
    p.add_argument("--etcd", required=True, help="etcd host:port")
    p.add_argument("--checkpoint", type=Path, help="weights file (default: derived from --seed)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--frontend", help="request router host:port")
    p.add_argument("--frontend-key", default="", help="router auth key (hex)")
    p.add_argument(
        "--rejoin", action="store_true", help="ask to be admitted into a running cluster"
    )
    p.add_argument("--lease-ttl", type=int, default=1)
    p.add_argument("--idle-sleep-ms", type=float, default=2.0, help="pause when no request runs")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (gloo, the default), cuda (GPU rank %% device count, NCCL) or cuda:N",
    )
    p.add_argument(
        "--static", action="store_true", help="the fixed-shape step on CPU too (as on CUDA)"
    )
    p.add_argument("--max-seq", type=int, default=64, help="KV-cache positions (static step)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the CUDA step eagerly")
    p.add_argument("--log-level", default="INFO")
    # Transport security (deploy/README.md); empty: plaintext, no etcd user.
    p.add_argument("--tls-ca", default="", help="CA bundle that verifies the coordinator (TLS)")
    p.add_argument("--tls-cert", default="", help="this rank's certificate (mutual TLS)")
    p.add_argument("--tls-key", default="", help="the private key of --tls-cert")
    p.add_argument("--etcd-ca", default="", help="CA bundle that verifies etcd (TLS)")
    p.add_argument("--etcd-cert", default="", help="client certificate for etcd (TLS)")
    p.add_argument("--etcd-key", default="", help="the private key of --etcd-cert")
    p.add_argument("--etcd-user", default="", help="etcd user (etcd authentication)")
    p.add_argument("--etcd-password-file", default="", help="file holding --etcd-user's password")
    return p


def resolve_device(name: str, rank: int) -> str:
    """ "cuda" is GPU rank % device count; NCCL's settings are made before any
    group exists."""
    if name == "cpu":
        return name
    import torch

    from worker_agent.groups import configure_nccl_env

    configure_nccl_env()
    if not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device here")
    index = rank % torch.cuda.device_count() if name == "cuda" else torch.device(name).index
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    stop = threading.Event()
    # What a stop signal must also do once the agent and engine exist (below).
    on_stop: list[Callable[[], None]] = []

    def stop_on_signal(*_: object) -> None:
        stop.set()
        for action in on_stop:
            action()

    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)

    device = resolve_device(args.device, args.rank)
    if args.checkpoint is not None:
        cfg, weights = load_checkpoint(args.checkpoint)
    else:
        cfg = ModelConfig(seed=args.seed)
        weights = derive_weights(cfg)
    placement = build_placement(
        args.world_size, args.ranks_per_node, cfg.n_experts, cfg.replicas, cfg.n_layers
    )
    frontend: FrontendClient | None = None
    answer = None
    if args.frontend:
        host, _, port = args.frontend.rpartition(":")
        frontend = FrontendClient((host, int(port)), bytes.fromhex(args.frontend_key), args.rank)
        answer = frontend.answer
    # A joiner's expert slots start empty: they must come from healthy peers.
    engine = EPEngine(
        cfg,
        args.rank,
        args.world_size,
        placement,
        weights,
        load_experts=not args.rejoin,
        on_complete=answer,
        device=device,
        static=True if args.static else None,
        max_seq=args.max_seq,
        cuda_graph=not args.no_cuda_graph,
    )
    # CUDA: NCCL, cuBLAS and the first graph capture are paid here, before the
    # rank registers (a joiner: before it reports ready), not in the pause.
    engine.warm_up()
    adapter = ReferenceEngineAdapter(
        engine,
        cfg,
        experts=CheckpointExperts(args.checkpoint) if args.checkpoint is not None else None,
    )
    agent = WorkerAgent(
        AgentConfig(
            cluster=args.cluster,
            rank=args.rank,
            coordinator=args.coordinator,
            etcd=args.etcd,
            rejoin=args.rejoin,
            lease_ttl_s=args.lease_ttl,
            tls=ClientTls(args.tls_ca, args.tls_cert, args.tls_key),
            etcd_access=EtcdAccess(
                args.etcd_ca, args.etcd_cert, args.etcd_key, args.etcd_user, args.etcd_password_file
            ),
        ),
        adapter,
    )
    # A stop ends the rank within seconds in any state: a step blocked on a
    # dead peer is aborted, and a rank held inside the agent (paused, failed,
    # waiting to be admitted) is woken, so the loop below sees the stop.
    on_stop.append(lambda: engine.abort_signal.abort(EVERY_EPOCH))
    on_stop.append(agent.stop)
    try:
        agent.start()
    except RegistrationRefused as exc:
        log.error("registration refused", extra=fields(rank=args.rank, reason=str(exc)))
        return 3
    if args.rejoin and agent.founder:
        # The cluster was lost: nobody holds experts to send, this rank forms
        # it again with the others from the checkpoint.
        engine.load_experts(weights)
        log.info("founding the cluster again", extra=fields(rank=args.rank))
    try:
        agent.at_boundary(engine.iteration)  # ready: blocks until admitted
        if frontend is not None:
            frontend.serve(engine.submit)
        log.info("serving", extra=fields(rank=args.rank, iteration=engine.iteration))
        while not stop.is_set():
            agent.at_boundary(engine.iteration)
            try:
                engine.step()
            except (StepAborted, CollectiveFailed) as exc:
                agent.on_step_failed(engine.iteration, exc)
                continue
            if not engine.busy():
                time.sleep(args.idle_sleep_ms / 1000.0)
    except AgentDrained as exc:
        # Not a failure: exit 0 so that a supervisor does not relaunch it.
        log.info("drained, exiting", extra=fields(rank=args.rank, reason=str(exc)))
        return 0
    except AgentStopped as exc:
        if stop.is_set():
            log.info("stopped on a signal", extra=fields(rank=args.rank))
            return 0
        log.error("stopped serving", extra=fields(rank=args.rank, reason=str(exc)))
        return 4
    finally:
        agent.stop()
        if frontend is not None:
            frontend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
