"""Transport security end to end: TLS and mutual TLS on the gRPC port, the
admin credential (bearer token or an admin's client certificate), sessions
bound to their rank's lease, etcd over TLS with authentication, and the gRPC
health following etcd.

Real coordinator processes, real agents, real epctl and real etcd servers
(one of them serving TLS); every CA and certificate is made here
(tests/pki.py) and lives in the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import aetcd
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator import etcd_keys
from coordinator.security import GUARDED_METHODS, ClientTls, EtcdAccess
from epctl.local_etcd import HOST, LocalEtcd, free_port
from protos.ep_recovery.v1 import admin_pb2, worker_pb2, worker_pb2_grpc
from tests.agent_harness import (
    CoordinatorProcess,
    coordinator_env,
    key_lease,
    listening_addresses,
    ring_placement,
    thread_cluster,
    wait_until,
)
from tests.pki import CertificateAuthority, Issued
from tests.test_observability import sample, scrape

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2


def epctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epctl.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env if env is not None else _env_without_epctl(),
    )


def _env_without_epctl(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPCTL_")}
    env.update(overrides)
    return env


def coordinator_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env if env is not None else coordinator_env(),
    )


def write_token(path: Path, token: str) -> Path:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def server_args(server: Issued) -> tuple[str, ...]:
    return ("--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key))


# --- the configuration refuses what would be unsafe or cannot work --------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Issued | Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory, "main")
    other = CertificateAuthority(directory, "other")
    return {
        "ca": ca.cert,
        "server": ca.server(),
        "other_server": other.server("other-coordinator"),
        "token": write_token(directory / "token", "s3cret-token"),
        "empty": write_token(directory / "empty", ""),
    }


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("listen: '0.0.0.0:50051'\n", ["invalid listen", "not a loopback", "insecure_listen"]),
        ("listen: 'coordinator.example:50051'\n", ["invalid listen", "tls_cert_file"]),
        ("tls_cert_file: {server.cert}\n", ["invalid tls_key_file", "missing"]),
        (
            "tls_cert_file: {server.cert}\ntls_key_file: {other_server.key}\n",
            ["invalid tls_cert_file", "not a PEM certificate chain and its"],
        ),
        (
            "tls_cert_file: {server.cert}\ntls_key_file: {server.key}\nadmin_identities: [ops]\n",
            ["invalid admin_identities", "tls_client_ca_file"],
        ),
        ("tls_client_ca_file: {ca}\n", ["invalid tls_client_ca_file", "needs TLS"]),
        ("admin_token_file: /nonexistent/token\n", ["invalid admin_token_file", "No such file"]),
        ("admin_token_file: {empty}\n", ["invalid admin_token_file", "is empty"]),
        ("tls_cert_file: {token}\ntls_key_file: {server.key}\n", ["invalid tls_cert_file"]),
        ("etcd_username: root\n", ["invalid etcd_password_file", "go together"]),
        ("etcd_ca_file: {token}\n", ["invalid etcd_ca_file", "no PEM CA certificate"]),
        (
            "metrics_listen: '0.0.0.0:9464'\n",
            ["invalid metrics_listen", "not a loopback", "insecure_metrics_listen"],
        ),
        (
            "tls_cert_file: {server.cert}\ntls_key_file: {server.key}\n"
            "metrics_listen: '10.1.2.3:9464'\n",
            ["invalid metrics_listen", "plain HTTP", "insecure_metrics_listen"],
        ),
        ("store_host: 10.1.2.3\n", ["invalid store_host", "no authentication", "listen"]),
        ("store_host: 0.0.0.0\n", ["invalid store_host", "every interface"]),
    ],
    ids=[
        "wildcard-without-tls",
        "hostname-without-tls",
        "cert-without-key",
        "key-of-another-cert",
        "identities-without-mtls",
        "client-ca-without-tls",
        "token-file-missing",
        "token-file-empty",
        "cert-not-pem",
        "etcd-user-without-password",
        "etcd-ca-not-pem",
        "metrics-wildcard",
        "metrics-beyond-loopback-with-tls",
        "store-beyond-loopback-grpc-on-loopback",
        "store-wildcard",
    ],
)
def test_check_config_refuses_unsafe_or_broken_security(
    tmp_path: Path, pki: dict[str, Issued | Path], content: str, expected: list[str]
) -> None:
    path = tmp_path / "coordinator.yaml"
    path.write_text("cluster: c\nworld_size: 2\n" + content.format(**pki))
    result = coordinator_cli("check-config", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(path) in result.stderr
    for text in expected:
        assert text in result.stderr
    assert result.stdout == ""


def test_non_loopback_listen_needs_tls_or_an_explicit_opt_out(
    tmp_path: Path, pki: dict[str, Issued | Path]
) -> None:
    server = pki["server"]
    assert isinstance(server, Issued)
    path = tmp_path / "coordinator.yaml"
    path.write_text("cluster: c\nworld_size: 2\nlisten: '0.0.0.0:50051'\n")
    # The environment and a flag are named as the source.
    env = coordinator_env(EP_COORDINATOR_LISTEN="10.1.2.3:50051")
    by_env = coordinator_cli("check-config", str(path), env=env)
    assert by_env.returncode == 2
    assert "environment EP_COORDINATOR_LISTEN: invalid listen" in by_env.stderr
    run = coordinator_cli("--cluster", "c", "--world-size", "2", "--listen", "0.0.0.0:0")
    assert run.returncode == 2
    assert "--listen: invalid listen" in run.stderr
    # The explicit opt-out, or TLS, makes it valid.
    opted = coordinator_cli(
        "check-config", str(path), env=coordinator_env(EP_COORDINATOR_INSECURE_LISTEN="true")
    )
    assert opted.returncode == 0, opted.stderr
    path.write_text(
        "cluster: c\nworld_size: 2\nlisten: '0.0.0.0:50051'\n"
        f"tls_cert_file: {server.cert}\ntls_key_file: {server.key}\n"
        f"admin_token_file: {pki['token']}\n"
    )
    with_tls = coordinator_cli("check-config", str(path))
    assert with_tls.returncode == 0, with_tls.stderr


def test_metrics_and_store_beyond_loopback_need_an_explicit_choice(tmp_path: Path) -> None:
    """Each source is named; the opt-out (or serving gRPC beyond loopback) makes it valid."""
    path = tmp_path / "coordinator.yaml"
    path.write_text("cluster: c\nworld_size: 2\n")
    run = coordinator_cli("--cluster", "c", "--world-size", "2", "--metrics-listen", "0.0.0.0:0")
    assert run.returncode == 2
    assert "--metrics-listen: invalid metrics_listen" in run.stderr
    assert "insecure_metrics_listen" in run.stderr
    metrics_env = coordinator_env(EP_COORDINATOR_METRICS_LISTEN="0.0.0.0:9464")
    by_env = coordinator_cli("check-config", str(path), env=metrics_env)
    assert by_env.returncode == 2
    assert "environment EP_COORDINATOR_METRICS_LISTEN: invalid metrics_listen" in by_env.stderr
    metrics_env["EP_COORDINATOR_INSECURE_METRICS_LISTEN"] = "true"
    opted = coordinator_cli("check-config", str(path), env=metrics_env)
    assert opted.returncode == 0, opted.stderr

    store = coordinator_cli("--cluster", "c", "--world-size", "2", "--store-host", "10.1.2.3")
    assert store.returncode == 2
    assert "--store-host: invalid store_host" in store.stderr
    store_env = coordinator_env(EP_COORDINATOR_STORE_HOST="10.1.2.3")
    by_env = coordinator_cli("check-config", str(path), env=store_env)
    assert by_env.returncode == 2
    assert "environment EP_COORDINATOR_STORE_HOST: invalid store_host" in by_env.stderr
    # gRPC beyond loopback too (here without TLS, on purpose): the store may follow.
    path.write_text("cluster: c\nworld_size: 2\nlisten: '0.0.0.0:0'\ninsecure_listen: true\n")
    beyond = coordinator_cli("check-config", str(path), env=store_env)
    assert beyond.returncode == 0, beyond.stderr


def test_every_listener_binds_where_it_is_configured(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    """gRPC, the rendezvous store and /metrics each listen on their own
    configured address and nowhere else (torch's TCPStore alone would take
    every interface). Other loopback addresses than 127.0.0.1 show the
    address is the configured one, not a default."""
    with thread_cluster(
        tmp_path, etcd, cluster_name, WORLD,
        "--store-host", "127.0.0.2", "--metrics-listen", "127.0.0.3:0",
    ) as (coord, _ranks):  # fmt: skip
        # The cluster formed: the ranks built their groups through the store there.
        ready = json.loads(coord.ready_file.read_text())
        assert listening_addresses(coord.proc.pid) == {
            ("127.0.0.1", ready["listen_port"]),
            ("127.0.0.2", ready["store_port"]),
            ("127.0.0.3", ready["metrics_port"]),
        }


def test_metrics_beyond_loopback_when_asked_for(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    coord = CoordinatorProcess(
        tmp_path, cluster_name, WORLD, etcd,
        "--metrics-listen", "0.0.0.0:0", "--insecure-metrics-listen",
    )  # fmt: skip
    try:
        port = metrics_port(coord)
        assert ("0.0.0.0", port) in listening_addresses(coord.proc.pid)
        assert sample(scrape(port), "ep_coordinator_epoch") is not None
        assert "serving metrics beyond loopback" in coord.log_tail()
    finally:
        coord.stop()


def test_every_mutating_admin_method_is_guarded() -> None:
    assert {m.rsplit("/", 1)[1] for m in GUARDED_METHODS} == {
        "AbortOperation",
        "SetAutoRejoin",
        "Drain",
        "Admit",
    }


# --- TLS, the bearer token ------------------------------------------------------


def test_tls_cluster_with_an_admin_token(
    tmp_path: Path, etcd: str, cluster_name: str, pki: dict[str, Issued | Path]
) -> None:
    server, ca, token = pki["server"], pki["ca"], pki["token"]
    assert isinstance(server, Issued) and isinstance(ca, Path) and isinstance(token, Path)
    tls = ClientTls(ca_file=str(ca))
    with thread_cluster(
        tmp_path, etcd, cluster_name, WORLD,
        *server_args(server), "--admin-token-file", str(token), "--metrics-listen", "127.0.0.1:0",
        agent_options=lambda rank: {"tls": tls},
        tls=tls,
    ) as (coord, _ranks):  # fmt: skip
        at = ("--endpoint", coord.endpoint)
        # Plaintext gets nowhere: the port speaks TLS only.
        with grpc.insecure_channel(coord.endpoint) as plain:
            health = health_pb2_grpc.HealthStub(plain)
            with pytest.raises(grpc.RpcError) as refused:
                health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA does not accept the server.
        wrong_ca = epctl("status", *at, "--ca", str(pki["other_server"].cert))  # type: ignore[union-attr]
        assert wrong_ca.returncode == 3, wrong_ca.stderr
        assert "TLS problem" in wrong_ca.stderr

        # Read-only calls need TLS, not the token.
        status = epctl("status", *at, "--ca", str(ca))
        assert status.returncode == 0, status.stderr
        assert f"cluster {cluster_name}" in status.stdout
        ops = epctl("ops", *at, env=_env_without_epctl(EPCTL_CA=str(ca)))
        assert ops.returncode == 0, ops.stderr

        # A mutating call: without the token, with a wrong one, then with it.
        bare = epctl("auto-rejoin", "off", *at, "--ca", str(ca))
        assert bare.returncode == 6, bare.stderr
        assert "UNAUTHENTICATED" in bare.stderr
        assert "needs an admin credential" in bare.stderr and "--token-file" in bare.stderr
        wrong = write_token(tmp_path / "wrong", "not-the-token")
        bad = epctl("auto-rejoin", "off", *at, "--ca", str(ca), "--token-file", str(wrong))
        assert bad.returncode == 6 and "not the admin token" in bad.stderr, bad.stderr
        env = _env_without_epctl(EPCTL_CA=str(ca), EPCTL_TOKEN_FILE=str(token))
        good = epctl("auto-rejoin", "off", *at, env=env)
        assert (good.returncode, good.stdout.strip()) == (0, "automatic rejoin is off"), good.stderr
        # The harness's own stub has no token: refused the same way by the server.
        with pytest.raises(grpc.RpcError) as denied:
            coord.admin.Drain(admin_pb2.DrainRequest(request_id="x", rank=1), timeout=5)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED

        families = scrape(metrics_port(coord))
        denials = "ep_coordinator_admin_calls_denied_total"
        assert sample(families, denials, code="UNAUTHENTICATED") == 3
        assert sample(families, denials, code="PERMISSION_DENIED") == 0
        assert sample(families, "ep_coordinator_etcd_reachable") == 1
        log = coord.log_tail()
        assert "admin call denied" in log and "s3cret-token" not in log
        assert "serving without TLS" not in log


def metrics_port(coord: CoordinatorProcess) -> int:
    return int(json.loads(coord.ready_file.read_text())["metrics_port"])


# --- mutual TLS, admin identities -----------------------------------------------


def test_mutual_tls_admits_only_certificates_of_its_ca_and_admins_by_name(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    ca = CertificateAuthority(tmp_path / "pki", "cluster")
    foreign = CertificateAuthority(tmp_path / "pki", "foreign")
    server = ca.server()
    ranks = {r: ca.issue(f"rank-{r}", client=True) for r in range(WORLD)}
    by_cn = ca.issue("ops-admin", client=True)
    by_san = ca.issue("alice", dns=("admin.ops.example",), client=True)
    impostor = foreign.issue("ops-admin", client=True)  # the right name, the wrong CA

    def rank_tls(rank: int) -> dict[str, ClientTls]:
        cert = ranks[rank]
        return {"tls": ClientTls(str(ca.cert), str(cert.cert), str(cert.key))}

    with thread_cluster(
        tmp_path, etcd, cluster_name, WORLD,
        *server_args(server), "--tls-client-ca-file", str(ca.cert),
        "--admin-identities", "ops-admin,admin.ops.example",
        agent_options=rank_tls,
        tls=ClientTls(str(ca.cert), str(by_cn.cert), str(by_cn.key)),
    ) as (coord, _ranks):  # fmt: skip
        at = ("--endpoint", coord.endpoint, "--ca", str(ca.cert))

        def as_holder(cert: Issued | None, *args: str) -> subprocess.CompletedProcess[str]:
            creds = ("--cert", str(cert.cert), "--key", str(cert.key)) if cert else ()
            return epctl(*args, *at, *creds)

        # No client certificate, or one of another CA: the handshake fails.
        for holder in (None, impostor):
            result = as_holder(holder, "status")
            assert result.returncode == 3, result.stderr
            assert "UNAVAILABLE" in result.stderr
        # A certificate of the CA: read-only calls go through...
        rank_cert = ranks[0]
        status = as_holder(rank_cert, "status", "-o", "json")
        assert status.returncode == 0, status.stderr
        # ... mutating ones only for an admin, named by CN or by SAN.
        denied = as_holder(rank_cert, "auto-rejoin", "off")
        assert denied.returncode == 6, denied.stderr
        assert "PERMISSION_DENIED" in denied.stderr
        assert "rank-0 is not in admin_identities" in denied.stderr
        for admin in (by_cn, by_san):
            allowed = as_holder(admin, "auto-rejoin", "off")
            assert allowed.returncode == 0, allowed.stderr
        # The harness's admin stub holds the ops-admin certificate.
        reply = coord.admin.SetAutoRejoin(
            admin_pb2.SetAutoRejoinRequest(request_id="stub", enabled=True), timeout=10
        )
        assert reply.message == "automatic rejoin is on"
        log = coord.log_tail()
        assert "certificate admin.ops.example" in log or "certificate alice" in log


# --- a session speaks for its own rank's lease only ------------------------------


def _lease_of(etcd: str, cluster: str, rank: int) -> int:
    return key_lease(etcd, cluster, rank)


def _open_session(endpoint: str, hello: worker_pb2.Hello) -> grpc.RpcError | object:
    """Send `hello`; the first reply, or the error the session ended with."""
    done = threading.Event()

    def requests() -> Iterator[worker_pb2.WorkerMessage]:
        yield worker_pb2.WorkerMessage(hello=hello)
        done.wait(10)

    with grpc.insecure_channel(endpoint) as channel:
        stream = worker_pb2_grpc.WorkerServiceStub(channel).Session(requests(), timeout=10)
        try:
            return next(stream)
        except grpc.RpcError as exc:
            return exc
        finally:
            done.set()
            stream.cancel()


def test_a_hello_forged_from_status_and_etcd_cannot_take_a_ranks_session(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    """Everything an attacker can read (GetStatus without a credential, and
    even rank 1's key in etcd: its lease and incarnation) copied into rank 1's
    reconnect: without the proof only rank 1's process holds, it is refused
    (UNAUTHENTICATED), and rank 1 keeps its session and serves on."""
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD) as (coord, ranks):
        victim = ranks[1]
        before = coord.status()
        [seen] = [r for r in before.ranks if r.rank == 1]
        assert seen.incarnation == victim.agent.incarnation  # public, proves nothing
        assert "lease_id" not in admin_pb2.RankStatus.DESCRIPTOR.fields_by_name
        lease_1 = _lease_of(etcd, cluster_name, 1)
        forged = worker_pb2.Hello(
            cluster=cluster_name,
            rank=1,
            fingerprint=victim.adapter.fingerprint(),
            lease_id=lease_1,
            incarnation=seen.incarnation,
            placement=ring_placement(WORLD).to_proto(),
        )
        for proof in ("", "0" * 64, victim.agent._lease.value["proof_sha256"]):  # type: ignore[union-attr]
            forged.proof = proof  # none, a guess, the digest etcd holds
            refused = _open_session(coord.endpoint, forged)
            assert isinstance(refused, grpc.RpcError), refused
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, refused.details()
        iteration = victim.adapter.iteration
        wait_until(lambda: victim.adapter.iteration > iteration + 20, 10, "rank 1 to go on")
        after = coord.status()
        assert (after.epoch, list(after.members)) == (before.epoch, list(before.members))
        assert [r.state for r in after.ranks] == [admin_pb2.RANK_STATE_SERVING] * WORLD
        assert not after.failures and victim.agent._fatal is None


def test_a_session_claiming_another_ranks_lease_is_refused(
    tmp_path: Path, etcd: str, cluster_name: str
) -> None:
    with thread_cluster(tmp_path, etcd, cluster_name, WORLD) as (coord, ranks):
        victim = ranks[1]
        lease_0, lease_1 = (_lease_of(etcd, cluster_name, r) for r in range(WORLD))
        assert lease_0 and lease_1 and lease_0 != lease_1
        before = coord.status()
        # Rank 1's reconnect, as its own process would send it, but on rank 0's
        # lease: without the check it would take over rank 1's session.
        hijack = worker_pb2.Hello(
            cluster=cluster_name,
            rank=1,
            fingerprint=victim.adapter.fingerprint(),
            lease_id=lease_0,
            incarnation=victim.agent.incarnation,
            placement=ring_placement(WORLD).to_proto(),
        )
        refused = _open_session(coord.endpoint, hijack)
        assert isinstance(refused, grpc.RpcError), refused
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "does not hold rank 1's key" in (refused.details() or "")
        assert f"{lease_1:x}" not in (refused.details() or "")  # no lease id given away
        # A made-up lease id: refused the same way.
        hijack.lease_id = 0x7E57
        refused = _open_session(coord.endpoint, hijack)
        assert isinstance(refused, grpc.RpcError)
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        # Nothing moved: rank 1 keeps its session and keeps serving.
        after = coord.status()
        assert (after.epoch, list(after.members)) == (before.epoch, list(before.members))
        iteration = victim.adapter.iteration
        wait_until(lambda: victim.adapter.iteration > iteration + 5, 10, "rank 1 to go on")
        assert coord.phase() == "steady"
        assert [r.state for r in coord.status().ranks] == [admin_pb2.RANK_STATE_SERVING] * WORLD
        # This coordinator has no TLS (on loopback), and says so.
        assert "serving without TLS" in coord.log_tail()


# --- etcd over TLS, with a client certificate and authentication ------------------


class TlsEtcd(LocalEtcd):
    """A LocalEtcd serving its clients over TLS, requiring client certificates
    (--client-cert-auth). /health is served on a plaintext metrics URL, which
    LocalEtcd's start-up check polls."""

    def __init__(self, server: Issued, ca: Path) -> None:
        super().__init__(name="tls")
        self._server = server
        self._ca = ca
        self._metrics_port = free_port()

    @property
    def client_url(self) -> str:  # where LocalEtcd polls /health
        return f"http://{HOST}:{self._metrics_port}"

    def _argv(self, binary: str) -> list[str]:
        https = f"https://{self.endpoint}"
        argv = super()._argv(binary)
        for flag in ("--listen-client-urls", "--advertise-client-urls"):
            argv[argv.index(flag) + 1] = https
        return [
            *argv,
            "--cert-file", str(self._server.cert),
            "--key-file", str(self._server.key),
            "--trusted-ca-file", str(self._ca),
            "--client-cert-auth",
            "--listen-metrics-urls", self.client_url,
        ]  # fmt: skip


async def _enable_auth(endpoint: str, access: EtcdAccess, password: str, cn_user: str) -> None:
    """etcd's authentication on, with a root user (what `etcdctl user add root`,
    `etcdctl auth enable` do) and a user without a password whom etcd knows
    by a client certificate's CN."""
    client = etcd_keys.new_client(*etcd_keys.split_endpoint(endpoint), access=access)
    try:
        await client.connect()
        auth = aetcd.rpc.AuthStub(client.channel)
        await auth.RoleAdd(aetcd.rpc.AuthRoleAddRequest(name="root"))
        await auth.UserAdd(aetcd.rpc.AuthUserAddRequest(name="root", password=password))
        await auth.UserGrantRole(aetcd.rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.UserAdd(
            aetcd.rpc.AuthUserAddRequest(
                name=cn_user, options=aetcd.rpc.UserAddOptions(no_password=True)
            )
        )
        await auth.UserGrantRole(aetcd.rpc.AuthUserGrantRoleRequest(user=cn_user, role="root"))
        await auth.AuthEnable(aetcd.rpc.AuthEnableRequest())
    finally:
        await client.close()


async def _try_put(endpoint: str, access: EtcdAccess | None) -> str:
    client = etcd_keys.new_client(*etcd_keys.split_endpoint(endpoint), timeout_s=5, access=access)
    try:
        await client.put(b"/ep-recovery-test/probe", b"1")
        return "ok"
    except Exception as exc:
        return type(exc).__name__
    finally:
        with contextlib.suppress(Exception):
            await client.close()


def test_coordinator_and_agents_reach_etcd_over_tls_as_etcd_users(
    tmp_path: Path, cluster_name: str
) -> None:
    """The coordinator logs in with a user and password, the agents as the
    user their client certificate's CN names (etcd's --client-cert-auth)."""
    ca = CertificateAuthority(tmp_path / "pki", "etcd")
    client_cert = ca.issue("ep-recovery", client=True)  # CN: no such etcd user
    agent_cert = ca.issue("ep-agent", client=True)  # CN: an etcd user
    password = write_token(tmp_path / "etcd-password", uuid.uuid4().hex)
    cert_only = EtcdAccess(str(ca.cert), str(client_cert.cert), str(client_cert.key))
    access = EtcdAccess(
        str(ca.cert), str(client_cert.cert), str(client_cert.key), "root", str(password)
    )
    agents = EtcdAccess(str(ca.cert), str(agent_cert.cert), str(agent_cert.key))
    with TlsEtcd(ca.server("etcd"), ca.cert) as server:
        endpoint = server.endpoint
        asyncio.run(_enable_auth(endpoint, cert_only, password.read_text().strip(), "ep-agent"))
        # Plaintext, no client certificate, a certificate naming no user, or a
        # wrong password: etcd refuses each.
        assert asyncio.run(_try_put(endpoint, None)) != "ok"
        assert asyncio.run(_try_put(endpoint, EtcdAccess(ca_file=str(ca.cert)))) != "ok"
        assert asyncio.run(_try_put(endpoint, cert_only)) != "ok"
        wrong = write_token(tmp_path / "wrong", "wrong")
        refused = EtcdAccess(
            str(ca.cert), str(client_cert.cert), str(client_cert.key), "root", str(wrong)
        )
        assert asyncio.run(_try_put(endpoint, refused)) != "ok"
        assert asyncio.run(_try_put(endpoint, access)) == "ok"
        assert asyncio.run(_try_put(endpoint, agents)) == "ok"

        etcd_args = (
            "--etcd-ca-file", str(ca.cert),
            "--etcd-cert-file", str(client_cert.cert),
            "--etcd-key-file", str(client_cert.key),
            "--etcd-username", "root",
            "--etcd-password-file", str(password),
        )  # fmt: skip
        with thread_cluster(
            tmp_path, endpoint, cluster_name, WORLD, *etcd_args,
            agent_options=lambda rank: {"etcd_access": agents},
        ) as (coord, ranks):  # fmt: skip
            assert coord.status().members == list(range(WORLD))
            # The leases and the record live in the TLS etcd: a rank that
            # stops is seen leaving through it.
            ranks.pop(1).stop()
            wait_until(lambda: coord.phase() == "degraded", 30, "the cluster to shrink")


def test_etcd_access_reaches_the_client() -> None:
    """Where no TLS etcd is needed: the options land on the aetcd client as
    aetcd reads them (a real client object, never connected)."""
    plain = etcd_keys.new_client("127.0.0.1", 2379)
    assert type(plain) is aetcd.Client
    assert (plain._username, plain._password) == (None, None)
    assert plain._options == etcd_keys.CHANNEL_OPTIONS


def test_etcd_access_reaches_the_client_with_a_user(tmp_path: Path) -> None:
    password = write_token(tmp_path / "pw", "pa55")
    user = etcd_keys.new_client(
        "127.0.0.1", 2379, access=EtcdAccess(username="u", password_file=str(password))
    )
    assert type(user) is aetcd.Client
    assert (user._username, user._password) == ("u", "pa55")
    ca = CertificateAuthority(tmp_path, "x")
    tls = etcd_keys.new_client("127.0.0.1", 2379, access=EtcdAccess(ca_file=str(ca.cert)))
    assert isinstance(tls, etcd_keys.TlsClient)
    assert tls._options == etcd_keys.CHANNEL_OPTIONS and tls._username is None
    with pytest.raises(ValueError, match="cannot read"):
        etcd_keys.new_client(
            "127.0.0.1", 2379, access=EtcdAccess(ca_file=str(tmp_path / "missing.pem"))
        )


# --- gRPC health follows etcd -------------------------------------------------------


def _health(endpoint: str) -> int:
    with grpc.insecure_channel(endpoint) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="ep_recovery.v1.AdminService"), timeout=2
            )
        except grpc.RpcError:
            return -1
        return int(reply.status)


def test_health_is_not_serving_while_etcd_does_not_answer(
    tmp_path: Path, cluster_name: str
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    # An etcd of its own, frozen for less than the leader TTL: the leader
    # keeps leading, but says it cannot serve while etcd is away.
    with LocalEtcd(name="health") as own:
        coord = CoordinatorProcess(
            tmp_path, cluster_name, WORLD, own.endpoint,
            "--leader-ttl-s", "5", "--metrics-listen", "127.0.0.1:0",
        )  # fmt: skip
        assert own.pid is not None
        stopped = False
        try:
            assert _health(coord.endpoint) == serving
            os.kill(own.pid, signal.SIGSTOP)
            stopped = True
            # The leader lease refreshes every TTL/3 and one unanswered for
            # 1 s counts: NOT_SERVING within about 2.7 s, well inside the TTL.
            wait_until(lambda: _health(coord.endpoint) == not_serving, 4, "NOT_SERVING")
            assert sample(scrape(metrics_port(coord)), "ep_coordinator_etcd_reachable") == 0
            os.kill(own.pid, signal.SIGCONT)
            stopped = False
            wait_until(lambda: _health(coord.endpoint) == serving, 10, "SERVING again")
            assert sample(scrape(metrics_port(coord)), "ep_coordinator_etcd_reachable") == 1
            # Still the leader: the freeze was shorter than its lease.
            assert coord.proc.poll() is None and coord.status().leader
            log = coord.log_tail()
            assert "etcd unreachable" in log and "etcd reachable again" in log
        finally:
            if stopped:
                os.kill(own.pid, signal.SIGCONT)
            coord.stop()
