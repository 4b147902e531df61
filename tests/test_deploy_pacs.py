"""The PACS bridge's manifests, validated offline (strict schemas of the supported Kubernetes releases)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parent.parent / "k8s"
K8S_VERSIONS = ("1.34.0", "1.37.0")
FILES = ("pacs-bridge-statefulset.yaml", "pacs-bridge-service.yaml", "pacs-bridge-networkpolicy.yaml")


def docs() -> list[dict[str, Any]]:
    return [d for f in FILES for d in yaml.safe_load_all((K8S / f).read_text()) if d]


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs() if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_bridge_objects_validate_strictly(version: str) -> None:
    for doc in docs():
        kubernetes_validate.validate(doc, version, strict=True)


def test_statefulset_spools_on_a_claim_and_ports_agree() -> None:
    sts = by_kind("StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "spool"
    spool = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--spool="))
    assert {"name": "spool", "mountPath": spool} in c["volumeMounts"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"dicom": 11112, "metrics": 9465}
    assert f"--port={ports['dicom']}" in c["args"] and f"--metrics-port={ports['metrics']}" in c["args"]
    assert any(a.startswith("--allow-ae=") for a in c["args"])
    svc = by_kind("Service")
    assert {p["port"] for p in svc["spec"]["ports"]} == {11112, 9465}
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_bridge_pod_is_restricted_and_has_no_token() -> None:
    pod = by_kind("StatefulSet")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True


def test_networkpolicy_admits_only_the_pacs_range_and_reaches_only_gateway_pacs_dns() -> None:
    pol = by_kind("NetworkPolicy")["spec"]
    dicom = [r for r in pol["ingress"] if any(p["port"] == 11112 for p in r["ports"])]
    assert len(dicom) == 1 and all("ipBlock" in f for f in dicom[0]["from"])
    egress_ports = {p["port"] for r in pol["egress"] for p in r["ports"]}
    assert egress_ports == {50051, 104, 11112, 53}


# --- alerts --------------------------------------------------------------------------------------------------------


def pacs_alerts() -> dict[str, dict[str, Any]]:
    from test_deploy import alert_rules

    return {r["alert"]: r for r in alert_rules() if r.get("alert", "").startswith("NeuroExplainPacs")}


def test_bridge_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool rule unit tests: a failing bridge and a filling spool page/warn; a healthy one stays silent."""
    from conftest import require_binary
    from test_deploy import _annotations, _rules_file

    promtool = require_binary("promtool", "runs unit tests of the alert rules")
    rules = _rules_file(tmp_path)
    ns = 'namespace="neuroexplain"'
    pod = 'pod="neuroexplain-pacs-bridge-0"'
    tests = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # 10 series a minute: 8 stored, 2 refused by the service (20% failed).
                {"series": f'neuroexplain_pacs_series_stored_total{{{ns}, {pod}}}', "values": "0+8x60"},
                {"series": f'neuroexplain_pacs_series_failed_total{{{ns}, {pod}, stage="service"}}',
                 "values": "0+2x60"},
                {"series": f'neuroexplain_pacs_series_failed_total{{{ns}, {pod}, stage="destination"}}',
                 "values": "0x60"},
                # a healthy namespace: 1 failure in 100
                {"series": 'neuroexplain_pacs_series_stored_total{namespace="ok", pod="b-0"}', "values": "0+99x60"},
                {"series": 'neuroexplain_pacs_series_failed_total{namespace="ok", pod="b-0", stage="service"}',
                 "values": "0+1x60"},
                # spool: 90% full on one pod, 50% on another
                {"series": f'neuroexplain_pacs_spool_bytes{{{ns}, {pod}}}', "values": "900x60"},
                {"series": f'neuroexplain_pacs_spool_max_bytes{{{ns}, {pod}}}', "values": "1000x60"},
                {"series": 'neuroexplain_pacs_spool_bytes{namespace="ok", pod="b-0"}', "values": "500x60"},
                {"series": 'neuroexplain_pacs_spool_max_bytes{namespace="ok", pod="b-0"}', "values": "1000x60"},
            ],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": "NeuroExplainPacsSeriesFailing",
                 "exp_alerts": [{"exp_labels": {"severity": "page", "namespace": "neuroexplain"},
                                 "exp_annotations": _annotations("NeuroExplainPacsSeriesFailing",
                                                                 namespace="neuroexplain", value="20%")}]},
                {"eval_time": "5m", "alertname": "NeuroExplainPacsSeriesFailing", "exp_alerts": []},
                {"eval_time": "30m", "alertname": "NeuroExplainPacsSpoolFilling",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "neuroexplain",
                                                "pod": "neuroexplain-pacs-bridge-0"},
                                 "exp_annotations": _annotations("NeuroExplainPacsSpoolFilling",
                                                                 pod="neuroexplain-pacs-bridge-0")}]},
                {"eval_time": "5m", "alertname": "NeuroExplainPacsSpoolFilling", "exp_alerts": []},
            ],
        }],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, check=False,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bridge_alerts_name_only_metrics_a_running_bridge_exports(tmp_path: Path) -> None:
    """Every metric the bridge alerts name is on a real bridge's /metrics (the gateway does not export them)."""
    from orthanc import free_port
    from prometheus_client.parser import text_string_to_metric_families
    from test_deploy import promql_metric_names

    alerts = pacs_alerts()
    assert set(alerts) == {"NeuroExplainPacsSeriesFailing", "NeuroExplainPacsSpoolFilling"}
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("page", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    metrics_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuroexplain.pacs", "--spool", str(tmp_path / "spool"), "--host", "127.0.0.1",
         "--port", str(free_port()), "--metrics-port", str(metrics_port), "--server", f"127.0.0.1:{free_port()}",
         "--send-to", f"PACS@127.0.0.1:{free_port()}", "--allow-ae", "PACS"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            page = r.read().decode()
    finally:
        proc.terminate()
        proc.wait(60)
    exported = {s.name for f in text_string_to_metric_families(page) for s in f.samples}
    used = set().union(*(promql_metric_names(r["expr"]) for r in alerts.values()))
    assert used and used <= exported, sorted(used - exported)
    assert all(name.startswith("neuroexplain_pacs_") for name in used)


# --- the bridge's image ------------------------------------------------------------------------------------------


def test_dockerfile_bridge_target_is_light_non_root_and_not_the_default() -> None:
    from test_deploy import _dockerfile_env, by_stage, dockerfile_stages

    _, stages = dockerfile_stages()
    names = [s.name for s in stages]
    assert names[-1] != "bridge" and names.index("bridge") < len(names) - 1, "plain `docker build` = the gateway"
    build, bridge = by_stage(stages, "bridge-build"), by_stage(stages, "bridge")
    assert build.base == "os" and bridge.base == "os"
    (run,) = [r for r in build.args_of("RUN") if "pip install" in r]
    assert '".[pacs]"' in run and "torch" not in run.split("import torch")[0]
    assert '! /opt/neuroexplain-bridge/venv/bin/python -c "import torch"' in run
    assert '! /opt/neuroexplain-bridge/venv/bin/python -c "import numpy"' in run
    installs = " ".join(a for a in bridge.args_of("RUN") if "apt-get install" in a)
    assert "tini" in installs and "openjdk" not in installs
    copies = bridge.args_of("COPY")
    assert copies and all(c.startswith("--from=bridge-build ") for c in copies)
    user = bridge.args_of("USER")[-1]
    assert int(user.split(":")[0]) >= 1000
    entrypoint = json.loads(bridge.args_of("ENTRYPOINT")[-1])
    assert entrypoint == ["/usr/bin/tini", "--", "neuroexplain", "pacs-bridge"]
    sts = by_kind("StatefulSet")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert "command" not in c and c["image"].split("/")[-1].startswith("neuroexplain-bridge:")
    spool = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--spool="))
    assert _dockerfile_env(bridge)["PATH"].startswith("/opt/neuroexplain-bridge/venv/bin")
    assert f"install -d -o 10001 -g 10001 {spool}" in installs
    exposed = {int(p) for e in bridge.args_of("EXPOSE") for p in e.split()}
    assert exposed == {p["containerPort"] for p in c["ports"]}
