"""The cost model of ``lbsgd plan``: time per iteration of data-parallel SGD on a cluster, before asking for it.

Pure functions (no torch, no Hydra); the command's wiring is :func:`plan_command` at the end. The model and
its sources are written down in ``results/plan.md``; in short, per iteration of ``n`` images per GPU:

* **compute** ``t_c = n / r``: ``r`` the GPU's images/s on one GPU (``scripts/bench/bench_gpu.py`` or
  :data:`GPU_TABLE`); a share ``backward_fraction`` of it is the backward pass (2/3: backward costs about twice
  the forward's FLOPs).
* **allreduce** of the gradient, ``b`` bytes (``lbsgd_cli.distributed.allreduce_bytes``: 4 bytes per element,
  2 under an fp16/bf16 comm hook), in buckets, each costed with the alpha-beta model (Hockney 1994; Thakur,
  Rabenseifner & Gropp 2005) for the chosen algorithm: :func:`ring_time`, :func:`halving_doubling_time`,
  :func:`hierarchical_time` (Goyal et al. 2017, §4.1).
* **overlap** (Goyal et al. §4: "the aggregation must be performed in parallel with backprop"): bucket ``i``
  is ready when backward has produced its bytes, the network allreduces buckets one after another, and only
  what ends after backward is exposed (:func:`exposed_allreduce`).
* **loader**: a node's ``cores`` decode the ``n * gpus_per_node`` images of a step while the step runs
  (prefetch); the step waits for what they cannot finish in time (:func:`loader_wait`).

``t_iter = t_c + exposed + wait``; epoch = ``dataset / (W n)`` iterations; scaling efficiency = ``t_iter`` of
the smallest count / ``t_iter`` (weak scaling, ``n`` fixed per GPU, as Goyal et al.'s Figure 8).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import UserError

GBIT = 1e9 / 8  # bytes/s in one Gbit/s
US = 1e-6

# Published per-GPU training throughput, ResNet-50 on 224x224 ImageNet crops, images/s of one GPU. Each row names
# its source; a number not read from its source is not in this table. ``lbsgd plan gpu=NAME`` reads it.
GPU_TABLE: dict[str, dict[str, Any]] = {
    "P100": {
        "images_per_s": 136.0,
        "arch": "resnet50", "n": 32, "precision": "fp32",
        "source": "Goyal et al. 2017, §5.5 and Figure 7: 8 P100s (kn=256) take 1/1.12 of the 352-GPU iteration, "
                  "whose epoch of ~1.28M images takes about 30 s: 30 s / (1,281,167 / 11,264) / 1.12 = 0.2355 s "
                  "per iteration of 32 images per GPU (Caffe2, one Big Basin server; includes its intra-server "
                  "allreduce and loader)",
    },
    "V100": {
        "images_per_s": 1402.1,
        "arch": "resnet50", "n": 208, "precision": "fp16",
        "source": "MLPerf Training v0.6, NVIDIA, closed, 1xDGX-1 (8 V100-SXM2-16GB), MXNet 19.05: the median of the "
                  "'Speed' lines of its five logs (mlcommons/training_results_v0.6, NVIDIA/results/"
                  "dgx1_ngc19.05_mxnet/resnet/result_*.txt, epochs 1 onward), 11,216.8 images/s for 8 GPUs at 208 "
                  "per GPU (includes the server's allreduce and DALI loader)",
    },
}

# Interconnects as their makers or the anchors' papers state them (nominal, per direction). Latencies are not
# given by these sources: the defaults below are marked as assumed.
LINKS: dict[str, dict[str, Any]] = {
    "ethernet50": {"gbit": 50.0, "source": "Goyal et al. 2017 §4.3: Mellanox ConnectX-4 50Gbit Ethernet"},
    "fdr_ib_x2": {"gbit": 112.0, "source": "Preferred Networks, 'MN-1: a GPU cluster behind 15-min ImageNet' "
                                           "(2017): two FDR InfiniBand links (56Gbps x 2) per node"},
    "edr_ib_x4": {"gbit": 400.0, "source": "MLPerf Training v0.6, NVIDIA/systems/dgx1_n130_ngc19.05_mxnet.json: "
                                           "4 ConnectX-4 cards per DGX-1, 'InfiniBand 100 Gb/sec (4X EDR)'"},
}
ASSUMED_INTER_LATENCY_US = 10.0  # assumed, not from a source: a small message across a switched network
ASSUMED_INTRA_LATENCY_US = 5.0  # assumed, not from a source: a kernel launch plus an NVLink/PCIe hop


# --------------------------------------------------------------------------- alpha-beta costs per algorithm


def ring_time(nbytes: float, p: int, bandwidth: float, latency: float) -> float:
    """Ring (bucket) allreduce of ``nbytes`` over ``p`` ranks: ``2(p-1)`` steps, each rank sends and receives
    ``2(p-1)/p * nbytes`` (Goyal et al. §4.1; Thakur et al. 2005, §4 and Patarasuk & Yuan 2009):
    ``2(p-1) alpha + 2(p-1)/p * nbytes / beta``. ``bandwidth`` in bytes/s, ``latency`` in s; 0 for ``p = 1``."""
    if p <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (p - 1) * latency + 2 * (p - 1) / p * nbytes / bandwidth


def halving_doubling_steps(p: int) -> int:
    """Steps of recursive halving and doubling: ``2 log2 p``; a non-power-of-two ``p`` uses the binary blocks
    algorithm (Rabenseifner 2004, as Goyal et al. §4.1), ``2 ceil(log2 p)`` plus two extra steps."""
    if p <= 1:
        return 0
    k = math.ceil(math.log2(p))
    return 2 * k + (0 if 2**k == p else 2)


def halving_doubling_time(nbytes: float, p: int, bandwidth: float, latency: float) -> float:
    """Recursive halving (reduce-scatter) then doubling (allgather) over ``p`` ranks (Thakur et al. 2005; Goyal
    et al. §4.1): the ring's bytes, ``2(p-1)/p * nbytes``, in :func:`halving_doubling_steps` steps:
    ``2 log2(p) alpha + 2(p-1)/p * nbytes / beta`` (the local reductions' compute is left out)."""
    if p <= 1 or nbytes <= 0:
        return 0.0
    return halving_doubling_steps(p) * latency + 2 * (p - 1) / p * nbytes / bandwidth


def chain_time(nbytes: float, g: int, bandwidth: float, latency: float) -> float:
    """A pipelined reduce (or broadcast) among the ``g`` GPUs of a server: ``(g-1) alpha + nbytes / beta``
    (NCCL's reduce and broadcast run at bus bandwidth = algorithm bandwidth, NCCL tests' PERFORMANCE.md)."""
    if g <= 1 or nbytes <= 0:
        return 0.0
    return (g - 1) * latency + nbytes / bandwidth


def hierarchical_time(nbytes: float, g: int, nodes: int, intra_bw: float, intra_lat: float, inter_bw: float,
                      inter_lat: float) -> float:
    """Goyal et al.'s three phases (§4.1): (1) the ``g`` GPUs of each server reduce into one buffer, (2) the
    ``nodes`` servers allreduce it with recursive halving/doubling, (3) the result is broadcast to the GPUs.
    Phases are added (the paper pipelines them "where possible": this is the upper end)."""
    return (2 * chain_time(nbytes, g, intra_bw, intra_lat)
            + halving_doubling_time(nbytes, nodes, inter_bw, inter_lat))


def allreduce_time(nbytes: float, world: int, per_node: int, algorithm: str, intra_bw: float, intra_lat: float,
                   inter_bw: float, inter_lat: float) -> float:
    """One allreduce of ``nbytes`` over ``world`` ranks, ``per_node`` per node. Flat ``ring`` and
    ``halving_doubling`` run over all ranks; across nodes their bottleneck is the node's network link (ranks
    ordered by node, so one ring edge per node crosses it; halving/doubling's cross-node steps carry, summed
    over the node's ranks, the same bytes), within one node the intra-node link. ``hierarchical``: see
    :func:`hierarchical_time`."""
    if world <= 1:
        return 0.0
    per_node = max(1, min(per_node, world))
    nodes = math.ceil(world / per_node)
    bw, lat = (inter_bw, inter_lat) if nodes > 1 else (intra_bw, intra_lat)
    if algorithm == "ring":
        return ring_time(nbytes, world, bw, lat)
    if algorithm == "halving_doubling":
        return halving_doubling_time(nbytes, world, bw, lat)
    if algorithm == "hierarchical":
        return hierarchical_time(nbytes, per_node, nodes, intra_bw, intra_lat, inter_bw, inter_lat)
    raise ValueError(f"unknown allreduce algorithm {algorithm!r}")


# --------------------------------------------------------------------------- overlap, loader, one step


def hook_bytes_per_element(comm_hook: str) -> int:
    """Bytes each gradient element takes in the allreduce: 4 (fp32), 2 under the fp16/bf16 hooks
    (``lbsgd_cli.distributed.allreduce_bytes``). PowerSGD's depends on the shapes: give its bytes directly."""
    if comm_hook in ("fp16", "bf16"):
        return 2
    if comm_hook == "none":
        return 4
    raise ValueError(f"comm hook {comm_hook!r}: give the bytes it sends (lbsgd_cli.distributed.allreduce_bytes)")


def buckets(nbytes: float, bucket_bytes: float, first_bucket_bytes: float = 0.0) -> list[float]:
    """Gradient buckets of at most ``bucket_bytes`` in the order backward fills them (DDP: ``bucket_cap_mb``
    25 MiB, a first bucket of 1 MiB). ``bucket_bytes <= 0``: one buffer of everything."""
    if nbytes <= 0:
        return []
    if bucket_bytes <= 0:
        return [float(nbytes)]
    out, left = [], float(nbytes)
    if 0 < first_bucket_bytes < left:
        out.append(float(first_bucket_bytes))
        left -= first_bucket_bytes
    while left > 0:
        out.append(min(bucket_bytes, left))
        left -= out[-1]
    return out


def exposed_allreduce(bucket_sizes: Sequence[float], bucket_times: Sequence[float], backward_s: float,
                      overlap: bool = True) -> float:
    """Allreduce time not hidden behind backward. With ``overlap`` bucket ``i`` is ready when backward has
    produced its bytes (gradients assumed to appear at a constant rate through backward), the network runs
    one bucket after another, and what ends after backward is exposed: ``max(0, finish_last - backward_s)``,
    ``finish_i = max(ready_i, finish_(i-1)) + T_i`` (Goyal et al. §4, allreduce pipelined with backprop).
    Without overlap every bucket waits for the end of backward: the sum of their times."""
    total = float(sum(bucket_sizes))
    if not bucket_times:
        return 0.0
    if not overlap or total <= 0:
        return float(sum(bucket_times))
    finish, done = 0.0, 0.0
    for size, t in zip(bucket_sizes, bucket_times):
        done += size
        ready = backward_s * done / total
        finish = max(ready, finish) + t
    return max(0.0, finish - backward_s)


def loader_wait(n: int, per_node: int, decode_s: float, cores: float, step_s: float) -> float:
    """Seconds a step waits for its images: a node's ``cores`` decode ``n * per_node`` images at ``decode_s``
    CPU seconds each while the previous step runs (prefetch), so the wait is
    ``max(0, n * per_node * decode_s / cores - step_s)``; 0 when the loader is not modelled (no cost or cores)."""
    if decode_s <= 0 or cores <= 0:
        return 0.0
    return max(0.0, n * per_node * decode_s / cores - step_s)


@dataclass
class StepCost:
    """One iteration's time and its parts (seconds)."""

    compute_s: float
    allreduce_s: float  # all buckets back to back: the allreduce alone
    exposed_s: float  # of it, what backward does not hide
    loader_wait_s: float

    @property
    def iter_s(self) -> float:
        return self.compute_s + self.exposed_s + self.loader_wait_s


def step_cost(compute_s: float, grad_bytes: float, world: int, per_node: int = 1, *, algorithm: str = "ring",
              intra_bw: float = math.inf, intra_lat: float = 0.0, inter_bw: float = math.inf,
              inter_lat: float = 0.0, bucket_bytes: float = 25 * 2**20, first_bucket_bytes: float = 2**20,
              overlap: bool = True, backward_fraction: float = 2 / 3, n: int = 1, decode_s: float = 0.0,
              loader_cores: float = 0.0) -> StepCost:
    """The cost of one iteration (see the module's docstring); ``grad_bytes`` as sent (after a comm hook)."""
    sizes = buckets(grad_bytes, bucket_bytes, first_bucket_bytes)
    times = [allreduce_time(b, world, per_node, algorithm, intra_bw, intra_lat, inter_bw, inter_lat) for b in sizes]
    exposed = exposed_allreduce(sizes, times, backward_fraction * compute_s, overlap)
    wait = loader_wait(n, min(per_node, world), decode_s, loader_cores, compute_s + exposed)
    return StepCost(compute_s, float(sum(times)), exposed, wait)


def predict_step(compute_s: float, grad_bytes: float, world: int, ranks_per_node: int = 1, *,
                 bandwidth_gbit: float, latency_ms: float, algorithm: str = "ring", comm_hook: str = "none",
                 bytes_are_sent: bool = True, overlap: bool = True, bucket_bytes: float = 25 * 2**20,
                 first_bucket_bytes: float = 2**20, backward_fraction: float = 2 / 3) -> StepCost:
    """A step's time on a cluster of one link kind (the local cluster of ``scripts/experiments/check_plan_local.py``: gloo's
    ring over veth links): ``compute_s`` the one-process step, ``grad_bytes`` the bytes allreduced per step,
    as :func:`lbsgd_cli.distributed.allreduce_bytes` gives them for ``comm_hook`` (``bytes_are_sent=False``:
    fp32 bytes, scaled here by the hook), ``bandwidth_gbit`` and ``latency_ms`` the link's (one-way). The
    same link serves within and across nodes."""
    if not bytes_are_sent:
        grad_bytes = grad_bytes * hook_bytes_per_element(comm_hook) / 4
    bw, lat = bandwidth_gbit * GBIT, latency_ms * 1e-3
    return step_cost(compute_s, grad_bytes, world, ranks_per_node, algorithm=algorithm, intra_bw=bw, intra_lat=lat,
                     inter_bw=bw, inter_lat=lat, bucket_bytes=bucket_bytes, first_bucket_bytes=first_bucket_bytes,
                     overlap=overlap, backward_fraction=backward_fraction)


# --------------------------------------------------------------------------- bottleneck, rows, noise-scale edge

BOTTLENECK_SHARE = 0.10  # exposed allreduce or loader wait above this share of a step names the bottleneck


def bottleneck(cost: StepCost, share: float = BOTTLENECK_SHARE) -> str:
    """``allreduce`` or ``loader``, whichever of the two costs more, when it is at least ``share`` of the
    iteration; otherwise ``compute`` (the GPUs are busy: more GPUs cost only what they compute)."""
    other = max(("allreduce", cost.exposed_s), ("loader", cost.loader_wait_s), key=lambda kv: kv[1])
    return other[0] if cost.iter_s > 0 and other[1] >= share * cost.iter_s else "compute"


def gpu_counts(gpus: int, start: int = 8) -> list[int]:
    """8, 16, 32, ... up to ``gpus``, and ``gpus`` itself (a count below 8: just that count)."""
    out = []
    c = start
    while c < gpus:
        out.append(c)
        c *= 2
    return [*out, gpus]


def noise_edge(b_simple: float) -> int | None:
    """The largest useful ``kn`` for a measured ``B_simple``: the power of two nearest to it on a log scale
    (``scripts/experiments/recommend_kn.py``; results/beyond.md: one doubling from the measured edge); None if infinite."""
    if not math.isfinite(b_simple) or b_simple <= 0:
        return None
    return 2 ** max(0, round(math.log2(b_simple)))


def past_edge(kn: int, edge: int | None) -> bool:
    """Is a minibatch ``kn`` past the predicted edge (no edge: never)."""
    return edge is not None and kn > edge


def fastest_within(rows: Iterable[dict], edge: int | None) -> dict | None:
    """The row with the shortest time to train among those whose ``kn`` stays within ``edge``."""
    ok = [r for r in rows if not past_edge(r["kn"], edge)]
    return min(ok, key=lambda r: r["time_to_train_s"]) if ok else None


@dataclass
class Cluster:
    """What ``lbsgd plan`` models: a GPU, its nodes and links, the algorithm, the loader and the schedule."""

    images_per_s: float  # one GPU's training images/s at n per GPU
    grad_bytes: float  # bytes one GPU sends into the allreduce per step (after the comm hook)
    n: int = 32
    gpus_per_node: int = 8
    intra_gbit: float = 160.0
    intra_latency_us: float = ASSUMED_INTRA_LATENCY_US
    inter_gbit: float = 50.0
    inter_latency_us: float = ASSUMED_INTER_LATENCY_US
    algorithm: str = "hierarchical"
    bucket_mb: float = 25.0
    first_bucket_mb: float = 1.0
    overlap: bool = True
    backward_fraction: float = 2 / 3
    loader_cores_per_node: float = 0.0
    decode_ms_per_image: float = 0.0
    epochs: float = 90.0
    dataset_size: int = 1_281_167
    extra: dict = field(default_factory=dict)

    def cost(self, world: int) -> StepCost:
        return step_cost(self.n / self.images_per_s, self.grad_bytes, world, self.gpus_per_node,
                         algorithm=self.algorithm, intra_bw=self.intra_gbit * GBIT,
                         intra_lat=self.intra_latency_us * US, inter_bw=self.inter_gbit * GBIT,
                         inter_lat=self.inter_latency_us * US, bucket_bytes=self.bucket_mb * 2**20,
                         first_bucket_bytes=self.first_bucket_mb * 2**20, overlap=self.overlap,
                         backward_fraction=self.backward_fraction, n=self.n,
                         decode_s=self.decode_ms_per_image * 1e-3, loader_cores=self.loader_cores_per_node)


def plan_rows(cluster: Cluster, counts: Sequence[int], edge: int | None = None) -> list[dict]:
    """One row per GPU count: the iteration and its parts, the bottleneck, efficiency (vs the first count),
    epoch and time to train, and whether its ``kn`` is past the noise-scale edge."""
    rows = []
    base = None
    for w in counts:
        c = cluster.cost(w)
        base = base if base is not None else c.iter_s
        iters = cluster.dataset_size / (w * cluster.n)
        rows.append({"gpus": w, "nodes": math.ceil(w / cluster.gpus_per_node), "kn": w * cluster.n,
                     "compute_s": c.compute_s, "allreduce_s": c.allreduce_s, "exposed_allreduce_s": c.exposed_s,
                     "loader_wait_s": c.loader_wait_s, "iter_s": c.iter_s, "bottleneck": bottleneck(c),
                     "efficiency": base / c.iter_s, "epoch_s": iters * c.iter_s,
                     "time_to_train_s": cluster.epochs * iters * c.iter_s,
                     "past_edge": past_edge(w * cluster.n, edge) if edge is not None else ""})
    return rows


# --------------------------------------------------------------------------- published runs (results/plan.md)

RESNET50_GRAD_BYTES = 25_557_032 * 4  # torchvision resnet50: 25,557,032 parameters in 161 tensors, fp32
RESNET101_GRAD_BYTES = 44_549_160 * 4  # torchvision resnet101: 44,549,160 parameters in 314 tensors
# Forward FLOPs of one 224x224 image, torch.utils.flop_counter on torchvision's models: 15.60e9 / 8.18e9
RESNET101_OVER_50_FLOPS = 1.908
P100_NVLINK_GBIT = 160.0  # one NVLink 1.0 link, 20 GB/s per direction (NVIDIA's P100 whitepaper; not re-read here)
# One NVLink 2.0 link, 25 GB/s per direction (NVIDIA's NVLink page: "increased the signaling rate from 20 to 25
# GB/second in each direction"); DGX-1's cube-mesh is "three interwoven rings of single NVLink connections"
V100_NVLINK_GBIT = 200.0
IMAGENET_TRAIN = 1_281_167
# MLPerf Training v0.6, NVIDIA closed division, 130 DGX-1 (mlcommons/training_results_v0.6, NVIDIA/results/
# dgx1_n130_ngc19.05_mxnet/resnet/result_[0-4].txt and config_DGX1_multi.sh): 52 images per GPU, global batch
# 54,080; the median "Speed" line of the five logs (epochs 1 onward) is 1,147,380 images/s
MLPERF_N130_KN = 54_080
MLPERF_N130_IMAGES_PER_S = 1_147_380.0
MLPERF_N130 = {"images_per_s": 1402.1, "grad_bytes": 25_557_032 * 2, "n": 52, "gpus_per_node": 8,
               "intra_gbit": V100_NVLINK_GBIT, "inter_gbit": 400.0, "algorithm": "hierarchical",
               "bucket_mb": 25_557_032 * 2 / 16 / 2**20, "first_bucket_mb": 0.0, "overlap": True, "epochs": 86}

# Fitted constants: none. Every input below is a published figure or a stated assumption (the latencies).
ANCHORS: list[dict[str, Any]] = [
    {"name": "Goyal et al. 2017, 352 P100s: time per iteration (Fig. 7, 'increases only 12%' from kn=256)",
     "world": 352, "quantity": "iter_s", "reported": 30.0 / (IMAGENET_TRAIN / 11264),
     "source": "§5.5: one epoch of ~1.28M images in about 30 s at kn=11264 (Fig. 7 caption): 0.264 s",
     "cluster": {"images_per_s": 136.0, "grad_bytes": RESNET50_GRAD_BYTES, "n": 32, "gpus_per_node": 8,
                 "intra_gbit": P100_NVLINK_GBIT, "inter_gbit": 50.0, "algorithm": "hierarchical",
                 "bucket_mb": RESNET50_GRAD_BYTES / 161 / 2**20, "first_bucket_mb": 0.0, "overlap": True}},
    {"name": "Goyal et al. 2017, 256 P100s: time to train, 90 epochs ('in one hour')",
     "world": 256, "quantity": "time_to_train_s", "reported": 3600.0,
     "source": "abstract and §5: 'ResNet-50 ... using 256 workers in one hour'",
     "cluster": "goyal"},
    {"name": "Goyal et al. 2017, 8 -> 352 P100s: scaling efficiency (Fig. 8, '~90%')",
     "world": 352, "quantity": "efficiency", "reported": 0.90, "base": 8,
     "source": "§5.5 and Figure 8: '~90% scaling efficiency' relative to the 8-GPU baseline",
     "cluster": "goyal"},
    {"name": "Goyal et al. 2017, ResNet-101 on 256 P100s: time to train, 90 epochs",
     "world": 256, "quantity": "time_to_train_s", "reported": 92.5 * 60,
     "source": "§5.3: 'The training time of ResNet-101 is 92.5 minutes ... 256 Tesla P100 GPUs ... 8k'",
     "cluster": {"images_per_s": 136.0 / RESNET101_OVER_50_FLOPS, "grad_bytes": RESNET101_GRAD_BYTES, "n": 32,
                 "gpus_per_node": 8, "intra_gbit": P100_NVLINK_GBIT, "inter_gbit": 50.0,
                 "algorithm": "hierarchical", "bucket_mb": RESNET101_GRAD_BYTES / 314 / 2**20,
                 "first_bucket_mb": 0.0, "overlap": True}},
    {"name": "Akiba et al. 2017, 1024 P100s, kn=32k: time to train, 90 epochs",
     "world": 1024, "quantity": "time_to_train_s", "reported": 15 * 60.0,
     "source": "abstract: '90 epochs ... in 15 minutes with 1024 Tesla P100 GPUs ... minibatch size of 32k'; "
               "hardware: PFN's MN-1 post (128 nodes of 8 P100s, two FDR InfiniBand links, ring allreduce)",
     "cluster": {"images_per_s": 136.0, "grad_bytes": RESNET50_GRAD_BYTES, "n": 32, "gpus_per_node": 8,
                 "intra_gbit": P100_NVLINK_GBIT, "inter_gbit": 112.0, "algorithm": "ring", "bucket_mb": 0.0,
                 "overlap": False}},
    # Another group, another GPU, fp16 and NCCL's trees. NCCL 2.4.6 (the run's) reduces along a chain in each
    # node and a binary tree between node masters whenever its ring latency estimate exceeds the tree's (init.cc,
    # ncclTreeThreshold: 6 us x 1039 ring steps against 15 us x log2(130) + 4 us x 7), which at 130 nodes is every
    # buffer up to at least 91.5 MB: the model's `hierarchical`. MXNet's fp16 weights give fp16 gradients (2 bytes each);
    # MXNET_HOROVOD_NUM_GROUPS=16 groups them into 16 allreduces overlapped with backward.
    {"name": "MLPerf v0.6 (NVIDIA), 130 DGX-1 = 1,040 V100s, kn=54,080: time per iteration",
     "world": 1040, "quantity": "iter_s", "reported": MLPERF_N130_KN / MLPERF_N130_IMAGES_PER_S,
     "source": "mlcommons/training_results_v0.6, NVIDIA/results/dgx1_n130_ngc19.05_mxnet/resnet: median 'Speed' "
               "1,147,380 images/s at a global batch of 54,080: 47.1 ms",
     "cluster": MLPERF_N130},
    {"name": "MLPerf v0.6 (NVIDIA), 130 DGX-1 = 1,040 V100s, kn=54,080: time to train (86 epochs to 75.9%)",
     "world": 1040, "quantity": "time_to_train_s", "reported": 101.45,
     "source": "the same five logs, run_stop - run_start: 101.56, 101.44, 101.44, 97.09, 101.46 s; MLPerf's score "
               "(mean of the middle three) 101.45 s = 1.69 min; 86 epochs in four runs of five",
     "cluster": MLPERF_N130},
]


def anchor_cluster(anchor: dict) -> Cluster:
    spec = anchor["cluster"]
    if spec == "goyal":
        spec = ANCHORS[0]["cluster"]
    return Cluster(**spec)


def check_anchor(anchor: dict) -> dict[str, Any]:
    """The model's figure for a published run (inputs from :data:`ANCHORS`) and its relative error."""
    cluster = anchor_cluster(anchor)
    counts = [anchor.get("base", anchor["world"]), anchor["world"]]
    row = plan_rows(cluster, counts)[-1]
    predicted = row[anchor["quantity"]]
    return {"name": anchor["name"], "quantity": anchor["quantity"], "predicted": predicted,
            "reported": anchor["reported"], "rel_error": predicted / anchor["reported"] - 1, "row": row}


# --------------------------------------------------------------------------- inputs read from files


def images_per_s_from_bench(path: Path, row: str | None = None) -> tuple[float, str]:
    """A GPU's images/s from ``scripts/bench/bench_gpu.py``'s JSON: the named ``step`` row, else the fastest one."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"plan.gpu_bench: {path} does not exist (scripts/bench/bench_gpu.py writes bench_gpu.json)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"plan.gpu_bench: cannot read {path}: {exc}") from None
    steps = {k: v for k, v in (data.get("step") or {}).items() if isinstance(v, dict) and v.get("img_per_s")}
    if row is not None:
        if row not in steps:
            raise UserError(f"plan.gpu_bench_row: {row!r} is not a measured step row of {path} "
                            f"(rows: {', '.join(steps) or 'none'})")
        steps = {row: steps[row]}
    if not steps:
        raise UserError(f"plan.gpu_bench: {path} holds no measured step rows (img_per_s)")
    name = max(steps, key=lambda k: steps[k]["img_per_s"])
    return float(steps[name]["img_per_s"]), f"{path}: {data.get('gpu', 'GPU')}, {name}"


def b_simple_from_run(run_dir: Path) -> tuple[float, str]:
    """The median ``B_simple`` of a ``log.noise_scale=true`` run, as ``scripts/experiments/recommend_kn.py`` computes it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"plan.noise_run: {run_dir} is not a directory")
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"plan.noise_run: {run_dir} has no metrics.jsonl (a run of lbsgd train log.noise_scale=true)")
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "experiments" / "recommend_kn.py"
    if not script.is_file():
        raise UserError(f"plan.noise_run needs scripts/experiments/recommend_kn.py beside the package ({script} is missing)")
    spec = importlib.util.spec_from_file_location("_lbsgd_recommend_kn", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    try:
        r = mod.recommend(run_dir)
    except SystemExit as exc:  # the script's own one-line error
        raise UserError(f"plan.noise_run: {exc}") from None
    return float(r["b_simple"]), f"{run_dir}: median B_simple {r['b_simple']:.1f} over {r['records']} records"


# --------------------------------------------------------------------------- output

CSV_COLUMNS = ["gpus", "nodes", "kn", "compute_s", "allreduce_s", "exposed_allreduce_s", "loader_wait_s", "iter_s",
               "bottleneck", "efficiency", "epoch_s", "time_to_train_s", "past_edge"]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in CSV_COLUMNS})


def hms(seconds: float) -> str:
    """``1h 02m``, ``3m 20s``, ``12.5s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("GPUs", "kn", "iter ms", "compute", "exposed allreduce", "loader wait", "bottleneck", "efficiency",
                "epoch", "time to train", "past edge"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["gpus"]), str(r["kn"]), f"{r['iter_s'] * 1e3:.1f}", f"{r['compute_s'] * 1e3:.1f}",
                  f"{r['exposed_allreduce_s'] * 1e3:.1f} (of {r['allreduce_s'] * 1e3:.1f})",
                  f"{r['loader_wait_s'] * 1e3:.1f}", r["bottleneck"], f"{r['efficiency']:.0%}", hms(r["epoch_s"]),
                  hms(r["time_to_train_s"]), {True: "yes", False: "no", "": "-"}[r["past_edge"]])
    Console(width=160).print(t)


def write_figure(rows: list[dict], path: Path, title: str) -> None:
    """Time to train and scaling efficiency against GPUs (Goyal et al. Figures 7 and 8, as a plan)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("the figure needs matplotlib: pip install 'lbsgd[plots]' (plan.csv was written)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["gpus"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(g, [r["time_to_train_s"] / 3600 for r in rows], "o-", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("time to train (hours)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(g, [100 * r["efficiency"] for r in rows], "s--", color="tab:orange")
    ax2.set_ylabel("scaling efficiency (%)", color="tab:orange")
    ax2.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- lbsgd plan


def _model_config(cfg: Any) -> tuple[Any, dict]:
    """The network's config (plan.run_dir's config.yaml, else the composed ``model``) and what the run sets."""
    from omegaconf import OmegaConf

    p = cfg.plan
    if not p.run_dir:
        return cfg.model, {}
    run = Path(p.run_dir)
    if not run.is_dir():
        raise UserError(f"plan.run_dir: {run} does not exist")
    if not (run / "config.yaml").is_file():
        raise UserError(f"plan.run_dir: {run} has no config.yaml (a run directory of lbsgd train)")
    stored = OmegaConf.load(run / "config.yaml")
    return stored.model, {"n": int(stored.batch.n), "epochs": float(stored.schedule.epochs)}


def gradient_bytes(mcfg: Any, num_classes: int, comm_hook: str, powersgd_rank: int = 1) -> tuple[float, int]:
    """Bytes one GPU allreduces per step for the network (``lbsgd_cli.distributed.allreduce_bytes``) and its
    parameter count: the network is built on the CPU (ResNet-50: about a second)."""
    import torch

    from .distributed import allreduce_bytes
    from .models import build_model

    with torch.device("meta"):
        model = build_model(mcfg, num_classes, 3, None)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return float(allreduce_bytes(model, comm_hook, powersgd_rank)), params


def plan_command(cfg: Any, out_dir: Path) -> list[dict]:
    """``lbsgd plan``: the table, ``plan.csv``, ``plan.png`` and ``plan.json`` (the inputs) in ``out_dir``."""
    p = cfg.plan
    out_dir = Path(out_dir)
    for name in ("plan.csv", "plan.png", "plan.json"):
        if (out_dir / name).exists():
            raise UserError(f"{out_dir} already holds {name}; choose another hydra.run.dir")
    mcfg, from_run = _model_config(cfg)
    n = from_run.get("n", p.n)
    epochs = from_run.get("epochs", p.epochs)
    if p.images_per_s:
        ips, ips_source = float(p.images_per_s), "plan.images_per_s"
    elif p.gpu_bench:
        ips, ips_source = images_per_s_from_bench(Path(p.gpu_bench), p.gpu_bench_row)
    else:
        row = GPU_TABLE[p.gpu]
        ips, ips_source = row["images_per_s"], f"{p.gpu}: {row['source']}"
    grad_bytes, params = gradient_bytes(mcfg, p.num_classes, str(p.comm_hook), p.powersgd_rank)
    edge, edge_source = None, ""
    if p.noise_run:
        b, edge_source = b_simple_from_run(Path(p.noise_run))
        edge = noise_edge(b)
    cluster = Cluster(images_per_s=ips, grad_bytes=grad_bytes, n=n, gpus_per_node=p.gpus_per_node,
                      intra_gbit=p.intra_gbit, intra_latency_us=p.intra_latency_us, inter_gbit=p.inter_gbit,
                      inter_latency_us=p.inter_latency_us, algorithm=str(p.algorithm), bucket_mb=p.bucket_mb,
                      first_bucket_mb=p.first_bucket_mb, overlap=p.overlap, backward_fraction=p.backward_fraction,
                      loader_cores_per_node=p.loader_cores_per_node, decode_ms_per_image=p.decode_ms_per_image,
                      epochs=epochs, dataset_size=p.dataset_size)
    rows = plan_rows(cluster, gpu_counts(p.gpus), edge)
    title = (f"{mcfg.arch}, n={n}/GPU, {ips:.0f} img/s/GPU, {p.gpus_per_node}/node, {p.algorithm} allreduce "
             f"({p.comm_hook}), {p.inter_gbit:g} Gbit/s between nodes")
    out_dir.mkdir(parents=True, exist_ok=True)
    print_table(rows, title)
    print(f"gradient: {params:,} parameters, {grad_bytes / 2**20:.1f} MiB per allreduce; images/s from {ips_source}")
    if edge is not None or p.noise_run:
        best = fastest_within(rows, edge)
        past = [r["gpus"] for r in rows if r["past_edge"] is True]
        print(f"noise scale: {edge_source}; predicted edge kn = {edge if edge is not None else 'none (infinite)'}"
              + (f"; past it: {', '.join(map(str, past))} GPUs" if past else "; no row is past it"))
        if best is not None:
            print(f"fastest within the edge: {best['gpus']} GPUs (kn {best['kn']}), {hms(best['time_to_train_s'])}")
        else:
            print(f"no row stays within the edge: use fewer GPUs or a smaller n (kn <= {edge})")
    write_csv(rows, out_dir / "plan.csv")
    inputs = {**asdict(cluster), "gpus": p.gpus, "arch": str(mcfg.arch), "params": params,
              "images_per_s_source": ips_source, "noise_edge_kn": edge, "noise_source": edge_source}
    (out_dir / "plan.json").write_text(json.dumps(inputs, indent=1, default=str) + "\n")
    write_figure(rows, out_dir / "plan.png", title)
    print(f"wrote {out_dir / 'plan.csv'}, {out_dir / 'plan.png'} and {out_dir / 'plan.json'}")
    return rows
