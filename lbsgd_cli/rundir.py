"""The run directory of ``lbsgd train``: lock, resume or start, checkpoints, run info, summary.

A run directory belongs to one run at a time: rank 0 holds an exclusive ``fcntl.flock`` on
``.lock`` for the run's life and writes its host and pid into it, so a second start on the same
directory is a one-line error naming them; the OS drops the lock when the holder exits, so a run
killed at any moment (even ``kill -9``) never blocks the next start. A checkpoint holds the run's
:class:`RunState`; a resumed run must have the same config up to the keys that do not change the
result (:func:`lbsgd_cli.config.no_effect_keys`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import DictConfig, OmegaConf

from . import distributed as D
from .checkpoint import FORMAT, atomic_save, load_checkpoint, rng_state, set_rng_state
from .config import TrainConfig, no_effect_keys
from .errors import CheckpointWriteError, Diverged, UserError
from .metrics import read_metrics
from .parallel import Parallel


def zero_sums() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "count": 0.0, "skipped": 0.0}


@dataclass
class RunState:
    """Where a run stands: what a checkpoint carries besides weights, optimizer, RNG and config."""

    iteration: int = 0  # optimizer steps done over the whole run
    epoch: int = 0  # the epoch the next step belongs to
    iter_in_epoch: int = 0  # the next step's index within that epoch
    epoch_sums: dict[str, float] = field(default_factory=zero_sums)  # the running epoch's partial sums
    last_val: dict[str, float] = field(default_factory=dict)  # the last evaluation's results
    elapsed_s: float = 0.0  # wall time of the run so far, over all its starts
    scaler: dict[str, Any] = field(default_factory=dict)  # fp16: the GradScaler's state (scale, growth tracker)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], is_main: bool) -> RunState:
        """The state a checkpoint holds; only rank 0 carries the (already reduced) partial sums on."""
        sums = (ckpt.get("epoch_sums") if is_main else None) or zero_sums()  # "skipped": absent before fp16
        return cls(ckpt["iteration"], ckpt["epoch"], ckpt["iter_in_epoch"], sums, ckpt.get("last_val") or {},
                   float(ckpt.get("elapsed_s", 0.0)), ckpt.get("scaler") or {})


# --------------------------------------------------------------------------- config difference


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


@functools.cache
def _schema_defaults() -> dict[str, Any]:
    """Every key's default in the schema: the value a key added after a run was started had in that run
    (new keys keep the old behaviour by default)."""
    return _flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True))


def config_difference(old: dict, new: dict, ignored: tuple[str, ...] | None = None) -> str | None:
    """The first key whose value differs between two resolved configs, ignoring the keys that do not
    change the result (``ignored``, by default the schema's :func:`no_effect_keys`)."""
    ignored = tuple(no_effect_keys("train")) if ignored is None else ignored
    fo, fn = _flatten(old), _flatten(new)
    for key in sorted(set(fo) | set(fn)):
        if any(key == i or key.startswith(i + ".") for i in ignored):
            continue
        old_value = fo[key] if key in fo else _schema_defaults().get(key)  # a key added since that run
        if old_value != fn.get(key):
            return f"{key}: {fo.get(key)!r} -> {fn.get(key)!r}"
    return None


# --------------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/.lock``; the holder's host and pid are written into it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._file: IO[str] | None = None
        self._created = False  # this process made the lock file (it was not there before)

    def acquire(self) -> str | None:
        """Take the lock; the one-line reason if another process holds it (then nothing is held)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._created = not self.path.exists()
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process (starting)"
            f.close()
            return (f"run directory {self.path.parent} is in use by {holder}; "
                    "wait for that run to end or choose another hydra.run.dir")
        self._file = f
        return None

    def claim(self) -> None:
        """Write this process's host and pid into the held lock file."""
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(f"pid {os.getpid()} on host {platform.node()}\n")
            self._file.flush()

    def release(self, refused: bool = False) -> None:
        """Let the lock go. ``refused``: the run was refused before it claimed the lock, so a lock file this
        process made (still empty) is removed while it is held: a refusal leaves nothing behind."""
        if self._file is not None:
            if refused and self._created and os.fstat(self._file.fileno()).st_size == 0:
                self.path.unlink(missing_ok=True)
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


# --------------------------------------------------------------------------- the run directory


class RunDir:
    """One run's directory, shared by every rank (rank 0's path); use as a context manager to hold its lock."""

    def __init__(self, path: Path, parallel: Parallel) -> None:
        self.path = Path(D.broadcast_object(str(path)))  # every rank writes to rank 0's folder
        self.parallel = parallel
        self.ckpt_path = self.path / "checkpoints" / "last.pt"
        self.summary_path = self.path / "summary.json"
        self._lock = RunLock(self.path)

    def __enter__(self) -> RunDir:
        refused = self._lock.acquire() if self.parallel.is_main else None
        refused = D.broadcast_object(refused)  # every rank stops with rank 0's one-line reason
        if refused:
            self._lock.release()
            raise UserError(refused)
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self._lock.release(refused=exc_type is not None and issubclass(exc_type, UserError))

    def resume_or_start(self, cfg: DictConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        auto_chosen: tuple[str, ...] = ()) -> RunState:
        """The state of the run in this directory (weights, optimizer and RNG loaded), or a fresh start.

        A run that diverged is not retrained over: its checkpoint would diverge again at the same step.
        ``auto_chosen``: the keys whose ``auto`` value this start resolved (a refusal names the way back)."""
        diverged = D.broadcast_object(self._diverged() if self.parallel.is_main else None)
        if diverged:
            raise Diverged(diverged)
        exists = self.ckpt_path.exists()
        if D.broadcast_object(exists) != exists:  # rank 0 decides whether to resume
            raise UserError(f"rank {self.parallel.rank} does not see {self.ckpt_path} as rank 0 does; "
                            "the run directory must be on a file system shared by all nodes")
        if exists:
            return self._resume(cfg, model, optimizer, auto_chosen)
        if self.parallel.is_main:
            leftovers = [p.name for p in self.path.iterdir() if p.name in ("metrics.jsonl", "summary.json")]
            if leftovers:
                raise UserError(f"run directory {self.path} has {leftovers[0]} but no checkpoint to resume; "
                                "choose another hydra.run.dir")
            self._write_config(cfg)
            self._lock.claim()
            self._append_run_info(cfg.seed, resumed_from=None)
        D.barrier()
        return RunState()

    def _diverged(self) -> str | None:
        """The one-line refusal for a run directory whose summary says the run diverged, else None."""
        if not self.summary_path.exists():
            return None
        s = json.loads(self.summary_path.read_text())
        if not s.get("diverged"):
            return None
        return (f"run directory {self.path} holds a run that diverged at iteration {s.get('diverged_at_iteration')} "
                f"(lr {s.get('lr')}); nothing was run: choose another hydra.run.dir or a smaller rate")

    def _resume(self, cfg: DictConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                auto_chosen: tuple[str, ...] = ()) -> RunState:
        p = self.parallel
        ckpt = load_checkpoint(self.ckpt_path, map_location=p.device)
        diff = config_difference(ckpt["config"], OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        if diff:
            hint = "choose another hydra.run.dir or restore the config"
            if diff.split(":", 1)[0] in auto_chosen:  # e.g. started on a CPU (auto: fp32), resumed on a GPU (bf16)
                was, now = _flatten(ckpt["config"]), _flatten(OmegaConf.to_container(cfg, enum_to_str=True))
                keep = " ".join(f"{k}={str(was.get(k)).lower() if isinstance(was.get(k), bool) else was.get(k)}"
                                for k in auto_chosen if was.get(k) != now.get(k))
                hint = f"auto chose other values on this device; set {keep} to resume it, or choose another " \
                       "hydra.run.dir"
            raise UserError(f"run directory {self.path} holds a run with another config ({diff}); {hint}")
        p.load_full_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"], str(self.ckpt_path))
        if ckpt["meta"].get("world_size") == p.world_size:
            set_rng_state({k: v.cpu() if torch.is_tensor(v) else v for k, v in ckpt["rng"].items()})
        if p.is_main:
            self._lock.claim()
            self._write_config(cfg)  # keys that leave the result alone may differ (a probe's stop_after_epoch)
            self._append_run_info(cfg.seed, resumed_from=ckpt["iteration"])
        return RunState.from_checkpoint(ckpt, p.is_main)

    def _write_config(self, cfg: DictConfig) -> None:
        """``config.yaml``: the config of this start, resolved (atomic: readers see the old file or the new)."""
        path = self.path / "config.yaml"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        os.replace(tmp, path)

    def save(self, cfg: DictConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: RunState,
             metrics_failed: str | None = None) -> None:
        """An atomic checkpoint of ``state`` with plain full state dicts (a collective: every rank calls it).

        ``metrics_failed`` (rank 0: a metrics record could not be written) skips the checkpoint and stops
        every rank with status 6: the previous checkpoint stays the last, so the same command resumes
        before the lost records and writes them again."""
        p = self.parallel
        epoch_sums = p.reduce_sums(state.epoch_sums)
        model_sd, optim_sd = p.full_state_dicts(model, optimizer)
        failed = None
        if p.is_main and metrics_failed:
            kept = (f"the checkpoint {self.ckpt_path} is kept" if self.ckpt_path.exists()
                    else "no checkpoint exists yet")
            failed = (f"{metrics_failed}; {kept}. Free space and run the same command again to resume from it "
                      "(the records after it are written again)")
        elif p.is_main:
            try:
                self._write(model_sd, optim_sd, state, epoch_sums, cfg)
            except CheckpointWriteError as exc:  # a full disk: the previous checkpoint is kept
                failed = str(exc)
        failed = D.broadcast_object(failed)  # every rank stops with rank 0's one line
        if failed:
            raise CheckpointWriteError(failed)

    def _write(self, model_sd: dict, optim_sd: dict, state: RunState, epoch_sums: dict, cfg: DictConfig) -> None:
        """Rank 0: the checkpoint file (atomic; :class:`CheckpointWriteError` if it cannot be written)."""
        atomic_save(
            {
                "format": FORMAT,
                "model": model_sd,
                "optimizer": optim_sd,
                **dataclasses.asdict(state),
                "epoch_sums": dict(epoch_sums),  # partial sums of the running epoch, over all ranks
                "rng": rng_state(),
                "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                "meta": {"world_size": self.parallel.world_size, "torch": str(torch.__version__)},
            },
            self.ckpt_path,
        )

    def _append_run_info(self, seed: int, resumed_from: int | None) -> None:
        path = self.path / "run_info.json"
        info = json.loads(path.read_text()) if path.exists() else {"starts": []}
        d = self.parallel.dist
        info["starts"].append({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed_from_iteration": resumed_from,
            "git_commit": git_commit(),
            "torch": str(torch.__version__),
            "python": platform.python_version(),
            "host": platform.node(),
            "world_size": d.world_size,
            "nodes": sorted(set(d.hosts)) if d.hosts else [platform.node()],  # the hosts of all ranks
            "launcher": d.launcher,
            "device": str(d.device),
            "seed": seed,
        })
        path.write_text(json.dumps(info, indent=2) + "\n")

    def finish(self, last_val: dict[str, float], wall: float, already_complete: bool) -> dict[str, Any]:
        """The run's summary: written by rank 0 at the end; a run that was complete keeps the one it has."""
        if already_complete and self.summary_path.exists():  # nothing ran: the summary written at the end stands
            return json.loads(self.summary_path.read_text())
        summary = summarize(self.path, last_val, wall)
        if self.parallel.is_main:
            self.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def finish_diverged(self, last_val: dict[str, float], wall: float, iteration: int | None,
                        lr: float | None) -> dict[str, Any]:
        """The summary of a run stopped by a non-finite loss: ``diverged`` and where; the val figures are the
        last finite evaluation's (None before the first epoch's end)."""
        summary = {**summarize(self.path, last_val, wall), "diverged": True, "diverged_at_iteration": iteration,
                   "lr": lr}
        if self.parallel.is_main:
            self.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return "unknown (not a git checkout)"


def summarize(run_dir: Path, last_val: dict[str, float], wall: float) -> dict[str, Any]:
    """Final val error, the median of the last 5 epochs (the paper's metric), wall time, images/s."""
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    epochs = [r for r in records if "val/err" in r]
    last5 = sorted(r["val/err"] for r in epochs[-5:])
    ips = [r["images_per_sec"] for r in epochs]
    return {
        "val_top1_err": last_val.get("top1_err"),
        "val_top5_err": last_val.get("top5_err"),
        "median_last5_val_err": last5[len(last5) // 2] if last5 else None,
        "train_err": epochs[-1]["train/err"] if epochs else None,
        "epochs": len(epochs),
        "wall_time_s": round(wall, 2),
        "images_per_sec": round(sum(ips) / len(ips), 1) if ips else None,
        "run_dir": str(run_dir),
        "diverged": False,
    }


def print_summary(s: dict[str, Any]) -> None:
    err = s["val_top1_err"]
    print(
        f"done: val top-1 error {err * 100:.2f}% (median of last 5 epochs "
        f"{s['median_last5_val_err'] * 100:.2f}%), wall time {s['wall_time_s']:.1f} s, "
        f"{s['images_per_sec']:.0f} images/s\n"
        f"run dir: {s['run_dir']}\ncurves: tensorboard --logdir {s['run_dir']}",
        flush=True,
    )
