#!/usr/bin/env bash
# Issues the tokens of fleet-ipc on Kubernetes. Each token is a random secret whose
# SHA-256, with the token's grants, is an entry of the control plane's tokens file:
# Secret fleet-ipc/ipc-server-tokens, key tokens.toml, mounted by the ipc-server
# pods, which re-read it when it changes (--tokens-watch; the kubelet takes up to
# a minute or two to update a mounted Secret).
#
#   issue-token.sh NAMESPACE APP [APP ...]
#       The token of the sidecars of NAMESPACE, entry "ns-NAMESPACE": the secret goes
#       into Secret NAMESPACE/fleet-ipc-token (key "token"), which the injector
#       mounts into every sidecar of the namespace. Grants: subscribe, broadcast and
#       send on APP:> for each APP, nothing else (no Members, locks or limits).
#   issue-token.sh --operator NAME APP [APP ...]
#       A token for a person or a CI job, entry NAME: the secret is printed once on
#       stdout and stored nowhere. Grants: as a namespace's, and Members.
#   issue-token.sh --revoke NAME
#       Removes the entry NAME ("ns-NAMESPACE" for a namespace's token): the streams
#       opened with it end once the server has re-read the file.
#
# Issuing a name again replaces its entry with a new secret (rotation; see
# deploy/README.md for the reconnect window). To grant more (lock, limit,
# members), edit the entry in the Secret (docs/security.md, "Tokens").
#
# With OUT_DIR=DIR it touches no cluster: the tokens file is DIR/tokens.toml (read
# if it exists, then rewritten) and a namespace's secret DIR/NAMESPACE.token.
#
# Environment: CONTROL_NAMESPACE (fleet-ipc), TOKENS_SECRET (ipc-server-tokens),
# TOKEN_SECRET (fleet-ipc-token), KUBECTL (kubectl), OUT_DIR (unset).
set -euo pipefail

CONTROL_NAMESPACE=${CONTROL_NAMESPACE:-fleet-ipc}
TOKENS_SECRET=${TOKENS_SECRET:-ipc-server-tokens}
TOKEN_SECRET=${TOKEN_SECRET:-fleet-ipc-token}
KUBECTL=${KUBECTL:-kubectl}

usage() {
  sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2
  exit 2
}
fail() {
  echo "issue-token.sh: $*" >&2
  exit 1
}

mode=namespace
case "${1:-}" in
  --operator) mode=operator; shift ;;
  --revoke) mode=revoke; shift ;;
  -h | --help | "") usage ;;
esac
[[ $# -ge 1 ]] || usage
subject=$1
shift
case $mode in
  namespace)
    # A DNS label, as Kubernetes requires of namespace names.
    [[ $subject =~ ^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$ ]] || fail "$subject is not a namespace name"
    name="ns-$subject"
    ;;
  *)
    [[ $subject =~ ^[A-Za-z0-9_./-]{1,64}$ ]] || fail "token name $subject: use at most 64 letters, digits and _ . - /"
    name=$subject
    ;;
esac
if [[ $mode == revoke ]]; then
  [[ $# -eq 0 ]] || usage
else
  [[ $# -ge 1 ]] || fail "name at least one app: its channels (APP:>) are what the token may use"
  for app in "$@"; do
    [[ $app =~ ^[A-Za-z0-9_./-]{1,64}$ ]] || fail "app $app: use at most 64 letters, digits and _ . - /"
  done
fi
command -v openssl >/dev/null || fail "openssl is required"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The tokens file as it is now (empty if there is none yet).
if [[ -n "${OUT_DIR:-}" ]]; then
  mkdir -p "$OUT_DIR"
  if [[ -f "$OUT_DIR/tokens.toml" ]]; then cp "$OUT_DIR/tokens.toml" "$work/current.toml"; else : >"$work/current.toml"; fi
else
  "$KUBECTL" -n "$CONTROL_NAMESPACE" get secret "$TOKENS_SECRET" --ignore-not-found \
    -o 'jsonpath={.data.tokens\.toml}' >"$work/current.b64"
  base64 -d <"$work/current.b64" >"$work/current.toml"
fi

# Every [[token]] table but the one named $name (a table runs to the next header).
awk -v name="$name" '
  function flush() { if (!drop) printf "%s", block; block = ""; drop = 0 }
  /^[[:space:]]*\[\[token\]\][[:space:]]*(#.*)?$/ { flush(); in_token = 1 }
  {
    block = block $0 "\n"
    if (in_token && $0 ~ /^[[:space:]]*name[[:space:]]*=/) {
      value = $0
      sub(/^[^"]*"/, "", value)
      sub(/".*$/, "", value)
      if (value == name) drop = 1
    }
  }
  END { flush() }
' "$work/current.toml" |
  # without trailing blank lines, so that replacing entries never piles them up
  awk '{ lines[NR] = $0 } NF { last = NR } END { for (i = 1; i <= last; i++) print lines[i] }' \
    >"$work/tokens.toml"
if [[ ! -s "$work/tokens.toml" ]]; then
  cat >"$work/tokens.toml" <<'HEAD'
# The tokens of fleet-ipc (docs/security.md), one [[token]] table each, managed with
# deploy/k8s/issue-token.sh. Secrets are never stored here: only their SHA-256.
HEAD
fi

if [[ $mode == revoke ]]; then
  cmp -s "$work/current.toml" "$work/tokens.toml" && fail "no entry named $name"
else
  secret="ipct_$(openssl rand -hex 32)"
  hash=$(printf '%s' "$secret" | openssl dgst -sha256 -r | cut -d' ' -f1)
  patterns=$(printf '"%s:>", ' "$@")
  patterns="[${patterns%, }]"
  {
    echo
    echo "[[token]]"
    if [[ $mode == namespace ]]; then
      echo "# the sidecars of namespace $subject (issue-token.sh $subject $*)"
    else
      echo "# an operator (issue-token.sh --operator $subject $*)"
    fi
    echo "name = \"$name\""
    echo "app = \"$1\""
    echo "sha256 = \"$hash\""
    echo "subscribe = $patterns"
    echo "broadcast = $patterns"
    echo "send = $patterns"
    if [[ $mode == operator ]]; then echo "members = true"; fi
  } >>"$work/tokens.toml"
fi

if [[ -n "${OUT_DIR:-}" ]]; then
  cp "$work/tokens.toml" "$OUT_DIR/tokens.toml"
  case $mode in
    namespace) printf '%s\n' "$secret" >"$OUT_DIR/$subject.token" ;;
    operator) printf '%s\n' "$secret" ;;
  esac
  echo "wrote $OUT_DIR/tokens.toml ($mode $name)" >&2
  exit 0
fi

# Server-side apply: a client-side apply would copy the Secret's data into its
# last-applied-configuration annotation.
apply_secret() { # NAMESPACE NAME KEY FILE
  "$KUBECTL" -n "$1" create secret generic "$2" --from-file="$3=$4" --dry-run=client -o yaml |
    "$KUBECTL" label --local -f - app.kubernetes.io/part-of=fleet-ipc -o yaml |
    "$KUBECTL" apply --server-side --force-conflicts --field-manager=fleet-ipc-issue-token -f - >/dev/null
}

if [[ $mode == namespace ]]; then
  "$KUBECTL" get namespace "$subject" >/dev/null || fail "namespace $subject does not exist"
  printf '%s' "$secret" >"$work/token"
  # The namespace's Secret first: its pods can start, and their sidecars retry
  # until the server has read the new entry.
  apply_secret "$subject" "$TOKEN_SECRET" token "$work/token"
fi
apply_secret "$CONTROL_NAMESPACE" "$TOKENS_SECRET" tokens.toml "$work/tokens.toml"
case $mode in
  namespace) echo "token $name issued: Secret $subject/$TOKEN_SECRET, entry in $CONTROL_NAMESPACE/$TOKENS_SECRET (grants on $*)" >&2 ;;
  operator)
    echo "token $name issued (grants on $*, members); its secret, shown once:" >&2
    printf '%s\n' "$secret"
    ;;
  revoke) echo "entry $name removed from $CONTROL_NAMESPACE/$TOKENS_SECRET" >&2 ;;
esac
