"""A local HTTP image server that injects faults and records when every request arrived.

It runs as its own process, like a real server (its CPU and GIL are not the client's), bound to
127.0.0.1 on a free port, logging to a file, in a session of its own. It is a measuring
instrument: on a busy machine a stalled server lets requests queue up in the kernel and then
logs them as one burst the client never sent (measured here: p99 arrival-to-log delay 45 ms at
normal priority, 3.5 ms at real-time priority). So it asks for real-time priority (SCHED_RR,
low level; it is idle almost all the time) and falls back to nice -10, then to normal;
``ImageServer.priority`` says which it got. Tests and benchmarks drive it over a small control
API through ``ImageServer``::

    with ImageServer() as srv:
        srv.body("shoe.jpg", jpeg_bytes)                         # served at srv.url("/b/shoe.jpg")
        url = srv.route("/flaky.jpg", {"status": 503, "retry_after": 1}, {"body": "shoe.jpg"})
        ...
        srv.requests()   # [{"t": <epoch s>, "path": "/flaky.jpg", "step": 0, "inflight": 1, "user_agent": ...}, ...]

A route is a list of steps; each request to the path takes the next step, the last one repeats.
A route for a bare path also answers that path with any query string (one shared sequence).
Step keys (all optional):
  status         HTTP status (default 200)
  body / text    a stored body by name / a literal text body
  content_type   default image/jpeg for bodies, text/html for text
  headers        extra response headers; retry_after sets Retry-After, location sets Location
  delay          seconds to wait before answering (slow response, or a timeout when long)
  reset          close the connection with a TCP reset instead of answering
  truncate       declare the full Content-Length, send only this many bytes, then reset
  drip           send the body 512 bytes at a time, this many seconds apart
  chunked        no Content-Length (chunked transfer encoding)
  gzip           Content-Encoding: gzip
  until          epoch seconds: the step applies until then, without being used up
``/b/<name>`` serves a stored body (preloaded from ``directory`` or PUT) with 200.

``samples()`` makes the awkward bodies the issue asks for: CMYK and 16-bit images, an EXIF-rotated
JPEG, a truncated JPEG, HTML, zero bytes, a decompression bomb, an oversized body.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

HERE = Path(__file__).resolve()


# --- the server process -----------------------------------------------------------------------

class _State:
    def __init__(self):
        self.bodies: dict[str, bytes] = {}
        self.routes: dict[str, list[dict]] = {}
        self.position: dict[str, int] = {}
        self.log: list[dict] = []
        self.inflight = 0
        self.priority = "normal"


def _abort(request) -> None:
    """Close with RST (SO_LINGER 0), the way a crashed or overloaded server drops a connection."""
    sock = request.transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    request.transport.abort()


def _make_app(state: _State):
    from aiohttp import web

    async def control(request: web.Request):
        what = request.match_info["what"]
        if what == "health":
            return web.json_response({"ok": True, "priority": state.priority})
        if what == "log":
            return web.json_response(state.log)
        if what == "reset":
            state.log.clear()
            state.position.clear()
            return web.json_response({"ok": True})
        if what == "route":
            spec = await request.json()
            state.routes[spec["path"]] = spec["steps"]
            state.position.pop(spec["path"], None)
            return web.json_response({"ok": True})
        if what.startswith("body/"):
            state.bodies[what[5:]] = await request.read()
            return web.json_response({"ok": True})
        raise web.HTTPNotFound()

    def next_step(path: str) -> tuple[int, dict]:
        steps = state.routes[path]
        i = state.position.get(path, 0)
        while i < len(steps) - 1 and "until" in steps[i] and time.time() >= steps[i]["until"]:
            i += 1
        step = steps[min(i, len(steps) - 1)]
        if "until" not in step:
            state.position[path] = min(i + 1, len(steps) - 1)
        else:
            state.position[path] = i
        return i, step

    async def serve(request: web.Request):
        t = time.time()
        path = request.path_qs
        state.inflight += 1
        try:
            if request.path.startswith("/b/") and request.path[3:] in state.bodies:
                i, step = -1, {"body": request.path[3:]}
            elif path in state.routes or request.path in state.routes:
                i, step = next_step(path if path in state.routes else request.path)
            else:
                i, step = -1, {"status": 404, "text": "no such route"}
            state.log.append({"t": t, "path": path, "step": i, "inflight": state.inflight,
                              "user_agent": request.headers.get("User-Agent")})
            return await answer(request, step)
        finally:
            state.inflight -= 1

    async def answer(request, step: dict):
        if step.get("delay"):
            await asyncio.sleep(step["delay"])
        if step.get("reset"):
            _abort(request)
            return web.Response(status=500)  # never reaches the client
        body = state.bodies[step["body"]] if "body" in step else step.get("text", "").encode()
        ctype = step.get("content_type") or ("text/html" if "text" in step else "image/jpeg")
        headers = {"Content-Type": ctype, **step.get("headers", {})}
        if "retry_after" in step:
            headers["Retry-After"] = str(step["retry_after"])
        if "location" in step:
            headers["Location"] = step["location"]
        if step.get("gzip"):
            body = gzip.compress(body, compresslevel=9)
            headers["Content-Encoding"] = "gzip"
        status = step.get("status", 200)
        if not any(step.get(k) for k in ("truncate", "drip", "chunked")):
            return web.Response(status=status, body=body, headers=headers)
        resp = web.StreamResponse(status=status, headers=headers)
        if not step.get("chunked"):
            resp.content_length = len(body)
        await resp.prepare(request)
        if step.get("truncate"):
            await resp.write(body[: step["truncate"]])
            await asyncio.sleep(0.05)
            _abort(request)
            return resp
        chunk = 512 if step.get("drip") else 1 << 16
        for k in range(0, len(body), chunk):
            await resp.write(body[k:k + chunk])
            if step.get("drip"):
                await asyncio.sleep(step["drip"])
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/_ctl/{what:.*}", control)
    app.router.add_route("*", "/{tail:.*}", serve)
    return app


def _raise_priority() -> str:
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(10))
        return "realtime"
    except (OSError, AttributeError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
        return "nice -10"
    except OSError:
        return "normal"  # timestamps are then only as good as the scheduler


def _serve_forever(port_file: str, directory: str | None, priority: bool) -> None:
    from aiohttp import web

    state = _State()
    state.priority = _raise_priority() if priority else "normal"
    if directory:
        for p in Path(directory).iterdir():
            if p.is_file():
                state.bodies[p.name] = p.read_bytes()

    async def main():
        runner = web.AppRunner(_make_app(state), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        tmp = port_file + ".tmp"
        Path(tmp).write_text(str(port))
        os.replace(tmp, port_file)
        await asyncio.Event().wait()

    asyncio.run(main())


# --- the client side --------------------------------------------------------------------------

class ImageServer:
    """Start/stop the server process and talk to its control API (stdlib only)."""

    def __init__(self, directory: str | os.PathLike | None = None, raise_priority: bool = True):
        self.directory = str(directory) if directory else None
        self.raise_priority = raise_priority
        self.priority = "normal"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="imageserver-")
        self.log_path = Path(self._tmp.name) / "server.log"

    def start(self, timeout: float = 30.0) -> "ImageServer":
        port_file = Path(self._tmp.name) / "port"
        cmd = [sys.executable, str(HERE), "--port-file", str(port_file)]
        if self.raise_priority:
            cmd.append("--raise-priority")
        if self.directory:
            cmd += ["--dir", self.directory]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.time() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"image server did not start; log:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.priority = self._ctl("GET", "health")["priority"]
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._tmp.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _ctl(self, method: str, what: str, data: bytes | None = None, ctype: str = "application/octet-stream"):
        req = urllib.request.Request(self.url(f"/_ctl/{what}"), data=data, method=method,
                                     headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def body(self, name: str, data: bytes) -> str:
        """Store a body; returns the URL that serves it with 200."""
        self._ctl("PUT", f"body/{name}", data)
        return self.url(f"/b/{name}")

    def route(self, path: str, *steps: dict) -> str:
        """Give ``path`` a sequence of behaviours (see the module docstring); returns its URL."""
        if not path.startswith("/") or not steps:
            raise ValueError("route needs a path starting with '/' and at least one step")
        self._ctl("POST", "route", json.dumps({"path": path, "steps": list(steps)}).encode(), "application/json")
        return self.url(path)

    def requests(self, path: str | None = None) -> list[dict]:
        """Every request so far (control calls excluded), in arrival order."""
        log = self._ctl("GET", "log")
        return [r for r in log if path is None or r["path"] == path]

    def reset(self) -> None:
        """Forget the request log and restart every route at its first step."""
        self._ctl("POST", "reset", b"")


def peak_rate(times: list[float], window: float = 1.0) -> int:
    """Most requests in any ``window``-second interval [t, t + window)."""
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while t - times[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


# --- awkward bodies ---------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, depth: int, color: int, raw: bytes) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + _png_chunk(b"IEND", b""))


def bomb_png(side: int = 20000) -> bytes:
    """A 1-bit PNG of side x side pixels: ~50 KB on the wire, billions of pixels decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def rgb16_png(width: int = 40, height: int = 30, rgb=(65535, 32896, 0)) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    px = struct.pack(">HHH", *rgb)
    raw = b"".join(b"\x00" + px * width for _ in range(height))
    return _png(width, height, 16, 2, raw)


@functools.lru_cache(maxsize=1)
def samples(oversized: int = 3_000_000) -> dict[str, bytes]:
    """Named bodies: good images in awkward encodings, and bad bodies of every kind."""
    from PIL import Image

    def save(img, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    photo = Image.new("RGB", (160, 120), (230, 230, 230))
    photo.paste((200, 30, 30), (20, 20, 140, 100))
    jpeg = save(photo, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    wide = Image.new("RGB", (80, 40), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 40, 40))  # stored: red left, blue right
    gray16 = Image.fromarray(__import__("numpy").full((30, 40), 32896, dtype="uint16"))
    return {
        "photo.jpg": jpeg,
        "photo.png": save(photo, "PNG"),
        "cmyk.jpg": save(Image.new("RGB", (64, 48), (200, 30, 30)).convert("CMYK"), "JPEG", quality=95),
        "gray16.png": save(gray16, "PNG"),
        "rgb16.png": rgb16_png(),
        "palette.gif": save(photo.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "rgba.png": save(Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "PNG"),
        "exif-rotated.jpg": save(wide, "JPEG", quality=95, exif=exif),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "page.html": b"<!doctype html><html><body>Product not found</body></html>",
        "empty": b"",
        "bomb.png": bomb_png(),
        "oversized.jpg": jpeg + os.urandom(oversized),
        "zeros.bin": bytes(oversized),  # with gzip: a few KB on the wire, megabytes inflated
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--dir")
    parser.add_argument("--raise-priority", action="store_true")
    args = parser.parse_args()
    _serve_forever(args.port_file, args.dir, args.raise_priority)
