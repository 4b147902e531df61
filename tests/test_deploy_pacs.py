"""The PACS bridge's manifests, validated offline (strict schemas of the supported Kubernetes releases)."""

from __future__ import annotations

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
