"""Tests of sample.py on tiny random-weight models saved as checkpoints in the quick start's format."""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import pvdm
import sample

HERE = os.path.dirname(os.path.abspath(__file__))
AE = dict(resolution=32, frames=16, patch=8, dim=16, depth=1, heads=2, proj_depth=1)  # latent planes 4x4, 16x4, 16x4
UNET = dict(base_channels=16, channel_mult=(1,), num_res_blocks=1, attention_levels=(), heads=2)


def save_pair(root, seed=0):
    """A tiny autoencoder and a diffusion checkpoint recording it, as the training scripts write them."""
    torch.manual_seed(seed)
    os.makedirs(root / "runs" / "autoencoder", exist_ok=True)
    os.makedirs(root / "runs" / "diffusion", exist_ok=True)
    ae_cfg = pvdm.AutoencoderConfig(**AE)
    ae = pvdm.ProjectedAutoencoder(ae_cfg)
    ae_path = str(root / "runs" / "autoencoder" / "autoencoder.pt")
    pvdm.save_checkpoint({"kind": "autoencoder", "config": asdict(ae_cfg), "model": ae.state_dict(), "step": 0,
                          "fingerprint": pvdm.fingerprint(ae)}, ae_path)
    ucfg = pvdm.unet_config_for(ae_cfg, "tiny")
    ucfg = pvdm.UNetConfig(latent_channels=ucfg.latent_channels, frames=ucfg.frames, size=ucfg.size, **UNET)
    unet = pvdm.TriplaneUNet(ucfg)
    torch.nn.init.normal_(unet.out[-1].weight, std=0.3)  # zero-initialised, every sample would look alike
    diff_path = str(root / "runs" / "diffusion" / "diffusion.pt")
    pvdm.save_checkpoint({"kind": "diffusion", "unet_config": asdict(ucfg),
                          "diffusion_config": asdict(pvdm.DiffusionConfig()), "step": 0,
                          "model": unet.state_dict(), "ema": unet.state_dict(),
                          "autoencoder": {"path": ae_path, "fingerprint": pvdm.fingerprint(ae)}}, diff_path)
    return ae_path, diff_path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are all overhead: on a shared CPU two threads waiting on each other run 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("ckpt"))


def run(pair, out, *flags):
    ae_path, diff_path = pair
    sample.main(["--diffusion", diff_path, "--frames", "20", "--num-videos", "2", "--steps", "3",
                 "--out", str(out), *flags])


def test_long_video_has_exact_frames_and_size(pair, tmp_path):
    """40 frames from clips of 16: three clips, the last trimmed to 8, read back as exactly 40 frames of 32x32."""
    run(pair, tmp_path, "--frames", "40")
    for name in ("video_0000", "video_0001"):
        frames = iio.imread(tmp_path / f"{name}.mp4", plugin="pyav")
        assert frames.shape == (40, 32, 32, 3)
        assert frames.std() > 1, "samples should not be constant"
        sheet = iio.imread(tmp_path / f"{name}.png")
        assert sheet.shape[0] == 3 * 96 + 2 * 2, "one row per clip in the contact sheet"
    info = json.loads((tmp_path / "samples.json").read_text())
    assert (info["frames"], info["resolution"], info["num_videos"], info["steps"], info["ema"]) == (40, 32, 2, 3, True)
    assert {"sampler", "eta", "cfg", "seed", "diffusion", "autoencoder"} <= info.keys()


def test_same_seed_same_video_and_other_seed_differs(pair, tmp_path):
    """Bit-exact before the codec (contact sheets and latents are lossless PNGs); the H.264 encoder itself
    is not always bit-exact from run to run, so the decoded mp4s are compared with a small tolerance."""
    for out, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        run(pair, tmp_path / out, "--seed", seed, "--eta", "1", "--batch-size", "1", "--save-latents")
    png = lambda out, name: iio.imread(tmp_path / out / name)  # noqa: E731
    mp4 = lambda out: iio.imread(tmp_path / out / "video_0001.mp4", plugin="pyav").astype(int)  # noqa: E731
    for name in ("video_0001.png", "latents/video_0001_clip01_zh.png"):  # the second batch, conditioned clip
        assert np.array_equal(png("a", name), png("b", name))
        assert not np.array_equal(png("a", name), png("c", name))
    assert np.abs(mp4("a") - mp4("b")).mean() < 3  # measured: 0 mostly, 1.1 at worst; another seed: 25
    assert np.abs(mp4("a") - mp4("c")).mean() > 10


def test_save_latents_writes_three_planes_per_clip(pair, tmp_path):
    run(pair, tmp_path, "--save-latents", "--num-videos", "1")
    scale, gap, c = 128 // 16, 4, 4  # largest plane side t = 16; four channels side by side
    shapes = {"zs": (4, 4), "zh": (16, 4), "zw": (16, 4)}  # (h, w), (t, w), (t, h)
    for k in range(2):  # 20 frames = 2 clips of 16, the second trimmed
        for name, (a, b) in shapes.items():
            image = iio.imread(tmp_path / "latents" / f"video_0000_clip{k:02d}_{name}.png")
            assert image.shape == (a * scale, c * b * scale + (c - 1) * gap, 3)
    assert not (tmp_path / "latents" / "video_0000_clip02_zs.png").exists()


def test_gif_and_odd_sizes(pair, tmp_path):
    run(pair, tmp_path, "--format", "gif", "mp4", "--num-videos", "1")
    assert iio.imread(tmp_path / "video_0000.gif", plugin="pyav").shape == (20, 32, 32, 3)
    assert iio.imread(tmp_path / "video_0000.mp4", plugin="pyav").shape == (20, 32, 32, 3)
    frames = np.random.default_rng(0).integers(0, 256, (5, 33, 35, 3), dtype=np.uint8)
    frames[2] = frames[1]  # an unchanged frame must still count
    for ext, size in (("mp4", (34, 36)), ("gif", (33, 35))):  # yuv420p needs even sides: padded by one pixel
        writer = sample.open_video_writer(str(tmp_path / f"odd.{ext}"), fps=4)
        writer.append(frames[:2]), writer.append(frames[2:])
        writer.close()
        assert iio.imread(tmp_path / f"odd.{ext}", plugin="pyav").shape == (5, *size, 3)


def test_mismatched_pair_is_refused(pair, tmp_path):
    other_ae, _ = save_pair(tmp_path, seed=1)  # same shapes, other weights
    with pytest.raises(SystemExit, match="trained with a different autoencoder"):
        run(pair, tmp_path / "out", "--autoencoder", other_ae)
    with pytest.raises(SystemExit, match="no autoencoder at"):
        run(pair, tmp_path / "out", "--autoencoder", str(tmp_path / "missing.pt"))


def test_defaults_after_quick_start(tmp_path):
    """`python sample.py --frames N` with no other flag reads runs/ and writes samples/."""
    save_pair(tmp_path)
    result = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--frames", "12", "--steps", "2"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert iio.imread(tmp_path / "samples" / "video_0003.mp4", plugin="pyav").shape == (12, 32, 32, 3)
    assert "wrote 4 video(s)" in result.stderr
