#!/usr/bin/env bash
# The whole test suite, as the README's second command and .ci/run run it:
# installs what is missing, prepares the test guest, checks formatting and
# lints, then runs every unit and integration test (real SQLite, real QEMU
# guests under TCG, real clients over Connect, gRPC and gRPC-Web), and
# finally every fuzz target for a few seconds (scripts/fuzz.sh short).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

export METALD_ASSETS_DIR="${METALD_ASSETS_DIR:-$PWD/.metald/assets}"
bash scripts/guest-assets.sh "$METALD_ASSETS_DIR"
export METALD_ASSETS_ENV="$METALD_ASSETS_DIR/assets.env"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked --no-fail-fast
echo "== fuzz (short)"
bash scripts/fuzz.sh short
