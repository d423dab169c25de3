"""The engine on real images: frozen weights stay frozen, global-k works, resume is exact, runs learn."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from spottune.engine import DeviceSetup, train_one_epoch
from spottune.models import build_model


def _cpu(params) -> DeviceSetup:
    from spottune.models.backbones import input_normalization

    return DeviceSetup.resolve("cpu", amp=False, channels_last=False,
                               normalization=input_normalization(params.model.backbone))


def _loader(root, params):
    from spottune.data.loaders import build_datasets, make_loader

    splits = build_datasets(params.data, seed=0)
    return make_loader(splits.train, params.data.batch_size, shuffle=True, num_workers=0,
                       generator=torch.Generator().manual_seed(0)), len(splits.classes)


@pytest.mark.slow
def test_training_changes_tuned_head_policy_and_never_the_frozen_branch(fashion_root, tiny_params):
    params = tiny_params(fashion_root, optim={"lr_policy": 0.1})
    loader, n = _loader(fashion_root, params)
    torch.manual_seed(0)
    model = build_model(params, n)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameter_groups(params.optim), lr=0.01, momentum=0.9)
    policy_grads = []
    model.policy.fc.weight.register_hook(lambda g: policy_grads.append(g.abs().sum().item()))
    train_one_epoch(model, optimizer, loader, _cpu(params), epoch=0, max_steps=4, progress=False)
    after = model.state_dict()

    frozen = [k for k in before if k.startswith("frozen_blocks.")]
    assert any("running_mean" in k for k in frozen) and any(k.endswith("num_batches_tracked") for k in frozen)
    for k in frozen:  # weights, BN affine parameters and BN running statistics, bit for bit
        assert torch.equal(before[k], after[k]), k
    for prefix in ("tuned_blocks.", "head.", "policy."):
        changed = [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]
        assert changed, f"nothing under {prefix} changed"
    tuned_bn = "tuned_blocks.5.block._bn1.running_mean"
    assert not torch.equal(before[tuned_bn], after[tuned_bn])
    assert len(policy_grads) == 4 and all(g > 0 for g in policy_grads)


@pytest.mark.slow
def test_global_k_pulls_tuned_blocks_per_image_to_k(digits_root, tiny_params):
    k = 4
    params = tiny_params(digits_root, model={"backbone": "resnet26", "weights": "none"},
                         policy={"global_k": k, "k_weight": 1.0, "entropy_weight": 0.05, "temperature": 1.0, "input_size": 16},
                         optim={"lr_policy": 0.02, "lr_net": 0.01})
    loader, n = _loader(digits_root, params)
    torch.manual_seed(0)
    model = build_model(params, n)
    optimizer = torch.optim.SGD(model.parameter_groups(params.optim), lr=0.01, momentum=0.9)
    setup = _cpu(params)
    first = train_one_epoch(model, optimizer, loader, setup, epoch=0, max_steps=1, progress=False)
    history = [train_one_epoch(model, optimizer, loader, setup, epoch=e, max_steps=8, progress=False)
               for e in range(1, 8)]
    assert abs(first["tuned_blocks_per_image"] - k) > 1.5, "should start away from k (12 blocks, 50/50 routing)"
    late = sum(h["tuned_blocks_per_image"] for h in history[-3:]) / 3
    assert abs(late - k) < 0.75, [h["tuned_blocks_per_image"] for h in history]
    # The regulariser acts on sampled decisions: sampling from the learnt policy at evaluation tunes
    # about k blocks too. (Argmax follows once the entropy term has pushed each block to 0 or 1.)
    model.eval()
    model.policy_params = model.policy_params.model_copy(update={"eval_decisions": "sample"})
    images, _ = next(iter(loader))
    with torch.no_grad():
        per_image = model(setup.images(images)).decisions.sum(1).float().mean().item()
    assert abs(per_image - k) < 1.0, per_image


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spottune", "l2sp"])
def test_resume_gives_identical_weights(fashion_root, tiny_params, runtime, tmp_path, method):
    from safetensors.torch import load_file

    from spottune.training import fit

    params = tiny_params(fashion_root, model={"method": method}, optim={"epochs": 3, "max_steps_per_epoch": 3})
    fit(params, tmp_path / "straight", runtime, log=lambda _: None)
    assert fit(params, tmp_path / "sliced", runtime, stop_after_epochs=2, log=lambda _: None) is None
    assert not (tmp_path / "sliced" / "model.safetensors").exists()
    fit(params, tmp_path / "sliced", runtime, resume=True, log=lambda _: None)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "sliced" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_resume_refuses_other_params(fashion_root, tiny_params, runtime, tmp_path):
    from spottune.errors import CheckpointError
    from spottune.training import fit

    params = tiny_params(fashion_root, optim={"epochs": 2, "max_steps_per_epoch": 1})
    fit(params, tmp_path, runtime, stop_after_epochs=1, log=lambda _: None)
    other = tiny_params(fashion_root, optim={"epochs": 2, "max_steps_per_epoch": 1, "lr_net": 0.5})
    with pytest.raises(CheckpointError, match="optim.lr_net"):
        fit(other, tmp_path, runtime, resume=True, log=lambda _: None)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spottune", "finetune"])
def test_short_real_run_beats_chance_by_a_wide_margin(fashion_root, tiny_params, runtime, tmp_path, method):
    from spottune.training import fit

    # 360 real Fashion-MNIST training images, 200 test images, 10 classes: chance is 10%.
    params = tiny_params(fashion_root, model={"method": method}, data={"image_size": 48}, optim={"epochs": 4})
    metrics = fit(params, tmp_path, runtime, log=lambda _: None)
    assert metrics["test"]["images"] == 200
    assert metrics["test"]["accuracy"] > 0.55, metrics["test"]["accuracy"]
    if method == "spottune":
        fractions = metrics["test"]["tuned_fraction_per_block"]
        assert len(fractions) == 16 and all(0.0 <= f <= 1.0 for f in fractions)


@pytest.mark.slow
def test_exported_backbone_is_the_trained_network(digits_root, tiny_params, runtime, tmp_path):
    """A ResNet-26 trained from scratch by the pipeline, exported, rebuilt through model.weights,
    predicts exactly what the run predicts (the source task's head included)."""
    from spottune.errors import ConfigError
    from spottune.models.backbones import build_backbone
    from spottune.training import export_backbone, fit, load_model

    params = tiny_params(digits_root, model={"method": "finetune", "backbone": "resnet26", "weights": "none"},
                         optim={"epochs": 1, "max_steps_per_epoch": 3})
    fit(params, tmp_path / "source", runtime, log=lambda _: None)
    info = export_backbone(tmp_path / "source", tmp_path / "resnet26-digits.safetensors")
    assert info["backbone"] == "resnet26" and info["source_classes"] == [str(c) for c in range(10)]

    run_model, _, _ = load_model(tmp_path / "source")
    rebuilt = build_backbone("resnet26", str(tmp_path / "resnet26-digits.safetensors"))
    rebuilt.net.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.forward(x), run_model(x).logits)
    untrained = build_backbone("resnet26", "none")
    assert not torch.equal(untrained.blocks[0].conv1.weight, rebuilt.blocks[0].conv1.weight)

    spottune = tiny_params(digits_root, model={"method": "spottune", "backbone": "resnet26", "weights": "none"},
                           optim={"epochs": 1, "max_steps_per_epoch": 1})
    fit(spottune, tmp_path / "spottune", runtime, log=lambda _: None)
    with pytest.raises(ConfigError, match="export a finetune"):
        export_backbone(tmp_path / "spottune", tmp_path / "nope.safetensors")
    assert not (tmp_path / "nope.safetensors").exists()


def _torchrun_train(digits_root: Path, method: str, epochs: int, steps: int) -> tuple[list[str], dict[str, str]]:
    """`-m spottune.cli train ...` on the digits at 32 px for torchrun (its launcher options go before it),
    and the environment of a CPU run with one thread per process."""
    import os

    args = ["-m", "spottune.cli", "train", "--method", method, "--params",
            str(Path(__file__).resolve().parent.parent / "params.yaml")]
    for pair in (f"data.root={digits_root}", "data.image_size=32", "data.batch_size=16", f"optim.epochs={epochs}",
                 f"optim.max_steps_per_epoch={steps}"):
        args += ["--set", pair]
    env = {**os.environ, "SPOTTUNE_DEVICE": "cpu", "SPOTTUNE_PROGRESS": "false", "OMP_NUM_THREADS": "1"}
    return args, env


@pytest.mark.slow
def test_torchrun_trains_data_parallel_with_one_writer(digits_root, tmp_path):
    """Two processes under torchrun (gloo on CPU; NCCL on GPUs): one set of files, written by rank 0,
    and a model that learnt from both shards."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    train, env = _torchrun_train(digits_root, "linear", epochs=2, steps=5)
    cmd = [str(torchrun), "--nproc_per_node", "2", *train, "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1, "only rank 0 reports"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert [h["train"]["images"] for h in metrics["history"]] == [160, 160]  # both shards: 2 x 5 steps of 16
    assert metrics["test"]["accuracy"] > 0.3, metrics["test"]["accuracy"]  # 10 classes: chance is 0.1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint.pt", "metrics.json", "model.json", "model.safetensors"]


@pytest.mark.slow
def test_two_nodes_through_torchrun_rendezvous_train_as_one_node_of_two_processes(digits_root, tmp_path):
    """Two torchrun "nodes" on one host, one process each, meeting through the c10d rendezvous (gloo
    on CPU): the run finishes, rank 0 alone writes, and the weights and metrics equal one node's
    two processes with the same global batch."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from support import free_port

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    train, env = _torchrun_train(digits_root, "linear", epochs=2, steps=5)
    port = free_port()
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", *train,
                               "--out", str(tmp_path / "nodes")], env=env, cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert sum(o.count("test accuracy") for o in outputs) == 1, "one writer across the nodes"
    one = subprocess.run([torchrun, "--nproc_per_node", "2", *train, "--out", str(tmp_path / "one")], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two_nodes, one_node = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("nodes", "one"))
    assert two_nodes["processes"] == one_node["processes"] == 2
    learnt = [[(h["train"]["loss"], h["train"]["images"], h["val"].get("accuracy")) for h in m["history"]]
              for m in (two_nodes, one_node)]
    assert learnt[0] == learnt[1]
    assert two_nodes["test"]["accuracy"] == one_node["test"]["accuracy"]
    assert (tmp_path / "nodes" / "model.safetensors").read_bytes() == (tmp_path / "one" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_node_killed_mid_epoch_stops_both_and_resume_gives_the_uninterrupted_weights(digits_root, tmp_path):
    """Two torchrun nodes; one node's training process is SIGKILLed in the second epoch: the other node
    stops at once (its collective loses its peer) instead of hanging, the checkpoint of the first epoch
    is intact, and both nodes started again with --resume end with the weights of a run never killed."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    from support import free_port

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    train, env = _torchrun_train(digits_root, "finetune", epochs=3, steps=30)

    def nodes(out: Path, *extra: str) -> list[subprocess.Popen]:
        port, started = free_port(), []
        for _ in range(2):
            cmd = [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                   f"127.0.0.1:{port}", "--rdzv-id", out.name, *train, "--out", str(out), *extra]
            started.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True))
            time.sleep(2)  # the first node hosts the rendezvous store
        return started

    killed = nodes(tmp_path / "killed")
    deadline = time.monotonic() + 300
    while not (tmp_path / "killed" / "checkpoint.pt").exists():
        assert time.monotonic() < deadline and killed[0].poll() is None, "no checkpoint after the first epoch"
        time.sleep(0.2)
    time.sleep(1)  # into the second epoch
    worker = next(c for c in psutil.Process(killed[1].pid).children(recursive=True) if "spottune.cli" in c.cmdline())
    worker.send_signal(signal.SIGKILL)
    for node in killed:
        node.communicate(timeout=120)  # never a hang: the surviving rank's collective fails
        assert node.returncode != 0
    checkpoint = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] in (0, 1)
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    for node in nodes(tmp_path / "killed", "--resume") + nodes(tmp_path / "whole"):
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    assert (tmp_path / "killed" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_routing_statistics_say_how_per_image_the_routing_is():
    from spottune.engine import summarise_predictions

    # 4 images, 3 blocks: block 0 tuned by all, block 1 by one of four, block 2 by none
    decisions = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 1])
    p = {"labels": labels, "predictions": labels, "logits": torch.randn(4, 2), "decisions": decisions}
    test = summarise_predictions(p, 2)
    assert test["minority_fraction_per_block"] == [0.0, 0.25, 0.0]
    assert test["mixed_blocks"] == 1


def _epoch_on_a_shard(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group: train one epoch on its own shard and write what it returns."""
    import json
    import os

    from spottune.distributed import Distributed
    from spottune.engine import DeviceSetup, train_one_epoch
    from spottune.models.base import ModelOutput, TransferModel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)

    class Probe(TransferModel):  # a linear classifier: the smallest model the engine trains
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            self.frozen_modules = []

        def forward(self, x):
            return ModelOutput(self.fc(x.flatten(1).float()))

    torch.manual_seed(0)
    model = Probe()
    g = torch.Generator().manual_seed(rank + 1)  # shards differ: rank 1 has more images, other labels
    images = torch.randn(8 * (rank + 1), 4, generator=g)
    labels = torch.full((8 * (rank + 1),), rank)
    loader = [(images[i:i + 4], labels[i:i + 4]) for i in range(0, len(images), 4)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the loss of every batch is the same model's
    dist = Distributed(world_size, rank, rank)
    stats = train_one_epoch(model, optimizer, loader, DeviceSetup(torch.device("cpu")), epoch=0, progress=False,
                            all_reduce=dist.all_reduce_sum)
    with torch.no_grad():
        logits = model(images).logits
        local = {"loss_sum": float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum")),
                 "correct": int((logits.argmax(1) == labels).sum()), "images": len(labels)}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"stats": stats, "local": local}, f)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_training_statistics_cover_every_ranks_shard(tmp_path):
    """Two real processes (gloo on CPU) with shards of different sizes and labels: both report the loss and
    accuracy of all 24 images, not their own shard's (before: rank 0's 8 images alone reached metrics)."""
    import json

    import torch.multiprocessing as mp

    from support import free_port

    mp.spawn(_epoch_on_a_shard, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    images = sum(r["local"]["images"] for r in ranks)
    loss = sum(r["local"]["loss_sum"] for r in ranks) / images
    accuracy = sum(r["local"]["correct"] for r in ranks) / images
    assert images == 24
    for r in ranks:
        assert r["stats"]["images"] == 24
        assert r["stats"]["loss"] == pytest.approx(loss, rel=1e-5)
        assert r["stats"]["accuracy"] == pytest.approx(accuracy)
    own = ranks[0]["local"]["loss_sum"] / ranks[0]["local"]["images"]
    assert abs(own - loss) > 1e-3, "the shards must differ for this test to tell them apart"
