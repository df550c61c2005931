"""Request and response models of the API (pydantic v2).

Compatibility rules, so the API can grow without breaking clients:

- Requests reject unknown fields (a typo such as ``exlude_seen`` gets a 422 naming it rather
  than being silently ignored). New request fields are always optional with a default that keeps
  the earlier behaviour (``explore``, ``temperature`` and ``seed`` were added so).
- Responses may gain optional fields (``confidence`` was added so); clients must ignore fields
  they do not know. Existing fields keep their meaning and type.
- Every response carries ``model_version``.

Item and user ids are JSON integers or strings, as in the model bundle. An integer-keyed model
also accepts decimal strings (``"42"``), a string-keyed one also accepts integers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, model_validator

__all__ = [
    "ItemId",
    "UserId",
    "ScoredItem",
    "Latent",
    "RecommendationRequest",
    "HistoryInput",
    "BatchRecommendationRequest",
    "RecommendationResult",
    "RecommendationResponse",
    "BatchRecommendationResponse",
    "UserRecommendationResponse",
    "SimilarItemsResponse",
    "ModelInfo",
    "Limits",
    "HealthResponse",
    "ReadyResponse",
    "ReloadRequest",
    "ReloadResponse",
    "ErrorResponse",
    "ReloadErrorResponse",
    "FieldError",
    "ValidationErrorResponse",
    "AnomalyRequest",
    "AnomalyResponse",
    "EXPLORE_ONLY_MESSAGE",
    "CONFIDENCE_DESCRIPTION",
    "EXPLORE_DESCRIPTION",
    "TEMPERATURE_DESCRIPTION",
    "SEED_DESCRIPTION",
]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

IdInt = Annotated[StrictInt, Field(ge=_INT64_MIN, le=_INT64_MAX)]
IdStr = Annotated[str, StringConstraints(min_length=1, max_length=256)]
ItemId = Annotated[IdInt | IdStr, Field(description="An external item id (integer or string).")]
UserId = Annotated[IdInt | IdStr, Field(description="An external user id (integer or string).")]
# Ids the server returns are whatever the bundle holds: no length limits on output.
OutId = Annotated[StrictInt | str, Field(description="An external id (integer or string).")]
Weight = Annotated[
    float,
    Field(gt=0, le=1e6, allow_inf_nan=False, description="Interaction strength, default 1."),
]

_K_DESCRIPTION = (
    "Number of items to return, 1 to the server's max_k (GET /v1/model shows the limits); "
    "default: the server's default_k. Capped at the catalog size."
)
EXPLORE_ONLY_MESSAGE = "temperature and seed apply only with explore"
EXPLORE_DESCRIPTION = (
    "Rank from a sample of the user's posterior instead of its mean (Thompson-style "
    "exploration); scores are then the sampled logits. Needs a model with a posterior "
    "(Mult-VAE, RecVAE): 422 for Mult-DAE."
)
TEMPERATURE_DESCRIPTION = (
    "With explore: scale of the posterior's sigma, 0 to 10; default 1.0 (a posterior sample); "
    "0 gives the deterministic ranking. Only with explore."
)
SEED_DESCRIPTION = (
    "With explore: makes the sample reproducible (the same request gives the same answer); "
    "omitted: a fresh draw per request. Only with explore."
)
CONFIDENCE_DESCRIPTION = (
    "How much the history pins down the user's latent code: 1 - mean posterior sigma "
    "(0 = no more than the prior). Null for models without a posterior (Mult-DAE). "
    "Not a predicted accuracy."
)
_SEED_MAX = 2**63 - 1


class _Request(BaseModel):
    # Strict: JSON types must match the schema ("5" is not an int, 0 is not a bool), so what the
    # OpenAPI document says is exactly what is accepted.
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    """Base of responses: open to new fields (no ``additionalProperties: false``)."""


class ScoredItem(_Response):
    """One recommended item."""

    item_id: OutId
    score: float = Field(
        description="Model score (a logit; higher is better). Under the popularity fallback, "
        "the share of training users who interacted with the item. For similar items, the "
        "cosine similarity of the decoder's item embeddings."
    )


class Latent(_Response):
    """The posterior of a history's latent code, ``q(z | history) = N(mu, diag(sigma^2))``."""

    mu: list[float]
    sigma: list[float] = Field(description="Standard deviations (all zero for Mult-DAE).")


class _HistoryFields(_Request):
    history: list[ItemId] = Field(
        default_factory=list,
        description="Item ids the user interacted with (order does not matter; unknown ids "
        "are ignored and listed in the response). At most the server's max_history.",
        examples=[[1, 2, 3]],
    )
    weights: list[Weight] | None = Field(
        default=None,
        description="Optional positive weight per history item (same length as history).",
    )
    exclude: list[ItemId] = Field(
        default_factory=list,
        description="Item ids never to recommend (e.g. already in the cart).",
    )

    @model_validator(mode="after")
    def _weights_match_history(self) -> _HistoryFields:
        if self.weights is not None and len(self.weights) != len(self.history):
            raise ValueError(
                f"weights has {len(self.weights)} entries but history has "
                f"{len(self.history)}; give one weight per history item"
            )
        return self


class _Options(_Request):
    k: Annotated[int, Field(ge=1)] | None = Field(default=None, description=_K_DESCRIPTION)
    exclude_seen: bool = Field(
        default=True, description="Leave the history's own items out of the results."
    )
    include_latent: bool = Field(
        default=False, description="Also return the posterior mean and standard deviation."
    )
    explore: bool = Field(default=False, description=EXPLORE_DESCRIPTION)
    temperature: float | None = Field(
        default=None, ge=0.0, le=10.0, allow_inf_nan=False, description=TEMPERATURE_DESCRIPTION
    )
    seed: int | None = Field(default=None, ge=0, le=_SEED_MAX, description=SEED_DESCRIPTION)

    @model_validator(mode="after")
    def _exploration_options_need_explore(self) -> _Options:
        if not self.explore and (self.temperature is not None or self.seed is not None):
            raise ValueError(EXPLORE_ONLY_MESSAGE)
        return self

    @property
    def sampling_temperature(self) -> float:
        """The temperature to sample at (1.0 when not given)."""
        return 1.0 if self.temperature is None else self.temperature


class RecommendationRequest(_HistoryFields, _Options):
    """Recommend for one history, folded into the model without retraining."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"history": [1, 2, 3], "k": 10, "exclude": [4]},
                {"history": [1, 2, 3], "k": 10, "explore": True, "temperature": 0.5, "seed": 7},
            ]
        },
    )


class HistoryInput(_HistoryFields):
    """One history of a batch."""


class BatchRecommendationRequest(_Options):
    """Recommend for many histories, scored as one batch (options apply to all)."""

    histories: list[HistoryInput] = Field(
        min_length=1, description="The histories; at most the server's max_batch."
    )


class RecommendationResult(_Response):
    """The answer for one history."""

    items: list[ScoredItem] = Field(description="Recommended items, best first.")
    unknown_items: list[ItemId] = Field(
        description="History items the model does not know (ignored)."
    )
    fallback: Literal["popularity"] | None = Field(
        default=None,
        description="'popularity' when no history item was known: the items are the most "
        "popular training items instead of model recommendations.",
    )
    latent: Latent | None = Field(default=None, description="Present when include_latent.")
    confidence: float | None = Field(
        default=None, ge=0.0, le=1.0, description=CONFIDENCE_DESCRIPTION
    )


class RecommendationResponse(RecommendationResult):
    """Recommendations for one history."""

    model_version: str


class BatchRecommendationResponse(_Response):
    """Recommendations for each history, in request order."""

    model_version: str
    results: list[RecommendationResult]


class UserRecommendationResponse(_Response):
    """Recommendations for a training user, from the history stored in the model bundle."""

    model_version: str
    user_id: OutId
    items: list[ScoredItem]
    confidence: float | None = Field(
        default=None, ge=0.0, le=1.0, description=CONFIDENCE_DESCRIPTION
    )


class SimilarItemsResponse(_Response):
    """Items whose decoder embeddings are closest (cosine) to the given item's."""

    model_version: str
    item_id: OutId
    items: list[ScoredItem]


class Limits(_Response):
    """Request limits of this server."""

    default_k: int
    max_k: int
    max_history: int
    max_batch: int


class ModelInfo(_Response):
    """The model being served."""

    model_version: str
    model_type: str = Field(description="multvae or multdae.")
    n_items: int
    n_users: int = Field(description="Training users (for /v1/users/{user_id}/...).")
    latent_dim: int
    item_id_type: Literal["int", "str"]
    user_id_type: Literal["int", "str"]
    created_at: str | None = Field(description="When the bundle was written (ISO 8601).")
    loaded_at: datetime
    source: str = Field(description="Bundle path or model URI it was loaded from.")
    registry_version: str | None = Field(description="MLflow registry version, if any.")
    metrics: dict[str, Any] = Field(
        description="Training-time evaluation metrics stored in the bundle."
    )
    limits: Limits


class HealthResponse(_Response):
    status: Literal["ok"] = "ok"


class ReadyResponse(_Response):
    status: Literal["ready"] = "ready"
    model_version: str


class ReloadRequest(_Request):
    """What to load: ``bundle`` or ``model_uri`` (at most one; empty: reload the current
    source), and optionally what the caller expects and why (logged)."""

    bundle: str | None = Field(
        default=None, min_length=1, max_length=4096, description="A bundle directory."
    )
    model_uri: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="An MLflow model URI such as models:/NAME@ALIAS.",
    )

    # What the nightly job says about the reload it asks for (logged, not acted on).
    version: str | None = Field(
        default=None,
        max_length=64,
        description="The registry version the caller expects the alias to name (logged).",
    )
    reason: str | None = Field(
        default=None, max_length=200, description="Why, e.g. promoted or rollback (logged)."
    )
    date: str | None = Field(
        default=None, max_length=32, description="The night of a nightly promotion (logged)."
    )

    @model_validator(mode="after")
    def _at_most_one(self) -> ReloadRequest:
        if self.bundle is not None and self.model_uri is not None:
            raise ValueError("give either bundle or model_uri, not both")
        return self


class ReloadResponse(_Response):
    model_version: str
    previous_version: str | None
    changed: bool
    source: str
    registry_version: str | None
    load_seconds: float
    worker_pid: int = Field(description="The worker process that reloaded (one per worker).")


class ErrorResponse(BaseModel):
    """An error; ``detail`` says what was wrong."""

    detail: str


class FieldError(BaseModel):
    """One invalid field, in FastAPI's format; ``loc`` names it (e.g. ``["body", "k"]``)."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    """Invalid input (422): one entry per problem."""

    detail: list[FieldError]


class ReloadErrorResponse(BaseModel):
    """A reload that failed; the previous model keeps serving."""

    detail: str
    model_version: str | None = Field(description="The version still being served, if any.")


class AnomalyRequest(_Request):
    """One history to check for how unusual it is under the served model."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [{"items": [1, 2, 3]}, {"items": [1, 2, 3], "reference": "training"}]
        },
    )

    items: list[ItemId] = Field(
        min_length=1,
        description="Item ids of the history (order and repeats do not matter; unknown ids are "
        "ignored and listed in the response). At most the server's max_history.",
    )
    reference: Literal["auto", "training", "held-out"] = Field(
        default="auto",
        description="Population the percentile compares with: 'held-out' users the model was "
        "not trained on (only for a bundle calibrated with calibrate_anomalies; suits new "
        "users), the model's 'training' users (suits them; new normal users run high against "
        "them), or 'auto': held-out when the bundle has it, else training.",
    )


class AnomalyResponse(_Response):
    """How unusual the history is: its negative ELBO per item and that score's percentile."""

    score: float = Field(
        description="Negative ELBO per known history item, in nats "
        "((reconstruction + kl) / history_length); higher is more unusual. Runs higher for "
        "short histories: compare histories by percentile."
    )
    percentile: float = Field(
        ge=0.0,
        le=100.0,
        description="Where the score falls, 0 to 100, among reference histories of a similar "
        "length (the 'reference' field says which population).",
    )
    history_length: int = Field(ge=1, description="Known (distinct) items that were scored.")
    reconstruction: float = Field(
        description="Reconstruction negative log-likelihood at z = mu (not normalized)."
    )
    kl: float = Field(
        description="KL(q(z|x) || N(0, I)) of the posterior (not normalized); 0 for Mult-DAE.",
    )
    reference: Literal["training", "held-out"] = Field(description="The reference used.")
    unknown_items: list[ItemId] = Field(
        description="History items the model does not know (ignored)."
    )
    model_version: str
