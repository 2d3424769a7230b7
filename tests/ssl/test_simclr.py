"""SimCLR: the loss is NTXentLoss on the model's embeddings; hard-negative gradient; options; a LARS step."""

from __future__ import annotations

import pytest
import timm.optim
import timm.scheduler
import torch
from torch import nn

from salmask.losses import NTXentLoss
from salmask.ssl import SimCLR

BATCH, SIZE = 4, 16


def tiny_encoder() -> nn.Module:
    encoder = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    encoder.num_features = 8
    return encoder


def tiny_simclr(**kwargs) -> SimCLR:
    torch.manual_seed(0)
    return SimCLR(tiny_encoder(), dim=6, **kwargs).train()


def batch(seed: int = 0, num_hard: int | None = None) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    query, key = torch.randn(2, BATCH, 3, SIZE, SIZE, generator=generator).unbind(0)
    hard_shape = (BATCH, 3, SIZE, SIZE) if num_hard is None else (BATCH, num_hard, 3, SIZE, SIZE)
    return query, key, torch.randn(hard_shape, generator=generator)


@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_is_ntxent_on_the_same_embeddings(symmetric):
    model = tiny_simclr(temperature=0.3, hard_negative_weight=1.5, symmetric_hard_negatives=symmetric)
    query, key, hard = batch()
    valid = torch.tensor([True, False, True, True])
    out = model(query, key, hard, valid)
    with torch.no_grad():
        # Query and key share one forward (BN over the 2B views); hard negatives get their own.
        view_a, view_b = model.embed(torch.cat([query, key])).chunk(2)
        hard_embedding = model.embed(hard)
    expected = NTXentLoss(0.3, 1.5, symmetric_hard_negatives=symmetric)(
        view_a, view_b, hard_embedding, valid, return_logits=True
    )
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)
    assert out.logits.shape == (2 * BATCH, 1 + 2 * BATCH - 2 + 1)
    assert torch.equal(out.targets, torch.zeros(2 * BATCH, dtype=torch.long))


def test_without_hard_negatives_it_is_plain_simclr():
    model = tiny_simclr()
    query, key, _ = batch()
    out = model(query, key)
    with torch.no_grad():
        view_a, view_b = model.embed(torch.cat([query, key])).chunk(2)
    torch.testing.assert_close(out.loss, NTXentLoss(0.2)(view_a, view_b))


def test_several_hard_negatives_per_image():
    model = tiny_simclr()
    query, key, hard = batch(num_hard=2)
    assert model(query, key, hard).logits.shape == (2 * BATCH, 1 + 2 * BATCH - 2 + 2)


def test_hard_negatives_take_no_gradient_unless_asked():
    query, key, hard = batch()
    grads = {}
    for hard_grad in (False, True):
        model = tiny_simclr(hard_negative_grad=hard_grad)
        out = model(query, key, hard)
        out.loss.backward()
        grads[hard_grad] = model.encoder[0].weight.grad.clone()
        # The hard-negative forward is separate, so only its gradient path differs: the losses agree.
        grads[f"loss{hard_grad}"] = out.loss.detach()
    torch.testing.assert_close(grads["lossFalse"], grads["lossTrue"])
    assert not torch.allclose(grads[False], grads[True])

    model = tiny_simclr()
    view_a, view_b = model.embed(torch.cat([query, key])).chunk(2)
    detached = NTXentLoss(0.2)(view_a, view_b, model.embed(hard).detach())
    torch.testing.assert_close(torch.autograd.grad(detached, model.encoder[0].weight)[0], grads[False])


def test_one_lars_step_with_a_warmup_cosine_schedule():
    model = tiny_simclr()
    optimizer = timm.optim.create_optimizer_v2(model, "lars", lr=0.3, weight_decay=1e-6, momentum=0.9)
    scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=10, warmup_t=2, warmup_lr_init=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    query, key, hard = batch()
    out = model(query, key, hard)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    scheduler.step(1)
    assert torch.isfinite(out.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert torch.isfinite(model(query, key, hard).loss)


def test_options_reach_the_loss_and_head():
    model = tiny_simclr(gather_distributed=True, hidden_dim=5, temperature=0.5)
    assert model.criterion.gather_distributed and model.criterion.temperature == 0.5
    assert model.projector[0].out_features == 5
    custom = SimCLR(tiny_encoder(), projector=nn.Linear(8, 3), dim=3)
    assert custom(*batch()).logits.shape == (2 * BATCH, 2 * BATCH)


def test_bad_arguments_name_what_is_wrong():
    encoder = tiny_encoder()
    del encoder.num_features
    with pytest.raises(ValueError, match="feature_dim="):
        SimCLR(encoder)
    with pytest.raises(TypeError, match="projector"):
        SimCLR(tiny_encoder(), projector="mlp")
    with pytest.raises(ValueError, match="hard_negative_weight"):
        SimCLR(tiny_encoder(), hard_negative_weight=-1.0)
    model = tiny_simclr()
    query, key, hard = batch()
    with pytest.raises(ValueError, match="hard_negatives must be"):
        model(query, key, hard[:, :1])
    with pytest.raises(ValueError, match="hard_negative_valid was given without"):
        model(query, key, None, torch.ones(BATCH, dtype=torch.bool))
    with pytest.raises(ValueError, match="share one shape"):
        model(query, key[:2])
