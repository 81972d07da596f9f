#!/usr/bin/env python3
"""Writes docs/BENCHMARKS.md from the JSON reports of one scripts/bench run.

usage: bench-report.py RESULTS_DIR REPORT_FILE FD_LIMIT ROUNDS MARIADB_SETTINGS
       bench-report.py --tls RESULTS_DIR   (prints the TLS comparison only)

The hand-written analysis below the marker line of an existing report is kept.
"""
import json
import os
import statistics
import subprocess
import sys

TLS_ONLY = sys.argv[1] == "--tls"
if TLS_ONLY:
    results = sys.argv[2]
else:
    results, out, fd_limit, rounds, mariadb = sys.argv[1:6]
    rounds = int(rounds)


def load(name):
    with open(os.path.join(results, name + ".json")) as f:
        return json.load(f)


def sh(cmd):
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()


def num(v, d=0):
    return "-" if v is None else f"{v:,.{d}f}"


def ok(b):
    return "met" if b else "**not met**"


runs = {}
for f in sorted(os.listdir(results)):
    if f.endswith(".json"):
        runs[f[:-5]] = load(f[:-5])


def tls_section():
    """Plain vs mutual-TLS internal hops, from part 5 of scripts/bench."""
    def idle_bytes(r):
        # --server-pids order: srv0 srv1 px0 db
        g = [a - b for a, b in zip(r["rss_after_kib"], r["rss_before_kib"])]
        n = max(r["connected"], 1)
        return [sum(g[0:2]) * 1024 / n, g[2] * 1024 / n]

    p, t = runs["tls-plain-idle"], runs["tls-tls-idle"]
    (ps, pp), (ts, tp) = idle_bytes(p), idle_bytes(t)
    rows = [
        ("idle memory per connection, chat servers (B)", ps, ts, 0),
        ("idle memory per connection, proxy (B)", pp, tp, 0),
        ("idle memory per connection, proxy + servers (B)", ps + pp, ts + tp, 0),
        ("fan-out deliveries/s", runs["tls-plain-fanout"]["delivered_per_sec"],
         runs["tls-tls-fanout"]["delivered_per_sec"], 0),
        ("fan-out deliver p99 ms", runs["tls-plain-fanout"]["deliver_latency"]["p99_ms"],
         runs["tls-tls-fanout"]["deliver_latency"]["p99_ms"], 2),
        ("durable acked msgs/s", runs["tls-plain-durable"]["acked_per_sec"],
         runs["tls-tls-durable"]["acked_per_sec"], 0),
        ("durable ack p99 ms", runs["tls-plain-durable"]["ack_latency"]["p99_ms"],
         runs["tls-tls-durable"]["ack_latency"]["p99_ms"], 2),
    ]
    out = [
        "## Mutual TLS on the internal hops",
        "",
        f"One proxy, 2 chat servers in one cluster, the dbproxy on SQLite, run twice back to back:",
        "plain TCP, then every internal hop (proxy → server, server ↔ server, server → dbproxy)",
        f"mutual TLS with a bearer token. Idle: {num(p['connected'])} connections measured on top of",
        "as many already open; fan-out and durable as above.",
        "",
        "| | plain | TLS | TLS / plain |",
        "| --- | --- | --- | --- |",
    ]
    for name, a, b, d in rows:
        out.append(f"| {name} | {num(a, d)} | {num(b, d)} | {b / a if a else 0:.2f} |")
    return out + [""]


if TLS_ONLY:
    print("\n".join(tls_section()))
    sys.exit(0)

# ---- idle: growth per tier ---------------------------------------------------
idle = runs["idle"]
conns = max(idle["connected"], 1)
growth = [a - b for a, b in zip(idle["rss_after_kib"], idle["rss_before_kib"])]
# --server-pids order in scripts/bench: srv0 srv1 px0 px1 px2 db
per = lambda kib: kib * 1024 / conns
server_b = per(sum(growth[0:2]))
proxy_b = per(sum(growth[2:5]))
db_b = per(growth[5])
idle_total = server_b + proxy_b

# ---- fanout rounds -------------------------------------------------------------
def med(prefix, key="delivered_per_sec"):
    vals = [runs[f"{prefix}-{r}"][key] for r in range(1, rounds + 1)]
    return statistics.median(vals), vals


ours, ours_all = med("fanout")
insp, insp_all = med("inspircd")
ngirc, ngirc_all = med("ngircd")
ratio = ours / max(insp, 1e-9)
ratio_ng = ours / max(ngirc, 1e-9)

durable_my = runs["durable-mariadb"]["acked_per_sec"]
ack_sqlite = runs["ack5k"]
ack_my = runs["ack5k-mariadb"]


def p99(r):
    return r["ack_latency"]["p99_ms"]


targets = [
    ("memory per idle connection, proxy + chat server (warm)", "≤ 8 KiB (8,192 B)",
     f"{num(idle_total)} B (proxy {num(proxy_b)} + server {num(server_b)}; dbproxy another {num(db_b)})",
     ok(idle_total <= 8192)),
    ("fanout deliveries/s vs inspircd", "≥ 1.5×",
     f"{num(ours)} vs {num(insp)} = {ratio:.2f}× ({f'medians of {rounds} rounds' if rounds != 1 else 'one round'})", ok(ratio >= 1.5)),
    ("durable acked msgs/s through dbproxy to MariaDB", "≥ 20,000", num(durable_my),
     ok(durable_my >= 20000)),
    (f"ack p99 at {num(ack_my['acked_per_sec'])} msgs/s, MariaDB", "≤ 20 ms at 5k/s",
     f"{num(p99(ack_my), 2)} ms", ok((p99(ack_my) or 1e9) <= 20)),
    (f"ack p99 at {num(ack_sqlite['acked_per_sec'])} msgs/s, SQLite", "≤ 20 ms at 5k/s",
     f"{num(p99(ack_sqlite), 2)} ms", ok((p99(ack_sqlite) or 1e9) <= 20)),
]

# Which processes each run's CPU figures belong to (--server-pids order).
CPU_NAMES = {
    "idle": ["srv0", "srv1", "px0", "px1", "px2", "db"],
    "fanout-direct": ["server", "dbproxy"],
    "durable-mariadb": ["server", "proxy", "dbproxy", "mariadbd"],
    "ack5k-mariadb": ["server", "proxy", "dbproxy", "mariadbd"],
}


def cpu(name, r):
    if name.startswith(("inspircd", "ngircd")):
        names = [name.split("-")[0]]
    else:
        names = CPU_NAMES.get(name, ["server", "proxy", "dbproxy"])
    parts = [f"{n} {c:.0f}" for n, c in zip(names, r.get("cpu_percent", []))]
    if r.get("bench_cpu_percent") is not None:
        parts.append(f"bench {r['bench_cpu_percent']:.0f}")
    return ", ".join(parts) or "-"


sweep = sorted((n for n in runs if n.startswith("ack-")), key=lambda n: int(n[4:]))


def busy(r):
    """CPU of every listed process plus the bench, in % of one core."""
    total = sum(r.get("cpu_percent", [])) + (r.get("bench_cpu_percent") or 0)
    return f"{total:.0f}% of {int(sh('nproc') or 1) * 100}%"


cpu_model = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")
mem_total = sh("free -h | awk '/^Mem/ {print $2}'")
swap_total = sh("free -h | awk '/^Swap/ {print $2}'")
fan = runs["fanout-1"]
lines = [
    "# Benchmarks",
    "",
    "Generated by `scripts/bench` from one run on the machine below; rerun it to refresh.",
    "The analysis at the end is written by hand and kept by reruns.",
    "",
    "## Machine",
    "",
    f"- CPU: {cpu_model}, `nproc` = {sh('nproc')}; kernel {sh('uname -r')}",
    f"- Memory: {mem_total}, swap: {swap_total}",
    f"- fd limit per process: {fd_limit}",
    f"- MariaDB: {mariadb}",
    "",
    "Everything runs on this one machine over loopback, and the load generator shares",
    "the two cores with what it measures.",
    "",
    "## Targets",
    "",
    "| target | goal | measured | |",
    "| --- | --- | --- | --- |",
]
lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets]
lines += [
    "",
    "## Fanout, side by side",
    "",
    f"Same workload for each ({fan['clients'] // max(fan.get('room_size', 1), 1)} rooms of "
    f"{fan.get('room_size', '?')} members, {fan['clients']} connections; every member of a room receives",
    "every message; two senders per room with the same in-flight window; for IRC a `PING` after each half",
    "window stands in for acks). Ours goes through the proxy, and every message is",
    "committed to SQLite before it is fanned out; the IRC daemons store nothing.",
    "",
    "| round | ours (deliveries/s) | inspircd | ngircd |",
    "| --- | --- | --- | --- |",
]
for r in range(rounds):
    lines.append(f"| {r + 1} | {num(ours_all[r])} | {num(insp_all[r])} | {num(ngirc_all[r])} |")
lines += [
    f"| **median** | **{num(ours)}** | **{num(insp)}** | **{num(ngirc)}** |",
    "",
    f"Ours vs inspircd {ratio:.2f}×, vs ngircd {ratio_ng:.2f}×. Straight to the chat server",
    f"(no proxy): {num(runs['fanout-direct']['delivered_per_sec'])} deliveries/s.",
    "",
    "## Ack latency by rate",
    "",
    "The durable workload paced at several rates (SQLite; the last row on MariaDB):",
    "",
    "| msgs/s | ack p50 ms | ack p99 ms | CPU of the stack and the bench |",
    "| --- | --- | --- | --- |",
] + [
    f"| {num(runs[n]['acked_per_sec'])} | {num(runs[n]['ack_latency']['p50_ms'], 2)} | "
    f"{num(runs[n]['ack_latency']['p99_ms'], 2)} | {busy(runs[n])} |"
    for n in sweep + ["ack5k", "ack5k-mariadb"]
] + [
    "",
    "## Idle memory per connection",
    "",
    f"{num(idle['connected'])} connections measured on top of as many already open,",
    "through 3 proxies to 2 chat servers (growth of VmRSS, all processes of a tier together):",
    "",
    "| tier | bytes per connection |",
    "| --- | --- |",
    f"| proxy | {num(proxy_b)} |",
    f"| chat server | {num(server_b)} |",
    f"| **proxy + chat server** | **{num(idle_total)}** |",
    f"| dbproxy | {num(db_b)} |",
    "",
] + (tls_section() if "tls-tls-idle" in runs else []) + [
    "## All runs",
    "",
    "CPU is % of one core while the senders ran, per process.",
    "",
    "| run | conns | connects/s | acked/s | delivered/s | deliver p50/p99/p999 ms | ack p50/p99 ms | errors | closed | CPU % |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]
order = ["idle"] + [f"{p}-{r}" for r in range(1, rounds + 1) for p in ("fanout", "inspircd", "ngircd")] + [
    "fanout-direct", "durable"] + sweep + ["ack5k", "dm", "durable-mariadb", "ack5k-mariadb"] + [
    f"tls-{h}-{k}" for h in ("plain", "tls") for k in ("idle", "fanout", "durable") if f"tls-{h}-{k}" in runs]
for n in order:
    x = runs[n]
    d, a = x["deliver_latency"], x["ack_latency"]
    lines.append(
        f"| {n} | {x['connected']}/{x['clients']} | {num(x['connects_per_sec'])} | {num(x['acked_per_sec'])} | "
        f"{num(x['delivered_per_sec'])} | {num(d['p50_ms'], 2)} / {num(d['p99_ms'], 2)} / {num(d['p999_ms'], 2)} | "
        f"{num(a['p50_ms'], 2)} / {num(a['p99_ms'], 2)} | {x['errors']} | {x['closed_by_server']} | {cpu(n, x)} |")
with open(os.path.join(results, "commands")) as f:
    commands = f.read().strip()
lines += [
    "",
    "For IRC, \"acked\" counts messages answered by a `PING`/`PONG` round trip.",
    "",
    "## Commands",
    "",
    "`scripts/bench` ran these (`--server-pids` name the processes whose memory and CPU are read):",
    "",
    "```",
    commands,
    "```",
    "",
]
MARK = "<!-- analysis: kept by scripts/bench -->"
old = open(out).read() if os.path.exists(out) else ""
tail = old[old.index(MARK):] if MARK in old else MARK + "\n\n## Analysis\n\n(not written yet)\n"
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n" + tail)
print("\n".join(lines[lines.index("## Targets"):lines.index("## All runs")]))
