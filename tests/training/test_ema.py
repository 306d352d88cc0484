import torch
from torch import nn

from unclip.training.ema import ema_decay_at, make_ema


def test_ema_follows_the_closed_form_average():
    model = nn.Linear(3, 2)
    ema = make_ema(model, decay=0.9, warmup=False)
    expected = model.weight.detach().clone()
    ema.update_parameters(model)  # first update copies
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
        expected = 0.9 * expected + 0.1 * model.weight.detach()
    assert torch.allclose(ema.module.weight, expected, atol=1e-6)
    assert not any(p.requires_grad for p in ema.parameters())


def test_ema_warmup_ramps_the_decay_and_state_round_trips():
    assert ema_decay_at(0, 0.9999, True) == 0.1
    assert abs(ema_decay_at(90, 0.9999, True) - 0.91) < 1e-12
    assert ema_decay_at(10**7, 0.9999, True) == 0.9999
    model = nn.Linear(2, 2)
    ema = make_ema(model, decay=0.99, warmup=True)
    ema.update_parameters(model)
    ema.update_parameters(model)
    clone = make_ema(nn.Linear(2, 2), decay=0.99, warmup=True)
    clone.load_state_dict(ema.state_dict())
    assert int(clone.n_averaged) == 2 and torch.equal(clone.module.weight, ema.module.weight)
