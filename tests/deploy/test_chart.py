"""The Helm chart, rendered by Helm's own engine for every profile, against Kubernetes and recsvc.

No helm binary and no cluster: helm-python-sdk embeds Helm's Go SDK (render, lint, values.schema.json),
kubernetes-validate holds Kubernetes' OpenAPI schemas. What a cluster would only reveal at run time is
checked here as wiring: names, ports, selectors and RECSVC_* settings must agree across objects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest

from recsvc.config import ENV_PREFIX, Settings, load_settings
from recsvc.repository import config_template
from recsvc.server.app import SERVICE_NAME
from tests.deploy.chart import (
    CHART,
    PROFILES,
    PROFILES_DIR,
    Manifests,
    container,
    containers,
    env_of,
    manifests,
    manifests_for,
    pod_labels,
    pod_spec,
    profile_values,
    render,
    selects,
)

ALL = sorted(PROFILES)
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas available.
KUBE_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
# Custom resources have no schema in kubernetes-validate; test_service_monitors checks them.
CUSTOM_KINDS = {"ServiceMonitor"}
SETTINGS_FIELDS = {f.name for f in dataclasses.fields(Settings)}


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return schema


# ------------------------------------------------------------------------------------------ Helm itself
def test_every_profile_file_is_tested() -> None:
    used = {file for files, _ in PROFILES.values() for file in files}
    assert used == {p.name for p in PROFILES_DIR.glob("*.yaml")}


@pytest.mark.parametrize("profile", ALL)
def test_lint_is_clean(profile: str) -> None:
    report = helm_python.lint(CHART, profile_values(profile), strict=True, kube_version="v1.29.0")
    # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [] and report["errors"] == []


@pytest.mark.parametrize("profile", ALL)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_manifests_match_kubernetes_schemas(profile: str, kube_version: str) -> None:
    m = manifests(profile)
    assert m.objects, "nothing rendered"
    for obj in m.objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        # strict: unknown fields (a typo, a field from a newer Kubernetes) fail too.
        kubernetes_validate.validate(obj, kube_version, strict=True)


@pytest.mark.parametrize("profile", ALL)
def test_object_names_are_unique_labelled_and_valid(profile: str) -> None:
    m = manifests(profile)
    seen = set()
    for obj in m.objects:
        meta = obj["metadata"]
        key = (obj["kind"], meta["name"])
        assert key not in seen, f"{key} rendered twice"
        seen.add(key)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", meta["name"]), meta["name"]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "recsvc"
        assert labels["app.kubernetes.io/instance"] == "shop"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"].startswith("recsvc-")


def test_long_release_names_stay_valid() -> None:
    """fullname is cut so that suffixed names ("-triton", "-redis-headless", "-publish-<hash>") stay DNS labels."""
    chart = helm_python.Chart.load(CHART)
    values = profile_values("everything")
    out = chart.render(values, name="a" * 53, namespace="recs")  # Helm's own release name limit
    names = re.findall(r"^  name: (\S+)$", "\n".join(out.values()), flags=re.M)
    assert names and all(len(n) <= 63 for n in names), [n for n in names if len(n) > 63]
    statefulsets = re.findall(r"kind: StatefulSet\nmetadata:\n  name: (\S+)", "\n".join(out.values()))
    # The controller-revision-hash label is "<name>-<10 characters>" and must be a valid label value.
    assert all(len(n) + 11 <= 63 for n in statefulsets)


# ------------------------------------------------------------------------------- values.schema.json
@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"recsvc": {"workers": 0}}, "/recsvc/workers"),
        ({"recsvc": {"port": 70000}}, "/recsvc/port"),
        ({"recsvc": {"metricsPort": -1}}, "/recsvc/metricsPort"),
        ({"recsvc": {"graceSeconds": 0}}, "/recsvc/graceSeconds"),
        ({"recsvc": {"drainDelaySeconds": -1}}, "/recsvc/drainDelaySeconds"),
        ({"recsvc": {"settings": {"triton_url": "x:1"}}}, "triton_url"),  # the chart sets it
        ({"recsvc": {"settings": {"no_such_setting": 1}}}, "no_such_setting"),  # recsvc would refuse to start
        ({"recsvc": {"extraEnv": [{"name": "RECSVC_PORT", "value": "1"}]}}, "/recsvc/extraEnv/0/name"),
        ({"recsvc": {"replcas": 3}}, "replcas"),
        ({"triton": {"target": "tpu"}}, "/triton/target"),
        ({"triton": {"gpusPerPod": 0}}, "/triton/gpusPerPod"),
        ({"redis": {"mode": "cluster"}}, "/redis/mode"),
        ({"redis": {"external": {"url": "http://redis:6379"}}}, "/redis/external/url"),
        ({"redis": {"external": {"url": ""}}}, "/redis/external/url"),
        ({"modelRepository": {"source": "objectStorage"}}, "/modelRepository/objectStorage/remote"),
        ({"modelRepository": {"pvc": {"create": False}}}, "/modelRepository/pvc/existingClaim"),
        ({"modelRepository": {"objectStorage": {"keepVersions": 1}}}, "/modelRepository/objectStorage/keepVersions"),
        ({"publish": {"bundle": "../../etc"}}, "/publish/bundle"),
        ({"publish": {"bundle": "/abs/path"}}, "/publish/bundle"),
        ({"rollback": {"request": "a b"}}, "/rollback/request"),
        ({"rollback": {"request": "../x"}}, "/rollback/request"),
        ({"rollback": {"toVersion": -1}}, "/rollback/toVersion"),
        ({"rollout": {"drainSeconds": -1}}, "/rollout/drainSeconds"),
        ({"triton": {"loader": {"pollSeconds": 2}}}, "loader"),  # the model-loader sidecar is gone
        ({"modelRepository": {"objectStorage": {"servingPollSeconds": 0}}}, "servingPollSeconds"),
        ({"networkPolicy": {"frontends": []}}, "/networkPolicy/frontends"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
        ({"image": {"digest": "md5:abc"}}, "/image/digest"),
        ({"recsvc": {"tls": {"enabled": True}}}, "/recsvc/tls/secretName"),
        ({"recsvc": {"tls": {"writeAllowedIdentities": ["a,b"]}}}, "/recsvc/tls/writeAllowedIdentities/0"),
        ({"recsvc": {"auth": {"writeToken": {"secretName": "s", "key": ""}}}}, "/recsvc/auth/writeToken/key"),
        ({"triton": {"tls": {"enabled": True, "serverSecretName": "t"}}}, "/triton/tls/clientSecretName"),
        ({"recsvc": {"settings": {"tls_cert": "/x"}}}, "tls_cert"),  # the chart sets it from recsvc.tls
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], field: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as caught:
        render(values)
    assert field in str(caught.value)


def test_schema_accepts_every_profile() -> None:
    chart = helm_python.Chart.load(CHART)
    for profile in ALL:
        chart.validate_schema(profile_values(profile))


def test_schema_is_draft_07_and_closed() -> None:
    schema = _schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"

    def walk(node: dict[str, Any], path: str) -> None:
        props = node.get("properties")
        if props and node.get("type") == "object":
            assert node.get("additionalProperties") is False, f"{path or '/'} accepts unknown keys"
        for key, child in (props or {}).items():
            walk(child, f"{path}/{key}")

    walk(schema, "")


def test_values_yaml_keys_are_all_in_the_schema() -> None:
    """Every default value is described by the schema (a key missing there would be rejected anyway)."""
    chart = helm_python.Chart.load(CHART)
    chart.validate_schema(chart.values)


def test_settings_schema_matches_recsvc_settings() -> None:
    """recsvc.settings accepts exactly the fields the chart does not set itself: nothing unknown to recsvc,
    nothing that would fight a value the chart sets (in the server, the sidecars or the Jobs), and no field
    unreachable from values."""
    allowed = set(_schema()["properties"]["recsvc"]["properties"]["settings"]["propertyNames"]["enum"])
    rendered = {
        name[len(ENV_PREFIX) :].lower()
        for profile in ALL
        for w in manifests(profile).workloads()
        for c in containers(w)
        for name in env_of(c)
        if name.startswith(ENV_PREFIX)
    }
    assert allowed <= SETTINGS_FIELDS, allowed - SETTINGS_FIELDS
    set_by_chart = rendered - {"l1_policy", "num_candidates"}  # what the "everything" profile sets via settings
    assert not allowed & set_by_chart, allowed & set_by_chart
    assert allowed | set_by_chart == SETTINGS_FIELDS, SETTINGS_FIELDS - (allowed | set_by_chart)


# --------------------------------------------------------------------------- RECSVC_* and recsvc itself
# Stand-ins for values that come from Secrets at run time.
SECRET_STANDINS = {"RECSVC_REDIS_URL": "redis://:secret@redis.example:6379/0"}


@pytest.mark.parametrize("profile", ALL)
def test_every_recsvc_variable_is_a_setting_and_accepted(profile: str) -> None:
    m = manifests(profile)
    checked = 0
    for w in m.workloads():
        for c in containers(w):
            env = env_of(c)
            recsvc_env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
            if not recsvc_env:
                continue
            for name in recsvc_env:
                assert name[len(ENV_PREFIX) :].lower() in SETTINGS_FIELDS, f"{c['name']}: {name} is no setting"
            resolved = {
                k: (v if isinstance(v, str) else SECRET_STANDINS[k]).replace("$(REDIS_PASSWORD)", "pw")
                for k, v in recsvc_env.items()
            }
            # Raises ConfigError exactly as `recsvc serve` would at start-up.
            load_settings(resolved)
            checked += 1
    assert checked >= 2  # at least the server and the wait/loader containers


def _server(m: Manifests) -> tuple[dict[str, Any], dict[str, Any], Settings]:
    deployment = m.component("server")
    c = container(deployment, "recsvc")
    env = {k: v if isinstance(v, str) else SECRET_STANDINS[k] for k, v in env_of(c).items() if k.startswith("RECSVC_")}
    return deployment, c, load_settings({k: v.replace("$(REDIS_PASSWORD)", "pw") for k, v in env.items()})


@pytest.mark.parametrize("profile", ALL)
def test_server_ports_probes_and_settings_agree(profile: str) -> None:
    m = manifests(profile)
    deployment, c, settings = _server(m)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert settings.host == "0.0.0.0"
    r = m.merged["recsvc"]
    if r["shed"]["enabled"]:
        # The Services' "grpc" port is the proxy's; it forwards to recsvc's own port over localhost.
        proxy = container(deployment, "shed")
        assert {p["name"]: p["containerPort"] for p in proxy["ports"]} == {"grpc": r["port"]}
        assert ports["grpc-server"] == settings.port == r["shed"]["upstreamPort"] != r["port"]
        env = env_of(proxy)
        assert env["SHED_BIND"] == f"0.0.0.0:{r['port']}"
        assert env["SHED_UPSTREAM"] == f"127.0.0.1:{settings.port}"
        assert env["SHED_MAXCONN"] == str(r["shed"]["callsPerWorker"] * settings.workers)
        assert "grpc" not in ports
    else:
        assert ports["grpc"] == settings.port == r["port"]
    if settings.metrics_port:
        assert ports["metrics"] == settings.metrics_port
    else:
        assert "metrics" not in ports
    # Kubernetes' gRPC probes cannot speak TLS: with TLS they ask the plaintext health-only port.
    probe_port = settings.health_port if settings.tls_cert is not None else settings.port
    if settings.tls_cert is not None:
        assert ports["health"] == settings.health_port != settings.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == probe_port
    # The server registers health for "" and the Recommender service; readiness must ask the latter.
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME == "recsvc.v1.Recommender"
    assert c["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert c["livenessProbe"]["grpc"]["service"] == ""
    assert settings.history_store == "redis"
    assert settings.workers == m.merged["recsvc"]["workers"]
    assert c["command"] == ["recsvc", "serve"]


def _mounted_from(workload: dict[str, Any], c: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume ``path`` is read from in container ``c`` (by the longest mount prefix)."""
    mounts = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no volume of {c['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    assert "subPath" not in mount      # subPath mounts never see a renewed Secret
    volume: dict[str, Any] = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
    return volume


@pytest.mark.parametrize("profile", ["tls", "tls-cpu-object-storage"])
def test_tls_and_tokens_are_wired_from_secrets(profile: str) -> None:
    """Server TLS, mutual TLS and tokens come from mounted Secrets at the paths recsvc reads; every container
    that dials Triton does so over (mutual) TLS with the client Secret, and Triton serves with its own."""
    m = manifests(profile)
    server, c, settings = _server(m)
    assert settings.tls_cert is not None and settings.tls_key is not None and settings.tls_client_ca is not None
    assert settings.tls_require_client_cert and settings.write_allowed_identities == "backend.shop.svc"
    files = ((settings.tls_cert, "tls.crt"), (settings.tls_key, "tls.key"), (settings.tls_client_ca, "ca.crt"))
    for path, name in files:
        volume = _mounted_from(server, c, str(path))
        assert volume["secret"]["secretName"] == "recsvc-tls" and path.name == name
    for path, key in ((settings.write_token_file, "write"), (settings.read_token_file, "read")):
        assert path is not None
        volume = _mounted_from(server, c, str(path))
        assert volume["secret"]["secretName"] == "recsvc-tokens"
        assert volume["secret"]["items"] == [{"key": key, "path": path.name}]
    # Everything that dials Triton: the server, the triton-sync sidecar, the Jobs' rollout steps.
    triton = m.component("triton")
    dialers = [(server, c), (triton, container(triton, "triton-sync"))]
    dialers += [(job, _rolling_step(job)) for job in m.workloads()
                if job["kind"] == "Job" and pod_labels(job)["app.kubernetes.io/component"] in ("publish", "rollback")]
    assert len(dialers) >= 3
    for workload, dialer in dialers:
        s = load_settings({k: v for k, v in env_of(dialer).items() if k.startswith(ENV_PREFIX)})
        assert s.triton_tls, dialer["name"]
        for path in (s.triton_ca, s.triton_cert, s.triton_key):
            assert path is not None
            assert _mounted_from(workload, dialer, str(path))["secret"]["secretName"] == "triton-client-tls"
    t = container(triton, "triton")
    args = dict(a.removeprefix("--").split("=", 1) for a in t["args"] if "=" in a)
    assert args["grpc-use-ssl"] == args["grpc-use-ssl-mutual"] == "true"
    for flag, name in (("grpc-server-cert", "tls.crt"), ("grpc-server-key", "tls.key"), ("grpc-root-cert", "ca.crt")):
        assert args[flag].endswith("/" + name)
        assert _mounted_from(triton, t, args[flag])["secret"]["secretName"] == "triton-tls"
    # Triton's probes use its HTTP port, which TLS on gRPC leaves alone.
    assert t["readinessProbe"]["httpGet"]["port"] == "http"
    # The plaintext health port is for the kubelet only: no Service exposes it.
    for service in m.of_kind("Service"):
        for port in service["spec"]["ports"]:
            assert port.get("targetPort") != "health" and port["port"] != settings.health_port


def test_without_tls_nothing_security_is_rendered() -> None:
    m = manifests("defaults")
    _, c, settings = _server(m)
    assert settings.tls_cert is None and settings.health_port == 0
    assert settings.write_token_file is None and not settings.triton_tls
    assert "health" not in {p["name"] for p in c["ports"]}


def test_a_triton_tls_without_mutual_needs_only_the_ca() -> None:
    m = manifests_for({"triton": {"tls": {"enabled": True, "serverSecretName": "t", "clientSecretName": "c",
                                          "mutual": False}}})  # fmt: skip
    _, _, settings = _server(m)
    assert settings.triton_tls and settings.triton_ca is not None and settings.triton_cert is None
    args = container(m.component("triton"), "triton")["args"]
    assert "--grpc-use-ssl=true" in args and not any("mutual" in a or "root-cert" in a for a in args)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"recsvc": {"tls": {"writeAllowedIdentities": ["a"]}}}, r"writeAllowedIdentities needs mutual TLS"),
        ({"recsvc": {"auth": {"readToken": {"secretName": "r", "key": "token"}}}}, r"readToken needs writes protected"),
        ({"recsvc": {"shed": {"enabled": False}, "tls": {"enabled": True, "secretName": "s", "healthPort": 9464}}},
         r"healthPort must differ"),
        ({"recsvc": {"tls": {"enabled": True, "secretName": "s"}}}, r"cannot stand in front of recsvc\.tls"),
        ({"recsvc": {"shed": {"upstreamPort": 50051}}}, r"upstreamPort must differ"),
        ({"recsvc": {"shed": {"upstreamPort": 9464}}}, r"upstreamPort must differ"),
    ],
)
def test_security_combinations_recsvc_would_refuse_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)


@pytest.mark.parametrize("profile", ALL)
def test_termination_outlasts_the_drain(profile: str) -> None:
    m = manifests(profile)
    deployment, c, settings = _server(m)
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1]) if "lifecycle" in c else 0
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    # The server serves on for drain_delay_s after SIGTERM (NOT_SERVING), then finishes calls within grace_s.
    assert settings.drain_delay_s >= 1, "endpoints need seconds to stop sending to a terminating pod"
    assert grace > sleep + settings.drain_delay_s + settings.grace_s
    # Liveness must not kill a pod that is draining (health is NOT_SERVING then).
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > settings.drain_delay_s + settings.grace_s


def test_a_pre_stop_sleep_is_rendered_and_counted_when_asked_for() -> None:
    m = manifests_for({"recsvc": {"preStopSleepSeconds": 3, "drainDelaySeconds": 2.5, "graceSeconds": 10,
                                  "terminationMarginSeconds": 5}})  # fmt: skip
    deployment, c, settings = _server(m)
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "3"]
    # Behind the proxy recsvc drains a second longer than the proxy: 2.5 + 1, rounded up.
    assert settings.drain_delay_s == 3.5
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] == 3 + 4 + 10 + 5


@pytest.mark.parametrize("profile", ALL)
def test_shedding_proxy_stops_before_the_server_and_within_the_grace(profile: str) -> None:
    m = manifests(profile)
    deployment, _, settings = _server(m)
    r = m.merged["recsvc"]
    names = [x["name"] for x in containers(deployment)]
    if not r["shed"]["enabled"]:
        assert "shed" not in names
        return
    proxy = container(deployment, "shed")
    env = env_of(proxy)
    scripts = next(cm for cm in m.of_kind("ConfigMap") if cm["metadata"]["name"].endswith("-scripts"))
    script_dir = next(v["mountPath"] for v in proxy["volumeMounts"] if v["name"] == "scripts")
    # HAProxy runs the chart's copy of the config the overload test runs, in master-worker mode (so the
    # hook's SIGUSR1 is a soft stop) and writes its PID where the hook reads it.
    assert proxy["command"] == ["haproxy", "-W", "-db", "-p", "$(PIDFILE)", "-f", f"{script_dir}/recsvc-shed.cfg"]
    assert scripts["data"]["recsvc-shed.cfg"] == (CHART / "files" / "recsvc-shed.cfg").read_text().rstrip("\n")
    assert proxy["lifecycle"]["preStop"]["exec"]["command"] == ["sh", f"{script_dir}/proxy-drain.sh"]
    assert env["PIDFILE"].startswith("/tmp/")
    assert any(v["mountPath"] == "/tmp" for v in proxy["volumeMounts"])
    # The proxy forwards through the drain delay, stops, and recsvc stops accepting a second after it.
    assert float(env["DRAIN_SECONDS"]) == r["drainDelaySeconds"] == settings.drain_delay_s - 1
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > settings.drain_delay_s + settings.grace_s
    # Readiness follows recsvc (which turns NOT_SERVING at once); the proxy's own is a listening socket.
    assert proxy["readinessProbe"]["tcpSocket"]["port"] == "grpc"
    assert "livenessProbe" not in proxy


def test_the_shedding_proxy_can_be_turned_off() -> None:
    m = manifests_for({"recsvc": {"shed": {"enabled": False}, "drainDelaySeconds": 5}})
    deployment, _, settings = _server(m)
    assert "shed" not in [x["name"] for x in containers(deployment)]
    assert settings.port == 50051 and settings.drain_delay_s == 5


def test_liveness_shorter_than_the_drain_is_refused() -> None:
    pattern = r"failureThreshold must exceed recsvc\.drainDelaySeconds \+ recsvc\.graceSeconds"
    with pytest.raises(helm_python.HelmRenderError, match=pattern):
        render({"recsvc": {"graceSeconds": 60}})
    with pytest.raises(helm_python.HelmRenderError, match=pattern):    # 10 s * 6 = 60 s <= 20 + 40
        render({"recsvc": {"graceSeconds": 40, "drainDelaySeconds": 20}})


async def test_hpa_metric_is_one_recsvc_exports() -> None:
    """The HPA's custom metric must be a gauge recsvc's /metrics actually serves (Prometheus' own parser)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from recsvc.server.metrics import RpcMetrics

    rpc = RpcMetrics(CollectorRegistry())
    with rpc.track("Recommend", lambda: "OK"):
        text = generate_latest(rpc.registry).decode()
    name = helm_python.Chart.load(CHART).values["autoscaling"]["inflight"]["metricName"]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families[name].type == "gauge"
    assert [(s.labels, s.value) for s in families[name].samples] == [({"method": "Recommend"}, 1.0)], text


def test_inflight_autoscaling_without_metrics_is_refused() -> None:
    with pytest.raises(helm_python.HelmRenderError, match=r"autoscaling\.inflight needs recsvc\.metricsPort"):
        render({"autoscaling": {"enabled": True}, "recsvc": {"metricsPort": 0}})


def test_server_pods_run_the_lean_serving_image_when_one_is_named() -> None:
    def images(m: Manifests) -> dict[str, set[str]]:
        return {w["metadata"]["name"].rsplit("-", 1)[-1]: {c["image"] for c in containers(w)
                                                          if c["name"] not in ("fetch-models", "shed")}
                for w in m.workloads()}  # fmt: skip

    full = images(manifests_for({}))
    assert {i for imgs in full.values() for i in imgs} >= {"recsvc:0.1.0"}
    lean = manifests_for({"image": {"serving": {"repository": "reg/recsvc-serving", "digest": "sha256:" + "a" * 64}}})
    deployment = lean.component("server")
    served = {c["image"] for c in containers(deployment) if c["name"] != "shed"}
    assert served == {f"reg/recsvc-serving@sha256:{'a' * 64}"}
    # Jobs (training, seeding) and Triton keep the full image: they need torch and pytriton.
    others = {c["image"] for w in lean.workloads() if w is not deployment for c in containers(w)}
    assert "recsvc:0.1.0" in others and not any("recsvc-serving" in i for i in others)


def test_settings_values_become_recsvc_variables() -> None:
    m = manifests("everything")
    _, _, settings = _server(m)
    assert settings.l1_policy == "lru"
    assert settings.num_candidates == 200
    deny = m.get("ConfigMap", "shop-recsvc-deny-list")["data"]["deny_list.txt"]
    assert deny.split() == ["sku-1", "sku-2"]


@pytest.mark.parametrize("profile", ALL)
def test_triton_wiring(profile: str) -> None:
    m = manifests(profile)
    _, _, settings = _server(m)
    triton = m.component("triton")
    t = container(triton, "triton")
    args = dict(a.removeprefix("--").split("=", 1) for a in t["args"] if "=" in a)
    ports = {p["name"]: p["containerPort"] for p in t["ports"]}
    assert args["model-control-mode"] == "explicit"
    # Nothing loads at start: triton-sync loads exactly the rollout's versions (a start that loaded the
    # config's newest two could load a version never rolled out, or a refused one).
    assert not any(a.startswith("--load-model") for a in t["args"])
    assert (int(args["grpc-port"]), int(args["http-port"]), int(args["metrics-port"])) == (
        ports["grpc"], ports["http"], ports["metrics"])  # fmt: skip
    # recsvc dials the Triton Service on its gRPC port, which forwards to the container's.
    host, port = settings.triton_url.rsplit(":", 1)
    service = m.get("Service", host)
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(triton))
    svc_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert svc_ports["grpc"]["port"] == int(port) and svc_ports["grpc"]["targetPort"] == "grpc"
    assert settings.triton_http_port == ports["http"] and settings.triton_metrics_port == ports["metrics"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert t[probe]["httpGet"]["port"] == "http"
    # Ready once it holds a version of the ranker (after triton-sync loaded serving.json's set).
    assert t["readinessProbe"]["httpGet"]["path"] == f"/v2/models/{settings.triton_model}/ready"
    assert t["startupProbe"]["httpGet"]["path"] == t["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # The same repository directory for both: recsvc reads each version's bundle/ that Triton loads.
    assert args["model-repository"] == str(settings.model_repository)
    for workload, c in ((m.component("server"), "recsvc"), (triton, "triton")):
        mounts = {v["name"]: v for v in container(workload, c)["volumeMounts"]}
        assert str(settings.model_repository).startswith(mounts["models"]["mountPath"] + "/")
        assert mounts["models"].get("readOnly") is True
    # /dev/shm as memory for the python backend stubs and TensorRT.
    volumes = {v["name"]: v for v in pod_spec(triton)["volumes"]}
    shm_mount = [v for v in t["volumeMounts"] if v["mountPath"] == "/dev/shm"]
    assert len(shm_mount) == 1 and volumes[shm_mount[0]["name"]]["emptyDir"]["medium"] == "Memory"
    # Every replica holds the rollout's versions: `recsvc triton-sync` against its own Triton, reading the
    # same serving.json the server reads.
    sync = container(triton, "triton-sync")
    assert sync["command"] == ["recsvc", "triton-sync"]
    sync_settings = load_settings({k: v for k, v in env_of(sync).items() if k.startswith(ENV_PREFIX)})
    assert sync_settings.triton_url == f"127.0.0.1:{ports['grpc']}"
    assert sync_settings.repository_poll_s == m.merged["triton"]["sync"]["pollSeconds"]
    assert (sync_settings.model_repository, sync_settings.triton_model) == (settings.model_repository,
                                                                            settings.triton_model)  # fmt: skip
    mounts = {v["name"]: v for v in sync["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True and str(settings.model_repository).startswith(
        mounts["models"]["mountPath"]
    )
    assert "wait-for-model" not in {c["name"] for c in containers(triton)}  # Triton may start before any version
    # The Jobs reach every Triton pod, Ready or not, through the admin Service.
    admin = m.get("Service", "shop-recsvc-triton-admin")
    assert admin["spec"]["publishNotReadyAddresses"] is True and admin["spec"]["clusterIP"] == "None"
    assert selects({"matchLabels": admin["spec"]["selector"]}, pod_labels(triton))
    assert [(p["port"], p["targetPort"]) for p in admin["spec"]["ports"]] == [(ports["grpc"], "grpc")]


@pytest.mark.parametrize("profile", [p for p in ALL if profile_values(p).get("triton", {}).get("target") != "cpu"])
def test_gpu_target(profile: str) -> None:
    m = manifests(profile)
    triton = m.component("triton")
    gpus = m.merged["triton"]["gpusPerPod"]
    gpu_containers = [c for c in containers(triton) if "nvidia.com/gpu" in c["resources"].get("limits", {})]
    assert {c["name"] for c in gpu_containers} == {"triton", "build-engines"}
    for c in gpu_containers:
        # Extended resources are not overcommitted: request must equal limit.
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container(triton, "triton")["image"].startswith("nvcr.io/nvidia/tritonserver:24.10")
    assert container(triton, "build-engines")["image"].startswith("nvcr.io/nvidia/tensorrt:24.10")
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(triton)["tolerations"])
    # Engines record their builder; it must be the image that builds them.
    builder = env_of(container(triton, "build-engines"))["BUILDER"]
    assert builder == container(triton, "build-engines")["image"]


@pytest.mark.parametrize("profile", ["cpu-only", "quickstart", "cpu-publish", "everything"])
def test_cpu_target_needs_no_gpu(profile: str) -> None:
    m = manifests(profile)
    text = json.dumps(m.objects)
    assert "nvidia.com/gpu" not in text and "nvcr.io" not in text
    t = container(m.component("triton"), "triton")
    assert t["command"] == ["tritonserver-bundled"]
    assert t["image"] == container(m.component("server"), "recsvc")["image"]


def test_engine_profile_matches_the_gpu_model_config() -> None:
    """The engine's largest batch must be the config's max_batch_size, or Triton rejects the engine."""
    max_batch = int(re.search(r"^max_batch_size:\s*(\d+)", config_template("gpu"), flags=re.M).group(1))  # type: ignore[union-attr]
    engine = helm_python.Chart.load(CHART).values["triton"]["engine"]
    assert engine["maxBatch"] == max_batch
    assert 1 <= engine["optBatch"] <= engine["maxBatch"]


# -------------------------------------------------------------------------------- selectors and labels
@pytest.mark.parametrize("profile", ALL)
def test_services_select_exactly_one_workload_on_named_ports(profile: str) -> None:
    m = manifests(profile)
    for service in m.of_kind("Service"):
        selector = {"matchLabels": service["spec"]["selector"]}
        targets = [w for w in m.workloads() if w["kind"] != "Job" and selects(selector, pod_labels(w))]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} workloads"
        port_names = {p["name"] for c in containers(targets[0], init=False) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (service["metadata"]["name"], port)


@pytest.mark.parametrize("profile", ALL)
def test_workload_selectors_match_their_pods(profile: str) -> None:
    m = manifests(profile)
    for w in m.workloads():
        if w["kind"] == "Job":
            continue
        assert selects(w["spec"]["selector"], pod_labels(w))
        others = [o for o in m.workloads() if o is not w and selects(w["spec"]["selector"], pod_labels(o))]
        assert others == [], f"{w['metadata']['name']} also selects {[o['metadata']['name'] for o in others]}"


@pytest.mark.parametrize("profile", ALL)
def test_pdbs_and_hpa_target_the_right_workloads(profile: str) -> None:
    m = manifests(profile)
    for pdb in m.of_kind("PodDisruptionBudget"):
        matched = [w for w in m.workloads() if selects(pdb["spec"]["selector"], pod_labels(w))]
        assert len(matched) == 1 and matched[0]["kind"] == "Deployment", pdb["metadata"]["name"]
    server = m.component("server")
    hpas = m.of_kind("HorizontalPodAutoscaler")
    if m.merged["autoscaling"]["enabled"]:
        (hpa,) = hpas
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", server["metadata"]["name"])
        # Helm must not reset the replica count the HPA chose on every upgrade.
        assert "replicas" not in server["spec"]
        metrics = {x["type"]: x for x in hpa["spec"]["metrics"]}
        assert metrics["Resource"]["resource"]["name"] == "cpu"
        assert metrics["Pods"]["pods"]["metric"]["name"] == m.merged["autoscaling"]["inflight"]["metricName"]
        assert "cpu" in container(server, "recsvc")["resources"]["requests"]  # utilization is relative to it
    else:
        assert hpas == [] and server["spec"]["replicas"] == m.merged["recsvc"]["replicas"]


@pytest.mark.parametrize("profile", ALL)
def test_network_policies(profile: str) -> None:
    m = manifests(profile)
    policies = {p["metadata"]["name"]: p for p in m.of_kind("NetworkPolicy")}
    if not m.merged["networkPolicy"]["enabled"]:
        assert policies == {}
        return
    server, triton = m.component("server"), m.component("triton")
    for policy in policies.values():
        targets = [w for w in m.workloads() if selects(policy["spec"]["podSelector"], pod_labels(w))]
        assert len(targets) == 1
        port_names = {p["name"] for c in containers(targets[0], init=False) for p in c.get("ports", [])}
        for rule in policy["spec"]["ingress"]:
            assert all(p["port"] in port_names for p in rule["ports"]), (policy["metadata"]["name"], rule)
    # Frontends reach recsvc's gRPC port.
    server_rules = policies[server["metadata"]["name"]]["spec"]["ingress"]
    assert server_rules[0]["from"] == m.merged["networkPolicy"]["frontends"]
    assert server_rules[0]["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    # Only recsvc and the Jobs that roll models out (publish, rollback) reach Triton's gRPC port.
    triton_rules = policies[triton["metadata"]["name"]]["spec"]["ingress"]
    grpc_rules = [r for r in triton_rules if {"port": "grpc", "protocol": "TCP"} in r["ports"]]
    assert len(grpc_rules) == 1
    peers = [w for w in m.workloads() for peer in grpc_rules[0]["from"] if selects(peer["podSelector"], pod_labels(w))]
    rollers = [w for w in m.workloads() if pod_labels(w)["app.kubernetes.io/component"] in ("publish", "rollback")]
    assert sorted(w["metadata"]["name"] for w in peers) == sorted(w["metadata"]["name"] for w in [server, *rollers])
    # Only recsvc (and the seed Job) reach the bundled Redis.
    if m.merged["redis"]["mode"] == "standalone":
        redis = m.component("redis")
        (rule,) = policies[redis["metadata"]["name"]]["spec"]["ingress"]
        admitted = {pod_labels(w)["app.kubernetes.io/component"] for w in m.workloads()
                    if selects(rule["from"][0]["podSelector"], pod_labels(w))}  # fmt: skip
        assert admitted <= {"server", "seed"} and "server" in admitted


@pytest.mark.parametrize("profile", ALL)
def test_service_monitors(profile: str) -> None:
    m = manifests(profile)
    monitors = m.of_kind("ServiceMonitor")
    if not m.merged["metrics"]["serviceMonitor"]["enabled"]:
        assert monitors == []
        return
    assert {mon["apiVersion"] for mon in monitors} == {"monitoring.coreos.com/v1"}
    assert len(monitors) == (2 if m.merged["recsvc"]["metricsPort"] else 1)
    for mon in monitors:
        assert mon["metadata"]["labels"].items() >= m.merged["metrics"]["serviceMonitor"]["labels"].items()
        services = [s for s in m.of_kind("Service") if selects(mon["spec"]["selector"], s["metadata"]["labels"])]
        # One Service per component: the headless one would double every sample.
        assert len(services) == 1, [s["metadata"]["name"] for s in services]
        names = {p["name"] for p in services[0]["spec"]["ports"]}
        assert all(e["port"] in names for e in mon["spec"]["endpoints"])
        assert mon["spec"]["namespaceSelector"]["matchNames"] == ["recs"]


# ------------------------------------------------------------------------------------------ pods
@pytest.mark.parametrize("profile", ALL)
def test_every_container_is_locked_down(profile: str) -> None:
    m = manifests(profile)
    for w in m.workloads():
        names = [c["name"] for c in containers(w)]
        assert len(names) == len(set(names)), f"{w['metadata']['name']}: container names must be unique: {names}"
        pod_sc = pod_spec(w).get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, w["metadata"]["name"]
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        assert pod_spec(w).get("automountServiceAccountToken") is False
        for c in containers(w):
            sc = c.get("securityContext", {})
            where = f"{w['metadata']['name']}/{c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) > 0, where
            assert "resources" in c and c["resources"].get("requests"), where


@pytest.mark.parametrize("profile", ALL)
def test_volumes_and_config_maps_exist(profile: str) -> None:
    m = manifests(profile)
    config_maps = {c["metadata"]["name"]: c for c in m.of_kind("ConfigMap")}
    claims = {c["metadata"]["name"] for c in m.of_kind("PersistentVolumeClaim")}
    existing = m.merged["modelRepository"]["pvc"]["existingClaim"]
    scripts = next(c for name, c in config_maps.items() if name.endswith("-scripts"))
    for w in m.workloads():
        volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
        templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for c in containers(w):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates, (c["name"], mount["name"])
            # Every script a container runs is in the scripts ConfigMap.
            for arg in c.get("command", []):
                if arg.startswith("/opt/recsvc-deploy/"):
                    assert Path(arg).name in scripts["data"], arg
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims | {existing}
    assert set(scripts["data"]) == {p.name for p in (CHART / "files").iterdir()}


def test_deny_list_is_mounted_where_recsvc_reads_it() -> None:
    m = manifests("everything")
    server, c, settings = _server(m)
    mounts = {v["mountPath"]: v for v in c["volumeMounts"]}
    mount = mounts[str(settings.deny_list.parent)]
    assert "subPath" not in mount  # subPath mounts never see ConfigMap updates
    volume = next(v for v in pod_spec(server)["volumes"] if v["name"] == mount["name"])
    config_map = m.get("ConfigMap", volume["configMap"]["name"])
    assert settings.deny_list.name in config_map["data"]
    # The service reloads the list itself: changing it must not roll the pods.
    assert not any("deny" in k for k in server["spec"]["template"]["metadata"]["annotations"])


def test_writable_paths_are_volumes() -> None:
    """With a read-only root filesystem, the data dir and /tmp must be mounted volumes."""
    m = manifests("defaults")
    _, c, settings = _server(m)
    mount_paths = {v["mountPath"] for v in c["volumeMounts"]}
    assert {str(settings.data_dir), "/tmp"} <= mount_paths


# ------------------------------------------------------------------------------------- publish Job
@pytest.mark.parametrize(
    ("profile", "init", "main"),
    [
        ("cpu-publish", [], ["publish"]),
        ("gpu-publish", ["stage", "build-engine", "commit"], ["rollout"]),
        ("cpu-object-storage-publish", ["fetch", "stage", "upload"], ["rollout"]),
        ("gpu-object-storage-publish", ["fetch", "stage", "build-engine", "upload"], ["rollout"]),
        ("quickstart", [], ["publish"]),
    ],
)
def test_publish_job_steps(profile: str, init: list[str], main: list[str]) -> None:
    m = manifests(profile)
    job = m.component("publish")
    spec = pod_spec(job)
    assert [c["name"] for c in spec.get("initContainers", [])] == init
    assert [c["name"] for c in spec["containers"]] == main
    assert spec["restartPolicy"] == "Never"
    if "build-engine" in init:
        # Built on a GPU like Triton's: same node selection and tolerations.
        triton = pod_spec(m.component("triton"))
        assert spec.get("nodeSelector") == triton.get("nodeSelector")
        assert spec["tolerations"] == triton["tolerations"]
        assert container(job, "build-engine")["resources"]["limits"]["nvidia.com/gpu"] == 1
    writers = {c["name"] for c in containers(job) for v in c.get("volumeMounts", [])
               if v["name"] == "models" and not v.get("readOnly")}  # fmt: skip
    assert writers <= {"publish", "commit", "rollout"}


def test_no_publish_job_without_a_bundle() -> None:
    assert [w for w in manifests("defaults").workloads() if w["kind"] == "Job"] == []


def test_publish_job_name_follows_the_bundle() -> None:
    """A new bundle makes a new Job (Job templates are immutable); the same values keep the same Job."""

    def job_name(values: dict[str, Any]) -> str:
        name: str = manifests_for(values).component("publish")["metadata"]["name"]
        return name

    first = job_name({"publish": {"bundle": "a"}})
    again = job_name({"publish": {"bundle": "a"}, "recsvc": {"replicas": 5}})
    other = job_name({"publish": {"bundle": "b"}})
    assert first == again != other
    assert first.startswith("shop-recsvc-publish-")


def test_publish_bundle_path_and_flavour() -> None:
    m = manifests("gpu-publish")
    env = env_of(container(m.component("publish"), "stage"))
    assert env["BUNDLE_DIR"] == "/models/bundles/movielens-2026-11-30"
    assert env["FLAVOUR"] == "gpu" and env["MODEL"] == "ranker"
    obj = env_of(container(manifests("gpu-object-storage-publish").component("publish"), "fetch"))
    assert obj["BUNDLE"] == "movielens-2026-11-30" and obj["REMOTE"] == "s3:my-models/recsvc"


# The step of each Job that rolls out, and the recsvc command it runs (files/rollout.py runs it).
ROLLERS = {"publish": ("publish", ["sh", "/opt/recsvc-deploy/publish.sh", "direct"]),
           "rollout": ("rollout", ["python", "/opt/recsvc-deploy/rollout.py", "rollout"]),
           "rollback": ("rollback", ["python", "/opt/recsvc-deploy/rollout.py", "rollback"])}  # fmt: skip


def _rolling_step(job: dict[str, Any]) -> dict[str, Any]:
    """The Job's container: the one that runs the rollout (publish direct, rollout, rollback)."""
    (main,) = pod_spec(job)["containers"]
    assert main["name"] in ROLLERS and main["command"] == ROLLERS[main["name"]][1], main["command"]
    return main


@pytest.mark.parametrize(
    "profile",
    ["cpu-publish", "gpu-publish", "cpu-object-storage-publish", "gpu-object-storage-publish", "quickstart",
     "rollback", "object-storage-rollback", "everything"],
)  # fmt: skip
def test_jobs_roll_out_through_triton_with_the_servers_settings(profile: str) -> None:
    """The publish and rollback Jobs run recsvc's rollout against the Triton Service's pods, on the repository
    recsvc and triton-sync read, and drain at least as long as a replica needs to switch."""
    m = manifests(profile)
    _, _, server = _server(m)
    triton = m.component("triton")
    grpc_port = next(p["containerPort"] for p in container(triton, "triton")["ports"] if p["name"] == "grpc")
    object_storage = m.merged["modelRepository"]["source"] == "objectStorage"
    jobs = [w for w in m.workloads() if w["kind"] == "Job" and pod_labels(w)["app.kubernetes.io/component"]
            in ("publish", "rollback")]  # fmt: skip
    assert jobs
    for job in jobs:
        step = _rolling_step(job)
        env = env_of(step)
        settings = load_settings({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
        host, port = settings.triton_url.rsplit(":", 1)
        admin = m.get("Service", host)
        assert admin["spec"].get("publishNotReadyAddresses") is True
        assert selects({"matchLabels": admin["spec"]["selector"]}, pod_labels(triton)) and int(port) == grpc_port
        assert settings.rollout_drain_s == m.merged["rollout"]["drainSeconds"]
        assert settings.rollout_ready_timeout_s == m.merged["rollout"]["readyTimeoutSeconds"]
        assert settings.rollout_drain_s >= server.repository_poll_s + server.request_timeout_s
        assert int(env["TRITON_WAIT_S"]) == m.merged["rollout"]["tritonWaitSeconds"]
        assert settings.triton_model == server.triton_model
        mounts = {v["name"]: v for v in step["volumeMounts"]}
        if object_storage:
            # The fetch step's scratch copy, and the bucket it uploads serving.json to.
            assert str(settings.model_repository) == "/work/repository" and mounts["work"]["mountPath"] == "/work"
            assert env["RCLONE"] == "/work/bin/rclone" and env["REMOTE"] == m.merged["modelRepository"][
                "objectStorage"]["remote"]  # fmt: skip
            assert float(env["ACK_MAX_AGE_S"]) > 2 * float(
                env_of(container(triton, "sync-models"))["ACK_SECONDS"])  # fmt: skip
            assert int(env["KEEP_VERSIONS"]) == m.merged["modelRepository"]["objectStorage"]["keepVersions"]
            assert pod_spec(job)["initContainers"][0]["name"] == "fetch"
        else:
            # serving.json is written where the server and triton-sync read it: the volume, mounted writable.
            assert settings.model_repository == server.model_repository
            assert str(settings.model_repository).startswith(mounts["models"]["mountPath"] + "/")
            assert not mounts["models"].get("readOnly")
        if step["name"] == "rollback":
            assert env["ROLLBACK_REQUEST"] == m.merged["rollback"]["request"]
            assert int(env["ROLLBACK_TO"]) == m.merged["rollback"]["toVersion"]


def test_rollback_job_runs_per_request() -> None:
    """No request, no Job; each request is its own Job (the Job records it and never repeats it)."""
    assert [w for w in manifests("defaults").workloads() if w["kind"] == "Job"] == []
    first = manifests_for({"rollback": {"request": "a"}}).component("rollback")
    again = manifests_for({"rollback": {"request": "a"}, "recsvc": {"replicas": 5}}).component("rollback")
    other = manifests_for({"rollback": {"request": "b"}}).component("rollback")
    to = manifests_for({"rollback": {"request": "a", "toVersion": 4}}).component("rollback")
    assert first["metadata"]["name"] == again["metadata"]["name"] != other["metadata"]["name"]
    assert first["metadata"]["name"].startswith("shop-recsvc-rollback-") and to["metadata"]["name"] != first[
        "metadata"]["name"]  # fmt: skip
    assert env_of(_rolling_step(to))["ROLLBACK_TO"] == "4"
    assert to["metadata"]["annotations"]["recsvc.io/rollback"] == "a: version 4"
    assert [c["name"] for c in containers(first)] == ["rollback"]
    # With object storage the fetch step makes the scratch copy the rollback works on.
    job = manifests("object-storage-rollback").component("rollback")
    assert [c["name"] for c in containers(job)] == ["fetch", "rollback"]
    assert "BUNDLE" not in env_of(container(job, "fetch"))
    assert "rollback.request=$(date" in manifests("defaults").notes


def test_drain_shorter_than_a_switch_is_refused() -> None:
    """rollout.drainSeconds >= repositoryPollSeconds + request_timeout_s (+ servingPollSeconds with a bucket).
    The chart assumes recsvc's default request_timeout_s; this keeps the two in step."""
    timeout = Settings().request_timeout_s
    poll = helm_python.Chart.load(CHART).values["recsvc"]["repositoryPollSeconds"]
    render({"rollout": {"drainSeconds": poll + timeout}})
    with pytest.raises(helm_python.HelmRenderError, match=r"rollout\.drainSeconds .* must be at least"):
        render({"rollout": {"drainSeconds": poll + timeout - 0.5}})
    with pytest.raises(helm_python.HelmRenderError, match=r"must be at least 12"):
        render({"rollout": {"drainSeconds": 10}, "recsvc": {"settings": {"request_timeout_s": 10}}})
    bucket = profile_values("object-storage")
    serving_poll = helm_python.Chart.load(CHART).values["modelRepository"]["objectStorage"]["servingPollSeconds"]
    with pytest.raises(helm_python.HelmRenderError, match=r"must be at least"):
        render({**bucket, "rollout": {"drainSeconds": poll + timeout + serving_poll - 0.5}})


def test_object_storage_pods_sync_their_own_copy() -> None:
    m = manifests("object-storage")
    for component in ("server", "triton"):
        w = m.component(component)
        spec = pod_spec(w)
        assert spec["initContainers"][0]["name"] == "fetch-models"
        assert any(c["name"] == "sync-models" for c in spec["containers"])
        models = next(v for v in spec["volumes"] if v["name"] == "models")
        assert "emptyDir" in models
        sidecar = container(w, "sync-models")
        assert sidecar["command"][-1] == "loop" and env_of(sidecar)["KEEP_VERSIONS"] == "3"
        # serving.json reaches every pod that reads it: recsvc replicas and triton-sync.
        assert env_of(sidecar)["SERVING_POLL_SECONDS"] == "2"
        assert env_of(container(w, "fetch-models"))["KEEP_VERSIONS"] == "3"
        # Triton pods report the versions their copies hold; the Jobs wait on that before a rollout.
        ack = env_of(sidecar).get("ACK_NAME")
        if component == "triton":
            assert ack == {"fieldRef": {"fieldPath": "metadata.name"}}
        else:
            assert ack is None


def test_seed_job_uses_the_servers_redis() -> None:
    m = manifests("everything")
    _, c, _ = _server(m)
    seed = container(m.component("seed"), "seed")
    for name in ("RECSVC_HISTORY_STORE", "RECSVC_REDIS_URL", "RECSVC_REDIS_CLUSTER"):
        assert env_of(seed)[name] == env_of(c)[name]
    # A re-run (a new release hash over the same Redis) must succeed: the seeded store is left alone.
    assert seed["command"] == ["recsvc", "seed", "--if-empty"]


@pytest.mark.parametrize("profile", ["bundled-redis", "quickstart"])
def test_bundled_redis(profile: str) -> None:
    m = manifests(profile)
    redis = m.component("redis")
    r = container(redis, "redis")
    assert r["args"][r["args"].index("--appendonly") + 1] == "yes"
    assert r["args"][r["args"].index("--appendfsync") + 1] == "always"
    _, _, settings = _server(m)
    service = m.get("Service", "shop-recsvc-redis")
    assert settings.redis_url.startswith("redis://") and "shop-recsvc-redis:6379" in settings.redis_url
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(redis))
    assert redis["spec"]["serviceName"] in {s["metadata"]["name"] for s in m.of_kind("Service")}
    if profile == "bundled-redis":
        assert "--requirepass" in r["args"]
        assert "$(REDIS_PASSWORD)" in env_of(container(m.component("server"), "recsvc"))["RECSVC_REDIS_URL"]


def test_external_redis_cluster_from_a_secret() -> None:
    m = manifests("external-redis")
    env = env_of(container(m.component("server"), "recsvc"))
    assert env["RECSVC_REDIS_CLUSTER"] == "true"
    assert env["RECSVC_REDIS_URL"] == {"secretKeyRef": {"name": "recsvc-redis", "key": "redis-url"}}
    assert m.of_kind("StatefulSet") == []


def test_notes_explain_next_steps() -> None:
    notes = manifests("quickstart").notes
    assert "shop-recsvc.recs.svc:50051" in notes
    assert "trains and publishes a first model" in notes
    assert "grpc.health.v1.Health/Check" in notes


def test_workers_need_cpu_per_worker_in_profiles() -> None:
    """A profile that runs several workers requests at least one CPU for each (the HPA's CPU target is
    relative to the request, so an undersized request would scale out a pod that is not busy)."""
    for profile in ALL:
        r = manifests(profile).merged["recsvc"]
        if r["workers"] == 1:
            continue
        cpu = str(r["resources"]["requests"]["cpu"])
        cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        assert cores >= r["workers"] or math.isclose(cores, r["workers"]), profile


def test_deny_list_holds_every_id_the_api_accepts(tmp_path: Path) -> None:
    from recsvc.deny import read_deny_list
    from recsvc.ids import valid_id

    skus = ["sku-1", "has space", "x#y", "#lead", "back\\slash", "esc\\#aped", "ünï cødé"]
    assert all(valid_id(s, 128) for s in skus)
    m = manifests_for({"recsvc": {"denyList": skus}})
    text = m.get("ConfigMap", "shop-recsvc-deny-list")["data"]["deny_list.txt"]
    path = tmp_path / "deny_list.txt"
    path.write_text(text, encoding="utf-8")
    assert read_deny_list(path) == set(skus)         # what the server will read is exactly the list
    for bad in [" lead", "trail ", "nul\x00", "new\nline", ""]:
        with pytest.raises(helm_python.HelmValuesError, match="denyList"):
            render({"recsvc": {"denyList": [bad]}})


@pytest.mark.parametrize("profile", ALL)
def test_kubernetes_restarts_a_dead_or_hung_triton(profile: str) -> None:
    """`recsvc triton` restarts tritonserver itself; in the chart the kubelet does, and probes tell it to."""
    m = manifests(profile)
    triton = m.component("triton")
    spec = pod_spec(triton)
    # A crash or abort ends the container (tritonserver is its main process, exec'd): the kubelet restarts it.
    assert spec.get("restartPolicy", "Always") == "Always"
    t = container(triton, "triton")
    assert t["command"][0] in ("tritonserver", "tritonserver-bundled")
    # A hung server (deadlock, SIGSTOP) fails liveness and is restarted within a bounded time...
    live, start, ready = t["livenessProbe"], t["startupProbe"], t["readinessProbe"]
    hung_for = live["periodSeconds"] * live["failureThreshold"] + live["timeoutSeconds"]
    assert hung_for <= 120
    # ...but a busy one is not killed for one slow answer, nor a slow start (model load, warm-up).
    for probe in (live, start, ready):
        assert probe["timeoutSeconds"] >= 2 and probe["periodSeconds"] > 0
    assert live["failureThreshold"] >= 3
    assert start["periodSeconds"] * start["failureThreshold"] >= 300
    # Out of the Service as soon as its model is not ready (e.g. after a restart, until triton-sync re-pins).
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 30
