#!/usr/bin/env bash
# Measures how long BootVm takes through metald's API, per backend: the time
# from the request until metald answers RUNNING (the VMM is up, configured
# and reports the guest running; the guest itself is still booting).
#
#   scripts/bench-boot.sh BACKEND [N]     BACKEND: qemu | firecracker | cloudhypervisor
#
# Uses the release build of metald and the test guest (scripts/guest-assets.sh).
# Extra metald settings come from the environment, e.g.
#   UNKEY_METALD_FIRECRACKER_BINARY=/path/firecracker UNKEY_METALD_JAILER_ENABLED=false
# Prints every sample and then n, mean, p50, p90 and max in milliseconds.
set -euo pipefail
cd "$(dirname "$0")/.."

backend=${1:?usage: scripts/bench-boot.sh qemu|firecracker|cloudhypervisor [N]}
n=${2:-20}
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/guest-assets.sh >/dev/null
# shellcheck disable=SC1091
source "$PWD/.metald/assets/assets.env"
cargo build --release --locked -q -p metald
bin=$PWD/target/release/metald

state=$(mktemp -d /tmp/metald-bench.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port
export UNKEY_METALD_BACKEND=$backend UNKEY_METALD_AUTH_MODE=dev UNKEY_METALD_ADDRESS=127.0.0.1
export UNKEY_METALD_PORT=$port UNKEY_METALD_DATA_DIR=$state UNKEY_METALD_LOG=warn
export UNKEY_METALD_BILLING_ENABLED=false UNKEY_METALD_NETWORK_ENABLED=false
export UNKEY_METALD_QEMU_ACCEL=${UNKEY_METALD_QEMU_ACCEL:-tcg}
# The test guest's directory is the one asset root.
export UNKEY_METALD_ASSET_DIRS=$PWD/.metald/assets
"$bin" >"$state/metald.out" 2>"$state/metald.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$state"' EXIT
for _ in $(seq 300); do
  grep -q "metald listening on" "$state/metald.out" && break
  kill -0 $pid 2>/dev/null || { cat "$state/metald.log" >&2; exit 1; }
  sleep 0.1
done

rpc() { # rpc Method JSON -> prints curl's total time in seconds
  curl -sS -o "$state/answer" -w '%{time_total}' -X POST "$url/vmprovisioner.v1.VmService/$1" \
    -H "Content-Type: application/json" -H "Authorization: Bearer dev_customer_bench" -d "$2"
}

samples=()
for i in $(seq "$n"); do
  rpc CreateVm "{\"vm_id\":\"b$i\",\"config\":{\"cpu\":{\"vcpu_count\":1},
    \"memory\":{\"size_bytes\":134217728},
    \"boot\":{\"kernel_path\":\"$METALD_GUEST_KERNEL\",\"initrd_path\":\"$METALD_GUEST_INITRD\",
      \"kernel_args\":\"$METALD_GUEST_KERNEL_ARGS\"},
    \"storage\":[{\"id\":\"root\",\"path\":\"$METALD_GUEST_DISK\",\"read_only\":true,\"is_root_device\":true}]}}" >/dev/null
  t=$(rpc BootVm "{\"vm_id\":\"b$i\"}")
  grep -q VM_STATE_RUNNING "$state/answer" || { cat "$state/answer" >&2; exit 1; }
  samples+=("$t")
  echo "boot $i: $(python3 -c "print(round($t*1000,1))") ms"
  rpc DeleteVm "{\"vm_id\":\"b$i\",\"force\":true}" >/dev/null
done
python3 - "${samples[@]}" <<'EOF'
import statistics, sys
ms = sorted(float(x) * 1000 for x in sys.argv[1:])
pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]
print(f"n={len(ms)} mean={statistics.mean(ms):.1f} ms p50={pick(0.5):.1f} ms "
      f"p90={pick(0.9):.1f} ms max={ms[-1]:.1f} ms")
EOF
