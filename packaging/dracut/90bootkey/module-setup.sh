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

# The sealed secret_id's file, if bootkey.toml names a credential (secret_id_credential).
_credential() {
    /usr/bin/python3 -IS "$moddir/bootkey-initrd" --credential "${BOOTKEY_CONFIG:-/etc/bootkey/bootkey.toml}"
}

installkernel() {
    # the TPM2 drivers, where they are modules: the credential is unsealed by the TPM
    [[ -n $(_credential 2>/dev/null) ]] && instmods '=drivers/char/tpm'
    return 0
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
    # A secret_id sealed to the TPM2: bootkey-initrd decrypts it with systemd-creds, which
    # loads the TPM2 libraries at run time (dlopen: dracut's ldd walk does not see them).
    local cred libdir found=
    cred=$(_credential)
    if [[ -n $cred ]]; then
        if [[ ! -s $dracutsysrootdir$cred ]]; then
            dfatal "bootkey: $cred is missing — seal the secret_id on this machine: systemd-creds encrypt --with-key=tpm2 --name=$(basename "$cred" .cred) /etc/bootkey/secret-id $cred"
            exit 1
        fi
        for libdir in $libdirs; do
            [[ -e $dracutsysrootdir$libdir/libtss2-esys.so.0 ]] && found=1
        done
        if [[ -z $found ]]; then
            dfatal "bootkey: $cred needs the TPM2 libraries in the initrd — apt install libtss2-esys-3.0.2-0 libtss2-rc0 libtss2-mu0 libtss2-tcti-device0 (dnf install tpm2-tss)"
            exit 1
        fi
        inst_multiple systemd-creds
        inst_libdir_file "libtss2-esys.so.*" "libtss2-rc.so.*" "libtss2-mu.so.*" \
            "libtss2-sys.so.*" "libtss2-tctildr.so.*" "libtss2-tcti-device.so.*"
    fi
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
