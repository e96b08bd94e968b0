"""`ep-coordinator`: the recovery coordinator daemon."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from coordinator.config import CoordinatorConfig
from coordinator.logs import configure_logging, fields

log = logging.getLogger("ep-coordinator")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ep-coordinator",
        description="Recovery coordinator for elastic expert-parallel inference.",
    )
    p.add_argument("--cluster", required=True, help="cluster name (the etcd key prefix)")
    p.add_argument("--world-size", type=int, required=True, help="number of rank slots")
    p.add_argument("--listen", default="127.0.0.1:50051", help="gRPC host:port (port 0: free)")
    p.add_argument("--etcd", default="127.0.0.1:2379", help="etcd client endpoint host:port")
    p.add_argument("--store-host", default="127.0.0.1", help="address ranks reach the store on")
    p.add_argument("--store-port", type=int, default=0, help="rendezvous store port (0: free)")
    p.add_argument("--progress-interval-ms", type=int, default=50)
    p.add_argument("--hold-lead-s", type=float, default=0.05)
    p.add_argument("--group-timeout-s", type=float, default=30.0)
    p.add_argument("--no-auto-rejoin", action="store_true", help="do not admit joiners")
    p.add_argument("--fingerprint", default="", help="expected engine fingerprint")
    p.add_argument("--ready-file", type=Path, help="write {pid, listen_port, store_port} here")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        config = CoordinatorConfig(
            cluster=args.cluster,
            world_size=args.world_size,
            listen=args.listen,
            etcd=args.etcd,
            store_host=args.store_host,
            store_port=args.store_port,
            progress_interval_ms=args.progress_interval_ms,
            hold_lead_s=args.hold_lead_s,
            group_timeout_s=args.group_timeout_s,
            auto_rejoin=not args.no_auto_rejoin,
            fingerprint=args.fingerprint,
        )
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"])
            sys.stderr.write(f"ep-coordinator: invalid {where}: {err['msg']}\n")
        return 2
    return asyncio.run(_run(config, args.ready_file))


async def _run(config: CoordinatorConfig, ready_file: Path | None) -> int:
    from coordinator.runtime import Coordinator, serve

    def on_ready(coordinator: Coordinator) -> None:
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "listen_port": coordinator.listen_port,
                        "store_port": coordinator.store_port,
                    }
                )
            )
            tmp.replace(ready_file)

    task = asyncio.create_task(serve(config, on_ready))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("stopped", extra=fields(cluster=config.cluster))
        return 0
    except OSError as exc:
        log.error("cannot serve", extra=fields(error=str(exc)))
        return 1
    finally:
        with contextlib.suppress(Exception):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
