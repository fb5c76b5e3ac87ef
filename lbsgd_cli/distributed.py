"""Process-group setup for 1 process, torchrun and SLURM ``srun`` (§4).

``init_distributed`` reads the launcher's environment (:func:`launch_env`), picks
NCCL on GPUs and gloo on CPU, and returns a :class:`Dist` describing this process.
Reductions used by the loop (metrics, ghost-BN running statistics) live here too.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import PeerFailure, first_line


@dataclass
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # single | torchrun | slurm


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list: ``node[01-03,07],gpu5`` -> ``node01 node02 node03 node07 gpu5``.

    Several bracket groups in one name (``r[1-2]n[1-2]``) expand to their product, in SLURM's order.
    """
    hosts: list[str] = []
    for name in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        hosts += _expand_one(name.strip())
    return hosts


def _expand_one(name: str) -> list[str]:
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", name)
    if not m:
        return [name] if name else []
    prefix, ranges, rest = m.groups()
    heads: list[str] = []
    for r in ranges.split(","):
        lo, _, hi = r.partition("-")
        if not (lo.isdigit() and (not hi or hi.isdigit())):
            raise ValueError(f"cannot parse the SLURM node list entry {name!r}")
        heads += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return [h + t for h in heads for t in (_expand_one(rest) if rest else [""])]


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Rank, world size and rendezvous address from torchrun's or SLURM's variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or any launcher setting the env:// variables)
        return LaunchEnv(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env["WORLD_SIZE"]),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodes = expand_slurm_nodelist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        job = int(env.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", 0)),
            int(env["SLURM_NTASKS"]),
            env.get("MASTER_ADDR", nodes[0]),
            int(env.get("MASTER_PORT", 20000 + job % 20000)),
            "slurm",
        )
    return LaunchEnv(0, 0, 1, "127.0.0.1", 29500, "single")


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    launcher: str
    timeout_s: float = 600.0
    hosts: tuple[str, ...] = ()  # each rank's host name (its node), by rank

    def where(self, ranks: list[int]) -> str:
        """`` on node2`` / `` on node1, node3``: the hosts of ``ranks`` when they are not all this one's."""
        names = sorted({self.hosts[r] for r in ranks if r < len(self.hosts)})
        mine = self.hosts[self.rank] if self.rank < len(self.hosts) else None
        return f" on {', '.join(names)}" if names and names != [mine] else ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from .errors import UserError

        raise UserError("device: cuda was requested but no CUDA device is available")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", local_rank % torch.cuda.device_count())


# Ranks of one job may start minutes apart (imports from a busy shared file system): joining waits this long
# by default (dist.rendezvous_timeout_s).
RENDEZVOUS_MIN_S = 300.0


def init_distributed(device: str = "auto", timeout_s: float = 600.0, backend: str = "auto",
                     rendezvous_s: float = RENDEZVOUS_MIN_S) -> Dist:
    """Join the process group the launcher describes (a no-op for a single process).

    Joining waits up to ``max(timeout_s, rendezvous_s)`` for all ranks; after that every
    collective and barrier waits at most ``timeout_s`` for the others. Every rank learns the others'
    host names, so that a failure can name the node that stopped answering.
    """
    le = launch_env()
    dev = pick_device(device, le.local_rank)
    backend = str(backend)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        from .errors import UserError

        raise UserError("dist.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
    if le.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", le.master_addr)
        os.environ.setdefault("MASTER_PORT", str(le.master_port))
        try:
            dist.init_process_group(
                backend=backend,
                init_method="env://",
                rank=le.rank,
                world_size=le.world_size,
                timeout=datetime.timedelta(seconds=max(timeout_s, rendezvous_s)),
                device_id=dev if backend == "nccl" else None,
            )
        except Exception as exc:
            raise PeerFailure(
                f"distributed: rank {le.rank} of {le.world_size} could not join the process group at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within "
                f"{max(timeout_s, rendezvous_s):g} s (a rank did not start, or the address is wrong or "
                f"unreachable from {socket.gethostname()}): "
                f"{_first_line(exc)}"
            ) from None
        set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # older torch
        set_timeout(datetime.timedelta(seconds=timeout_s))
    hosts: list[str] = [socket.gethostname()]
    if dist.is_initialized() and le.world_size > 1:
        hosts = [""] * le.world_size
        dist.all_gather_object(hosts, socket.gethostname())
    return Dist(le.rank, le.local_rank, le.world_size, dev, le.launcher, timeout_s, tuple(hosts))


# --------------------------------------------------------------------------- failures of other ranks

# What gloo, NCCL and c10d raise when a peer is gone or a wait runs past the timeout (plain RuntimeErrors).
_PEER_ERROR = re.compile(
    r"gloo|nccl|c10d|ProcessGroup|Connection (reset|closed|refused)|timed out|Socket|Broken pipe|peer", re.I
)


def _first_line(exc: BaseException) -> str:
    """:func:`errors.first_line` without the C++ source location and gloo's generic advice."""
    line = first_line(exc)
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)  # drop the C++ source location
    return line.split(" This is typically caused by", 1)[0]  # and gloo's generic advice


def peer_failure(exc: BaseException, d: Dist, iteration: int | None = None) -> PeerFailure | None:
    """A one-line :class:`PeerFailure` for a communication error raised on this rank, else None.

    Only rank-to-rank failures qualify: a dead peer (gloo: connection reset, NCCL: remote error)
    or a wait longer than ``dist.timeout_s`` (a peer hangs).
    """
    if not d.enabled or isinstance(exc, PeerFailure):
        return None
    dist_error = getattr(dist, "DistError", ())
    if not (isinstance(exc, dist_error) or (isinstance(exc, RuntimeError) and _PEER_ERROR.search(str(exc)))):
        return None
    detail = _first_line(exc)
    where = f" at iteration {iteration}" if iteration is not None else ""
    rest = [r for r in range(d.world_size) if r != d.rank]
    others = (f"rank {rest[0]}" if len(rest) == 1 else f"one of the other {len(rest)} ranks") + d.where(rest)
    if re.search(r"timed? ?out|timeout", detail, re.I):
        cause = f"waited more than dist.timeout_s={d.timeout_s:g} s for {others} (it hangs or died)"
    else:
        cause = f"lost the connection to {others} (it crashed or was killed; see its log)"
    return PeerFailure(f"distributed: rank {d.rank} of {d.world_size}{where}: {cause}: {detail}")


def inject_faults(batches: Iterable[Any], rank: int, first_iteration: int,
                  environ: Mapping[str, str] | None = None) -> Iterable[Any]:
    """Test-only fault injection around an epoch's batches; the one place that reads these variables.

    Without ``LBSGD_FAULT_RANK`` in the environment ``batches`` comes back unchanged: nothing runs per
    iteration. ``LBSGD_FAULT_RANK=r LBSGD_FAULT_ITER=i`` make rank ``r`` fail when it is about to run
    iteration ``i`` (counted from 0 over the whole run; ``first_iteration`` is the run's iteration of the
    first batch): ``LBSGD_FAULT_KIND=crash`` (default) exits at once with status 70, as a segfault or an
    OOM kill would; ``hang`` sleeps forever. The other ranks must then exit on their own (status 4)
    within ``dist.timeout_s``.
    """
    env = os.environ if environ is None else environ
    if "LBSGD_FAULT_RANK" not in env or int(env["LBSGD_FAULT_RANK"]) != rank:
        return batches
    at, kind = int(env.get("LBSGD_FAULT_ITER", "0")), env.get("LBSGD_FAULT_KIND", "crash")  # crash | hang

    def faulty() -> Iterator[Any]:
        for iteration, batch in enumerate(batches, start=first_iteration):
            if iteration == at:
                verb = "hangs" if kind == "hang" else "crashes"
                print(f"lbsgd: fault injection: rank {rank} {verb} at iteration {iteration}", file=sys.stderr,
                      flush=True)
                while kind == "hang":
                    time.sleep(3600)
                os._exit(70)
            yield batch

    return faulty()


# --------------------------------------------------------------------------- SLURM requeue


def requeue_command(environ: dict[str, str] | None = None) -> list[str] | None:
    """``scontrol requeue <job>`` for this SLURM job (array tasks as ``<array job>_<task>``), or None."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return ["scontrol", "requeue", f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"]
    if "SLURM_JOB_ID" in env:
        return ["scontrol", "requeue", env["SLURM_JOB_ID"]]
    return None


def _job_state(job: str, runner=subprocess.run) -> str | None:
    """The job's state as ``scontrol show job`` reports it (COMPLETING once ``scancel`` has run), or None."""
    try:
        done = runner(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\bJobState=(\w+)", done.stdout or "") if done.returncode == 0 else None
    return m.group(1) if m else None


def requeue_slurm_job(environ: dict[str, str] | None = None, runner=subprocess.run) -> str:
    """Ask SLURM to requeue this job (call after the preemption checkpoint); a note for the exit message."""
    cmd = requeue_command(environ)
    if cmd is None:
        return "dist.requeue is set but this is not a SLURM job (no SLURM_JOB_ID): not requeued"
    state = _job_state(cmd[2], runner)
    if state in ("CANCELLED", "COMPLETING"):  # `scancel` sends SIGTERM too: the user (or the time limit) ended it
        return f"not requeued: job {cmd[2]} is ending ({state}: cancelled, or past its time limit)"
    try:
        done = runner(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`{' '.join(cmd)}` failed: {_first_line(exc)}"
    if done.returncode != 0:
        why = (done.stderr or done.stdout or "").strip().splitlines()
        return f"`{' '.join(cmd)}` failed ({why[0] if why else f'status {done.returncode}'})"
    return f"requeued with `{' '.join(cmd)}`"


def initialized() -> bool:
    """Whether a process group is up (torchrun / srun with a group initialised by :func:`init_distributed`)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """In-place sum over processes of a list of tensors, as one flat message."""
    if not initialized() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def reduce_scalars(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum a dict of floats over processes (identity on one process)."""
    if not initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj, src: int = 0):
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if initialized():
        dist.barrier()


def destroy() -> None:
    if initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- compressed allreduce (beyond §4)


def register_comm_hook(model: torch.nn.Module, hook: str, powersgd_rank: int = 1,
                       powersgd_start_iter: int = 2) -> object | None:
    """Compress DDP's gradient allreduce with one of torch's communication hooks (``dist.comm_hook``).

    ``fp16``/``bf16`` cast each bucket to 16 bits for the allreduce and back (half the bytes);
    ``powersgd`` (Vogels et al. 2019) sends rank-``r`` factors ``P``, ``Q`` of every matrix-shaped
    gradient with error feedback, after ``powersgd_start_iter`` plain steps. A no-op unless ``model`` is
    DDP-wrapped (one process has no allreduce). Returns the PowerSGD state (None otherwise).
    """
    if hook == "none" or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if hook in ("fp16", "bf16"):
        model.register_comm_hook(None, getattr(default_hooks, f"{hook}_compress_hook"))
        return None
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                        start_powerSGD_iter=powersgd_start_iter, random_seed=0)
    model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return state


POWERSGD_MIN_COMPRESSION_RATE = 2  # torch's PowerSGDState default: compress a matrix only if it shrinks 2x


def allreduce_bytes(model: torch.nn.Module, hook: str = "none", powersgd_rank: int = 1) -> int:
    """Bytes one process puts into the gradient allreduce(s) of one step, for ``dist.comm_hook``.

    ``none``: every gradient element at its own size (4 bytes in fp32); ``fp16``/``bf16``: 2 bytes;
    ``powersgd``: a gradient of ``ndim > 1`` seen as ``rows x cols`` (its first dimension by the rest)
    sends ``r*(rows+cols)`` elements when that is less than half of ``rows*cols`` (torch's rule),
    else all of them; 1-D gradients (biases, BN) go uncompressed. (PowerSGD's first
    ``dist.powersgd_start_iter`` steps are plain allreduces.) The bytes on the wire are this times the
    allreduce algorithm's factor, about ``2(W-1)/W`` for a ring.
    """
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        size = p.element_size()
        if hook in ("fp16", "bf16"):
            total += 2 * p.numel()
        elif hook == "powersgd" and p.ndim > 1:
            rows, cols = p.shape[0], p.numel() // p.shape[0]
            compressed = powersgd_rank * (rows + cols)
            total += size * (compressed if compressed * POWERSGD_MIN_COMPRESSION_RATE < rows * cols else rows * cols)
        else:
            total += size * p.numel()
    return total
