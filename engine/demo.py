"""The embedded default end to end: sample catalog -> pipeline -> service -> queries -> numbers.

Everything talks to 127.0.0.1: the local Ray cluster, the Serve proxy, and the HTTP queries made
here through the live service (so the precision printed is what a client would get).
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from engine import config, pipeline, report, sample
from engine.config import Config

QUERIES = 500
SHOWN = 5
THUMB = 96


def free_port() -> int:
    """A free port on 127.0.0.1, for the demo's benches (bench/) to start a service on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
              timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def similar(base: str, product_id: str, k: int = 10) -> list[dict]:
    status, body = http_json("GET", f"{base}/similar/{urllib.parse.quote(product_id)}?k={k}")
    if status != 200:
        raise RuntimeError(f"/similar/{product_id}: HTTP {status}: {body}")
    return body["results"]


def precision_at_k(base: str, query_ids: list[str], labels: dict[str, str], k: int = 10) -> tuple[float, dict]:
    """Mean share of a query's top-k neighbours (itself excluded) with the query's fine label."""
    per_query, answers = [], {}
    for pid in query_ids:
        results = similar(base, pid, k)
        answers[pid] = results
        per_query.append(sum(labels.get(r["product_id"]) == labels[pid] for r in results) / k)
    return float(np.mean(per_query)), answers


def pick_queries(ids: list[str], labels: dict[str, str], n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ids, size=min(n, len(ids)), replace=False).tolist()) if ids else []


def table(answers: dict[str, list[dict]], labels: dict[str, str], shown: list[str]) -> str:
    lines = [f"{'query':<10} {'label':<12} neighbours (label score), best first", "-" * 100]
    for pid in shown:
        cells = [f"{labels.get(r['product_id'], '?')[:10]} {r['score']:.2f}" for r in answers[pid][:5]]
        lines.append(f"{pid:<10} {labels[pid][:12]:<12} " + " | ".join(cells))
    return "\n".join(lines)


def picture(path: Path, answers: dict[str, list[dict]], labels: dict[str, str], urls: dict[str, str],
            shown: list[str], k: int = 10) -> Path:
    """One row per query: the query (framed), then its neighbours, each labelled."""
    cell, label_h = THUMB, 28
    sheet = Image.new("RGB", ((k + 1) * (cell + 6) + 6, len(shown) * (cell + label_h + 6) + 6), "white")
    draw = ImageDraw.Draw(sheet)
    for row, pid in enumerate(shown):
        y = 6 + row * (cell + label_h + 6)
        items = [(pid, None)] + [(r["product_id"], r["score"]) for r in answers[pid][:k]]
        for col, (item, score) in enumerate(items):
            x = 6 + col * (cell + 6)
            img = Image.open(urllib.request.url2pathname(urllib.parse.urlparse(urls[item]).path))
            sheet.paste(img.convert("RGB").resize((cell, cell)), (x, y))
            colour = "black" if score is None else ("green" if labels.get(item) == labels[pid] else "red")
            draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=colour, width=2 if score is None else 1)
            text = labels.get(item, "?")[:14] + ("" if score is None else f"\n{score:.3f}")
            draw.multiline_text((x, y + cell + 2), text if score is not None else "QUERY\n" + text[:14],
                                fill=colour, spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def outfit_query(base: str, out_dir: Path, labels: dict[str, str], seed: int = 7) -> dict:
    """One photo of several items the detector never saw in training, through POST /search."""
    from engine import outfits

    img, boxes, cats = outfits.dataset(1, seed, held_out=True)[0]
    path = out_dir / "outfit-query.png"
    img.save(path)
    answer = upload_example(base, str(path))
    truth = ", ".join(f"{outfits.CLASSES[c - 1]} {[int(v) for v in b]}" for b, c in zip(boxes, cats))
    print(f"POST /search with an outfit photo ({path}); in it: {truth}")
    for o in answer["objects"]:
        print(f"  {_where(o)} at {[int(v) for v in o['box']]}: " + ", ".join(f"{r['product_id']} ({labels.get(r['product_id'])}, {r['score']:.2f})"
                                        for r in o["results"][:3]))
    return {"objects_in_photo": len(cats), "categories_in_photo": sorted(outfits.CLASSES[c - 1] for c in cats),
            "objects_found": answer["detected"],
            "categories_found": sorted(o["category"] for o in answer["objects"] if o["score"] is not None)}


def _where(obj: dict) -> str:
    """An object as the detector saw it: category (score), and the categories searched when unsure."""
    if obj["score"] is None:
        return f"whole photo, {obj['category'] or 'all categories'}"
    searched = obj.get("searched") or [obj["category"]]
    return f"{obj['category']} {obj['score']:.2f}" + (f", searched in {'+'.join(searched)}" if len(searched) > 1 else "")


def upload_example(base: str, image_path: str) -> dict:
    boundary = "lookalike-demo-boundary"
    data = Path(image_path).read_bytes()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"query.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, answer = http_json("POST", f"{base}/search?k=5", body,
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    if status != 200:
        raise RuntimeError(f"POST /search: HTTP {status}: {answer}")
    return answer


DEMO_FILTERS = 'index.filter_columns={"in_stock": "bool", "brand": "string", "price": "float"}'


def run(products: int = 2000, keep_serving: bool = False, config_path: str | None = None,
        overrides: list[str] | None = None, queries: int = QUERIES, broken: int = 2) -> dict:
    """The whole demo; returns the summary (the CLI prints it as the last line, as JSON)."""
    t0 = time.monotonic()
    if not any(o.startswith("index.filter_columns") for o in overrides or []):
        overrides = [DEMO_FILTERS, *(overrides or [])]  # the demo catalog has them (engine.sample.shop_columns)
    cfg: Config = config.load(config_path, overrides)
    catalog_path = cfg.source.path
    print(f"[1/4] sample catalog: {products} Fashion-MNIST products (+{broken} broken rows) -> {catalog_path}",
          flush=True)
    sample.make_catalog(os.path.dirname(catalog_path), products, broken=broken,
                        fmt=Path(catalog_path).suffix.lstrip(".") or "parquet")
    print("[2/4] pipeline on a local Ray cluster (127.0.0.1)", flush=True)
    rep = pipeline.run(cfg)
    print(report.summary(rep), flush=True)

    from ray import serve

    from serve import app as service

    print("[3/4] search service", flush=True)
    base = service.start(cfg)
    print(f"      listening on {base} (OpenAPI: {base}/docs)", flush=True)
    print(f"      search page: {base}/ (drop a photo, click through the catalog)", flush=True)
    try:
        cat = pq.read_table(catalog_path).to_pylist()
        labels = {r["product_id"]: r["label"] for r in cat}
        urls = {r["product_id"]: r["image_url"] for r in cat}
        indexed = [r["product_id"] for r in cat if not r["product_id"].startswith("broken-")]
        print(f"[4/4] {min(queries, len(indexed))} queries: GET /similar/{{product_id}}?k=10", flush=True)
        query_ids = pick_queries(indexed, labels, queries)
        precision, answers = precision_at_k(base, query_ids, labels)
        shown = _one_per_category(query_ids, {r["product_id"]: r["category"] for r in cat})[:SHOWN]
        print(table(answers, labels, shown))
        png = picture(Path(catalog_path).parent / "demo-results.png", answers, labels, urls, shown)
        print(f"picture of these queries and their neighbours: {png}")
        for pid in shown:  # each shown product's own photo, as a shopper would post it
            obj = upload_example(base, urllib.request.url2pathname(urllib.parse.urlparse(urls[pid]).path))["objects"][0]
            print(f"POST /search with {pid}'s image ({labels[pid]}; {_where(obj)}): " +
                  ", ".join(f"{r['product_id']} ({labels.get(r['product_id'])}, {r['score']:.2f})"
                            for r in obj["results"]))
        outfit = outfit_query(base, Path(catalog_path).parent, labels) if cfg.detect.detector != "none" else None
        result = {
            "products": products, "rows": rep["counts"]["rows_in"], "indexed": rep["counts"]["ok"],
            "rejected": rep["counts"]["rejected"], "categories": rep["categories"],
            "queries": len(query_ids), "precision_at_10": round(precision, 4),
            "index_version": rep["index_version"], "model_version": rep["model_version"],
            "device": rep.get("device"), "embed_images_per_s": rep["stages"]["download_embed_store"].get("items_per_s"),
            "picture": str(png), "outfit": outfit, "service": base, "page": base + "/",
            "elapsed_s": round(time.monotonic() - t0, 1),
        }
        if keep_serving:
            _print_serving(base, query_ids[0])
            print(json.dumps(result), flush=True)
            _block()
        return result
    finally:
        if not keep_serving:
            serve.shutdown()


def _one_per_category(ids: list[str], categories: dict[str, str]) -> list[str]:
    seen, out = set(), []
    for pid in ids:
        if categories[pid] not in seen:
            seen.add(categories[pid])
            out.append(pid)
    return out + [p for p in ids if p not in out]


def _print_serving(base: str, example: str) -> None:
    print(f"Serving on {base} until Ctrl-C. Try:\n"
          f"  the search page: {base}/\n"
          f"  curl '{base}/similar/{example}?k=5'\n"
          f"  curl -F image=@some.jpg '{base}/search?k=5'\n"
          f"  open {base}/docs", flush=True)


def _block() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
