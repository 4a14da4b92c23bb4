"""The demo flow, as `lookalike demo` runs it, on a few hundred products."""
import json
import socket

from PIL import Image

from conftest import free_port
from engine import demo


def test_demo_end_to_end(ray_cluster, tmp_path, capsys):
    port = free_port()
    overrides = [f"source.path={tmp_path}/demo/catalog.parquet", f"storage.root={tmp_path}/store",
                 f"serve.cache_dir={tmp_path}/cache", f"serve.port={port}"]
    result = demo.run(products=300, overrides=overrides, queries=300)
    out = capsys.readouterr().out
    last = json.loads(json.dumps(result))
    assert last["products"] == 300 and last["indexed"] == 300 and last["rejected"] == 2
    assert sum(last["categories"].values()) == 300 and set(last["categories"]) == {
        "tops", "dresses", "bottoms", "shoes", "bags"}
    assert last["queries"] == 300 and last["precision_at_10"] >= 0.65
    assert last["service"] == f"http://127.0.0.1:{port}" and last["elapsed_s"] > 0
    assert "neighbours" in out and "POST /search" in out
    assert last["page"] == f"http://127.0.0.1:{port}/" and f"search page: http://127.0.0.1:{port}/" in out
    outfit = last["outfit"]  # one photo of several unseen items through the detector
    assert outfit["objects_found"] >= outfit["objects_in_photo"] >= 2
    assert set(outfit["categories_in_photo"]) <= set(outfit["categories_found"])
    with Image.open(last["picture"]) as img:
        assert img.format == "PNG" and img.height > 5 * 96
    with socket.socket() as s:  # the demo stopped the service it started
        assert s.connect_ex(("127.0.0.1", port)) != 0
