"""Metrics for datasets MMSA does not know: depression severity (PHQ-8) regression on AVEC2019 (E-DAIC)."""

from __future__ import annotations

import numpy as np
import torch


def concordance_cc(pred: np.ndarray, true: np.ndarray) -> float:
    """Lin's concordance correlation coefficient, AVEC's headline metric:
    2 cov(p, y) / (var(p) + var(y) + (mean(p) - mean(y))^2), population moments."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    denominator = pred.var() + true.var() + (pred.mean() - true.mean()) ** 2
    if denominator == 0:
        return float("nan")
    return float(2 * np.mean((pred - pred.mean()) * (true - true.mean())) / denominator)


def depression_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """CCC, MAE, RMSE and Pearson r of predicted against true PHQ-8 scores (rounded like MMSA's metrics)."""
    p = pred.detach().reshape(-1).cpu().double().numpy()
    y = true.detach().reshape(-1).cpu().double().numpy()
    pearson = float(np.corrcoef(p, y)[0, 1]) if p.std() > 0 and y.std() > 0 else float("nan")
    return {"CCC": round(concordance_cc(p, y), 4), "MAE": round(float(np.abs(p - y).mean()), 4),
            "RMSE": round(float(np.sqrt(((p - y) ** 2).mean())), 4), "Pearson": round(pearson, 4)}


DATASET_METRICS = {"avec2019": depression_metrics}
