"""lbsgd_cli/restore.py: one way from a checkpoint to its network, for ``lbsgd eval`` and ``lbsgd quantize``
(bad files and other networks' weights: test_offload.py::test_foreign_and_broken_checkpoints_name_the_file)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lbsgd_cli.checkpoint import FORMAT
from lbsgd_cli.config import TrainConfig
from lbsgd_cli.errors import UserError
from lbsgd_cli.ghost_bn import GhostBatchNorm2d
from lbsgd_cli.models import build_model
from lbsgd_cli.quantize import quantize_weights
from lbsgd_cli.quantized_checkpoint import FORMAT as QUANTIZED_FORMAT
from lbsgd_cli.quantized_checkpoint import save_quantized
from lbsgd_cli.restore import check_classes, model_from_checkpoint


def _trained(tmp_path):
    cfg = OmegaConf.structured(TrainConfig)
    cfg.model.arch, cfg.model.depth, cfg.data.name, cfg.batch.n = "cifar_resnet", 8, "digits", 4
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 3, bn_group=None)
    model.train()
    with torch.no_grad():  # running statistics away from their initial values
        model(torch.randn(8, 3, 12, 12))
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.save({"format": FORMAT, "model": model.state_dict(), "config": config, "iteration": 5, "epoch": 1},
               tmp_path / "last.pt")
    return model.eval(), config


def test_a_training_checkpoint_rebuilds_its_network_with_ghost_bn_or_plain_bn(tmp_path):
    model, _ = _trained(tmp_path)
    x = torch.randn(3, 3, 12, 12)
    ghost, cfg = model_from_checkpoint(tmp_path / "last.pt")  # lbsgd eval: BN over n for eval.bn_recompute
    plain, _ = model_from_checkpoint(tmp_path / "last.pt", ghost_bn=False)  # lbsgd quantize
    assert any(isinstance(m, GhostBatchNorm2d) for m in ghost.modules())
    assert not any(isinstance(m, GhostBatchNorm2d) for m in plain.modules())
    assert torch.equal(ghost(x), model(x)) and torch.equal(plain(x), model(x)) and not ghost.training
    assert cfg.model.shortcut == "A" and cfg.batch.n == 4  # the schema's defaults under the stored config
    assert ghost.checkpoint_info["iteration"] == 5 and ghost.checkpoint_info["format"] == FORMAT


def test_a_quantized_checkpoint_reads_back_dequantized_and_quantize_refuses_it(tmp_path):
    model, config = _trained(tmp_path)
    qweights = quantize_weights(model, 4, True, True, "minmax")
    save_quantized(tmp_path / "q.pt", model, qweights, None, config=config, quant={"bits": 4}, num_classes=10,
                   in_channels=3, source={"path": "last.pt", "iteration": 5, "epoch": 1})
    loaded, _ = model_from_checkpoint(tmp_path / "q.pt")
    params = dict(loaded.named_parameters())
    assert all(torch.equal(params[key].detach(), qt.dequantize()) for key, qt in qweights.items())
    assert loaded.checkpoint_info["format"] == QUANTIZED_FORMAT and loaded.checkpoint_info["epoch"] == 1
    with pytest.raises(UserError, match=r"q\.pt is already quantized; give the fp32 checkpoint"):
        model_from_checkpoint(tmp_path / "q.pt", quantized=False)


def test_a_data_set_with_other_classes_is_a_one_line_error(tmp_path):
    _trained(tmp_path)
    model, cfg = model_from_checkpoint(tmp_path / "last.pt")
    check_classes(model, 10, cfg)
    with pytest.raises(UserError, match=r"^checkpoint: .*last\.pt predicts 10 classes, the data set \(digits \) has 3$"):
        check_classes(model, 3, cfg)
