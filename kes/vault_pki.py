"""The KES server certificate from Vault's PKI engine, through the one Vault session.

Invariant: the private key Vault generates arrives in the answer to
`<mount>/issue/<role>` and goes straight into a `TLSConfig` (memory only): it is never
written anywhere. Logging in, re-login, fail-over and error classification are the
session's (bootkey_core.vault); this module only says what a refusal means for KES.
"""

from __future__ import annotations

from dataclasses import dataclass

from bootkey_core.errors import ConfigError, VaultBadAnswer, VaultDenied, VaultError
from bootkey_core.vault import VaultRejected, VaultSession
from kes.tls_context import TLSConfig


@dataclass(frozen=True, slots=True)
class VaultPKI:
    """Issues the KES server certificate at start and on renewal (a `CertSource`)."""

    session: VaultSession
    role: str
    common_name: str
    mount: str = "pki"
    ip_sans: tuple[str, ...] = ("127.0.0.1",)
    alt_names: tuple[str, ...] = ("localhost",)
    ttl: str = "720h"
    client_ca_pem: bytes | None = None
    verify_client: bool = False
    # a renewal runs while the server serves: one pass over the addresses, no waiting
    deadline: float = 0.0

    def issue(self) -> TLSConfig:
        params: dict[str, str] = {"common_name": self.common_name, "ttl": self.ttl,
                                  "format": "pem", "private_key_format": "pkcs8"}
        if self.ip_sans:
            params["ip_sans"] = ",".join(self.ip_sans)
        if self.alt_names:
            params["alt_names"] = ",".join(self.alt_names)
        path = f"{self.mount}/issue/{self.role}"
        where = f"Vault PKI {path}"
        try:
            answer = self.session.request("POST", path, what="issue the KES certificate",
                                          json=params, deadline=self.deadline)
            data = answer["data"]
            chain = [data["certificate"], *(data.get("ca_chain") or [])]
            key = data["private_key"]
        except VaultDenied:
            raise VaultDenied(
                f"{where}: cannot issue the KES certificate: permission denied"
                f" — grant the token 'update' on {path}"
            ) from None
        except VaultRejected as exc:
            # Vault's message names the SAN or TTL the role refuses; it holds no secret.
            raise ConfigError(
                f"{where}: cannot issue the KES certificate: {'; '.join(exc.errors)}"
                " — allow these names and TTL in the role"
            ) from None
        except (KeyError, TypeError):
            raise VaultBadAnswer(
                f"{where}: cannot issue the KES certificate: no certificate in the answer"
                " — check that the mount is a PKI engine"
            ) from None
        except VaultError as exc:
            raise type(exc)(f"{where}: cannot issue the KES certificate: {exc}") from None
        cert_pem = "\n".join(c.strip() for c in chain).encode() + b"\n"
        return TLSConfig(cert_pem, key.encode(), self.client_ca_pem, self.verify_client)
