"""SpotTune's routing semantics on real pretrained weights and on the ResNets."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from spottune.config import PolicyParams
from spottune.models.backbones import build_backbone
from spottune.models.baselines import FineTuneNet
from spottune.models.policy import RoutingPolicy, tune_probability, usage_term
from spottune.models.spottune import SpotTuneNet


def _spottune(backbone_name: str, weights: str, image_size: int = 32, **policy) -> SpotTuneNet:
    torch.manual_seed(0)
    return SpotTuneNet(build_backbone(backbone_name, weights, image_size), 10, PolicyParams(**policy))


def _through(stem, blocks, neck, head, x):
    x = stem(x)
    for b in blocks:
        x = b(x)
    return head(neck(x))


@pytest.mark.parametrize("name,weights", [("efficientnet_lite0", "imagenet"), ("resnet26", "none"), ("resnet18", "none")])
@pytest.mark.parametrize("execution", ["mixed", "conditional"])
@pytest.mark.parametrize("fold", [False, True])
def test_forced_frozen_equals_pretrained_backbone(name, weights, execution, fold):
    """Bit for bit as the pretrained network; with BN folded into the convolutions (training), to float32 rounding."""
    model = _spottune(name, weights).eval()
    model.execution = execution
    model.fold_frozen_bn = fold
    if fold:  # folding applies in training: train mode, with stem and neck kept on their running statistics
        model.train()
        model.stem.eval()
        model.neck.eval()
    torch.manual_seed(0)  # the same initial weights where there are no pretrained ones
    reference = build_backbone(name, weights, 32)  # an untouched copy of the pretrained network
    for m in (reference.stem, reference.blocks, reference.neck):
        m.eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        out = model(x, decisions=torch.zeros(6, model.num_blocks))
        expected = _through(reference.stem, reference.blocks, reference.neck, model.head, x)
    tolerance = {} if fold else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(out.logits, expected, **tolerance)


@pytest.mark.parametrize("name,weights,folds", [("efficientnet_lite0", "imagenet", True), ("resnet50", "none", True),
                                                ("resnet26", "none", False)])
def test_folded_frozen_blocks_compute_the_blocks_function_without_batchnorm(name, weights, folds):
    """float64, with BN statistics and affine weights far from identity, so a wrong fold or fusion shows."""
    from spottune.models.fold import fold_batchnorm

    blocks = build_backbone(name, weights, 32).blocks.double().eval()
    g = torch.Generator().manual_seed(0)
    for m in blocks.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -1, 1), (m.running_var, 0.3, 3), (m.weight.data, 0.5, 2), (m.bias.data, -1, 1)):
                t.uniform_(lo, hi, generator=g)
    folded = [fold_batchnorm(b) for b in blocks]
    remaining = [n for f in folded if isinstance(f, torch.fx.GraphModule) for n in f.graph.nodes
                 if n.op == "call_module" and isinstance(f.get_submodule(n.target), torch.nn.BatchNorm2d)]
    assert (not remaining and all(isinstance(f, torch.fx.GraphModule) for f in folded)) == folds
    if name == "resnet50":  # each bottleneck's conv -> ReLU and conv -> add -> ReLU chains: three fused units
        from spottune.models.fold import FrozenConvReLU

        assert all(sum(isinstance(m, FrozenConvReLU) for m in f.modules()) == 3 for f in folded)
        assert all(getattr(f.downsample, "0").bias is None for f in folded if hasattr(f, "downsample"))  # moved into a unit
    lite = name == "efficientnet_lite0"  # the first block's input for a 32 px image: (32, 16, 16) or (C, 8, 8)
    x = torch.randn(3, 32 if lite else blocks[0].conv1.in_channels, *((16, 16) if lite else (8, 8)),
                    generator=g, dtype=torch.float64)
    with torch.no_grad():
        a, b = x, x
        for block, twin in zip(blocks, folded):
            a, b = block(a), twin(b)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    assert not any(p.requires_grad for f in folded for p in f.parameters())


@pytest.mark.parametrize("name,weights", [("efficientnet_lite0", "imagenet"), ("resnet26", "none")])
@pytest.mark.parametrize("execution", ["mixed", "conditional"])
def test_forced_tuned_equals_tuned_copy(name, weights, execution):
    model = _spottune(name, weights).eval()
    model.execution = execution
    with torch.no_grad():  # make the tuned copy differ from the frozen one
        for p in model.tuned_blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        out = model(x, decisions=torch.ones(6, model.num_blocks))
        expected = _through(model.stem, model.tuned_blocks, model.neck, model.head, x)
        frozen_only = model(x, decisions=torch.zeros(6, model.num_blocks)).logits
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    assert not torch.allclose(out.logits, frozen_only), "tuned copy should differ after perturbation"


@pytest.mark.parametrize("name,weights", [("efficientnet_lite0", "imagenet"), ("resnet26", "none"), ("resnet50", "none")])
def test_conditional_inference_equals_mixed_formulation(name, weights):
    model = _spottune(name, weights).eval()
    with torch.no_grad():
        for p in model.tuned_blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=g)
    decisions = (torch.rand(8, model.num_blocks, generator=g) > 0.5).float()
    decisions[:, 0] = 1.0  # one block where all images agree: the whole-batch path
    with torch.no_grad():
        model.execution = "mixed"
        mixed = model(x, decisions).logits
        model.execution = "conditional"
        conditional = model(x, decisions).logits
    torch.testing.assert_close(conditional, mixed, rtol=1e-5, atol=1e-5)


def test_conditional_inference_keeps_the_channels_last_layout_through_mixed_blocks():
    """Sub-batches cut and put back in channels_last: a block fed NCHW runs its convolutions in the slow layout."""
    model = _spottune("resnet26", "none").eval().to(memory_format=torch.channels_last)
    model.execution = "conditional"
    layouts = []
    hooks = [b.register_forward_pre_hook(lambda _, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
             for b in [*model.runtime_frozen_blocks(), *model.tuned_blocks]]
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    decisions = (torch.arange(8)[:, None] % 2).float().expand(8, model.num_blocks)  # every block mixed
    with torch.no_grad():
        out = model(x, decisions).logits
    for h in hooks:
        h.remove()
    assert len(layouts) == 2 * model.num_blocks and all(layouts)
    model.execution = "mixed"
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, decisions).logits, rtol=1e-5, atol=1e-5)


def test_eval_decisions_are_deterministic_and_training_decisions_carry_gradient():
    model = _spottune("resnet26", "none")
    with torch.no_grad():
        model.policy.fc.bias.copy_(torch.randn_like(model.policy.fc.bias))
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a.decisions, b.decisions) and torch.equal(a.logits, b.logits)
    model.train()
    out = model(x)
    assert out.decisions.requires_grad
    assert set(out.decisions.unique().tolist()) <= {0.0, 1.0}


def test_sampling_at_evaluation_is_an_option():
    model = _spottune("resnet26", "none", eval_decisions="sample").eval()
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        draws = {tuple(model(x).decisions.flatten().tolist()) for _ in range(3)}
    assert len(draws) > 1, "with equal logits, sampled decisions should vary between calls"


def test_temperature_anneals_per_epoch_to_its_floor():
    model = _spottune("resnet26", "none", temperature=5.0, temperature_decay=0.5, temperature_min=1.0)
    model.set_epoch(0)
    assert model.temperature == 5.0
    model.set_epoch(1)
    assert model.temperature == 2.5
    model.set_epoch(10)
    assert model.temperature == 1.0


def test_frozen_branch_is_frozen_in_train_mode():
    model = _spottune("efficientnet_lite0", "imagenet").train()
    assert all(not m.training for m in model.frozen_blocks.modules())
    assert all(m.training for m in model.tuned_blocks.modules())
    assert not any(p.requires_grad for p in model.frozen_blocks.parameters())
    names = {id(p) for g in model.parameter_groups(_optim()) for p in g["params"]}
    assert not any(id(p) in names for p in model.frozen_blocks.parameters())


def test_target_bn_statistics_adapt_the_frozen_copy_but_not_its_weights():
    """policy.frozen_bn=target (the 2019 code's BN statistics): the frozen copy normalises with the batch and
    moves its running statistics toward the target data; its weights never change, and its BN is
    back on the adapted running statistics at evaluation."""
    model = _spottune("efficientnet_lite0", "imagenet", frozen_bn="target").train()
    bn = [m for m in model.frozen_blocks.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(m.training for m in bn)
    weights = {k: v.clone() for k, v in model.frozen_blocks.state_dict().items() if "running" not in k and "num_batches" not in k}
    stats = bn[0].running_mean.clone()
    x = torch.randn(8, 3, 32, 32)
    out = model(x)
    out.logits.sum().backward()
    assert not torch.equal(stats, bn[0].running_mean)
    assert all(torch.equal(v, model.frozen_blocks.state_dict()[k]) for k, v in weights.items())
    assert all(p.grad is None for p in model.frozen_blocks.parameters())
    outputs = []
    for execution in ("auto", "mixed"):  # training runs the mixed formulation (same seed: same drop-connect)
        twin = copy.deepcopy(model)
        twin.execution = execution
        torch.manual_seed(1)
        with torch.no_grad():
            outputs.append(twin(x, out.decisions).logits)
    assert torch.equal(*outputs)
    model.eval()
    assert not any(m.training for m in bn)
    assert not any(m.training for m in _spottune("efficientnet_lite0", "imagenet").train().frozen_blocks.modules())


def _optim():
    from spottune.config import OptimParams

    return OptimParams()


@pytest.mark.parametrize("method,trained_blocks", [("finetune", 16), ("linear", 0), ("lastk", 4), ("l2sp", 16)])
def test_baselines_train_what_they_say(method, trained_blocks):
    torch.manual_seed(0)
    model = FineTuneNet(build_backbone("efficientnet_lite0", "imagenet", 32), 10, method, last_k=4, l2sp_alpha=0.1)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([g for g in model.parameter_groups(_optim())], lr=0.1)
    model.train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out.logits, y)
    reg = model.regularization(out)
    assert (reg is not None) == (method == "l2sp")
    (loss if reg is None else loss + reg).backward()
    opt.step()
    after = model.state_dict()
    changed = {i for i in range(16) if not torch.equal(before[f"blocks.{i}.block._project_conv.weight"],
                                                      after[f"blocks.{i}.block._project_conv.weight"])}
    assert len(changed) == trained_blocks
    assert changed == set(range(16 - trained_blocks, 16))
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])
    for i in set(range(16)) - changed:  # untouched blocks keep their BN statistics too
        assert torch.equal(before[f"blocks.{i}.block._bn1.running_mean"], after[f"blocks.{i}.block._bn1.running_mean"])


@pytest.mark.parametrize("name,weights,p_tuned", [("resnet26", "none", 0.0), ("resnet26", "none", 0.3),
                                                   ("resnet26", "none", 1.0), ("resnet18", "none", 0.5)])
def test_split_training_gives_the_mixed_formulations_gradients(name, weights, p_tuned):
    """float64: outputs, every gradient (input, tuned copy, stem, head, decisions) and BN statistics."""
    results = {}
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(12, 3, 16, 16, generator=g, dtype=torch.float64)
    d0 = (torch.rand(12, 12 if name == "resnet26" else 8, generator=g) < p_tuned).double()
    for execution in ("mixed", "split", "recompute"):
        model = _spottune(name, weights, recompute_frozen=execution == "recompute").double().train()
        for b in model.tuned_blocks.modules():  # no drop-connect noise: compare deterministic functions
            if hasattr(b, "drop_connect_rate"):
                b.drop_connect_rate = 0.0
        model.execution = "split" if execution == "recompute" else execution
        x = x0.clone().requires_grad_(True)
        d = d0.clone().requires_grad_(True)
        out = model(x, d)
        out.logits.pow(2).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and not n.startswith("policy.")}
        stats = {n: b for n, b in model.named_buffers() if "running" in n}
        results[execution] = (out.logits.detach(), x.grad, d.grad, grads, stats)
    lm, xm, dm, gm, sm = results["mixed"]
    for ls, xs, ds, gs, ss in (results["split"], results["recompute"]):
        _assert_same_training_step(lm, xm, dm, gm, sm, ls, xs, ds, gs, ss, d0)


def _assert_same_training_step(lm, xm, dm, gm, sm, ls, xs, ds, gs, ss, d0):
    torch.testing.assert_close(ls, lm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xs, xm, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ds, dm, rtol=1e-9, atol=1e-9)
    assert gs.keys() == gm.keys() and any(k.startswith("tuned_blocks.") for k in gm)
    assert not any(k.startswith("frozen_blocks.") for k in gm)
    assert all(gm[k] is not None and gs[k] is not None for k in gm)
    # A tuned copy no image chose runs without autograd under split, and is handed its mixed-form
    # gradient, exactly 0: every trainable parameter has a gradient after every step.
    idle = {l for l in range(d0.shape[1]) if not d0[:, l].any()}
    for k in gm:
        torch.testing.assert_close(gs[k], gm[k], rtol=1e-9, atol=1e-9, msg=k)
        if k.startswith("tuned_blocks.") and int(k.split(".")[1]) in idle:
            assert torch.count_nonzero(gs[k]) == 0, k
    for k in sm:
        torch.testing.assert_close(ss[k], sm[k], rtol=1e-12, atol=1e-12, msg=k)


def test_remade_routed_outputs_give_the_same_step_and_are_not_kept(monkeypatch):
    """Split training as the CUDA graphs capture it (`remake`): a mixed block's output is kept as its recipe
    (F, F~, d) and made again in the backward. The same logits, gradients and BN statistics bit for bit, and
    no routed output outlives the forward pass (without it, the next block keeps it)."""
    import weakref

    import spottune.models.split_training as st

    made = []

    def recording(f, t, w):
        y = route_forward(f, t, w)
        made.append(weakref.ref(y))
        return y

    route_forward = st.route_forward
    monkeypatch.setattr(st, "route_forward", recording)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 64, 64, generator=g)  # the last block's output 2 x 2: pooled into a tensor of its own
    d0 = (torch.rand(6, 16, generator=g) < 0.5).float()
    d0[:, 0], d0[:, 3], d0[:, 7] = 1.0, 1.0, 0.0  # blocks where every image agrees, between mixed ones
    d0[0, 4:7] = 1.0 - d0[1, 4:7]  # and some that surely mix
    mixed = int(((d0.sum(0) > 0) & (d0.sum(0) < 6)).sum())
    runs = {}
    for remake in (False, True):
        model = _spottune("resnet50", "none", image_size=64).train()
        x, d = x0.clone().requires_grad_(True), d0.clone().requires_grad_(True)
        made.clear()
        counts = [int(n) for n in d0.sum(0)]
        # remake: as the CUDA graphs run the blocks (on CPU the fused units' switch changes nothing)
        logits = model._lean_blocks(model.stem(x), d, counts) if remake else model._blocks(model.stem(x), d, counts)
        assert not any(getattr(m, "fused_under_autograd", False) for m in model.modules())  # switched back
        forward_made, alive = len(made), sum(r() is not None for r in made)
        logits.square().sum().backward()
        runs[remake] = (logits.detach(), x.grad, d.grad,
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        {n: b for n, b in model.named_buffers() if "running" in n})
        # Kept without recipes: each but perhaps the last (pooled by a mean, which keeps no input).
        assert forward_made == mixed and (alive == 0 if remake else alive >= mixed - 1), (remake, alive)
        if remake:  # made again in the backward for each layer that kept it
            assert len(made) >= 2 * forward_made - 1
    (l0, x0g, d0g, g0, s0), (l1, x1g, d1g, g1, s1) = runs[False], runs[True]
    assert torch.equal(l0, l1) and torch.equal(x0g, x1g) and torch.equal(d0g, d1g)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_gumbel_decisions_are_exactly_0_or_1_with_torchs_straight_through_gradient():
    import torch.nn.functional as F

    from spottune.models.policy import sample_decisions

    logits = torch.randn(256, 6, 2, requires_grad=True)
    torch.manual_seed(3)
    ours = sample_decisions(logits, 2.0, "gumbel")
    torch.manual_seed(3)
    reference = F.gumbel_softmax(logits, tau=2.0, hard=True)[..., 1]
    assert set(ours.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(ours, reference.round())
    g = torch.randn(256, 6)
    (ours_grad,) = torch.autograd.grad(ours, logits, g)
    (reference_grad,) = torch.autograd.grad(reference, logits, g)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=0, atol=0)


def _saved_activation_bytes(model, run) -> int:
    """Bytes of the tensors autograd keeps for the backward while `run()` executes, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(storages.values()), out


def test_recompute_frozen_keeps_nothing_of_the_frozen_branch_for_the_backward():
    """Counted on what autograd keeps: with recompute_frozen a step keeps what the tuned path alone would,
    plus the mixed output of blocks where images disagree (the frozen copy's activations and F~ - F are
    gone); without it, at least one block output more per block where some image took the tuned copy."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    d = (torch.rand(4, 16, generator=g) < 0.5).float()
    d[:, :4] = 1.0  # blocks where every image tuned: the frozen output only feeds the decision gradient
    saved = {}
    for recompute in (False, True):
        model = _spottune("resnet50", "none", recompute_frozen=recompute).train()
        block_outputs = []
        hooks = [b.register_forward_hook(lambda m, i, o, sizes=block_outputs: sizes.append(o.numel() * o.element_size()))
                 for b in model.tuned_blocks]
        saved[recompute], out = _saved_activation_bytes(model, lambda net=model: net(x, d.clone().requires_grad_(True)))
        out.logits.sum().backward()  # the recomputing backward runs
        for h in hooks:
            h.remove()
        tuned_only, _ = _saved_activation_bytes(model, lambda net=model: _through(net.stem, net.tuned_blocks, net.neck,
                                                                                  net.head, x))
    routed = sum(n for n, column in zip(block_outputs, d.T) if column.any())
    mixed = sum(n for n, column in zip(block_outputs, d.T) if 0 < column.sum() < len(column))
    # Where images disagree the block's output is a new tensor (the next block keeps it), not F~ itself.
    assert tuned_only <= saved[True] <= tuned_only + mixed + 1024  # + the decisions themselves
    assert saved[False] - saved[True] >= routed


def test_split_training_keeps_no_extra_block_output_where_autograd_keeps_the_branches(monkeypatch):
    """ResNet blocks end in ReLU, which keeps its output: the route then keeps F and F~ (no new memory), not F~ - F."""
    import spottune.models.split_training as st

    model = _spottune("resnet18", "none").train()
    model.execution = "split"
    x = torch.randn(8, 3, 32, 32)
    d = (torch.arange(8)[:, None] % 2).float().expand(8, model.num_blocks).clone().requires_grad_(True)  # all mixed

    def kept_bytes() -> int:
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, d)
        return sum(storages.values())

    outputs = []
    hooks = [b.register_forward_hook(lambda _, __, out: outputs.append(out.numel() * out.element_size()))
             for b in model.tuned_blocks]
    with_branches = kept_bytes()
    for h in hooks:
        h.remove()
    monkeypatch.setattr(st, "_kept_by_autograd", lambda _: False)  # as before: keep F~ - F per block
    with_difference = kept_bytes()
    assert with_difference - with_branches == sum(outputs)


def test_usage_term_is_zero_for_balanced_decided_routing_and_ln2_for_a_per_block_choice():
    balanced = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # each block: half the batch
    assert usage_term(balanced) == pytest.approx(0.0, abs=1e-4)
    same = torch.tensor([[1.0, 0.0]] * 4)  # every image routed alike: the collapse
    assert usage_term(same) == pytest.approx(math.log(2), abs=1e-4)
    undecided = torch.full((4, 2), 0.5)  # balanced usage, but no image decided
    assert usage_term(undecided) == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.slow  # 100 SGD steps of the policy
@pytest.mark.parametrize("std,per_image", [(0.0, False), (0.1, True)])
def test_usage_term_needs_a_symmetry_break(std, per_image):
    """From equal logits for every image the usage term has no gradient; a random last layer breaks the tie."""
    torch.manual_seed(0)
    policy = RoutingPolicy(4, width=8, input_size=16, init_weight_std=std)
    x = torch.rand(64, 3, 16, 16)
    opt = torch.optim.SGD(policy.parameters(), lr=0.1, momentum=0.9)
    for _ in range(100):
        loss = usage_term(tune_probability(policy(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned = (tune_probability(policy(x)) > 0.5).float().mean(0)
    if per_image:
        assert float(loss) < 0.05 and ((tuned > 0.3) & (tuned < 0.7)).all()
    else:
        assert float(loss) == pytest.approx(math.log(2), abs=1e-4) and set(tuned.tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_the_policy_starts_at_init_tune_probability_for_every_image(p):
    model = _spottune("resnet26", "none", init_tune_probability=p).train()
    out = model(torch.randn(8, 3, 32, 32))
    assert torch.allclose(out.tune_probability, torch.full_like(out.tune_probability, p), atol=1e-6)


def test_usage_weight_adds_the_usage_term_to_the_loss():
    x = torch.randn(8, 3, 32, 32)
    plain = _spottune("resnet26", "none").train()
    assert plain.regularization(plain(x)) is None
    model = _spottune("resnet26", "none", usage_weight=2.0).train()
    out = model(x)
    assert float(model.regularization(out)) == pytest.approx(2 * float(usage_term(out.tune_probability)), rel=1e-6)
    model.regularization(out).backward()
    assert model.policy.fc.bias.grad is not None


def test_without_noise_training_decisions_are_the_argmax_and_still_carry_a_gradient():
    from spottune.models.policy import sample_decisions

    logits = torch.randn(128, 6, 2, requires_grad=True)
    ours = sample_decisions(logits, 5.0, "gumbel", noise=0.0)
    assert torch.equal(ours.detach(), sample_decisions(logits, 5.0, "argmax"))
    (grad,) = torch.autograd.grad(ours, logits, torch.randn(128, 6))
    assert grad.abs().sum() > 0
    torch.manual_seed(1)
    noisy = sample_decisions(logits, 5.0, "gumbel", noise=1.0)
    assert not torch.equal(noisy.detach(), ours.detach())  # with noise, some images take the other branch


def test_cosine_noise_schedule_goes_from_one_to_zero_and_constant_stays_at_one():
    model = _spottune("resnet26", "none", noise_schedule="cosine")
    scales = []
    for epoch in range(5):
        model.set_epoch(epoch, 5)
        scales.append(model.noise)
    assert scales[0] == 1.0 and scales[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in itertools.pairwise(scales))
    constant = _spottune("resnet26", "none")
    constant.set_epoch(4, 5)
    assert constant.noise == 1.0


def test_expectation_decisions_mix_both_branches_by_the_tune_probability():
    """eval_decisions 'expectation': each block returns F + p (F~ - F) with the image's own p."""
    model = _spottune("resnet26", "none", eval_decisions="expectation", init_weight_std=0.5)
    with torch.no_grad():  # make the copies differ, so that the mixture differs from either branch
        for t in model.tuned_blocks.parameters():
            t.add_(0.05 * torch.randn_like(t))
    model.eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        p = tune_probability(model.policy(x))
        assert torch.equal(out.decisions, p) and ((p > 0.01) & (p < 0.99)).any()
        model.execution = "mixed"
        expected = model(x, decisions=p).logits
        argmax = model(x, decisions=(p > 0.5).float()).logits
    torch.testing.assert_close(out.logits, expected)
    assert not torch.allclose(out.logits, argmax)


def test_tuned_l2sp_pulls_the_tuned_copy_toward_the_frozen_copy_in_place_of_weight_decay():
    from spottune.config import OptimParams

    torch.manual_seed(0)
    model = SpotTuneNet(build_backbone("resnet26", "none", 32), 10, PolicyParams(), tuned_l2sp_alpha=0.5).train()
    out = model(torch.randn(4, 3, 32, 32))
    assert float(model.regularization(out)) == 0.0  # the tuned copy starts at the pretrained weights
    weight = next(model.tuned_blocks.parameters())
    with torch.no_grad():
        weight.add_(0.1)
    assert float(model.regularization(out)) == pytest.approx(0.5 * 0.5 * 0.01 * weight.numel(), rel=1e-4)
    model.regularization(out).backward()
    assert (weight.grad > 0).all()  # toward the frozen copy
    groups = {g["name"]: g for g in model.parameter_groups(OptimParams(weight_decay=1e-4))}
    assert groups["tuned"]["weight_decay"] == 0.0 and groups["net"]["weight_decay"] == 1e-4
    assert any(p is weight for p in groups["tuned"]["params"])
    plain = {g["name"] for g in _spottune("resnet26", "none").parameter_groups(OptimParams())}
    assert plain == {"net", "head", "policy"}
