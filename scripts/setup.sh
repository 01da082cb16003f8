#!/usr/bin/env bash
# Flowscope setup: installs what a fresh Debian machine lacks. Idempotent; each step says what it does.
# Usage: scripts/setup.sh            (needs root for apt, headers link and mounts)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
warn() { printf '\033[33m[setup] WARNING:\033[0m %s\n' "$*" >&2; }

APT_PACKAGES=(
  python3-bpfcc libbpfcc bpftool iproute2 iperf3 curl ca-certificates iputils-ping socat
  python3-venv python3-dev build-essential
  containernetworking-plugins tcpreplay nginx-light
  chromium chromium-driver postgresql
  wrk bind9-dnsutils
  podman runc busybox-static
)

is_root() { [ "$(id -u)" = 0 ]; }

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  local kver; kver=$(uname -r)
  if [ ${#missing[@]} -eq 0 ] && [ -e "/lib/modules/$kver/build/include" ]; then
    say "Debian packages: all present"
    return
  fi
  if ! is_root; then
    warn "not root: cannot install ${missing[*]:-kernel headers}; BPF features will be unavailable"
    return
  fi
  say "apt-get update"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

install_headers() {
  local kver; kver=$(uname -r)
  local mod="/lib/modules/$kver"
  # Debian splits headers into an arch tree (build: Makefile, generated headers) and a -common tree
  # (source: include/uapi/...); bcc needs both reachable from build/.
  if [ -e "$mod/build/Makefile" ] && { [ -e "$mod/build/include/uapi/linux/bpf.h" ] || [ -e "$mod/source/include/uapi/linux/bpf.h" ]; }; then
    say "kernel headers: present at $mod/build"
    return
  fi
  is_root || { warn "not root: cannot provide kernel headers at $mod/build"; return; }
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$kver" >/dev/null 2>&1; then
    say "kernel headers: installed linux-headers-$kver"
    return
  fi
  warn "no linux-headers-$kver package for this kernel; linking Debian's generic linux-headers-amd64 under $mod"
  warn "(only UAPI headers are used by Flowscope's BPF programs, so a version mismatch is harmless)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-headers-amd64 >/dev/null
  local arch_dir common_dir
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  [ -n "$arch_dir" ] || { warn "linux-headers-amd64 installed no /usr/src/linux-headers-*-amd64"; return 1; }
  mkdir -p "$mod"
  ln -sfn "$arch_dir" "$mod/build"
  [ -n "$common_dir" ] && ln -sfn "$common_dir" "$mod/source"
  say "kernel headers: linked $arch_dir -> $mod/build"
}

mount_fs() {
  is_root || return 0
  if ! mountpoint -q /sys/fs/bpf; then mount -t bpf bpf /sys/fs/bpf && say "mounted bpffs at /sys/fs/bpf"; fi
  if [ ! -e /sys/kernel/tracing/events ] && ! mountpoint -q /sys/kernel/tracing; then
    mount -t tracefs none /sys/kernel/tracing && say "mounted tracefs at /sys/kernel/tracing"
  fi
  if [ ! -e /sys/kernel/debug/tracing ] && [ -d /sys/kernel/debug ] && ! mountpoint -q /sys/kernel/debug; then
    mount -t debugfs none /sys/kernel/debug 2>/dev/null && say "mounted debugfs at /sys/kernel/debug" || true
  fi
}

make_venv() {
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(0 if sys.version_info[:2]==(3,11) else 1)' 2>/dev/null; then
    say "creating .venv from /usr/bin/python3 with --system-site-packages (so bcc from Debian is importable)"
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
  fi
  local stamp=.venv/.flowscope-installed
  if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing Flowscope (editable) with dev extras into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
  else
    say "python packages: up to date"
  fi
  .venv/bin/python -c 'import bcc' 2>/dev/null && say "bcc importable from .venv" || warn "bcc is not importable from .venv (BPF features unavailable)"
}

install_web_assets() {
  [ -f web/package.json ] || return 0
  if [ ! -d web/node_modules ] || [ web/package.json -nt web/node_modules ]; then
    command -v npm >/dev/null || { warn "npm missing: dashboard graph library not installed"; return 0; }
    say "installing dashboard JS libraries from the npm registry"
    (cd web && npm install --no-audit --no-fund --silent && touch node_modules)
  fi
}

install_apt
install_headers
mount_fs
make_venv
.venv/bin/python -m api.hubble.pb >/dev/null && say "Hubble API protos compiled (grpcio-tools)" || warn "compiling the Hubble API protos failed"
install_web_assets
say "done"
