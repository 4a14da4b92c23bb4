"""The upload reader: a request body read as a stream, never past ``limit`` bytes, whatever its framing.

Content-Length, chunked transfer encoding and multipart are all read through the same counter:
the request gets a 413 the moment the cap is passed, with nothing buffered beyond it. A multipart
body may carry ``MULTIPART_SLACK`` bytes of boundaries and part headers on top of the image.
"""
from fastapi import Request
from starlette.requests import Request as StarletteRequest

from serve.errors import ApiError

MULTIPART_SLACK = 16 * 1024


async def read_capped(request: Request, limit: int) -> bytes:
    """The raw body, or a 413 as soon as it passes ``limit`` bytes (a declared length is refused unread)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"upload passed the limit of {limit} bytes")
    return bytes(body)


async def _form_image(body: bytes, request: Request) -> bytes:
    """The 'image' part of an already bounded multipart body."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replay = StarletteRequest(request.scope, receive)
    try:
        form = await replay.form(max_files=1, max_fields=8)
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several types for broken bodies
        raise ApiError(422, f"not a readable multipart body ({type(exc).__name__})") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ApiError(422, "multipart body needs a file field named 'image'")
    data = await upload.read()
    await form.close()
    return data


async def read_image(request: Request, limit: int) -> bytes:
    """The uploaded image's bytes: the raw body, or multipart field ``image``; at most ``limit`` bytes."""
    multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
    body = await read_capped(request, limit + MULTIPART_SLACK if multipart else limit)
    data = await _form_image(body, request) if multipart else body
    if len(data) > limit:
        raise ApiError(413, f"upload is {len(data)} bytes; the limit is {limit}")
    if not data:
        raise ApiError(422, "empty body: send an image as raw bytes or as multipart field 'image'")
    return data
