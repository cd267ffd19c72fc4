#!/usr/bin/env bash
# Throwaway PKCS#11 tokens (SoftHSM2) for the tests of the node master key in
# a token (crates/kms/tests/pkcs11.rs) and of the PKCS#11 security medium
# (crates/media/tests/pkcs11_medium.rs).
#
# Installs Debian's `softhsm2` package if softhsm2-util or the module is
# missing, writes a SoftHSM2 configuration whose token directory is
# target/softhsm/tokens (owner-only), initialises three tokens there (once; a
# re-run reuses them): `qkdnet-test`, which the kms tests share,
# `qkdnet-test-solo`, which only the wrong-PIN tests of kms and media log in
# to (PKCS#11 log-in is per process and token: a wrong PIN is only checked
# while no other session of the process is logged in), and
# `qkdnet-test-media`, which holds the other media tests' media (SoftHSM2
# lists its whole token directory on every object it destroys, so the media's
# objects are kept out of the kms tests' token). All get the same random user PIN, kept in target/softhsm/user.pin
# (0600), and it prints on stdout, one per line:
#
#   SOFTHSM2_CONF=…/target/softhsm/softhsm2.conf
#   QKDNET_TEST_PKCS11_MODULE=/usr/lib/softhsm/libsofthsm2.so
#   QKDNET_TEST_PKCS11_TOKEN=qkdnet-test
#   QKDNET_TEST_PKCS11_TOKEN_SOLO=qkdnet-test-solo
#   QKDNET_TEST_PKCS11_PIN_FILE=…/target/softhsm/user.pin
#   QKDNET_TEST_PKCS11_PIN=…            (the same PIN, for the pin_env test)
#   QKDNET_TEST_PKCS11_TOKEN_MEDIA=qkdnet-test-media
#
# Everything else goes to stderr, so a caller can do
#
#   hsm_env=$(bash scripts/softhsm.sh) && while IFS= read -r l; do export "$l"; done <<<"$hsm_env"
#
# The media tests kill processes that are writing to qkdnet-test-media; each
# run leaves a few empty object files there that no PKCS#11 call can remove
# (SoftHSM2 rewrites files in place), which slows the token a little as they
# add up. Delete target/softhsm to start from scratch. The tokens are test data only
# (their PINs appear on softhsm2-util's command line while they are made).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "softhsm.sh: $*" >&2; }

find_module() {
  local m
  for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so; do
    if [ -f "$m" ]; then echo "$m"; return 0; fi
  done
  return 1
}

if ! command -v softhsm2-util >/dev/null 2>&1 || ! find_module >/dev/null; then
  log "installing Debian's softhsm2 package (softhsm2-util or libsofthsm2.so not found)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >&2
  else
    sudo apt-get update -qq >&2 && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >&2
  fi
  command -v softhsm2-util >/dev/null 2>&1 || { log "softhsm2 installed but softhsm2-util not found"; exit 1; }
fi
module=$(find_module) || { log "softhsm2 installed but libsofthsm2.so not found"; exit 1; }

base="$PWD/target/softhsm"
mkdir -p "$base/tokens"
chmod 700 "$base" "$base/tokens"
conf="$base/softhsm2.conf"
cat >"$conf" <<EOF
# Written by scripts/softhsm.sh: throwaway test tokens.
directories.tokendir = $base/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
slots.mechanisms = ALL
library.reset_on_fork = false
EOF
export SOFTHSM2_CONF="$conf"

secret() { head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
if [ ! -s "$base/user.pin" ]; then
  (umask 077; secret >"$base/user.pin"; secret >"$base/so.pin")
fi
pin=$(cat "$base/user.pin")
so_pin=$(cat "$base/so.pin")

for label in qkdnet-test qkdnet-test-solo qkdnet-test-media; do
  if softhsm2-util --show-slots 2>/dev/null | grep -Eq "^[[:space:]]*Label:[[:space:]]+$label[[:space:]]*$"; then
    log "reusing token $label"
  else
    log "initialising token $label in $base/tokens"
    softhsm2-util --init-token --free --label "$label" --pin "$pin" --so-pin "$so_pin" >&2
  fi
done

echo "SOFTHSM2_CONF=$conf"
echo "QKDNET_TEST_PKCS11_MODULE=$module"
echo "QKDNET_TEST_PKCS11_TOKEN=qkdnet-test"
echo "QKDNET_TEST_PKCS11_TOKEN_SOLO=qkdnet-test-solo"
echo "QKDNET_TEST_PKCS11_PIN_FILE=$base/user.pin"
echo "QKDNET_TEST_PKCS11_PIN=$pin"
echo "QKDNET_TEST_PKCS11_TOKEN_MEDIA=qkdnet-test-media"
