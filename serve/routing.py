"""Where a request goes: the index version it reads (one immutable ``Routing``), the categories it
asks for, and the searcher calls it fans out to (every call with a timeout)."""
import asyncio
from dataclasses import dataclass, field

import numpy as np

from engine.display import Display
from engine.index import Directory, Location
from serve.errors import ApiError
from serve.searcher import ShardGroup, assign


@dataclass(frozen=True)
class Routing:
    """One index version as the ingress uses it: immutable, swapped whole."""

    version: str
    manifest: dict
    directory: Directory
    owner: dict  # (category, shard) -> searcher group
    groups_of: dict = field(default_factory=dict)  # category -> sorted searcher groups
    display: Display = field(default_factory=lambda: Display({}, {}))  # titles, thumbnails (engine.display)

    @classmethod
    def of(cls, manifest: dict, directory: Directory, groups: int, display: Display | None = None) -> "Routing":
        owner = assign(manifest, groups)
        groups_of: dict[str, set] = {}
        for (cat, _), g in owner.items():
            groups_of.setdefault(cat, set()).add(g)
        return cls(manifest["index_version"], manifest, directory, owner,
                   {c: sorted(g) for c, g in groups_of.items()}, display or Display({}, {}))


def categories(routing: Routing, category: str | None) -> list[str] | None:
    if not category:
        return None
    names = list(dict.fromkeys(c.strip() for c in category.split(",") if c.strip()))
    unknown = [c for c in names if c not in routing.groups_of]
    if unknown:
        raise ApiError(404, f"unknown category {unknown}; known: {sorted(routing.groups_of)}")
    return names


CALL_TIMEOUT_S = 30.0


async def call_within(response, timeout_s: float):
    """A deployment response (or a coroutine) within ``timeout_s``, else a 504; never an unbounded wait."""
    try:
        return await asyncio.wait_for(_awaitable(response), timeout_s)
    except asyncio.TimeoutError:
        if hasattr(response, "cancel"):
            response.cancel()
        raise ApiError(504, f"a replica did not answer within {timeout_s:g}s (serve.call_timeout_s)") from None


async def _awaitable(response):
    return await response


def _search(searchers: list, group: int, timeout_s: float = CALL_TIMEOUT_S):
    searcher = searchers[group]
    call = searcher.search if isinstance(searcher, ShardGroup) else searcher.search.remote
    return lambda *a, **kw: call_within(call(*a, **kw), timeout_s)


async def fan_out(searchers: list, routing: Routing, categories: list[str], n: int, vector=None,
                  location: Location | None = None, timeout_s: float = CALL_TIMEOUT_S, filter: str | None = None) -> list:
    """Per-shard hits for ``categories``, every searcher asked for ``routing.version`` only."""
    groups = sorted({g for c in categories for g in routing.groups_of.get(c, [])})
    answers = []
    if location is not None:
        owner = routing.owner[(location.category, location.shard)]
        first = await _search(searchers, owner, timeout_s)(
            routing.version, categories if owner in groups else [], n,
            location=(location.category, location.shard, location.position), filter=filter)
        answers.append(first)
        vector = first["vector"]
        groups = [g for g in groups if g != owner]
    if groups:
        vector = np.asarray(vector, np.float32).tolist()
        answers += await asyncio.gather(*[_search(searchers, g, timeout_s)(routing.version, categories, n, vector=vector,
                                                                           filter=filter)
                                          for g in groups])
    refused = [a["error"] for a in answers if a.get("error")]
    if refused:
        raise ApiError(400, refused[0])
    mixed = {a["version"] for a in answers} - {routing.version}
    if mixed:  # searchers answer from the version asked for; this would be a bug, never a silent mix
        raise ApiError(500, f"searchers answered from {sorted(mixed)} for a {routing.version} request")
    return [h for a in answers for h in a["hits"]]
