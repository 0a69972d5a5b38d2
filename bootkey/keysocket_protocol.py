"""The crypttab key socket's protocol, without I/O: who is asking, and do they get a key.

systemd-cryptsetup binds its client socket to the abstract name
`\\0<64-bit random hex>/cryptsetup/<volume>` before it connects (systemd
src/basic/fileio.c); `parse_peer_address` reads that name and `decide` turns it and the
peer's SO_PEERCRED into `SendKey` or `Decline`. bootkey/keysocket.py moves the bytes.

Invariant: only a root peer asking in the `cryptsetup` phase for a volume the agent
manages gets `SendKey`; everything else is a `Decline` with a reason for the journal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The infix systemd-cryptsetup uses when it wants the key itself. Other infixes
# (cryptsetup-tpm2, cryptsetup-fido2-salt, cryptsetup-pkcs11) ask for an *encrypted blob*
# for a token; bootkey has none to give and declines them.
KEY_PHASE = "cryptsetup"


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class KeyRequest:
    """What a client's abstract address asks for: `phase` is the infix, e.g. cryptsetup."""

    phase: str
    volume: str


@dataclass(frozen=True)
class SendKey:
    volume: str


@dataclass(frozen=True)
class Decline:
    reason: str
    volume: str | None = None


Decision = SendKey | Decline


def parse_peer_address(address: str | bytes) -> KeyRequest | None:
    """systemd-cryptsetup's client address → what it asks for, or None if it is not one.

    >>> parse_peer_address(b"\\0d7067f78d9827418/cryptsetup/data")
    KeyRequest(phase='cryptsetup', volume='data')
    >>> parse_peer_address("") is None   # unbound client: not systemd
    True
    """
    # Python returns abstract names as bytes (leading NUL) and path names as str.
    if not isinstance(address, bytes) or not address.startswith(b"\0"):
        return None
    try:
        text = address[1:].decode("utf-8")
    except UnicodeDecodeError:
        return None
    parts = text.split("/", 2)
    if len(parts) != 3:
        return None
    nonce, phase, volume = parts
    if not nonce or not phase or not volume or "/" in volume or "\0" in volume:
        return None
    return KeyRequest(phase=phase, volume=volume)


def decide(peer: PeerCred, address: str | bytes, is_managed: Callable[[str], bool]) -> Decision:
    """Whether this peer gets a key. Pure: no I/O beyond what `is_managed` does.

    >>> decide(PeerCred(1, 0, 0), b"\\0ab/cryptsetup/data", lambda v: v == "data")
    SendKey(volume='data')
    >>> decide(PeerCred(1, 1000, 1000), b"\\0ab/cryptsetup/data", lambda v: True).reason
    'peer uid 1000 is not root'
    """
    req = parse_peer_address(address)
    volume = req.volume if req else None
    if peer.uid != 0:
        return Decline(f"peer uid {peer.uid} is not root", volume)
    if req is None:
        return Decline("client address is not systemd-cryptsetup's \\0<random>/cryptsetup/<volume>")
    if req.phase != KEY_PHASE:
        return Decline(f"phase {req.phase!r} asks for a token blob, bootkey serves keys only",
                       volume)
    if not is_managed(req.volume):
        return Decline("volume is not managed by bootkey", volume)
    return SendKey(req.volume)
