"""Who may call the service: ``serve.auth: token`` (a bearer token) or ``serve.auth: iap``.

Behind Google's Identity-Aware Proxy every request that reaches the backend carries
``x-goog-iap-jwt-assertion``: a JWT signed by IAP (ES256) for one backend service. We verify it
with google-auth (signature against IAP's public keys, ``iat``/``exp``), then its issuer and
audience, so a caller inside the cluster that goes around the load balancer is refused too.

IAP's keys are fetched from ``serve.iap.certs_url`` (a JWK set, or a kid -> PEM mapping) and
reused for ``serve.iap.keys_ttl_s``; a token naming a key we have not seen refetches them (at most
once a minute, for a key rotation), and a failed fetch keeps the keys we have. Every refusal is a
401 saying why; only "no keys at all" is a 503 (our problem, not the caller's).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.request
from typing import Mapping

from engine.config import ServeConfig
from serve.errors import ApiError

IAP_HEADER = "x-goog-iap-jwt-assertion"
IAP_ISSUER = "https://cloud.google.com/iap"
IAP_ALGORITHM = "ES256"
MAX_ASSERTION_BYTES = 8192  # IAP's are under 1 KB; anything this long is not one (and is not parsed)
MAX_KEYS_BYTES = 1 << 20
REFETCH_UNKNOWN_KID_S = 60.0
RETRY_S = 5.0
FETCH_TIMEOUT_S = 5.0
log = logging.getLogger("lookalike.serve")


class Refused(Exception):
    """A request that may not pass; ``status`` 401 (the caller's) or 503 (no keys to check with)."""

    def __init__(self, reason: str, status: int = 401):
        super().__init__(reason)
        self.reason, self.status = reason, status


def _b64url_int(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


def jwk_to_pem(jwk: Mapping) -> str | None:
    """An EC P-256 JWK as a PEM public key (what google-auth's ES256 verifier reads); None otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" or jwk.get("alg", IAP_ALGORITHM) != IAP_ALGORITHM:
        return None
    key = ec.EllipticCurvePublicNumbers(_b64url_int(jwk["x"]), _b64url_int(jwk["y"]), ec.SECP256R1()).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def parse_keys(body: bytes) -> dict[str, str]:
    """kid -> PEM from either of IAP's formats: ``public_key-jwk`` ({"keys": [...]}) or ``public_key``."""
    data = json.loads(body)
    if isinstance(data, dict) and isinstance(data.get("keys"), list):
        out = {}
        for jwk in data["keys"]:
            pem = jwk_to_pem(jwk) if isinstance(jwk, dict) and jwk.get("kid") else None
            if pem:
                out[str(jwk["kid"])] = pem
        return out
    if isinstance(data, dict) and all(isinstance(v, str) and "-----BEGIN" in v for v in data.values()):
        return {str(k): v for k, v in data.items()}
    raise ValueError("neither a JWK set nor a kid -> PEM mapping")


class KeySet:
    """IAP's public keys, fetched on demand and cached for ``ttl_s``."""

    def __init__(self, url: str, ttl_s: float):
        self.url, self.ttl_s = url, ttl_s
        self.keys: dict[str, str] = {}
        self.fetched_at = -float("inf")  # monotonic time of the last successful fetch
        self.tried_at = -float("inf")
        self.fetches = 0
        self._lock = threading.Lock()

    def _fetch(self) -> None:
        self.tried_at = time.monotonic()
        try:
            with urllib.request.urlopen(self.url, timeout=FETCH_TIMEOUT_S) as resp:
                body = resp.read(MAX_KEYS_BYTES + 1)
            if len(body) > MAX_KEYS_BYTES:
                raise ValueError(f"over {MAX_KEYS_BYTES} bytes")
            keys = parse_keys(body)
            if not keys:
                raise ValueError("no ES256 keys in it")
        except Exception as exc:  # noqa: BLE001 - keep the keys we have; say why once per try
            log.warning("IAP keys from %s not fetched (%s: %s); %s", self.url, type(exc).__name__, exc,
                        f"keeping {len(self.keys)} cached" if self.keys else "no keys yet")
            return
        self.keys, self.fetched_at = keys, time.monotonic()
        self.fetches += 1

    def get(self, kid: str) -> str | None:
        """The PEM of ``kid``: from the cache while fresh; refetched when stale or when ``kid`` is
        unknown (a rotation; at most once a minute), a failing server at most every RETRY_S."""
        now = time.monotonic()
        want = now - self.fetched_at >= self.ttl_s or \
            (kid not in self.keys and now - self.tried_at >= REFETCH_UNKNOWN_KID_S)
        if want and now - self.tried_at >= RETRY_S:
            with self._lock:
                if self.tried_at < now:  # nobody fetched while we waited for the lock
                    self._fetch()
        if not self.keys:
            raise Refused(f"IAP's public keys could not be fetched from {self.url}; retry shortly", 503)
        return self.keys.get(kid)


def _unverified(token: str) -> tuple[dict, dict]:
    """(header, claims) of a compact JWT, or Refused: nothing here is trusted yet."""
    from google.auth import jwt

    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise Refused("IAP assertion is not a JWT (three base64url parts)")
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        claims = jwt.decode(token, verify=False)
    except Exception:  # noqa: BLE001 - any undecodable header or payload is the same refusal
        raise Refused("IAP assertion is not a JWT (undecodable header or payload)") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise Refused("IAP assertion is not a JWT (header or payload is not an object)")
    return header, claims


def _number(claims: dict, name: str) -> float | None:
    value = claims.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class IapVerifier:
    """Checks one ``x-goog-iap-jwt-assertion``: signature (google-auth), time, issuer, audience."""

    def __init__(self, audience: str, certs_url: str, keys_ttl_s: float = 3600.0, clock_skew_s: float = 30.0):
        self.audience, self.clock_skew_s = audience, clock_skew_s
        self.keys = KeySet(certs_url, keys_ttl_s)

    def verify(self, token: str | None) -> dict:
        """The verified claims (``email``, ``sub``, ...), or Refused with the reason."""
        from google.auth import jwt

        if not token:
            raise Refused(f"missing {IAP_HEADER} header: this service is reached through Identity-Aware Proxy")
        if len(token) > MAX_ASSERTION_BYTES:
            raise Refused(f"IAP assertion over {MAX_ASSERTION_BYTES} bytes")
        header, claims = _unverified(token.strip())
        if header.get("alg") != IAP_ALGORITHM:
            raise Refused(f"IAP assertion is not signed with {IAP_ALGORITHM}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Refused("IAP assertion names no signing key (kid)")
        pem = self.keys.get(kid)
        if pem is None:
            raise Refused("IAP assertion is signed by a key IAP does not publish")
        try:
            jwt.decode(token.strip(), certs={kid: pem}, verify=True, audience=None,
                       clock_skew_in_seconds=int(self.clock_skew_s))
        except Exception:  # noqa: BLE001 - google-auth's ValueErrors; say which check failed, in our words
            raise Refused(self._why(claims)) from None
        if claims.get("iss") != IAP_ISSUER:
            raise Refused(f"IAP assertion has issuer {str(claims.get('iss'))[:80]!r}, not {IAP_ISSUER}")
        if claims.get("aud") != self.audience:
            raise Refused("IAP assertion is for another backend (its audience is not serve.iap.audience)")
        return claims

    def _why(self, claims: dict) -> str:
        """Why google-auth refused, from the (unverified) claims: time first, else the signature."""
        now = time.time()
        iat, exp = _number(claims, "iat"), _number(claims, "exp")
        if iat is None or exp is None:
            return "IAP assertion lacks its iat or exp claim"
        if exp + self.clock_skew_s < now:
            return f"IAP assertion expired {now - exp:.0f}s ago"
        if iat - self.clock_skew_s > now:
            return "IAP assertion is issued in the future (check the clock)"
        return "IAP assertion signature does not verify against IAP's public keys"


class Authorizer:
    """The check every endpoint but /healthz runs (SearchAPI._authorize)."""

    def __init__(self, cfg: ServeConfig, token_sha256: str | None = None):
        self.mode, self.token_sha256 = cfg.auth, token_sha256
        self.iap = IapVerifier(cfg.iap.audience, cfg.iap.certs_url, cfg.iap.keys_ttl_s, cfg.iap.clock_skew_s) \
            if cfg.auth == "iap" else None

    @property
    def required(self) -> bool:
        """Whether requests must carry a credential (answers are then private to caches)."""
        return self.iap is not None or bool(self.token_sha256)

    def check(self, headers: Mapping[str, str]) -> dict | None:
        """None (token mode) or the IAP claims; raises ApiError 401 (or 503) when refused."""
        if self.iap is not None:
            try:
                return self.iap.verify(headers.get(IAP_HEADER))
            except Refused as exc:
                raise ApiError(exc.status, exc.reason, headers={"Retry-After": "5"} if exc.status == 503 else None)
        if not self.token_sha256:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not token.strip() or not hmac.compare_digest(digest, self.token_sha256):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": "Bearer"})
        return None
