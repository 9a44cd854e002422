"""The cluster files (cluster/, .dockerignore) parse and keep the properties cluster/README.md lists: the
tested Ray pinned everywhere, token auth on (KubeRay authOptions; RAY_AUTH_MODE on every launcher
`ray start`), keys only from Secrets, GPU tolerations and the GPU type pinned per worker group, an HF
cache on a shared PersistentVolumeClaim, an idle timeout longer than a stage handoff and not much
longer, a RayJob that retries, has a deadline, deletes its cluster soon after it ends and submits from
a small CPU image, object-store run dirs in every documented submit command, a small non-editable
image build.

KubeRay field names are those of the CRD reference (KubeRay v1.6.2, generated from
ray-operator/apis/ray/v1); the launcher is validated with Ray's own schema, as `ray up` does."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

from raycat.cli import build_parser
from raycat.config import load_config
from raycat.study.grid import load_study

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = ("raycluster.yaml", "rayjob.yaml")
RAY = re.search(r"^ray==([\d.]+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
KEY_LIKE = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD|CREDENTIALS?)(_|$)")  # HF_TOKEN, AWS_ACCESS_KEY_ID
OBJECT_STORE = re.compile(r"^(s3|gs)://[^/]+/")
GPU_PRODUCT = "nvidia.com/gpu.product"  # NVIDIA GPU Feature Discovery's node label

# KubeRay v1.6.2 API reference: the fields these manifests may use, so that a misspelt one fails here,
# without a cluster (the API server prunes unknown fields of a custom resource).
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "preRunningDeadlineSeconds", "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
RAYCLUSTER_SPEC = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
}  # fmt: skip
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}
AUTOSCALER_OPTIONS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
    "version", "env", "envFrom", "volumeMounts",
}  # fmt: skip
# The labels KubeRay puts on every Ray pod over its template's own (ray-operator/controllers/ray/common/
# pod.go, labelPod), less those naming one cluster, group or pod (ray.io/cluster, ray.io/group, ...).
KUBERAY_POD_LABELS = {
    "ray.io/is-ray-node": "yes",
    "app.kubernetes.io/name": "kuberay",
    "app.kubernetes.io/created-by": "kuberay-operator",
}
# Prometheus Operator (monitoring.coreos.com/v1) PodMonitor fields the monitors may use
PODMONITOR_SPEC = {"jobLabel", "podTargetLabels", "podMetricsEndpoints", "selector", "namespaceSelector", "sampleLimit"}
POD_METRICS_ENDPOINT = {
    "port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings", "metricRelabelings",
}  # fmt: skip
RELABEL_CONFIG = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}
HEAD_GROUP = {"template", "headService", "enableIngress", "resources", "labels", "rayStartParams", "serviceType"}
WORKER_GROUP = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "resources",
    "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _kuberay() -> list[tuple[str, dict, dict]]:
    """(file name, document, RayClusterSpec) of each KubeRay manifest; a RayJob embeds its cluster spec."""
    out = []
    for name in KUBERAY:
        doc = _load(CLUSTER / "kuberay" / name)
        out.append((name, doc, doc["spec"].get("rayClusterSpec", doc["spec"])))
    return out


def _example_secrets() -> dict[str, dict]:
    """The Secrets of cluster/kuberay/secrets.example.yaml by name."""
    docs = yaml.safe_load_all((CLUSTER / "kuberay/secrets.example.yaml").read_text())
    return {d["metadata"]["name"]: d for d in docs}


def _claims() -> dict[str, tuple[str, dict]]:
    """(file name, claim) of every PersistentVolumeClaim in cluster/kuberay/ by claim name."""
    out = {}
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "PersistentVolumeClaim":
                out[doc["metadata"]["name"]] = (path.name, doc)
    return out


def _quantity(value) -> float:
    """A Kubernetes quantity ("200m", "512Mi", "1Ti", 8) in cores or bytes."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, suffix = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * (units[suffix] if suffix else 1)


def _groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _all_env_names(node) -> list[str]:
    """Every env var name anywhere in a manifest (containers, autoscalerOptions, submitter template)."""
    if isinstance(node, dict):
        names = [e["name"] for e in node.get("env", []) if isinstance(e, dict) and "name" in e]
        return names + [n for v in node.values() for n in _all_env_names(v)]
    if isinstance(node, list):
        return [n for v in node for n in _all_env_names(v)]
    return []


def _api_key_envs(node) -> set[str]:
    """The variables the shipped configs' hosted teachers read their key from (api.api_key_env)."""
    if isinstance(node, dict):
        own = {node["api_key_env"]} if isinstance(node.get("api_key_env"), str) else set()
        return own.union(*(_api_key_envs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_api_key_envs(v) for v in node))
    return set()


def _raycat_run_dir(argv: list[str]) -> str:
    """Parse a documented `raycat ...` command with raycat's own CLI and resolve its run_dir (the
    `run_dir=` override, else the config's own); /configs/ is where the RayJob mounts jobs/configs/."""
    assert argv[0] == "raycat", argv
    args = build_parser().parse_args(argv[1:])
    # A study's variants and shared cache live under its run_dir
    if args.command == "study":
        study = ROOT / "jobs" / "studies" / Path(args.config).name
        assert args.config == f"jobs/studies/{study.name}" and study.is_file()
        return load_study(study).root
    config = ROOT / "jobs" / "configs" / Path(args.config).name
    assert args.config in (f"jobs/configs/{config.name}", f"/configs/{config.name}") and config.is_file()
    return load_config(config, args.overrides).run_dir


def _submitted_commands(text: str, yaml_comments: bool) -> list[list[str]]:
    """argv of the command after ` -- ` in every `ray job submit` line of a markdown text, or of the
    comments of a YAML file (backslash continuations joined; inline code ends at its backtick)."""
    if yaml_comments:
        text = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if line.lstrip().startswith("#"))
    text = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in text.splitlines():
        if "ray job submit" in line and " -- " in line:
            cmd = line.split(" -- ", 1)[1].split("`")[0]
            commands.append(shlex.split(cmd, comments=True))
    return commands


def test_ray_version_is_pinned_consistently():
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_req = next(Requirement(d) for d in deps if d.startswith("ray["))
    # The tested pin is inside the declared range
    assert ray_req.specifier.contains(RAY)
    launcher = _load(CLUSTER / "ray-cluster.aws.yaml")
    assert f"ray:{RAY}-" in launcher["docker"]["image"]
    for _, _, spec in _kuberay():
        assert spec["rayVersion"] == RAY
        for group in _groups(spec):
            assert all(f"ray{RAY}" in c["image"] for c in _containers(group))
    assert f"rayproject/ray:{RAY}-" in (CLUSTER / "Dockerfile").read_text()


def test_kuberay_manifests_use_only_crd_field_names():
    for name, doc, spec in _kuberay():
        assert doc["apiVersion"] == "ray.io/v1"
        if doc["kind"] == "RayJob":
            assert set(doc["spec"]) <= RAYJOB_SPEC, name
        assert set(spec) <= RAYCLUSTER_SPEC, name
        assert set(spec["authOptions"]) <= AUTH_OPTIONS, name
        assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS, name
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP, name
        assert all(set(g) <= WORKER_GROUP for g in spec["workerGroupSpecs"]), name


def test_kuberay_token_auth_via_auth_options_not_hand_set_env():
    """KubeRay's authOptions (mode: token) sets RAY_AUTH_MODE and RAY_AUTH_TOKEN itself from the Secret
    (key auth_token); a manifest that also set them could disagree with it."""
    example = _example_secrets()
    for name, doc, spec in _kuberay():
        assert spec["authOptions"]["mode"] == "token", name
        assert "auth_token" in example[spec["authOptions"]["secretName"]]["stringData"]
        assert "enableK8sTokenAuth" not in spec["authOptions"]  # KubeRay rejects it for a RayJob
        assert not [n for n in _all_env_names(doc) if n.startswith("RAY_AUTH")], name
        assert "RAY_AUTH" not in doc["spec"].get("runtimeEnvYAML", "")


def test_dashboard_not_public():
    launcher = _load(CLUSTER / "ray-cluster.aws.yaml")
    head_cmd = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd and "RAY_AUTH_MODE=disabled" not in head_cmd
    for name, _, spec in _kuberay():
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", name
        assert not spec["headGroupSpec"].get("enableIngress", False), name


def test_keys_reach_every_raycat_container_only_from_secrets():
    configs = [_load(p) for p in sorted((ROOT / "jobs/configs").glob("*.yaml"))]
    needed = {"HF_TOKEN", "WANDB_API_KEY"} | _api_key_envs(configs)
    assert "OPENROUTER_API_KEY" in needed  # the shipped hosted-teacher configs
    secrets = _example_secrets()
    for name, doc, spec in _kuberay():
        for group in _groups(spec):
            for c in _containers(group):
                env = {e["name"]: e for e in c["env"]}
                assert needed <= set(env), (name, c["name"], needed - set(env))
                for var, e in env.items():
                    if KEY_LIKE.search(var):
                        ref = e["valueFrom"]["secretKeyRef"]  # never a literal value
                        assert "value" not in e and ref["optional"] is True, (name, var)
                        assert ref["key"] in secrets[ref["name"]]["stringData"], (name, var)
        # Nor through the job: its entrypoint and runtime_env are stored with it and shown.
        job_text = doc["spec"].get("entrypoint", "") + "\n" + doc["spec"].get("runtimeEnvYAML", "")
        assert not [w for w in re.findall(r"[A-Z][A-Z0-9_]+", job_text) if KEY_LIKE.search(w)], name
    for secret in secrets.values():
        assert set(secret["stringData"].values()) == {"REPLACE_ME"}  # placeholders only
    rt = _load(CLUSTER / "runtime_env.yaml")
    assert not any(KEY_LIKE.search(k) for k in rt.get("env_vars", {}))


def test_gpu_worker_groups_request_gpus_and_tolerate_the_gpu_taint():
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    for name, _, spec in _kuberay():
        assert spec["workerGroupSpecs"], name
        # Every shipped worker group is a GPU group
        for group in spec["workerGroupSpecs"]:
            gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in _containers(group)]
            assert max(gpus) > 0, (name, group["groupName"])
            assert toleration in group["template"]["spec"].get("tolerations", []), (name, group["groupName"])


def test_gpu_worker_groups_pin_the_gpu_type_they_are_sized_for():
    for name, _, spec in _kuberay():
        for group in spec["workerGroupSpecs"]:
            # gpu-<count>x-<type>: the selector names that GPU, the pod requests that many
            count, gpu_type = re.fullmatch(r"gpu-(\d+)x-([a-z0-9]+)", group["groupName"]).groups()
            product = group["template"]["spec"]["nodeSelector"][GPU_PRODUCT]
            assert product.startswith("NVIDIA-") and gpu_type in product.lower(), (name, product)
            gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in _containers(group)]
            assert max(gpus) == int(count), (name, group["groupName"])


def test_every_pod_mounts_the_shared_hf_cache_claim_at_hf_home():
    claims = _claims()
    for name, _, spec in _kuberay():
        for group in _groups(spec):
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            for c in _containers(group):
                hf_home = next(e["value"] for e in c["env"] if e["name"] == "HF_HOME")
                mount = next(m for m in c["volumeMounts"] if m["mountPath"] == hf_home)
                # A claim this repository ships: a pod naming a missing claim stays Pending
                claim_file, claim = claims[volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]]
                # Pods on several nodes mount it at once
                assert claim["spec"]["accessModes"] == ["ReadWriteMany"], (name, claim_file)
                # Room for at least one 70B model in bf16 (~140 GB)
                assert _quantity(claim["spec"]["resources"]["requests"]["storage"]) >= 140e9, (name, claim_file)
    # The README applies each claim before the manifests that mount it
    readme = (CLUSTER / "README.md").read_text()
    for claim_file, _ in claims.values():
        pvc_at = readme.index(f"kubectl apply -f cluster/kuberay/{claim_file}")
        assert all(pvc_at < readme.index(f"kubectl apply -f cluster/kuberay/{m}") for m in KUBERAY)


def test_idle_timeout_outlasts_a_stage_handoff():
    raycluster = _kuberay()[0][2]
    assert raycluster["enableInTreeAutoscaling"] is True
    for name, _, spec in _kuberay():
        if spec.get("enableInTreeAutoscaling"):
            # Set explicitly (KubeRay's default is 60 s), and not so long that an idle GPU node lingers
            assert 300 <= spec["autoscalerOptions"]["idleTimeoutSeconds"] <= 900, name
            assert all(g.get("idleTimeoutSeconds", 300) >= 300 for g in spec["workerGroupSpecs"]), name
        else:
            # No autoscaler: a fixed-size cluster, nothing is scaled down between stages
            assert all(g["minReplicas"] == g["maxReplicas"] for g in spec["workerGroupSpecs"]), name
    assert _load(CLUSTER / "ray-cluster.aws.yaml")["idle_timeout_minutes"] >= 5


def test_rayjob_runs_raycat_with_an_object_store_run_dir():
    job = _load(CLUSTER / "kuberay/rayjob.yaml")["spec"]
    assert OBJECT_STORE.match(_raycat_run_dir(shlex.split(job["entrypoint"])))
    assert job["entrypoint"].startswith("raycat run ")
    # A submitter Job: `kubectl logs -f job/<name>` follows it
    assert job["submissionMode"] == "K8sJobMode"
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    configs = next(v["name"] for v in head["volumes"] if v.get("configMap", {}).get("name") == "raycat-config")
    assert {"name": configs, "mountPath": "/configs"} in head["containers"][0]["volumeMounts"]


def test_rayjob_retries_has_a_deadline_and_deletes_its_cluster_soon_after_it_ends():
    job = _load(CLUSTER / "kuberay/rayjob.yaml")["spec"]
    # Each retry gets a new RayCluster and resumes from what the failed attempt wrote under run_dir
    assert job["backoffLimit"] >= 1
    # A hung attempt fails instead of holding its GPUs (KubeRay does not retry one past its deadline)
    assert isinstance(job["activeDeadlineSeconds"], int) and job["activeDeadlineSeconds"] > 0
    # shutdownAfterJobFinishes deletes the cluster however the job ends (failed, past the deadline,
    # submission failed); ttlSecondsAfterFinished acts only with it. deletionRules may not join it.
    assert job["shutdownAfterJobFinishes"] is True and 0 <= job["ttlSecondsAfterFinished"] <= 600
    assert "deletionStrategy" not in job


def test_rayjob_submitter_is_a_small_cpu_ray_image_at_the_pinned_ray():
    pod = _load(CLUSTER / "kuberay/rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (submitter,) = pod["containers"]  # KubeRay takes the first container as the submitter
    # Ray's CPU image at the Ray and Python of the cluster's image (cluster/Dockerfile)
    python = re.search(r"^FROM rayproject/ray:[\d.]+-(py\d+)-", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert submitter["image"] == f"rayproject/ray:{RAY}-{python.group(1)}-cpu"
    # No command: KubeRay supplies `ray job submit` with the dashboard address and the token
    assert "command" not in submitter and "args" not in submitter
    requests, limits = submitter["resources"]["requests"], submitter["resources"]["limits"]
    assert _quantity(requests["cpu"]) <= 1 and _quantity(requests["memory"]) <= 2**30
    assert _quantity(limits["memory"]) <= 2 * 2**30 and "nvidia.com/gpu" not in limits
    # No GPU toleration: it cannot take a slot on a GPU node
    assert not pod.get("tolerations") and not pod.get("nodeSelector")


def test_documented_submit_commands_use_object_store_run_dirs():
    docs = [
        CLUSTER / "README.md",
        *sorted(CLUSTER.glob("*.yaml")),
        *sorted((CLUSTER / "kuberay").glob("*.yaml")),
        ROOT / "jobs/README.md",
    ]
    seen = 0
    for doc in docs:
        for argv in _submitted_commands(doc.read_text(), yaml_comments=doc.suffix == ".yaml"):
            assert OBJECT_STORE.match(_raycat_run_dir(argv)), (doc.name, argv)
            seen += 1
    # The launcher, KubeRay and runtime_env commands, jobs/README.md's table
    assert seen >= 6
    for doc in (CLUSTER / "README.md", CLUSTER / "ray-cluster.aws.yaml"):
        assert "RAY_AUTH_MODE=token" in doc.read_text()  # what a client needs to send its token


def test_runtime_env_installs_raycat_gpu_from_the_uploaded_working_dir():
    packages = _load(CLUSTER / "runtime_env.yaml")["pip"]["packages"]
    assert "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}[gpu]" in packages
    assert not [p for p in packages if p.split()[0] in ("-e", "--editable") or p.startswith(".")]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "gpu" in extras


def test_dockerignore_keeps_the_build_context_small():
    patterns = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {"runs", ".venv", ".git", "**/__pycache__", "**/*.egg-info", ".pytest_cache", "**/*.safetensors"} <= patterns


def test_image_and_launcher_install_raycat_not_editable():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    launcher = _load(CLUSTER / "ray-cluster.aws.yaml")
    installs = [line for line in dockerfile.splitlines() if line.startswith("RUN") and "pip install" in line]
    installs += [c for c in launcher["setup_commands"] if "pip install" in c]
    assert len(installs) == 2
    for cmd in installs:
        words = shlex.split(cmd.removeprefix("RUN "))
        assert "-e" not in words and "--editable" not in words, cmd
        assert any(w.endswith("[gpu]") for w in words), cmd


def test_launcher_config_is_valid_filters_rsync_and_turns_token_auth_on():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(CLUSTER / "ray-cluster.aws.yaml")
    validate_config(prepare_config(_load(CLUSTER / "ray-cluster.aws.yaml")))  # as `ray up` does
    assert raw["rsync_filter"] == [".gitignore"]
    assert {"runs/", ".venv/", "**/.git"} <= set(raw["rsync_exclude"])
    # Every `ray start` runs with token auth; the token comes from the client's ~/.ray/auth_token.
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start ") for c in starts)
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "ray get-auth-token --generate" in (CLUSTER / "ray-cluster.aws.yaml").read_text()


def _pod_labels(group: dict, node_type: str) -> dict[str, str]:
    """The labels of a pod KubeRay creates for ``group``: the template's, then KubeRay's own."""
    own = group["template"].get("metadata", {}).get("labels", {})
    return {**own, **KUBERAY_POD_LABELS, "ray.io/node-type": node_type}


def _named_ports(group: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in _containers(group) for p in c.get("ports", [])}


def test_podmonitors_use_only_prometheus_operator_field_names():
    monitors = list(yaml.safe_load_all((CLUSTER / "kuberay/podmonitor.yaml").read_text()))
    assert len(monitors) == 2
    for m in monitors:
        assert (m["apiVersion"], m["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
        # kube-prometheus-stack's Prometheus selects monitors by its Helm release label
        assert m["metadata"]["labels"]["release"] == "prometheus"
        assert set(m["spec"]) <= PODMONITOR_SPEC and set(m["spec"]["selector"]) == {"matchLabels"}
        # No namespaceSelector: the monitor's own namespace, where the Ray pods are
        assert "namespaceSelector" not in m["spec"]
        for endpoint in m["spec"]["podMetricsEndpoints"]:
            assert set(endpoint) <= POD_METRICS_ENDPOINT
            assert all(set(r) <= RELABEL_CONFIG for r in endpoint.get("relabelings", []))
            # The RayCluster's name on every sample: several clusters can share one Prometheus
            relabel = {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster"}
            assert relabel in endpoint["relabelings"]


def test_podmonitors_scrape_every_ray_pod_once_on_its_named_metrics_ports():
    """Every pod the manifests create (head and each worker group, a RayJob's too) is selected by one
    PodMonitor by the labels KubeRay gives it, declares the named `metrics` port Ray's metrics agent
    listens on (where the engines' ray_vllm_* are served) and every other *-metrics port it declares is
    scraped; the autoscaler's is declared only where an autoscaler runs."""
    monitors = list(yaml.safe_load_all((CLUSTER / "kuberay/podmonitor.yaml").read_text()))
    for name, _, spec in _kuberay():
        pods = [("head", spec["headGroupSpec"])] + [("worker", g) for g in spec["workerGroupSpecs"]]
        for node_type, group in pods:
            labels = _pod_labels(group, node_type)
            (monitor,) = [m for m in monitors if m["spec"]["selector"]["matchLabels"].items() <= labels.items()]
            scraped = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
            ports = _named_ports(group)
            assert all(len(p) <= 15 for p in ports), (name, ports)  # Kubernetes' limit on a port name
            assert ports["metrics"] == int(group["rayStartParams"]["metrics-export-port"]) == 8080, name
            assert {p for p in ports if p.endswith("metrics")} <= scraped, (name, node_type)
            if node_type == "head":
                assert ports["dash-metrics"] == 44227, name  # Ray's DASHBOARD_METRIC_PORT
                assert ("as-metrics" in ports) == bool(spec.get("enableInTreeAutoscaling")), name
                assert ports.get("as-metrics", 44217) == 44217, name  # Ray's AUTOSCALER_METRIC_PORT
    readme = (CLUSTER / "README.md").read_text()
    assert "kubectl apply -f cluster/kuberay/podmonitor.yaml" in readme
