#!/usr/bin/env bash
# Creates the sidecar injector's serving certificate and installs it:
#   1. a private CA and a certificate for the ipc-server Service
#      (ipc-server.fleet-ipc.svc and its shorter names), made with openssl;
#   2. the Secret fleet-ipc/ipc-server-webhook-tls (type kubernetes.io/tls) that the
#      ipc-server pods mount (they pick up a replaced Secret without a restart);
#   3. the CA as caBundle of the MutatingWebhookConfiguration, so the API server
#      trusts the webhook.
# Run it after `kubectl apply -k deploy/k8s`; run it again to rotate.
#
# With OUT_DIR=DIR it only writes ca.crt, tls.crt and tls.key into DIR and touches
# no cluster (for GitOps, or to inspect the files).
#
# Environment: NAMESPACE (fleet-ipc), SERVICE (ipc-server), SECRET
# (ipc-server-webhook-tls), WEBHOOK (fleet-ipc-sidecar-injector), DAYS (825),
# KUBECTL (kubectl), OUT_DIR (unset).
set -euo pipefail

NAMESPACE=${NAMESPACE:-fleet-ipc}
SERVICE=${SERVICE:-ipc-server}
SECRET=${SECRET:-ipc-server-webhook-tls}
WEBHOOK=${WEBHOOK:-fleet-ipc-sidecar-injector}
DAYS=${DAYS:-825}
KUBECTL=${KUBECTL:-kubectl}

command -v openssl >/dev/null || { echo "gen-webhook-cert.sh: openssl is required" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
host="$SERVICE.$NAMESPACE.svc"

openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$DAYS" \
  -keyout "$work/ca.key" -out "$work/ca.crt" \
  -subj "/CN=fleet-ipc sidecar injector CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -sha256 \
  -keyout "$work/tls.key" -out "$work/tls.csr" -subj "/CN=$host" 2>/dev/null
cat >"$work/ext.cnf" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:$SERVICE,DNS:$SERVICE.$NAMESPACE,DNS:$host,DNS:$host.cluster.local
EXT
openssl x509 -req -sha256 -days "$DAYS" -in "$work/tls.csr" \
  -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
  -extfile "$work/ext.cnf" -out "$work/tls.crt" 2>/dev/null

if [[ -n "${OUT_DIR:-}" ]]; then
  mkdir -p "$OUT_DIR"
  cp "$work/ca.crt" "$work/tls.crt" "$work/tls.key" "$OUT_DIR/"
  echo "wrote $OUT_DIR/ca.crt, $OUT_DIR/tls.crt, $OUT_DIR/tls.key for $host"
  exit 0
fi

"$KUBECTL" get namespace "$NAMESPACE" >/dev/null 2>&1 || "$KUBECTL" create namespace "$NAMESPACE"
# Server-side apply: a client-side apply would copy the private key into the
# Secret's last-applied-configuration annotation.
"$KUBECTL" -n "$NAMESPACE" create secret tls "$SECRET" \
  --cert="$work/tls.crt" --key="$work/tls.key" --dry-run=client -o yaml |
  "$KUBECTL" apply --server-side --force-conflicts --field-manager=fleet-ipc-gen-webhook-cert -f -

ca_bundle=$(base64 <"$work/ca.crt" | tr -d '\n')
if "$KUBECTL" get mutatingwebhookconfiguration "$WEBHOOK" >/dev/null 2>&1; then
  "$KUBECTL" patch mutatingwebhookconfiguration "$WEBHOOK" --type=json \
    -p "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$ca_bundle\"}]"
else
  echo "MutatingWebhookConfiguration $WEBHOOK not found: run 'kubectl apply -k deploy/k8s', then this script again" >&2
  exit 1
fi
echo "webhook certificate for $host installed (Secret $NAMESPACE/$SECRET, caBundle of $WEBHOOK)"
