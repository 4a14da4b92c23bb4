"""Shard.search with a keep mask: exact answers at any selectivity, k results whenever k are eligible."""
import numpy as np
import pyarrow as pa
import pytest
from annoy import AnnoyIndex

from engine import index

DIM, N = 16, 6000


@pytest.fixture(scope="module", params=["angular", "euclidean"])
def shard(request, tmp_path_factory):
    rng = np.random.default_rng(7)  # clustered, as embeddings are: 60 classes
    centres = rng.normal(size=(60, DIM))
    vectors = (centres[rng.integers(0, 60, N)] + 0.35 * rng.normal(size=(N, DIM))).astype(np.float32)
    ann = AnnoyIndex(DIM, request.param)
    for i, v in enumerate(vectors):
        ann.add_item(i, v.tolist())
    ann.build(10)
    path = str(tmp_path_factory.mktemp("shard") / "shard-000.ann")
    ann.save(path)
    ids = pa.array([f"p{i}" for i in range(N)])
    s = index.Shard("c", {"shard": 0, "index": "shard-000.ann"}, DIM, {"metric": request.param, "search_k": -1},
                    path, ids, pa.array([True] * N))
    yield s, vectors
    s.close()


def exact(vectors, q, keep, n, metric):
    pos = np.flatnonzero(keep)
    if metric == "angular":
        s = vectors[pos] @ q / (np.linalg.norm(vectors[pos], axis=1) * np.linalg.norm(q))
    else:
        s = -np.linalg.norm(vectors[pos] - q, axis=1)
    return [f"p{i}" for i in pos[np.argsort(-s)[:n]]]


@pytest.mark.parametrize("share", [0.5, 0.1, 0.01, 0.001])
@pytest.mark.parametrize("scan_rows", [0, index.EXACT_SCAN_ROWS])
def test_every_answer_obeys_the_mask_and_recalls_the_exact_neighbours(shard, share, scan_rows, monkeypatch):
    """scan_rows=0 forces Annoy's over-fetch path wherever the share allows it."""
    monkeypatch.setattr(index, "EXACT_SCAN_ROWS", scan_rows)
    s, vectors = shard
    rng = np.random.default_rng(int(share * 1000))
    recalls = []
    for _ in range(30):
        keep = rng.random(N) < share
        q = vectors[rng.integers(0, N)] + 0.1 * rng.normal(size=DIM).astype(np.float32)
        ids, scores = s.search(q.tolist(), 10, keep=keep)
        allowed = {f"p{i}" for i in np.flatnonzero(keep)}
        assert set(ids) <= allowed
        assert len(ids) == min(10, len(allowed))
        assert list(scores) == sorted(scores, reverse=True)
        truth = exact(vectors, q, keep, 10, s.metric)
        recalls.append(len(set(ids) & set(truth)) / max(1, len(truth)))
    assert np.mean(recalls) >= 0.9, recalls


def test_an_empty_mask_answers_nothing_and_no_mask_is_plain_annoy(shard):
    s, vectors = shard
    q = vectors[3].tolist()
    assert s.search(q, 5, keep=np.zeros(N, bool)) == ([], pytest.approx(np.zeros(0)))
    ids, _ = s.search(q, 5)
    assert ids[0] == "p3"
    ids, scores = s.search(q, 5, keep=np.ones(N, bool))
    assert ids[0] == "p3" and len(ids) == 5


def test_exact_scores_match_annoys_scores(shard):
    s, vectors = shard
    q = vectors[11].tolist()
    ids, scores = s.search(q, 8)
    pos = np.array([int(i[1:]) for i in ids])
    ids2, scores2 = s.exact(q, 8, pos)
    assert ids2 == ids
    assert np.allclose(scores2, scores, atol=1e-4)
