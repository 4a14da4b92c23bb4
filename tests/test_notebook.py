"""notebooks/explore.ipynb, executed (nbclient) on a demo store: it runs, and shows what it says.

The store is what `lookalike demo --products 600 --set embed.dim=64` leaves (the demo's Fashion-MNIST
catalog through the pipeline, its broken rows, plus the malformed rows of tests/conftest.py, so there
are rejects of several reasons). At 64-d an Annoy leaf holds 66 items, so the demo's bigger
categories span many leaves and search_k visibly matters (at 512-d a 600-product demo is one leaf
per tree: exact at any search_k)."""
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import MALFORMED, make_config
from engine import api, sample

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "explore.ipynb"
PRODUCTS, DIM = 600, 64


@pytest.fixture(scope="module")
def store(ray_cluster, tmp_path_factory):
    from engine import pipeline

    path = sample.make_catalog(tmp_path_factory.mktemp("nb-catalog"), PRODUCTS, broken=2)
    table = pq.read_table(path)
    extra = pa.Table.from_pylist([{**row, "updated_at": "2026-11-01T00:00:00Z"} for row in MALFORMED],
                                 schema=table.schema)
    pq.write_table(pa.concat_tables([table, extra]), path)
    cfg = make_config(path, tmp_path_factory.mktemp("nb-store"), f"embed.dim={DIM}")
    return cfg, pipeline.run(cfg), path


def test_the_notebook_is_saved_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 6
    assert all(c.outputs == [] and c.execution_count is None for c in code), "clear the outputs before saving"
    assert nb.metadata.kernelspec.name == "python3" and "widgets" not in nb.metadata
    assert all("api." in c.source or "ix." in c.source for c in code[2:]), "every step goes through engine/api.py"


@pytest.fixture(scope="module")
def executed(store, tmp_path_factory):
    import nbformat
    from nbclient import NotebookClient

    cfg, rep, catalog = store
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {"LOOKALIKE_STORE": str(cfg.storage.root), "LOOKALIKE_CATALOG": catalog, "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits the environment
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("LOOKALIKE_CATEGORY", raising=False)
        NotebookClient(nb, timeout=180, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path_factory.mktemp("nb-run"))}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    line = next(ln for ln in text.splitlines() if ln.startswith("RESULTS "))
    return nb, outputs, text, json.loads(line[len("RESULTS "):])


def test_executing_it_shows_neighbours_map_recall_and_rejects(store, executed):
    cfg, rep, catalog = store
    nb, outputs, text, results = executed
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pictures) == 4  # the neighbour grid, the map, the recall curve, the rejects
    labels = {r["product_id"]: r["label"] for r in pq.read_table(catalog).to_pylist() if r["product_id"]}

    with api.open_index(cfg.storage.root) as ix:
        # neighbours: one product per category, exactly the API's (= the service's) answer
        assert len(results["neighbours"]) == len(ix.categories) == 5
        for pid, hits in results["neighbours"].items():
            assert hits == [h["product_id"] for h in ix.neighbours(pid, k=8)]
        params = ix.manifest["categories"]["tops"]["params"]
        tops = ix.counts()["tops"]

    # the map: the biggest category, its four fine labels, principal components in order
    pca = results["pca"]
    assert pca["category"] == "tops" and pca["items"] == tops > DIM + 2  # more than one leaf
    assert pca["labels"] == sorted({labels[p] for p, r in labels.items() if r in ("Coat", "Pullover", "Shirt", "T-shirt/top")})
    assert 1 > pca["explained"][0] >= pca["explained"][1] > 0
    assert pca["centroid_accuracy"] > 1 / len(pca["labels"])  # two dimensions keep some label structure

    # recall@10 rises with search_k, up to exact when every leaf of every tree is read
    curve = {int(k): v for k, v in results["recall"].items()}
    ks = sorted(curve)
    assert ks[0] == 10 and ks[-1] == params["n_trees"] * tops
    assert all(curve[a] <= curve[b] + 1e-9 for a, b in zip(ks, ks[1:])), curve
    assert curve[ks[0]] < 0.95 and curve[ks[-1]] == 1.0, curve
    assert f"search_k {ks[0]:>7}: recall@10 {curve[ks[0]]:.4f}" in text

    # the last run's rejects by reason: the run's own count
    assert results["rejects"] == rep["rejects_by_reason"] and sum(results["rejects"].values()) == rep["counts"]["rejected"]
    assert f"run {rep['run_id']}: published, {rep['counts']['rows_in']} rows in" in text
    assert "decode_error (1): broken-000" in text
    assert not os.environ.get("LOOKALIKE_STORE")  # left as found
