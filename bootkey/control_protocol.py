"""The agent's control socket protocol: one JSON object per line each way.

    → {"command": "status"}
    ← {"ok": true, "status": {...}}
    → {"command": "nosuch"}
    ← {"ok": false, "error": "control: unknown command 'nosuch' — use one of: ping, status"}

Invariants:
- Only a root peer (SO_PEERCRED uid 0) gets anything but a refusal.
- Nothing secret ever crosses: commands return facts (names, states, counts, TTLs),
  never a key, a token or a secret_id; the status builders only read such facts.
- A line longer than MAX_LINE is refused without being parsed.

Sans-I/O: `answer(line, peer_uid, commands)` → the reply line; the server in
`bootkey.control` only moves bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

# A request is a command name and nothing else today; 4 KiB leaves room for arguments
# without letting a client make the agent buffer much.
MAX_LINE = 4096

Command = Callable[[], dict[str, Any]]


def _reply(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode() + b"\n"


def refuse(error: str) -> bytes:
    return _reply({"ok": False, "error": error})


def answer(line: bytes, peer_uid: int, commands: Mapping[str, Command]) -> bytes:
    """The reply to one request line (without its newline) from a peer with `peer_uid`.

    >>> answer(b'{"command": "ping"}', 0, {"ping": lambda: {}})
    b'{"ok":true}\\n'
    >>> answer(b'{"command": "ping"}', 1000, {"ping": lambda: {}})
    b'{"ok":false,"error":"control: permission denied: peer uid 1000 is not root"}\\n'
    """
    if peer_uid != 0:
        return refuse(f"control: permission denied: peer uid {peer_uid} is not root")
    if len(line) > MAX_LINE:
        return refuse(f"control: request longer than {MAX_LINE} bytes")
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return refuse('control: not a JSON object — send e.g. {"command": "status"}')
    name = req.get("command") if isinstance(req, dict) else None
    if not isinstance(name, str):
        return refuse('control: no "command" — send e.g. {"command": "status"}')
    fn = commands.get(name)
    if fn is None:
        return refuse(f"control: unknown command {name!r} — use one of: "
                      f"{', '.join(sorted(commands))}")
    return _reply({"ok": True, **fn()})


def request(command: str) -> bytes:
    """The request line a client sends."""
    return _reply({"command": command})


def parse_reply(line: bytes) -> dict[str, Any]:
    """A reply line → its object; ValueError if it is not one of ours."""
    obj = json.loads(line)
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise ValueError("not a control reply")
    return obj
