"""§5.1's crops of one file: torchvision's draws, reduced-size JPEG decoding only where the output keeps its
size, data.decode=gpu's device decode and crops against the workers' (the CPU as the device)."""

from __future__ import annotations

import math

import pytest
import torch

from lbsgd_cli.data import TrainLoader, load_data, val_batches
from lbsgd_cli.data.sampling import mix_seed
from lbsgd_cli.data.transforms import RandomResizedCropDecode, RawCrop, ResizeCenterCropDecode, collate_raw
from lbsgd_cli.errors import UserError

from ..conftest import make_image_tree
from .conftest import dcfg, smooth_image


@pytest.mark.parametrize("height,width", [(375, 500), (500, 353), (80, 80), (40, 400), (400, 40), (224, 224)])
def test_crop_boxes_and_flips_are_torchvisions_draw_for_draw(height, width):
    from torchvision.transforms import v2

    ours, theirs = RandomResizedCropDecode(224), v2.RandomResizedCrop(224, antialias=True)
    probe = torch.zeros(3, height, width, dtype=torch.uint8)
    for seed in range(300):
        torch.manual_seed(mix_seed(7, seed))
        p = theirs.make_params([probe])
        flip_then = torch.rand(1).item() < 0.5  # v2.RandomHorizontalFlip's draw comes after the crop's
        g = torch.Generator().manual_seed(mix_seed(7, seed))
        assert ours.box(height, width, g) == (p["top"], p["left"], p["height"], p["width"])
        assert (torch.rand(1, generator=g).item() < 0.5) == flip_then


def test_reduced_jpeg_decoding_only_where_the_crop_stays_at_least_the_output_size(tmp_path):
    from PIL import Image

    path = tmp_path / "big.jpg"
    Image.fromarray(smooth_image(900, 1200).numpy()).save(path, quality=92)
    used = {1: 0, 2: 0, 4: 0, 8: 0}
    for size in (224, 64):
        crop = RandomResizedCropDecode(size)
        for seed in range(60):
            g = torch.Generator().manual_seed(seed)
            with Image.open(path) as im:
                top, left, h, w = box = crop.box(900, 1200, g)
                s = crop.draft_scale(im, box)
                used[s] += 1
                assert min(w, h) / s >= size  # the box decoded at 1/s is still at least the output size
                assert s == 8 or min(w, h) / (2 * s) < size  # and it is the largest such scale
                x = crop(im, torch.Generator().manual_seed(seed))
                decoded = im.size
            assert decoded == ((1200 + s - 1) // s, (900 + s - 1) // s)  # PIL's draft decoded at 1/s
            with Image.open(path) as im:
                full = RandomResizedCropDecode(size, draft=False)(im, torch.Generator().manual_seed(seed))
            assert x.shape == full.shape == (3, size, size) and x.dtype == torch.uint8
            # the same region of the photo: reduced decoding differs by resampling error only
            assert (x.float() - full.float()).abs().mean() < 4, seed
    assert all(used.values()), used  # every scale occurs
    # a PNG is never reduced
    png = tmp_path / "big.png"
    Image.fromarray(smooth_image(1200, 1600).numpy()).save(png)
    with Image.open(png) as im:
        assert crop.draft_scale(im, (0, 0, 1200, 1600)) == 1


def test_val_decoding_is_reduced_only_while_the_shorter_side_stays_at_least_val_resize(tmp_path):
    from PIL import Image

    path = tmp_path / "big.jpg"
    Image.fromarray(smooth_image(600, 900).numpy()).save(path, quality=92)
    for resize, scale in ((256, 2), (150, 4), (300, 2), (301, 1)):
        with Image.open(path) as im:
            x = ResizeCenterCropDecode(resize, 128)(im)
            assert im.size[1] == 600 // scale
        with Image.open(path) as im:
            full = ResizeCenterCropDecode(resize, 128, draft=False)(im)
        assert x.shape == (3, 128, 128) and (x.float() - full.float()).abs().mean() < 3


def test_decode_on_device_crops_by_shape_groups_as_image_by_image():
    """One roi_align per group of same-shaped images (at most CROP_GROUP): each crop equals its own call."""
    from torchvision.ops import roi_align

    from lbsgd_cli.data.transforms import decode_on_device

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 40, 50), (3, 50, 40), (3, 40, 50), (3, 40, 50), (3, 30, 30)] * 8  # 24 of one shape: 2 groups
    images = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in shapes]
    boxes = torch.tensor([[2.0, 3.0, 2.0 + 20 + i % 9, 3.0 + 25 - i % 7] for i in range(len(images))])
    flips = torch.tensor([i % 3 == 0 for i in range(len(images))])
    out = decode_on_device((images, boxes, flips), 16, torch.device("cpu"))
    for i, (img, b) in enumerate(zip(images, boxes.tolist())):
        ratio = max(1, math.ceil(max(b[2] - b[0], b[3] - b[1]) / 16))
        one = roi_align(img[None].float(), torch.tensor([[0.0, *b]]), (16, 16), 1.0, ratio, aligned=True)[0]
        assert torch.equal(out[i], one.flip(2) if flips[i] else one)


def test_decode_on_the_device_matches_the_worker_decode_with_the_cpu_as_device(tmp_path):
    """data.decode=gpu tested with the CPU as the device: the same boxes and flips, other resampling."""
    root = make_image_tree(tmp_path / "d", size=80, per_class=4, val_per_class=2)
    common = dict(root=str(root), crop_size=64, val_resize=72, num_workers=0)
    cpu, gpu = load_data(dcfg(**common)), load_data(dcfg(decode="gpu", **common))
    a = list(TrainLoader(cpu, 2, 2, 0, 1, seed=1).epoch(0))
    b = list(TrainLoader(gpu, 2, 2, 0, 1, seed=1).epoch(0))
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xb.shape == xa.shape and xb.dtype == torch.float32 and torch.equal(ya, yb)
        assert (xa - xb).abs().mean() < 0.1  # ~5/255 after normalisation: resampling differences only
    va = torch.cat([x for x, _ in val_batches(cpu, 0, 1, 4, torch.device("cpu"))])
    vb = torch.cat([x for x, _ in val_batches(gpu, 0, 1, 4, torch.device("cpu"))])
    assert va.shape == vb.shape and (va - vb).abs().mean() < 0.1
    # on a smooth photo-like JPEG the two decodes agree closely (a box off by 8 px differs by ~6 of 255)
    from PIL import Image

    from lbsgd_cli.data.transforms import decode_on_device

    path = tmp_path / "smooth.jpg"
    Image.fromarray(smooth_image(375, 500).numpy()).save(path, quality=92)
    full = RandomResizedCropDecode(224, draft=False)
    for seed in range(10):
        with Image.open(path) as im:
            ref = full(im, torch.Generator().manual_seed(seed)).float()
        with Image.open(path) as im:
            raw = RawCrop(train=full)(im, torch.Generator().manual_seed(seed))
        got = decode_on_device(collate_raw([(raw, 0)])[0], 224, torch.device("cpu"))[0]
        assert (ref - got).abs().mean() < 1.0
    crop = RandomResizedCropDecode(64)
    for seed in range(50):
        box, flip = RawCrop(train=crop).box(80, 60, torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)
        top, left, h, w = crop.box(60, 80, g)
        assert box == (left, top, left + w, top + h) and flip == (torch.rand(1, generator=g).item() < 0.5)


def test_data_decode_is_read_as_its_choice_and_an_unknown_value_is_one_line():
    """data.decode as choices.Decode, from the structured config (an Enum) or a plain config (a string); a value
    that is no choice (a hand-edited config.yaml) is one line, never silently the workers' decode."""
    from types import SimpleNamespace

    from lbsgd_cli.choices import Decode
    from lbsgd_cli.data.transforms import decode_mode, decodes_on_device

    assert decode_mode(dcfg(decode="gpu")) is Decode.gpu and decodes_on_device(SimpleNamespace(decode="gpu"))
    assert decode_mode(dcfg()) is Decode.cpu and not decodes_on_device(SimpleNamespace())
    with pytest.raises(UserError, match=r"^data.decode: must be cpu or gpu, got 'GPU'$"):
        decodes_on_device(SimpleNamespace(decode="GPU"))
