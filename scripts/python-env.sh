#!/usr/bin/env bash
# Creates .venv/ with the external ETSI GS QKD 014 clients the KME is tested
# against: etsi-qkd-014-client (CLI qkd014-client), qkdsec (qkdsec doctor) and
# schemathesis (st run, driven by the KME's served OpenAPI document).
# Idempotent. Exits 3 if PyPI cannot be reached, so callers can skip.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing python3-venv (Debian package)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv; else sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv; fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# Pinned: the tests assert what these versions print (probe names, summaries).
want=("etsi-qkd-014-client==0.9.0" "qkdsec[cli]==0.3.0" "schemathesis==4.32.5")
stamp=.venv/.qkdnet-packages
if [ "$(cat "$stamp" 2>/dev/null)" != "${want[*]}" ]; then
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check --timeout 30 "${want[@]}"; then
    echo "pip could not install ${want[*]} (PyPI unreachable?)" >&2
    exit 3
  fi
  echo "${want[*]}" > "$stamp"
fi
echo ".venv ready: $(.venv/bin/python -m pip list --disable-pip-version-check 2>/dev/null | grep -Ei 'etsi|qkdsec|schemathesis' | tr -s ' ' | paste -sd, -)"
