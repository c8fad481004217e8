"""Tenant isolation on the shared store (issue 13 item 1, issue 14): a private module never reaches a
pod that has not proved access, and a pod that has access always gets the one shared copy.

The victim's side is real: a registry with TLS and basic auth (two users, alice and bob) behind the
fault proxy, which forwards to it and records every request synchronously (so a test can tell whether
the driver asked the registry, and with whose credentials). The attacker's side is a registry of our
own that answers what each test scripts (``tests/hostile_registry.py``): manifests naming the victim's
module digest, the victim's manifest bytes replayed, an index, bogus credentials accepted.
The rule under test is in ``csi_wasm/access.py``.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import shutil
import subprocess
import threading
from dataclasses import dataclass, replace
from typing import Iterator

import grpc
import pytest
import requests

import faultproxy as fp
from conftest import RunningDriver, fast_pull_config, start_driver, stop_driver, wait_for
from csi_wasm import layouts
from csi_wasm.access import MAX_ORIGINS, MAX_PROOFS, AccessRecords, ModuleAccess, Origin, ProofCache
from csi_wasm.config import NodeConfig, RegistryHostConfig
from csi_wasm.credentials import Credentials
from csi_wasm.demo.kubelet import InlineVolume
from csi_wasm.demo.push import Pushed, Pusher
from csi_wasm.demo.registry import LocalRegistry, RegistryAuth
from csi_wasm.demo.wasm_modules import make_module, sha256_digest
from csi_wasm.errors import AccessDenied
from csi_wasm.metrics import Metrics
from csi_wasm.pull import ModuleRequest, Puller, PullPolicy
from csi_wasm.reference import parse_reference
from csi_wasm.registry import RegistryClient
from csi_wasm.store import ModuleStore
from hostile_registry import HostileRegistry

ALICE = RegistryAuth("alice", "al1ce-Pa55word")
BOB = RegistryAuth("bob", "b0b-Pa55word")
VICTIM_MODULE = make_module(7000, "victim-private")
DENIED, NOT_FOUND, UNAVAILABLE = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.UNAVAILABLE)  # fmt: skip
REFUSED = (DENIED, NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


class TeamRegistry(LocalRegistry):
    """The real registry with TLS and basic auth for several users."""

    def __init__(self, workdir: pathlib.Path, users: list[RegistryAuth], tls: tuple[pathlib.Path, pathlib.Path]):
        super().__init__(workdir, auth=users[0], tls=tls)
        self.users = users

    def _htpasswd(self) -> pathlib.Path:
        lines = [
            subprocess.run([shutil.which("htpasswd") or "htpasswd", "-Bbn", user.username, user.password],
                           check=True, capture_output=True, text=True).stdout.strip()
            for user in self.users
        ]  # fmt: skip
        path = self.workdir / "htpasswd"
        path.write_text("\n".join(lines) + "\n")
        return path


@dataclass
class Setup:
    private: TeamRegistry
    proxy: fp.FaultProxy  # what pods name: plain http in front of the private registry, recording requests
    pusher: Pusher  # pushes to the private registry as alice
    open_pusher: Pusher  # the shared open registry
    victim: Pushed

    def image(self, pushed: Pushed | str) -> str:
        """The reference a pod writes: through the proxy."""
        text = pushed if isinstance(pushed, str) else pushed.reference
        return f"{self.proxy.host}/{text.split('/', 1)[1]}"


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[pathlib.Path, pathlib.Path], pusher: Pusher
) -> Iterator[Setup]:
    private = TeamRegistry(tmp_path_factory.mktemp("team-registry"), [ALICE, BOB], tls_files)
    private.start()
    team = Pusher(private.host, "https", (ALICE.username, ALICE.password), verify=str(tls_files[0]))
    proxy = fp.FaultProxy(private.host, upstream_scheme="https", upstream_ca=str(tls_files[0])).start()
    try:
        victim = team.wasm_artifact("team-a/filter", "v1", VICTIM_MODULE)
        yield Setup(private, proxy, team, pusher, victim)
    finally:
        proxy.stop()
        private.stop()


@pytest.fixture
def hostile() -> Iterator[HostileRegistry]:
    with HostileRegistry() as running:
        yield running


def node(setup: Setup, hostile: HostileRegistry) -> NodeConfig:
    insecure = RegistryHostConfig(insecure=True)
    return NodeConfig(
        registries={setup.proxy.host: insecure, hostile.host: insecure, setup.open_pusher.host: insecure},
        pull=fast_pull_config(),
    )


@pytest.fixture
def csi(tmp_path: pathlib.Path, setup: Setup, hostile: HostileRegistry) -> Iterator[RunningDriver]:
    setup.proxy.clear()
    setup.proxy.arm()
    running = start_driver(tmp_path, node(setup, hostile))
    yield running
    stop_driver(running)


def secret(user: RegistryAuth | None, password: str | None = None) -> dict[str, str]:
    if user is None:
        return {}
    return {"username": user.username, "password": password if password is not None else user.password}


@dataclass
class Outcome:
    code: grpc.StatusCode | None
    detail: str
    volume: InlineVolume
    data: bytes | None = None
    inode: int | None = None


def publish(csi: RunningDriver, image: str, secrets: dict[str, str] | None = None, **attributes: str) -> Outcome:
    volume = csi.inline(attributes | {"image": image}, secrets)
    try:
        target = csi.kubelet.mount(volume, timeout=30)
    except grpc.RpcError as exc:
        assert not csi.kubelet.target_path(volume).exists(), "a refused publish left its target behind"
        return Outcome(exc.code(), exc.details() or "", volume)
    module = target / "plugin.wasm"
    return Outcome(None, "", volume, module.read_bytes(), os.stat(module).st_ino)


def victim_pulls(csi: RunningDriver, setup: Setup) -> Outcome:
    owner = publish(csi, setup.image(setup.victim), secret(ALICE))
    assert owner.code is None, owner.detail
    assert owner.data == VICTIM_MODULE
    return owner


def layer(digest: str, media_type: str = "application/wasm", size: int = 1) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def manifest_naming(digest: str, media_type: str = "application/wasm", size: int = 1) -> dict[str, object]:
    config = {"mediaType": layouts.WASM_CONFIG_V0, "digest": sha256_digest(b"{}"), "size": 2}
    return {"schemaVersion": 2, "mediaType": layouts.OCI_MANIFEST, "config": config,
            "layers": [layer(digest, media_type, size)]}  # fmt: skip


def victim_manifest_bytes(setup: Setup) -> bytes:
    response = requests.get(
        f"https://{setup.private.host}/v2/team-a/filter/manifests/v1", auth=(ALICE.username, ALICE.password),
        headers={"Accept": layouts.OCI_MANIFEST}, verify=setup.pusher.session.verify, timeout=10,
    )  # fmt: skip
    response.raise_for_status()
    assert sha256_digest(response.content) == setup.victim.manifest_digest
    return response.content


def assert_refused(csi: RunningDriver, outcome: Outcome, hostile: HostileRegistry, what: str) -> None:
    assert outcome.code in REFUSED, (what, outcome.code, outcome.detail)
    assert outcome.data is None
    digest = sha256_digest(VICTIM_MODULE)
    # the attacker's registry was asked for the module's bytes: possession is the only proof it could give
    assert hostile.count(rf"GET /v2/.+/blobs/{digest}") >= 1, what


# -- attacks from a registry of the attacker's own --------------------------------------------------


ATTACKS = ["raw layer", "istio layer", "wasm-to-oci layer", "index", "moduleDigest", "replayed manifest by tag",
           "replayed manifest by digest, bogus credentials"]  # fmt: skip


def stage_attack(setup: Setup, hostile: HostileRegistry, attack: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """Script the attacker's registry; return the image the attacker's pod names, its secrets, its attributes."""
    digest = sha256_digest(VICTIM_MODULE)
    image, secrets, attributes = f"{hostile.host}/x/stolen:v1", {}, {}
    if attack == "raw layer":
        hostile.manifest("x/stolen", "v1", manifest_naming(digest), layouts.OCI_MANIFEST)
    elif attack == "istio layer":
        hostile.manifest("x/stolen", "v1", manifest_naming(digest, "application/vnd.module.wasm.content.layer.v1+wasm"),
                         layouts.OCI_MANIFEST)  # fmt: skip
    elif attack == "wasm-to-oci layer":
        hostile.manifest("x/stolen", "v1", manifest_naming(digest, "application/vnd.wasm.content.layer.v1+wasm",
                                                           len(VICTIM_MODULE)), layouts.OCI_MANIFEST)  # fmt: skip
    elif attack == "index":
        child = hostile.manifest("x/stolen", "child", manifest_naming(digest), layouts.OCI_MANIFEST)
        entry = {"mediaType": layouts.OCI_MANIFEST, "digest": child, "size": 1,
                 "platform": {"architecture": "wasm", "os": "wasip1"}}  # fmt: skip
        hostile.manifest("x/stolen", "v1", {"schemaVersion": 2, "mediaType": layouts.OCI_INDEX, "manifests": [entry]},
                         layouts.OCI_INDEX)  # fmt: skip
    elif attack == "moduleDigest":
        hostile.manifest("x/stolen", "v1", manifest_naming(digest), layouts.OCI_MANIFEST)
        attributes = {"moduleDigest": digest}
    elif attack == "replayed manifest by tag":
        hostile.manifest("x/stolen", "v1", victim_manifest_bytes(setup), layouts.OCI_MANIFEST)
    elif attack == "replayed manifest by digest, bogus credentials":
        hostile.require_credentials = True
        hostile.manifest("x/stolen", "v1", victim_manifest_bytes(setup), layouts.OCI_MANIFEST)
        image, secrets = f"{hostile.host}/x/stolen@{setup.victim.manifest_digest}", {"username": "eve", "password": "x"}
    else:
        raise AssertionError(attack)
    return image, secrets, attributes


@pytest.mark.parametrize("attack", ATTACKS)
def test_an_attackers_registry_cannot_name_its_way_to_a_private_module(
    csi: RunningDriver, setup: Setup, hostile: HostileRegistry, attack: str
) -> None:
    owner = victim_pulls(csi, setup)
    image, secrets, attributes = stage_attack(setup, hostile, attack)
    outcome = publish(csi, image, secrets, **attributes)
    assert_refused(csi, outcome, hostile, attack)
    # the victim's pod still has its module, and the store still holds one copy
    assert (csi.kubelet.target_path(owner.volume) / "plugin.wasm").read_bytes() == VICTIM_MODULE
    assert [m.digest for m in csi.driver.store.modules()] == [sha256_digest(VICTIM_MODULE)]
    csi.kubelet.unmount(owner.volume)


def test_after_the_victim_left_and_after_a_restart_the_module_stays_private(
    tmp_path: pathlib.Path, setup: Setup, hostile: HostileRegistry
) -> None:
    first = start_driver(tmp_path, node(setup, hostile))
    try:
        owner = victim_pulls(first, setup)
        first.kubelet.unmount(owner.volume)  # the victim left; its module stays in the store (GC grace)
        image, secrets, attributes = stage_attack(setup, hostile, "raw layer")
        assert_refused(first, publish(first, image, secrets, **attributes), hostile, "after the victim left")
    finally:
        stop_driver(first)
    # the access record is on disk, written atomically, and survives the restart
    record_path = first.driver.store.access_dir / f"{sha256_digest(VICTIM_MODULE).removeprefix('sha256:')}.json"
    record = json.loads(record_path.read_bytes())
    assert record == {"digest": sha256_digest(VICTIM_MODULE), "public": False,
                      "private_at": [{"registry": setup.proxy.host, "repository": "team-a/filter"}]}  # fmt: skip
    assert [p.name for p in record_path.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left
    second = start_driver(tmp_path, node(setup, hostile))
    try:
        for attack in ("raw layer", "replayed manifest by tag"):
            image, secrets, attributes = stage_attack(setup, hostile, attack)
            assert_refused(second, publish(second, image, secrets, **attributes), hostile, f"{attack}, after restart")
        for secrets in ({}, secret(ALICE, "guess")):  # the victim's own reference, without its credentials
            for image in (setup.image(setup.victim), setup.image(setup.victim.pinned)):
                outcome = publish(second, image, secrets)
                assert outcome.code == DENIED, (image, secrets, outcome.detail)
        # and a pod with access still gets the copy already on the node, asked of the registry, not downloaded
        blob_gets = setup.proxy.count(f"GET /v2/team-a/filter/blobs/{setup.victim.layer_digest}")
        again = publish(second, setup.image(setup.victim), secret(BOB))
        assert again.code is None and again.data == VICTIM_MODULE, again.detail
        assert setup.proxy.count(f"GET /v2/team-a/filter/blobs/{setup.victim.layer_digest}") == blob_gets
        assert again.inode == os.stat(second.driver.store.module_path(sha256_digest(VICTIM_MODULE))).st_ino
        second.kubelet.unmount(again.volume)
    finally:
        stop_driver(second)


def test_a_registry_that_really_serves_the_bytes_proves_possession(
    csi: RunningDriver, setup: Setup, hostile: HostileRegistry
) -> None:
    """Rule 3: the pod's own registry serving the module's bytes (hashed) is a proof; the copy is shared."""
    owner = victim_pulls(csi, setup)
    digest = hostile.blob(VICTIM_MODULE)
    hostile.manifest("x/mirror", "v1", manifest_naming(digest, size=len(VICTIM_MODULE)), layouts.OCI_MANIFEST)
    outcome = publish(csi, f"{hostile.host}/x/mirror:v1")
    assert outcome.code is None and outcome.data == VICTIM_MODULE, outcome.detail
    assert hostile.count(rf"GET /v2/x/mirror/blobs/{digest}") == 1
    assert outcome.inode == owner.inode  # one copy on the node, whoever proved access
    # served without credentials: the module is public now, shareable with anyone
    assert csi.driver.puller._access.record_of(digest).public  # type: ignore[union-attr]


def test_a_registry_that_serves_other_bytes_is_refused(
    csi: RunningDriver, setup: Setup, hostile: HostileRegistry
) -> None:
    victim_pulls(csi, setup)
    digest = sha256_digest(VICTIM_MODULE)
    hostile.blobs[digest] = b"\0asm\x01\0\0\0" + b"\0" * (len(VICTIM_MODULE) - 8)  # same length, other bytes
    hostile.manifest("x/liar", "v1", manifest_naming(digest, size=len(VICTIM_MODULE)), layouts.OCI_MANIFEST)
    outcome = publish(csi, f"{hostile.host}/x/liar:v1")
    assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION, outcome.detail
    assert not any(csi.driver.store.tmp_dir.iterdir())


# -- pods with access, and the checks they go through ---------------------------------------------------


def test_a_second_pod_with_other_valid_credentials_is_checked_and_shares_the_copy(
    csi: RunningDriver, setup: Setup
) -> None:
    owner = victim_pulls(csi, setup)
    bob = "Basic " + base64.b64encode(f"{BOB.username}:{BOB.password}".encode()).decode()
    blob = f"GET /v2/team-a/filter/blobs/{setup.victim.layer_digest}"
    blob_gets = setup.proxy.count(blob)

    earlier = len(setup.proxy.seen())  # the proxy serves the whole module: count from here

    def asked_with_bobs_credentials() -> list[str]:
        return [s.path for s in setup.proxy.seen()[earlier:]
                if s.line.startswith("GET /v2/team-a/filter/manifests/") and s.headers.get("Authorization") == bob]  # fmt: skip

    second = publish(csi, setup.image(setup.victim), secret(BOB))
    assert second.code is None and second.data == VICTIM_MODULE, second.detail
    assert second.inode == owner.inode  # the one copy on the node
    # bob's credentials were put to the registry that holds the module (for the digest the tag resolved to)
    assert asked_with_bobs_credentials() == [f"/v2/team-a/filter/manifests/{setup.victim.manifest_digest}"]
    third = publish(csi, setup.image(setup.victim.pinned), secret(BOB))  # proven a moment ago: cached
    assert third.code is None and third.inode == owner.inode, third.detail
    assert len(asked_with_bobs_credentials()) == 1
    assert setup.proxy.count(blob) == blob_gets  # checked, never downloaded again
    wrong = publish(csi, setup.image(setup.victim.pinned), secret(BOB, "not-bobs"))
    assert wrong.code == DENIED, wrong.detail


def test_private_and_never_is_served_only_from_a_fresh_check(csi: RunningDriver, setup: Setup) -> None:
    owner = victim_pulls(csi, setup)
    requests_before = setup.proxy.count("")
    # alice's access was just proven: Never serves her from the store, asking nobody
    again = publish(csi, setup.image(setup.victim), secret(ALICE), pullPolicy="Never")
    assert again.code is None and again.inode == owner.inode, again.detail
    assert setup.proxy.count("") == requests_before
    # bob's never was: Never may not ask the registry, so it is refused, and nothing was asked
    refused = publish(csi, setup.image(setup.victim.pinned), secret(BOB), pullPolicy="Never")
    assert refused.code == DENIED and "Never" in refused.detail, refused.detail
    anonymous = publish(csi, setup.image(setup.victim), pullPolicy="Never")
    assert anonymous.code == DENIED, anonymous.detail
    assert setup.proxy.count("") == requests_before
    # once bob's access is checked (IfNotPresent), Never serves bob too
    checked = publish(csi, setup.image(setup.victim.pinned), secret(BOB))
    assert checked.code is None, checked.detail
    served = publish(csi, setup.image(setup.victim.pinned), secret(BOB), pullPolicy="Never")
    assert served.code is None and served.inode == owner.inode, served.detail


def test_a_registry_error_during_the_check_is_unavailable_not_ok(csi: RunningDriver, setup: Setup) -> None:
    victim_pulls(csi, setup)
    setup.proxy.add(r"GET /v2/team-a/filter/manifests/sha256:", fp.status(503))
    outcome = publish(csi, setup.image(setup.victim.pinned), secret(BOB))
    assert outcome.code == UNAVAILABLE, outcome.detail
    setup.proxy.clear()
    assert publish(csi, setup.image(setup.victim.pinned), secret(BOB)).code is None


def test_the_same_module_private_in_two_repositories(csi: RunningDriver, setup: Setup) -> None:
    """A second repository proves itself once by serving the bytes; then it is checked like the first."""
    module = make_module(7100, "two-repos")
    first = setup.pusher.wasm_artifact("team-a/shared", "v1", module)
    second = setup.pusher.wasm_artifact("team-b/shared", "v1", module)
    assert first.manifest_digest == second.manifest_digest  # the very same manifest bytes in both
    owner = publish(csi, setup.image(first), secret(ALICE))
    assert owner.code is None, owner.detail
    b_blob = f"GET /v2/team-b/shared/blobs/{second.layer_digest}"
    assert setup.proxy.count(b_blob) == 0
    other = publish(csi, setup.image(second), secret(BOB))
    assert other.code is None and other.inode == owner.inode, other.detail
    assert setup.proxy.count(b_blob) == 1  # team-b served the bytes: it is an origin now
    record = csi.driver.puller._access.record_of(sha256_digest(module))
    assert record is not None and not record.public
    assert sorted(o.repository for o in record.private_at) == ["team-a/shared", "team-b/shared"]
    third = publish(csi, setup.image(second.pinned), secret(ALICE))
    assert third.code is None and setup.proxy.count(b_blob) == 1, third.detail


def test_public_then_private_and_private_then_public(
    csi: RunningDriver, setup: Setup, hostile: HostileRegistry
) -> None:
    """Bytes once served to anyone are shareable with anyone; until then, they are not."""
    module = make_module(7200, "goes-public")
    digest = sha256_digest(module)
    hostile.manifest("x/claims", "v1", manifest_naming(digest), layouts.OCI_MANIFEST)  # names it, has no bytes
    private = setup.pusher.wasm_artifact("team-a/goes-public", "v1", module)
    assert publish(csi, setup.image(private), secret(ALICE)).code is None
    assert publish(csi, f"{hostile.host}/x/claims:v1").code == NOT_FOUND  # private: a claim is not enough
    public = setup.open_pusher.wasm_artifact("open/goes-public", "v1", module)
    assert publish(csi, public.reference).code is None  # the open registry serves the bytes to anyone
    record = csi.driver.puller._access.record_of(digest)
    assert record is not None and record.public
    claims = publish(csi, f"{hostile.host}/x/claims:v1")
    assert claims.code is None and claims.data == module, claims.detail  # public now: shared
    # and the other way round: a module first public stays public when a private registry serves it too
    first_public = make_module(7300, "first-public")
    assert publish(csi, setup.open_pusher.wasm_artifact("open/first-public", "v1", first_public).reference).code is None
    later = setup.pusher.wasm_artifact("team-a/first-public", "v1", first_public)
    assert publish(csi, setup.image(later), secret(ALICE)).code is None
    asked = setup.proxy.count("")
    assert publish(csi, setup.image(later.pinned)).code is None  # the copy is public: no credentials needed
    assert setup.proxy.count("") == asked  # and nobody was asked


def test_a_private_multi_arch_index(csi: RunningDriver, setup: Setup, hostile: HostileRegistry) -> None:
    module = make_module(7400, "private-index")
    wasm = setup.pusher.wasm_artifact("team-a/multi", "wasm", module)
    other = setup.pusher.compat_image("team-a/multi", "amd64", make_module(7401, "not-this-one"))
    index = setup.pusher.index("team-a/multi", "v1", [(wasm, {"architecture": "wasm", "os": "wasip1"}),
                                                      (other, {"architecture": "amd64", "os": "linux"})])  # fmt: skip
    image = f"{setup.proxy.host}/team-a/multi:v1"
    owner = publish(csi, image, secret(ALICE))
    assert owner.code is None and owner.data == module, owner.detail
    second = publish(csi, f"{setup.proxy.host}/team-a/multi@{index}", secret(BOB))
    assert second.code is None and second.inode == owner.inode, second.detail
    for secrets in ({}, secret(BOB, "guess")):
        assert publish(csi, image, secrets).code == DENIED
    # the attacker replays the index and its child (bytes it somehow got), under bogus credentials
    hostile.require_credentials = True
    for repo_key, (media_type, body) in list(_private_manifests(setup, "team-a/multi", index).items()):
        hostile.manifest("x/multi", repo_key, body, media_type)
    attack = publish(csi, f"{hostile.host}/x/multi:v1", {"username": "eve", "password": "x"})
    assert attack.code in REFUSED and attack.data is None, attack.detail
    assert hostile.count(rf"GET /v2/x/multi/blobs/{sha256_digest(module)}") >= 1


def test_a_private_index_keeps_its_module_private_when_a_mirror_serves_the_child_without_credentials(
    tmp_path: pathlib.Path, setup: Setup, hostile: HostileRegistry
) -> None:
    """The index needed alice's credentials; its child and the module came from a mirror that asked for none
    (credentials are per host: none were ever sent there). The module is still private to the index's origin:
    otherwise any registry naming its digest would be handed the copy."""
    setup.proxy.clear()
    module = make_module(7500, "split-index")
    wasm = setup.pusher.wasm_artifact("team-a/split", "wasm", module)
    index = setup.pusher.index("team-a/split", "v1", [(wasm, {"architecture": "wasm", "os": "wasip1"})])
    with HostileRegistry() as mirror:  # holds the child and the blob, not the index, and serves anyone
        for key, (media_type, body) in _private_manifests(setup, "team-a/split", index).items():
            if key != "v1":
                mirror.manifest("team-a/split", key, body, media_type)
        mirror.blob(module)
        insecure = RegistryHostConfig(insecure=True)
        registries = {setup.proxy.host: replace(insecure, mirrors=(mirror.host,)), mirror.host: insecure,
                      hostile.host: insecure}  # fmt: skip
        running = start_driver(tmp_path, NodeConfig(registries=registries, pull=fast_pull_config()))
        try:
            owner = publish(running, f"{setup.proxy.host}/team-a/split:v1", secret(ALICE))
            assert owner.code is None and owner.data == module, owner.detail
            assert mirror.count(rf"GET /v2/team-a/split/manifests/{wasm.manifest_digest}") == 1
            assert mirror.count(rf"GET /v2/team-a/split/blobs/{wasm.layer_digest}") == 1
            assert {authorization for _, _, authorization in mirror.requests} == {None}
            record = running.driver.puller._access.record_of(wasm.module_digest)
            assert record is not None and not record.public
            assert record.private_at == (Origin(setup.proxy.host, "team-a/split"),)
            hostile.manifest("x/claims", "v1", manifest_naming(wasm.module_digest, size=len(module)),
                             layouts.OCI_MANIFEST)  # fmt: skip
            claim = publish(running, f"{hostile.host}/x/claims:v1")
            assert claim.code == NOT_FOUND and claim.data is None, claim.detail
        finally:
            stop_driver(running)


def _private_manifests(setup: Setup, repo: str, index: str) -> dict[str, tuple[str, bytes]]:
    auth, verify = (ALICE.username, ALICE.password), setup.pusher.session.verify
    base = f"https://{setup.private.host}/v2/{repo}/manifests"
    index_body = requests.get(f"{base}/{index}", auth=auth, verify=verify, timeout=10,
                              headers={"Accept": layouts.OCI_INDEX}).content  # fmt: skip
    found = {"v1": (layouts.OCI_INDEX, index_body)}
    for entry in json.loads(index_body)["manifests"]:
        body = requests.get(f"{base}/{entry['digest']}", auth=auth, verify=verify, timeout=10,
                            headers={"Accept": layouts.OCI_MANIFEST}).content  # fmt: skip
        found[entry["digest"]] = (layouts.OCI_MANIFEST, body)
    return found


def test_a_download_in_flight_is_never_joined_from_another_origin(
    csi: RunningDriver, setup: Setup, hostile: HostileRegistry
) -> None:
    """Flights are keyed by origin: an attacker naming the digest while the victim downloads it gets no bytes."""
    blob = f"GET /v2/team-a/filter/blobs/{setup.victim.layer_digest}"
    before = setup.proxy.count(blob)
    setup.proxy.add(blob, fp.drip(total_seconds=120.0, pieces=400))  # in flight until released, never idle
    done: list[Outcome] = []
    victim = threading.Thread(target=lambda: done.append(publish(csi, setup.image(setup.victim), secret(ALICE))))
    victim.start()
    try:
        assert wait_for(lambda: setup.proxy.count(blob) > before, timeout=20), "the victim's download never started"
        image, secrets, attributes = stage_attack(setup, hostile, "raw layer")
        outcome = publish(csi, image, secrets, **attributes)
        assert_refused(csi, outcome, hostile, "joining the victim's download")
    finally:
        setup.proxy.clear()  # release the dripping body: the rest is sent at once and the victim's download completes
        victim.join(60)
    assert done and done[0].code is None and done[0].data == VICTIM_MODULE, done and done[0].detail


# -- the caches expire (the Puller's injected clock; no sleeps) ---------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _puller(root: pathlib.Path, node_config: NodeConfig, clock: Clock) -> Puller:
    return Puller(ModuleStore(root / "store"), RegistryClient(node_config), node_config.pull, Metrics(process=False),
                  auth_cache_seconds=300.0, clock=clock)  # fmt: skip


def test_the_tag_cache_expires(tmp_path: pathlib.Path, proxy: fp.FaultProxy, pusher: Pusher) -> None:
    pushed = pusher.wasm_artifact("isolation/tagged", "v1", make_module(3000, "tag-cache"))
    config = NodeConfig(pull=replace(fast_pull_config(), tag_cache_seconds=300.0)).with_insecure([proxy.host])
    clock = Clock()
    puller = _puller(tmp_path, config, clock)
    request = ModuleRequest(parse_reference(f"{proxy.host}/isolation/tagged:v1"))
    try:
        resolve = "GET /v2/isolation/tagged/manifests/v1"
        assert puller.ensure(request).digest == pushed.module_digest
        assert proxy.count(resolve) == 1
        clock.now += 299.0
        assert puller.ensure(request).from_cache and proxy.count(resolve) == 1  # fresh: no network
        clock.now += 2.0
        assert puller.ensure(request).digest == pushed.module_digest
        # expired: the tag is resolved again, with a HEAD (the manifest it names is still in the store)
        assert proxy.count("HEAD /v2/isolation/tagged/manifests/v1") == 1 and proxy.count(resolve) == 1
    finally:
        puller.close()


def test_the_private_module_access_cache_expires(tmp_path: pathlib.Path, setup: Setup) -> None:
    setup.proxy.clear()
    clock = Clock()
    config = NodeConfig(pull=fast_pull_config()).with_insecure([setup.proxy.host])
    puller = _puller(tmp_path, config, clock)
    alice = Credentials(ALICE.username, ALICE.password)
    bob = Credentials(BOB.username, BOB.password)
    pinned = parse_reference(setup.image(setup.victim.pinned))
    by_digest = f"GET /v2/team-a/filter/manifests/{setup.victim.manifest_digest}"
    try:
        puller.ensure(ModuleRequest(parse_reference(setup.image(setup.victim)), credentials=alice))
        asked = setup.proxy.count(by_digest)
        assert puller.ensure(ModuleRequest(pinned, credentials=bob)).from_cache
        assert setup.proxy.count(by_digest) > asked  # bob's access was checked at the registry
        asked = setup.proxy.count(by_digest)
        clock.now += 299.0
        for policy in (PullPolicy.IF_NOT_PRESENT, PullPolicy.NEVER):  # still fresh: no network, even for Never
            assert puller.ensure(ModuleRequest(pinned, policy, bob)).from_cache
        assert setup.proxy.count(by_digest) == asked
        clock.now += 2.0
        with pytest.raises(AccessDenied, match="Never"):
            puller.ensure(ModuleRequest(pinned, PullPolicy.NEVER, bob))  # expired: Never may not ask again
        assert setup.proxy.count(by_digest) == asked
        assert puller.ensure(ModuleRequest(pinned, credentials=bob)).from_cache
        assert setup.proxy.count(by_digest) > asked  # expired: asked again
    finally:
        puller.close()


# -- the records themselves ----------------------------------------------------------------------------------


def test_a_record_that_is_not_ours_counts_as_unknown(tmp_path: pathlib.Path) -> None:
    records = AccessRecords(tmp_path / "access")
    digest = sha256_digest(b"some module")
    path = tmp_path / "access" / f"{digest.removeprefix('sha256:')}.json"
    origin = Origin("r.example", "team/x")
    for text in ("not json", "[]", json.dumps({"digest": "sha256:" + "0" * 64, "public": True, "private_at": []}),
                 json.dumps({"digest": digest, "public": "yes", "private_at": []}),
                 json.dumps({"digest": digest, "public": False, "private_at": [["r.example", "team/x"]]})):  # fmt: skip
        path.write_text(text)
        assert AccessRecords(tmp_path / "access").get(digest) is None, text
    records.record(digest, origin, private=True)
    assert AccessRecords(tmp_path / "access").get(digest) == ModuleAccess(digest, False, (origin,))


def test_records_and_proofs_are_bounded() -> None:
    access = ModuleAccess("sha256:" + "a" * 64)
    for number in range(MAX_ORIGINS + 5):
        access = access.served(Origin("r.example", f"repo{number}"), private=True)
    assert len(access.private_at) == MAX_ORIGINS and access.private_at[-1].repository == f"repo{MAX_ORIGINS + 4}"
    assert access.served(Origin("r.example", "repo5"), private=False).public
    clock = Clock()
    proofs = ProofCache(60.0, clock)
    for number in range(MAX_PROOFS + 10):
        proofs.remember(Credentials(f"user{number}", "p"), Origin("r.example", "x"), "sha256:" + "b" * 64)
    assert len(proofs._until) == MAX_PROOFS  # noqa: SLF001 - the bound is the point
    assert proofs.fresh(Credentials(f"user{MAX_PROOFS + 9}", "p"), Origin("r.example", "x"), "sha256:" + "b" * 64)
    assert not proofs.fresh(Credentials("user0", "p"), Origin("r.example", "x"), "sha256:" + "b" * 64)


def test_removing_a_module_removes_its_record(tmp_path: pathlib.Path) -> None:
    store = ModuleStore(tmp_path / "store")
    module = make_module(2000, "removed")
    with store.ingest("r.example/x:v1", 1 << 20) as ingest:
        ingest.write(module)
        stored = ingest.commit(expected_digest=None)
    AccessRecords(store.access_dir).record(stored.digest, Origin("r.example", "x"), private=True)
    assert len(list(store.access_dir.iterdir())) == 1
    store.remove(stored.digest)
    assert list(store.access_dir.iterdir()) == [] and AccessRecords(store.access_dir).get(stored.digest) is None
