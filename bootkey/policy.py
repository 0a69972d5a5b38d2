"""The Vault policies a host needs, as HCL text.

Least privilege (DESIGN §3): a booting host may only read its own KV prefix and decrypt
with the transit key under contexts that start with its own host_id. Enrollment may also
create and update entries under that prefix and encrypt/rewrap.

The context restriction uses `allowed_parameters` with a prefix glob on the base64 of the
context. base64 maps each 3 plaintext bytes to 4 characters, so only the longest prefix of
`"<host_id>/"` whose length is a multiple of 3 has a fixed encoding. A systemd machine-id
(32 hex characters) plus "/" is 33 bytes: the glob then pins the exact host. For other
host_ids the glob pins the first 3k bytes; `boot_policy` says so in a comment. The
rules are values (`boot_rules`, `enroll_rules`); bootkey_core.vault_policy writes the HCL.
"""

from __future__ import annotations

import base64

from bootkey.config import VaultConfig
from bootkey_core.vault_policy import Rule, hcl


def context_glob(host_id: str) -> tuple[str, bool]:
    """The base64 prefix every context of this host starts with, and whether it is exact."""
    prefix = f"{host_id}/".encode()
    aligned = len(prefix) - len(prefix) % 3
    return base64.b64encode(prefix[:aligned]).decode() + "*", aligned == len(prefix)


def kv_paths(vault: VaultConfig, host_id: str) -> tuple[str, str]:
    """(data path glob, metadata path glob) for this host's volume keys."""
    kv = vault.kv
    base = f"{kv.prefix}/{host_id}/*" if kv.prefix else f"{host_id}/*"
    if kv.version == 2:
        return f"{kv.mount}/data/{base}", f"{kv.mount}/metadata/{base}"
    return f"{kv.mount}/{base}", ""


def boot_rules(vault: VaultConfig, host_id: str) -> list[Rule]:
    data, meta = kv_paths(vault, host_id)
    glob, exact = context_glob(host_id)
    t = vault.transit
    note = "" if exact else (
        f"note: host_id {host_id!r} plus '/' is not a multiple of 3 bytes long, so the\n"
        "context glob below also matches host_ids that share its first bytes.")
    rules = [Rule(data, ("read",)),
             Rule(f"{t.mount}/decrypt/{t.key}", ("update",),
                  {"ciphertext": [], "context": [glob]}, comment=note)]
    if meta:
        rules.append(Rule(meta, ("read", "list")))
    return rules


def boot_policy(vault: VaultConfig, host_id: str) -> str:
    return hcl(boot_rules(vault, host_id),
               f"bootkey boot policy for host {host_id}: read own sealed keys, unseal them.")


def enroll_rules(vault: VaultConfig, host_id: str) -> list[Rule]:
    data, meta = kv_paths(vault, host_id)
    t = vault.transit
    glob, _ = context_glob(host_id)
    # KV v1 lists on the data path (v2 on metadata, below): `enroll --format` resumes by
    # finding its pending entry among the host's entries.
    caps = ("create", "read", "update", "delete") + (() if meta else ("list",))
    rules = [Rule(data, caps)]
    if meta:
        rules.append(Rule(meta, ("read", "list", "update", "delete")))
        rules.append(Rule(meta.replace("/metadata/", "/destroy/", 1), ("update",)))
    for verb in ("encrypt", "decrypt", "rewrap"):
        value = "plaintext" if verb == "encrypt" else "ciphertext"
        rules.append(Rule(f"{t.mount}/{verb}/{t.key}", ("update",),
                          {value: [], "context": [glob]}))
    rules.append(Rule(f"{t.mount}/keys/{t.key}", ("read",)))
    return rules


def enroll_policy(vault: VaultConfig, host_id: str) -> str:
    return hcl(enroll_rules(vault, host_id), f"bootkey enrollment policy for host {host_id}: "
               "create, verify, rotate, retire.")
