"""serve.auth: iap against a local key server (keys made here, JWTs signed here; nothing reaches
Google), serve.auth: token as before, and the service itself behind IAP over real HTTP."""
import base64
import http.server
import json
import threading
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.auth import jwt
from google.auth.crypt import es256

from conftest import free_port
from engine import config, demo
from serve import auth
from serve.errors import ApiError

AUDIENCE = "/projects/123456789012/global/backendServices/4242424242424242"


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()


class Key:
    def __init__(self, kid: str):
        self.kid = kid
        self.private = ec.generate_private_key(ec.SECP256R1())
        pem = self.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        self.signer = es256.ES256Signer.from_string(pem, kid)

    def jwk(self) -> dict:
        nums = self.private.public_key().public_numbers()
        return {"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
                "x": _b64(nums.x), "y": _b64(nums.y)}

    def pem(self) -> str:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def sign(self, **over) -> str:
        now = int(time.time())
        claims = {"iss": auth.IAP_ISSUER, "aud": AUDIENCE, "iat": now - 5, "exp": now + 600,
                  "sub": "accounts.google.com:1234", "email": "ml-engineer@example.com", **over}
        return jwt.encode(self.signer, {k: v for k, v in claims.items() if v is not None}).decode()


class KeyServer:
    """IAP's key endpoint on 127.0.0.1: serves ``body`` (a JWK set by default), counts requests."""

    def __init__(self, keys: list[Key]):
        self.body = json.dumps({"keys": [k.jwk() for k in keys]}).encode()
        self.requests, self.down = 0, False
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                if outer.down:
                    self.send_response(500)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *_):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/iap/verify/public_key-jwk"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def keys():
    return Key("iap-key-1"), Key("iap-key-2")


@pytest.fixture
def server(keys):
    s = KeyServer(list(keys))
    yield s
    s.close()


def iap_config(certs_url: str, *more: str):
    return config.load(None, ["source.path=/tmp/c.parquet", "serve.auth=iap", f"serve.iap.audience={AUDIENCE}",
                              f"serve.iap.certs_url={certs_url}", *more])


def refusal(authorizer, headers) -> tuple[int, str]:
    with pytest.raises(ApiError) as info:
        authorizer.check(headers)
    return info.value.status, info.value.message


def test_a_valid_assertion_passes_and_its_claims_come_back(server, keys):
    a = auth.Authorizer(iap_config(server.url).serve)
    claims = a.check({auth.IAP_HEADER: keys[0].sign()})
    assert claims["email"] == "ml-engineer@example.com" and claims["aud"] == AUDIENCE
    assert a.check({auth.IAP_HEADER: keys[1].sign()})["sub"] == "accounts.google.com:1234"  # either published key
    for _ in range(20):
        a.check({auth.IAP_HEADER: keys[0].sign()})
    assert server.requests == 1  # the keys are cached, not fetched per request


def test_each_bad_assertion_is_a_401_that_says_why(server, keys):
    a = auth.Authorizer(iap_config(server.url).serve)
    now = int(time.time())
    stranger = Key("iap-key-1")  # IAP's kid, someone else's private key
    cases = {
        "expired": (keys[0].sign(iat=now - 4000, exp=now - 400), "expired"),
        "future": (keys[0].sign(iat=now + 900, exp=now + 1500), "issued in the future"),
        "audience": (keys[0].sign(aud="/projects/123456789012/global/backendServices/1"), "another backend"),
        "issuer": (keys[0].sign(iss="https://accounts.google.com"), "issuer 'https://accounts.google.com'"),
        "wrong key": (stranger.sign(), "signature does not verify"),
        "no exp": (keys[0].sign(exp=None), "lacks its iat or exp"),
        "garbage": ("not-a-jwt", "not a JWT"),
        "garbage parts": ("a.b.c", "not a JWT"),
        "empty": ("", "missing x-goog-iap-jwt-assertion"),
        "over-long": ("x" * 20_000, "over 8192 bytes"),
    }
    for name, (token, reason) in cases.items():
        status, message = refusal(a, {auth.IAP_HEADER: token})
        assert (status, name) == (401, name) and reason in message, (name, message)
    assert refusal(a, {})[1].startswith("missing x-goog-iap-jwt-assertion")
    assert refusal(a, {"authorization": "Bearer " + keys[0].sign()})[0] == 401  # IAP's header only
    # another algorithm, or none, is refused before any key is looked at
    body = jwt.decode(keys[0].sign(), verify=False)
    for alg in ("none", "HS256", "RS256"):
        head = base64.urlsafe_b64encode(json.dumps({"alg": alg, "kid": "iap-key-1"}).encode()).rstrip(b"=")
        pay = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=")
        assert "not signed with ES256" in refusal(a, {auth.IAP_HEADER: f"{head.decode()}.{pay.decode()}.c2ln"})[1]


def test_an_unknown_key_refetches_once_then_is_refused(server, keys):
    a = auth.Authorizer(iap_config(server.url).serve)
    a.check({auth.IAP_HEADER: keys[0].sign()})
    rotated = Key("iap-key-3")
    server.body = json.dumps({"keys": [keys[0].jwk(), rotated.jwk()]}).encode()
    a.iap.keys.tried_at -= auth.REFETCH_UNKNOWN_KID_S  # a minute later
    assert a.check({auth.IAP_HEADER: rotated.sign()})["email"]  # IAP rotated its keys: picked up
    assert server.requests == 2
    unknown = Key("not-iap")
    a.iap.keys.tried_at -= auth.REFETCH_UNKNOWN_KID_S
    assert "a key IAP does not publish" in refusal(a, {auth.IAP_HEADER: unknown.sign()})[1]
    for _ in range(5):  # a flood of unknown kids does not turn into a flood of fetches
        refusal(a, {auth.IAP_HEADER: unknown.sign()})
    assert server.requests == 3


def test_keys_expire_and_a_failing_key_server_keeps_the_cached_ones(server, keys):
    a = auth.Authorizer(iap_config(server.url, "serve.iap.keys_ttl_s=600").serve)
    a.check({auth.IAP_HEADER: keys[0].sign()})
    a.iap.keys.fetched_at -= 600
    a.iap.keys.tried_at -= 600
    a.check({auth.IAP_HEADER: keys[0].sign()})
    assert server.requests == 2  # stale after keys_ttl_s: fetched again
    server.down = True
    a.iap.keys.fetched_at -= 600
    a.iap.keys.tried_at -= 600
    assert a.check({auth.IAP_HEADER: keys[0].sign()})["email"]
    assert server.requests == 3
    fresh = auth.Authorizer(iap_config(server.url).serve)  # nothing cached and the server down: 503, not 401
    status, message = refusal(fresh, {auth.IAP_HEADER: keys[0].sign()})
    assert status == 503 and "could not be fetched" in message


def test_the_pem_format_of_iap_keys_is_read_too(keys):
    s = KeyServer([])
    s.body = json.dumps({k.kid: k.pem() for k in keys}).encode()  # https://www.gstatic.com/iap/verify/public_key
    try:
        a = auth.Authorizer(iap_config(s.url).serve)
        assert a.check({auth.IAP_HEADER: keys[1].sign()})["email"]
        assert "signature does not verify" in refusal(a, {auth.IAP_HEADER: Key("iap-key-2").sign()})[1]
    finally:
        s.close()


def test_token_mode_is_unchanged():
    import hashlib

    cfg = config.load(None, ["source.path=/tmp/c.parquet", "serve.auth_token_env=T"]).serve
    a = auth.Authorizer(cfg, hashlib.sha256(b"s3cret").hexdigest())
    assert a.check({"authorization": "Bearer s3cret"}) is None
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
        status, message = refusal(a, headers)
        assert status == 401 and "bearer token" in message
    assert auth.Authorizer(config.load(None, ["source.path=/tmp/c.parquet"]).serve).check({}) is None  # no auth


def test_iap_config_is_checked_at_load(tmp_path):
    path = tmp_path / "iap.yaml"
    path.write_text(f"extends: {config.DEFAULT_CONFIG}\nsource: {{path: /tmp/c.parquet}}\nserve: {{auth: iap}}\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert str(path) in str(info.value) and "serve.iap.audience is required" in str(info.value)
    with pytest.raises(config.ConfigError, match="not an IAP audience"):
        config.load(path, ["serve.iap.audience=my-backend"])
    with pytest.raises(config.ConfigError, match="serve.auth_token_env is not used"):
        config.load(path, [f"serve.iap.audience={AUDIENCE}", "serve.auth_token_env=T"])
    with pytest.raises(config.ConfigError, match="Input should be 'token' or 'iap'"):
        config.load(path, ["serve.auth=oauth"])
    cfg = config.load(path, [f"serve.iap.audience={AUDIENCE}", "serve.host=0.0.0.0"])  # iap counts as auth off loopback
    assert cfg.serve.iap.certs_url == "https://www.gstatic.com/iap/verify/public_key-jwk"
    prod = config.load(config.PACKAGE_DIR.parent / "configs" / "prod.yaml")
    assert prod.serve.auth == "iap" and prod.serve.iap.audience.startswith("/projects/")


@pytest.fixture(scope="module")
def iap_service(published, keys):
    from ray import serve

    from serve import app

    server = KeyServer(list(keys))
    cfg, rep = published
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={
        "port": free_port(), "auth": "iap", "iap": config.IapConfig(audience=AUDIENCE, certs_url=server.url)})})
    serve.shutdown()  # another module's Serve instance may hold a different port
    base = app.start(cfg)
    yield base, rep
    serve.shutdown()
    server.close()


def test_the_service_behind_iap(iap_service, keys, sample_catalog):
    import pyarrow.parquet as pq

    base, rep = iap_service
    pid = next(r["product_id"] for r in pq.read_table(sample_catalog).to_pylist()
               if r["product_id"] and r["label"] not in ("broken", "x"))
    status, body = demo.http_json("GET", base + f"/similar/{pid}?k=5", None, {auth.IAP_HEADER: keys[0].sign()})
    assert status == 200 and len(body["results"]) == 5 and body["index_version"] == rep["index_version"]
    status, body = demo.http_json("GET", base + "/version", None, {auth.IAP_HEADER: keys[1].sign()})
    assert status == 200 and body["index_version"] == rep["index_version"]
    status, body = demo.http_json("GET", base + f"/similar/{pid}")
    assert status == 401 and body == {"error": "missing x-goog-iap-jwt-assertion header: this service is reached "
                                               "through Identity-Aware Proxy", "status": 401}
    wrong = keys[0].sign(aud="/projects/123456789012/apps/other")
    assert demo.http_json("GET", base + f"/similar/{pid}", None, {auth.IAP_HEADER: wrong})[0] == 401
    assert demo.http_json("GET", base + "/version", None, {auth.IAP_HEADER: "x" * 10_000})[0] == 401
    assert demo.http_json("GET", base + f"/similar/{pid}", None, {"authorization": "Bearer anything"})[0] == 401
    # the load balancer's health check carries no IAP header: /healthz stays open, and says only status
    assert demo.http_json("GET", base + "/healthz") == (200, {"status": "ok", "index_version": rep["index_version"]})
