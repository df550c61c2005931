"""Steps 4 and 5 of a nightly run: score challenger and champion on the same split, decide.

The champion's item vocabulary may differ from today's: :class:`VocabularyAdapter` maps items
by external id, so the champion reads the fold-in items it knows and scores the items it knows;
an item it has never seen gets ``-inf`` (it cannot rank it, and a target it does not know is a
miss). Both models are measured by :func:`recvae.evaluation.evaluate` on the same matrices.

The rule: promote when the challenger passes the sanity checks (finite scores, NDCG@100 and
coverage@100 above their floors, coverage not collapsed against the champion's) and its
NDCG@100 is at least the champion's minus the tolerance. Without a champion the sanity checks
alone decide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.nightly.settings import GateSettings
from pipelines.nightly.warm_start import item_positions

if TYPE_CHECKING:
    import scipy.sparse as sp
    import torch
    from numpy.typing import NDArray

    from recvae.evaluation import EvaluationResult
    from recvae.recommender import Recommender
    from recvae.split import HeldOut

__all__ = [
    "GATE_METRIC",
    "Decision",
    "VocabularyAdapter",
    "decide",
    "evaluate_model",
    "finite_scores",
]

GATE_METRIC = "ndcg@100"
COVERAGE_METRIC = "coverage@100"
REPORTED = ("ndcg@100", "recall@20", "recall@50", "coverage@100")


class VocabularyAdapter:
    """A ``Ranker`` over ``item_ids`` backed by a model with another item vocabulary.

    Args:
        model: The model (e.g. the champion).
        item_ids: The vocabulary the scores must be expressed in (e.g. today's).
    """

    def __init__(self, model: Recommender, item_ids: NDArray[Any]) -> None:
        self.model = model
        positions = item_positions(model, item_ids)
        self._known = np.flatnonzero(positions >= 0)  # columns of item_ids the model knows
        self._model_cols = positions[self._known]  # their positions in the model
        self._n_items = len(item_ids)

    @property
    def n_items(self) -> int:
        return self._n_items

    @property
    def n_known(self) -> int:
        return int(len(self._known))

    def score(self, histories: sp.csr_array) -> torch.Tensor:
        """Scores ``(n_users, n_items)`` in the adapter's vocabulary; unknown items get -inf."""
        import scipy.sparse as sp
        import torch

        coo = sp.coo_array(sp.csr_array(histories)[:, self._known])
        mapped = sp.csr_array(
            (coo.data, (coo.row, self._model_cols[coo.col])),
            shape=(histories.shape[0], self.model.n_items),
            dtype=np.float32,
        )
        inner = self.model.score(mapped)  # (n_users, model.n_items)
        out = torch.full((histories.shape[0], self._n_items), -math.inf, dtype=inner.dtype)
        index = torch.as_tensor(self._model_cols, dtype=torch.long, device=inner.device)
        out[:, torch.as_tensor(self._known, dtype=torch.long)] = inner.index_select(1, index).cpu()
        return out


def finite_scores(model: Any, histories: sp.csr_array, batch_size: int = 1024) -> bool:
    """Whether every score the model gives these histories is finite (no NaN or inf)."""
    import torch

    for start in range(0, histories.shape[0], batch_size):
        scores = model.score(histories[start : start + batch_size])
        tensor = scores if isinstance(scores, torch.Tensor) else torch.as_tensor(scores)
        if not bool(torch.isfinite(tensor).all()):
            return False
    return True


def evaluate_model(model: Any, heldout: HeldOut) -> EvaluationResult:
    """The model's metrics on held-out users (Recall@20/50, NDCG@100, coverage, ...)."""
    from recvae.evaluation import evaluate

    return evaluate(
        model,
        heldout.fold_in.matrix,
        heldout.targets.matrix,
        ks=(20, 50, 100),
        metrics=("recall", "ndcg", "coverage"),
    )


def metrics_of(result: EvaluationResult) -> dict[str, float]:
    """The reported metrics (those the result has), with the standard error of per-user ones."""
    out: dict[str, float] = {}
    for name in REPORTED:
        if name not in result.per_user and name not in result.aggregate:
            continue
        out[name] = result.mean(name)
        if name in result.per_user:
            out[f"{name}_se"] = result.stderr(name)
    out["n_users"] = float(result.n_users)
    return out


@dataclass(frozen=True)
class Decision:
    """The gate's verdict.

    Attributes:
        promote: Whether the challenger becomes the champion.
        reason: One sentence saying why.
        sanity: Each sanity check as ``{"check", "ok", "message"}``.
        challenger: The challenger's metrics.
        champion: The champion's metrics on the same users (None without a champion).
        delta: Challenger minus champion NDCG@100 (None without a champion).
        delta_se: Standard error of the paired per-user difference.
    """

    promote: bool
    reason: str
    sanity: list[dict[str, Any]] = field(default_factory=list)
    challenger: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] | None = None
    delta: float | None = None
    delta_se: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "reason": self.reason,
            "metric": GATE_METRIC,
            "sanity": self.sanity,
            "challenger": self.challenger,
            "champion": self.champion,
            "delta": self.delta,
            "delta_se": self.delta_se,
        }


def decide(
    gate: GateSettings,
    challenger: EvaluationResult,
    champion: EvaluationResult | None,
    *,
    challenger_finite: bool,
) -> Decision:
    """Apply the promotion rule.

    Args:
        gate: Tolerance and floors.
        challenger: The challenger's evaluation on the night's test users.
        champion: The champion's evaluation on the same users, or None.
        challenger_finite: Whether all the challenger's scores were finite.

    Returns:
        The decision with its reason.
    """
    chal_ndcg = challenger.mean(GATE_METRIC)
    chal_cov = challenger.mean(COVERAGE_METRIC)
    sanity: list[dict[str, Any]] = []

    def check(name: str, ok: bool, message: str) -> None:
        sanity.append({"check": name, "ok": bool(ok), "message": message})

    check(
        "finite_scores",
        challenger_finite,
        "challenger scores are all finite" if challenger_finite else "challenger gave NaN/inf",
    )
    check(
        "min_ndcg",
        math.isfinite(chal_ndcg) and chal_ndcg >= gate.min_ndcg,
        f"challenger {GATE_METRIC} {chal_ndcg:.4f} (floor {gate.min_ndcg:.4f})",
    )
    cov_floor = gate.min_coverage
    cov_text = f"floor {gate.min_coverage:.4f}"
    if champion is not None:
        champ_cov = champion.mean(COVERAGE_METRIC)
        cov_floor = max(cov_floor, gate.min_coverage_ratio * champ_cov)
        cov_text += f", {gate.min_coverage_ratio:g} x champion's {champ_cov:.4f}"
    check(
        "coverage",
        chal_cov >= cov_floor,
        f"challenger {COVERAGE_METRIC} {chal_cov:.4f} ({cov_text})",
    )
    # Each failed check with its numbers: the one-line reason must say by how much.
    failed = [f"{s['check']} ({s['message']})" for s in sanity if not s["ok"]]
    chal_metrics = metrics_of(challenger)
    if champion is None:
        if failed:
            return Decision(
                False,
                f"no champion yet, but sanity check(s) failed: {', '.join(failed)}",
                sanity,
                chal_metrics,
            )
        return Decision(
            True,
            f"no champion yet; challenger {GATE_METRIC} {chal_ndcg:.4f} passes the sanity checks",
            sanity,
            chal_metrics,
        )
    champ_ndcg = champion.mean(GATE_METRIC)
    mask = challenger.user_has_targets
    diff = challenger.per_user[GATE_METRIC][mask] - champion.per_user[GATE_METRIC][mask]
    delta = float(diff.mean()) if diff.size else math.nan
    delta_se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else math.nan
    compare = (
        f"challenger {GATE_METRIC} {chal_ndcg:.4f} vs champion {champ_ndcg:.4f} "
        f"(delta {delta:+.4f} ± {delta_se:.4f}, tolerance {gate.tolerance:g})"
    )
    common: dict[str, Any] = {
        "sanity": sanity,
        "challenger": chal_metrics,
        "champion": metrics_of(champion),
        "delta": delta,
        "delta_se": delta_se,
    }
    if failed:
        return Decision(False, f"sanity check(s) failed: {', '.join(failed)}; {compare}", **common)
    if not chal_ndcg >= champ_ndcg - gate.tolerance:
        return Decision(False, f"challenger is worse: {compare}", **common)
    return Decision(True, f"challenger within tolerance: {compare}", **common)
