"""deploy/: the Kubernetes manifests against the API's schemas (kubernetes-validate), the
compose file against the Compose specification (check-jsonschema's copy), and both
against the code: every PARLEY_* name they set is a setting Parley reads, every probe a
route it serves, and the grace periods fit the drain.

No cluster or Docker engine runs here; these checks are what can be known without one.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from agent.config import Settings, load_settings
from agent.front.app import create_app

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
SETTINGS = {f.name for f in dataclasses.fields(Settings)}


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _objects() -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc
            for path in MANIFESTS for doc in _documents(path)}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path):
    for doc in _documents(path):
        kubernetes_validate.validate(doc, latest_version(), strict=True)


def test_every_part_of_a_deployment_is_there():
    kinds = {kind for kind, _ in _objects()}
    assert kinds >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "StatefulSet", "ConfigMap", "Secret"}


def test_compose_file_follows_the_compose_specification():
    checker = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec",
                             str(DEPLOY / "compose.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _parley_names(text: str) -> set[str]:
    return set(re.findall(r"\bPARLEY_[A-Z0-9_]+", text))


def test_environment_names_are_settings_parley_reads():
    files = [*MANIFESTS, DEPLOY / "compose.yaml", DEPLOY / "Dockerfile",
             DEPLOY / "Dockerfile.cuda"]
    names = set().union(*(_parley_names(path.read_text()) for path in files))
    assert "PARLEY_REDIS_URL" in names and "PARLEY_SHUTDOWN_GRACE_S" in names
    unknown = {name for name in names if name.removeprefix("PARLEY_").lower() not in SETTINGS}
    assert not unknown, f"set in deploy/ but not read by agent/config.py: {sorted(unknown)}"
    # ...and the values given are ones the settings accept.
    config = _objects()[("ConfigMap", "parley")]["data"]
    load_settings(environ=config)


def test_probes_are_routes_and_the_grace_period_covers_the_drain():
    deployment = _objects()[("Deployment", "parley")]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    paths = {route.path for route in create_app(load_settings()).routes}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in paths
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = float(_objects()[("ConfigMap", "parley")]["data"]["PARLEY_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > pause + grace
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    replica = compose["services"]["parley-1"]
    assert float(replica["stop_grace_period"].rstrip("s")) > grace


def test_the_autoscaler_watches_a_metric_parley_exports():
    from agent.metrics import REGISTRY

    hpa = _objects()[("HorizontalPodAutoscaler", "parley")]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    exported = {family.name for family in REGISTRY.collect()}
    assert metric in exported


def test_the_redis_keeps_an_append_only_file():
    redis = _objects()[("StatefulSet", "parley-redis")]
    assert "--appendonly" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert "--appendonly" in compose["services"]["redis"]["command"]
