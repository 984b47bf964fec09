#!/usr/bin/env bash
# Installs what metald and its tests need on a fresh Debian machine, and
# nothing that is already there. Safe to rerun; fast when all is present.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v xz >/dev/null || need+=(xz-utils)
command -v curl >/dev/null || need+=(curl)
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
# nft: each VM interface's anti-spoofing rules (nftables' bridge family).
command -v nft >/dev/null || need+=(nftables)
# dnsmasq: the guests' DHCPv4 and IPv6 router advertisements on the bridge.
command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v python3 >/dev/null || need+=(python3)
command -v cc >/dev/null || need+=(gcc)
# libfuzzer-sys (the fuzz targets) compiles libFuzzer's C++.
command -v c++ >/dev/null || need+=(g++)
# buf (the tests call metald with `buf curl`, as users do) comes from npm.
command -v npm >/dev/null || need+=(npm)
# systemd-analyze checks deploy/systemd/metald.service.
command -v systemd-analyze >/dev/null || need+=(systemd)
# The metrics test runs a real Prometheus and checks the alert rules with promtool.
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq
  $sudo_ apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: no Rust toolchain (cargo) found; install Rust 1.88 or newer" >&2
    exit 1
  fi
fi

# cargo-fuzz drives the fuzz targets under fuzz/ (scripts/fuzz.sh; the test
# suite runs them briefly). Pinned so every machine fuzzes the same way.
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
  echo "setup: installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --quiet
fi

# buf, pinned, into the checkout's .metald/tools (not on PATH; the tests
# find it there).
BUF_VERSION=1.75.0
tools="$(cd "$(dirname "$0")/.." && pwd)/.metald/tools"
if [ "$("$tools/node_modules/.bin/buf" --version 2>/dev/null)" != "$BUF_VERSION" ]; then
  echo "setup: installing buf $BUF_VERSION (npm @bufbuild/buf)"
  mkdir -p "$tools"
  npm install --silent --no-audit --no-fund --prefix "$tools" "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi
