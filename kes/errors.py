"""KES API errors: exact status codes and texts (shared/kes-api.md §1.5, §2).

MinIO compares a KES error by *value* — status and message must both match byte for byte —
so every error a client can see is a module-level constant here and tests compare them
literally. Anything that is not a `KesError` is an internal failure: it is logged and the
client gets the route's fixed text instead (never Vault's or Python's words).
"""

from __future__ import annotations

import json


def forget_raise(e: BaseException) -> None:
    """Drop what raising attached to `e`: the errors below are shared constants, and each
    raise of one adds its frames (holding the request and its body) to the same
    `__traceback__`, so without this every error answer would stay in memory for good."""
    e.__traceback__ = None
    e.__context__ = None
    e.__cause__ = None


class KesError(Exception):
    """An error the client sees as `status` + `{"message": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> bytes:
        # KES writes the JSON-encoded message and a newline before the closing brace.
        return b'{"message":' + json.dumps(self.message).encode() + b"\n}"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, KesError) and other.status == self.status
                and other.message == self.message)

    def __hash__(self) -> int:
        return hash((self.status, self.message))

    def __repr__(self) -> str:
        return f"KesError({self.status}, {self.message!r})"


# kms-go kes/error.go sentinels: MinIO reacts to these exact values.
KEY_NOT_FOUND = KesError(404, "key does not exist")
KEY_EXISTS = KesError(400, "key already exists")
NOT_ALLOWED = KesError(403, "not authorized: insufficient permissions")
DECRYPT = KesError(400, "decryption failed: ciphertext is not authentic")
POLICY_NOT_FOUND = KesError(404, "policy does not exist")
IDENTITY_NOT_FOUND = KesError(404, "identity does not exist")

# Transport/authentication (§2.1, §5.1).
INSECURE = KesError(400, "insecure connection: TLS is required")
NO_CLIENT_CERT = KesError(400, "tls: client certificate is required")
MANY_CLIENT_CERTS = KesError(400, "tls: received more than one client certificate")

# Handler-specific fixed texts.
INVALID_BODY = KesError(400, "invalid request body")
INVALID_IMPORT_BODY = KesError(400, "invalid import key request body")
TOO_MANY_CIPHERTEXTS = KesError(400, "too many ciphertexts")
NO_HMAC = KesError(409, "key does not support HMAC")
VERSION_FAILED = KesError(500, "failed to read server version")
GENERATE_KEY_FAILED = KesError(500, "failed to generate encryption key")
ENCRYPT_FAILED = KesError(500, "failed to encrypt plaintext")
DECRYPT_FAILED = KesError(500, "failed to decrypt ciphertext")
CREATE_FAILED_500 = KesError(500, "failed to create key")
CREATE_FAILED = KesError(502, "failed to create key")
READ_FAILED = KesError(502, "failed to read key")
DELETE_FAILED = KesError(502, "failed to delete key")
LIST_FAILED = KesError(502, "failed to list keys")
NOT_READY = KesError(504, "key store is not reachable")
UNAVAILABLE = KesError(502, "key store is unavailable")
NOT_FOUND_TEXT = b"404 page not found\n"  # Go ServeMux, text/plain


def invalid_key_name(name: str) -> KesError:
    return KesError(400, f"key name '{name}' is empty, too long or contains invalid characters")


def invalid_policy_name(name: str) -> KesError:
    return KesError(400, f"policy name '{name}' is empty, too long or contains invalid characters")


def invalid_identity(name: str) -> KesError:
    return KesError(400, f"identity '{name}' is empty, too long or contains invalid characters")


def invalid_pattern(pattern: str) -> KesError:
    return KesError(400, f"listing pattern '{pattern}' is empty, too long or is invalid")


def method_not_allowed(got: str, want: str) -> KesError:
    return KesError(405, f"received method '{got}' expected '{want}'")


def algorithm_not_supported(cipher: str) -> KesError:
    return KesError(406, f"algorithm '{cipher}' is not supported")


def invalid_key_size(cipher: str) -> KesError:
    return KesError(406, f"invalid key size for '{cipher}'")
