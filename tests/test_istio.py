"""deploy/examples/istio/ (mesh-wide injection template) and deploy/examples/istio.yaml (per pod).

No Istio runs here and Go's text/template is not available to Python, so this is what is checked:

- The injector values (Helm and IstioOperator forms) are field-by-field what Istio's istiod chart
  reads: `sidecarInjectorWebhook.templates` and `defaultTemplates` (istio/istio,
  manifests/charts/istio-control/istio-discovery/{values.yaml,templates/istiod-injector-configmap.yaml}).
- The template is rendered by a deliberately tiny Go-template subset below: whitespace trimming
  (`{{-`/`-}}`), `if`/`else`/`end` on one variable, and one assignment whose expression must be the
  exact native-sidecar expression of Istio's own sidecar template (1.27 to 1.30). Any other action
  fails the test, so nothing in the template goes unrendered. It is rendered for every combination of
  the injector's NativeSidecars and the pod's sidecar.istio.io/nativeSidecar annotation.
- The rendered YAML is merged into an injected pod the way Istio does it (a strategic merge patch,
  pkg/kube/inject/webhook.go applyOverlayYAML; merge keys from the Kubernetes Pod type: containers,
  initContainers and volumes by name, volumeMounts by mountPath), and the result must be a valid Pod
  (strict Kubernetes schema) whose istio-proxy, wherever it lives, has the mount and an image.
- The WasmPlugin fields against a schema written from Istio's CRD, and its file:// URL against the
  mount; the volume attributes by the driver's own parser.

Not checked: Istio's real Go template engine and sprig functions, the rest of Istio's sidecar template
(stood in for by a minimal istio-proxy container), Envoy loading the module.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from csi_wasm.credentials import Keychain
from csi_wasm.publish import KNOWN_ATTRIBUTES, VolumeSpec

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "deploy" / "examples"
ISTIO = EXAMPLES / "istio"
K8S_VERSION = "1.37.0"
DRIVER_NAME = "csi-wasm.dev"
TEMPLATE_NAME = "csi-wasm"
# Templates the istiod chart ships; a custom template of the same name replaces Istio's own
# (istiod-injector-configmap.yaml: `if not (hasKey .Values.sidecarInjectorWebhook.templates "sidecar")`).
BUILT_IN_TEMPLATES = {"sidecar", "gateway", "grpc-simple", "grpc-agent", "waypoint", "kube-gateway",
                      "agentgateway", "agentgateway-waypoint"}  # fmt: skip
# files/injection-template.yaml, Istio 1.27.0 to 1.30.0: where istio-proxy goes (initContainers if native)
ISTIO_NATIVE_SIDECAR = ('ne (index .ObjectMeta.Annotations `sidecar.istio.io/nativeSidecar` | '
                        'default (printf "%t" .NativeSidecars)) "false"')  # fmt: skip
# WasmPlugin spec fields of Istio's CRD (istio/api kubernetes/customresourcedefinitions.gen.yaml,
# extensions.istio.io/v1alpha1), with the CEL rules restated in test_wasmplugin_*.
WASMPLUGIN_SPEC_SCHEMA = {
    "type": "object", "required": ["url"], "additionalProperties": False,
    "properties": {
        "selector": {"type": "object", "additionalProperties": False,
                     "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "targetRef": {"type": "object", "required": ["kind", "name"]},
        "targetRefs": {"type": "array", "maxItems": 16},
        "url": {"type": "string", "minLength": 1},
        "sha256": {"type": "string", "pattern": "(^$|^[a-f0-9]{64}$)"},
        "imagePullPolicy": {"enum": ["UNSPECIFIED_POLICY", "IfNotPresent", "Always"]},
        "imagePullSecret": {"type": "string", "minLength": 1, "maxLength": 253},
        "pluginConfig": {"type": "object"},
        "pluginName": {"type": "string", "minLength": 1, "maxLength": 256},
        "phase": {"enum": ["UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"]},
        "priority": {"type": ["integer", "null"]},
        "failStrategy": {"enum": ["FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"]},
        "type": {"enum": ["UNSPECIFIED_PLUGIN_TYPE", "HTTP", "NETWORK"]},
        "match": {"type": "array"},
        "vmConfig": {"type": "object"},
        "verificationKey": {"type": "string"},
    },
}  # fmt: skip


def load(path: pathlib.Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (match,) = [d for d in docs if d["kind"] == kind]
    return match


VALUES = yaml.safe_load((ISTIO / "istiod-values.yaml").read_text())
OPERATOR = yaml.safe_load((ISTIO / "istio-operator.yaml").read_text())
WORKLOAD = load(ISTIO / "workload.yaml")
PER_POD = load(EXAMPLES / "istio.yaml")
TEMPLATE = VALUES["sidecarInjectorWebhook"]["templates"][TEMPLATE_NAME]


# -- a Go text/template subset: exactly what the template uses, nothing else ----------------------


def render(template: str, annotations: dict[str, str], native_sidecars: bool) -> str:
    """Render with Go's trim rules; only `$nativeSidecar := <Istio's expression>`, if/else/end on it."""
    variables: dict[str, bool] = {}
    output: list[str] = []
    emitting: list[bool] = []
    pieces = re.split(r"(\{\{-?\s.*?\s-?\}\})", template)
    for index, piece in enumerate(pieces):
        if index % 2 == 0:
            if index > 0 and pieces[index - 1].endswith("-}}"):
                piece = piece.lstrip()
            if index + 1 < len(pieces) and pieces[index + 1].startswith("{{-"):
                piece = piece.rstrip()
            if all(emitting):
                output.append(piece)
            continue
        action = piece.removeprefix("{{-").removeprefix("{{").removesuffix("-}}").removesuffix("}}").strip()
        if assignment := re.fullmatch(r"\$(\w+) := (.+)", action):
            assert assignment.group(2) == ISTIO_NATIVE_SIDECAR, f"unsupported expression: {action}"
            value = annotations.get("sidecar.istio.io/nativeSidecar") or str(native_sidecars).lower()
            variables[assignment.group(1)] = value != "false"
        elif condition := re.fullmatch(r"if \$(\w+)", action):
            emitting.append(variables[condition.group(1)])
        elif action == "else":
            emitting[-1] = not emitting[-1]
        elif action == "end":
            emitting.pop()
        else:
            raise AssertionError(f"the test's renderer does not know {{{{ {action} }}}}: extend it before using it")
    assert not emitting, "unclosed if"
    return "".join(output)


# -- Istio's merge of a template into the pod: a strategic merge patch ----------------------------

MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "volumeMounts": "mountPath"}


def strategic_merge(original: Any, patch: Any) -> Any:
    if isinstance(original, dict) and isinstance(patch, dict):
        merged = dict(original)
        for key, value in patch.items():
            if key in MERGE_KEYS and isinstance(value, list):
                merged[key] = merge_list(original.get(key, []), value, MERGE_KEYS[key])
            else:
                merged[key] = strategic_merge(original.get(key), value) if key in original else value
        return merged
    return patch


def merge_list(original: list[dict[str, Any]], patch: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    merged = [dict(item) for item in original]
    for item in patch:
        same = [i for i, existing in enumerate(merged) if existing.get(key) == item.get(key)]
        if same:
            merged[same[0]] = strategic_merge(merged[same[0]], item)
        else:
            merged.append(item)
    return merged


def sidecar_template_result(native: bool) -> dict[str, Any]:
    """What Istio's "sidecar" template contributes, reduced to what matters here: istio-proxy's place."""
    proxy = {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.30.0",
             "volumeMounts": [{"name": "istio-envoy", "mountPath": "/etc/istio/proxy"}]}  # fmt: skip
    if native:
        return {"spec": {"initContainers": [proxy | {"restartPolicy": "Always"}], "volumes": [{"name": "istio-envoy", "emptyDir": {}}]}}
    return {"spec": {"containers": [proxy], "volumes": [{"name": "istio-envoy", "emptyDir": {}}]}}


def inject(pod_template: dict[str, Any], template: str, annotations: dict[str, str], native_sidecars: bool) -> dict[str, Any]:
    """Istio's RunTemplate: apply each default template's output in order (sidecar, then ours)."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "httpbin-0", "namespace": "wasm-mesh",
           "annotations": annotations}, "spec": copy.deepcopy(pod_template["spec"])}  # fmt: skip
    native = (annotations.get("sidecar.istio.io/nativeSidecar") or str(native_sidecars).lower()) != "false"
    outputs = {"sidecar": sidecar_template_result(native),
               TEMPLATE_NAME: yaml.safe_load(render(template, annotations, native_sidecars))}  # fmt: skip
    for name in VALUES["sidecarInjectorWebhook"]["defaultTemplates"]:
        pod = strategic_merge(pod, outputs[name])
    return pod


def proxy_of(pod: dict[str, Any]) -> dict[str, Any]:
    (proxy,) = [c for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"] if c["name"] == "istio-proxy"]
    return proxy


def template_volume() -> dict[str, Any]:
    (volume,) = yaml.safe_load(render(TEMPLATE, {}, False))["spec"]["volumes"]
    return dict(volume)


# -- injector values ------------------------------------------------------------------------------


def test_injector_values_register_the_template_and_make_it_a_default() -> None:
    assert set(VALUES) == {"sidecarInjectorWebhook"}
    webhook = VALUES["sidecarInjectorWebhook"]
    assert set(webhook) == {"templates", "defaultTemplates"}
    assert set(webhook["templates"]) == {TEMPLATE_NAME} and not BUILT_IN_TEMPLATES & set(webhook["templates"])
    # "sidecar" first: ours patches the istio-proxy container the sidecar template creates
    assert webhook["defaultTemplates"] == ["sidecar", TEMPLATE_NAME]
    assert isinstance(TEMPLATE, str)


def test_istioctl_form_carries_the_same_values() -> None:
    assert OPERATOR["apiVersion"] == "install.istio.io/v1alpha1" and OPERATOR["kind"] == "IstioOperator"
    assert set(OPERATOR["spec"]) == {"values"} and OPERATOR["spec"]["values"] == VALUES


def test_the_renderer_refuses_what_it_does_not_implement() -> None:
    with pytest.raises(AssertionError, match="does not know"):
        render("spec: {{ .Values.global.hub }}", {}, False)
    with pytest.raises(AssertionError, match="unsupported expression"):
        render('{{- $nativeSidecar := eq (env "ENABLE_NATIVE_SIDECARS" "false") "true" }}', {}, False)


CASES = [(native, annotation) for native in (False, True) for annotation in (None, "true", "false")]


@pytest.mark.parametrize("native_sidecars,annotation", CASES, ids=lambda v: str(v))
def test_template_mounts_the_module_into_istio_proxy_wherever_it_lives(native_sidecars: bool, annotation: str | None) -> None:
    workload = find(WORKLOAD, "Deployment")["spec"]["template"]
    annotations = {"sidecar.istio.io/nativeSidecar": annotation} if annotation else {}
    pod = inject(workload, TEMPLATE, annotations, native_sidecars)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
        assert container.get("image"), f"{container['name']} has no image: the template made a new container"
    volume = template_volume()
    proxy = proxy_of(pod)
    mounts = [m for m in proxy["volumeMounts"] if m["name"] == volume["name"]]
    assert mounts == [{"name": volume["name"], "mountPath": "/var/local/lib/wasm-filters", "readOnly": True}]
    assert len(proxy["volumeMounts"]) == 2, "the sidecar template's own mounts are kept"
    assert volume in pod["spec"]["volumes"] and len(pod["spec"]["volumes"]) == 2
    app = next(c for c in pod["spec"]["containers"] if c["name"] == "httpbin")
    assert "volumeMounts" not in app, "the module is the proxy's, not the application's"


def test_a_template_that_ignores_native_sidecars_is_caught() -> None:
    """A control: mounting under `containers` only breaks native-sidecar pods, and the check sees it."""
    naive = re.sub(r"\{\{- if \$nativeSidecar \}\}.*?\{\{- end \}\}", "containers:", TEMPLATE, flags=re.S)
    assert naive != TEMPLATE
    pod = inject(find(WORKLOAD, "Deployment")["spec"]["template"], naive, {}, True)
    assert any(not c.get("image") for c in pod["spec"]["containers"])


def test_template_volume_is_a_read_only_csi_wasm_volume_the_driver_accepts() -> None:
    volume = template_volume()
    assert volume["csi"]["driver"] == DRIVER_NAME and volume["csi"]["readOnly"] is True
    attributes = volume["csi"]["volumeAttributes"]
    assert set(attributes) <= KNOWN_ATTRIBUTES
    spec = VolumeSpec.parse(attributes, {}, Keychain())
    assert spec.module.module_digest and spec.file_name == "ratelimit.wasm"


# -- the mesh-wide workload -----------------------------------------------------------------------


def test_workload_needs_no_annotations() -> None:
    namespace, deployment = find(WORKLOAD, "Namespace"), find(WORKLOAD, "Deployment")
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"
    assert deployment["metadata"]["namespace"] == namespace["metadata"]["name"]
    assert not deployment["spec"]["template"]["metadata"].get("annotations")
    assert "volumes" not in deployment["spec"]["template"]["spec"]


def check_wasmplugin(plugin: dict[str, Any], deployment: dict[str, Any], mount_path: str, file_name: str) -> None:
    assert plugin["apiVersion"] == "extensions.istio.io/v1alpha1"
    jsonschema.validate(plugin["spec"], WASMPLUGIN_SPEC_SCHEMA)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": plugin["metadata"]},
                                 K8S_VERSION, strict=True)  # fmt: skip
    spec = plugin["spec"]
    # CRD rule: only one of selector, targetRef, targetRefs
    assert sum(key in spec for key in ("selector", "targetRef", "targetRefs")) <= 1
    assert plugin["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert spec["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # CRD rule: the url's scheme is one of http, https, oci, file; here file:// plus the mounted path
    assert spec["url"] == f"file://{mount_path}/{file_name}"
    # istiod turns a file:// url into a local data source without a checksum
    # (pilot/pkg/model/extensions.go buildDataSource): a sha256 here would check nothing
    assert "sha256" not in spec


def test_workload_wasmplugin_loads_the_file_the_template_mounts() -> None:
    volume = template_volume()
    rendered = yaml.safe_load(render(TEMPLATE, {}, False))
    (mount,) = rendered["spec"]["containers"][0]["volumeMounts"]
    spec = VolumeSpec.parse(volume["csi"]["volumeAttributes"], {}, Keychain())
    check_wasmplugin(find(WORKLOAD, "WasmPlugin"), find(WORKLOAD, "Deployment"), mount["mountPath"], spec.file_name)


# -- the per-pod example (annotations) ------------------------------------------------------------


def per_pod_parts() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The volume and mount as Istio's sidecar template renders the annotations.

    The template does `range $index, $value := fromJSON (annotation)` and writes `name: "{{ $index }}"`
    followed by `toYaml $value`: the annotation is an object keyed by volume name.
    """
    template = find(PER_POD, "Deployment")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    volumes, mounts = (json.loads(annotations[f"sidecar.istio.io/{key}"]) for key in ("userVolume", "userVolumeMount"))
    assert isinstance(volumes, dict) and isinstance(mounts, dict) and volumes.keys() == mounts.keys()
    assert all("name" not in value for value in [*volumes.values(), *mounts.values()]), "the name is the key"
    ((name, volume),), ((_, mount),) = volumes.items(), mounts.items()
    return template, {"name": name, **volume}, {"name": name, **mount}


def test_per_pod_annotations_add_a_csi_wasm_volume_to_the_proxy_only() -> None:
    template, volume, mount = per_pod_parts()
    assert volume["csi"]["driver"] == DRIVER_NAME and volume["csi"]["readOnly"] is True and mount["readOnly"] is True
    assert set(volume["csi"]["volumeAttributes"]) <= KNOWN_ATTRIBUTES
    VolumeSpec.parse(volume["csi"]["volumeAttributes"], {}, Keychain())
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "httpbin-0", "namespace": "wasm-demo"},
           "spec": copy.deepcopy(template["spec"])}  # fmt: skip
    pod = strategic_merge(pod, sidecar_template_result(False))
    pod = strategic_merge(pod, {"spec": {"volumes": [volume], "containers": [{"name": "istio-proxy", "volumeMounts": [mount]}]}})
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert mount in proxy_of(pod)["volumeMounts"]


def test_per_pod_wasmplugin_loads_the_mounted_file() -> None:
    _, volume, mount = per_pod_parts()
    spec = VolumeSpec.parse(volume["csi"]["volumeAttributes"], {}, Keychain())
    check_wasmplugin(find(PER_POD, "WasmPlugin"), find(PER_POD, "Deployment"), mount["mountPath"], spec.file_name)


# -- README ---------------------------------------------------------------------------------------


def test_readme_istio_section_gives_both_paths_and_says_what_was_checked() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Istio: load a Wasm filter from a file\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert match, "README has no Istio section"
    section = match.group(1)
    for needle in ("deploy/examples/istio/istiod-values.yaml", "defaultTemplates", "inject.istio.io/templates",
                   "sidecar.istio.io/userVolume", find(WORKLOAD, "WasmPlugin")["spec"]["url"], "moduleDigest",
                   "@sha256:", "sha256", "tests/test_istio.py", "Not checked"):  # fmt: skip
        assert needle in section, needle
