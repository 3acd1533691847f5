#!/usr/bin/env bash
# Creates the Secrets the Sentinel overlay mounts, with openssl:
#   redis-tls             CA + certificate of every Redis and Sentinel pod
#                         (*.redis.NAMESPACE.svc, *.redis-sentinel.NAMESPACE.svc and
#                         their .cluster.local forms), for serving and for the
#                         connections between them (server and client use);
#   ipc-server-redis-tls  CA + the control plane's client certificate;
#   redis-auth            `password`: Redis's requirepass/masterauth, read by
#                         ipc-server as --redis-password-file;
#   redis-sentinel-auth   `password`: the Sentinels' own requirepass, read by
#                         ipc-server as --redis-sentinel-password-file.
# Each Secret has the keys cert-manager writes (ca.crt, tls.crt, tls.key), so
# cert-manager Certificates can replace this script (deploy/README.md).
# Run it before or after `kubectl apply -k deploy/k8s/overlays/sentinel` (the pods
# wait for the Secrets). Running it again replaces the certificates and the
# password: restart Redis, Sentinel and ipc-server afterwards.
#
# With OUT_DIR=DIR it only writes DIR/redis-tls/{ca.crt,tls.crt,tls.key},
# DIR/ipc-server-redis-tls/{…}, DIR/redis-auth/password and
# DIR/redis-sentinel-auth/password, touching no cluster.
#
# Environment: NAMESPACE (fleet-ipc), DAYS (825), KUBECTL (kubectl), OUT_DIR (unset).
set -euo pipefail

NAMESPACE=${NAMESPACE:-fleet-ipc}
DAYS=${DAYS:-825}
KUBECTL=${KUBECTL:-kubectl}

command -v openssl >/dev/null || { echo "gen-redis-secrets.sh: openssl is required" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/redis-tls" "$work/ipc-server-redis-tls" "$work/redis-auth" "$work/redis-sentinel-auth"

openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$DAYS" \
  -keyout "$work/ca.key" -out "$work/ca.crt" \
  -subj "/CN=fleet-ipc Redis CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# certificate DIR CN EXTENDED_KEY_USAGE [SUBJECT_ALT_NAME]
certificate() {
  local dir=$1 cn=$2 usage=$3 names=${4:-}
  openssl req -newkey rsa:2048 -nodes -sha256 \
    -keyout "$dir/tls.key" -out "$work/req.csr" -subj "/CN=$cn" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [[ -z "$names" ]] || echo "subjectAltName=$names"
  } >"$work/ext.cnf"
  openssl x509 -req -sha256 -days "$DAYS" -in "$work/req.csr" \
    -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
    -extfile "$work/ext.cnf" -out "$dir/tls.crt" 2>/dev/null
  cp "$work/ca.crt" "$dir/ca.crt"
}

names=""
for service in redis redis-sentinel; do
  for domain in "$NAMESPACE.svc" "$NAMESPACE.svc.cluster.local"; do
    names+="${names:+,}DNS:*.$service.$domain"
  done
done
certificate "$work/redis-tls" "redis.$NAMESPACE.svc" serverAuth,clientAuth "$names"
certificate "$work/ipc-server-redis-tls" ipc-server clientAuth
openssl rand -hex 32 | tr -d '\n' >"$work/redis-auth/password"
openssl rand -hex 32 | tr -d '\n' >"$work/redis-sentinel-auth/password"

if [[ -n "${OUT_DIR:-}" ]]; then
  mkdir -p "$OUT_DIR"
  cp -r "$work/redis-tls" "$work/ipc-server-redis-tls" "$work/redis-auth" "$work/redis-sentinel-auth" "$OUT_DIR/"
  echo "wrote $OUT_DIR/redis-tls, $OUT_DIR/ipc-server-redis-tls, $OUT_DIR/redis-auth, $OUT_DIR/redis-sentinel-auth"
  exit 0
fi

"$KUBECTL" get namespace "$NAMESPACE" >/dev/null 2>&1 || "$KUBECTL" create namespace "$NAMESPACE"
for secret in redis-tls ipc-server-redis-tls; do
  "$KUBECTL" -n "$NAMESPACE" create secret generic "$secret" --type=kubernetes.io/tls \
    --from-file="$work/$secret/ca.crt" --from-file="$work/$secret/tls.crt" \
    --from-file="$work/$secret/tls.key" --dry-run=client -o yaml | "$KUBECTL" apply -f -
done
for secret in redis-auth redis-sentinel-auth; do
  "$KUBECTL" -n "$NAMESPACE" create secret generic "$secret" \
    --from-file="$work/$secret/password" --dry-run=client -o yaml | "$KUBECTL" apply -f -
done
echo "Secrets redis-tls, ipc-server-redis-tls, redis-auth and redis-sentinel-auth created in $NAMESPACE"
