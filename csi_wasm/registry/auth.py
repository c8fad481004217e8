"""Registry auth per call: the pod's own credentials, as Basic or as Bearer tokens from the registry's realm.

Tokens are cached per registry, repository scope and credential, and refreshed a
little before they expire. A token realm is checked like a redirect (``ssrf``):
never plain http on another host or as a downgrade from https, never a forbidden
address. Nothing here logs a credential or a token.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import urllib.parse
from typing import Callable

from csi_wasm.credentials import Credentials
from csi_wasm.errors import AccessDenied, RegistryError
from csi_wasm.reference import Reference
from csi_wasm.registry.bodies import parse_json
from csi_wasm.registry.retry import Transient
from csi_wasm.registry.ssrf import IPNetwork, refuse_forbidden_host
from csi_wasm.registry.transport import Endpoint, Exchange

MAX_TOKEN_RESPONSE_BYTES = 64 * 1024
BASIC_LIFETIME_SECONDS = 3600.0
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
# a bearer token goes into a header: printable ASCII without spaces
_TOKEN = re.compile(r"^[\x21-\x7e]{1,8192}\Z")


class Authenticator:
    def __init__(self, allowed_networks: tuple[IPNetwork, ...], clock: Callable[[], float] = time.monotonic) -> None:
        self._allowed_networks = allowed_networks
        self._clock = clock
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def cached(self, endpoint: Endpoint, scope: str, creds: Credentials | None) -> str | None:
        """The Authorization header already earned for this registry, scope and credential, if still valid."""
        key = (endpoint.host, scope, creds.fingerprint if creds else "")
        with self._lock:
            cached = self._tokens.get(key)
        if cached and cached[1] > self._clock():
            return cached[0]
        return None

    def authenticate(
        self,
        exchange: Exchange,
        endpoint: Endpoint,
        ref: Reference,
        challenge: str,
        scope: str,
        creds: Credentials | None,
    ) -> str:
        """Answer a 401's ``WWW-Authenticate`` challenge; return the Authorization header to send."""
        scheme = challenge.split(" ", 1)[0].lower()
        key = (endpoint.host, scope, creds.fingerprint if creds else "")
        if scheme == "basic":
            if creds is None:
                raise AccessDenied(
                    f"image {ref}: registry {endpoint.host} requires credentials; "
                    "set nodePublishSecretRef on the volume"
                )
            header, lifetime = creds.basic_header(), BASIC_LIFETIME_SECONDS
        elif scheme == "bearer":
            header, lifetime = self._bearer_token(exchange, endpoint, ref, challenge, scope, creds)
        else:
            raise AccessDenied(f"image {ref}: registry {endpoint.host} asks for unsupported auth {scheme[:20]!r}")
        with self._lock:
            self._tokens[key] = (header, self._clock() + lifetime)
        return header

    def _bearer_token(
        self,
        exchange: Exchange,
        endpoint: Endpoint,
        ref: Reference,
        challenge: str,
        scope: str,
        creds: Credentials | None,
    ) -> tuple[str, float]:
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.get("realm", "")
        try:
            parsed = urllib.parse.urlsplit(realm)
            hostname = parsed.hostname
            parsed.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise AccessDenied(f"image {ref}: registry {endpoint.host} sent an invalid token realm") from None
        if parsed.scheme not in ("https", "http") or not hostname:
            raise AccessDenied(f"image {ref}: registry {endpoint.host} sent an invalid token realm")
        if parsed.scheme == "http" and (endpoint.scheme == "https" or hostname != endpoint.hostname):
            raise AccessDenied(
                f"image {ref}: token realm {parsed.scheme}://{parsed.netloc} is plain http on another host "
                f"or a downgrade from https; refused"
            )
        refuse_forbidden_host(
            hostname, f"image {ref}: token realm", origin=endpoint.hostname, allowed=self._allowed_networks
        )
        query = {"scope": scope}
        if "service" in params:
            query["service"] = params["service"]
        headers = {"Authorization": creds.basic_header()} if creds else {}
        what = f"image {ref}: token service {parsed.netloc}"
        response = exchange.get(endpoint, realm, what, query, headers)
        with contextlib.closing(response):
            if response.status_code in (401, 403):
                raise AccessDenied(
                    f"image {ref}: token service {parsed.netloc} refused the "
                    f"{'pod' if creds else 'anonymous'} credentials; check nodePublishSecretRef"
                )
            if response.status_code >= 500 or response.status_code == 429:
                raise Transient(f"image {ref}: token service answered HTTP {response.status_code}")
            if response.status_code != 200:
                raise RegistryError(f"image {ref}: token service answered HTTP {response.status_code}")
            answer = f"image {ref}: the token service's answer"
            with exchange.read_whole(response, MAX_TOKEN_RESPONSE_BYTES, answer) as raw:
                payload = parse_json(raw, answer, RegistryError)
        token, lifetime = _token_of(payload, ref)
        # refresh a little early so a token never expires mid-request
        return f"Bearer {token}", max(min(lifetime, 24 * 3600.0) - 10.0, 1.0)


def _token_of(payload: object, ref: Reference) -> tuple[str, float]:
    """The token and its lifetime from a token service's JSON answer (``token`` or ``access_token``)."""
    if not isinstance(payload, dict):
        raise RegistryError(f"image {ref}: token service returned an unreadable answer (not a JSON object)")
    token = payload.get("token") or payload.get("access_token")
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise RegistryError(f"image {ref}: token service returned no usable token")
    expires_in = payload.get("expires_in", 60)
    lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) else 60.0
    if not 0 < lifetime < float("inf"):
        lifetime = 60.0
    return token, lifetime
