"""Checks on the rendered manifests and the Dockerfile that JSON schemas cannot make.

Run by .ci/deploy-lint, after `kubectl kustomize` has rendered each overlay:

    python check_manifests.py REPO_ROOT OUT_DIR NAME=RENDERED.yaml...

A NAME without "+" is a plain overlay; "overlay+components" is a composition with optional
components. For every rendering it writes OUT_DIR/NAME.core.yaml, the same documents without
Custom Resources, for kubernetes-validate (which has no schemas for them).

Each error names the object and the rule it breaks. The proxy's side of the contract
(listeners, probes, drain, credential files) is documented in config/idmatch-proxy.toml and
deploy/README.md.
"""

import copy
import ipaddress
import pathlib
import re
import sys
import tomllib

import yaml

PROXY = "idmatch-proxy"
UID = 65532
ADMIN_PORT = 9901
# The proxy's defaults, used when a manifest leaves the variable unset.
DEFAULT_DRAIN_DELAY = "5s"
DEFAULT_SHUTDOWN_TIMEOUT = "20s"
# Kinds that only exist where a CRD is installed: allowed in compositions, never in overlays.
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor"}
# Container fields that legitimately differ between the patterns; everything else in the
# proxy's container must be identical in every overlay.
PATTERN_FIELDS = {"ports", "restartPolicy"}
# The callback listener faces an Ingress: the shared pattern's only.
PATTERN_ENV = {
    "IDMATCH_LISTEN",
    "IDMATCH_DRAIN_DELAY",
    "IDMATCH_CALLBACK_LISTEN",
    "IDMATCH_CALLBACK_FORWARD_URL",
}

errors: list[str] = []


def error(where: str, message: str) -> None:
    errors.append(f"{where}: {message}")


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    if not match:
        raise ValueError(f"not a duration: {text!r}")
    number, unit = int(match[1]), match[2]
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def env_value(container: dict, name: str, default: str | None = None) -> str | None:
    entry = env_of(container).get(name)
    return entry.get("value", default) if entry else default


def split_addr(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, _, port = text.rpartition(":")
    return ipaddress.ip_address(host.strip("[]")), int(port)


def matches(selector: dict, labels: dict) -> bool:
    wanted = selector.get("matchLabels", {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def find_proxy(spec: dict) -> tuple[str, dict] | None:
    found = [
        (kind, c)
        for kind in ("initContainers", "containers")
        for c in spec.get(kind) or []
        if c["name"] == PROXY
    ]
    return found[0] if len(found) == 1 else None


def check_container(where: str, pod: dict, kind: str, proxy: dict, shared: bool) -> None:
    spec = pod["spec"]
    # Native sidecar: an init container that keeps running.
    if kind == "initContainers" and proxy.get("restartPolicy") != "Always":
        error(where, "the proxy is an init container without restartPolicy: Always")

    # Hardening. seccomp may come from the pod.
    sc = proxy.get("securityContext", {})
    want = {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
    }
    for key, value in want.items():
        if sc.get(key) != value:
            error(where, f"securityContext.{key} must be {value!r}, got {sc.get(key)!r}")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        error(where, "securityContext.capabilities.drop must be [ALL]")
    seccomp = sc.get("seccompProfile") or spec.get("securityContext", {}).get("seccompProfile")
    if (seccomp or {}).get("type") != "RuntimeDefault":
        error(where, "seccompProfile must be RuntimeDefault")

    resources = proxy.get("resources", {})
    for path in ("requests.cpu", "requests.memory", "limits.memory"):
        section, name = path.split(".")
        if name not in resources.get(section, {}):
            error(where, f"resources.{path} is not set")

    # The secret never travels in the environment or on the command line.
    env = env_of(proxy)
    if "IDMATCH_SECRET" in env:
        error(where, "IDMATCH_SECRET is set: mount the Secret and use IDMATCH_SECRET_FILE")
    for entry in env.values():
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref.get("key") == "secret":
            error(where, f"{entry['name']} takes the secret from the environment")

    # Listeners. The admin listener must be reachable on the pod IP, for the kubelet.
    admin = env_value(proxy, "IDMATCH_ADMIN_LISTEN")
    listen = env_value(proxy, "IDMATCH_LISTEN")
    if admin is None or listen is None:
        error(where, "IDMATCH_LISTEN and IDMATCH_ADMIN_LISTEN must both be set")
        return
    admin_ip, admin_port = split_addr(admin)
    listen_ip, listen_port = split_addr(listen)
    if not admin_ip.is_unspecified:
        error(where, f"IDMATCH_ADMIN_LISTEN={admin}: probes reach the pod IP; bind 0.0.0.0")
    if shared and not listen_ip.is_unspecified:
        error(where, f"IDMATCH_LISTEN={listen}: the Service needs 0.0.0.0")
    if not shared and not listen_ip.is_loopback:
        error(where, f"IDMATCH_LISTEN={listen}: a sidecar must bind loopback only")
    ports = {p["name"]: p["containerPort"] for p in proxy.get("ports", [])}
    if ports.get("admin") != admin_port or admin_port != ADMIN_PORT:
        error(where, f"container port 'admin' must be {ADMIN_PORT}, as IDMATCH_ADMIN_LISTEN")
    if shared and ports.get("proxy") != listen_port:
        error(where, "container port 'proxy' must match IDMATCH_LISTEN")
    if not shared and listen_port in ports.values():
        error(where, "a loopback-only proxy port must not be declared as a container port")

    probes = {
        "startupProbe": "/readyz",
        "livenessProbe": "/livez",
        "readinessProbe": "/readyz",
    }
    for probe, path in probes.items():
        get = proxy.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("admin", ADMIN_PORT):
            error(where, f"{probe} must GET {path} on the admin port")

    # Shutdown: drain + in-flight bound must fit in the grace period.
    drain = seconds(env_value(proxy, "IDMATCH_DRAIN_DELAY", DEFAULT_DRAIN_DELAY))
    timeout = seconds(env_value(proxy, "IDMATCH_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT))
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace <= drain + timeout:
        error(where, f"terminationGracePeriodSeconds {grace} <= drain {drain}s + {timeout}s")

    # Volumes: the config file from the ConfigMap, the credentials from a Secret directory.
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = proxy.get("volumeMounts", [])

    def volume_for(path: str):
        for mount in mounts:
            if path.startswith(mount["mountPath"].rstrip("/") + "/"):
                return mount, volumes.get(mount["name"], {})
        return None, {}

    for var in ("IDMATCH_SECRET_FILE", "IDMATCH_KEY_ID_FILE"):
        path = env_value(proxy, var)
        if path is None:
            error(where, f"{var} is not set")
            continue
        mount, volume = volume_for(path)
        if mount is None or "secret" not in volume:
            error(where, f"{var}={path} is not inside a mounted Secret")
        elif "subPath" in mount:
            error(where, f"{var}: a subPath mount never sees Secret updates")
        elif pathlib.PurePosixPath(path).name not in ("secret", "key-id"):
            error(where, f"{var}={path}: the Secret's keys are key-id and secret")
    config = env_value(proxy, "IDMATCH_CONFIG")
    mount, volume = volume_for(config or "")
    if mount is None or "configMap" not in volume:
        error(where, f"IDMATCH_CONFIG={config} is not inside a mounted ConfigMap")


def comparable(container: dict) -> dict:
    """The proxy's container without what the patterns set differently."""
    c = copy.deepcopy(container)
    for field in PATTERN_FIELDS:
        c.pop(field, None)
    c["env"] = sorted(
        (e for e in c.get("env", []) if e["name"] not in PATTERN_ENV), key=lambda e: e["name"]
    )
    return c


def check_rendering(name: str, docs: list[dict], config_text: str) -> dict | None:
    """Checks one rendering; returns its proxy container, if it has exactly one."""
    overlay = "+" not in name
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    if overlay and "Secret" in by_kind:
        error(name, "renders a Secret: real credentials are created out of band, never applied")
    if overlay and CUSTOM_KINDS & by_kind.keys():
        error(name, "renders a Custom Resource: put it in a component (its CRD may be absent)")
    config_maps = [c for c in by_kind.get("ConfigMap", []) if "idmatch-proxy.toml" in c["data"]]
    if len(config_maps) != 1 or config_maps[0]["data"]["idmatch-proxy.toml"] != config_text:
        error(name, "the ConfigMap must hold config/idmatch-proxy.toml verbatim")

    proxy = None
    pods = []  # (labels, container port names, the proxy's port numbers)
    for deployment in by_kind.get("Deployment", []):
        where = f"{name}: Deployment/{deployment['metadata']['name']}"
        pod = deployment["spec"]["template"]
        found = find_proxy(pod["spec"])
        if found is None:
            error(where, f"exactly one container must be named {PROXY}")
            continue
        kind, proxy = found
        check_container(where, pod, kind, proxy, shared=deployment["metadata"]["name"] == PROXY)
        if pod["metadata"].get("annotations", {}).get("prometheus.io/port") != str(ADMIN_PORT):
            error(where, "prometheus.io/port must name the admin port")
        containers = pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
        names = {p["name"] for c in containers for p in c.get("ports", [])}
        numbers = {p["containerPort"] for p in proxy.get("ports", [])}
        pods.append((pod["metadata"].get("labels", {}), names, numbers))

    def selected(selector: dict) -> list[tuple]:
        return [p for p in pods if matches(selector, p[0])]

    for service in by_kind.get("Service", []):
        where = f"{name}: Service/{service['metadata']['name']}"
        targets = selected({"matchLabels": service["spec"].get("selector", {})})
        if not targets:
            error(where, "selects no pod")
        for port in service["spec"]["ports"]:
            if any(port["targetPort"] not in names for _, names, _ in targets):
                error(where, f"targetPort {port['targetPort']} is no named container port")
    for kind in ("PodDisruptionBudget", "NetworkPolicy", "PodMonitor"):
        for o in by_kind.get(kind, []):
            selector = o["spec"]["podSelector" if kind == "NetworkPolicy" else "selector"]
            if not selected(selector):
                error(f"{name}: {kind}/{o['metadata']['name']}", "selects no pod")
    for policy in by_kind.get("NetworkPolicy", []):
        pods_behind = selected(policy["spec"]["podSelector"])
        served = set().union(*(numbers for _, _, numbers in pods_behind))
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                if port["port"] not in served:
                    error(f"{name}: NetworkPolicy", f"admits port {port['port']}, not served there")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        scaled = [d for d in by_kind.get("Deployment", []) if d["metadata"]["name"] == target]
        if not scaled:
            error(f"{name}: HorizontalPodAutoscaler", f"targets no Deployment {target}")
        elif "replicas" in scaled[0]["spec"]:
            error(f"{name}: Deployment/{target}", "sets replicas, which fights its autoscaler")
    for monitor in by_kind.get("PodMonitor", []):
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            scraped = selected(monitor["spec"]["selector"])
            if any(endpoint["port"] not in names for _, names, _ in scraped):
                error(f"{name}: PodMonitor", f"port {endpoint['port']} is no container port")
    for monitor in by_kind.get("ServiceMonitor", []):
        services = [
            s for s in by_kind.get("Service", [])
            if matches(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        if len(services) != 1:
            error(f"{name}: ServiceMonitor", f"selects {len(services)} Services, not 1")
            continue
        port_names = {p["name"] for p in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint["port"] not in port_names:
                error(f"{name}: ServiceMonitor", f"port {endpoint['port']} is not in the Service")
    return proxy


def check_src_knows(repo: pathlib.Path, containers: dict[str, dict]) -> None:
    """Every IDMATCH_* variable the manifests set is one the binary reads."""
    src = "\n".join(p.read_text() for p in sorted((repo / "src").rglob("*.rs")))
    names = {e["name"] for c in containers.values() for e in c.get("env", [])}
    for var in sorted(n for n in names if n.startswith("IDMATCH_")):
        if f'"{var}"' not in src:
            error("manifests", f"set {var}, which src/ does not read")
    # The image's HEALTHCHECK and the probes call these.
    if not re.search(r"\bHealthcheck\b", (repo / "src/main.rs").read_text()):
        error("Dockerfile", "HEALTHCHECK runs `idmatch-proxy healthcheck`: no such subcommand")
    for path in ("/livez", "/readyz", "/metrics"):
        if f'"{path}"' not in src:
            error("probes", f"the admin listener serves no {path}")


def check_dockerfile(repo: pathlib.Path) -> None:
    text = (repo / "Dockerfile").read_text()
    package = tomllib.loads((repo / "Cargo.toml").read_text())["package"]
    version = re.search(r"^ARG VERSION=(\S+)", text, re.M)
    if not version or version[1] != package["version"]:
        error("Dockerfile", f"ARG VERSION must default to Cargo.toml's {package['version']}")
    rust = re.search(r"^FROM rust:(\d+\.\d+(?:\.\d+)?)", text, re.M)
    msrv = package["rust-version"]
    if not rust or version_tuple(rust[1]) < version_tuple(msrv):
        error("Dockerfile", f"the builder's Rust must be at least rust-version {msrv}")
    if not re.search(rf"^USER {UID}:{UID}$", text, re.M):
        error("Dockerfile", f"USER must be {UID}:{UID}, the manifests' runAsUser")
    expose = re.search(r"^EXPOSE (.+)$", text, re.M)
    if not expose or set(expose[1].split()) != {"8080", str(ADMIN_PORT)}:
        error("Dockerfile", f"EXPOSE must list 8080 and {ADMIN_PORT}")
    if not re.search(r'CMD \["/idmatch-proxy", "healthcheck"\]', text):
        error("Dockerfile", "HEALTHCHECK must run the binary's healthcheck subcommand")


def main(argv: list[str]) -> int:
    repo, out = pathlib.Path(argv[1]), pathlib.Path(argv[2])
    config_text = (repo / "config/idmatch-proxy.toml").read_text()
    containers: dict[str, dict] = {}
    for arg in argv[3:]:
        name, _, path = arg.partition("=")
        docs = [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]
        container = check_rendering(name, docs, config_text)
        if container is not None and "+" not in name:
            containers[name] = container
        core = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
        (out / f"{name}.core.yaml").write_text(yaml.safe_dump_all(core, sort_keys=False))

    # One proxy container, whatever the pattern: hardening, probes and resources must not drift.
    if not containers:
        error("manifests", f"no overlay has a {PROXY} container")
        containers = {"": {}}
    reference_name, reference = next(iter(containers.items()))
    reference = comparable(reference)
    for name, container in containers.items():
        container = comparable(container)
        keys = reference.keys() | container.keys()
        differing = sorted(k for k in keys if reference.get(k) != container.get(k))
        if differing:
            error(name, f"the {PROXY} container differs from {reference_name}'s in {differing}")

    check_src_knows(repo, containers)
    check_dockerfile(repo)

    for e in errors:
        print(f"deploy-lint: error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
