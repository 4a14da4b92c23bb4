"""Response models: what /openapi.json and /docs say each endpoint answers.

Results allow extra keys: the display columns (``serve.display_columns``, e.g. ``title``,
``image_url``) and whatever later features add come back flat beside product_id, category and
score. Routes answer with ``response_model_exclude_unset``, so a column a product lacks is
absent rather than null, and a null the service means (a whole photo's ``score``) stays.
"""
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

UPLOAD_BODY = {  # POST /search reads its body itself (bounded stream); this describes it
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "description": "the photo (JPEG, PNG, WebP, ...)"}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Result(_Open):
    """One neighbour, best first; display columns (title, image_url, ...) as extra keys."""
    product_id: str
    category: str
    score: float = Field(description="cosine similarity, 1 = identical")
    title: Optional[str] = Field(None, description="a display column, when the catalog has it")
    image_url: Optional[str] = Field(None, description="a display column, when the catalog has it")


class SimilarAnswer(_Open):
    """The product asked about (with its display columns) and its neighbours."""
    product_id: str
    category: str = Field(description="the category of the vector searched from")
    index_version: str
    results: list[Result]


class Alternative(BaseModel):
    category: str
    score: float


class SearchObject(_Open):
    """One object of the photo: its box (pixels of the upload), the detector's category and score
    (null: the whole photo) and its own neighbours."""
    category: Optional[str]
    box: list[float] = Field(description="x0, y0, x1, y1 in the uploaded image's pixels")
    score: Optional[float]
    alternatives: list[Alternative] = Field(default_factory=list)
    searched: list[str] = Field(default_factory=list, description="the categories searched")
    results: list[Result]


class SearchAnswer(_Open):
    index_version: str
    detector: str
    detected: int = Field(description="objects the detector found")
    objects: list[SearchObject]


class Health(BaseModel):
    status: str = Field(description="ok or degraded (LATEST was refused; the old index serves)")
    index_version: str


class VersionInfo(_Open):
    model_version: str
    index_version: str
    built_at: str
    dim: int
    counts: dict[str, int]
    shards: dict[str, int]
    swapped_at: Optional[str] = None
    latest: Optional[str] = None
    last_error: Optional[str] = None


class ErrorAnswer(_Open):
    error: str
    status: int


ERRORS = {code: {"model": ErrorAnswer, "description": text} for code, text in {
    400: "bad k, category mix or filter", 401: "missing or wrong bearer token", 404: "unknown product or category",
    413: "upload too large", 415: "not an image", 422: "malformed request",
    503: "no index yet, or busy (Retry-After)", 504: "a replica did not answer in time"}.items()}


def errors(*codes: int) -> dict:
    return {c: ERRORS[c] for c in codes}
