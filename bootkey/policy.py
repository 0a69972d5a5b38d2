"""The Vault policies a host needs, as HCL text.

Least privilege (DESIGN §3): a booting host may only read its own KV prefix and decrypt
with the transit key under contexts that start with its own host_id. Enrollment may also
create and update entries under that prefix and encrypt/rewrap.

The context restriction uses `allowed_parameters` with a prefix glob on the base64 of the
context. base64 maps each 3 plaintext bytes to 4 characters, so only the longest prefix of
`"<host_id>/"` whose length is a multiple of 3 has a fixed encoding. A systemd machine-id
(32 hex characters) plus "/" is 33 bytes: the glob then pins the exact host. For other
host_ids the glob pins the first 3k bytes; `boot_policy` says so in a comment.
"""

from __future__ import annotations

import base64

from bootkey.config import VaultConfig


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


def boot_policy(vault: VaultConfig, host_id: str) -> str:
    data, meta = kv_paths(vault, host_id)
    glob, exact = context_glob(host_id)
    t = vault.transit
    note = "" if exact else (
        f"# note: host_id {host_id!r} plus '/' is not a multiple of 3 bytes long, so the\n"
        "# context glob below also matches host_ids that share its first bytes.\n"
    )
    return (
        f"# bootkey boot policy for host {host_id}: read own sealed keys, unseal them.\n"
        f'path "{data}" {{\n  capabilities = ["read"]\n}}\n\n'
        f"{note}"
        f'path "{t.mount}/decrypt/{t.key}" {{\n'
        f'  capabilities = ["update"]\n'
        f'  allowed_parameters = {{\n'
        f'    "ciphertext" = []\n'
        f'    "context" = ["{glob}"]\n'
        f"  }}\n}}\n"
        + (f'\npath "{meta}" {{\n  capabilities = ["read", "list"]\n}}\n' if meta else "")
    )


def enroll_policy(vault: VaultConfig, host_id: str) -> str:
    data, meta = kv_paths(vault, host_id)
    t = vault.transit
    glob, _ = context_glob(host_id)
    # KV v1 lists on the data path (v2 on metadata, below): `enroll --format` resumes by
    # finding its pending entry among the host's entries.
    caps = '"create", "read", "update", "delete"' + ("" if meta else ', "list"')
    out = (
        f"# bootkey enrollment policy for host {host_id}: create, verify, rotate, retire.\n"
        f'path "{data}" {{\n  capabilities = [{caps}]\n}}\n\n'
    )
    if meta:
        out += f'path "{meta}" {{\n  capabilities = ["read", "list", "update", "delete"]\n}}\n\n'
        destroy = meta.replace("/metadata/", "/destroy/", 1)
        out += f'path "{destroy}" {{\n  capabilities = ["update"]\n}}\n\n'
    for verb in ("encrypt", "decrypt", "rewrap"):
        out += (
            f'path "{t.mount}/{verb}/{t.key}" {{\n'
            f'  capabilities = ["update"]\n'
            f'  allowed_parameters = {{\n'
            f'    "{"plaintext" if verb == "encrypt" else "ciphertext"}" = []\n'
            f'    "context" = ["{glob}"]\n'
            f"  }}\n}}\n\n"
        )
    out += f'path "{t.mount}/keys/{t.key}" {{\n  capabilities = ["read"]\n}}\n'
    return out
