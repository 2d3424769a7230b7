"""MoCo: momentum update, queue, loss wiring, per-sample hard negatives, state round trip, BN modes."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from salmask import Saliency
from salmask.losses import HardNegativeInfoNCE
from salmask.ssl import MaskedViews, MoCo, batch_shuffle, batch_unshuffle, build_encoder, check_queue_size

BATCH, SIZE, QUEUE = 4, 16, 32


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


def tiny_moco(seed: int = 0, **kwargs) -> MoCo:
    torch.manual_seed(seed)
    options = {"dim": 6, "queue_size": QUEUE, "momentum": 0.9, **kwargs}
    return MoCo(tiny_encoder(), **options)


def batch(seed: int = 0, num_hard: int | None = None) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    query, key = torch.randn(2, BATCH, 3, SIZE, SIZE, generator=generator).unbind(0)
    hard_shape = (BATCH, 3, SIZE, SIZE) if num_hard is None else (BATCH, num_hard, 3, SIZE, SIZE)
    return query, key, torch.randn(hard_shape, generator=generator)


def key_side_params(model: MoCo) -> list[torch.Tensor]:
    return [p.detach().clone() for p in (*model.momentum_encoder.parameters(), *model.momentum_projector.parameters())]


def query_side_params(model: MoCo) -> list[torch.Tensor]:
    return [p.detach().clone() for p in (*model.encoder.parameters(), *model.projector.parameters())]


def test_key_encoder_is_a_frozen_copy_at_construction():
    model = tiny_moco()
    for query_param, key_param in zip(query_side_params(model), key_side_params(model), strict=True):
        assert torch.equal(query_param, key_param)
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    assert not any(p.requires_grad for p in model.momentum_projector.parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())
    assert model.momentum_encoder[0].weight.data_ptr() != model.encoder[0].weight.data_ptr()


def test_momentum_update_is_an_exponential_moving_average():
    model = tiny_moco(momentum=0.75)
    with torch.no_grad():
        for param in (*model.encoder.parameters(), *model.projector.parameters()):
            param.add_(torch.randn_like(param))
    before_key, query = key_side_params(model), query_side_params(model)
    model.momentum_update()
    for old_key, query_param, new_key in zip(before_key, query, key_side_params(model), strict=True):
        torch.testing.assert_close(new_key, 0.75 * old_key + 0.25 * query_param)
    model.momentum = 1.0
    frozen = key_side_params(model)
    model.momentum_update()
    assert all(torch.equal(a, b) for a, b in zip(frozen, key_side_params(model), strict=True))


def test_momentum_update_leaves_key_side_batch_norm_statistics_alone():
    model = tiny_moco()
    model.encoder[1].running_mean.fill_(3.0)
    model.momentum_update()
    assert torch.equal(model.momentum_encoder[1].running_mean, torch.zeros(8))


def test_training_step_updates_key_encoder_then_enqueues_keys_only():
    model = tiny_moco().train()
    query, key, hard = batch()
    with torch.no_grad():
        model.encoder[0].weight.add_(1.0)  # make the query side differ so the update is visible
    expected_key_params = [
        0.9 * k + 0.1 * q for k, q in zip(key_side_params(model), query_side_params(model), strict=True)
    ]
    initial_queue = model.queue.keys.clone()
    out = model(query, key, hard)
    for expected, actual in zip(expected_key_params, key_side_params(model), strict=True):
        torch.testing.assert_close(actual, expected)
    keys = model.embed_key(key)
    assert int(model.queue.pointer) == BATCH  # B keys, no hard negative
    torch.testing.assert_close(model.queue.keys[:, :BATCH], keys.t())
    assert torch.equal(model.queue.keys[:, BATCH:], initial_queue[:, BATCH:])
    hard_keys = model.embed_key(hard)
    assert not torch.isclose(model.queue.keys.t()[:, None], hard_keys[None]).all(-1).any()
    assert torch.isfinite(out.loss)


def test_eval_mode_changes_neither_key_encoder_nor_queue():
    model = tiny_moco()
    with torch.no_grad():
        model.encoder[0].weight.add_(1.0)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        out = model(*batch())
    assert torch.isfinite(out.loss)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_logits_are_the_loss_module_on_the_embeddings():
    model = tiny_moco().train()
    query, key, hard = batch()
    valid = torch.tensor([True, False, True, True])
    queue_before = model.queue.keys.clone()
    out = model(query, key, hard, valid)
    # After the step the key encoder is fixed, and train-mode BN gives the same embeddings again.
    expected = HardNegativeInfoNCE(0.2, 2.0)(
        model.embed_query(query), model.embed_key(key), queue_before, model.embed_key(hard), valid, return_logits=True
    )
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)
    assert out.logits.shape == (BATCH, 1 + QUEUE + 1)
    assert torch.equal(out.targets, torch.zeros(BATCH, dtype=torch.long))
    assert out.logits[1, -1] == float("-inf") and torch.isfinite(out.logits[[0, 2, 3], -1]).all()


def test_each_query_is_contrasted_with_its_own_hard_negative():
    model = tiny_moco().train()
    query, key, hard = batch()
    out = model(query, key, hard)
    q, t = model.embed_query(query), model.embed_key(hard)
    torch.testing.assert_close(out.logits[:, -1], 2.0 * (q * t).sum(1) / 0.2)
    # Rolling the hard negatives moves each one to the next query: the column follows its image.
    rolled_model = tiny_moco().train()
    rolled = rolled_model(query, key, hard.roll(1, dims=0))
    torch.testing.assert_close(rolled.logits[:, -1], 2.0 * (q * t.roll(1, dims=0)).sum(1) / 0.2)


def test_several_hard_negatives_per_image():
    model = tiny_moco().train()
    query, key, hard = batch(num_hard=3)
    out = model(query, key, hard, torch.ones(BATCH, 3, dtype=torch.bool))
    assert out.logits.shape == (BATCH, 1 + QUEUE + 3)
    assert int(model.queue.pointer) == BATCH


def test_without_hard_negatives_it_is_moco_v2():
    model = tiny_moco().train()
    query, key, _ = batch()
    out = model(query, key)
    assert out.logits.shape == (BATCH, 1 + QUEUE)


def test_one_sgd_step_trains_the_query_side_only():
    model = tiny_moco().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    query, key, hard = batch()
    before_query = query_side_params(model)
    out = model(query, key, hard)
    optimizer.zero_grad()
    out.loss.backward()
    after_update_keys = key_side_params(model)
    optimizer.step()
    assert torch.isfinite(out.loss) and out.loss > 0
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before_query, query_side_params(model), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(after_update_keys, key_side_params(model), strict=True))
    second = model(query, key, hard)
    assert torch.isfinite(second.loss)


def test_state_dict_round_trip_resumes_exactly():
    model = tiny_moco(seed=0).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        out = model(*batch(step))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    assert {"queue.keys", "queue.pointer", "momentum_encoder.0.weight", "momentum_encoder.1.running_mean"} <= set(
        model.state_dict()
    )

    resumed = tiny_moco(seed=1).train()
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name

    for run, opt in ((model, optimizer), (resumed, resumed_optimizer)):
        out = run(*batch(3))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        run.last_loss = out.loss.detach()
    assert torch.equal(model.last_loss, resumed.last_loss)
    for name, tensor in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_sync_batch_norm_mode_converts_both_encoders_and_runs_in_one_process():
    model = tiny_moco(batch_norm="sync").train()
    assert isinstance(model.encoder[1], nn.SyncBatchNorm)
    assert isinstance(model.momentum_encoder[1], nn.SyncBatchNorm)
    out = model(*batch())
    out.loss.backward()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("mode", ["sync", "local"])
def test_in_one_process_shuffle_bn_is_plain_bn(mode):
    shuffled = tiny_moco(batch_norm="shuffle").train()
    other = tiny_moco(batch_norm=mode).train()
    query, key, hard = batch()
    assert torch.equal(shuffled(query, key, hard).logits, other(query, key, hard).logits)


def test_batch_shuffle_is_the_identity_in_one_process():
    images = torch.randn(3, 2)
    shuffled, restore = batch_shuffle(images)
    assert shuffled is images and restore is None
    assert batch_unshuffle(images, None) is images


def test_projector_and_feature_dim_options():
    encoder = tiny_encoder()
    del encoder.num_features
    with pytest.raises(ValueError, match="feature_dim="):
        MoCo(encoder)
    model = MoCo(encoder, feature_dim=8, projector=nn.Linear(8, 16), dim=16, queue_size=QUEUE)
    assert isinstance(model.momentum_projector, nn.Linear)
    assert model(*batch()).logits.shape == (BATCH, 1 + QUEUE + 1)
    default = tiny_moco(hidden_dim=5)
    assert default.projector[0].out_features == 5 and default.projector[-1].out_features == 6


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        tiny_moco(batch_norm="ghost")
    with pytest.raises(ValueError, match="momentum"):
        tiny_moco(momentum=1.5)
    with pytest.raises(ValueError, match="temperature"):
        tiny_moco(temperature=0.0)
    with pytest.raises(TypeError, match="projector"):
        tiny_moco(projector="mlp")
    with pytest.raises(TypeError, match=r"encoder must be an nn\.Module"):
        MoCo(lambda x: x, feature_dim=8)
    model = tiny_moco()
    query, key, hard = batch()
    with pytest.raises(ValueError, match="hard_negatives must be"):
        model(query, key, hard[:2])
    with pytest.raises(TypeError, match=r"hard_negatives must be a torch\.Tensor"):
        model(query, key, [hard])
    with pytest.raises(ValueError, match="hard_negative_valid was given without"):
        model(query, key, None, torch.ones(BATCH, dtype=torch.bool))
    with pytest.raises(ValueError, match="share one shape"):
        model(query, key[:2])
    with pytest.raises(TypeError, match=r"key must be a torch\.Tensor"):
        model(query, None)


def test_masked_resnet18_step_end_to_end():
    torch.manual_seed(0)
    model = MoCo(build_encoder("resnet18", small_images=True), queue_size=64).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.015, momentum=0.9, weight_decay=1e-4)
    masker = MaskedViews("high_pass", patch_size=8, generator=torch.Generator().manual_seed(0))
    query, key = torch.randn(2, BATCH, 3, 32, 32).unbind(0)
    saliency = torch.zeros(BATCH, 4, 4, dtype=torch.bool)
    saliency[:3, 1:3, 1:3] = True
    views = masker(query, key, Saliency(saliency), Saliency(saliency))
    out = model(views.query, views.key, views.hard_negatives, views.hard_negative_valid)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (BATCH, 1 + 64 + 1)
    assert out.logits[3, -1] == float("-inf")


@pytest.mark.cuda
def test_moco_step_has_no_host_synchronisation_on_cuda():
    model = tiny_moco().cuda().train()
    query, key, hard = (tensor.cuda() for tensor in batch())
    valid = torch.tensor([True, False, True, True], device="cuda")
    model(query, key, hard, valid).loss.backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(query, key, hard, valid)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.loss.is_cuda


@pytest.mark.parametrize(("queue_size", "fits"), [(1024, False), (960, False), (959, True), (256, True)])
def test_a_queue_that_would_hold_a_batch_s_own_earlier_keys_is_refused(queue_size, fits):
    # 1,024 images in batches of 64: a queue of 960 keys or more holds, for half of each batch, the key the
    # same image gave one epoch before.
    if fits:
        assert check_queue_size(queue_size, num_images=1024, batch_size=64) == queue_size
    else:
        with pytest.raises(ValueError, match=r"queue_size=\d+ .* at most 256 keys"):
            check_queue_size(queue_size, num_images=1024, batch_size=64)


def test_the_refused_queue_does_hold_own_keys_for_half_a_batch():
    # The rule's premise, counted: a queue of N - B keys over shuffled epochs.
    generator = torch.Generator().manual_seed(0)
    num_images, batch_size = 256, 16
    queue_size = num_images - batch_size
    queued: list[int] = []
    own = 0
    for _ in range(4):
        order = torch.randperm(num_images, generator=generator).tolist()
        for start in range(0, num_images, batch_size):
            batch = order[start : start + batch_size]
            own += len(set(batch) & set(queued[-queue_size:]))
            queued += batch
    batches_after_the_first_epoch = 3 * num_images // batch_size
    assert own / (batches_after_the_first_epoch * batch_size) > 0.4
