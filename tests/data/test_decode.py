"""Decoding: libjpeg-turbo gives PIL's pixels on every JPEG it takes; ImageNet's odd files (CMYK, grayscale,
progressive, PNG data in a .JPEG, recoverable corruption) decode correctly on every path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lbsgd_cli.data import decode
from lbsgd_cli.data.transforms import RandomResizedCropDecode, RawCrop, ResizeCenterCropDecode

# only the tests of libjpeg-turbo's own decoding need simplejpeg; the fallbacks are tested without it too
needs_turbo = pytest.mark.skipif(decode.simplejpeg is None, reason="simplejpeg is not installed")


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: JPEG-compressible and far from flat, so decoders' differences show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([xx / width * 200, yy / height * 200, 100 + 80 * np.sin(xx / 9) * np.cos(yy / 13)], -1)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def _odd_files(tmp_path) -> dict[str, object]:
    """One file of each kind ImageNet holds, all named .JPEG."""
    a = _photo(300, 420)
    files = {}
    for name, save in {
        "baseline": lambda p: Image.fromarray(a).save(p, "JPEG", quality=90),
        "baseline_444": lambda p: Image.fromarray(a).save(p, "JPEG", quality=95, subsampling=0),
        "progressive": lambda p: Image.fromarray(a).save(p, "JPEG", quality=90, progressive=True),
        "grayscale": lambda p: Image.fromarray(a[..., 1]).save(p, "JPEG", quality=90),
        "cmyk": lambda p: Image.fromarray(a).convert("CMYK").save(p, "JPEG", quality=90),
        "png": lambda p: Image.fromarray(a).save(p, "PNG"),
    }.items():
        path = tmp_path / f"{name}.JPEG"
        save(path)
        files[name] = path
    # extraneous bytes before a marker: libjpeg warns (PIL decodes on), simplejpeg's strict mode raises
    data = files["baseline"].read_bytes()
    sos = data.index(b"\xff\xda")
    (tmp_path / "extraneous.JPEG").write_bytes(data[:sos] + b"\x00\x00" + data[sos:])
    files["extraneous"] = tmp_path / "extraneous.JPEG"
    return files


TURBO = {"baseline", "baseline_444", "progressive", "grayscale", "extraneous"}


@needs_turbo
def test_turbo_takes_rgb_and_gray_jpegs_only_and_gives_pils_pixels(tmp_path):
    for name, path in _odd_files(tmp_path).items():
        with Image.open(path) as im:
            assert decode.turbo_decodable(im) == (name in TURBO), name
            got = decode.decode_rgb(im)
            pil = np.asarray(im.convert("RGB"))
        if name in ("cmyk", "png", "extraneous"):
            assert got is None, name  # PIL decodes these
        else:
            assert got is not None and got.shape == (3, 300, 420), name
            assert np.array_equal(got.permute(1, 2, 0).numpy(), pil), name
        with Image.open(path) as im:  # a crop box: the same region of the same pixels
            got = decode.decode_rgb(im, (17, 30, 217, 190))
        if got is not None:
            assert np.array_equal(got.permute(1, 2, 0).numpy(), pil[30:190, 17:217]), name


@needs_turbo
@pytest.mark.parametrize("draft", [True, False])
def test_every_file_decodes_to_the_same_samples_with_and_without_turbo(tmp_path, draft):
    """The training crops and the val crop equal PIL's path exactly on every kind of file, CMYK and PNG
    included (those fall back to PIL), so libjpeg-turbo changes no sample."""
    for name, path in _odd_files(tmp_path).items():
        for size in (96,):
            fast, slow = RandomResizedCropDecode(size, draft=draft), RandomResizedCropDecode(size, draft=draft,
                                                                                           turbo=False)
            for seed in range(8):
                with Image.open(path) as im:
                    a = fast(im, torch.Generator().manual_seed(seed))
                with Image.open(path) as im:
                    b = slow(im, torch.Generator().manual_seed(seed))
                assert a.dtype == torch.uint8 and a.shape == (3, size, size)
                assert torch.equal(a, b), (name, size, seed)
            with Image.open(path) as im:
                a = ResizeCenterCropDecode(size + size // 7, size, draft=draft)(im)
            with Image.open(path) as im:
                b = ResizeCenterCropDecode(size + size // 7, size, draft=draft, turbo=False)(im)
            assert torch.equal(a, b), name


def test_cmyk_decodes_to_the_pictures_rgb_not_to_raw_inks(tmp_path):
    files, val = _odd_files(tmp_path), ResizeCenterCropDecode(110, 96)
    with Image.open(files["cmyk"]) as im:
        cmyk = val(im).float()
    with Image.open(files["baseline"]) as im:
        rgb = val(im).float()
    assert (cmyk - rgb).abs().mean() < 6  # the same picture (two lossy encodings), not its inverted inks


def test_gpu_decode_gets_bytes_of_baseline_jpegs_and_pixels_of_every_other_file(tmp_path):
    """data.decode=gpu: nvJPEG is given baseline RGB/gray JPEGs only; CMYK, progressive and PNG-in-.JPEG are
    decoded in the worker (PIL's pixels) and sent as images."""
    raw = RawCrop(train=RandomResizedCropDecode(64))
    for name, path in _odd_files(tmp_path).items():
        with Image.open(path) as im:
            data, box, _ = raw(im, torch.Generator().manual_seed(1))
            pil = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        if name in ("cmyk", "progressive", "png"):
            assert data.shape == (3, 300, 420) and torch.equal(data, pil), name
        else:
            assert data.dim() == 1 and bytes(data.numpy()) == path.read_bytes(), name
        assert box.shape == (4,)


def test_gpu_decode_leaves_a_jpeg_without_its_end_marker_to_the_worker(tmp_path):
    """A JPEG with bytes after its end (a camera's trailer) is decoded in the worker, to the right pixels;
    the device decoder gets only files that end with FF D9."""
    assert decode.ends_complete(b"\xff\xd8 ... \xff\xd9") and decode.ends_complete(b"\xff\xd8 ... \xff\xd9\x00\x00\n")
    assert not decode.ends_complete(b"\xff\xd8 ... cut") and not decode.ends_complete(b"")
    path = _odd_files(tmp_path)["baseline"]
    trailer = tmp_path / "trailer.jpg"
    trailer.write_bytes(path.read_bytes() + b"MAKERNOTE" * 10)
    with Image.open(trailer) as im:
        data, _, _ = RawCrop(train=RandomResizedCropDecode(64))(im, torch.Generator().manual_seed(1))
        pil = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert data.dim() == 3 and torch.equal(data, pil)


def test_without_simplejpeg_pil_decodes_and_one_line_says_so(tmp_path, monkeypatch, caplog):
    path = _odd_files(tmp_path)["baseline"]
    with Image.open(path) as im:
        want = RandomResizedCropDecode(64)(im, torch.Generator().manual_seed(3))
    monkeypatch.setattr(decode, "simplejpeg", None)
    monkeypatch.setattr(decode, "warned_missing", False)
    with Image.open(path) as im:
        assert decode.decode_rgb(im) is None
        got = RandomResizedCropDecode(64)(im, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    assert decode.turbo_available() is False
    lines = [r.getMessage() for r in caplog.records if "simplejpeg" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]


def test_a_bad_file_is_left_to_pil_which_names_the_error(tmp_path):
    path = tmp_path / "bad.JPEG"
    path.write_bytes(_odd_files(tmp_path)["baseline"].read_bytes()[:2000])  # truncated
    with Image.open(path) as im:
        assert decode.decode_rgb(im) is None
        with pytest.raises(OSError):
            RandomResizedCropDecode(64)(im, torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_without_simplejpeg_only_the_tests_that_need_it_skip():
    """This file run where simplejpeg cannot be imported: the turbo tests skip, the fallbacks run and pass."""
    import subprocess
    import sys
    from pathlib import Path

    me = Path(__file__)
    code = ("import sys; sys.modules['simplejpeg'] = None; import pytest; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-o', 'addopts=', {str(me)!r}, "
            "'-k', 'not only_the_tests_that_need_it_skip']))")  # not this test again
    proc = subprocess.run([sys.executable, "-c", code], cwd=me.parents[2], capture_output=True, text=True,
                          timeout=600)
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "3 skipped" in summary and "5 passed" in summary, summary
