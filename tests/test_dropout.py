"""The CPU dropout (mask from numpy's PCG64): nn.Dropout's function, seeds, checkpoint replay, the swap in BERT."""

import pytest
import torch
from conftest import build_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmsa_emt.fast.dropout import Dropout, use_numpy_dropout


def test_keeps_one_minus_p_scales_the_rest_and_routes_gradients_through_the_kept():
    torch.manual_seed(0)
    x = torch.randn(200, 500, requires_grad=True)
    y = Dropout(0.3).train()(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # 100,000 draws: std of the share 0.0014
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.7)


def test_seeded_by_torch_replayed_by_checkpoint_and_identity_in_eval():
    drop, x = Dropout(0.5).train(), torch.randn(4, 64)
    torch.manual_seed(1)
    first = drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), first)
    assert not torch.equal(drop(x), first)  # the next draw differs
    torch.manual_seed(2)
    reference = drop(x)
    torch.manual_seed(2)
    leaf = x.clone().requires_grad_()
    checkpoint(lambda t: drop(t).square(), leaf, use_reentrant=False).sum().backward()  # recomputed in backward
    torch.testing.assert_close(leaf.grad, 4 * reference)  # d(y^2)/dx = 2 y / (1 - p): the forward's own mask
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_edge_rates_behave_like_nn_dropout(p):
    x = torch.randn(3, 5)
    torch.testing.assert_close(Dropout(p).train()(x), nn.Dropout(p).train()(x))


def test_every_dropout_is_swapped_back_and_forth_and_state_dict_unchanged(tiny_config):
    """``numpy_dropout``: every nn.Dropout of the model (BERT's, the fusion's, the heads') becomes this Dropout, and
    back with ``numpy_dropout: false`` (torch's masks, as the authors); the same modules, rates and keys."""
    model = build_model(tiny_config)
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Dropout)}
    assert kinds == {Dropout}
    assert {type(m) for m in build_model(tiny_config, numpy_dropout=False).modules()
            if isinstance(m, nn.Dropout)} == {nn.Dropout}
    bert = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.2), nn.Sequential(nn.Dropout(0.1)))
    keys = list(bert.state_dict())
    assert use_numpy_dropout(bert) == 2
    assert [m.p for m in bert.modules() if isinstance(m, Dropout)] == [0.2, 0.1]
    assert list(bert.state_dict()) == keys
    assert use_numpy_dropout(bert, False) == 2 and all(type(m) is not Dropout for m in bert.modules())


def test_swapped_back_it_draws_torchs_masks():
    x, drop = torch.randn(8, 16), Dropout(0.4).train()
    use_numpy_dropout(drop, False)
    torch.manual_seed(3)
    ours = drop(x)
    torch.manual_seed(3)
    assert torch.equal(ours, nn.Dropout(0.4).train()(x))
