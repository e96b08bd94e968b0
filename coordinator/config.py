"""The coordinator's configuration: one pydantic model, validated at the edge.

Values come from four layers, each overriding the one before: the model's
defaults, a YAML file (`--config FILE`), environment variables
(`EP_COORDINATOR_<FIELD>`, e.g. `EP_COORDINATOR_WORLD_SIZE`), and command-line
flags given explicitly. `load_config` merges them and raises `ConfigError`
whose lines name where a bad value came from, the field and the problem.

Every layer goes through the same checks, and they are strict: a key given
twice in the file, a boolean where a number belongs (or a number where a
boolean does), a host that is no IP address or DNS name, an address that is
no `host:port` are refused rather than read some way.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from coordinator.state_machine import Phase

# One label of a DNS name. Underscores are not in RFC 1123, but resolvers
# (container networks, internal zones) hand them out, and they are harmless.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def host_problem(host: str) -> str | None:
    """Why `host` is neither an IP address nor a DNS name; None when it is one."""
    if not host:
        return "the host is empty"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    name = host.removesuffix(".")  # a fully qualified name may end in a dot
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return (
            f"{host!r} is not an IP address or a host name (dot-separated labels of "
            "letters, digits, '-' and '_')"
        )
    if labels[-1].isdigit():
        # 10.0.0.256 or 1.2.3: numbers that look like an address and are none.
        return f"{host!r} is not a valid IP address"
    return None


def parse_host_port(value: str) -> tuple[str, int]:
    """`host:port` or `[IPv6]:port` checked: the host an IP address or a DNS
    name, the port a number up to 65535. ValueError says what is wrong."""
    if value.startswith("["):
        inner, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError("expected host:port or [IPv6]:port")
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"{inner!r} in brackets is not an IPv6 address") from None
        host = inner
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError("expected host:port")
        if ":" in host:
            raise ValueError("expected host:port; an IPv6 address goes in brackets: [::1]:50051")
        problem = host_problem(host)
        if problem is not None:
            raise ValueError(problem)
    if not (port.isascii() and port.isdigit() and len(port) <= 5):
        raise ValueError(f"the port must be a number, not {port!r}")
    if int(port) > 65535:
        raise ValueError(f"port {int(port)} out of range (0 to 65535)")
    return host, int(port)


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def is_unspecified(host: str) -> bool:
    """0.0.0.0 or ::: every interface to listen on, no address to connect to."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface only. A host
    name other than `localhost` may resolve anywhere, so it is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _field_error(name: str, message: str, *related: str) -> PydanticCustomError:
    """A problem of several fields together, named after field `name`; its
    source is where `name` was set, else where the first of `related` was
    (see `_describe`)."""
    return PydanticCustomError(
        "field_combination", message, {"field": name, "related": ",".join(related)}
    )


def _not_a_boolean(value: object) -> object:
    # pydantic reads true as 1 where a number is expected: `world_size: true`
    # in a file would be a cluster of one, not the mistake it is.
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "a boolean is not a number")
    return value


def _not_a_number(value: object) -> object:
    # ... and 1 or 0.0 as a boolean. Strings ("true", "no") stay: the
    # environment gives nothing else.
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise PydanticCustomError("number_not_bool", "a number is not a boolean: use true or false")
    return value


Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]
Bool = Annotated[bool, BeforeValidator(_not_a_number)]

PROGRESS_INTERVAL_MAX_MS = 10_000


class CoordinatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cluster: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    world_size: Int = Field(ge=1, le=65536, description="number of rank slots in the cluster")
    listen: str = Field(default="127.0.0.1:50051", description="gRPC address (host:port)")
    etcd: str = Field(default="127.0.0.1:2379", description="etcd client endpoint (host:port)")
    metrics_listen: str = Field(
        default="",
        description="Prometheus /metrics address (host:port, plain HTTP); empty: not served. "
        "Loopback only, unless insecure_metrics_listen",
    )
    advertise_host: str = Field(
        default="",
        description="host agents reach this coordinator on (written to the leader key); "
        "empty: the listen host, or this host's name when listening on every interface",
    )
    leader_ttl_s: Int = Field(
        default=5,
        ge=1,
        le=300,
        description="leader lease TTL: how soon a standby takes over from a leader that "
        "died, and how long a leader cut off from etcd keeps leading",
    )
    store_host: str = Field(
        default="127.0.0.1",
        description="address ranks use to reach the rendezvous store this daemon hosts, and "
        "the only one it listens on. Loopback while listen is",
    )
    store_port: Int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    progress_interval_ms: Int = Field(
        default=50,
        ge=5,
        le=PROGRESS_INTERVAL_MAX_MS,
        description="how often a rank reports its iteration, at the least",
    )
    progress_reports_per_s: Int = Field(
        default=250,
        ge=1,
        le=1_000_000,
        description="the most progress reports a second the whole cluster sends: a large "
        "cluster's ranks report less often than progress_interval_ms",
    )
    hold_lead_s: Float = Field(
        default=0.05,
        gt=0,
        le=10,
        description="time a hold order first takes to arrive (widened after retargets)",
    )
    group_timeout_s: Float = Field(default=30.0, gt=0, le=3600)
    auto_rejoin: Bool = True
    fingerprint: str = Field(default="", description="expected engine fingerprint; empty: first")
    hang_timeout_s: Annotated[Float, Field(gt=0, le=86400)] | None = Field(
        default=30.0,
        description="a member whose iteration stands still this long in steady state, while "
        "its peers got further or failed their step, is declared hung; null: no check",
    )
    lease_rebind_s: Float = Field(
        default=3.0,
        gt=0,
        le=3600,
        description="how long a rank whose etcd lease expired while its session stayed open "
        "has to bind the session to a new lease before it is failed",
    )
    reconnect_window_s: Annotated[Float, Field(gt=0, le=3600)] | None = Field(
        default=None,
        description="how long a new leader waits for the members to reconnect before their "
        "silence counts against them; null: two leader leases",
    )
    phase_deadlines_s: dict[Phase, Annotated[Float, Field(gt=0)] | None] = Field(
        default_factory=dict,
        description="per-phase limits overriding the defaults; null: no limit",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    # --- transport security (coordinator.security) ---------------------------
    tls_cert_file: str = Field(
        default="", description="PEM certificate chain the gRPC port serves; empty: no TLS"
    )
    tls_key_file: str = Field(default="", description="PEM private key of tls_cert_file")
    tls_client_ca_file: str = Field(
        default="",
        description="PEM CA bundle client certificates must chain to; set: mutual TLS "
        "(every client must present a certificate it verifies)",
    )
    insecure_listen: Bool = Field(
        default=False,
        description="serve without TLS on a non-loopback listen address, on purpose",
    )
    insecure_metrics_listen: Bool = Field(
        default=False,
        description="serve /metrics (plain HTTP, no authentication) on a non-loopback "
        "metrics_listen address, on purpose",
    )
    admin_token_file: str = Field(
        default="",
        description="file holding the bearer token mutating admin calls must present",
    )
    admin_identities: list[str] = Field(
        default_factory=list,
        description="client certificate names (CN or SAN) allowed mutating admin calls "
        "under mutual TLS",
    )
    etcd_ca_file: str = Field(
        default="", description="PEM CA bundle to verify etcd's certificate; set: TLS to etcd"
    )
    etcd_cert_file: str = Field(
        default="", description="PEM client certificate for etcd; set: TLS to etcd"
    )
    etcd_key_file: str = Field(default="", description="PEM private key of etcd_cert_file")
    etcd_username: str = Field(default="", description="etcd user (etcd auth enabled)")
    etcd_password_file: str = Field(default="", description="file holding etcd_username's password")

    @field_validator("admin_identities", mode="before")
    @classmethod
    def _split_identities(cls, value: object) -> object:
        # The environment and flags give one string: names separated by commas.
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("admin_identities")
    @classmethod
    def _nonempty_identities(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise ValueError("an identity must not be empty")
        return value

    @model_validator(mode="after")
    def _security_fits_together(self) -> CoordinatorConfig:
        for cert, key in (("tls_cert_file", "tls_key_file"), ("etcd_cert_file", "etcd_key_file")):
            if bool(getattr(self, cert)) != bool(getattr(self, key)):
                missing = key if getattr(self, cert) else cert
                given = cert if missing == key else key
                raise _field_error(
                    missing, f"missing: {given} is set, and needs {missing} too", given
                )
        if bool(self.etcd_username) != bool(self.etcd_password_file):
            missing = "etcd_password_file" if self.etcd_username else "etcd_username"
            raise _field_error(
                missing,
                "missing: etcd_username and etcd_password_file go together",
                "etcd_username" if self.etcd_username else "etcd_password_file",
            )
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise _field_error(
                "tls_client_ca_file",
                "mutual TLS needs TLS: set tls_cert_file and tls_key_file (the server's own "
                "certificate) too",
            )
        if self.admin_identities and not self.tls_client_ca_file:
            raise _field_error(
                "admin_identities",
                "client certificate identities need mutual TLS: set tls_client_ca_file "
                "(or use admin_token_file)",
            )
        host = split_host_port(self.listen)[0]
        if not self.tls_cert_file and not self.insecure_listen and not is_loopback(host):
            raise _field_error(
                "listen",
                f"{host} is not a loopback address and no TLS is configured: anyone who "
                "reaches it could act as a rank or an operator. Set tls_cert_file and "
                "tls_key_file, or insecure_listen: true to serve without TLS on purpose",
            )
        if is_loopback(host) and not is_loopback(self.store_host):
            # The store (torch's TCPStore) has neither TLS nor authentication.
            # A coordinator only this host reaches has no ranks elsewhere to
            # serve it to; opening it would only expose it.
            raise _field_error(
                "store_host",
                f"{self.store_host} is not a loopback address while listen ({self.listen}) is: "
                "the rendezvous store has no authentication, and ranks on other hosts could "
                "not reach the coordinator anyway. Use a loopback store_host, or listen on "
                "the ranks' network too (with TLS, or insecure_listen: true)",
                "listen",
            )
        if self.metrics_listen and not self.insecure_metrics_listen:
            metrics_host = split_host_port(self.metrics_listen)[0]
            if not is_loopback(metrics_host):
                raise _field_error(
                    "metrics_listen",
                    f"{metrics_host} is not a loopback address: /metrics is plain HTTP "
                    "without authentication, and anyone who reaches it reads the cluster's "
                    "state. Scrape it on loopback (from another host: through a TLS proxy "
                    "on this one), or set insecure_metrics_listen: true to serve it there "
                    "on purpose",
                    "insecure_metrics_listen",
                )
        return self

    @property
    def rank_progress_interval_ms(self) -> int:
        """The interval ranks are told to report at: progress_interval_ms, or
        longer where the cluster would send more than progress_reports_per_s
        (each report costs the coordinator ~0.1-0.2 ms of CPU, BENCHMARKS.md
        "fanout"). The hold target does not suffer: the acks of the group
        builds just before a hold carry each rank's iteration."""
        spread = math.ceil(1000 * self.world_size / self.progress_reports_per_s)
        return min(max(self.progress_interval_ms, spread), PROGRESS_INTERVAL_MAX_MS)

    @property
    def tls(self) -> bool:
        """Whether the gRPC port serves TLS."""
        return bool(self.tls_cert_file)

    @property
    def mutual_tls(self) -> bool:
        return bool(self.tls_client_ca_file)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        parse_host_port(value)  # port 0: a free one
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _optional_listen_address(cls, value: str) -> str:
        return cls._listen_address(value) if value else value

    @field_validator("etcd")
    @classmethod
    def _connect_address(cls, value: str) -> str:
        host, port = parse_host_port(value)
        if port == 0:
            raise ValueError("port 0 is no port to connect to")
        if is_unspecified(host):
            raise ValueError(f"{host} means every interface, not a host to connect to")
        return value

    @field_validator("store_host")
    @classmethod
    def _store_host(cls, value: str) -> str:
        problem = host_problem(value)
        if problem is not None:
            raise ValueError(problem)
        if is_unspecified(value):
            # Ranks are told this address; the store listens on it alone.
            raise ValueError(
                f"{value} means every interface, not an address ranks can reach: give this "
                "host's address on the ranks' network"
            )
        return value

    @field_validator("advertise_host")
    @classmethod
    def _advertise_host(cls, value: str) -> str:
        problem = host_problem(value) if value else None
        if problem is not None:
            raise ValueError(problem)
        return value


ENV_PREFIX = "EP_COORDINATOR_"


class ConfigError(Exception):
    """Configuration that cannot be used; each problem is one line naming its source."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def env_var(name: str) -> str:
    """The environment variable that overrides field `name`."""
    return ENV_PREFIX + name.upper()


def flag(name: str) -> str:
    """The command-line flag that sets field `name`."""
    return "--" + name.replace("_", "-")


def read_config_file(path: Path) -> dict[str, Any]:
    """The YAML file's top-level mapping (an empty file is an empty mapping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc.reason}"]) from exc
    try:
        _refuse_duplicate_keys(path, yaml.compose(text, Loader=yaml.SafeLoader))
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(
            [f"{path}: the top level must be a mapping of field: value, not {type(doc).__name__}"]
        )
    bad_keys = [key for key in doc if not isinstance(key, str)]
    if bad_keys:
        raise ConfigError([f"{path}: invalid key {k!r}: keys must be strings" for k in bad_keys])
    return doc


def _refuse_duplicate_keys(path: Path, root: yaml.Node | None) -> None:
    """A key given twice in one mapping is an error naming both lines: YAML
    loaders keep the last value silently, and the first one may be the one
    that was meant (or reviewed)."""
    problems: list[str] = []
    seen_nodes: set[int] = set()  # an alias repeats a node; a recursive one loops

    def walk(node: yaml.Node, where: str) -> None:
        if id(node) in seen_nodes:
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Mark] = {}
            for key, value in node.value:
                if key.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: keys given here override the merged ones
                name = f"{where}.{key.value}" if where else str(key.value)
                if isinstance(key, yaml.ScalarNode):
                    mark = key.start_mark
                    earlier = first.setdefault((key.tag, key.value), mark)
                    if earlier is not mark:
                        problems.append(
                            f"{path}: invalid {name}: duplicate key at line {mark.line + 1}, "
                            f"column {mark.column + 1} (first at line {earlier.line + 1}); "
                            "a key may appear once"
                        )
                walk(value, name)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, f"{where}[{index}]")

    if root is not None:
        walk(root, "")
    if problems:
        raise ConfigError(problems)


def env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """Field values from `EP_COORDINATOR_<FIELD>` variables; unknown ones are errors."""
    fields = CoordinatorConfig.model_fields
    values: dict[str, str] = {}
    problems: list[str] = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name in fields:
            values[name] = environ[var]
        else:
            problems.append(f"environment {var}: unknown setting{_did_you_mean(name)}")
    if problems:
        raise ConfigError(problems)
    return values


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> tuple[CoordinatorConfig, dict[str, str]]:
    """Merge defaults < file < environment < flags; returns the config and each
    explicitly set field's source (the file's path, the variable or the flag)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        for key, value in read_config_file(path).items():
            values[key] = value
            sources[key] = str(path)
    for key, value in env_overrides(environ or {}).items():
        values[key] = value
        sources[key] = f"environment {env_var(key)}"
    for key, value in (flags or {}).items():
        values[key] = value
        sources[key] = flag(key)
    try:
        config = CoordinatorConfig(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources, path)) from exc
    return config, sources


def _describe(exc: ValidationError, sources: Mapping[str, str], path: Path | None) -> list[str]:
    problems: list[str] = []
    for err in exc.errors():
        name = ".".join(str(x) for x in err["loc"]) or "configuration"
        top = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "field_combination":
            # A problem of several fields together, named after the one to change.
            ctx = err.get("ctx", {})
            name = str(ctx.get("field", name))
            blamed = [name, *filter(None, str(ctx.get("related", "")).split(","))]
            source = next((sources[f] for f in blamed if f in sources), None) or (
                str(path) if path is not None else "configuration"
            )
            problems.append(f"{source}: invalid {name}: {err['msg']}")
            continue
        if err["type"] == "extra_forbidden":
            problem = f"unknown key{_did_you_mean(top)}"
        elif err["type"] == "missing":
            problem = f"missing: set it as {top}: in the file, {env_var(top)} or {flag(top)}"
        else:
            # A validator's ValueError reads "Value error, <what we said>".
            problem = f"{err['msg'].removeprefix('Value error, ')} (got {err['input']!r})"
        source = sources.get(top) or (str(path) if path is not None else "configuration")
        problems.append(f"{source}: invalid {name}: {problem}")
    return problems


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, list(CoordinatorConfig.model_fields), n=1)
    return f"; did you mean {close[0]}?" if close else ""
