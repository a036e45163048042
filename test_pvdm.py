"""Tests of the properties a reader of PVDM cares about. Run: python -m pytest -q (CPU, a few minutes)."""
import math
from dataclasses import asdict
import os
import subprocess
import sys

import pytest
import torch

import pvdm


def tiny_ae(**overrides):
    cfg = dict(resolution=16, frames=8, patch=4, dim=32, depth=1, heads=2, proj_depth=1)
    cfg.update(overrides)
    return pvdm.ProjectedAutoencoder(pvdm.AutoencoderConfig(**cfg))


def tiny_diffusion(ae_cfg, cond_prob=0.3, randomise_output=True):
    ucfg = pvdm.UNetConfig(latent_channels=ae_cfg.latent_channels, frames=ae_cfg.latent_size[0],
                           size=ae_cfg.latent_size[1], base_channels=16, channel_mult=(1, 2), heads=2)
    unet = pvdm.TriplaneUNet(ucfg)
    if randomise_output:  # the output conv starts at zero; give it weights so outputs depend on inputs
        torch.nn.init.normal_(unet.out[-1].weight, std=0.1)
    return pvdm.GaussianDiffusion(unet, pvdm.DiffusionConfig(cond_prob=cond_prob))


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
    """A moving blob, 300 steps: measured 22.7 dB (from 5.8 dB at init). The threshold leaves a margin."""
    torch.manual_seed(0)
    ae = tiny_ae(resolution=16, frames=8, patch=2, dim=32)
    t = torch.linspace(0, 1, 8)[:, None, None]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    blob = torch.exp(-((xx - (t * 1.2 - 0.6)) ** 2 + yy**2) / 0.1)  # (8, 16, 16): a moving blob
    x = torch.stack([blob, -blob, blob * 0.5]).unsqueeze(0) * 1.6 - 0.8  # (1, 3, 8, 16, 16)
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3)
    start = pvdm.psnr(ae.decode(ae.encode(x)), x)
    for _ in range(300):
        loss, _ = ae(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = pvdm.psnr(ae.eval().decode(ae.encode(x)), x)
    assert end > 21 and end > start + 12, (start, end)


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


def test_discriminator_and_hinge_losses():
    disc = pvdm.Discriminator3D(width=32, layers=3)
    logits = disc(torch.randn(2, 3, 8, 32, 32))
    assert logits.shape == (2, 1, 1, 4, 4)  # one logit per space-time patch
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
    for a, b in zip(pvdm.unpack(z, t=6, h=5, w=5), planes):
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


def test_joint_training_conditions_only_where_a_previous_clip_exists():
    seen = []

    class Spy(torch.nn.Module):
        cfg = None

        def forward(self, z, t, cond, has_cond):
            seen.append(has_cond.clone())
            return torch.zeros_like(z)

    z = torch.randn(6, 4, 10)
    has_prev = torch.tensor([True, True, True, False, False, False])
    pvdm.GaussianDiffusion(Spy(), pvdm.DiffusionConfig(cond_prob=1.0))(z, z, has_prev)
    pvdm.GaussianDiffusion(Spy(), pvdm.DiffusionConfig(cond_prob=0.0))(z, z, has_prev)
    assert torch.equal(seen[0], has_prev)
    assert not seen[1].any()


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

    def recording_sample(n, cond=None, **kw):
        conds.append(cond)
        return sample(n, cond=cond, **kw)

    diffusion.sample = recording_sample
    out = list(pvdm.generate_video(ae, diffusion, frames=20, n=2, steps=2))
    assert [clip.shape[2] for clip, _ in out] == [8, 8, 4]  # clips of 8 frames, the last trimmed
    assert all(clip.shape == (2, 3, clip.shape[2], 16, 16) for clip, _ in out)
    assert conds[0] is None  # clip 1 is unconditional
    assert all(torch.equal(c, z) for c, (_, z) in zip(conds[1:], out[:-1]))  # clip k on clip k - 1


def test_ema_tracks_the_model():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        a.weight.zero_()
        b.weight.fill_(1.0)
    pvdm.update_ema(a, b, decay=0.9, step=10**6)
    torch.testing.assert_close(a.weight, torch.full((2, 2), 0.1))
    pvdm.update_ema(a, b, decay=0.9999, step=0)  # warm-up: the first step takes most of the model
    assert a.weight.min() > 0.8


def test_checkpoint_round_trips_through_weights_only_load(tmp_path):
    ae = tiny_ae().eval()
    path = tmp_path / "ae.pt"
    pvdm.save_checkpoint({"kind": "autoencoder", "config": asdict(ae.cfg), "model": ae.state_dict(),
                          "step": 7}, path)
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary file was renamed, not left behind
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 7
    back = pvdm.load_autoencoder(path)
    x = torch.rand(1, 3, 8, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(back.decode(back.encode(x)), ae.decode(ae.encode(x)))
    assert pvdm.fingerprint(back) == pvdm.fingerprint(ae)
    with pytest.raises(SystemExit, match="not a diffusion one"):
        pvdm.load_checkpoint(path, "diffusion")
    with pytest.raises(SystemExit, match="no autoencoder checkpoint"):
        pvdm.load_autoencoder(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------
# Training scripts, end to end through the command line
# ---------------------------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--resolution", "16", "--frames", "8", "--batch-size", "2", "--log-every", "1", "--workers", "0"]


def run(*args, check=True):
    result = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny autoencoder and diffusion model, each trained for a few steps through the scripts."""
    root = tmp_path_factory.mktemp("runs")
    ae_dir, dm_dir = root / "ae", root / "dm"
    run("train_autoencoder.py", *TINY, "--steps", "3", "--save-every", "3", "--eval-clips", "2", "--out", str(ae_dir))
    run("train_diffusion.py", "--batch-size", "2", "--log-every", "1", "--workers", "0", "--steps", "2",
        "--save-every", "2", "--preview-frames", "12", "--preview-steps", "2",
        "--autoencoder", str(ae_dir / "autoencoder.pt"), "--out", str(dm_dir))
    return ae_dir, dm_dir


def test_training_scripts_write_self_describing_checkpoints_and_previews(trained):
    ae_dir, dm_dir = trained
    ae = torch.load(ae_dir / "autoencoder.pt", weights_only=True)
    assert ae["kind"] == "autoencoder" and ae["step"] == 3 and ae["config"]["resolution"] == 16
    assert math.isfinite(ae["psnr"])
    dm = torch.load(dm_dir / "diffusion.pt", weights_only=True)
    assert dm["kind"] == "diffusion" and dm["step"] == 2
    assert dm["autoencoder"]["fingerprint"] == ae["fingerprint"]  # it names the autoencoder it used
    assert dm["model"].keys() == dm["ema"].keys()
    assert (ae_dir / "recon_0000003.png").exists() and (ae_dir / "recon_0000003.mp4").exists()
    assert (dm_dir / "sample_0000002.png").exists() and (dm_dir / "sample_0000002.mp4").exists()
    assert "step      3 | held-out PSNR" in (ae_dir / "log.txt").read_text()


def test_resume_continues_the_step_count_and_optimiser(trained, tmp_path):
    ae_dir, _ = trained
    out = tmp_path / "ae"
    out.mkdir()
    (out / "autoencoder.pt").write_bytes((ae_dir / "autoencoder.pt").read_bytes())
    before = torch.load(out / "autoencoder.pt", weights_only=True)
    run("train_autoencoder.py", *TINY, "--steps", "5", "--save-every", "5", "--eval-clips", "2",
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
    # a small folder dataset keeps the cache quick: the synthetic set has 10,000 videos
    run(*common, "--steps", "1", "--save-every", "1", "--data", "synthetic", "--cache-videos", "8")
    run(*common, "--steps", "2", "--save-every", "2", "--data", "synthetic", "--cache-videos", "8", "--resume")
    assert torch.load(tmp_path / "diffusion.pt", weights_only=True)["step"] == 2
    cache = torch.load(tmp_path / "latents.pt", weights_only=True)
    assert cache["next"].shape[0] == 8 and cache["next"].abs().max() <= 1


@pytest.mark.parametrize("flags, message", [
    (["--resolution", "30"], "not divisible by the patch size"),
    (["--frames", "1"], "frames must be at least 2"),
])
def test_autoencoder_script_refuses_bad_sizes(flags, message, tmp_path):
    result = run("train_autoencoder.py", "--steps", "1", "--out", str(tmp_path), *flags, check=False)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_diffusion_script_refuses_missing_or_wrong_autoencoder(trained, tmp_path):
    _, dm_dir = trained
    missing = run("train_diffusion.py", "--autoencoder", str(tmp_path / "nope.pt"), "--out", str(tmp_path), check=False)
    assert missing.returncode != 0 and "no autoencoder checkpoint" in missing.stderr
    wrong = run("train_diffusion.py", "--autoencoder", str(dm_dir / "diffusion.pt"), "--out", str(tmp_path), check=False)
    assert wrong.returncode != 0 and "holds a diffusion checkpoint, not a autoencoder one" in wrong.stderr


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
