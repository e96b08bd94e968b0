"""Transport security and the admin credential, in one place.

- The gRPC port serves TLS with `tls_cert_file`/`tls_key_file`, and mutual TLS
  with `tls_client_ca_file` (every client, rank or operator, must present a
  certificate that chains to it). Without TLS the daemon listens on loopback
  only, unless `insecure_listen` says otherwise (coordinator.config).
- Mutating admin calls (every AdminService method but the read-only ones)
  need an admin credential when one is configured: the bearer token of
  `admin_token_file` in `authorization: Bearer ...` metadata, or, under mutual
  TLS, a client certificate whose CN or a SAN is in `admin_identities`.
  `AdminAuth` is the server interceptor that checks it.
- Clients (agents, epctl) describe their side with `ClientTls`; etcd clients
  with `EtcdAccess` (coordinator.etcd_keys.new_client uses it).

Files are read once, at start: rotate a certificate or the token by
restarting the process (a standby takes over meanwhile).
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from coordinator.config import ConfigError, CoordinatorConfig
from coordinator.logs import fields
from protos.ep_recovery.v1 import admin_pb2

log = logging.getLogger(__name__)

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
# AdminService methods anyone who may connect may call. Every other method is
# mutating and needs the admin credential, so a method added later is guarded
# until someone decides otherwise.
READ_ONLY_ADMIN_METHODS = frozenset({"GetStatus", "ListOperations", "GetOperation", "WatchEvents"})
GUARDED_METHODS = frozenset(
    f"/{ADMIN_SERVICE.full_name}/{method.name}"
    for method in ADMIN_SERVICE.methods
    if method.name not in READ_ONLY_ADMIN_METHODS
)
AUTHORIZATION = "authorization"
BEARER = "bearer"


# --- reading files ------------------------------------------------------------


class SecretFileError(ValueError):
    """A configured file that cannot be used; the message says why."""


def read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def read_token(path: str) -> str:
    """The one-line secret in `path` (a token or a password), surrounding
    whitespace removed. It travels in gRPC metadata, so printable ASCII only."""
    raw = read_file(path)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SecretFileError(f"{path} must hold printable ASCII only") from None
    if not token:
        raise SecretFileError(f"{path} is empty")
    if not token.isprintable() or any(c.isspace() for c in token):
        raise SecretFileError(f"{path} must hold one token: printable ASCII, no spaces")
    return token


def load_cert_and_key(cert_file: str, key_file: str) -> tuple[bytes, bytes]:
    """The PEM certificate chain and its key, checked to parse and belong
    together: grpc would only find out at the first handshake, which would
    then fail every time."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for path in (cert_file, key_file):
        read_file(path)  # a missing file named as such, not as an SSL error
    try:
        # A password callback that gives none: an encrypted key is refused
        # instead of OpenSSL prompting on the terminal.
        context.load_cert_chain(cert_file, key_file, password=lambda: b"")
    except ssl.SSLError as exc:
        raise SecretFileError(
            f"{cert_file} and {key_file} are not a PEM certificate chain and its "
            f"unencrypted private key: {exc.reason or exc}"
        ) from exc
    return read_file(cert_file), read_file(key_file)


def load_ca(ca_file: str) -> bytes:
    """A PEM CA bundle, checked to hold at least one certificate."""
    read_file(ca_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise SecretFileError(
            f"{ca_file} holds no PEM CA certificate: {exc.reason or exc}"
        ) from exc
    return read_file(ca_file)


def warn_if_readable_by_others(path: str, what: str) -> None:
    """Keys and tokens should be readable by their owner only."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "secret file readable by others",
            extra=fields(path=path, what=what, mode=oct(stat.S_IMODE(mode))),
        )


# --- the server's side ----------------------------------------------------------


@dataclass(frozen=True)
class ServerSecrets:
    """What the files of a CoordinatorConfig hold, read at start."""

    cert_chain: bytes = b""
    private_key: bytes = b""
    client_ca: bytes = b""
    admin_token: str = ""
    admin_identities: frozenset[str] = frozenset()

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS (mutual when a client CA is set) for the gRPC port; None: plaintext."""
        if not self.cert_chain:
            return None
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca or None,
            require_client_auth=bool(self.client_ca),
        )

    def admin_auth(self) -> AdminAuth | None:
        """The interceptor for mutating admin calls; None when no credential is set."""
        if not self.admin_token and not self.admin_identities:
            return None
        return AdminAuth(self.admin_token, self.admin_identities)


def load_server_secrets(
    config: CoordinatorConfig,
    sources: Mapping[str, str] | None = None,
    path: Path | None = None,
) -> ServerSecrets:
    """Read and check every file the configuration names (the etcd ones too,
    which each etcd client reads again). ConfigError names the source, the
    field and the problem, as load_config does."""
    sources = sources or {}
    problems: list[str] = []

    def attempt(name: str, check: Callable[[], Any]) -> Any:
        try:
            return check()
        except SecretFileError as exc:
            source = sources.get(name) or (str(path) if path is not None else "configuration")
            problems.append(f"{source}: invalid {name}: {exc}")
            return None

    secrets: dict[str, Any] = {"admin_identities": frozenset(config.admin_identities)}
    if config.tls_cert_file:
        pair = attempt(
            "tls_cert_file", lambda: load_cert_and_key(config.tls_cert_file, config.tls_key_file)
        )
        if pair is not None:
            secrets["cert_chain"], secrets["private_key"] = pair
    if config.tls_client_ca_file:
        secrets["client_ca"] = attempt(
            "tls_client_ca_file", lambda: load_ca(config.tls_client_ca_file)
        )
    if config.admin_token_file:
        secrets["admin_token"] = attempt(
            "admin_token_file", lambda: read_token(config.admin_token_file)
        )
    # The etcd files are read again by every etcd client; checked here so that
    # check-config and the start name them rather than the first etcd call.
    if config.etcd_ca_file:
        attempt("etcd_ca_file", lambda: load_ca(config.etcd_ca_file))
    if config.etcd_cert_file:
        attempt(
            "etcd_cert_file",
            lambda: load_cert_and_key(config.etcd_cert_file, config.etcd_key_file),
        )
    if config.etcd_password_file:
        attempt("etcd_password_file", lambda: read_token(config.etcd_password_file))
    if problems:
        raise ConfigError(problems)
    for name in ("tls_key_file", "admin_token_file", "etcd_key_file", "etcd_password_file"):
        if getattr(config, name):
            warn_if_readable_by_others(getattr(config, name), name)
    return ServerSecrets(**{k: v for k, v in secrets.items() if v is not None})


def etcd_access(config: CoordinatorConfig) -> EtcdAccess:
    """How this daemon's etcd clients reach etcd."""
    return EtcdAccess(
        ca_file=config.etcd_ca_file,
        cert_file=config.etcd_cert_file,
        key_file=config.etcd_key_file,
        username=config.etcd_username,
        password_file=config.etcd_password_file,
    )


def peer_names(context: grpc.aio.ServicerContext) -> list[str]:
    """The names the client's verified certificate carries: its CN, then its
    SANs (DNS, URI, e-mail, IP); empty without a client certificate."""
    auth: Mapping[str, Iterable[bytes]] = context.auth_context() or {}
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            name = value.decode(errors="replace")
            if name not in names:
                names.append(name)
    return names


class AdminAuth(grpc.aio.ServerInterceptor):
    """Guards the mutating AdminService methods (GUARDED_METHODS): the call
    goes through with the admin bearer token, or a client certificate named in
    `identities`; else it ends UNAUTHENTICATED (no or a wrong credential) or
    PERMISSION_DENIED (a verified certificate that is not an admin's).

    The check runs in the handler, not in intercept_service: only the
    servicer context knows the client's certificate."""

    def __init__(
        self,
        token: str,
        identities: frozenset[str],
        on_denied: Callable[[grpc.StatusCode], None] | None = None,
    ) -> None:
        self._token = token.encode()
        self._identities = identities
        self.on_denied = on_denied

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in GUARDED_METHODS:
            return handler
        if handler.unary_unary is None:
            # Fail closed: a streaming mutating method would pass unchecked.
            raise TypeError(f"{method}: AdminAuth guards unary methods only")
        inner = handler.unary_unary

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._check(method, context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wants(self) -> str:
        ways = []
        if self._token:
            ways.append(
                "the admin bearer token in `authorization: Bearer` metadata (epctl --token-file)"
            )
        if self._identities:
            ways.append(
                "a client certificate whose CN or SAN is in admin_identities (epctl --cert/--key)"
            )
        return " or ".join(ways)

    async def _check(self, method: str, context: grpc.aio.ServicerContext) -> None:
        name = method.rsplit("/", 1)[-1]
        presented = ""
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION:
                presented = value if isinstance(value, str) else value.decode(errors="replace")
        names = peer_names(context)
        token_ok = False
        if presented and self._token:
            scheme, _, token = presented.partition(" ")
            token_ok = scheme.lower() == BEARER and hmac.compare_digest(
                token.strip().encode(), self._token
            )
        admin = next((n for n in names if n in self._identities), None)
        if token_ok or admin is not None:
            log.info(
                "admin call authorized",
                extra=fields(
                    method=name,
                    peer=context.peer(),
                    by="bearer token" if token_ok else f"certificate {admin}",
                ),
            )
            return
        if presented and self._token:
            code = grpc.StatusCode.UNAUTHENTICATED
            message = f"{name} refused: the bearer token is not the admin token"
        elif presented:
            code = grpc.StatusCode.UNAUTHENTICATED
            message = (
                f"{name} refused: this coordinator takes no bearer token; it needs {self._wants()}"
            )
        elif names and self._identities:
            code = grpc.StatusCode.PERMISSION_DENIED
            message = (
                f"{name} refused: client certificate {', '.join(names)} is not in "
                f"admin_identities" + (" and no bearer token was sent" if self._token else "")
            )
        else:
            code = grpc.StatusCode.UNAUTHENTICATED
            message = f"{name} needs an admin credential: {self._wants()}; none was sent"
        log.warning(
            "admin call denied",
            extra=fields(
                method=name, peer=context.peer(), code=code.name, certificate=",".join(names)
            ),
        )
        if self.on_denied is not None:
            self.on_denied(code)
        await context.abort(code, message)


# --- clients ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTls:
    """A gRPC client's side of TLS: the CA bundle that verifies the server
    (empty: the system's roots) and, for mutual TLS, its own certificate and
    key. `enabled` is False when nothing is set: plaintext. (A server with a
    publicly trusted certificate: name the system's bundle as the CA.)"""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials; SecretFileError when a file cannot be read."""
        if bool(self.cert_file) != bool(self.key_file):
            raise SecretFileError("a client certificate and its key go together")
        return grpc.ssl_channel_credentials(
            root_certificates=read_file(self.ca_file) if self.ca_file else None,
            private_key=read_file(self.key_file) if self.key_file else None,
            certificate_chain=read_file(self.cert_file) if self.cert_file else None,
        )


@dataclass(frozen=True)
class EtcdAccess:
    """How to reach etcd beyond host:port: TLS (on when a CA or a client
    certificate is set; the CA empty: the system's roots) and etcd's own
    authentication (a user and a file with its password)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password_file: str = ""

    @property
    def tls(self) -> ClientTls | None:
        if not (self.ca_file or self.cert_file):
            return None
        return ClientTls(self.ca_file, self.cert_file, self.key_file)

    def password(self) -> str | None:
        return read_token(self.password_file) if self.password_file else None
