#!/bin/bash
# dracut module: bootkey opens the root volume in a systemd initrd. It installs the same
# Python code and Vault session as after boot (only the modules unlocking imports), the
# config, CA and secret_id, name resolution, and the initrd key socket that
# systemd-cryptsetup reads (crypttab: `root UUID=... /run/bootkey/initrd.sock luks,...`).
# See /usr/share/doc/bootkey/initrd.md.

check() {
    require_binaries /usr/bin/python3 /usr/bin/bootkey || return 1
    # Included on its own when crypttab names the initrd socket; else only on request.
    if [[ -f $dracutsysrootdir/etc/crypttab ]] \
        && grep -qs '^[^#]*/run/bootkey/initrd\.sock' "$dracutsysrootdir"/etc/crypttab; then
        return 0
    fi
    return 255
}

depends() {
    # network: dracut picks the handler (systemd-networkd where the host has it)
    echo systemd crypt network
    return 0
}

install() {
    local config=${BOOTKEY_CONFIG:-/etc/bootkey/bootkey.toml}
    local -a files
    if [[ ! -f $dracutsysrootdir$config ]]; then
        # dracut ignores install()'s status: stop it, rather than write an initrd whose
        # crypttab names a socket nobody serves.
        dfatal "bootkey: $config is missing — write it (docs/initrd.md) or drop the bootkey module"
        exit 1
    fi
    inst_multiple /usr/bin/python3 cryptsetup
    inst_script "$moddir/bootkey-initrd" /usr/bin/bootkey-initrd
    # The modules the key socket imports, measured by importing them: not a whole
    # site-packages (pydantic's v1 copy and bootkey's KES server stay out).
    mapfile -t files < <(/usr/bin/python3 -IS "$moddir/bootkey-initrd" --list-files "$config")
    if [[ ${#files[@]} -lt 10 ]]; then
        dfatal "bootkey: could not list the Python modules to install (is $config valid? try: $moddir/bootkey-initrd --list-files)"
        exit 1
    fi
    inst_multiple "${files[@]}"
    # Name resolution (the Vault address may be a name) and the CA bundle.
    inst_multiple -o /etc/hosts /etc/nsswitch.conf /etc/resolv.conf \
        /etc/ssl/certs/ca-certificates.crt
    # The default host_id is /etc/machine-id. A generic initrd gets an empty one (systemd
    # then makes up a new id each boot), and bootkey would find no volume of this host.
    if [[ -s $dracutsysrootdir/etc/machine-id ]]; then
        cp -f "$dracutsysrootdir"/etc/machine-id "$initdir"/etc/machine-id
    fi
    inst_libdir_file -o "libnss_files.so.*" "libnss_dns.so.*" "libresolv.so.*"
    # crypttab lines that use the initrd socket, when dracut's crypt module (hostonly)
    # did not copy them: the generator in the initrd makes systemd-cryptsetup units.
    if [[ -f $dracutsysrootdir/etc/crypttab ]]; then
        grep -s '^[^#]*/run/bootkey/initrd\.sock' "$dracutsysrootdir"/etc/crypttab \
            >> "$initdir"/etc/crypttab
    fi
    inst_simple "$moddir/bootkey-initrd.socket" "$systemdsystemunitdir/bootkey-initrd.socket"
    inst_simple "$moddir/bootkey-initrd.service" "$systemdsystemunitdir/bootkey-initrd.service"
    $SYSTEMCTL -q --root "$initdir" enable bootkey-initrd.socket bootkey-initrd.service
}

cmdline() {
    echo "rd.neednet=1"
}
