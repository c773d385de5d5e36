"""Request and response bodies of the HTTP API (pydantic models; they also make the OpenAPI docs).

`/v1/embeddings` follows OpenAI's embeddings API field for field, so the official clients work
unchanged. Token-array inputs (lists of ints) parse here and are refused by the app with a clear
400: token ids of another tokenizer mean nothing to this model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "EmbeddingData",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ErrorBody",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "SearchHit",
    "SearchRequest",
    "SearchResponse",
    "Usage",
]


class EmbeddingRequest(BaseModel):
    """OpenAI ``POST /v1/embeddings`` body."""

    model_config = ConfigDict(extra="ignore", strict=True)  # "8" is not a number

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text or a list of texts (token arrays are refused)."
    )
    model: str = Field(description="The served model's id (see GET /v1/models).")
    # null too: clients such as LiteLLM send it for "not set"
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="'float' lists (also for null), or 'base64' of little-endian float32."
    )
    dimensions: int | None = Field(
        None, description="Return the first `dimensions` values, re-normalised; a nesting size."
    )
    user: str | None = Field(None, description="Ignored; accepted for compatibility.")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class SearchRequest(BaseModel):
    """``POST /v1/search``: adaptive retrieval over the loaded index."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: str | list[str] | None = Field(None, description="Query text(s), embedded by the model.")
    vector: list[float] | list[list[float]] | None = Field(
        None, description="Query vector(s) of the index's full size D (instead of `query`)."
    )
    k: int = Field(10, description="Results per query.")
    shortlist_dim: int | None = Field(None, description="Prefix size D_s of the shortlist stage.")
    shortlist: int | None = Field(None, description="Shortlist size K.")
    stages: list[list[int]] | None = Field(
        None, description="Funnel rerank stages as [prefix_dim, keep] pairs."
    )
    config: str | None = Field(
        None, description="A named tuned configuration of the index (see GET /v1/metadata)."
    )


class SearchHit(BaseModel):
    index: int = Field(description="Position of the query in the request.")
    ids: list[int | str]
    scores: list[float]


class SearchResponse(BaseModel):
    object: Literal["search.result"] = "search.result"
    data: list[SearchHit]
    model: str | None
    params: dict
    timings_ms: dict[str, float]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "mrl"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorBody
