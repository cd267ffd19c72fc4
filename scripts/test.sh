#!/usr/bin/env bash
# The whole test suite, as README.md gives it and CI runs it (.ci/run).
# Installs what the tests need that a fresh machine may lack, then runs every
# test of every crate. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v openssl >/dev/null || need_apt+=(openssl)
# Unmodified softphones, a registrar, SIPp and a packet capture for the call tests
# (tests/call_baresip.rs).
command -v baresip >/dev/null || need_apt+=(baresip-core)
command -v tcpdump >/dev/null || need_apt+=(tcpdump)
command -v kamailio >/dev/null || need_apt+=(kamailio)
command -v sipp >/dev/null || need_apt+=(sip-tester)
# The gateway tests: iperf3 traffic through the tunnel, ip (network namespaces)
command -v iperf3 >/dev/null || need_apt+=(iperf3)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v ping >/dev/null || need_apt+=(iputils-ping)
command -v wireguard-go >/dev/null || need_apt+=(wireguard-go)
command -v wg >/dev/null || need_apt+=(wireguard-tools)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} (Debian packages): OpenSSL cross-checks; baresip, kamailio, SIPp, tcpdump for the call tests; iperf3, iproute2, ping, wireguard-go and wireguard-tools for the gateway tests"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"; else sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}"; fi
fi

# A throwaway PostgreSQL server for the networked key-store tests (installs
# Debian's postgresql package if needed; reuses a server it started before).
pg_line=$(bash scripts/postgres.sh)
export "$pg_line"
# Stopped again at the end unless QKDNET_KEEP_PG=1 (a re-run then starts faster).
[ "${QKDNET_KEEP_PG:-}" = 1 ] || trap 'bash scripts/postgres.sh stop' EXIT

# Throwaway PKCS#11 tokens (SoftHSM2) for the node master key in a token
# (installs Debian's softhsm2 package if needed; reuses the tokens it made).
hsm_env=$(bash scripts/softhsm.sh)
while IFS= read -r line; do export "$line"; done <<<"$hsm_env"

cargo fmt --all -- --check
cargo test --workspace --locked "$@"
