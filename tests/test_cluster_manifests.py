"""The cluster manifests parse, pin the tested Ray (constraints.txt, within pyproject's range), keep token auth
on and the dashboard private."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY = re.search(r"^ray==([\d.]+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)


def test_ray_version_is_pinned_consistently():
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_req = next(Requirement(d) for d in deps if d.startswith("ray["))
    assert ray_req.specifier.contains(RAY)  # the tested pin is inside the declared range
    launcher = yaml.safe_load((ROOT / "cluster/ray-cluster.aws.yaml").read_text())
    assert f"ray:{RAY}-" in launcher["docker"]["image"]
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = yaml.safe_load((ROOT / "cluster/kuberay" / name).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == RAY
    assert f"rayproject/ray:{RAY}-" in (ROOT / "cluster/Dockerfile").read_text()


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_token_auth_on_and_dashboard_not_public():
    launcher = yaml.safe_load((ROOT / "cluster/ray-cluster.aws.yaml").read_text())
    head_cmd = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd and "RAY_AUTH_MODE=disabled" not in head_cmd
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = yaml.safe_load((ROOT / "cluster/kuberay" / name).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        for c in _containers(spec):
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # never a literal token
    rt = yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())
    assert not any(k.endswith(("_KEY", "HF_TOKEN", "AUTH_TOKEN")) for k in rt.get("env_vars", {}))
