"""Hostile pod input that used to end as INTERNAL or in the log as it came (issue 13, "Smaller"; issue 14).

Everything here goes through the real gRPC server of a real driver (or, for the property test, through
the parser the publish calls). docs/reliability.md says no foreseeable case is INTERNAL: each case here
must be INVALID_ARGUMENT with a message a cluster admin can act on. Secrets are every shape a pod's
Secret can take; log lines must stay bounded and unforgeable whatever the pod wrote.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from typing import Any, Iterator

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import RunningDriver
from csi_wasm.credentials import Credentials, keychain_from_secrets
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.errors import InvalidRequest
from csi_wasm.logs import MAX_FIELD_CHARS, JsonFormatter, TextFormatter, bounded

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MODULE = make_module(3000, "pod-input")


def _b64(text: bytes) -> str:
    return base64.b64encode(text).decode()


def _config(host: str, entry: Any) -> str:
    return json.dumps({"auths": {host: entry}})


def secret_cases(host: str) -> list[tuple[str, dict[str, str], str]]:
    """(name, secret data, a fragment the message must contain)."""
    deep_arrays = "[" * 50_000 + "]" * 50_000
    deep_objects = '{"a":' * 50_000 + "1" + "}" * 50_000
    return [
        ("dockerconfigjson nested 50k deep (arrays)", {".dockerconfigjson": deep_arrays}, "nested too deeply"),
        ("dockerconfigjson nested 50k deep (objects)", {".dockerconfigjson": deep_objects}, "nested too deeply"),
        ("dockercfg nested 50k deep", {".dockercfg": deep_arrays}, "nested too deeply"),
        ("not JSON", {".dockerconfigjson": "{"}, "not valid JSON"),
        ("a JSON list", {".dockerconfigjson": "[]"}, "not a JSON object"),
        ("auths a list", {".dockerconfigjson": json.dumps({"auths": [1, 2]})}, "'auths' must be a mapping"),
        ("entry a string", {".dockerconfigjson": _config(host, "u:p")}, "is not a mapping"),
        ("auth a number", {".dockerconfigjson": _config(host, {"auth": 12345})}, "'auth'"),
        ("auth a list", {".dockerconfigjson": _config(host, {"auth": ["dTpw"]})}, "'auth'"),
        ("auth an object", {".dockerconfigjson": _config(host, {"auth": {"user": "u"}})}, "'auth'"),
        ("auth true", {".dockerconfigjson": _config(host, {"auth": True})}, "'auth'"),
        ("auth not base64", {".dockerconfigjson": _config(host, {"auth": "%%%"})}, "not base64"),
        ("auth not UTF-8", {".dockerconfigjson": _config(host, {"auth": _b64(b"\xff\xfe:pw")})}, "not base64"),
        ("auth without a colon", {".dockerconfigjson": _config(host, {"auth": _b64(b"justauser")})}, "user:password"),
        ("username a number", {".dockerconfigjson": _config(host, {"username": 5, "password": "p"})}, "strings"),
        ("password a list", {".dockerconfigjson": _config(host, {"username": "u", "password": ["p"]})}, "strings"),
        ("username an object", {".dockerconfigjson": _config(host, {"username": {"a": 1}, "password": "p"})}, "strings"),
        ("username without password", {".dockerconfigjson": _config(host, {"username": "u"})}, "strings"),
        ("dockercfg a list", {".dockercfg": "[1]"}, "not a JSON object"),
        ("dockercfg entry a number", {".dockercfg": json.dumps({host: 7})}, "is not a mapping"),
        ("two spellings, two passwords", {".dockerconfigjson": json.dumps({"auths": {
            host: {"auth": _b64(b"u:1")}, f"http://{host}/v1/": {"auth": _b64(b"u:2")}}})}, "same registry"),
        ("username without password key", {"username": "u"}, "needs 'password'"),
        ("empty username", {"username": "", "password": "p"}, "needs 'password'"),
        ("unknown keys", {"token": "abc"}, "expected keys"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pod_image(pusher: Pusher) -> str:
    return pusher.wasm_artifact("pod-input/good", "v1", MODULE).reference


def _refusal(csi: RunningDriver, attributes: dict[str, str], secrets: dict[str, str]) -> tuple[grpc.StatusCode, str]:
    volume = csi.inline(attributes, secrets)
    with pytest.raises(grpc.RpcError) as failure:
        csi.kubelet.mount(volume, timeout=30)
    assert not csi.kubelet.target_path(volume).exists()
    return failure.value.code(), failure.value.details() or ""


def test_hostile_secrets_are_invalid_argument_never_internal(csi: RunningDriver, pod_image: str) -> None:
    host = pod_image.split("/", 1)[0]
    for name, secrets, fragment in secret_cases(host):
        code, detail = _refusal(csi, {"image": pod_image}, secrets)
        assert (code, fragment in detail) == (INVALID, True), (name, code, detail)
        assert "s3cr" not in detail
    assert csi.mounts_under_kubelet() == []
    internal = csi.driver.metrics.publish_total.labels("internal")._value.get()  # noqa: SLF001 - prometheus' own counter
    assert internal == 0
    # the same driver still serves a pod whose Secret is well formed
    volume = csi.inline({"image": pod_image}, {".dockerconfigjson": _config(host, {"auth": _b64(b"u:p")})})
    assert (csi.kubelet.mount(volume) / "plugin.wasm").read_bytes() == MODULE
    csi.kubelet.unmount(volume)


@pytest.mark.parametrize(
    "image, fragment",
    [("r.example/a:v1\n", "not a valid OCI reference"), ("r.example/a\n:v1", "invalid"),
     ("r.example/a:v1\x1b[31m", "invalid tag"), ("r.example\u2028/a:v1", "invalid"), ("x" * (1024 * 1024), "longer than"),
     ("R.EXAMPLE:99999/a:v1", "out of range"), ("127.1:5000/a:v1", "dotted quad"), ("Registry/a:v1", "upper case")],
)  # fmt: skip
def test_hostile_images_are_invalid_argument(csi: RunningDriver, image: str, fragment: str) -> None:
    code, detail = _refusal(csi, {"image": image}, {})
    assert code == INVALID and fragment in detail, (code, detail)
    assert len(detail) < 2048


# -- every Secret shape, as a property ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=12,
)
entries = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "auth": st.one_of(json_values, st.just(_b64(b"u:p")), st.just(_b64(b"nocolon")), st.just("%%")),
    "username": st.one_of(json_values, st.just("u")), "password": st.one_of(json_values, st.just("p"))}))  # fmt: skip
hosts = st.sampled_from(["r.example", "R.EXAMPLE:443", "https://r.example/v1/", "other.example", "not a host", ""])


@settings(max_examples=1500, deadline=None, database=None)
@given(
    kind=st.sampled_from([".dockerconfigjson", ".dockercfg"]),
    auths=st.one_of(json_values, st.dictionaries(hosts, entries, max_size=3)),
    wrap=st.booleans(),
)
def test_any_docker_config_shape_is_parsed_or_refused_precisely(kind: str, auths: Any, wrap: bool) -> None:
    document = {"auths": auths} if (kind == ".dockerconfigjson" and wrap) else auths
    try:
        creds = keychain_from_secrets({kind: json.dumps(document)}, "r.example")
    except InvalidRequest as exc:
        assert str(exc).startswith((".docker", "nodePublishSecretRef")), str(exc)
        return
    assert creds is None or (isinstance(creds, Credentials) and isinstance(creds.username, str)
                             and isinstance(creds.password, str) and creds.username)  # fmt: skip


# -- logs: bounded and escaped -----------------------------------------------------------------------------------------


@pytest.fixture(params=["text", "json"])
def driver_log(request: pytest.FixtureRequest) -> Iterator[tuple[str, io.StringIO]]:
    """What the driver writes with --log-format=<param>, captured from its own logger."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter() if request.param == "text" else JsonFormatter())
    logger = logging.getLogger("csi_wasm")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield request.param, stream
    logger.removeHandler(handler)
    logger.setLevel(level)


TEXT_LINE = re.compile(r"\d\d:\d\d:\d\d (debug|info |warning|error|critical) ")


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_huge_image_attribute_makes_a_bounded_log_line(
    csi: RunningDriver, driver_log: tuple[str, io.StringIO]
) -> None:
    fmt, stream = driver_log
    code, _ = _refusal(csi, {"image": "r.example/" + "a" * (1024 * 1024)}, {})
    assert code == INVALID
    lines = _lines(stream)
    assert lines and max(len(line) for line in lines) < 3 * MAX_FIELD_CHARS
    if fmt == "json":
        publish = [json.loads(line) for line in lines if '"event": "publish"' in line]
        assert publish and publish[0]["image"].endswith("more characters cut]")


# no plain space (the old formatter quoted only values holding one): no-break spaces look the same on a terminal
FORGED = "r.example/a:v1\n12:00:00\u00a0info\u00a0\u00a0publish\u00a0result=success\u00a0image=r.example/admin:v1"


@pytest.mark.parametrize("image", [FORGED, FORGED.replace("\n", "\r"), FORGED.replace("\n", "\u2028"),
                                   FORGED.replace("\n", "\x85"), FORGED.replace("\n", "\x1b[2K\r")])
def test_an_image_cannot_forge_a_log_line(
    csi: RunningDriver, driver_log: tuple[str, io.StringIO], image: str
) -> None:
    fmt, stream = driver_log
    code, _ = _refusal(csi, {"image": image}, {})
    assert code == INVALID
    text = stream.getvalue()
    assert text.isascii() and all(ch == "\n" or ch.isprintable() for ch in text)  # no control character survives
    for line in text.splitlines():
        if fmt == "json":
            json.loads(line)  # every line is one valid JSON object
        else:
            assert TEXT_LINE.match(line), line
    assert len(text.splitlines()) == 1  # one event, one line


def test_bounded_keeps_numbers_and_cuts_text() -> None:
    assert bounded(5) == 5 and bounded(1.5) == 1.5 and bounded(True) is True and bounded(None) is None
    assert bounded("x" * MAX_FIELD_CHARS) == "x" * MAX_FIELD_CHARS
    cut = bounded("y" * (MAX_FIELD_CHARS + 10))
    assert cut.startswith("y" * MAX_FIELD_CHARS) and cut.endswith("[10 more characters cut]")


def test_a_traceback_cannot_forge_a_log_line() -> None:
    """An unexpected error's message may quote pod input: its lines are indented under the event."""
    try:
        raise ValueError("bad image r.example/a:v1\n12:00:00 info  publish result=success")
    except ValueError:
        record = logging.LogRecord("csi_wasm.servicers", logging.ERROR, __file__, 1, "unexpected error", (), None)
        import sys

        record.exc_info = sys.exc_info()
    lines = TextFormatter().format(record).splitlines()
    assert TEXT_LINE.match(lines[0]) and len(lines) > 2
    assert all(line.startswith("    | ") for line in lines[1:]), lines
