"""The ``lbsgd`` command: ``lbsgd <command> [hydra overrides]``.

The commands are the table :data:`COMMANDS`. Each but ``plot`` is a Hydra app whose primary config is
``conf/<command>.yaml``, so ``-m/--multirun``, ``--cfg job``, ``--help`` and every override work as Hydra
users expect. Before Hydra starts, overrides are checked against the composed config so
that an unknown key or a bad value is one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import sweep
from .errors import CheckpointWriteError, Diverged, Interrupted, PeerFailure, Preempted, UserError, first_line
from .output_dir import FoldersBefore
from .preemption import catch_early, forget_early
from .sweep import Point

# Jobs of this call's sweep that diverged: a `-m` sweep goes on to the next job and exits 5 at its end.
_DIVERGED_JOBS: list[str] = []
# The folders on the way to this call's output that existed before Hydra ran (set by main).
_FOLDERS_BEFORE = FoldersBefore()


# Hydra flags that take a value: their value is not an override.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
_HELP_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}


def conf_dir() -> Path:
    """The config tree: ``conf/`` beside the package in a checkout, ``lbsgd_cli/conf`` in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise UserError(f"cannot find the config tree (conf/train.yaml) near {here}; reinstall lbsgd")


def _run_train(cfg, run_dir: Path) -> Any:
    from .train import train

    return train(cfg, run_dir)


def _run_quantize(cfg, run_dir: Path) -> Any:
    from .quantize_run import quantize_command

    return quantize_command(cfg, run_dir)


def _run_eval(cfg, run_dir: Path) -> Any:
    from .evaluate import run_eval

    return run_eval(cfg, run_dir)


def _run_plot(argv: list[str]) -> int:
    from .report.command import main as plot_main

    return plot_main(argv)


def _run_plan(cfg, run_dir: Path) -> Any:
    from .plan import plan_command

    return plan_command(cfg, run_dir)


@dataclass(frozen=True)
class Command:
    """One ``lbsgd`` command: a Hydra app (``task(cfg, run_dir)``, its config ``conf/<name>.yaml``, checked by
    :data:`lbsgd_cli.validation.VALIDATORS` before it runs) or, with ``main``, a plain one (``main(argv)``, the
    exit status) that reads files rather than a config. ``help`` is its line in ``lbsgd --help``."""

    help: str
    task: Callable[[Any, Path], Any] | None = None
    main: Callable[[list[str]], int] | None = None


# Every command of `lbsgd`, in the order `lbsgd --help` lists them: a new command is one line here.
COMMANDS: dict[str, Command] = {
    "train": Command("train a network with the large-minibatch recipe of Goyal et al. (2017)", task=_run_train),
    "quantize": Command("b-bit integer weights (and activations) of a trained network, measured against fp32",
                        task=_run_quantize),
    "eval": Command("top-1/top-5 error of a checkpoint (eval.bn_recompute=N, offload.mode=sequential|model)",
                    task=_run_eval),
    "plot": Command("the paper's tables and figures from run directories: lbsgd plot RUN_OR_SWEEP_DIR... --out DIR",
                    main=_run_plot),
    "plan": Command("time per iteration, allreduce, loader and time to train from 8 to plan.gpus GPUs (nothing runs)",
                    task=_run_plan),
}


def usage() -> str:
    """``lbsgd --help``: the commands of :data:`COMMANDS`, then examples."""
    width = max(map(len, COMMANDS)) + 2
    lines = [f"  {name:<{width}} {command.help}" for name, command in COMMANDS.items()]
    return "usage: lbsgd <command> [overrides...] [hydra flags]\n\ncommands:\n" + "\n".join(lines) + "\n" + EXAMPLES


EXAMPLES = """
examples:
  lbsgd train                                    # embedded digits, CPU, about 20 s on 2 cores
  lbsgd train batch.k=8 schedule.warmup=constant
  lbsgd train -m batch.k=1,2,4,8                 # a sweep: refused whole, naming the point, unless every point can run
  lbsgd train experiment=imagenet_8k_gradual data.root=/datasets/imagenet
  lbsgd train --cfg job                          # print the composed config
  lbsgd train --help                             # config groups and keys
  lbsgd eval checkpoint=runs/train/default/checkpoints/last.pt offload.mode=model
  lbsgd plan plan.gpus=256 plan.gpu=P100 plan.inter_gbit=50   # Goyal et al.'s cluster, before asking for it
"""


def _run_name(override_dirname: str) -> str:
    """A folder name from Hydra's ``job.override_dirname``: deterministic, so a rerun resumes."""
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname)
    return name or "default"


def _register() -> None:
    from omegaconf import OmegaConf

    from .config import no_effect_keys, register_configs

    register_configs()
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", _run_name)
    if not OmegaConf.has_resolver("lbsgd_no_effect"):  # conf/hydra/lbsgd.yaml: run names leave these keys out
        OmegaConf.register_new_resolver("lbsgd_no_effect", no_effect_keys)


def _override_args(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in _FLAGS_WITH_VALUE:
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


# Keys whose value is a file system path. lbsgd's own run directories are named by their overrides
# (``batch.k=2,seed=0``), so such paths hold ``=`` and ``,``, which Hydra's override grammar reads as
# syntax; a path value holding ``=`` (never valid unquoted) is quoted for the user.
_PATH_KEY = re.compile(
    r"^(\+{0,2})(checkpoint|data_root|data\.root|data\.cache_dir|hydra\.run\.dir|hydra\.sweep\.dir|"
    r"plan\.run_dir|plan\.noise_run|plan\.gpu_bench)=(.*)$", re.S
)


def quote_paths(args: list[str]) -> list[str]:
    """``checkpoint=runs/x/k=2,seed=0/last.pt`` -> ``checkpoint='runs/x/k=2,seed=0/last.pt'`` (already quoted: kept)."""
    out = []
    for a in args:
        m = _PATH_KEY.match(a)
        value = m.group(3) if m else ""
        if m and "=" in value and not (len(value) > 1 and value[0] == value[-1] and value[0] in "'\""):
            escaped = value.replace("\\", "\\\\").replace("'", "\\'")
            a = f"{m.group(1)}{m.group(2)}='{escaped}'"
        out.append(a)
    return out


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def is_multirun(args: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in args)


def preflight(command: str, args: list[str]) -> list[Point]:
    """Compose the config of the call (with each value of a sweep override), or of every point of a ``-m``
    sweep, validate each, and turn failures into one line (a sweep's names its point). Returns the points
    composed (none when Hydra only prints help)."""
    if any(a in _HELP_FLAGS or a.startswith("--info") for a in args):
        return []
    if "hydra/launcher=slurm" in args and not _has_module("hydra_plugins.hydra_submitit_launcher"):
        raise UserError("hydra/launcher=slurm needs hydra-submitit-launcher: pip install 'lbsgd[slurm]'")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = [o for o in _override_args(args) if not o.lstrip("+~").startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise UserError(f"bad override: {first_line(exc)}") from None
    for o in parsed:
        if o.get_key_element().lstrip("+~") == "optim.name" and command == "train":
            raise UserError("optim.name: choose the optimizer with its group, optim=sgd or optim=lars "
                            "(the group also sets its base_lr)")
    base = [o.input_line for o in parsed if not o.is_sweep_override()]
    printing_only = any(a in ("--cfg", "-c") for a in args)  # `--cfg job` shows a config, runs nothing
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            if "hydra/launcher=slurm" in args:
                _check_slurm_launcher(compose, command, args)
            if is_multirun(args):  # every job of the sweep, as Hydra's sweeper will make them
                try:
                    params = compose(config_name=command, overrides=base, return_hydra_config=True).hydra.sweeper
                except Exception as exc:  # Hydra/OmegaConf composition errors
                    raise UserError(_composition_message(exc)) from None
                jobs = sweep.points(overrides, dict(params.get("params") or {}))
            else:  # each value of a sweep override (Hydra refuses those without -m itself)
                jobs = [Point(base, [])] + [Point(base + [f"{o.get_key_element()}={v}"], []) for o in parsed
                                            if o.is_sweep_override() for v in o.sweep_string_iterator()]
            several = len(jobs) > 1 and is_multirun(args)
            for job in jobs:
                try:
                    try:
                        job.cfg = compose(config_name=command, overrides=job.overrides)
                    except Exception as exc:  # Hydra/OmegaConf composition errors
                        raise UserError(_composition_message(exc)) from None
                    if not printing_only:
                        from . import validation

                        validation.VALIDATORS[command](job.cfg)
                except UserError as exc:
                    raise job.refused(str(exc)) if several else exc from None
    finally:
        GlobalHydra.instance().clear()
    return jobs


def output_templates(command: str, args: list[str]) -> list[str]:
    """``hydra.run.dir`` and ``hydra.sweep.dir`` of this call as written (``runs/eval/${run_name:...}``), the
    job name filled in: where Hydra will make the output folder (:mod:`lbsgd_cli.output_dir`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    keys = ("hydra.run.dir=", "hydra.sweep.dir=", "hydra.job.name=")
    overrides = [o for o in _override_args(args) if o.lstrip("+").startswith(keys)]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            hydra_cfg = compose(config_name=command, overrides=overrides, return_hydra_config=True).hydra
            name = str(hydra_cfg.job.name)
            raw = OmegaConf.to_container(hydra_cfg, resolve=False)
    except Exception:  # Hydra reports a bad hydra.* override itself when it starts
        return []
    finally:
        GlobalHydra.instance().clear()
    return [str(raw[part]["dir"]).replace("${hydra.job.name}", name) for part in ("run", "sweep")]


def slurm_sweep_args(args: list[str]) -> list[str]:
    """``lbsgd train ... hydra/launcher=slurm`` adds ``dist.requeue=true`` unless the user set ``dist.requeue``: a sweep's job
    that is preempted writes its checkpoint, requeues itself, and submitit runs it again (it resumes). Without
    it the preempted job would end with no result and the sweep would wait for it. The key names no run."""
    if "hydra/launcher=slurm" in args and not any(a.lstrip("+").startswith("dist.requeue=") for a in args):
        i = args.index("hydra/launcher=slurm")  # among the overrides: argparse takes them as one run
        return [*args[:i], "dist.requeue=true", *args[i:]]
    return args


def _check_slurm_launcher(compose: Callable, command: str, args: list[str]) -> None:
    """The launcher keys sbatch would refuse with a traceback, as one line before anything is submitted."""
    overrides = [o for o in _override_args(args) if o.startswith(("hydra/launcher=", "hydra.launcher."))]
    try:
        launcher = compose(config_name=command, overrides=overrides, return_hydra_config=True).hydra.launcher
    except Exception as exc:  # Hydra/OmegaConf composition errors
        raise UserError(_composition_message(exc)) from None
    for key in ("nodes", "tasks_per_node", "cpus_per_task"):
        value = launcher.get(key)
        if value is not None and int(value) < 1:
            hint = " (gpus_per_node=0, a CPU partition: set hydra.launcher.tasks_per_node=N)" \
                if key == "tasks_per_node" else ""
            raise UserError(f"hydra.launcher.{key}={value}: SLURM needs at least 1{hint}")


def _composition_message(exc: Exception) -> str:
    text = str(exc).strip()
    cause = exc.__cause__
    m = re.search(r"Could not override '([^']+)'", text)
    if m and cause is not None and re.search(r"not in struct|Key '[^']+' not in", str(cause)):
        return f"unknown config key '{m.group(1)}' (see `lbsgd train --cfg job` for the keys)"
    m = re.search(r"Could not find '([^']+)'", text) or re.search(r"In '[^']+': Could not find '([^']+)'", text)
    if m:
        avail = re.findall(r"^\s+\*?\s*(\S+)$", text, flags=re.M)
        hint = f" (available: {', '.join(avail)})" if avail else ""
        return f"unknown config choice '{m.group(1)}'{hint}"
    detail = first_line(cause) if cause is not None and str(cause).strip() else ""
    key = re.search(r"full_key: (\S+)", str(cause) if cause is not None else "")
    first = first_line(exc)
    if detail:
        return f"{key.group(1) + ': ' if key else ''}{detail}"
    return first


def _task(command: str) -> Callable:
    def task(cfg) -> Any:
        from hydra.core.hydra_config import HydraConfig

        from . import distributed as D

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        created = _FOLDERS_BEFORE.created(run_dir)  # asked before the command writes into it
        try:
            result = COMMANDS[command].task(cfg, run_dir)
        except UserError as exc:
            print(f"lbsgd: error: {exc}", file=sys.stderr, flush=True)
            _FOLDERS_BEFORE.remove_new(run_dir, created)  # a refusal leaves no empty run directory behind
            _leave(D, UserError.exit_code)
        except Preempted as exc:
            print(f"lbsgd: preempted: {exc}", file=sys.stderr, flush=True)
            _leave(D, Preempted.exit_code)
        except CheckpointWriteError as exc:
            print(f"lbsgd: error: {exc}", file=sys.stderr, flush=True)
            _leave(D, CheckpointWriteError.exit_code)
        except KeyboardInterrupt:  # a second Ctrl-C (or one before training started): stop at once
            print("lbsgd: interrupted: stopped at once (no checkpoint written now; the last one on disk is "
                  "kept)", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(Interrupted.exit_code)  # loader workers and threads are not waited for
        except Diverged as exc:
            print(f"lbsgd: diverged: {exc}", file=sys.stderr, flush=True)
            from hydra.types import RunMode

            if HydraConfig.get().mode != RunMode.MULTIRUN:
                _leave(D, Diverged.exit_code)
            _DIVERGED_JOBS.append(str(run_dir))  # the sweep's next job still runs
            return None
        except PeerFailure as exc:
            print(f"lbsgd: error: {exc}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(PeerFailure.exit_code)  # a broken process group may abort() in its destructor at exit
        if D.initialized():
            from hydra.types import RunMode

            if HydraConfig.get().mode != RunMode.MULTIRUN:  # a sweep's next job still needs the group
                D.barrier()
                _leave(D, 0)
        return result

    return task


def _leave(D, code: int) -> None:
    """Exit a multi-process run with ``code`` once everything is written, without the interpreter's
    teardown: under gloo (FSDP2 especially) the destructors of torch's communication threads can
    ``abort()`` at exit ("terminate called without an active exception") after a run that finished
    well. A single process exits normally."""
    if not D.initialized():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # torch's C++ layer (c10d) logs each retry of a rendezvous, with stack frames, before lbsgd says what
    # failed in one line; TORCH_CPP_LOG_LEVEL=INFO|WARNING|ERROR shows them again (read when torch loads)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    # a preemption while starting (imports, data, rendezvous) becomes a checkpoint, not a death; not in a
    # process that only submits a sweep's jobs to another launcher (it trains nothing: a signal ends it)
    if argv[:1] == ["train"] and not any(a.startswith("hydra/launcher=") and a != "hydra/launcher=basic"
                                         for a in argv):
        catch_early()
    try:
        return _dispatch(argv)
    finally:
        forget_early()  # a process that goes on (a test's) gets its own signal handlers back


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0 if argv else 2
    command, rest = argv[0], quote_paths(argv[1:])
    if command not in COMMANDS:
        print(f"lbsgd: error: unknown command {command!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if COMMANDS[command].main is not None:  # not a Hydra app: it reads run directories, not a config
        try:
            return COMMANDS[command].main(argv[1:])
        except UserError as exc:
            print(f"lbsgd: error: {exc}", file=sys.stderr)
            return UserError.exit_code
    if command == "train":
        rest = slurm_sweep_args(rest)
    try:
        _register()
        jobs = preflight(command, rest)
        if command == "train" and is_multirun(rest) and len(jobs) > 1 and "--cfg" not in rest and "-c" not in rest:
            sweep.check_against_data(jobs)  # the data set's size and channels: no point starts unless all fit
    except UserError as exc:
        print(f"lbsgd: error: {exc}", file=sys.stderr)
        return UserError.exit_code

    import hydra

    global _FOLDERS_BEFORE
    _FOLDERS_BEFORE = FoldersBefore.note(output_templates(command, rest))
    app = hydra.main(config_path=str(conf_dir()), config_name=command, version_base="1.3")(_task(command))
    sys.argv = [f"lbsgd {command}", *rest]
    _DIVERGED_JOBS.clear()
    app()
    if _DIVERGED_JOBS:  # a sweep in which some jobs diverged: each said so in its line; the sweep fails
        print(f"lbsgd: diverged: {len(_DIVERGED_JOBS)} job(s) of this sweep diverged", file=sys.stderr, flush=True)
        return Diverged.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
