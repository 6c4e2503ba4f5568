"""API keys and per-key rate limits.

The keys file holds a sha256 of each key, never the key: `tunelab keys add FILE ID` prints a new key once
and stores its hash. A plain (unsalted, fast) hash is enough here because the keys are 256-bit random
strings, not passwords: nobody can guess one from its hash, so the slow, salted hashes passwords need buy
nothing. Requests are matched by hash with a constant-time comparison, and everything the server logs or
counts names a key by its id.

    {"schema": 1, "keys": [{"id": "alice", "sha256": "...", "admin": false, "rate_limit": "60/min"}]}

rate_limit is optional per key; the server's --rate-limit applies to keys without one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

KEY_PREFIX = "tl-"
ANONYMOUS = "anonymous"  # the key_id of every request when the server runs without --api-keys
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_rate(text: str, where: str = "--rate-limit") -> float:
    """'60/min' -> requests per second (1.0)."""
    match = _RATE.match(text or "")
    if not match or float(match.group(1)) <= 0:
        raise TunelabError(f"{where}: '{text}' is not a rate; write it as N/s, N/min or N/hour (e.g. 60/min)")
    return float(match.group(1)) / _PER[match.group(2)]


@dataclass(frozen=True)
class ApiKey:
    id: str
    sha256: str
    admin: bool = False
    rate_per_s: float | None = None  # None: the server's --rate-limit


class KeyStore:
    def __init__(self, keys: list[ApiKey]):
        self.keys = keys

    @classmethod
    def load(cls, path: str | Path) -> KeyStore:
        path = Path(path)
        if not path.is_file():
            raise TunelabError(f"{path}: API keys file not found (create one with `tunelab keys add {path} NAME`)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TunelabError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
            raise TunelabError(f"{path}: expected {{\"schema\": 1, \"keys\": [...]}}")
        keys, seen = [], set()
        for i, entry in enumerate(raw["keys"]):
            where = f"{path}: keys[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                raise TunelabError(f"{where}: needs an 'id'")
            digest = entry.get("sha256")
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise TunelabError(f"{where} ({entry['id']}): 'sha256' must be 64 hex digits (the hash, never the key)")
            if entry["id"] in seen:
                raise TunelabError(f"{where}: id '{entry['id']}' appears twice")
            seen.add(entry["id"])
            rate = parse_rate(entry["rate_limit"], f"{where}.rate_limit") if entry.get("rate_limit") else None
            keys.append(ApiKey(entry["id"], digest, bool(entry.get("admin", False)), rate))
        return cls(keys)

    def find(self, presented: str) -> ApiKey | None:
        digest = hash_key(presented)
        found = None
        for key in self.keys:  # compare against every key, so the time taken says nothing about which matched
            if hmac.compare_digest(key.sha256, digest):
                found = key
        return found


def add_key(path: str | Path, key_id: str, admin: bool = False, rate_limit: str | None = None) -> str:
    """Create a key, store its hash in the file (created if missing), and return the key itself."""
    from tunelab.runtime.atomic import atomic_write_json

    path = Path(path)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", key_id):
        raise TunelabError(f"key id '{key_id}': use letters, digits, '.', '_' or '-' (it appears in logs and metrics)")
    if rate_limit:
        parse_rate(rate_limit)
    raw = {"schema": 1, "keys": []}
    if path.is_file():
        KeyStore.load(path)  # refuse to extend a malformed file
        raw = json.loads(path.read_text(encoding="utf-8"))
    if any(entry["id"] == key_id for entry in raw["keys"]):
        raise TunelabError(f"{path}: key id '{key_id}' exists already")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = {"id": key_id, "sha256": hash_key(key), "admin": admin}
    if rate_limit:
        entry["rate_limit"] = rate_limit
    raw["keys"].append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, raw)
    return key


class TokenBuckets:
    """One token bucket per key id: `rate` requests per second on average, bursts of up to one minute's
    worth (at least 1). take() -> 0 when allowed, else the seconds until a token is back (Retry-After)."""

    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last refill time)
        self._lock = threading.Lock()

    def take(self, key_id: str, rate: float) -> float:
        capacity = max(1.0, rate * 60)
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / rate


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
