#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian bookworm machine, as root:
# the apt packages bootkey and its tests use, and a venv at .venv with bootkey installed.
# Re-running it is cheap: each part is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  cryptsetup-bin        # luksFormat/addKey/token/test-passphrase on image files
  systemd               # systemd-analyze verify, systemd-cryptsetup, systemd-socket-activate
  util-linux            # losetup for the hotplug tests
  libsystemd-dev        # systemd-python builds against it
  pkg-config
  e2fsprogs             # mkfs.ext4 -d, debugfs for VM test payloads
  qemu-system-x86       # VM boot tests (TCG)
  qemu-utils            # qemu-img overlays
  busybox-static        # initramfs for VM tests, guestfwd relay
  debootstrap           # systemd guest for VM tests
  swtpm                 # a TPM2 for the guest whose secret_id is sealed to it
  python3-venv          # packaging/build-deb.sh builds with Debian's /usr/bin/python3,
  python3-dev           #   compiling systemd-python against its headers
  nginx-light           # mTLS ceiling benchmark for KES
  apache2-utils         # ab -k -E
  curl
  golang-go             # a MinIO-style Go TLS/HTTP client in the KES transport tests
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv uses the interpreter the .deb runs bootkey with (Debian's /usr/bin/python3, built
# with PGO and LTO): tests and benchmarks then measure what ships. A python3 earlier on PATH
# (pyenv's, say) may be a plain build: 15-20 % more CPU per KES request (docs/benchmarks.md).
PY=${PYTHON:-/usr/bin/python3}
if ! command -v "$PY" >/dev/null; then
  echo "setup: no interpreter at $PY — install python3 (apt) or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
PY_REAL=$(readlink -f "$(command -v "$PY")")
if [ -x .venv/bin/python ] && [ "$(readlink -f .venv/bin/python)" != "$PY_REAL" ]; then
  echo "setup: .venv was made with $(readlink -f .venv/bin/python), not $PY_REAL: recreating it"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.bootkey-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
