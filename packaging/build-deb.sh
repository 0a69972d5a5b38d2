#!/usr/bin/env bash
# Build the bootkey Debian package: packaging/build-deb.sh [OUTDIR]   (default OUTDIR: dist/)
#
# The package is self-contained: bootkey and its Python dependencies are pip-installed with
# --target into /usr/lib/bootkey (Debian's own python3-pydantic 1.10 and python3-hvac 0.11 are
# too old), started by /usr/bin/bootkey with Debian's /usr/bin/python3. systemd-python has no
# wheels on PyPI, so it is compiled here against libsystemd-dev and /usr/bin/python3's headers.
#
# Reproducible: the same sources, dependency versions and SOURCE_DATE_EPOCH give a
# byte-identical .deb (fixed mtimes, sorted tar members, root ownership, gzip -n, no
# build paths in the compiled extension, no .pyc: postinst compiles those). The VM test
# image cache is keyed by the .deb's hash, so a rebuild that changed nothing must not miss.
#
# Dependency versions: pinned to the project's tested venv (.venv) when it exists, so the
# package ships what the test suite ran against; BOOTKEY_CONSTRAINTS=FILE overrides.
# Prints the path of the .deb as its last line.
set -euo pipefail
umask 022
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-$REPO/dist}" && cd "${1:-$REPO/dist}" && pwd)
PY=/usr/bin/python3   # the interpreter the launcher uses: build against it, not the venv's

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml" | head -1)
DEBVER="$VERSION-1"
ARCH=$(dpkg --print-architecture)
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || echo 1700000000)
fi
export SOURCE_DATE_EPOCH
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYNEXT=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')

W=$(mktemp -d /tmp/bootkey-deb.XXXXXX)
mkdir -p "$W/wheels" "$W/root"
trap 'rm -rf "$W"' EXIT

# --- Python payload -------------------------------------------------------------------
"$PY" -m venv "$W/venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
constraints=$W/constraints.txt
if [ -n "${BOOTKEY_CONSTRAINTS:-}" ]; then
  cp "$BOOTKEY_CONSTRAINTS" "$constraints"
elif [ -x "$REPO/.venv/bin/pip" ]; then
  "$REPO/.venv/bin/pip" freeze --exclude-editable | grep -v '^bootkey[ =@]' > "$constraints" || true
else
  : > "$constraints"
fi
# Copy the source tree so the build leaves no build/ or egg-info in the checkout.
mkdir -p "$W/src"
(cd "$REPO" && tar -cf - --exclude=__pycache__ --exclude="*.egg-info" \
  pyproject.toml README.md bootkey bootkey_core kes) | tar -xf - -C "$W/src"
# No debug info and no build paths in systemd-python's extension: the build ID and bytes
# then depend only on the source, not on the random work directory.
export CFLAGS="-g0 -ffile-prefix-map=$W=/build"
"$W/venv/bin/pip" wheel -q --wheel-dir "$W/wheels" -c "$constraints" "$W/src"
"$W/venv/bin/pip" install -q --no-index --find-links "$W/wheels" --no-compile \
  --target "$W/root/usr/lib/bootkey" bootkey
LIB=$W/root/usr/lib/bootkey
# Console scripts: we ship our own launcher. Their RECORD lines go too: the scripts'
# shebangs name the temporary build venv, so their hashes differ on every build.
rm -rf "$LIB/bin"
sed -i '\#^\.\./\.\./bin/#d' "$LIB"/*.dist-info/RECORD
find "$LIB" -name direct_url.json -delete             # records the temporary wheel path
find "$LIB" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$LIB" -name '*.so' -exec strip --strip-unneeded {} +

# --- launcher, units, config, docs ----------------------------------------------------
install -d "$W/root/usr/bin"
cat > "$W/root/usr/bin/bootkey" <<'EOF'
#!/usr/bin/python3 -IS
# bootkey launcher: Debian's python3 with bootkey's own dependencies from ../lib/bootkey.
# -I ignores PYTHON* variables and the user's site; -S keeps /usr/lib/python3/dist-packages
# (Debian's older pydantic/hvac) off sys.path.
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "lib", "bootkey"))
from bootkey.cli import main  # noqa: E402

sys.exit(main())
EOF
chmod 0755 "$W/root/usr/bin/bootkey"

units=()
for u in "$REPO"/systemd/*.service "$REPO"/systemd/*.socket "$REPO"/systemd/*.target \
         "$REPO"/systemd/*.path "$REPO"/systemd/*.timer; do
  [ -f "$u" ] && units+=("$u")
done
if [ ${#units[@]} -gt 0 ]; then
  install -d "$W/root/usr/lib/systemd/system"
  install -m 0644 "${units[@]}" "$W/root/usr/lib/systemd/system/"
fi

if [ -f "$REPO/systemd/bootkey.tmpfiles" ]; then
  install -D -m 0644 "$REPO/systemd/bootkey.tmpfiles" "$W/root/usr/lib/tmpfiles.d/bootkey.conf"
fi

# dracut module: opens the root volume in the initrd (docs/initrd.md)
DRACUT=$W/root/usr/lib/dracut/modules.d/90bootkey
install -d "$DRACUT"
install -m 0755 "$REPO"/packaging/dracut/90bootkey/module-setup.sh \
  "$REPO"/packaging/dracut/90bootkey/bootkey-initrd "$DRACUT/"
install -m 0644 "$REPO"/packaging/dracut/90bootkey/bootkey-initrd.socket \
  "$REPO"/packaging/dracut/90bootkey/bootkey-initrd.service "$DRACUT/"

install -d -m 0700 "$W/root/etc/bootkey"
install -m 0644 "$REPO/packaging/bootkey.toml.example" "$W/root/etc/bootkey/bootkey.toml.example"

DOC=$W/root/usr/share/doc/bootkey
install -d "$DOC"
install -m 0644 "$REPO/README.md" "$DOC/README.md"
for d in "$REPO"/docs/*.md; do
  [ -f "$d" ] && install -m 0644 "$d" "$DOC/"
done
cat > "$DOC/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: bootkey
License: Apache-2.0
Comment: /usr/lib/bootkey bundles bootkey's Python dependencies; each one's licence is in its
 *.dist-info directory there.
EOF
printf 'bootkey (%s) unstable; urgency=medium\n\n  * Built from the bootkey repository.\n\n -- bootkey maintainers <bootkey@localhost>  %s\n' \
  "$DEBVER" "$(date -u -R -d "@$SOURCE_DATE_EPOCH")" | gzip -9n > "$DOC/changelog.Debian.gz"

# --- control files --------------------------------------------------------------------
install -d "$W/root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$W/root" | cut -f1)
cat > "$W/root/DEBIAN/control" <<EOF
Package: bootkey
Version: $DEBVER
Architecture: $ARCH
Maintainer: bootkey maintainers <bootkey@localhost>
Installed-Size: $size
Depends: python3 (>= $PYVER), python3 (<< $PYNEXT), cryptsetup-bin, libsystemd0, libc6, procps
Recommends: systemd
Suggests: dracut, libtss2-esys-3.0.2-0, libtss2-rc0, libtss2-tcti-device0
Section: admin
Priority: optional
Homepage: https://github.com/bootkey/bootkey
Description: unlock LUKS volumes at boot with keys sealed in Vault/OpenBao
 bootkey logs in to HashiCorp Vault or OpenBao with AppRole, fetches each LUKS
 volume's transit-sealed key, unseals it into locked memory and opens the volume,
 either itself (bootkey.service) or as the keyfile socket named in /etc/crypttab.
 It also enrolls and rotates keys crash-safely and can serve MinIO's KES API.
 .
 Python dependencies are bundled in /usr/lib/bootkey.
EOF
echo "/etc/bootkey/bootkey.toml.example" > "$W/root/DEBIAN/conffiles"

cat > "$W/root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
# Byte-compile the bundled modules here rather than shipping .pyc (keeps the .deb
# reproducible); reload systemd so it sees the units. Nothing is enabled: the operator
# enables bootkey.service (or the socket) once /etc/bootkey/bootkey.toml exists.
set -e
if [ "$1" = configure ]; then
  /usr/bin/python3 -m compileall -q /usr/lib/bootkey >/dev/null 2>&1 || true
  if [ -d /run/systemd/system ] && [ -f /usr/lib/tmpfiles.d/bootkey.conf ]; then
    systemd-tmpfiles --create bootkey.conf || true
  fi
  if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
exit 0
EOF
cat > "$W/root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
find /usr/lib/bootkey -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
exit 0
EOF
cat > "$W/root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
if [ "$1" = purge ]; then rm -f /etc/bootkey/bootkey.toml.example; fi
exit 0
EOF
chmod 0755 "$W/root/DEBIAN/postinst" "$W/root/DEBIAN/prerm" "$W/root/DEBIAN/postrm"

# conffiles are left out, as dh_md5sums does: dpkg keeps their hashes itself.
(cd "$W/root" && find . \( -path ./DEBIAN -o -path ./etc \) -prune -o -type f -print0 | LC_ALL=C sort -z \
  | xargs -0 md5sum | sed 's| \./| |') > "$W/root/DEBIAN/md5sums"

# --- build ----------------------------------------------------------------------------
find "$W/root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
deb="$OUT/bootkey_${DEBVER}_${ARCH}.deb"
# dpkg-deb (>= 1.19) sorts members and clamps mtimes to SOURCE_DATE_EPOCH by itself.
dpkg-deb --root-owner-group -Zgzip -z9 --build "$W/root" "$deb" >/dev/null
echo "$deb"
