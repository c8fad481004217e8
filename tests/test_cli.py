"""The operator's side of the `csi-wasm` command, run for real in subprocesses.

A mistake ends with one line that names it and exit code 2, with no traceback, and leaves
the machine as it was: nothing created on a mistyped path, no file replaced. Two drivers
on one state dir hand over cleanly: the second waits for the first to exit.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
from typing import Callable, Iterator

import grpc
import pytest

from csi_wasm._gen import csi_pb2, csi_pb2_grpc
from csi_wasm import syscalls
from csi_wasm.cli import build_parser
from csi_wasm.config import NodeConfig, PullConfig, RegistryHostConfig, StoreConfig
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.mounts import unmount_path
from csi_wasm.topology import share_directory

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = pathlib.Path(sys.executable).parent / "csi-wasm"
COMMAND = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.is_file() else [sys.executable, "-m", "csi_wasm"]
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
# the driver's `recovered` event in either log format: it turns ready right after
RECOVERED = re.compile(r'^\S+ info +recovered( |$)|"event": "recovered"')


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=timeout, env=BASE_ENV | (env or {})
    )


def one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback, naming what is wrong."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def snapshot(root: pathlib.Path) -> dict[str, tuple[int, bytes]]:
    """Every path under root with its type bits and (for files) its bytes: 'nothing changed' made checkable."""
    found = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        found[str(path.relative_to(root))] = (info.st_mode, data)
    return found


@pytest.fixture
def node(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A node's directories as the DaemonSet has them: the plugin (socket) dir and kubelet's pods dir."""
    (tmp_path / "csi").mkdir()
    share_directory(tmp_path / "kubelet" / "pods")  # Bidirectional propagation makes it a shared mount
    yield tmp_path
    unmount_path(tmp_path / "kubelet" / "pods")


def serve_args(node: pathlib.Path, *extra: str, node_id: str = "node-a") -> list[str]:
    return ["serve", "--node-id", node_id, "--endpoint", f"unix://{node}/csi/csi.sock",
            "--state-dir", str(node / "state"), "--kubelet-dir", str(node / "kubelet"), *extra]  # fmt: skip


# -- the table of operator mistakes (issue 11) --------------------------------------------------


def test_a_metrics_address_without_a_host_is_one_line(node: pathlib.Path) -> None:
    before = snapshot(node)
    line = one_line_error(run(*serve_args(node, "--metrics-address", "9808")), "--metrics-address", "'9808'")
    assert "HOST:PORT" in line
    assert snapshot(node) == before


def test_a_metrics_port_in_use_is_one_line_and_creates_nothing(node: pathlib.Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = snapshot(node)
        line = one_line_error(run(*serve_args(node, "--metrics-address", f"127.0.0.1:{port}")), f"127.0.0.1:{port}")
    assert "in use" in line.lower()
    assert snapshot(node) == before, "the state dir or the socket was created before the port was checked"


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--log-level", "verbose"], {}, "--log-level"),
        ([], {"LOG_LEVEL": "verbose"}, "LOG_LEVEL='verbose'"),
        (["--log-format", "xml"], {}, "--log-format"),
        ([], {"LOG_FORMAT": "xml"}, "LOG_FORMAT='xml'"),
    ],
    ids=["--log-level verbose", "LOG_LEVEL=verbose", "--log-format xml", "LOG_FORMAT=xml"],
)
def test_a_bad_log_setting_is_one_line(node: pathlib.Path, args: list[str], env: dict[str, str], expected: str) -> None:
    before = snapshot(node)
    one_line_error(run(*args, *serve_args(node), env=env), expected)
    assert snapshot(node) == before


def test_an_endpoint_naming_a_regular_file_leaves_the_file_alone(node: pathlib.Path) -> None:
    precious = node / "csi" / "csi.sock"
    precious.write_bytes(b"someone's data\n")
    before = snapshot(node)
    one_line_error(run(*serve_args(node)), str(precious), "not a socket")
    assert precious.read_bytes() == b"someone's data\n"
    assert snapshot(node) == before


def test_an_endpoint_in_a_directory_that_cannot_exist_is_one_line(node: pathlib.Path) -> None:
    blocker = node / "plugins"
    blocker.write_text("a file where a directory would have to be\n")
    before = snapshot(node)
    args = serve_args(node)
    args[args.index("--endpoint") + 1] = f"unix://{blocker}/csi-wasm.dev/csi.sock"
    one_line_error(run(*args), f"{blocker}/csi-wasm.dev", "does not exist")
    assert snapshot(node) == before


def test_an_endpoint_in_a_missing_directory_is_not_created(node: pathlib.Path) -> None:
    missing = node / "nonexistent" / "dir"
    before = snapshot(node)
    args = serve_args(node)
    args[args.index("--endpoint") + 1] = f"unix://{missing}/csi.sock"
    one_line_error(run(*args), str(missing), "does not exist")
    assert not (node / "nonexistent").exists()
    assert snapshot(node) == before


@pytest.mark.parametrize("command", [["list"], ["verify"], ["gc"]], ids=lambda c: f"store {c[0]}")
def test_store_commands_on_a_mistyped_state_dir_create_nothing(tmp_path: pathlib.Path, command: list[str]) -> None:
    typo = tmp_path / "var" / "lib" / "csi-wsam"
    one_line_error(run("store", *command, "--state-dir", str(typo)), str(typo), "no csi-wasm store")
    assert list(tmp_path.iterdir()) == []


def test_a_state_dir_whose_parent_is_missing_is_not_created(node: pathlib.Path) -> None:
    before = snapshot(node)
    args = serve_args(node)
    args[args.index("--state-dir") + 1] = str(node / "var-lib" / "csi-wasm")
    one_line_error(run(*args), "--state-dir", "does not exist")
    assert snapshot(node) == before


def test_a_missing_kubelet_dir_is_a_warning_at_start(node: pathlib.Path) -> None:
    args = serve_args(node, "--log-format", "json")
    args[args.index("--kubelet-dir") + 1] = str(node / "no-kubelet-here")
    with Driver(args, node / "csi" / "csi.sock") as driver:
        driver.wait_ready()
        driver.terminate()
    warnings = [line for line in driver.stderr_lines() if '"kubelet_dir.missing"' in line]
    assert len(warnings) == 1 and '"level": "warning"' in warnings[0], driver.stderr
    assert str(node / "no-kubelet-here") in warnings[0]
    assert not (node / "no-kubelet-here").exists()


# -- `csi-wasm pull`: one line per image, exit 1 if any failed -------------------------------------


def failures(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The pull's own lines on stderr (the log shares it, at the default level)."""
    return [line for line in result.stderr.splitlines() if ": FAILED: " in line]


def test_a_pull_that_fails_for_some_images_exits_1_and_names_each(
    tmp_path: pathlib.Path, registry: LocalRegistry, pusher: Pusher
) -> None:
    module = make_module(3000, "cli-pull")
    good = pusher.wasm_artifact("cli/pull", "good", module)
    missing = f"{registry.host}/cli/pull:missing"
    state = ["--state-dir", str(tmp_path / "state"), "--insecure-registry", registry.host]
    result = run("pull", *state, missing, good.reference, "Not A Reference")
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [f"{good.reference}: {good.module_digest} 3000 bytes (pulled)"]
    failed = failures(result)
    assert len(failed) == 2 and "Traceback" not in result.stderr, result.stderr
    assert failed[0].startswith(f"{missing}: FAILED: ") and "not found in registry" in failed[0]
    assert failed[1].startswith("Not A Reference: FAILED: ") and "invalid repository path" in failed[1]
    again = run("pull", *state, good.reference)
    assert again.returncode == 0 and failures(again) == []
    assert again.stdout.splitlines() == [f"{good.reference}: {good.module_digest} 3000 bytes (already stored)"]


def test_a_pull_onto_a_read_only_store_names_the_error_and_goes_on(
    tmp_path: pathlib.Path, registry: LocalRegistry, pusher: Pusher
) -> None:
    stored = pusher.wasm_artifact("cli/pull", "stored", make_module(3100, "cli-pull-stored"))
    new = pusher.wasm_artifact("cli/pull", "new", make_module(3200, "cli-pull-new"))
    state = ["--state-dir", str(tmp_path / "state"), "--insecure-registry", registry.host]
    assert run("pull", *state, stored.reference).returncode == 0
    tmp = tmp_path / "state" / "store" / "tmp"
    syscalls.mount(bytes(tmp), bytes(tmp), syscalls.MS_BIND)  # the store's filesystem gone read-only
    try:
        syscalls.mount(b"none", bytes(tmp), syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY)
        result = run("pull", *state, new.reference, stored.reference)
    finally:
        unmount_path(tmp)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (failed,) = failures(result)
    assert failed.startswith(f"{new.reference}: FAILED: OSError: ") and "Read-only file system" in failed
    assert result.stdout.splitlines() == [f"{stored.reference}: {stored.module_digest} 3100 bytes (already stored)"]


# -- the socket: only a stale one is replaced ---------------------------------------------------


def test_a_stale_socket_is_replaced(node: pathlib.Path) -> None:
    path = node / "csi" / "csi.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays; nothing listens on it any more
    with Driver(serve_args(node), path) as driver:
        assert driver.wait_ready() == "node-a"
        assert driver.terminate() == 0
    assert not path.exists(), "the driver leaves its own socket behind"


def test_a_socket_something_answers_on_is_not_taken_over(node: pathlib.Path) -> None:
    path = node / "csi" / "csi.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        inode = path.stat().st_ino
        one_line_error(run(*serve_args(node)), "another process is serving")
        assert path.stat().st_ino == inode


def test_a_live_socket_of_a_driver_on_another_state_dir_is_not_taken_over(node: pathlib.Path) -> None:
    sock = node / "csi" / "csi.sock"
    (node / "state-b").mkdir()
    with Driver(serve_args(node, node_id="node-a"), sock) as first:
        first.wait_ready()
        args = serve_args(node, node_id="node-b")
        args[args.index("--state-dir") + 1] = str(node / "state-b")
        result = run(*args)
        assert result.returncode == 2 and "another process is serving" in result.stderr.splitlines()[-1]
        assert "Traceback" not in result.stderr
        assert answering_node(sock) == "node-a"
        first.terminate()


def test_a_driver_never_removes_a_socket_it_no_longer_owns(node: pathlib.Path) -> None:
    sock = node / "csi" / "csi.sock"
    (node / "state-b").mkdir()
    with Driver(serve_args(node, node_id="node-a"), sock) as first:
        first.wait_ready()
        sock.unlink()  # an operator removes the socket and starts another driver there
        args = serve_args(node, node_id="node-b")
        args[args.index("--state-dir") + 1] = str(node / "state-b")
        with Driver(args, sock) as second:
            assert second.wait_ready() == "node-b"
            assert first.terminate() == 0
            assert answering_node(sock) == "node-b", "the first driver removed the second one's socket"
            second.terminate()


def test_an_endpoint_of_the_longest_socket_path_serves_and_a_longer_one_is_one_line(node: pathlib.Path) -> None:
    prefix = f"{node}/plugins/"
    deep = pathlib.Path(prefix + "d" * (107 - len(prefix) - len("/csi.sock")))
    deep.mkdir(parents=True)
    sock = deep / "csi.sock"
    assert len(bytes(sock)) == 107
    args = serve_args(node)
    args[args.index("--endpoint") + 1] = f"unix://{sock}"
    with Driver(args, sock) as driver:
        assert driver.wait_ready() == "node-a"
        assert driver.terminate() == 0
    args[args.index("--endpoint") + 1] = f"unix://{deep}/csi.sock2"
    one_line_error(run(*args), "108 bytes", "at most 107")


# -- one driver per state dir, and the hand-over --------------------------------------------------


def test_a_second_driver_waits_for_the_first_and_takes_over_when_it_exits(node: pathlib.Path) -> None:
    sock = node / "csi" / "csi.sock"
    with Driver(serve_args(node, node_id="node-a"), sock) as first:
        assert first.wait_ready() == "node-a"
        with Driver(serve_args(node, "--log-format", "json", node_id="node-b"), sock) as second:
            second.wait_for_line('"state_dir.waiting"')
            assert f'"holder_pid": {first.pid}' in second.stderr
            assert answering_node(sock) == "node-a", "the waiting driver took the socket"
            assert first.terminate() == 0
            assert second.wait_ready() == "node-b"
            assert sock.exists(), "the first driver removed its successor's socket on exit"
            assert (node / "state" / "driver.pid").read_text().strip() == str(second.pid)
            assert second.terminate() == 0
    assert not sock.exists()


def test_a_waiting_driver_stopped_before_its_turn_touches_nothing(node: pathlib.Path) -> None:
    sock = node / "csi" / "csi.sock"
    with Driver(serve_args(node, node_id="node-a"), sock) as first:
        first.wait_ready()
        with Driver(serve_args(node, "--log-format", "json", node_id="node-b"), sock) as second:
            second.wait_for_line('"state_dir.waiting"')
            assert second.terminate() == 0
        assert answering_node(sock) == "node-a"
        assert (node / "state" / "driver.pid").read_text().strip() == str(first.pid)
        first.terminate()


# -- help and docs -------------------------------------------------------------------------------


def parsers(parser: argparse.ArgumentParser, name: str = "csi-wasm") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def test_every_option_says_its_default_or_that_it_is_required() -> None:
    checked = 0
    for name, parser in parsers(build_parser({})):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            text = action.help or ""
            assert "default" in text or "required" in text or not action.option_strings, (name, action.dest)
            assert text, (name, action.dest)
            checked += 1
    assert checked >= 20


def test_store_list_and_verify_offer_only_what_they_use() -> None:
    commands = dict(parsers(build_parser({})))
    for name in ("csi-wasm store list", "csi-wasm store verify"):
        options = {o for a in commands[name]._actions for o in a.option_strings} - {"-h", "--help"}
        assert options == {"--state-dir"}, (name, options)


def test_the_readme_documents_every_node_config_key_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Node configuration", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z_.<>]+)` \| [^|]+ \| ([^|]+) \|", section, re.M)}
    expected: dict[str, object] = {}
    for prefix, instance in (("pull.", PullConfig()), ("store.", StoreConfig()),
                             ("registries.<host>.", RegistryHostConfig())):  # fmt: skip
        for key, value in vars(instance).items():
            expected[prefix + key] = value
    for key in vars(NodeConfig()):
        if key not in ("pull", "store", "registries"):
            expected[key] = getattr(NodeConfig(), key)
    assert set(rows) == set(expected), set(rows) ^ set(expected)
    for key, default in expected.items():
        shown = rows[key].strip().strip("`")
        assert shown == _readme_default(default), (key, shown, default)


def _readme_default(value: object) -> str:
    if value is None or value == () or value == {}:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# -- helpers ---------------------------------------------------------------------------------------


def answering_node(sock: pathlib.Path) -> str:
    with grpc.insecure_channel(f"unix://{sock}") as channel:
        response = csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=5)
    return str(response.node_id)


class Driver:
    """`csi-wasm serve` in a subprocess. Its stderr is read line by line as it comes (a thread, a condition),
    so a test waits for the line it needs, an event, and never for a while."""

    def __init__(self, args: list[str], sock: pathlib.Path) -> None:
        self._sock = sock
        self._process = subprocess.Popen([*COMMAND, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         env=BASE_ENV)  # fmt: skip
        self._lines: list[str] = []
        self._ended = False  # stderr closed: the process has exited
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"stderr-{self._process.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stderr is not None
        for raw in self._process.stderr:
            with self._arrived:
                self._lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._arrived.notify_all()
        with self._arrived:
            self._ended = True
            self._arrived.notify_all()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines())

    def stderr_lines(self) -> list[str]:
        with self._arrived:
            return list(self._lines)

    def wait_for_line(self, text: str, timeout: float = 30) -> None:
        self._wait_for(lambda line: text in line, text, timeout)

    def _wait_for(self, matches: Callable[[str], bool], what: str, timeout: float) -> None:
        with self._arrived:
            self._arrived.wait_for(lambda: self._ended or any(map(matches, self._lines)), timeout)
            found = any(map(matches, self._lines))
        why = f"it exited {self._process.poll()}" if self._ended else f"not within {timeout} s"
        assert found, f"no {what} in the driver's log ({why}): {self.stderr}"

    def wait_ready(self, timeout: float = 30) -> str:
        """Wait for the driver's `recovered` event, then for Probe to say ready; return its node id."""
        self._wait_for(lambda line: bool(RECOVERED.search(line)), "recovered event", timeout)
        with grpc.insecure_channel(f"unix://{self._sock}") as channel:
            probe = csi_pb2_grpc.IdentityStub(channel).Probe
            # ready is set a few instructions after the event is logged: ask again until it shows (each ask is
            # a round trip on the socket, no pause; the loop is bounded by the calls' own timeout)
            while not probe(csi_pb2.ProbeRequest(), timeout=timeout, wait_for_ready=True).ready.value:
                pass
        return answering_node(self._sock)

    def terminate(self) -> int:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        code = self._process.wait(60)
        self._reader.join(30)  # every line the driver wrote is read
        return code

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(30)
        self._reader.join(30)
