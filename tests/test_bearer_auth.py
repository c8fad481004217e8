"""Bearer-token auth, for real (issue 3): the distribution registry in ``auth: token`` mode, and a token
server of our own that signs JWTs with a test key (RS256, x5c chain in the header, as the registry
verifies them against ``rootcertbundle``).

Proves that tokens are per registry and repository scope and per credential, cached, refreshed
on expiry, and that a refused or anonymous request is PERMISSION_DENIED.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import pathlib
import re
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from conftest import RunningDriver, fast_pull_config, start_driver, stop_driver
from csi_wasm.config import NodeConfig, PullConfig
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import BINARY, LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.registry import RegistryClient

SERVICE, ISSUER = "csi-wasm-test-registry", "csi-wasm-test-token-issuer"
USERS = {"reader": "r3ader-Pa55", "other": "0ther-Pa55"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenRequest:
    scope: str
    user: str | None
    at: float


@dataclass
class TokenServer:
    """Issues registry tokens for the scopes asked for, to the users in USERS (nobody anonymous)."""

    directory: pathlib.Path
    expires_in: int = 3600
    requests: list[TokenRequest] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)

    def start(self) -> TokenServer:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "csi-wasm test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        self.bundle = self.directory / "token-signer.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def token(self, scope: str, user: str, lifetime: int) -> str:
        now = int(time.time())
        access = []
        match = re.fullmatch(r"repository:([^:]+):([a-z,*]+)", scope)
        if match:
            access.append({"type": "repository", "name": match.group(1), "actions": match.group(2).split(",")})
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        claims = {"iss": ISSUER, "sub": user, "aud": SERVICE, "exp": now + lifetime, "nbf": now - 5, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}  # fmt: skip
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                query = parse_qs(urlsplit(self.path).query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                    user = name if USERS.get(name) == password else "!" + name
                scope = (query.get("scope") or [""])[0]
                server.requests.append(TokenRequest(scope, user, time.monotonic()))
                if user is None or user.startswith("!") or query.get("service") != [SERVICE]:
                    self._send(401, {"errors": [{"code": "UNAUTHORIZED"}]})
                    return
                token = server.token(scope, user, server.expires_in)
                server.issued.append(token)
                self._send(200, {"token": token, "expires_in": server.expires_in})

            def _send(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        return Handler


class TokenRegistry(LocalRegistry):
    """docker-registry with ``auth: token`` over the storage of an open registry (which the tests push to)."""

    def __init__(self, workdir: pathlib.Path, storage: pathlib.Path, tokens: TokenServer) -> None:
        super().__init__(workdir)
        self.storage = storage
        self.tokens = tokens

    def start(self, timeout: float = 10.0) -> TokenRegistry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": {"addr": "127.0.0.1:0", "secret": "csi-wasm-token-test"},
            "auth": {"token": {"realm": self.tokens.realm, "service": SERVICE, "issuer": ISSUER,
                               "rootcertbundle": str(self.tokens.bundle)}},
        }  # fmt: skip
        path = self.workdir / "config.yml"
        path.write_text(yaml.safe_dump(config))
        self._process = subprocess.Popen([shutil.which(BINARY) or BINARY, "serve", str(path)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        ready = threading.Event()
        threading.Thread(target=self._read_log, args=(ready,), daemon=True).start()
        if not ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"token registry did not start: {self.log_lines[-5:]}")
        return self


@pytest.fixture(scope="module")
def token_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TokenServer, TokenRegistry, Pusher]]:
    base = tmp_path_factory.mktemp("bearer")
    tokens = TokenServer(base).start()
    with LocalRegistry(base / "open") as open_registry:
        guarded = TokenRegistry(base / "guarded", base / "open" / "data", tokens).start()
        try:
            yield tokens, guarded, Pusher(open_registry.host)
        finally:
            guarded.stop()
            tokens.stop()


@pytest.fixture
def token_csi(tmp_path: pathlib.Path, token_setup: tuple[TokenServer, TokenRegistry, Pusher]) -> Iterator[RunningDriver]:
    tokens, guarded, _ = token_setup
    tokens.requests.clear()
    tokens.expires_in = 3600
    running = start_driver(tmp_path, NodeConfig(pull=fast_pull_config()).with_insecure([guarded.host]))
    yield running
    stop_driver(running)


def _mount(csi: RunningDriver, image: str, user: str | None = "reader") -> bytes:
    secrets = {"username": user, "password": USERS[user]} if user else {}
    volume = csi.inline({"image": image, "pullPolicy": "Always"}, secrets)
    data = (csi.kubelet.mount(volume, timeout=30) / "plugin.wasm").read_bytes()
    csi.kubelet.unmount(volume)
    return data


def test_tokens_are_per_scope_and_per_credential_and_cached(
    token_setup: tuple[TokenServer, TokenRegistry, Pusher], token_csi: RunningDriver
) -> None:
    tokens, guarded, pusher = token_setup
    a, b = make_module(5000, "bearer-a"), make_module(5000, "bearer-b")
    pusher.wasm_artifact("team/a", "v1", a)
    pusher.wasm_artifact("team/b", "v1", b)
    image_a, image_b = f"{guarded.host}/team/a:v1", f"{guarded.host}/team/b:v1"
    assert _mount(token_csi, image_a) == a
    assert [(r.scope, r.user) for r in tokens.requests] == [("repository:team/a:pull", "reader")]
    assert _mount(token_csi, image_a) == a  # pullPolicy Always: the registry is asked again, the token reused
    assert len(tokens.requests) == 1
    guarded.sync()  # the registry's log is read by a thread: wait until our requests' lines are in
    assert guarded.requests_matching(r"uri=\"?/v2/team/a/manifests/v1") >= 2
    assert _mount(token_csi, image_b) == b  # another repository: another scope, another token
    assert [(r.scope, r.user) for r in tokens.requests][1:] == [("repository:team/b:pull", "reader")]
    assert _mount(token_csi, image_a, user="other") == a  # other credentials never reuse reader's token
    assert [(r.scope, r.user) for r in tokens.requests][2:] == [("repository:team/a:pull", "other")]
    # the scope is real: the registry refuses team/a's token for team/b
    token_a = tokens.issued[0]
    url = f"http://{guarded.host}/v2/team/b/manifests/v1"
    assert requests.get(url, headers={"Authorization": f"Bearer {token_a}"}, timeout=10).status_code == 401


@dataclass
class SteppedClock:
    """The token cache's clock: it moves only when the test moves it."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_expired_token_is_refreshed(
    token_setup: tuple[TokenServer, TokenRegistry, Pusher], tmp_path: pathlib.Path
) -> None:
    tokens, guarded, pusher = token_setup
    tokens.requests.clear()
    tokens.expires_in = 300  # the driver refreshes 10 s early: on its clock this token is good for 290 s
    module = make_module(5000, "bearer-expiry")
    pusher.wasm_artifact("team/expiry", "v1", module)
    image = f"{guarded.host}/team/expiry:v1"
    clock = SteppedClock()
    node = NodeConfig(pull=fast_pull_config()).with_insecure([guarded.host])
    running = start_driver(tmp_path, node, registry_client=RegistryClient(node, token_clock=clock))
    try:
        assert _mount(running, image) == module
        clock.now += 289.0
        assert _mount(running, image) == module
        assert len(tokens.requests) == 1  # still fresh: reused
        clock.now += 1.0
        assert _mount(running, image) == module
        assert [r.scope for r in tokens.requests] == ["repository:team/expiry:pull"] * 2  # expired: a new one
    finally:
        stop_driver(running)


@pytest.mark.parametrize("user", ["wrong", None])
def test_refused_or_anonymous_token_requests_are_permission_denied(
    token_setup: tuple[TokenServer, TokenRegistry, Pusher], token_csi: RunningDriver, user: str | None
) -> None:
    tokens, guarded, pusher = token_setup
    pusher.wasm_artifact("team/closed", "v1", make_module(5000, "closed"))
    secrets = {"username": "reader", "password": "nope"} if user == "wrong" else {}
    volume = token_csi.inline({"image": f"{guarded.host}/team/closed:v1"}, secrets)
    with pytest.raises(grpc.RpcError) as failure:
        token_csi.kubelet.mount(volume, timeout=30)
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "token service" in (failure.value.details() or "")
    assert token_csi.mounts_under_kubelet() == [] and token_csi.driver.store.modules() == []
    assert len(tokens.requests) == 1  # refused once, not retried


def test_the_token_server_being_down_is_unavailable(
    token_setup: tuple[TokenServer, TokenRegistry, Pusher], tmp_path: pathlib.Path
) -> None:
    _, guarded, pusher = token_setup
    pusher.wasm_artifact("team/down", "v1", make_module(5000, "down"))
    # a registry whose realm points at a closed port on the same host
    broken = TokenServer(tmp_path)
    broken.start()
    broken.stop()  # nothing listens on its realm any more
    other = TokenRegistry(tmp_path / "reg", pathlib.Path(guarded.storage), broken).start()
    running = start_driver(tmp_path / "d", NodeConfig(pull=PullConfig(connect_timeout_seconds=1, read_timeout_seconds=2,
                                                                         attempts=2)).with_insecure([other.host]))  # fmt: skip
    try:
        volume = running.inline({"image": f"{other.host}/team/down:v1"}, {"username": "reader",
                                                                          "password": USERS["reader"]})  # fmt: skip
        with pytest.raises(grpc.RpcError) as failure:
            running.kubelet.mount(volume, timeout=30)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_driver(running)
        other.stop()
