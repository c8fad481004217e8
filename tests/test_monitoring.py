"""deploy/monitoring/ (PodMonitor, PrometheusRule) and deploy/grafana-dashboard.json.

Every alert and panel expression is parsed with a real PromQL parser (promql-parser) and checked
against the exposition of a real driver: a real registry, real publishes (successes and failures),
a real unpublish, a real garbage collection and a real start-up recovery with repairs, scraped over
HTTP from the driver's own /metrics. A metric, label or label value the driver does not export
fails the test; so does an alert description or legend that names a label its expression drops.

The Prometheus Operator CRDs are too large to vendor (the PodMonitor CRD is 74 kB); the fields used
here are checked one by one against schemas written from them (see the comments).
"""

from __future__ import annotations

import json
import pathlib
import re
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc
import jsonschema
import kubernetes_validate
import promql_parser as promql
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from csi_wasm.config import NodeConfig, StoreConfig
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.gc import GarbageCollector
from csi_wasm.http import MetricsServer

from conftest import fast_pull_config, start_driver, stop_driver

ROOT = pathlib.Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
DAEMONSET_DOCS = [d for d in yaml.safe_load_all((ROOT / "deploy" / "daemonset.yaml").read_text()) if d]
DAEMONSET = next(d for d in DAEMONSET_DOCS if d["kind"] == "DaemonSet")
POD_MONITOR = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
RULE = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
DASHBOARD = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
README = (ROOT / "README.md").read_text()
K8S_VERSION = "1.37.0"

# Labels the Prometheus Operator puts on every PodMonitor target: namespace, container, pod, job and
# endpoint (prometheus-operator v0.93.0, pkg/prometheus/promcfg.go, generatePodMonitorConfig), plus
# Prometheus's own instance (from __address__). The PodMonitor's relabelings add the rest.
OPERATOR_TARGET_LABELS = frozenset({"namespace", "container", "pod", "job", "endpoint", "instance"})
# Series Prometheus writes itself for every target (Prometheus docs, "Jobs and instances": up,
# scrape_duration_seconds, ...); of those the rules use only `up`.
SYNTHETIC_SERIES = frozenset({"up"})
GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

# -- schemas written from the CRDs (prometheus-operator v0.93.0, example/prometheus-operator-crd/) ---

DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                   "matchExpressions": {"type": "array"}},
}  # fmt: skip
RELABEL_CONFIG = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap",
                            "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase",
                            "uppercase", "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"]},
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "targetLabel": {"type": "string"}, "regex": {"type": "string"}, "replacement": {"type": "string"},
        "separator": {"type": "string"}, "modulus": {"type": "integer"},
    },
}  # fmt: skip
POD_MONITOR_SPEC = {
    "type": "object", "required": ["selector"], "additionalProperties": False,
    "properties": {
        "jobLabel": {"type": "string"},
        "selector": LABEL_SELECTOR,
        "namespaceSelector": {"type": "object", "additionalProperties": False,
                              "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array"}}},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"port": {"type": "string"}, "portNumber": {"type": "integer"}, "path": {"type": "string"},
                           "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]}, "interval": DURATION,
                           "scrapeTimeout": DURATION, "honorLabels": {"type": "boolean"},
                           "relabelings": {"type": "array", "items": RELABEL_CONFIG},
                           "metricRelabelings": {"type": "array", "items": RELABEL_CONFIG}},
        }},
    },
}  # fmt: skip
PROMETHEUS_RULE_SPEC = {
    "type": "object", "additionalProperties": False,
    "properties": {"groups": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1}, "interval": DURATION, "limit": {"type": "integer"},
            "query_offset": DURATION, "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "rules": {"type": "array", "items": {
                "type": "object", "required": ["expr"], "additionalProperties": False,
                "properties": {
                    "alert": {"type": "string"}, "record": {"type": "string"},
                    "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                    "for": DURATION, "keep_firing_for": DURATION,
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            }},
        },
    }}},
}  # fmt: skip


# -- the real exposition -------------------------------------------------------------------------


@dataclass(frozen=True)
class Exposition:
    """Series name -> label name -> values seen on a real driver's /metrics."""

    series: dict[str, dict[str, set[str]]]
    target_labels: frozenset[str]

    def labels_of(self, name: str) -> frozenset[str]:
        own = frozenset(self.series.get(name, {}))
        return own | self.target_labels

    def values_of(self, label: str) -> set[str]:
        return {value for labels in self.series.values() for value in labels.get(label, set())}


def pod_monitor_target_labels() -> frozenset[str]:
    added = {r["targetLabel"] for e in POD_MONITOR["spec"]["podMetricsEndpoints"] for r in e.get("relabelings", [])}
    return OPERATOR_TARGET_LABELS | added


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory, registry: LocalRegistry, pusher: Pusher) -> Iterator[Exposition]:
    root = tmp_path_factory.mktemp("monitoring")
    # state a killed driver leaves behind, so the start-up recovery really repairs (and counts) it
    (root / "state" / "store" / "tmp").mkdir(parents=True)
    (root / "state" / "store" / "tmp" / "interrupted-download").write_bytes(b"partial")
    (root / "state" / "volumes").mkdir(parents=True)
    (root / "state" / "volumes" / "torn.json").write_text('{"target_path": ')
    node = NodeConfig(pull=fast_pull_config(), store=StoreConfig(gc_grace_seconds=0)).with_insecure([registry.host])
    running = start_driver(root, node)
    server = MetricsServer("127.0.0.1", 0, running.driver.metrics.registry, running.driver.is_ready).start()
    try:
        good = pusher.wasm_artifact("monitoring/good", "v1", make_module(3000, "monitoring-good"))
        not_wasm = pusher.wasm_artifact("monitoring/notwasm", "v1", b"not a module at all" * 20)
        first, second = running.volume(good.reference), running.volume(good.reference)
        running.kubelet.mount(first)
        running.kubelet.mount(second)  # served from the store
        for failing in (running.volume(f"{registry.host}/monitoring/missing:v1"), running.volume(not_wasm.reference)):
            with pytest.raises(grpc.RpcError):
                running.kubelet.mount(failing)
        running.kubelet.unmount(first)
        running.kubelet.unmount(second)
        driver = running.driver  # a collector without the "just downloaded" protection: the module goes now
        collector = GarbageCollector(driver.store, driver.records, driver.pins, driver.config.node.store, driver.metrics)
        assert collector.collect().removed
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
    finally:
        server.stop()
        stop_driver(running)
    series: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = series.setdefault(sample.name, {})
            for key, value in sample.labels.items():
                labels.setdefault(key, set()).add(value)
    yield Exposition(series, pod_monitor_target_labels())


# -- a small PromQL checker on top of the parser --------------------------------------------------


def parse(expression: str) -> promql.Expr:
    for variable, value in GRAFANA_INTERVALS.items():
        expression = expression.replace(variable, value)
    return promql.parse(expression)


def nodes(expression: promql.Expr) -> list[promql.Expr]:
    found: list[promql.Expr] = []
    promql.walk(expression, lambda node: found.append(node))
    return found


def result_labels(node: promql.Expr, exposition: Exposition) -> frozenset[str] | None:
    """The labels an expression's result series carry (None: a scalar), after Prometheus's rules."""
    recurse: Callable[[promql.Expr], frozenset[str] | None] = lambda n: result_labels(n, exposition)  # noqa: E731
    if isinstance(node, promql.VectorSelector):
        return exposition.labels_of(node.name or "")
    if isinstance(node, promql.MatrixSelector):
        return recurse(node.vector_selector)
    if isinstance(node, (promql.ParenExpr, promql.UnaryExpr, promql.SubqueryExpr)):
        return recurse(node.expr)
    if isinstance(node, (promql.NumberLiteral, promql.StringLiteral)):
        return None
    if isinstance(node, promql.Call):
        vectors = [labels for labels in map(recurse, node.args) if labels is not None]
        name = node.func.name
        if name == "histogram_quantile":
            return vectors[0] - {"le"}
        if name == "label_replace":
            return vectors[0] | {node.args[1].val}
        return vectors[0] if vectors else None
    if isinstance(node, promql.AggregateExpr):
        inner = recurse(node.expr) or frozenset()
        if str(node.op) in ("topk", "bottomk", "limitk", "limit_ratio"):
            return inner
        if node.modifier is None:
            return frozenset()
        labels = frozenset(node.modifier.labels)
        return labels if node.modifier.type == promql.AggModifierType.By else inner - labels
    if isinstance(node, promql.BinaryExpr):
        left, right = recurse(node.lhs), recurse(node.rhs)
        if left is None or right is None:
            return right if left is None else left
        op, modifier = str(node.op), node.modifier
        if op == "or":
            return left | right
        if op in ("and", "unless") or (op in ("==", "!=", ">", "<", ">=", "<=") and not (modifier and modifier.return_bool)):
            return left  # set operators and comparison filters keep the left-hand series as they are
        matching = modifier.matching if modifier else None
        if modifier and modifier.card in (promql.VectorMatchCardinality.ManyToOne, promql.VectorMatchCardinality.OneToMany):
            many = left if modifier.card == promql.VectorMatchCardinality.ManyToOne else right
            return many | frozenset(modifier.group_labels or [])
        if matching is None:
            return left
        if matching.type == promql.LabelModifierType.Include:
            return frozenset(matching.labels)
        return left - frozenset(matching.labels)
    raise AssertionError(f"unexpected PromQL node {type(node).__name__}")


def problems(expression: str, exposition: Exposition, used_labels: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """What in an expression the driver does not export: metrics, labels, label values, dropped labels."""
    tree = parse(expression)
    found, selector_labels = [], set(exposition.target_labels)
    for node in nodes(tree):
        if isinstance(node, promql.VectorSelector):
            name = node.name or ""
            if name not in exposition.series and name not in SYNTHETIC_SERIES:
                found.append(f"metric {name} is not exported")
                continue
            labels = exposition.labels_of(name)
            selector_labels |= labels
            for matcher in node.matchers.matchers:
                if matcher.name not in labels:
                    found.append(f"{name} has no label {matcher.name}")
                elif matcher.name not in exposition.target_labels and "$" not in matcher.value:
                    found += value_problems(name, matcher, exposition.series[name][matcher.name])
    for node in nodes(tree):
        for label in grouping_labels(node):
            if label not in selector_labels:
                found.append(f"label {label} (grouping) is on none of the selected series")
    kept = result_labels(tree, exposition) or frozenset()
    found += [f"label {label} is used but the expression's result drops it" for label in used_labels - kept]
    return found


def value_problems(name: str, matcher: promql.Matcher, exported: set[str]) -> list[str]:
    if matcher.op in (promql.MatchOp.Equal, promql.MatchOp.NotEqual):
        alternatives = [matcher.value]
        matches: Callable[[str, str], bool] = lambda alternative, value: alternative == value  # noqa: E731
    else:
        alternatives = matcher.value.split("|")
        matches = lambda alternative, value: re.fullmatch(alternative, value) is not None  # noqa: E731
    return [f"{name}{{{matcher.name}}} never has the value {alternative!r}" for alternative in alternatives
            if not any(matches(alternative, value) for value in exported)]  # fmt: skip


def grouping_labels(node: promql.Expr) -> list[str]:
    if isinstance(node, promql.AggregateExpr) and node.modifier is not None:
        return list(node.modifier.labels)
    if isinstance(node, promql.BinaryExpr) and node.modifier is not None:
        matching = node.modifier.matching.labels if node.modifier.matching else []
        return [*matching, *(node.modifier.group_labels or [])]
    return []


def alerts() -> list[dict[str, Any]]:
    return [rule for group in RULE["spec"]["groups"] for rule in group["rules"]]


def annotation_labels(rule: dict[str, Any]) -> set[str]:
    return {m for text in rule["annotations"].values() for m in re.findall(r"\$labels\.(\w+)", text)}


def panel_targets() -> list[tuple[str, dict[str, Any]]]:
    return [(panel["title"], target) for panel in DASHBOARD["panels"] for target in panel["targets"]]


# -- the checker is live --------------------------------------------------------------------------


def test_the_checker_rejects_what_the_driver_does_not_export(exposition: Exposition) -> None:
    assert not problems('sum by (node, result) (rate(csi_wasm_publish_total{result="not_found"}[5m]))', exposition)
    assert problems("rate(csi_wasm_publishes_total[5m])", exposition) == ["metric csi_wasm_publishes_total is not exported"]
    assert problems('csi_wasm_publish_total{image="x"}', exposition) == ["csi_wasm_publish_total has no label image"]
    assert problems('csi_wasm_publish_total{result="nope"}', exposition)
    assert problems('csi_wasm_publish_total{result=~"success|nope"}', exposition)
    assert problems("sum by (digest) (csi_wasm_store_bytes)", exposition)
    assert problems("sum by (result) (csi_wasm_publish_total) > 0", exposition, {"node"})
    assert not problems("sum by (node, result) (csi_wasm_publish_total) > 0", exposition, {"node"})
    with pytest.raises(Exception):
        parse("sum by (node (csi_wasm_ready)")


def test_the_exposition_holds_what_the_rules_need(exposition: Exposition) -> None:
    """The fixture exercised the paths the alerts watch: a checker fed an empty exposition proves nothing."""
    assert exposition.series["csi_wasm_start_repairs_total"]["kind"] >= {"temp_file", "unreadable_record"}
    assert {"success", "not_found", "invalid_wasm", "internal", "resource_exhausted"} <= \
        exposition.series["csi_wasm_publish_total"]["result"]  # fmt: skip
    for name in ("csi_wasm_ready", "csi_wasm_store_max_bytes", "csi_wasm_store_min_free_bytes",
                 "csi_wasm_store_filesystem_free_bytes", "csi_wasm_pull_duration_seconds_bucket",
                 "csi_wasm_gc_evictions_total", "process_start_time_seconds"):  # fmt: skip
        assert name in exposition.series, name


# -- PodMonitor -----------------------------------------------------------------------------------


def test_podmonitor_scrapes_the_driver_port_and_labels_targets_with_the_node() -> None:
    assert POD_MONITOR["apiVersion"] == "monitoring.coreos.com/v1" and POD_MONITOR["kind"] == "PodMonitor"
    jsonschema.validate(POD_MONITOR["spec"], POD_MONITOR_SPEC)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": POD_MONITOR["metadata"]},
                                 K8S_VERSION, strict=True)  # fmt: skip
    pod_template = DAEMONSET["spec"]["template"]
    assert POD_MONITOR["metadata"]["namespace"] == DAEMONSET["metadata"]["namespace"]
    assert POD_MONITOR["spec"]["selector"]["matchLabels"].items() <= pod_template["metadata"]["labels"].items()
    (endpoint,) = POD_MONITOR["spec"]["podMetricsEndpoints"]
    driver = next(c for c in pod_template["spec"]["containers"] if c["name"] == "csi-wasm")
    ports = {p["name"]: p["containerPort"] for p in driver["ports"]}
    assert endpoint["port"] == "metrics" and str(ports["metrics"]) == pod_template["metadata"]["annotations"]["prometheus.io/port"]
    assert endpoint["path"] == pod_template["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node", "action": "replace"} in endpoint["relabelings"]
    assert pod_template["metadata"]["labels"][POD_MONITOR["spec"]["jobLabel"]] == "csi-wasm"  # job="csi-wasm"


# -- PrometheusRule -------------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_section(alert: str) -> str:
    match = re.search(rf"^#### {alert}\n(.*?)(?=^#{{1,4}} |\Z)", README, re.S | re.M)
    assert match, f"README has no runbook section '#### {alert}'"
    return match.group(1)


def test_prometheusrule_structure_follows_the_crd() -> None:
    assert RULE["apiVersion"] == "monitoring.coreos.com/v1" and RULE["kind"] == "PrometheusRule"
    jsonschema.validate(RULE["spec"], PROMETHEUS_RULE_SPEC)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": RULE["metadata"]},
                                 K8S_VERSION, strict=True)  # fmt: skip
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)) >= 10
    for rule in alerts():
        assert re.fullmatch(r"CsiWasm[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, rule["alert"]


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_alert_expressions_name_only_what_the_driver_exports(rule: dict[str, Any], exposition: Exposition) -> None:
    assert problems(rule["expr"], exposition, annotation_labels(rule)) == []
    job = DAEMONSET["spec"]["template"]["metadata"]["labels"][POD_MONITOR["spec"]["jobLabel"]]
    for node in nodes(parse(rule["expr"])):
        if isinstance(node, promql.VectorSelector):
            assert all(m.value == job for m in node.matchers.matchers if m.name == "job"), "the PodMonitor's job"


def test_alerts_cover_what_on_call_must_act_on() -> None:
    watched = " ".join(rule["expr"] for rule in alerts())
    for needle in ("csi_wasm_ready", 'up{job="csi-wasm"}', "csi_wasm_publish_total", "csi_wasm_unpublish_total",
                   "csi_wasm_pulls_total", "csi_wasm_pull_duration_seconds_bucket", "csi_wasm_store_max_bytes",
                   "csi_wasm_store_min_free_bytes", "csi_wasm_start_repairs_total", 'result="resource_exhausted"'):  # fmt: skip
        assert needle in watched, needle


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_links_to_its_runbook_section_in_the_readme(rule: dict[str, Any]) -> None:
    section = runbook_section(rule["alert"])
    assert rule["annotations"]["runbook_url"] == f"https://csi-wasm.example/README.md#{github_anchor(rule['alert'])}"
    assert len(section.split()) >= 30, f"the runbook for {rule['alert']} says too little"
    assert re.search(r"`[^`]+`", section), f"the runbook for {rule['alert']} names nothing to check or change"


# -- Grafana dashboard ----------------------------------------------------------------------------


def test_dashboard_variables_are_queries_on_exported_labels(exposition: Exposition) -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["job"]["type"] == variables["node"]["type"] == "query"
    assert variables["node"]["includeAll"] is True and variables["node"]["allValue"] == ".*"
    for name in ("job", "node"):
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variables[name]["query"]["query"])
        assert match and match.group(2) == name
        assert problems(match.group(1), exposition) == []
        assert name in exposition.target_labels


@pytest.mark.parametrize("title,target", panel_targets(), ids=lambda v: v if isinstance(v, str) else v["refId"])
def test_every_panel_filters_by_job_and_node_and_names_exported_series(
    title: str, target: dict[str, Any], exposition: Exposition
) -> None:
    legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
    assert problems(target["expr"], exposition, legend) == []
    for node in nodes(parse(target["expr"])):
        if isinstance(node, promql.VectorSelector):
            filters = {(m.name, m.value) for m in node.matchers.matchers if m.op == promql.MatchOp.Re}
            assert {("job", "$job"), ("node", "$node")} <= filters, title
    if "by node" in title:
        assert "node" in (result_labels(parse(target["expr"]), exposition) or set()), title
    assert "instance" not in target["expr"], "instance is the pod IP: group by node"


# -- the annotation-scrape path stays documented --------------------------------------------------


def test_readme_documents_both_scrape_paths() -> None:
    section = re.search(r"^## Monitoring and alerts\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert section, "README has no '## Monitoring and alerts' section"
    text = section.group(1)
    assert "deploy/monitoring/podmonitor.yaml" in text and "deploy/monitoring/prometheusrule.yaml" in text
    assert "__meta_kubernetes_pod_node_name" in text and "prometheus.io/scrape" in text
