#!/usr/bin/env bash
# metald's main job, as the README's first command runs it: installs what is
# missing, builds metald, prepares a test guest, starts metald (SQLite store,
# QEMU backend, development tokens, loopback only), then creates and boots a
# demo VM over the Connect JSON API and shows its console marker and
# GetVmInfo. metald keeps serving in the foreground; Ctrl-C deletes the demo
# VM and stops it. METALD_DEMO_DETACH=1 leaves metald running in the
# background instead. METALD_BIN (a built metald) skips the build;
# METALD_DEMO_DIR moves the demo's data directory (default .metald/demo).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

state=${METALD_DEMO_DIR:-$PWD/.metald/demo}
mkdir -p "$state"
port=${UNKEY_METALD_PORT:-8080}
url=http://127.0.0.1:$port
token=dev_customer_demo

bin=${METALD_BIN:-}
if [ -z "$bin" ]; then
  echo "== building metald"
  cargo build --locked --bin metald
  bin=./target/debug/metald
fi
echo "== preparing the test guest"
bash scripts/guest-assets.sh "$PWD/.metald/assets"
# shellcheck disable=SC1091
source "$PWD/.metald/assets/assets.env"

# A metald from an earlier demo run still holds the port: stop it first.
if [ -f "$state/metald.pid" ] && kill -0 "$(cat "$state/metald.pid")" 2>/dev/null; then
  echo "== stopping the previous demo metald"
  kill "$(cat "$state/metald.pid")"
  while kill -0 "$(cat "$state/metald.pid")" 2>/dev/null; do sleep 0.1; done
fi

rpc() { # rpc Method JSON
  curl -sS -X POST "$url/vmprovisioner.v1.VmService/$1" \
    -H "Content-Type: application/json" -H "Authorization: Bearer $token" -d "$2"
}

echo "== starting metald on $url (data in $state)"
export UNKEY_METALD_BACKEND=qemu UNKEY_METALD_AUTH_MODE=dev UNKEY_METALD_ADDRESS=127.0.0.1
export UNKEY_METALD_PORT=$port UNKEY_METALD_DATA_DIR=$state
# VMs may use only files under the asset roots: the test guest's directory
# (shared, read-only) and one private directory per customer.
export UNKEY_METALD_ASSET_DIRS=${UNKEY_METALD_ASSET_DIRS:-$PWD/.metald/assets:$state/assets/customers/\{customer\}}
# No billing service runs in the demo; VMs are still metered for GetVmInfo.
export UNKEY_METALD_BILLING_ENABLED=${UNKEY_METALD_BILLING_ENABLED:-false}
# The demo VM has no network interface; leave the host's bridges alone.
export UNKEY_METALD_NETWORK_ENABLED=${UNKEY_METALD_NETWORK_ENABLED:-false}
export UNKEY_METALD_QEMU_ACCEL=${UNKEY_METALD_QEMU_ACCEL:-tcg}
: >"$state/metald.out"
# metald runs in its own session: Ctrl-C sends SIGINT to the terminal's
# foreground process group, which must reach only this script, so that its
# trap can still delete the demo VM over the API before stopping metald.
# (From a script, a background job never leads a process group, so setsid
# execs metald in place and $! is metald's pid.)
setsid "$bin" >"$state/metald.out" 2>"$state/metald.log" &
pid=$!
echo $pid >"$state/metald.pid"
if [ "${METALD_DEMO_DETACH:-0}" != 1 ]; then
  # Ctrl-C (or SIGTERM) from here on deletes the demo VM, then stops metald
  # with SIGTERM and waits for it to exit.
  cleanup() {
    trap - INT TERM
    echo; echo "== deleting the demo VM and stopping metald"
    rpc DeleteVm '{"vm_id":"demo","force":true}' >/dev/null ||
      echo "DeleteVm failed; the next demo run deletes the VM" >&2
    kill -TERM $pid 2>/dev/null || true
    wait $pid 2>/dev/null || true
    exit 130
  }
  trap cleanup INT TERM
fi
# metald prints "metald listening on ..." once it serves.
for _ in $(seq 300); do
  grep -q "metald listening on" "$state/metald.out" && break
  kill -0 $pid 2>/dev/null || { cat "$state/metald.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "metald listening on" "$state/metald.out" || { echo "metald did not start" >&2; exit 1; }
curl -fsS "$url/health"; echo

# Delete a demo VM left by an earlier run, so reruns start clean.
rpc DeleteVm '{"vm_id":"demo","force":true}' >/dev/null || true

echo "== CreateVm"
rpc CreateVm "{\"vm_id\":\"demo\",\"config\":{
  \"cpu\":{\"vcpu_count\":1},
  \"memory\":{\"size_bytes\":134217728},
  \"boot\":{\"kernel_path\":\"$METALD_GUEST_KERNEL\",\"initrd_path\":\"$METALD_GUEST_INITRD\",
            \"kernel_args\":\"$METALD_GUEST_KERNEL_ARGS\"},
  \"storage\":[{\"id\":\"root\",\"path\":\"$METALD_GUEST_DISK\",\"read_only\":true,\"is_root_device\":true}]}}"
echo
echo "== BootVm"
rpc BootVm '{"vm_id":"demo"}'; echo
# The VM's files are under its host-wide key (GetVmInfo's vm_key) in the
# data directory; GetVmInfo shows no host path.
key=$(rpc GetVmInfo '{"vm_id":"demo"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["backendInfo"]["vm_key"])')
console="$state/vms/$key/console.log"
echo "== waiting for the guest's console marker ($console)"
for _ in $(seq 1200); do
  grep -q METALD-GUEST-READY "$console" 2>/dev/null && break
  sleep 0.1
done
grep METALD-GUEST-READY "$console" || { echo "guest did not boot; console:" >&2; cat "$console" >&2; exit 1; }
echo "== GetVmInfo"
rpc GetVmInfo '{"vm_id":"demo"}' | python3 -m json.tool

if [ "${METALD_DEMO_DETACH:-0}" = 1 ]; then
  echo "== metald keeps serving on $url (pid $pid); stop it with: kill $pid"
  exit 0
fi
echo "== metald serves on $url; try the README's curl walkthrough. Ctrl-C stops it."
wait $pid
