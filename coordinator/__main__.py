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
import traceback
from pathlib import Path

import yaml

from coordinator.config import ConfigError, CoordinatorConfig, load_config
from coordinator.logs import configure_logging, fields
from coordinator.pipes import quiet_in_pipes
from coordinator.security import ServerSecrets, load_server_secrets
from coordinator.systemd_notify import SystemdNotifier

log = logging.getLogger("ep-coordinator")

# After SIGTERM, an orderly stop that takes longer than this is cut short.
STOP_DEADLINE_S = 10.0


_RUN_EPILOG = """\
Settings come from, each overriding the one before: the defaults, the YAML file
given with --config, environment variables EP_COORDINATOR_<FIELD> (e.g.
EP_COORDINATOR_WORLD_SIZE=16), and the flags given here. Validate a file with
`ep-coordinator check-config FILE`.
"""


def _default(name: str) -> str:
    return f"(default: {CoordinatorConfig.model_fields[name].default})"


def build_parser() -> argparse.ArgumentParser:
    """The run mode's flags; a flag left out does not override the file or environment."""
    p = argparse.ArgumentParser(
        prog="ep-coordinator",
        description="Recovery coordinator for elastic expert-parallel inference.",
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    p.add_argument(
        "--cluster", help="cluster name, the etcd key prefix (required here or in the file/env)"
    )
    p.add_argument(
        "--world-size", type=int, help="number of rank slots (required here or in the file/env)"
    )
    p.add_argument("--listen", help=f"gRPC host:port, port 0 picks a free one {_default('listen')}")
    p.add_argument("--etcd", help=f"etcd client endpoint host:port {_default('etcd')}")
    p.add_argument(
        "--metrics-listen",
        help="serve Prometheus /metrics on host:port, port 0 picks a free one; loopback "
        "only, unless --insecure-metrics-listen (default: not served)",
    )
    p.add_argument(
        "--advertise-host",
        help="host agents reach this coordinator on, written to the leader key "
        "(default: the listen host, or this host's name on 0.0.0.0)",
    )
    p.add_argument(
        "--leader-ttl-s",
        type=int,
        help=f"leader lease TTL: how soon a standby takes over {_default('leader_ttl_s')}",
    )
    p.add_argument(
        "--store-host",
        help="address ranks reach the store on, and the only one it listens on; loopback "
        f"while --listen is {_default('store_host')}",
    )
    p.add_argument("--store-port", type=int, help="rendezvous store port (default: 0, free)")
    p.add_argument(
        "--progress-interval-ms",
        type=int,
        help=f"how often ranks report progress, at the least {_default('progress_interval_ms')}",
    )
    p.add_argument(
        "--progress-reports-per-s",
        type=int,
        help="the most progress reports a second from the whole cluster: a large cluster's "
        f"ranks report less often {_default('progress_reports_per_s')}",
    )
    p.add_argument(
        "--hold-lead-s",
        type=float,
        help=f"time a hold order first takes to arrive {_default('hold_lead_s')}",
    )
    p.add_argument(
        "--group-timeout-s",
        type=float,
        help=f"limit for building an epoch's groups {_default('group_timeout_s')}",
    )
    p.add_argument(
        "--hang-timeout-s",
        type=float,
        help="declare a member hung after its iteration stood still this long while its "
        f"peers moved on or failed their step {_default('hang_timeout_s')}",
    )
    p.add_argument(
        "--lease-rebind-s",
        type=float,
        help="how long a rank whose lease expired under an open session has to bind a new "
        f"lease {_default('lease_rebind_s')}",
    )
    p.add_argument(
        "--reconnect-window-s",
        type=float,
        help="how long a new leader waits for the members to reconnect (default: two "
        "leader leases)",
    )
    p.add_argument(
        "--auto-rejoin",
        action=argparse.BooleanOptionalAction,
        help="admit relaunched ranks (default: yes)",
    )
    p.add_argument("--fingerprint", help="expected engine fingerprint (default: the first seen)")
    p.add_argument(
        "--ready-file",
        type=Path,
        help="write {pid, listen_port, store_port, metrics_port} here (metrics_port 0: off)",
    )
    p.add_argument("--log-level", help=_default("log_level"))
    p.add_argument("--log-format", choices=("text", "json"), help=_default("log_format"))
    tls = p.add_argument_group(
        "transport security (deploy/README.md: TLS, mutual TLS, the admin credential)"
    )
    tls.add_argument("--tls-cert-file", metavar="PEM", help="serve TLS with this certificate chain")
    tls.add_argument("--tls-key-file", metavar="PEM", help="the private key of --tls-cert-file")
    tls.add_argument(
        "--tls-client-ca-file",
        metavar="PEM",
        help="mutual TLS: every client must present a certificate from this CA bundle",
    )
    tls.add_argument(
        "--insecure-listen",
        action=argparse.BooleanOptionalAction,
        help="serve without TLS on a non-loopback --listen address, on purpose (default: no)",
    )
    tls.add_argument(
        "--insecure-metrics-listen",
        action=argparse.BooleanOptionalAction,
        help="serve /metrics (plain HTTP, no authentication) on a non-loopback "
        "--metrics-listen address, on purpose (default: no)",
    )
    tls.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help="mutating admin calls need this bearer token (`authorization: Bearer ...`)",
    )
    tls.add_argument(
        "--admin-identities",
        metavar="NAME[,NAME...]",
        help="mutual TLS: client certificates (CN or SAN) allowed mutating admin calls",
    )
    tls.add_argument("--etcd-ca-file", metavar="PEM", help="verify etcd with this CA (TLS)")
    tls.add_argument("--etcd-cert-file", metavar="PEM", help="client certificate for etcd (TLS)")
    tls.add_argument("--etcd-key-file", metavar="PEM", help="the private key of --etcd-cert-file")
    tls.add_argument("--etcd-username", help="etcd user, when etcd's authentication is on")
    tls.add_argument(
        "--etcd-password-file", metavar="FILE", help="file holding --etcd-username's password"
    )
    return p


def build_check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ep-coordinator check-config",
        description="Validate a configuration file (with EP_COORDINATOR_* overrides applied) "
        "and print the effective configuration. Exits 2 naming the field on bad input.",
    )
    p.add_argument("file", type=Path, metavar="FILE", help="YAML configuration file")
    p.add_argument("--format", choices=("yaml", "json"), default="yaml", help="output format")
    return p


def _refuse(err: ConfigError) -> int:
    for problem in err.problems:
        sys.stderr.write(f"ep-coordinator: {problem}\n")
    return 2


def check_config(argv: list[str]) -> int:
    args = build_check_parser().parse_args(argv)
    try:
        config, sources = load_config(args.file, os.environ)
        # The files it names too: a certificate that does not match its key
        # would otherwise fail every handshake of a daemon that started fine.
        load_server_secrets(config, sources, args.file)
    except ConfigError as err:
        return _refuse(err)
    values = config.model_dump(mode="json")
    if args.format == "json":
        sys.stdout.write(json.dumps(values, indent=2) + "\n")
        return 0
    overridden = sorted(s for s in set(sources.values()) if s.startswith("environment "))
    header = f"# effective configuration from {args.file}"
    if overridden:
        header += ", with " + ", ".join(s.removeprefix("environment ") for s in overridden)
    sys.stdout.write(header + "\n" + yaml.safe_dump(values, sort_keys=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check-config"]:
        return quiet_in_pipes(lambda: check_config(argv[1:]))
    args = build_parser().parse_args(argv)
    flags = {
        name: value
        for name, value in vars(args).items()
        if name in CoordinatorConfig.model_fields and value is not None
    }
    try:
        config, sources = load_config(args.config, os.environ, flags)
    except ConfigError as err:
        return _refuse(err)
    configure_logging(config.log_level, config.log_format)
    try:
        secrets = load_server_secrets(config, sources, args.config)
    except ConfigError as err:
        return _refuse(err)
    return asyncio.run(_run(config, args.ready_file, secrets))


def status_line(phase: str, epoch: int) -> str:
    """The leader's systemd STATUS= text: role, phase and epoch."""
    return f"role=leader phase={phase} epoch={epoch}"


def _write_ready_file(path: Path, values: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **values}))
    tmp.replace(path)


async def _run(config: CoordinatorConfig, ready_file: Path | None, secrets: ServerSecrets) -> int:
    import aetcd.exceptions

    from coordinator import state_machine as sm
    from coordinator.runtime import Coordinator, serve

    notifier = SystemdNotifier.from_environ()
    watchdog = asyncio.create_task(notifier.run_watchdog(), name="systemd-watchdog")

    def on_phase(entered: sm.PhaseEntered) -> None:
        notifier.status(status_line(entered.phase, entered.epoch))

    role = "standby"

    def on_standby(holder: dict[str, object]) -> None:
        nonlocal role
        role = "standby"
        if ready_file is not None:
            _write_ready_file(ready_file, {"role": "standby", "leader": holder})
        # Ready as a standby too: systemd must not time the start out while
        # another coordinator leads for days.
        notifier.ready(f"role=standby leader={holder.get('endpoint', '')}")

    def on_ready(coordinator: Coordinator) -> None:
        nonlocal role
        role = "leader"
        if ready_file is not None:
            _write_ready_file(
                ready_file,
                {
                    "role": "leader",
                    "listen_port": coordinator.listen_port,
                    "store_port": coordinator.store_port,
                    "metrics_port": coordinator.metrics_port,
                },
            )
        coordinator.phase_hooks.append(on_phase)
        machine = coordinator.machine
        notifier.ready(status_line(machine.phase, machine.epoch))

    task = asyncio.create_task(serve(config, on_ready, on_standby, secrets))
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        notifier.stopping(f"role={role} phase=stopping")
        task.cancel()
        loop.call_later(STOP_DEADLINE_S, stop_anyway)

    def stop_anyway() -> None:
        # A clean stop that hangs (seen once under CI load, cause unknown)
        # must not outlive systemd's patience: say what is stuck, then go.
        try:
            stuck = [
                f"{t.get_name()}: {''.join(traceback.format_stack(t.get_stack()[-1], limit=3))}"
                for t in asyncio.all_tasks(loop)
                if not t.done() and t.get_stack()
            ]
            log.error(
                "shutdown still running; exiting anyway",
                extra=fields(deadline_s=STOP_DEADLINE_S, tasks=stuck[:20]),
            )
            notifier.close()
            logging.shutdown()
        finally:
            os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await task
    except asyncio.CancelledError:
        log.info("stopped", extra=fields(cluster=config.cluster))
        return 0
    except (OSError, ValueError, aetcd.exceptions.ConnectionFailedError) as exc:
        log.error("cannot serve", extra=fields(error=str(exc), etcd=config.etcd))
        notifier.status(f"cannot serve: {exc}")
        return 1
    finally:
        with contextlib.suppress(Exception):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        notifier.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
