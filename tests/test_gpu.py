"""The CUDA path: bf16 autocast and channels_last. Skipped where there is no GPU (CI has none)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import pytest
import torch

from spottune.config import validate_params
from spottune.engine import DeviceSetup, train_one_epoch
from spottune.models import build_model

pytestmark = pytest.mark.gpu  # skipped without CUDA (conftest.py)


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_route_kernels_compute_the_torch_arithmetic(dtype, layout):
    """The fused kernels against the same arithmetic in torch: masked gradients bit for bit, <g, F~ - F> exact."""
    from spottune.models import route_kernels

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (9, 24, 13, 11)  # an odd image size: the last program of each image is partial

    def rand():
        return torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(memory_format=layout)

    grad, f, t = rand(), rand(), rand()
    w = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1], device="cuda", dtype=dtype)
    assert route_kernels._fusable(grad, f, t)
    out = route_kernels.route_forward(f, t, w)
    assert out.stride() == t.stride()
    assert torch.equal(out, torch.where(w.view(-1, 1, 1, 1) != 0, t, f))
    for has_f in (True, False):
        gf, gt, gd = route_kernels.route_backward(grad, t if has_f else t - f, f if has_f else None, w, True, True, True)
        assert torch.equal(gf, torch.where(w.view(-1, 1, 1, 1) != 0, 0, grad))
        assert torch.equal(gt, torch.where(w.view(-1, 1, 1, 1) != 0, grad, 0))
        diff = t.double() - f.double() if has_f else (t - f).double()
        exact = (grad.double() * diff).sum((1, 2, 3))
        tol = 1e-12 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(gd.double(), exact, rtol=tol, atol=tol * exact.abs().max().item())
    none_f, none_t, only_d = route_kernels.route_backward(grad, t, f, w, False, False, True)
    assert none_f is None and none_t is None
    assert torch.equal(only_d, route_kernels.route_backward(grad, t, f, w, True, True, True)[2])


@pytest.mark.parametrize("decisions_grad", [True, False])
def test_split_training_on_the_gpu_gives_the_mixed_formulations_gradients(decisions_grad):
    """float64 on CUDA: the fused route kernels inside split training, against the mixed formulation."""
    params = validate_params({"model": {"backbone": "resnet50", "weights": "none"}, "data": {"image_size": 32}})
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(12, 3, 32, 32, generator=g, dtype=torch.float64).cuda()
    d0 = (torch.rand(12, 16, generator=g) < 0.5).double().cuda()
    d0[:, 3] = 1  # blocks where every image agrees: the chosen branch's own output
    d0[:, 5] = 0
    results = {}
    for execution in ("mixed", "split"):
        torch.manual_seed(0)
        model = build_model(params, 10).double().cuda().train()
        model.execution = execution
        x, d = x0.clone().requires_grad_(True), d0.clone().requires_grad_(decisions_grad)  # False: fixed decisions
        out = model(x, d)
        out.logits.pow(2).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[execution] = (out.logits.detach(), x.grad, d.grad, grads)
    (lm, xm, dm, gm), (ls, xs, ds, gs) = results["mixed"], results["split"]
    torch.testing.assert_close(ls, lm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xs, xm, rtol=1e-9, atol=1e-9)
    if decisions_grad:
        torch.testing.assert_close(ds, dm, rtol=1e-9, atol=1e-9)
    else:
        assert ds is None and dm is None
    assert gs.keys() == gm.keys()  # a tuned copy no image took is handed its exact zero gradient
    for k, v in gs.items():
        torch.testing.assert_close(v, gm[k], rtol=1e-9, atol=1e-9, msg=k)
    assert all(torch.count_nonzero(v) == 0 for k, v in gs.items() if k.startswith("tuned_blocks.5."))


def test_the_policy_on_a_side_stream_in_training_gives_the_same_step(monkeypatch):
    """Training runs the policy (and so its backward) on a side stream: the same loss and gradients, bit for bit."""
    from spottune.models.spottune import SpotTuneNet

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    model, _ = _model("resnet50", "none", 64)
    model.train()
    x = torch.randn(16, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    setup = DeviceSetup.resolve("cuda", amp=True, channels_last=True)
    runs = {}
    for beside in (True, False):
        if not beside:
            monkeypatch.setattr(SpotTuneNet, "_routes_beside", staticmethod(lambda images: False))
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with setup.autocast():
            out = model(x)
            loss = out.logits.float().logsumexp(1).mean()
        loss.backward()
        runs[beside] = (loss.detach(), out.decisions.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (l1, d1, g1), (l2, d2, g2) = runs[True], runs[False]
    assert torch.equal(d1, d2) and torch.equal(l1, l2)
    assert g1.keys() == g2.keys() and any(k.startswith("policy.") for k in g1)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_frozen_conv_relu_computes_the_torch_layers(dtype, residual):
    """FrozenConvReLU's cuDNN kernel (no autograd) against conv + bias (+ z) + ReLU in torch (what autograd gets)."""
    from spottune.models.fold import FrozenConvReLU

    g = torch.Generator(device="cuda").manual_seed(0)
    conv = torch.nn.Conv2d(32, 64, 3, stride=2, padding=1).cuda().requires_grad_(False)
    unit = FrozenConvReLU(conv)
    x = torch.randn(8, 32, 20, 20, device="cuda", generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    z = torch.randn(8, 64, 10, 10, device="cuda", generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        fused = unit(x, z if residual else None).float()
    assert unit.fused and unit._cast  # the fused kernel ran, not the fallback
    xx = x.clone().requires_grad_(True)
    with autocast:
        layers = unit(xx, z if residual else None)
    assert layers.grad_fn is not None  # autograd recording: torch's layers
    layers = layers.float()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3  # TF32 / bf16 rounding, in different places
    assert fused.shape == layers.shape and (fused - layers).norm() / layers.norm() < tol

    # Under autograd with fused_under_autograd (while SpotTune's blocks are captured as CUDA graphs): the
    # fused kernel and its own backward (keeping a mask, or the output where there is a residual), against
    # torch's layers' gradients.
    grads = {}
    for fused_under_autograd in (False, True):
        unit.fused_under_autograd = fused_under_autograd
        xx = x.clone().requires_grad_(True)
        zz = z.clone().requires_grad_(True) if residual else None
        with autocast:
            out = unit(xx, zz)
        assert (type(out.grad_fn).__name__ == "_FusedUnitBackward") == fused_under_autograd
        out.float().square().sum().backward()
        assert xx.grad.is_contiguous(memory_format=torch.channels_last)  # the data gradient from a shape alone
        grads[fused_under_autograd] = (out.detach().float(), xx.grad.float(), zz.grad.float() if residual else None)
    for a, b in zip(grads[True], grads[False]):
        if b is not None:
            assert a.shape == b.shape and (a - b).norm() / b.norm() < 2 * tol


def test_fused_frozen_units_replace_the_resnet_blocks_layers():
    """A ResNet-50 frozen block as executed: three fused units on CUDA, and the fused kernels really run."""
    from spottune.models.fold import FrozenConvReLU

    model, _ = _model("resnet50", "none", 64)
    units = [m for b in model.runtime_frozen_blocks() for m in b.modules() if isinstance(m, FrozenConvReLU)]
    assert len(units) == 3 * model.num_blocks
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, torch.zeros(4, model.num_blocks, device="cuda"))
    assert all(u.fused for u in units) and all(u._cast for u in units)


@pytest.fixture
def process_group_of_one():
    """An NCCL process group of one process: DDP's hooks and buckets run as they do on many GPUs, and its
    average of one rank's gradients is those gradients."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _steps_replayed_and_eager(build, steps: list[tuple[torch.Tensor, ...]], modes: tuple[str, ...]) -> dict:
    """Per mode ('eager', 'graphs', 'ddp': graphs under DistributedDataParallel as spottune.distributed builds
    it), each step's logits, input gradients, parameter gradients and BatchNorm statistics."""
    from torch.nn.parallel import DistributedDataParallel

    runs = {}
    for mode in modes:
        torch.manual_seed(0)
        model = build()
        model.graph_blocks = mode != "eager"
        # These steps pass SpotTune its decisions, so its policy sits out: only here must DDP look for unused
        # parameters (training always runs the policy, and spottune.distributed never looks).
        forward = model if mode != "ddp" else DistributedDataParallel(
            model, device_ids=[0], broadcast_buffers=False, find_unused_parameters=hasattr(model, "policy"))
        model.train()
        results = []
        for inputs in steps:
            model.zero_grad(set_to_none=True)
            leaves = [t.clone().requires_grad_(True) for t in inputs]
            out = forward(*leaves)
            out.logits.float().square().mean().backward()
            # clones: a graph's gradients live in its own buffers, which the next replay rewrites
            results.append((out.logits.detach().clone(), [None if t.grad is None else t.grad.clone() for t in leaves],
                            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                            {n: b.clone() for n, b in model.named_buffers() if "running" in n}))
            del out  # no step's autograd graph alive when the next one is captured
        graphs = model._block_graphs if hasattr(model, "_block_graphs") else model._graphs
        assert (graphs._graphed is not None) == (mode != "eager")  # steps 2 and 3 replayed the graph
        runs[mode] = results
    return runs


def _assert_same_steps(replayed: list, eager: list) -> None:
    def close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
        # to rounding, relative to the tensor's scale: sums over a batch cancel, so small entries carry
        # the absolute error of large ones
        scale = want.abs().max().item()
        worst = (got - want).abs().max().item() / max(scale, 1e-30)
        assert worst < 1e-4, f"{name}: max |replayed - eager| = {worst:.1e} of max |eager|"

    for step, ((le, xe, ge, se), (lg, xg, gg, sg)) in enumerate(zip(eager, replayed)):
        close(lg, le, f"step {step} logits")
        for i, (a, b) in enumerate(zip(xg, xe)):
            assert (a is None) == (b is None), f"step {step}: input {i} has a gradient in one run only"
            if b is not None:
                close(a, b, f"step {step} gradient of input {i}")
        assert gg.keys() == ge.keys()
        for k in ge:
            close(gg[k], ge[k], f"step {step} {k}")
        for k in se:
            close(sg[k], se[k], f"step {step} {k}")


def _split_steps(routing: str = "per-image") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four steps of SpotTune split training: images and decisions of one routing pattern."""
    g = torch.Generator(device="cuda").manual_seed(0)
    steps = []
    for _ in range(4):
        d = (torch.rand(8, 16, device="cuda", generator=g) < 0.5).float()
        d[0], d[1] = 0.0, 1.0  # every block mixed: one pattern in every step
        if routing == "agreeing":
            d[:, 1::3], d[:, 2::3] = 1.0, 0.0
        steps.append((torch.randn(8, 3, 64, 64, device="cuda", generator=g).contiguous(memory_format=torch.channels_last), d))
    return steps


def _spottune_resnet50() -> torch.nn.Module:
    params = validate_params({"model": {"backbone": "resnet50", "weights": "none", "dropout": 0.0},
                              "data": {"image_size": 64}})  # no dropout: the same function in every run
    return build_model(params, 10).cuda().to(memory_format=torch.channels_last)


@pytest.mark.parametrize("routing", ["per-image", "agreeing"])
def test_split_training_replayed_as_cuda_graphs_computes_the_eager_step(monkeypatch, process_group_of_one, routing):
    """Blocks replayed as CUDA graphs (block_graphs.py), alone and under DDP, against eager split training, step
    by step on new images and decisions of one routing pattern: the same logits, input, decision and weight
    gradients and BatchNorm statistics (float32; cuDNN may pick other kernels in a graph, so to rounding).
    'agreeing' routes every image of some blocks alike: their tuned copies get zero gradients from either,
    and DDP, which looks for no unused parameters, gets a gradient for every parameter."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    runs = _steps_replayed_and_eager(_spottune_resnet50, _split_steps(routing), ("eager", "graphs", "ddp"))
    _assert_same_steps(runs["graphs"], runs["eager"])
    _assert_same_steps(runs["ddp"], runs["eager"])
    if routing == "agreeing":  # no image tuned block 2
        assert all(torch.count_nonzero(v) == 0 for k, v in runs["ddp"][-1][2].items() if k.startswith("tuned_blocks.2."))


@pytest.mark.parametrize("method", ["finetune", "lastk"])
def test_baseline_step_replayed_as_a_cuda_graph_computes_the_eager_step(monkeypatch, process_group_of_one, method):
    """A baseline's whole network replayed as one CUDA graph, alone and under DDP, against the eager step."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    g = torch.Generator(device="cuda").manual_seed(1)
    steps = [(torch.randn(8, 3, 64, 64, device="cuda", generator=g).contiguous(memory_format=torch.channels_last),)
             for _ in range(4)]
    params = validate_params({"model": {"backbone": "resnet50", "weights": "none", "dropout": 0.0, "method": method},
                              "data": {"image_size": 64}})
    runs = _steps_replayed_and_eager(
        lambda: build_model(params, 10).cuda().to(memory_format=torch.channels_last), steps, ("eager", "graphs", "ddp"))
    _assert_same_steps(runs["graphs"], runs["eager"])
    _assert_same_steps(runs["ddp"], runs["eager"])
    if method == "lastk":
        assert not any(k.startswith("stem.") for k in runs["graphs"][-1][2])  # the frozen prefix gets no gradient


def _invalidating_captures(monkeypatch, fail: Callable[[int], bool]) -> list[int]:
    """torch.cuda.make_graphed_callables, whose n-th call (from 1) has its capture invalidated where fail(n):
    a CUDA call that a capture refuses, its error swallowed, so that the capture's next kernel fails with
    "operation failed due to a previous error during capture", as seen under DDP. Returns the calls made."""
    real, calls = torch.cuda.make_graphed_callables, []

    def graphed(step, sample, **kw):
        calls.append(len(calls) + 1)
        if not fail(calls[-1]):
            return real(step, sample, **kw)

        def invalidating(*args):
            if torch.cuda.is_current_stream_capturing():
                with contextlib.suppress(RuntimeError):
                    torch.cuda.synchronize()  # refused while capturing: the capture is invalidated
            return step(*args)

        return real(invalidating, sample, **kw)

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", graphed)
    return calls


def test_a_failed_capture_is_captured_again_and_replays_the_eager_step(monkeypatch, process_group_of_one):
    """Each model's first capture attempt invalidated (alone and under DDP): a warning, a second attempt, and then
    the same steps as eager execution; the default stream is current again afterwards."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    steps = _split_steps()
    eager = _steps_replayed_and_eager(_spottune_resnet50, steps, ("eager",))["eager"]
    calls = _invalidating_captures(monkeypatch, fail=lambda n: n % 2 == 1)
    with pytest.warns(RuntimeWarning, match=r"attempt 1 of 3\), capturing again") as caught:
        runs = _steps_replayed_and_eager(_spottune_resnet50, steps, ("graphs", "ddp"))
    assert calls == [1, 2, 3, 4] and len([w for w in caught if "attempt" in str(w.message)]) == 2
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    _assert_same_steps(runs["graphs"], eager)
    _assert_same_steps(runs["ddp"], eager)


def test_a_capture_failing_every_attempt_falls_back_to_eager_steps(monkeypatch):
    """Three failed attempts: one warning, then the step and every later one run eagerly (no more attempts);
    BatchNorm statistics, the random number generator and the default stream as before the attempts."""
    model = _spottune_resnet50()
    model.graph_blocks = True
    model.train()
    calls = _invalidating_captures(monkeypatch, fail=lambda n: True)
    x, d = _split_steps()[0]
    model(x, d)  # the pattern's first step runs eagerly; the second captures
    before = copy.deepcopy(model.state_dict())
    rng = torch.cuda.get_rng_state()
    with pytest.warns(RuntimeWarning, match="goes on without CUDA graphs"):
        model(x, d)  # decisions given and no dropout: an eager step draws no random numbers
    assert torch.equal(torch.cuda.get_rng_state(), rng)  # the attempts' warm-up draws are undone
    model(x, d)
    assert calls == [1, 2, 3] and model.graph_failure().startswith("capture failed 3 times")
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.rand(4, device="cuda")  # the generator draws eagerly again
    after = model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert all(k.startswith("stem.") or "running" in k or "num_batches" in k for k in moved), moved


@pytest.mark.parametrize("method", ["finetune", "spottune"])
def test_training_whose_captures_all_fail_equals_training_without_graphs(monkeypatch, method):
    """An optional speed-up that fails never ends a run: the epoch completes eagerly, with the results of
    training with the graphs off (dropout and Gumbel noise included: the generator is put back).

    Deterministic kernels (conftest.py sets CUBLAS_WORKSPACE_CONFIG): with the default ones two
    eager trainings of a randomly initialised ResNet-50 already differ (on an H200 by up to 0.11 in a
    step's loss by the sixth step), as much as a fallen-back one did. SpotTune's policy starts nearly
    certain (every block tuned) so that a routing pattern repeats and its capture is attempted."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # rounding small enough to compare
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 64, 64, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(6)]
    probe = torch.randn(16, 3, 64, 64, generator=g).cuda().contiguous(memory_format=torch.channels_last)
    setup = DeviceSetup.resolve("cuda", amp=False, channels_last=True)

    def train(graphs: bool):
        params = validate_params({"model": {"backbone": "resnet50", "weights": "none", "method": method},
                                  "data": {"image_size": 64}, "policy": {"init_tune_probability": 0.9999}})
        torch.manual_seed(0)
        model = build_model(params, 10).cuda().to(memory_format=torch.channels_last)
        model.graph_blocks = graphs
        # a small step: six steps of a well-conditioned run, so rounding is not amplified into other weights
        groups = [{**g, "lr": 1e-3} for g in model.parameter_groups(params.optim)]
        optimizer = torch.optim.SGD(groups, lr=1e-3, momentum=0.9)
        stats = train_one_epoch(model, optimizer, batches, setup, epoch=0, progress=False)
        with torch.no_grad():
            logits = model.eval()(probe).logits.float()
        return stats, logits, model.graph_failure()

    try:
        eager, eager_logits, _ = train(False)
        calls = _invalidating_captures(monkeypatch, fail=lambda n: True)
        with pytest.warns(RuntimeWarning, match="goes on without CUDA graphs"):
            fell_back, logits, failure = train(True)
    finally:
        torch.use_deterministic_algorithms(was)
    assert calls == [1, 2, 3] and failure.startswith("capture failed 3 times")
    assert fell_back["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    # the trained models compute the same function, to rounding
    assert (logits - eager_logits).abs().max().item() <= 1e-3 * eager_logits.abs().max().item()

