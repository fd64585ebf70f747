"""Ranking-aware comparison of a candidate runtime against the PyTorch fp32 reference.

A recommender's output is a ranked list, so bit-equality is the wrong test: two runtimes may
swap near-tied items. What matters is whether the same items are recommended (recall@K
overlap), whether the first item agrees, whether common items keep their order (Spearman rank
correlation) and how far the scores move.
"""

from __future__ import annotations

import numpy as np

from algorithm.errors import ParityError


def _keys(recs: np.ndarray) -> np.ndarray:
    """[B, K, 3] semantic ids -> [B, K] one int64 key per item (codes are < 2**21 each)."""
    r = recs.astype(np.int64)
    return (r[..., 0] << 42) | (r[..., 1] << 21) | r[..., 2]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return 1.0
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    n = len(a)
    return float(1 - 6 * np.sum((ra - rb) ** 2) / (n * (n * n - 1)))


def compare_outputs(reference: dict, candidate: dict) -> dict:
    """Metrics of ``candidate`` against ``reference`` (both {recommendations, scores})."""
    ref_k, cand_k = _keys(reference["recommendations"]), _keys(candidate["recommendations"])
    ref_s = reference["scores"].astype(np.float64)
    cand_s = candidate["scores"].astype(np.float64)
    if ref_k.shape != cand_k.shape:
        raise ParityError(
            f"output shapes differ: reference {ref_k.shape} vs candidate {cand_k.shape}"
        )
    b, k = ref_k.shape
    overlaps, rhos, common_err = [], [], []
    for i in range(b):
        pos_ref = {key: j for j, key in enumerate(ref_k[i])}
        common = [(pos_ref[key], j) for j, key in enumerate(cand_k[i]) if key in pos_ref]
        overlaps.append(len(common) / k)
        if common:
            pr, pc = np.array(common).T
            rhos.append(_spearman(pr, pc))
            common_err.append(np.abs(ref_s[i, pr] - cand_s[i, pc]).max())
    finite = bool(np.isfinite(cand_s).all())
    return {
        "users": int(b),
        "k": int(k),
        "recall_overlap": float(np.mean(overlaps)),
        "min_recall_overlap": float(np.min(overlaps)),
        "exact_match_rate": float((ref_k == cand_k).mean()),
        "top1_agreement": float((ref_k[:, 0] == cand_k[:, 0]).mean()),
        "rank_correlation": float(np.mean(rhos)) if rhos else 0.0,
        # Position-wise (sorted lists): robust to swapped near-ties.
        "max_score_diff": float(np.abs(ref_s - cand_s).max()) if finite else float("inf"),
        "mean_score_diff": float(np.abs(ref_s - cand_s).mean()) if finite else float("inf"),
        # Same item in both lists: how far its own score moved.
        "max_common_item_score_diff": float(np.max(common_err)) if common_err else float("inf"),
        "finite_scores": finite,
    }


def merge_reports(named: dict[str, dict]) -> dict:
    """Worst case over several input sets, plus each set's own numbers."""
    worst = {
        "recall_overlap": min(r["recall_overlap"] for r in named.values()),
        "exact_match_rate": min(r["exact_match_rate"] for r in named.values()),
        "top1_agreement": min(r["top1_agreement"] for r in named.values()),
        "rank_correlation": min(r["rank_correlation"] for r in named.values()),
        "max_score_diff": max(r["max_score_diff"] for r in named.values()),
        "mean_score_diff": max(r["mean_score_diff"] for r in named.values()),
        "max_common_item_score_diff": max(r["max_common_item_score_diff"] for r in named.values()),
        "finite_scores": all(r["finite_scores"] for r in named.values()),
    }
    return {"worst": worst, "cases": named}


def enforce(report: dict, min_recall: float, max_score_diff: float | None, what: str) -> dict:
    """Raise ParityError with the observed and allowed numbers when the worst case is outside."""
    worst = report["worst"]
    problems = []
    if not worst["finite_scores"]:
        problems.append("non-finite scores")
    if worst["recall_overlap"] < min_recall:
        problems.append(
            f"recall@K overlap {worst['recall_overlap']:.4f} < allowed {min_recall:.4f}"
        )
    # The score check looks at items both lists contain: an item's score depends only on its
    # own prefix, so its difference is pure numerical error. Position-wise differences also
    # move when a near-tie prunes a different beam early (a ranking change, which the recall
    # check judges), so they are reported but not enforced.
    common = worst["max_common_item_score_diff"]
    if max_score_diff is not None and common > max_score_diff:
        problems.append(
            f"max |score diff| of items in both lists {common:.3g} > allowed {max_score_diff:.3g}"
        )
    report["passed"] = not problems
    report["thresholds"] = {"min_recall_overlap": min_recall, "max_score_diff": max_score_diff}
    if problems:
        raise ParityError(
            f"{what} disagrees with the PyTorch fp32 reference: " + "; ".join(problems), report
        )
    return report
