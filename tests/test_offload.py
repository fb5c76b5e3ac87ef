"""Offload modes, BN recompute and checkpoint errors on CPU; FSDP2 over 2 gloo processes (stage checkpointing:
test_stage_checkpointing.py)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from lbsgd_cli.checkpoint import FORMAT
from lbsgd_cli.config import TrainConfig
from lbsgd_cli.data import InMemoryData, TensorSplit, TrainLoader
from lbsgd_cli.distributed import Dist
from lbsgd_cli.errors import UserError
from lbsgd_cli.evaluate import recompute_bn_stats
from lbsgd_cli.models import build_model
from lbsgd_cli.offload import place, remove
from lbsgd_cli.restore import model_from_checkpoint
from lbsgd_cli.validation import validate

from .conftest import ROOT, clean_env, free_port, lbsgd, max_abs_diff, run_weights

CPU = Dist(0, 0, 1, torch.device("cpu"), "single")


def tiny_cfg(arch: str = "cifar_resnet", k: int = 2, n: int = 8):
    """A train config of ``k`` workers of ``n`` on digits, ResNet-8 without zero-gamma (or ``arch``)."""
    cfg = OmegaConf.structured(TrainConfig)
    cfg.model.arch, cfg.model.depth, cfg.model.zero_init_residual = arch, 8, False
    cfg.data.name, cfg.batch.k, cfg.batch.n = "digits", k, n
    return cfg


def tiny_model(cfg, seed: int = 0) -> torch.nn.Module:
    """``cfg``'s network, seeded, its BN running statistics moved off their start, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, 10, 3, bn_group=cfg.batch.n)
    model.train()
    with torch.no_grad():  # running statistics away from their initial values
        for _ in range(2):
            model(torch.randn(16, 3, 12, 12))
    return model.eval()


def tiny_data(count: int = 64) -> InMemoryData:
    """``count`` random 3x12x12 training images and 16 validation images of 10 classes, in memory."""
    g = torch.Generator().manual_seed(1)
    split = lambda m: TensorSplit(torch.randint(0, 256, (m, 3, 12, 12), generator=g, dtype=torch.uint8),  # noqa: E731
                                  torch.randint(0, 10, (m,), generator=g))
    return InMemoryData(split(count), split(16), [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3, 1, True)


@pytest.mark.parametrize("mode", ["sequential", "model"])
def test_offload_modes_give_identical_logits(mode):
    ref = tiny_model(tiny_cfg())
    x = torch.randn(5, 3, 12, 12)
    expected = ref(x)
    m = copy.deepcopy(ref)
    placed = place(m, mode, "cpu")
    if mode == "sequential":
        assert next(m.parameters()).device.type == "meta"  # weights live in accelerate's CPU map
    assert torch.equal(placed.model(x), expected)
    placed.release()
    remove(m)
    assert torch.equal(m(x), expected)


def test_bn_recompute_is_the_average_over_workers_batches_and_the_same_in_every_mode():
    cfg, data = tiny_cfg("small_cnn"), tiny_data()
    results = []
    for mode in ("none", "sequential", "model"):
        placed = place(tiny_model(cfg), mode, "cpu")
        seen = recompute_bn_stats(placed.model, data, cfg, CPU, batches=3, chunk=8)
        placed.release()
        remove(placed.model)
        assert seen == 3 * 2 * 8 and not placed.model.training
        results.append({k: v.clone() for k, v in placed.model.state_dict().items()})
    assert all(torch.equal(results[0][k], r[k]) for r in results[1:] for k in results[0])

    # first BN by hand: mean over the 3*2 worker batches of n=8 of each batch's channel mean
    model = tiny_model(cfg)
    loader = TrainLoader(data, 2, 8, seed=cfg.seed)
    means = []
    for it, (x, _) in zip(range(3), loader.epoch(0)):
        h = model.features[0](x)
        means += [h[i * 8 : (i + 1) * 8].mean(dim=(0, 2, 3)) for i in range(2)]
    torch.testing.assert_close(results[0]["features.1.running_mean"], torch.stack(means).mean(0))


@pytest.mark.parametrize("mode", ["sequential", "model"])
def test_training_rejects_offload_modes_and_checkpointing_without_stages(mode):
    cfg = tiny_cfg()
    cfg.offload.mode = mode
    with pytest.raises(UserError, match=f"offload.mode: {mode} cannot be used in training"):
        validate(cfg)
    cfg = tiny_cfg("small_cnn")
    cfg.memory.checkpointing = True
    with pytest.raises(UserError, match="memory.checkpointing: .* small_cnn has none"):
        validate(cfg)


def test_foreign_and_broken_checkpoints_name_the_file(tmp_path):
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    good = {"format": FORMAT, "model": model.state_dict(), "iteration": 7, "epoch": 1,
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)}
    torch.save(good, tmp_path / "good.pt")
    loaded, tcfg = model_from_checkpoint(tmp_path / "good.pt")
    x = torch.randn(3, 3, 12, 12)
    assert torch.equal(loaded(x), model(x)) and tcfg.model.arch == "cifar_resnet"
    assert loaded.checkpoint_info["iteration"] == 7

    other = dict(good, config=OmegaConf.to_container(tiny_cfg("small_cnn"), resolve=True, enum_to_str=True))
    torch.save(other, tmp_path / "other_model.pt")  # a checkpoint whose weights are another network's
    torch.save(model.state_dict(), tmp_path / "state_dict.pt")  # a bare state dict
    torch.save(torch.randn(3), tmp_path / "tensor.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:4000])
    cases = {"missing.pt": "does not exist", "cut.pt": "not a readable checkpoint", "notes.txt": "not a readable",
             "tensor.pt": "not written by lbsgd", "state_dict.pt": "not written by lbsgd",
             "other_model.pt": "does not fit"}
    for name, text in cases.items():
        with pytest.raises(UserError) as err:
            model_from_checkpoint(tmp_path / name)
        msg = str(err.value)
        assert msg.startswith(f"checkpoint: {tmp_path / name}") and text in msg and "\n" not in msg, msg


# --------------------------------------------------------------------------- FSDP2 (memory.fsdp)

# cifar_resnet-8 on 256 digits, k=4 workers of n=16, one worker per pass (two passes per process at W=2, so
# set_requires_gradient_sync is exercised): 4 iterations per epoch, a checkpoint every 2.
FSDP_CFG = ["threads=1", "log.progress=plain", "log.tensorboard=false", "schedule.epochs=2",
            "schedule.warmup_epochs=1", "schedule.milestones=[1]", "batch.k=4", "batch.n=16",
            "batch.workers_per_pass=1", "model.arch=cifar_resnet", "model.depth=8", "model.width=8",
            "checkpoint.every_iters=2", "data.train_subset=256"]
FSDP_ON = ["memory.fsdp=true"]
FSDP_OFFLOAD = ["memory.fsdp=true", "memory.fsdp_cpu_offload=true", "memory.checkpointing=true"]


def _lbsgd(run, extra=(), world: int = 1, crash_at: int | None = None):
    """Start ``lbsgd train`` on 1 process or ``world`` under torchrun; ``crash_at``: the last rank dies there."""
    launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master_port={free_port()}"] if world > 1 else [sys.executable])
    fault = {"LBSGD_FAULT_RANK": str(world - 1), "LBSGD_FAULT_ITER": str(crash_at)} if crash_at is not None else {}
    return subprocess.Popen([*launch, "-m", "lbsgd_cli", "train", f"hydra.run.dir={run}", *FSDP_CFG, *extra],
                            cwd=ROOT, env=clean_env(**fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc, ok: bool = True) -> str:
    out, err = proc.communicate(timeout=240)
    assert (proc.returncode == 0) == ok, (proc.returncode, out, err)
    return out


@pytest.mark.slow
def test_fsdp_with_and_without_cpu_offload_trains_like_ddp_and_checkpoints_move_between_them(tmp_path):
    """Both directions of resume, against an uninterrupted 2-process DDP run: (a) FSDP2 + CPU offload +
    stage checkpointing on 2 ranks for 2 iterations, then the rest on 1 plain process; (b) 1 plain process
    for 2 iterations, then FSDP2 on 2 ranks. Weights and ghost-BN buffers end within 1e-5 of DDP's."""
    ref, a, b = tmp_path / "ddp", tmp_path / "fsdp_offload_then_w1", tmp_path / "w1_then_fsdp"
    first = [_lbsgd(ref, world=2), _lbsgd(a, FSDP_OFFLOAD, world=2, crash_at=3), _lbsgd(b, crash_at=3)]
    for proc, ok in zip(first, (True, False, False)):
        _finish(proc, ok)
    for run, world in ((a, 2), (b, 1)):
        stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
        assert stopped["iteration"] == 2 and stopped["meta"]["world_size"] == world
        assert all(type(v) is torch.Tensor for v in stopped["model"].values())  # plain tensors, not DTensors
        assert sorted(stopped["optimizer"]["state"]) == list(range(len(stopped["optimizer"]["state"])))
    second = [_lbsgd(a), _lbsgd(b, FSDP_ON, world=2)]
    outs = [_finish(proc) for proc in second]
    assert all("resuming at iteration 2" in out for out in outs)
    state = torch.load(ref / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert "layer1.0.bn1.running_mean" in state and int(state["layer1.0.bn1.num_batches_tracked"]) == 8
    assert max_abs_diff(ref, a) <= 1e-5
    assert max_abs_diff(ref, b) <= 1e-5
    loaded, _ = model_from_checkpoint(b / "checkpoints" / "last.pt")  # lbsgd eval reads what FSDP2 wrote
    assert loaded.checkpoint_info["iteration"] == 8
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in run_weights(b).items())


def test_fsdp_keys_are_checked_and_one_process_is_refused(tmp_path):
    cfg = tiny_cfg()
    cfg.memory.fsdp_cpu_offload = True
    with pytest.raises(UserError, match=r"^memory.fsdp_cpu_offload: .* needs memory.fsdp=true$"):
        validate(cfg)
    cfg.memory.fsdp, cfg.device, cfg.dist.backend = True, "cuda", "gloo"
    with pytest.raises(UserError, match=r"^memory.fsdp: FSDP2 on CUDA needs NCCL"):
        validate(cfg)
    cfg.device = "cpu"
    validate(cfg)
    alone = lbsgd("train", f"hydra.run.dir={tmp_path / 'alone'}", *FSDP_CFG, *FSDP_ON)
    err = alone.stderr
    assert alone.returncode == 2 and err.strip().count("\n") == 0, err
    assert err.strip().startswith("lbsgd: error: memory.fsdp:") and "torchrun" in err and ">= 2" in err


_UNEVEN_EVAL = """
import dataclasses
import os
from lbsgd_cli import distributed as D
from lbsgd_cli.data import val_batches
from lbsgd_cli.engine import evaluate
from lbsgd_cli.parallel import FSDP2
from tests.test_offload import tiny_cfg, tiny_data, tiny_model
d = D.init_distributed("cpu", 30.0, "gloo")
data, model = tiny_data(), tiny_model(tiny_cfg())
data = dataclasses.replace(data, val=type(data.val)(data.val.x[:13], data.val.y[:13]))
ref = evaluate(model, val_batches(data, 0, 1, 4, d.device))
fsdp = FSDP2(d)
sharded = fsdp.wrap(model)
got = evaluate(fsdp.eval_model(sharded), fsdp.val_batches(data, 3), fsdp.reduce_sums)  # 13 images: 7 + 6
assert abs(ref["loss"] - got["loss"]) < 1e-5 and ref["top1_err"] == got["top1_err"] and got["images"] == 13
print("same as one process", flush=True)
D.barrier()
os._exit(0)  # as lbsgd's CLI leaves a multi-process run: no teardown of gloo's threads (lbsgd_cli/cli.py)
"""


@pytest.mark.slow
def test_fsdp_evaluation_with_unequal_shares_of_the_val_set(tmp_path):
    """Every FSDP2 forward all-gathers: a rank with fewer val batches must still run as many forwards."""
    (tmp_path / "uneven.py").write_text(_UNEVEN_EVAL)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(tmp_path / "uneven.py")], cwd=ROOT,
                          env=clean_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("same as one process") == 2
