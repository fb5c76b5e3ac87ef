"""``auto`` precision, channels_last and deterministic (issue 23, part 1): fast on a GPU, exact on a CPU."""

from __future__ import annotations

import pytest
import torch
import yaml

from lbsgd_cli import train as train_module
from lbsgd_cli.device_defaults import (DeviceCaps, bf16_cpu_slowdown, cpu_native_bf16, resolve_auto,
                                      set_backend_flags)
from tests.conftest import SHORT, lbsgd

H200 = DeviceCaps("cuda", bf16=True, name="NVIDIA H200")
OLD_GPU = DeviceCaps("cuda", bf16=False, name="Tesla V100")  # no bf16
CPU = DeviceCaps("cpu")


def test_auto_on_a_bf16_gpu_is_the_fast_mode():
    r = resolve_auto("auto", "auto", "auto", H200)
    assert (r.precision, r.channels_last, r.deterministic) == ("bf16", True, False)
    assert r.chosen == ("precision", "model.channels_last", "deterministic")
    assert r.note.startswith("auto: precision=bf16, model.channels_last=true, deterministic=false (a CUDA device "
                             "with bf16 (NVIDIA H200)")


@pytest.mark.parametrize("caps", [CPU, OLD_GPU, DeviceCaps("mps")])
def test_auto_elsewhere_is_the_bit_exact_mode(caps):
    r = resolve_auto("auto", "auto", "auto", caps)
    assert (r.precision, r.channels_last, r.deterministic) == ("fp32", False, True)
    assert "the bit-exact mode" in r.note and "\n" not in r.note


def test_explicit_values_are_kept_and_not_reported():
    r = resolve_auto("fp16", False, True, H200)
    assert (r.precision, r.channels_last, r.deterministic, r.chosen, r.note) == ("fp16", False, True, (), "")
    r = resolve_auto("fp32", "auto", True, H200)  # only the auto key is resolved and named
    assert (r.precision, r.channels_last, r.deterministic, r.chosen) == ("fp32", True, True, ("model.channels_last",))
    assert r.note.startswith("auto: model.channels_last=true (")


def test_backend_flags_follow_deterministic_on_the_cpu_without_touching_cuda_matmuls():
    before = torch.get_float32_matmul_precision()
    try:
        set_backend_flags(False, torch.device("cpu"))
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        set_backend_flags(True, torch.device("cpu"))
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.get_float32_matmul_precision() == before
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def test_cpu_run_records_the_resolved_values_and_says_what_auto_chose(tmp_path):
    run = tmp_path / "run"
    res = lbsgd("train", f"hydra.run.dir={run}", *SHORT, "schedule.epochs=1", "data.train_subset=256",
                "log.tensorboard=false")
    assert res.returncode == 0, res.stderr
    assert "auto: precision=fp32, model.channels_last=false, deterministic=true (device cpu: the bit-exact mode)" \
        in res.stdout
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["precision"], cfg["model"]["channels_last"], cfg["deterministic"]) == ("fp32", False, True)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert (ckpt["config"]["precision"], ckpt["config"]["model"]["channels_last"]) == ("fp32", False)
    # the same command on the same device resumes (here: finds the run complete); explicit equal values too
    again = lbsgd("train", f"hydra.run.dir={run}", *SHORT, "schedule.epochs=1", "data.train_subset=256",
                  "log.tensorboard=false", "precision=fp32", "deterministic=true")
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout

    # resumed where auto means bf16 (a GPU, faked): the arithmetic would change, so it is refused in one line
    real = train_module.DeviceCaps.of
    train_module.DeviceCaps.of = classmethod(lambda cls, device: H200)
    try:
        moved = lbsgd("train", f"hydra.run.dir={run}", *SHORT, "schedule.epochs=2", "data.train_subset=256",
                      "log.tensorboard=false")
    finally:
        train_module.DeviceCaps.of = real
    assert moved.returncode != 0
    line = moved.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "another config (deterministic: True -> False)" in line
    assert "set precision=fp32 model.channels_last=false deterministic=true to resume it" in line


@pytest.mark.parametrize("key", ["model.channels_last", "deterministic"])
def test_auto_keys_take_only_auto_true_false(tmp_path, key):
    res = lbsgd("train", f"hydra.run.dir={tmp_path / 'r'}", *SHORT, f"{key}=fast")
    assert res.returncode != 0 and f"{key}: must be auto, true or false, got 'fast'" in res.stderr


def test_compile_mode_needs_compile(tmp_path):
    res = lbsgd("train", f"hydra.run.dir={tmp_path / 'r'}", *SHORT, "compile_mode=reduce_overhead")
    assert res.returncode != 0 and "compile_mode: reduce_overhead is a torch.compile mode; it needs compile=true" \
        in res.stderr


@pytest.mark.parametrize("cpuinfo, native", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n", False),  # AVX-512 without BF16
    ("processor\t: 0\nflags\t\t: fpu avx2 fma\n", False),  # the AVX2-only EPYC where bf16 is ~10x slower
    ("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n", True),
    ("flags\t\t: fpu amx_bf16 amx_tile\n", True),
    ("Features\t: fp asimd bf16 i8mm\n", True),  # Arm
    ("", None),  # nothing to read: no claim either way
])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert cpu_native_bf16(cpuinfo) is native


@pytest.mark.parametrize("native", [True, False])
def test_auto_never_picks_bf16_on_a_cpu(native):
    assert resolve_auto("auto", "auto", "auto", DeviceCaps("cpu", bf16=native)).precision == "fp32"


def test_the_slowdown_is_measured_on_this_cpu():
    fp32_s, bf16_s = bf16_cpu_slowdown(repeats=1)
    assert 0 < fp32_s < 60 and 0 < bf16_s < 60


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns_in_the_header_with_the_measured_factor(tmp_path, monkeypatch,
                                                                                          native):
    import lbsgd_cli.train as train_module

    monkeypatch.setattr(train_module, "cpu_native_bf16", lambda: native)
    monkeypatch.setattr(train_module, "bf16_cpu_slowdown", lambda: (0.030, 0.400))
    res = lbsgd("train", f"hydra.run.dir={tmp_path / 'run'}", *SHORT, "schedule.epochs=1", "data.train_subset=128",
                "log.tensorboard=false", "precision=bf16")
    assert res.returncode == 0, res.stderr
    warning = [line for line in res.stdout.splitlines() if line.startswith("warning: precision=bf16")]
    if native:
        assert warning == []
    else:
        assert len(warning) == 1 and "400 ms against 30 ms in fp32" in warning[0] and "(13.3x)" in warning[0]
        assert "precision=fp32 is the way out" in warning[0]
