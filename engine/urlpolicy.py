"""What the downloader may fetch: the scheme and address policy, in one place.

A catalog merged from partner and seller feeds is hostile input fetched with the pipeline's own
credentials, so by default:

- a row's own URL may use only the schemes in ``download.allowed_schemes``; a redirect may lead
  only to http or https (a ``302 Location: file:///...`` would read our disk, ``gs://`` our bucket);
- URLs carrying credentials (``http://user:pass@host``) are refused: they hide the real host from
  readers and would send secrets along;
- private, loopback, link-local (the metadata server), multicast, reserved and unspecified
  addresses are refused unless ``download.allowed_networks`` opens them. The check runs on the
  addresses the connection is made to: a literal IP in the URL before connecting, and every
  address a name resolves to inside the connector's resolver, so DNS that answers a public address
  first and a private one later (rebinding) never reaches a private one;
- ``file://`` reads only regular files under ``download.file_roots`` (symlinks resolved first),
  never a device or a FIFO, with the same size cap and timeout as HTTP.

Each refusal is a ``FetchError`` with its own reason: blocked_scheme, blocked_redirect,
blocked_address, blocked_path.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import stat
import urllib.parse

from aiohttp.abc import AbstractResolver

from engine.config import DownloadConfig
from engine.fetcherror import FetchError

REDIRECT_SCHEMES = ("http", "https")
KNOWN_SCHEMES = ("http", "https", "file", "gs")
# Not covered by ipaddress's flags, or worth naming: cloud metadata endpoints and shared address space.
ALWAYS_BLOCKED = [ipaddress.ip_network(n) for n in ("169.254.169.254/32", "100.64.0.0/10", "fd00:ec2::254/128")]


class BlockedAddress(OSError):
    """Raised inside the resolver: every address a name resolved to is refused by policy."""


def _plain(url: str) -> str:
    """The URL without userinfo, for details: a reject row must never carry a password."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if _port(parts) else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))[:200]


def _port(parts) -> int | None:
    try:
        return parts.port
    except ValueError:
        return None


class Policy:
    def __init__(self, cfg: DownloadConfig):
        self.schemes = set(cfg.allowed_schemes)
        self.networks = [ipaddress.ip_network(n, strict=False) for n in cfg.allowed_networks]
        self.roots = [os.path.realpath(r) for r in cfg.file_roots]

    # -- URLs

    def check_url(self, url: str, redirected: bool = False) -> urllib.parse.SplitResult:
        """The parsed URL if it may be fetched (a row's own, or a redirect's target), else FetchError."""
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if redirected and scheme not in REDIRECT_SCHEMES:
            raise FetchError("blocked_redirect", f"redirect to a {scheme or 'relative'}:// URL; only http and https "
                             "are followed")
        if scheme not in self.schemes:
            raise FetchError("blocked_scheme", f"{scheme}:// is not in download.allowed_schemes "
                             f"{sorted(self.schemes)}")
        if parts.username is not None or parts.password is not None:
            raise FetchError("bad_url", f"credentials in the URL (userinfo) are refused: {_plain(url)}")
        if scheme in ("http", "https"):
            if not parts.hostname:
                raise FetchError("bad_url", f"no host in {_plain(url)}")
            if _port(parts) is None and ":" in parts.netloc.rsplit("]", 1)[-1]:
                raise FetchError("bad_url", "port is not a number")
            literal = _literal(parts.hostname)
            if literal is not None and not self.address_allowed(literal):
                raise FetchError("blocked_address", self.why(literal))
        return parts

    # -- addresses

    def address_allowed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in n for n in self.networks if n.version == ip.version):
            return True
        if any(ip in n for n in ALWAYS_BLOCKED if n.version == ip.version):
            return False
        return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                    or ip.is_unspecified or (ip.version == 6 and ip.is_site_local))

    def why(self, ip) -> str:
        return (f"{ip} is a private, loopback, link-local, multicast or reserved address; "
                f"download.allowed_networks {[str(n) for n in self.networks]} does not open it")

    def resolver(self, base=None):
        """An aiohttp resolver that drops every address the policy refuses (the connector connects
        only to what it returns); ``base`` resolves (default: aiohttp's ThreadedResolver)."""
        return FilteringResolver(self, base)

    # -- files

    def open_file(self, url: str, max_bytes: int) -> bytes:
        """A regular file under download.file_roots, at most ``max_bytes`` + 1 bytes of it (blocking)."""
        path = request_path(url)
        real = os.path.realpath(path)
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.roots):
            raise FetchError("blocked_path", f"{path} is not under download.file_roots {self.roots}")
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise FetchError("not_found", f"no such file: {path}") from None
        except OSError as exc:
            raise FetchError("read_error", f"{type(exc).__name__}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise FetchError("blocked_path", f"{path} is not a regular file")
            if info.st_size > max_bytes:
                raise FetchError("too_large", f"{info.st_size} bytes > download.max_bytes={max_bytes}")
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise FetchError("too_large", f"passed download.max_bytes={max_bytes}")
        return data


def _literal(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def request_path(url: str) -> str:
    """The local path of a file:// URL (host must be empty or localhost)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise FetchError("bad_url", f"file:// URL with a host ({parts.netloc[:80]!r})")
    return urllib.parse.unquote(parts.path)


class FilteringResolver(AbstractResolver):
    """aiohttp resolver: resolves with ``base``, returns only allowed addresses."""

    def __init__(self, policy: Policy, base=None):
        self.policy, self._base = policy, base

    def _resolver(self):
        if self._base is None:
            import aiohttp

            self._base = aiohttp.ThreadedResolver()
        return self._base

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        found = await self._resolver().resolve(host, port, family)
        kept = [a for a in found if self.policy.address_allowed(ipaddress.ip_address(a["host"]))]
        if not kept:
            refused = sorted({a["host"] for a in found})
            raise BlockedAddress(f"{host} resolves only to refused addresses {refused[:4]}: "
                                 + self.policy.why(refused[0] if refused else "?"))
        return kept

    async def close(self) -> None:
        if self._base is not None:
            await self._base.close()
