"""`bootkey enroll`, `rotate`, `unenroll`, `import-vaultlocker`: arguments and output only.

The decisions (what to do, in which order, how to resume) live in bootkey.enroll and
bootkey.vaultlocker, where the operator's Vault token comes from in
bootkey.operator_token. Secrets never come from argv: the Vault token from --token-file,
$VAULT_TOKEN or $BAO_TOKEN, an existing LUKS key from --unlock-key-file FILE or stdin.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from bootkey import enroll, unlock, vaultlocker
from bootkey.commands.common import load_config, print_json
from bootkey.config import Config, check_volume_name
from bootkey.operator_token import operator_session
from bootkey.vault import VaultSession
from bootkey_core import secret
from bootkey_core.errors import UsageError
from bootkey_core.secret import SecretBuffer

MAX_KEY_FILE = 8192  # cryptsetup's default keyfile-size limit (8 MiB) is far more than a key

ENROLL_HELP = """\
Add a Vault-held random key to a LUKS2 volume, crash-safely: generate 64 random bytes,
seal them with transit, write them to Vault create-only, read back, add a keyslot (PBKDF2,
1000 iterations), import a bootkey LUKS2 token, test the keyslot alone. Interrupted?
Run the same command again: it finishes (or cleanly rolls back) from what it finds.

examples:
  bootkey enroll /dev/sdb --name data --unlock-key-file /root/data.pass
  printf %s "$PASS" | bootkey enroll /dev/sdb --unlock-key-file -
  bootkey enroll /dev/sdc --format --name scratch    # blank device → new LUKS2 volume

Vault: an operator token from $VAULT_TOKEN/$BAO_TOKEN or --token-file, with the policy
`bootkey policy --enroll` prints; without one, the config's AppRole.
"""

ROTATE_HELP = """\
New key into a new keyslot and into Vault, tested; only then the old keyslot is killed and
its Vault copy retired. Interrupted? Run it again.

When no Vault key opens the volume any more (unlock exits 81: the keyslot was killed or
changed outside bootkey, or the Vault entry was replaced), give an existing passphrase or
keyfile: it authorises the new keyslot, and keyslots no Vault key opens are left alone.

examples:
  bootkey rotate data
  bootkey rotate data --unlock-key-file /root/data.pass    # after exit 81
"""


def _vault_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", metavar="FILE", type=Path,
                   help="Vault token for enrollment (default: $VAULT_TOKEN or $BAO_TOKEN, "
                        "else AppRole from the config)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    # bootkey.cli.main(after_step=…) sets it; None runs the plan as it is
    p.set_defaults(after_step=None)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("enroll", help="add a Vault-held key to a LUKS2 volume",
                       description=ENROLL_HELP, formatter_class=fmt)
    p.add_argument("device", metavar="DEVICE", help="block device or image file")
    p.add_argument("--name", help="volume name (mapping name at unlock; stored in the token)")
    p.add_argument("--unlock-key-file", metavar="FILE|-",
                   help="an existing passphrase or keyfile, byte-exact (- = stdin)")
    p.add_argument("--keyslot", type=int, metavar="N", help="keyslot for the Vault key")
    p.add_argument("--format", action="store_true",
                   help="make a blank device a new LUKS2 volume keyed by Vault")
    p.add_argument("--force", action="store_true",
                   help="with --format: destroy whatever the device holds")
    p.add_argument("--recovery-key", action="store_true",
                   help="also add a typable recovery key (argon2id), shown once")
    _vault_args(p)
    p.set_defaults(run=run_enroll)

    p = sub.add_parser("rotate", help="replace a volume's Vault key (new keyslot first)",
                       description=ROTATE_HELP, formatter_class=fmt)
    p.add_argument("target", metavar="NAME|DEVICE")
    p.add_argument("--rewrap", action="store_true",
                   help="only re-seal under the newest transit key version; volume untouched")
    p.add_argument("--unlock-key-file", metavar="FILE|-",
                   help="an existing passphrase or keyfile, byte-exact (- = stdin); used "
                        "only when no Vault key opens the volume any more (exit 81)")
    _vault_args(p)
    p.set_defaults(run=run_rotate)

    p = sub.add_parser("unenroll", help="remove bootkey's keyslot and token",
                       description="Remove bootkey's keyslot(s) and token(s); never the last "
                       "keyslot: --unlock-key-file must open a keyslot that stays. --purge "
                       "also deletes the Vault copy (crypto-shred).", formatter_class=fmt)
    p.add_argument("target", metavar="NAME|DEVICE")
    p.add_argument("--purge", action="store_true", help="also delete the Vault entry")
    p.add_argument("--unlock-key-file", metavar="FILE|-",
                   help="key of a keyslot that stays (- = stdin)")
    _vault_args(p)
    p.set_defaults(run=run_unenroll)

    p = sub.add_parser("import-vaultlocker", help="migrate vaultlocker-managed volumes",
                       description="Find vaultlocker's keys (<backend>/<hostname>/<uuid>, "
                       "field dmcrypt_key), verify each against its volume, enroll the "
                       "volume the bootkey way, then remove the old keyslot unless "
                       "--keep-old-slot.", formatter_class=fmt)
    p.add_argument("--backend", default="secrets", help="vaultlocker's KV mount (secrets)")
    p.add_argument("--hostname", help="vaultlocker's host name (default: this host's)")
    p.add_argument("--kv-version", type=int, choices=(1, 2),
                   help="KV version of the backend (default: ask Vault)")
    p.add_argument("--keep-old-slot", action="store_true",
                   help="keep vaultlocker's keyslot next to bootkey's")
    p.add_argument("--device", action="append", default=[], metavar="DEVICE",
                   help="also look here for the volumes (repeatable; always: the [[volume]] "
                        "devices, every block device and [unlock] search globs)")
    _vault_args(p)
    p.set_defaults(run=run_import)


# ---- helpers ---------------------------------------------------------------------------


def session_for(cfg: Config, args: argparse.Namespace) -> VaultSession:
    return operator_session(cfg, args.token_file, os.environ)


def read_key(spec: str | None) -> SecretBuffer | None:
    """The bytes of FILE (or stdin for -), verbatim: a trailing newline is part of it."""
    if spec is None:
        return None
    try:
        if spec == "-":
            data = bytearray(sys.stdin.buffer.read(MAX_KEY_FILE + 1))
        else:
            with open(spec, "rb") as f:
                data = bytearray(f.read(MAX_KEY_FILE + 1))
    except OSError as e:
        raise UsageError(f"--unlock-key-file {spec}: cannot read: {e.strerror}") from None
    if not data:
        raise UsageError(f"--unlock-key-file {spec}: empty — give the passphrase or keyfile")
    if len(data) > MAX_KEY_FILE:
        data[:] = bytes(len(data))
        raise UsageError(f"--unlock-key-file {spec}: longer than {MAX_KEY_FILE} bytes — "
                         "is this the right file?")
    return SecretBuffer.from_bytes(data)


@contextlib.contextmanager
def unlock_key(spec: str | None) -> Iterator[SecretBuffer | None]:
    key = read_key(spec)
    try:
        yield key
    finally:
        if key is not None:
            key.close()


def resolve_target(cfg: Config, target: str) -> str:
    """A device path as given, else a volume name (config or bootkey token)."""
    if os.path.exists(target):
        return os.path.realpath(target)
    volumes, failed = unlock.resolve_volumes(cfg, names=[target])
    if volumes:
        return volumes[0].device
    if failed and failed[0].error is not None:
        raise failed[0].error
    raise UsageError(f"{target}: no such device or volume")


def _device(path: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such device or file — check the path")
    return os.path.realpath(path)


def report(out: enroll.Outcome, args: argparse.Namespace, verb: str) -> None:
    rec = out.recovery_key
    try:
        if args.json:
            obj = out.as_json()
            if rec is not None:
                obj["recovery_key"] = bytes(rec.view).decode()
                obj["recovery_keyslot"] = out.recovery_keyslot
            print_json(obj)
            return
        print(f"{verb} {out.device} (UUID {out.luks_uuid}): {out.summary}")
        print(f"  Vault: {out.vault_path}; keyslot(s) with a Vault key: "
              f"{', '.join(map(str, out.keyslots)) or 'none'}")
        for s in out.steps:
            print(f"  done: {s}")
        if rec is not None:
            print(f"\nRecovery key (keyslot {out.recovery_keyslot}) — write it down now; it "
                  "is shown only this once and stored nowhere:\n\n    "
                  f"{bytes(rec.view).decode()}\n")
    finally:
        if rec is not None:
            rec.close()


# ---- commands ----------------------------------------------------------------------------


def run_enroll(args: argparse.Namespace) -> int:
    if args.force and not args.format:
        raise UsageError("enroll: --force only applies with --format")
    if args.name is not None:
        try:  # the mapping name at unlock: the same rule as a [[volume]] name
            check_volume_name(args.name)
        except ValueError as e:
            raise UsageError(f"--name: {e}") from None
    device = _device(args.device)
    cfg = load_config(args)
    secret.harden_process()
    with unlock_key(args.unlock_key_file) as key:
        session = session_for(cfg, args)
        out = enroll.enroll(cfg, session, cfg.resolved_host_id(), device, name=args.name,
                            unlock_key=key, keyslot=args.keyslot, format_device=args.format,
                            force=args.force, recovery_key=args.recovery_key,
                            dry_run=args.dry_run, after_step=args.after_step)
    report(out, args, "enrolled")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    if args.rewrap and args.unlock_key_file is not None:
        raise UsageError("rotate: --unlock-key-file does not apply with --rewrap (the volume "
                         "is not touched)")
    cfg = load_config(args)
    secret.harden_process()
    with unlock_key(args.unlock_key_file) as key:
        session = session_for(cfg, args)
        device = resolve_target(cfg, args.target)
        out = enroll.rotate(cfg, session, cfg.resolved_host_id(), device, rewrap=args.rewrap,
                            unlock_key=key, dry_run=args.dry_run, after_step=args.after_step)
    report(out, args, "rewrapped" if args.rewrap else "rotated")
    return 0


def run_unenroll(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    secret.harden_process()
    with unlock_key(args.unlock_key_file) as key:
        session = session_for(cfg, args)
        device = resolve_target(cfg, args.target)
        out = enroll.unenroll(cfg, session, cfg.resolved_host_id(), device, purge=args.purge,
                              unlock_key=key, dry_run=args.dry_run, after_step=args.after_step)
    report(out, args, "unenrolled")
    return 0


def run_import(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    secret.harden_process()
    session = session_for(cfg, args)
    results = vaultlocker.import_all(
        cfg, session, cfg.resolved_host_id(), backend=args.backend, hostname=args.hostname,
        kv_version=args.kv_version, keep_old_slot=args.keep_old_slot,
        devices=[_device(d) for d in args.device], dry_run=args.dry_run,
        after_step=args.after_step)
    if args.json:
        print_json({"volumes": [r.as_json() for r in results]})
    else:
        for r in results:
            print(f"{r.status:9} {r.luks_uuid}  {r.device or '-'}  {r.reason}")
        if not results:
            print("nothing to import: vaultlocker holds no keys for this host")
    failed = [r for r in results if r.status == "failed"]
    return failed[0].exit_code if failed else 0
