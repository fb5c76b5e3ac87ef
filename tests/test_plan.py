"""``lbsgd plan`` (issue 35): each allreduce algorithm's cost on cases computed by hand, the overlap, the loader,
the bottleneck, the noise-scale edge, published runs within the stated tolerance, the command and
``scripts/experiments/check_plan_local.py``. In-process and fast: nothing trains."""

from __future__ import annotations

import csv
import json
import math

import pytest

from lbsgd_cli import plan as P

from .conftest import ROOT, lbsgd


# --------------------------------------------------------------------------- costs by hand


def test_ring_cost_by_hand():
    # 2(p-1) alpha + 2(p-1)/p b/beta: 6 * 10 us + 1.5 * 1 MB / 1 GB/s
    assert P.ring_time(1e6, 4, 1e9, 1e-5) == pytest.approx(6e-5 + 1.5e-3)
    assert P.ring_time(1e6, 1, 1e9, 1e-5) == 0.0
    assert P.ring_time(1e6, 2, 1e9, 0.0) == pytest.approx(1e-3)  # each rank sends and receives half twice


def test_halving_doubling_cost_by_hand():
    assert P.halving_doubling_steps(4) == 4 and P.halving_doubling_steps(32) == 10
    assert P.halving_doubling_steps(6) == 8  # binary blocks: 2 ceil(log2 6) + 2
    assert P.halving_doubling_time(1e6, 4, 1e9, 1e-5) == pytest.approx(4e-5 + 1.5e-3)
    assert P.halving_doubling_time(1e6, 6, 1e9, 1e-5) == pytest.approx(8e-5 + 2 * 5 / 6 * 1e-3)
    # same bytes as the ring, fewer steps: faster when latency-bound (Goyal et al. §4.1: 3x on 32 servers)
    assert P.halving_doubling_time(1e4, 32, 1e9, 1e-5) < P.ring_time(1e4, 32, 1e9, 1e-5) / 3


def test_hierarchical_cost_by_hand():
    # reduce in the server: 3 alpha_i + b/beta_i; halving/doubling over 2 servers: 2 alpha + b/beta; broadcast
    chain = 3 * 1e-6 + 1e6 / 1e10
    assert P.chain_time(1e6, 4, 1e10, 1e-6) == pytest.approx(chain)
    expected = 2 * chain + 2 * 1e-5 + 1e6 / 1e9
    assert P.hierarchical_time(1e6, 4, 2, 1e10, 1e-6, 1e9, 1e-5) == pytest.approx(expected)
    assert P.allreduce_time(1e6, 8, 4, "hierarchical", 1e10, 1e-6, 1e9, 1e-5) == pytest.approx(expected)


def test_flat_algorithms_use_the_intra_link_within_one_node_and_the_network_across_nodes():
    within = P.allreduce_time(1e6, 4, 8, "ring", 1e10, 1e-6, 1e9, 1e-5)
    assert within == pytest.approx(P.ring_time(1e6, 4, 1e10, 1e-6))
    across = P.allreduce_time(1e6, 16, 8, "ring", 1e10, 1e-6, 1e9, 1e-5)
    assert across == pytest.approx(P.ring_time(1e6, 16, 1e9, 1e-5))
    assert P.allreduce_time(1e6, 1, 8, "ring", 1e10, 1e-6, 1e9, 1e-5) == 0.0
    with pytest.raises(ValueError):
        P.allreduce_time(1e6, 4, 1, "tree", 1e9, 0, 1e9, 0)


def test_hook_precision_halves_the_bytes():
    assert P.hook_bytes_per_element("none") == 4 and P.hook_bytes_per_element("bf16") == 2
    fp32 = P.predict_step(0.1, 4e6, 2, bandwidth_gbit=1, latency_ms=0, overlap=False, bytes_are_sent=False)
    fp16 = P.predict_step(0.1, 4e6, 2, bandwidth_gbit=1, latency_ms=0, overlap=False, bytes_are_sent=False,
                          comm_hook="fp16")
    assert fp16.allreduce_s == pytest.approx(fp32.allreduce_s / 2)


# --------------------------------------------------------------------------- overlap, loader, bottleneck


def test_overlap_exposes_only_what_ends_after_backward():
    # two equal buckets ready at 0.5 and 1.0 s of a 1 s backward
    assert P.exposed_allreduce([1, 1], [0.3, 0.3], 1.0) == pytest.approx(0.3)  # 0.5+0.3=0.8; 1.0+0.3=1.3
    assert P.exposed_allreduce([1, 1], [0.6, 0.6], 1.0) == pytest.approx(0.7)  # 1.1; max(1.0, 1.1)+0.6=1.7
    assert P.exposed_allreduce([1, 1], [0.6, 0.6], 1.0, overlap=False) == pytest.approx(1.2)
    assert P.exposed_allreduce([], [], 1.0) == 0.0
    assert P.buckets(60, 25, 1) == [1, 25, 25, 9] and P.buckets(60, 0) == [60]


def test_loader_wait_by_hand():
    # 32 images x 8 GPUs x 10 ms on 16 cores = 0.16 s of decoding for a 0.1 s step: 0.06 s of waiting
    assert P.loader_wait(32, 8, 0.01, 16, 0.1) == pytest.approx(0.06)
    assert P.loader_wait(32, 8, 0.01, 16, 0.2) == 0.0
    assert P.loader_wait(32, 8, 0.0, 0, 0.1) == 0.0  # not modelled


@pytest.mark.parametrize("exposed,wait,expected", [(0.05, 0.0, "compute"), (0.2, 0.0, "allreduce"),
                                                    (0.2, 0.3, "loader"), (0.0, 0.09, "compute")])
def test_bottleneck(exposed, wait, expected):
    assert P.bottleneck(P.StepCost(1.0, 0.5, exposed, wait)) == expected


def test_rows_efficiency_and_time_to_train():
    cluster = P.Cluster(images_per_s=100.0, grad_bytes=100e6, n=32, gpus_per_node=8, inter_gbit=10.0,
                        algorithm="ring", bucket_mb=0.0, overlap=False, epochs=1, dataset_size=32 * 64)
    rows = P.plan_rows(cluster, P.gpu_counts(64))
    assert [r["gpus"] for r in rows] == [8, 16, 32, 64] and P.gpu_counts(100)[-2:] == [64, 100]
    assert rows[0]["efficiency"] == 1.0 and rows[-1]["efficiency"] < rows[1]["efficiency"] < 1.0
    r = rows[-1]  # 64 GPUs over 8 nodes: one iteration per epoch
    assert r["time_to_train_s"] == pytest.approx(r["iter_s"])
    assert r["allreduce_s"] == pytest.approx(P.ring_time(100e6, 64, 10 * P.GBIT, P.US * 10))
    assert r["iter_s"] == pytest.approx(0.32 + r["allreduce_s"]) and r["bottleneck"] == "allreduce"


# --------------------------------------------------------------------------- the noise-scale edge


def test_noise_scale_edge():
    assert P.noise_edge(501) == 512 and P.noise_edge(725) == 1024 and P.noise_edge(math.inf) is None
    assert P.past_edge(1024, 512) and not P.past_edge(512, 512) and not P.past_edge(10**6, None)
    rows = [{"kn": 256, "time_to_train_s": 10.0}, {"kn": 512, "time_to_train_s": 6.0},
            {"kn": 1024, "time_to_train_s": 4.0}]
    assert P.fastest_within(rows, 512)["kn"] == 512
    assert P.fastest_within(rows, None)["kn"] == 1024 and P.fastest_within(rows, 128) is None


# --------------------------------------------------------------------------- a published run


def test_goyal_256_p100s_train_in_about_an_hour_within_25_percent():
    """Goyal et al. 2017: ResNet-50, 256 P100s (32 Big Basin servers of 8, NVLink), 50 Gbit Ethernet, the
    three-phase allreduce with halving/doubling, per-layer buckets (161 tensors), kn = 8k, 90 epochs: 'in one
    hour'. The per-GPU figure is the paper's 8-GPU iteration (30 s epochs at 352 GPUs, 12% above kn=256)."""
    grad = 25_557_032 * 4
    p100 = 32 / (30.0 / (1_281_167 / 11_264) / 1.12)
    cluster = P.Cluster(images_per_s=p100, grad_bytes=grad, n=32, gpus_per_node=8, intra_gbit=160.0,
                        intra_latency_us=5.0, inter_gbit=50.0, inter_latency_us=10.0, algorithm="hierarchical",
                        bucket_mb=grad / 161 / 2**20, first_bucket_mb=0.0, overlap=True, epochs=90,
                        dataset_size=1_281_167)
    hours = P.plan_rows(cluster, [256])[0]["time_to_train_s"] / 3600
    assert abs(hours / 1.0 - 1) <= 0.25, hours
    checked = {a["name"]: P.check_anchor(a) for a in P.ANCHORS}  # the module's own table agrees
    assert all(abs(c["rel_error"]) <= 0.25 for c in checked.values()), checked
    assert P.GPU_TABLE["P100"]["images_per_s"] == pytest.approx(p100, rel=0.01)


def test_mlperf_v06_1040_v100s_iteration_and_time_to_train_within_25_percent():
    """MLPerf Training v0.6, NVIDIA closed division, 130 DGX-1 (1,040 V100s, 8 per node, NVLink 2.0; four EDR
    InfiniBand cards per node, 4 x 100 Gbit/s), MXNet + Horovod + NCCL 2.4.6 (a chain in each node, a binary tree
    between nodes: `hierarchical`), fp16 gradients in 16 groups overlapped with backward, 52 images per GPU
    (kn = 54,080). The V100's rate is the same round's single DGX-1 logs (11,216.8 images/s for 8 GPUs at 208 per
    GPU). Published: 1,147,380 images/s (47.1 ms per iteration) and 101.45 s to train (86 epochs). Nothing fitted:
    the model lands 20% and 24% short (see results/plan.md for why)."""
    grad = 25_557_032 * 2
    cluster = P.Cluster(images_per_s=11_216.8 / 8, grad_bytes=grad, n=52, gpus_per_node=8, intra_gbit=200.0,
                        intra_latency_us=5.0, inter_gbit=4 * 100.0, inter_latency_us=10.0, algorithm="hierarchical",
                        bucket_mb=grad / 16 / 2**20, first_bucket_mb=0.0, overlap=True, epochs=86,
                        dataset_size=1_281_167)
    row = P.plan_rows(cluster, [1040])[0]
    iter_reported, ttt_reported = 54_080 / 1_147_380, 101.45
    assert abs(row["iter_s"] / iter_reported - 1) <= 0.25, row["iter_s"]
    assert abs(row["time_to_train_s"] / ttt_reported - 1) <= 0.25, row["time_to_train_s"]
    assert row["iter_s"] < iter_reported  # the miss is one-sided: the model is optimistic here (results/plan.md)
    mlperf = [P.check_anchor(a) for a in P.ANCHORS if a["name"].startswith("MLPerf v0.6")]
    assert [c["predicted"] for c in mlperf] == pytest.approx([row["iter_s"], row["time_to_train_s"]])
    assert P.GPU_TABLE["V100"]["images_per_s"] == pytest.approx(11_216.8 / 8, rel=1e-3)


# --------------------------------------------------------------------------- the command


def _tiny(tmp_path, *extra):
    return lbsgd("plan", f"hydra.run.dir={tmp_path / 'out'}", "model=cifar_resnet", "model.depth=8",
                 "plan.num_classes=10", "plan.gpus=32", *extra)


def test_plan_writes_the_csv_and_the_figure(tmp_path):
    result = _tiny(tmp_path, "plan.algorithm=ring", "plan.comm_hook=fp16", "plan.loader_cores_per_node=4",
                   "plan.decode_ms_per_image=5")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "plan.csv")))
    assert [int(r["gpus"]) for r in rows] == [8, 16, 32] and (out / "plan.png").stat().st_size > 1000
    assert rows[0]["bottleneck"] == "loader"  # 32 x 8 images x 5 ms on 4 cores: 0.32 s for a 0.24 s step
    assert json.loads((out / "plan.json").read_text())["algorithm"] == "ring"
    again = _tiny(tmp_path)  # the same folder again: refused, nothing overwritten
    assert again.returncode == 2 and "already holds plan.csv" in again.stderr


def test_plan_with_a_noise_scale_run(tmp_path):
    run = tmp_path / "noise"
    run.mkdir()
    (run / "config.yaml").write_text("batch: {k: 4, n: 32}\noptim: {ref_batch: 256}\n"
                                     "schedule: {warmup: gradual, warmup_epochs: 1}\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": 2, "train/noise_scale": 500.0}) + "\n"
                                               for _ in range(5)))
    result = _tiny(tmp_path, f"plan.noise_run={run}")
    assert result.returncode == 0, result.stderr
    assert "predicted edge kn = 512" in result.stdout and "fastest within the edge: 16 GPUs" in result.stdout
    rows = list(csv.DictReader(open(tmp_path / "out" / "plan.csv")))
    assert [r["past_edge"] for r in rows] == ["False", "False", "True"]


@pytest.mark.parametrize("args,needle", [
    (["plan.gpu=Z9000"], "plan.gpu: unknown GPU 'Z9000'"),
    (["plan.gpus=0"], "plan.gpus: must be a positive integer"),
    (["plan.gpus=abc"], "plan.gpus"),
    (["plan.gpus=2.5"], "plan.gpus"),
    (["plan.run_dir=/no/such/run"], "plan.run_dir: /no/such/run does not exist"),
    (["plan.noise_run=/no/such/run"], "plan.noise_run: /no/such/run does not exist"),
    (["plan.algorithm=tree"], "plan.algorithm"),
    (["plan.inter_gbit=nan"], "plan.inter_gbit: must be a finite number"),
    (["plan.loader_cores_per_node=8"], "plan.decode_ms_per_image"),
])
def test_bad_plan_input_is_one_line_exit_2(args, needle, tmp_path):
    result = lbsgd("plan", f"hydra.run.dir={tmp_path / 'out'}", *args)
    err = result.stderr.strip()
    assert result.returncode == 2, (result.stdout, err)
    assert err.startswith("lbsgd: error:") and "\n" not in err and needle in err, err
    assert "Traceback" not in result.stdout + result.stderr


# --------------------------------------------------------------------------- the local cluster's check


def _check_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_plan_local", ROOT / "scripts" / "experiments" / "check_plan_local.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_check_plan_local_reads_the_measured_steps(tmp_path, capsys):
    path = tmp_path / "steps.csv"
    cols = "arch,depth,world,rate_gbit,delay_ms,comm_hook,step_s,step_s_w1,grad_bytes,allreduce_s,exposed_s"
    # ResNet-20's 0.27M parameters in fp32 (1.08 MB) on a 1 Gbit/s link with 1 ms: a 2-rank ring sends
    # 1.08 MB each way in 2 steps: 2 ms + 8.64 ms = 10.64 ms
    path.write_text(f"{cols}\ncifar_resnet,20,2,1,1,none,0.12,0.1,1080000,0.011,0.004\n"
                    "cifar_resnet,20,3,10,0,fp16,0.101,0.1,540000,,\n")
    assert _check_script().main(["--csv", str(path)]) == 0
    out = list(csv.DictReader(open(tmp_path / "plan_check.csv")))
    assert float(out[0]["pred_allreduce_s"]) == pytest.approx(0.01064, rel=1e-3)
    assert float(out[0]["pred_step_s"]) >= 0.1 and out[1]["allreduce_err"] == ""
    assert "median |error|" in capsys.readouterr().out


def test_check_plan_local_without_the_csv_is_one_line(tmp_path, capsys):
    assert _check_script().main(["--csv", str(tmp_path / "none.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not exist" in err


def test_docs_plan_command_lines_compose_and_validate():
    """docs/plan.md's ``lbsgd plan`` lines are tested as README.md's are (tests/test_readme.py)."""
    import re
    import shlex

    from lbsgd_cli import cli

    text = (ROOT / "docs" / "plan.md").read_text()
    lines = [shlex.split(line, comments=True) for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
             for line in block.splitlines() if line.startswith("lbsgd plan")]
    assert lines
    cli._register()
    for tokens in lines:
        cli.preflight("plan", cli.quote_paths(tokens[2:]))
