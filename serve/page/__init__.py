"""The search page: static HTML, CSS and JavaScript shipped in the package (no build step, no
CDN, nothing fetched from the network); the ingress answers ``GET /`` and ``GET /page/<file>``."""
import hashlib
from importlib import resources

from fastapi.responses import Response

from serve.errors import ApiError

TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
FILES = ("index.html", "page.css", "page.js")
# A page that cannot run scripts from elsewhere, frame others or be framed; images: ours and blob: (previews).
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
          "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
_cache: dict[str, tuple[bytes, str]] = {}


def _load(name: str) -> tuple[bytes, str]:
    if name not in _cache:
        data = resources.files(__name__).joinpath(name).read_bytes()
        _cache[name] = (data, '"' + hashlib.sha256(data).hexdigest()[:20] + '"')
    return _cache[name]


def response(name: str) -> Response:
    if name not in FILES:
        raise ApiError(404, f"no page file {name!r}")
    data, etag = _load(name)
    ext = name[name.rfind("."):]
    return Response(data, media_type=TYPES[ext], headers={
        "ETag": etag, "Cache-Control": "no-cache", "Content-Security-Policy": POLICY,
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})
