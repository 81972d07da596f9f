#!/usr/bin/env bash
# Local Kubernetes run of the whole system: creates the kind cluster (if
# missing), builds the image, loads it into kind, applies the kind overlay,
# waits for every tier and runs a smoke test through the proxy's NodePort
# (host 127.0.0.1:7001): two clients log in, join a room, one sends, the other
# receives.
#
# Needs: docker (with BuildKit), kind, kubectl, bash with /dev/tcp.
# Usage: deploy/kind/up.sh            (from anywhere; idempotent)
#        KEEP_CLUSTER=0 deploy/kind/up.sh   deletes the cluster afterwards
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-chat}
IMAGE=chat:dev
NS=chat
PROXY=${PROXY:-127.0.0.1:7001}

step() { printf '\n==> %s\n' "$*"; }
for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null || { echo "up.sh: $tool not found" >&2; exit 1; }
done

if ! kind get clusters | grep -qx "$CLUSTER"; then
    step "creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --config deploy/kind/cluster.yaml
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

step "building $IMAGE"
DOCKER_BUILDKIT=1 docker build -f deploy/Dockerfile -t "$IMAGE" .

step "loading $IMAGE into kind"
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "TLS certificates for the internal hops"
kubectl apply -f deploy/k8s/base/namespace.yaml
# Made once per cluster by the image's own `chat certs` (a throwaway CA whose
# key is not kept); delete the three Secrets to make a new set.
if ! kubectl -n "$NS" get secret chat-tls-server chat-tls-proxy chat-tls-dbproxy >/dev/null 2>&1; then
    certs=$(mktemp -d)
    trap 'rm -rf "$certs"' EXIT
    docker run --rm --user "$(id -u):$(id -g)" -v "$certs:/certs" "$IMAGE" certs --out /certs
    for tier in server proxy dbproxy; do
        kubectl -n "$NS" create secret generic "chat-tls-$tier" \
            --from-file=tls.crt="$certs/$tier.pem" \
            --from-file=tls.key="$certs/$tier.key" \
            --from-file=ca.crt="$certs/ca.pem" \
            --dry-run=client -o yaml | kubectl apply -f -
    done
fi

step "applying deploy/k8s/overlays/kind"
kubectl apply -k deploy/k8s/overlays/kind
# A rebuilt image has the same tag: restart the tiers so they run it.
kubectl -n "$NS" rollout restart deployment/chat-dbproxy deployment/chat-proxy statefulset/chat-server

step "waiting for MariaDB, then every tier"
kubectl -n "$NS" rollout status statefulset/mariadb-primary --timeout=300s
kubectl -n "$NS" rollout status statefulset/mariadb-replica --timeout=300s
kubectl -n "$NS" rollout status deployment/chat-dbproxy --timeout=300s
kubectl -n "$NS" rollout status statefulset/chat-server --timeout=300s
kubectl -n "$NS" rollout status deployment/chat-proxy --timeout=300s

step "smoke test through the proxy at $PROXY"
host=${PROXY%:*}
port=${PROXY##*:}
# Reads lines from fd $1 until one starts with $2 (10 s per line).
expect() {
    local fd=$1 prefix=$2 line
    while IFS= read -r -t 10 -u "$fd" line; do
        line=${line%$'\r'}
        echo "  < $line"
        [[ $line == "$prefix"* ]] && return 0
    done
    echo "up.sh: smoke test: no line starting with '$prefix'" >&2
    return 1
}
run_id=$RANDOM
exec 3<>"/dev/tcp/$host/$port"
exec 4<>"/dev/tcp/$host/$port"
printf 'LOGIN smoke-a-%s pw\r\n' "$run_id" >&3; expect 3 "OK LOGIN"
printf 'LOGIN smoke-b-%s pw\r\n' "$run_id" >&4; expect 4 "OK LOGIN"
printf 'JOIN smoke\r\n' >&3; expect 3 "OK JOIN"
printf 'JOIN smoke\r\n' >&4; expect 4 "OK JOIN"
printf 'MSG smoke hello from kind %s\r\n' "$run_id" >&3; expect 3 "OK MSG"
expect 4 "MSG smoke"
printf 'QUIT\r\n' >&3; printf 'QUIT\r\n' >&4
exec 3>&- 4>&-
echo "smoke test passed: a message went client -> proxy -> server -> dbproxy -> MariaDB and back"

if [ "${KEEP_CLUSTER:-1}" = 0 ]; then
    kind delete cluster --name "$CLUSTER"
fi
