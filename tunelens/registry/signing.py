"""The secret that makes tunelens's statements its own: HMAC-SHA256 over a canonical JSON payload.

A verdict or a break-glass record on a version is a tag anyone with MLflow write access can type;
only a holder of this key can make its signature. The evaluator, `tunelens promote`, the hook
workers and the registry store inside the MLflow server read the same key.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from tunelens.errors import TunelensError

KEY_ENV = "TUNELENS_VERDICT_KEY"


def verdict_key(key_file: str | os.PathLike) -> bytes:
    """$TUNELENS_VERDICT_KEY, else the key in `key_file` (promotion.verdict_key_file), created
    with a fresh random secret (mode 0600) when it does not exist yet."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    path = Path(key_file).expanduser()
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL: two processes creating it at once keep the first one's key.
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
                out.write(secrets.token_hex(32))
        key = path.read_text().strip()
    except FileExistsError:
        key = path.read_text().strip()
    except OSError as exc:
        raise TunelensError(f"cannot read or create the verdict key {path}: {exc.strerror}; set "
                            f"${KEY_ENV} or promotion.verdict_key_file") from None
    if not key:
        raise TunelensError(f"the verdict key file {path} is empty: delete it (a new key is made) "
                            f"or set ${KEY_ENV}")
    return key.encode()


def canonical(fields: dict) -> bytes:
    """The bytes a signature covers: the fields as JSON with sorted keys and no spaces."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(key: bytes, fields: dict) -> str:
    """base64(HMAC-SHA256(key, canonical(fields)))."""
    return base64.b64encode(hmac.new(key, canonical(fields), hashlib.sha256).digest()).decode()


def verify(key: bytes, fields: dict, signature: str) -> bool:
    """Whether `signature` is sign(key, fields), compared in constant time."""
    return hmac.compare_digest(sign(key, fields).encode(), str(signature).encode())


def digest(text: str) -> str:
    """sha256 hex of `text` (a verdict's reasons, recorded by digest in the signed statement)."""
    return hashlib.sha256(text.encode()).hexdigest()
