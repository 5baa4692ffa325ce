"""Depression metrics on hand-computed cases."""

import math

import pytest
import torch

from mmsa_emt.metrics import concordance_cc, depression_metrics


def test_ccc_hand_computed():
    # p = [1, 2, 3], y = [2, 4, 6]: means 2 and 4, var 2/3 and 8/3, cov 4/3 -> 2*(4/3) / (2/3 + 8/3 + 4) = 8/22
    assert concordance_cc([1, 2, 3], [2, 4, 6]) == pytest.approx(8 / 22)
    assert concordance_cc([5, 1, 7], [5, 1, 7]) == pytest.approx(1.0)
    assert concordance_cc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert concordance_cc([1, 2, 3], [11, 12, 13]) < 0.1  # perfectly correlated but shifted: low agreement
    assert math.isnan(concordance_cc([2, 2], [2, 2]))


def test_depression_metrics():
    out = depression_metrics(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([2.0, 4.0, 6.0]))
    assert out == {"CCC": round(8 / 22, 4), "MAE": 2.0, "RMSE": round(math.sqrt(14 / 3), 4), "Pearson": 1.0}
    constant = depression_metrics(torch.ones(4), torch.tensor([0.0, 5.0, 10.0, 20.0]))
    assert math.isnan(constant["Pearson"]) and constant["CCC"] == 0.0
