"""The CUDA path: bf16 autocast and channels_last. Skipped where there is no GPU (CI has none)."""

from __future__ import annotations

import copy

import pytest
import torch

from spottune.config import validate_params
from spottune.engine import DeviceSetup, train_one_epoch
from spottune.models import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(backbone="efficientnet_lite0", weights="imagenet", size=64):
    params = validate_params({"model": {"backbone": backbone, "weights": weights}, "data": {"image_size": size}})
    torch.manual_seed(0)
    return build_model(params, 10).cuda().to(memory_format=torch.channels_last), params


def test_bf16_training_keeps_frozen_branch_and_moves_the_rest():
    model, params = _model()
    setup = DeviceSetup.resolve("cuda", amp=True, channels_last=True)
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 3, 64, 64, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameter_groups(params.optim), lr=0.01, momentum=0.9)
    stats = train_one_epoch(model, optimizer, batches, setup, epoch=0, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("frozen_blocks."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("policy."))
    assert stats["images"] == 96 and torch.isfinite(torch.tensor(stats["loss"]))


@pytest.mark.parametrize("backbone,weights", [("efficientnet_lite0", "imagenet"), ("resnet50", "none")])
def test_conditional_equals_mixed_on_gpu(backbone, weights):
    model, _ = _model(backbone, weights)
    model.eval()
    x = torch.randn(64, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    d = (torch.rand(64, model.num_blocks, device="cuda") > 0.5).float()
    with torch.no_grad():
        model.execution = "mixed"
        mixed = model(x, d).logits
        model.execution = "conditional"
        cond = model(x, d).logits
    # float32 convolutions run as TF32 on the GPU by default, and sub-batches may pick other cuDNN
    # algorithms than the whole batch: compare by relative norm at TF32's precision.
    assert (cond - mixed).norm() / mixed.norm() < 5e-3
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.execution = "mixed"
        mixed16 = model(x, d).logits.float()
        model.execution = "conditional"
        cond16 = model(x, d).logits.float()
    assert (cond16 - mixed16).norm() / mixed16.norm() < 2e-2


def test_graphed_policy_at_inference_gives_the_eager_policys_decisions():
    """The inference graph replays the policy's own kernels on its current weights; training runs it eagerly."""
    model, _ = _model("resnet50", "none", 64)
    policy, graphed = model.policy, model._graphed_policy
    x = torch.randn(32, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    setup = DeviceSetup.resolve("cuda", amp=True, channels_last=True)
    model.eval()
    for _ in range(2):  # the second round after a weight change: the graph reads the parameters in place
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.1 * torch.randn_like(p))
        with torch.inference_mode(), setup.autocast():
            eager, replayed = policy(x).float(), graphed(x).float()
            model.graph_policy = False
            eager_out = model(x)
            model.graph_policy = True
            graphed_out = model(x)
        torch.testing.assert_close(replayed, eager, rtol=1e-2, atol=1e-2)
        assert torch.equal(graphed_out.decisions, eager_out.decisions)
        assert torch.equal(graphed_out.logits, eager_out.logits)
    assert len(graphed._graphs) == 1  # one shape, one graph, reused
    model.train()
    with setup.autocast():
        assert graphed(x).requires_grad  # training: the eager policy, with its autograd graph


def test_inference_over_a_stream_of_batches_equals_each_batch_alone():
    """infer_batches queues each batch's policy one batch ahead; outputs must be those of one call per batch."""
    from spottune.engine import predict

    model, _ = _model("resnet50", "none", 64)
    setup = DeviceSetup.resolve("cuda", amp=True, channels_last=True, normalization=((0.5,) * 3, (0.25,) * 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g), torch.zeros(n, dtype=torch.long))
               for n in (48, 48, 48, 17)]  # a smaller last batch: a second policy graph
    model.eval()
    with torch.no_grad(), setup.autocast():  # logits that split the images about in half in every block
        model.policy.fc.weight.normal_(0, 1.0)
        logits = model.policy(setup.images(batches[0][0])).float()
        model.policy.fc.bias.view(-1, 2)[:, 1] -= (logits[..., 1] - logits[..., 0]).median(0).values
    with torch.inference_mode(), setup.autocast():
        alone = [model(setup.images(x)) for x, _ in batches]
    streamed = predict(model, batches, setup)
    decisions = torch.cat([o.decisions.float().cpu() for o in alone])
    assert 0.2 < decisions.mean() < 0.8 and (decisions.std(0) > 0).sum() >= model.num_blocks // 2
    assert torch.equal(streamed["logits"], torch.cat([o.logits.float().cpu() for o in alone]))
    assert torch.equal(streamed["decisions"], decisions)
