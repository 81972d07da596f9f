#!/usr/bin/env python3
"""Offline checks of deploy/ (run by scripts/check-deploy, which installs the tools).

Usage: check.py KUBECTL KUBERNETES_VALIDATE PROMTOOL CHAT_BINARY OUT_DIR

1. renders base and every overlay with the real kustomize (`kubectl kustomize`);
2. validates every rendered object against the Kubernetes OpenAPI schema
   (kubernetes-validate --strict, pinned version); the Prometheus Operator CRDs
   (ServiceMonitor, PrometheusRule) have no schema there: they are checked by
   yamllint, by the structural checks below and (rules) by promtool;
3. loads the TOML of every chat ConfigMap through the real binary
   (`chat <tier> --check-config --config FILE`);
4. checks that ports, probes, scrape annotations, Services, ServiceMonitors,
   grace periods and security contexts agree with what that TOML makes the
   binaries serve;
5. checks the PrometheusRule's spec equals deploy/prometheus/rules.yml and runs
   `promtool check rules` on both;
6. checks every chat_* metric the rules and the dashboard use is registered in
   the source (tests/deploy.rs also checks them against live /metrics output);
7. evaluates the NetworkPolicies as Kubernetes does and checks who can reach
   each named port of each tier against the intended matrix (REACH);
8. checks that the connection caps agree (cap_problems): every chat server's
   dbproxy pool fits one dbproxy (replicas(server) × server.dbproxy_pool_max
   ≤ dbproxy.max_connections: the servers reach the dbproxies through one
   Service, and kube-proxy may put every connection on one pod), and pools
   close idle connections before the dbproxy would; mutated copies of each
   rendered target must fail it, so the check itself is tested;
9. checks that the kind and production targets run every internal hop over
   mutual TLS with the bearer token (tls_problems): each tier's certificate,
   key and CA, the servers' https dbproxy_url and token file, the dbproxies'
   accepted-token file, each from a mounted Secret, the servers' token and
   the dbproxies' accepted list from the same Secret; mutated copies
   missing one piece must fail it.
"""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

K8S_VERSION = "1.33.0"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TARGETS = {"base": "k8s/base", "kind": "k8s/overlays/kind", "production": "k8s/overlays/production"}
# Where each tier serves /metrics, /healthz, /readyz: the key of its section.
ADMIN_KEY = {"proxy": "admin_listen", "server": "admin_listen", "dbproxy": "admin_listen"}
# The binaries' defaults for the connection caps (server/src/config.rs,
# dbproxy/src/config.rs), used when a ConfigMap leaves a key out.
# Targets whose internal hops must be mutual TLS with a bearer token.
TLS_REQUIRED = {"kind", "production"}
SERVER_POOL_MAX = 256
SERVER_POOL_IDLE_MS = 30000
DBPROXY_MAX_CONNECTIONS = 1024
DBPROXY_IDLE_TIMEOUT_MS = 60000

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL: {msg}")


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def host_of(addr):
    return addr.rsplit(":", 1)[0]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def render(kubectl, out):
    rendered = {}
    for name, path in TARGETS.items():
        r = run([kubectl, "kustomize", str(DEPLOY / path)])
        if r.returncode != 0:
            fail(f"kustomize {path}: {r.stderr.strip()}")
            continue
        (out / f"{name}.yaml").write_text(r.stdout)
        rendered[name] = [d for d in yaml.safe_load_all(r.stdout) if d]
        print(f"ok: kustomize {path} ({len(rendered[name])} objects)")
    return rendered


def validate_schemas(kv, out, rendered):
    for name, docs in rendered.items():
        d = out / f"{name}-k8s"
        d.mkdir(exist_ok=True)
        files = []
        for i, doc in enumerate(docs):
            if doc["kind"] in CRD_KINDS:
                print(f"note: {name}: {doc['kind']}/{doc['metadata']['name']} is a CRD: "
                      "not schema-validated (yamllint + structural checks + promtool)")
                continue
            f = d / f"{i:02d}-{doc['kind']}-{doc['metadata']['name']}.yaml"
            f.write_text(yaml.safe_dump(doc))
            files.append(str(f))
        r = run([kv, "--strict", "--quiet", "-k", K8S_VERSION, *files])
        if r.returncode != 0:
            fail(f"kubernetes-validate {name}:\n{r.stdout}{r.stderr}")
        else:
            print(f"ok: kubernetes-validate --strict -k {K8S_VERSION}: {name} ({len(files)} objects)")


def index(docs):
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def chat_workloads(docs):
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        if c.get("args", [None])[0] in ADMIN_KEY:
            yield d, spec, c


def config_of(objs, spec, container):
    """The TOML the container reads: the ConfigMap mounted at --config's directory."""
    args = container["args"]
    cfg_path = args[args.index("--config") + 1]
    cfg_dir, cfg_file = cfg_path.rsplit("/", 1)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == cfg_dir)
    vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    cm = objs[("ConfigMap", vol["configMap"]["name"])]
    return cm["data"][cfg_file]


def check_configs(chat, out, rendered):
    for name, docs in rendered.items():
        objs = index(docs)
        for d, spec, c in chat_workloads(docs):
            tier = c["args"][0]
            text = config_of(objs, spec, c)
            f = out / f"{name}-{tier}.toml"
            f.write_text(text)
            r = run([chat, tier, "--check-config", "--config", str(f)],
                    env={**os.environ, **container_env(c)})
            if r.returncode == 0 and "config ok" in r.stdout:
                print(f"ok: chat {tier} --check-config: {name} ConfigMap + container env")
            else:
                fail(f"{name}: chat {tier} --check-config on its ConfigMap: {r.stdout}{r.stderr}")


def effective(tier, sec, env):
    """The tier's section as the binary sees it: the TOML with its
    CHAT_<TIER>__KEY__SUB environment overrides applied (values as strings)."""
    out = json.loads(json.dumps(sec))
    prefix = f"CHAT_{tier.upper()}__"
    for k, v in env.items():
        if not k.startswith(prefix):
            continue
        path = k[len(prefix):].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = v
    return out


def secret_of(spec, container, path):
    """The Secret mounted where `path` lives (the deepest mount holding
    it), or None when that mount is not a Secret."""
    mounts = [m for m in container.get("volumeMounts", []) if str(path).startswith(m["mountPath"] + "/")]
    mount = max(mounts, key=lambda m: len(m["mountPath"]), default=None)
    vol = mount and next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), None)
    if not vol or "secret" not in vol:
        return None
    return vol["secret"]["secretName"]


def tls_problems(tiers):
    """What keeps one rendered target's internal hops from being mutual TLS
    with a bearer token. `tiers` maps a tier to (spec, container, section)."""
    problems = []
    keys = {"server": "tls", "proxy": "upstream_tls", "dbproxy": "tls"}
    for tier, key in keys.items():
        spec, c, sec = tiers[tier]
        ident = sec.get(key)
        if not isinstance(ident, dict):
            problems.append(f"{tier}.{key} is not set: that hop is plain TCP")
            continue
        for part in ("cert", "key", "ca"):
            path = ident.get(part)
            if not path:
                problems.append(f"{tier}.{key}.{part} is not set")
            elif secret_of(spec, c, path) is None:
                problems.append(f"{tier}.{key}.{part} = {path} is not in a mounted Secret")
    sspec, sc, ssec = tiers["server"]
    dspec, dc, dsec = tiers["dbproxy"]
    if not str(ssec.get("dbproxy_url", "")).startswith("https://"):
        problems.append(f"server.dbproxy_url {ssec.get('dbproxy_url')} is not https://")
    token = ssec.get("dbproxy_token_file")
    accepted = dsec.get("api_tokens_file")
    if ssec.get("dbproxy_token"):
        problems.append("server.dbproxy_token is written in the config: use dbproxy_token_file from a Secret")
    if dsec.get("api_tokens"):
        problems.append("dbproxy.api_tokens are written in the config: use api_tokens_file from a Secret")
    token_secret = token and secret_of(sspec, sc, token)
    accepted_secret = accepted and secret_of(dspec, dc, accepted)
    if not token_secret:
        problems.append(f"server.dbproxy_token_file {token!r} is not a file in a mounted Secret")
    if not accepted_secret:
        problems.append(f"dbproxy.api_tokens_file {accepted!r} is not a file in a mounted Secret")
    if token_secret and accepted_secret and token_secret != accepted_secret:
        problems.append(f"the servers' token (Secret {token_secret}) and the dbproxies' accepted "
                        f"tokens (Secret {accepted_secret}) come from different Secrets")
    return problems


def check_tls(rendered):
    for name, docs in rendered.items():
        if name not in TLS_REQUIRED:
            continue
        objs = index(docs)
        tiers = {}
        for d, spec, c in chat_workloads(docs):
            tier = c["args"][0]
            sec = tomllib.loads(config_of(objs, spec, c)).get(tier, {})
            tiers[tier] = (spec, c, effective(tier, sec, container_env(c)))
        if set(tiers) != set(ADMIN_KEY):
            fail(f"{name}: expected workloads for {sorted(ADMIN_KEY)} to check TLS of")
            continue
        problems = tls_problems(tiers)
        for p in problems:
            fail(f"{name}: internal hops: {p}")
        # The check must refuse each way a hop can fall back to plain text.
        def without(tier, key):
            spec, c, sec = tiers[tier]
            return {**tiers, tier: (spec, c, {k: v for k, v in sec.items() if k != key})}
        sspec, sc, ssec = tiers["server"]
        mutants = {
            "server without tls": without("server", "tls"),
            "proxy without upstream_tls": without("proxy", "upstream_tls"),
            "dbproxy without tls": without("dbproxy", "tls"),
            "plain dbproxy_url": {**tiers, "server": (sspec, sc, {**ssec, "dbproxy_url": "http://chat-dbproxy:7100"})},
            "no server token": without("server", "dbproxy_token_file"),
            "no accepted tokens": without("dbproxy", "api_tokens_file"),
            "key outside a Secret": {**tiers, "server": (
                sspec, sc, {**ssec, "tls": {**ssec.get("tls", {}), "key": "/tmp/tls.key"}})},
        }
        for what, m in mutants.items():
            if not tls_problems(m):
                fail(f"{name}: the TLS check passes a mutant it must refuse: {what}")
        if not problems:
            print(f"ok: internal hops are mutual TLS with a bearer token: {name} ({len(mutants)} mutants refused)")


def container_env(container):
    """The container's environment as the pod would see it: literal values
    with $(VAR) references expanded, placeholders for the downward API and
    Secrets (their real values exist only in the cluster)."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = "10.0.0.1"
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = "placeholder-secret-from-check-deploy"
    return env


def named_port(container, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p["name"] == port:
            return p["containerPort"]
    return None


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_consistency(rendered):
    for name, docs in rendered.items():
        objs = index(docs)
        tiers = {}
        for d, spec, c in chat_workloads(docs):
            wname = f"{name}: {d['kind']}/{d['metadata']['name']}"
            tier = c["args"][0]
            toml = tomllib.loads(config_of(objs, spec, c))
            sec = toml.get(tier, {})
            tiers[tier] = (d, spec, c, sec)
            admin = sec.get(ADMIN_KEY[tier])
            listen = sec.get("listen")
            if admin is None or listen is None:
                fail(f"{wname}: [{tier}] must set listen and {ADMIN_KEY[tier]} explicitly")
                continue
            for key in {"listen", ADMIN_KEY[tier]}:
                if host_of(sec[key]) != "0.0.0.0":
                    fail(f"{wname}: {tier}.{key} = {sec[key]}: must bind 0.0.0.0 in a pod")
            declared = {p["containerPort"] for p in c.get("ports", [])}
            for key in {"listen", ADMIN_KEY[tier]}:
                if port_of(sec[key]) not in declared:
                    fail(f"{wname}: {tier}.{key} port {port_of(sec[key])} is not a containerPort {sorted(declared)}")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                p = c.get(probe, {}).get("httpGet")
                if not p:
                    fail(f"{wname}: no {probe} httpGet")
                    continue
                if p.get("path") != path:
                    fail(f"{wname}: {probe} path {p.get('path')}, the binary serves {path}")
                if named_port(c, p.get("port")) != port_of(admin):
                    fail(f"{wname}: {probe} port {p.get('port')} is not {tier}.{ADMIN_KEY[tier]} ({port_of(admin)})")
            ann = d["spec"]["template"]["metadata"].get("annotations", {})
            if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/path") != "/metrics" \
                    or ann.get("prometheus.io/port") != str(port_of(admin)):
                fail(f"{wname}: prometheus.io annotations {ann} do not match /metrics on {port_of(admin)}")
            grace = sec.get("shutdown_grace_secs", 10)
            tgp = spec.get("terminationGracePeriodSeconds", 30)
            if not tgp >= grace + 5:
                fail(f"{wname}: terminationGracePeriodSeconds {tgp} leaves < 5 s beyond shutdown_grace_secs {grace}")
            psc = spec.get("securityContext", {})
            csc = c.get("securityContext", {})
            if not (psc.get("runAsNonRoot") and csc.get("readOnlyRootFilesystem")
                    and csc.get("allowPrivilegeEscalation") is False
                    and csc.get("capabilities", {}).get("drop") == ["ALL"]):
                fail(f"{wname}: securityContext must be non-root, read-only root fs, no escalation, drop ALL")
            res = c.get("resources", {})
            if not (res.get("requests") and res.get("limits")):
                fail(f"{wname}: resources need requests and limits")
        if set(tiers) != set(ADMIN_KEY):
            fail(f"{name}: expected workloads for {sorted(ADMIN_KEY)}, found {sorted(tiers)}")
            continue
        services = [d for d in docs if d["kind"] == "Service"]
        # Every Service's targetPort names a port of the pods it selects.
        for s in services:
            pods = [t for t in tiers.values()
                    if selects(s["spec"].get("selector", {}), t[0]["spec"]["template"]["metadata"]["labels"])]
            for t in pods:
                for sp in s["spec"]["ports"]:
                    if named_port(t[2], sp.get("targetPort", sp["port"])) is None:
                        fail(f"{name}: Service/{s['metadata']['name']} targetPort {sp.get('targetPort')} not on the pod")
        # proxy.dns_name is the server StatefulSet's headless Service.
        _, _, _, psec = tiers["proxy"]
        sd, _, sc, ssec = tiers["server"]
        ns = sd["metadata"].get("namespace", "default")
        headless = sd["spec"]["serviceName"]
        hs = index(docs).get(("Service", headless))
        if hs is None or hs["spec"].get("clusterIP") != "None":
            fail(f"{name}: StatefulSet chat-server serviceName {headless} is not a headless Service")
        if psec.get("dns_name") != f"{headless}.{ns}.svc.cluster.local":
            fail(f"{name}: proxy.dns_name {psec.get('dns_name')} != {headless}.{ns}.svc.cluster.local")
        if psec.get("dns_port", 7000) != port_of(ssec["listen"]) or \
                psec.get("dns_admin_port", 9101) != port_of(ssec["admin_listen"]):
            fail(f"{name}: proxy dns_port/dns_admin_port do not match the server's listen/admin_listen")
        # The servers find each other through the same headless Service.
        cl = ssec.get("cluster", {})
        if cl.get("dns_name") != f"{headless}.{ns}.svc.cluster.local":
            fail(f"{name}: server.cluster.dns_name {cl.get('dns_name')} != {headless}.{ns}.svc.cluster.local")
        if cl.get("dns_port", 7000) != port_of(ssec["listen"]):
            fail(f"{name}: server.cluster.dns_port does not match server.listen")
        senv = container_env(sc)
        adv = senv.get("CHAT_SERVER__CLUSTER__ADVERTISE", "")
        if not adv.endswith(f":{port_of(ssec['listen'])}"):
            fail(f"{name}: CHAT_SERVER__CLUSTER__ADVERTISE {adv!r} is not the pod IP at the client port")
        # server.dbproxy_url reaches the dbproxy Service.
        dd, _, _, dsec = tiers["dbproxy"]
        url = effective("server", ssec, senv).get("dbproxy_url", "")
        m = re.fullmatch(r"https?://([^:/]+)(?::(\d+))?/?", url)
        dsvc = [s for s in services if selects(s["spec"].get("selector", {}), dd["spec"]["template"]["metadata"]["labels"])]
        ok = m and any(m.group(1) in (s["metadata"]["name"], f"{s['metadata']['name']}.{ns}.svc.cluster.local")
                       and int(m.group(2) or (443 if url.startswith("https") else 80)) in [p["port"] for p in s["spec"]["ports"]] for s in dsvc)
        if not ok:
            fail(f"{name}: server.dbproxy_url {url} is not a dbproxy Service")
        # The password file lives in the mounted Secret.
        pw = dsec.get("mysql", {}).get("password_file", "")
        if dsec.get("backend") == "mysql" and pw:
            dspec = dd["spec"]["template"]["spec"]
            dc = dspec["containers"][0]
            if secret_of(dspec, dc, pw) is None:
                fail(f"{name}: dbproxy.mysql.password_file {pw} is not in a mounted Secret")
        # ServiceMonitors select a Service that has the endpoint's port.
        for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
            sel = sm["spec"]["selector"]["matchLabels"]
            hits = [s for s in services if selects(sel, s["metadata"].get("labels", {}))]
            for ep in sm["spec"]["endpoints"]:
                if not any(ep["port"] in [p.get("name") for p in s["spec"]["ports"]] for s in hits):
                    fail(f"{name}: ServiceMonitor/{sm['metadata']['name']} port {ep['port']} matches no Service")
                if ep.get("path") != "/metrics":
                    fail(f"{name}: ServiceMonitor/{sm['metadata']['name']} path must be /metrics")
        print(f"ok: ports, probes, annotations, Services, grace periods, security: {name}")


def cap_problems(server_replicas, ssec, dsec):
    """What is wrong with the connection caps of one rendered target."""
    problems = []
    pool = ssec.get("dbproxy_pool_max", SERVER_POOL_MAX)
    most = dsec.get("max_connections", DBPROXY_MAX_CONNECTIONS)
    if server_replicas * pool > most:
        problems.append(f"{server_replicas} chat servers × server.dbproxy_pool_max {pool} = "
                        f"{server_replicas * pool} > dbproxy.max_connections {most}")
    pool_idle = ssec.get("dbproxy_pool_idle_ms", SERVER_POOL_IDLE_MS)
    idle = dsec.get("idle_timeout_ms", DBPROXY_IDLE_TIMEOUT_MS)
    if pool_idle >= idle:
        problems.append(f"server.dbproxy_pool_idle_ms {pool_idle} is not below dbproxy.idle_timeout_ms {idle}: "
                        "the dbproxy would close pooled connections the servers are about to use")
    return problems


def check_caps(rendered):
    for name, docs in rendered.items():
        objs = index(docs)
        secs = {}
        replicas = {}
        for d, spec, c in chat_workloads(docs):
            tier = c["args"][0]
            secs[tier] = tomllib.loads(config_of(objs, spec, c)).get(tier, {})
            replicas[tier] = d["spec"].get("replicas", 1)
        if "server" not in secs or "dbproxy" not in secs:
            fail(f"{name}: no chat server or dbproxy workload to check the caps of")
            continue
        ssec, dsec, n = secs["server"], secs["dbproxy"], replicas["server"]
        problems = cap_problems(n, ssec, dsec)
        for p in problems:
            fail(f"{name}: connection caps: {p}")
        # The check must catch what it is for: one server more than fits,
        # and a pool that outlives the dbproxy's idle timeout.
        pool = ssec.get("dbproxy_pool_max", SERVER_POOL_MAX)
        most = dsec.get("max_connections", DBPROXY_MAX_CONNECTIONS)
        mutants = {
            "servers beyond the dbproxy's cap": (most // pool + 1, ssec, dsec),
            "pool larger than the dbproxy's cap": (n, {**ssec, "dbproxy_pool_max": most + 1}, dsec),
            "pool idle timeout past the dbproxy's": (
                n, {**ssec, "dbproxy_pool_idle_ms": dsec.get("idle_timeout_ms", DBPROXY_IDLE_TIMEOUT_MS)}, dsec),
        }
        for what, (mn, ms, md) in mutants.items():
            if not cap_problems(mn, ms, md):
                fail(f"{name}: the caps check passes a mutant it must refuse: {what}")
        if not problems:
            print(f"ok: connection caps agree: {name} ({n} servers × {pool} ≤ {most}; "
                  f"{len(mutants)} mutants refused)")


def check_rules(promtool, out, rendered):
    rules_file = DEPLOY / "prometheus/rules.yml"
    plain = yaml.safe_load(rules_file.read_text())
    prs = [d for d in rendered.get("production", []) if d["kind"] == "PrometheusRule"]
    if len(prs) != 1:
        fail(f"production: expected one PrometheusRule, found {len(prs)}")
        return
    if prs[0]["spec"] != plain:
        fail("PrometheusRule spec differs from deploy/prometheus/rules.yml")
    extracted = out / "prometheusrule-spec.yml"
    extracted.write_text(yaml.safe_dump(prs[0]["spec"], sort_keys=False))
    for f in (rules_file, extracted):
        r = run([promtool, "check", "rules", str(f)])
        if r.returncode != 0:
            fail(f"promtool check rules {f}:\n{r.stdout}{r.stderr}")
        else:
            print(f"ok: promtool check rules {f}")


METRIC = re.compile(r"(?<![A-Za-z0-9_:.])chat_[a-z0-9_]+(?![A-Za-z0-9_:])")


def base_name(n):
    return re.sub(r"_(bucket|sum|count)$", "", n)


def check_metric_names():
    registered = set()
    for src in ROOT.glob("*/src/**/*.rs"):
        registered |= set(re.findall(r'"(chat_[a-z0-9_]+)"', src.read_text()))
    dash = json.loads((DEPLOY / "grafana/chat.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {n for e in exprs for n in METRIC.findall(e)}
    missing = sorted(n for n in used if n not in registered and base_name(n) not in registered)
    if missing:
        fail(f"metrics used by rules/dashboard but registered nowhere in */src: {missing}")
    else:
        print(f"ok: {len(used)} metric names of rules + dashboard are registered in the source")


# Who may open a connection to each named container port (docs/SECURITY.md).
# Sources: the chat tiers, another pod of the namespace, Prometheus in its own
# namespace, and a client outside the cluster.
SOURCES = {
    "proxy": ("chat", {"app.kubernetes.io/name": "chat", "app.kubernetes.io/component": "proxy"}),
    "server": ("chat", {"app.kubernetes.io/name": "chat", "app.kubernetes.io/component": "server"}),
    "dbproxy": ("chat", {"app.kubernetes.io/name": "chat", "app.kubernetes.io/component": "dbproxy"}),
    "mariadb": ("chat", {"app.kubernetes.io/name": "mariadb", "app.kubernetes.io/component": "replica"}),
    "other-pod": ("chat", {"app.kubernetes.io/name": "something-else"}),
    "prometheus": ("monitoring", {"app.kubernetes.io/name": "prometheus"}),
    "external": None,
}
REACH = {
    ("proxy", "client"): {"proxy", "server", "dbproxy", "mariadb", "other-pod", "prometheus", "external"},
    ("proxy", "admin"): {"prometheus"},
    ("server", "client"): {"proxy", "server"},
    ("server", "admin"): {"proxy", "prometheus"},
    ("dbproxy", "api"): {"server"},
    ("dbproxy", "admin"): {"prometheus"},
    # The kind overlay's MariaDB (production uses a managed database).
    ("mariadb", "mysql"): {"dbproxy", "mariadb"},
}


def peer_matches(peer, policy_ns, source):
    if source is None:
        return False  # ipBlock peers are not used for in-cluster sources here
    src_ns, src_labels = source
    if "ipBlock" in peer:
        return False
    ns_sel = peer.get("namespaceSelector")
    pod_sel = peer.get("podSelector")
    if ns_sel is None and src_ns != policy_ns:
        return False
    if ns_sel is not None and not selects(ns_sel.get("matchLabels", {}),
                                          {"kubernetes.io/metadata.name": src_ns}):
        return False
    return pod_sel is None or selects(pod_sel.get("matchLabels", {}), src_labels)


def port_matches(rule_ports, container, port_name):
    if not rule_ports:
        return True
    number = named_port(container, port_name)
    return any(p.get("port") in (port_name, number) for p in rule_ports)


def allowed(policies, ns, labels, container, port_name, source):
    """NetworkPolicy semantics for ingress: a pod no policy selects takes
    everything; a selected pod takes what some rule of a selecting policy allows."""
    selecting = [p for p in policies
                 if p["metadata"].get("namespace", "default") == ns
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get("ingress", []):
            peers = rule.get("from")
            if peers and not any(peer_matches(peer, ns, source) for peer in peers):
                continue
            if port_matches(rule.get("ports"), container, port_name):
                return True
    return False


def check_network_policies(rendered):
    for name, docs in rendered.items():
        policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        ok = True
        workloads = [(d, spec, c, c["args"][0]) for d, spec, c in chat_workloads(docs)]
        workloads += [(d, d["spec"]["template"]["spec"], d["spec"]["template"]["spec"]["containers"][0], "mariadb")
                      for d in docs if d["kind"] == "StatefulSet"
                      and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "mariadb"]
        for d, spec, c, tier in workloads:
            ns = d["metadata"].get("namespace", "default")
            labels = d["spec"]["template"]["metadata"]["labels"]
            ports = [p["name"] for p in c.get("ports", [])]
            for port in ports:
                want = REACH.get((tier, port))
                if want is None:
                    fail(f"{name}: {tier} port {port} has no intended reachability in REACH")
                    ok = False
                    continue
                got = {s for s, src in SOURCES.items() if allowed(policies, ns, labels, c, port, src)}
                if got != want:
                    fail(f"{name}: {tier}:{port} reachable from {sorted(got)}, intended {sorted(want)}")
                    ok = False
            for (t, port) in REACH:
                if t == tier and port not in ports:
                    fail(f"{name}: {tier} has no container port named {port}")
                    ok = False
        if ok:
            print(f"ok: NetworkPolicies give every tier port exactly its intended sources: {name}")


def main():
    kubectl, kv, promtool, chat, out = sys.argv[1:6]
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rendered = render(kubectl, out)
    validate_schemas(kv, out, rendered)
    check_configs(chat, out, rendered)
    check_consistency(rendered)
    check_rules(promtool, out, rendered)
    check_metric_names()
    check_network_policies(rendered)
    check_caps(rendered)
    check_tls(rendered)
    if failures:
        print(f"\ncheck-deploy: {len(failures)} check(s) failed")
        sys.exit(1)
    print("\ncheck-deploy: all deploy checks passed")


if __name__ == "__main__":
    main()
