"""Helpers for driving kes.api.Api with constructed Requests (the sans-I/O layer)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from kes.api import Api
from kes.messages import Request, Response

ADMIN = "ad" * 32
MINIO = "1f" * 32
OTHER = "0e" * 32


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def call(api: Api, method: str, path: str, body: Any = None, *,
         identity: str | None = ADMIN, raw: bytes | None = None,
         too_large: bool = False) -> Response:
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    req = Request(method=method, path=path, headers={}, body=data, identity=identity,
                  remote="127.0.0.1", body_too_large=too_large)
    return asyncio.run(api(req))


def js(resp: Response) -> Any:
    assert resp.content_type == "application/json", resp
    return json.loads(resp.body)


def err(resp: Response) -> tuple[int, str]:
    assert resp.content_type == "application/json"
    return resp.status, json.loads(resp.body)["message"]
