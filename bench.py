"""
bench.py: what a training step and a sampling step of PVDM cost, beside a pixel-space video diffusion
baseline of comparable size (a VDM-style 3D UNet, defined below). Four measurements:

  1. FLOPs per clip, counted by torch.utils.flop_counter on fake tensors: nothing is allocated, so the
     paper sizes (256x256, 16 frames, ~500M parameters) are counted on a laptop.
  2. Peak training memory without a GPU: forward, backward and AdamW run on fake tensors while
     MemTracker adds up every live tensor, in fp32 and bf16, with and without activation checkpointing.
  3. From 2, the largest batch that fits a GPU of --gpu-mem GB, keeping a stated safety margin.
  4. Real time per training and sampling step on the device at hand, after a burn-in, beside the
     device's measured matrix-product peak.

    python bench.py                          # the full table (slow on a CPU: the paper sizes)
    python bench.py --quick                  # tiny presets at 32x32 only (a few minutes)
    python bench.py --gpu-mem 80 --json bench.json
    python bench.py --profile                # plus torch.profiler's top ops of the tiny training steps
    python bench.py --data-loading           # only clips per second of data.py
    python bench.py --paper-defaults         # only the memory of the paper preset's training steps
"""
import argparse
import contextlib
import functools
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.checkpoint import checkpoint
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import data
import pvdm
from runtime import autocast, device_name, float_in, positive_int, resolve_device

GB = 1e9  # decimal gigabytes, as GPUs are sold ("24 GB")
SAFETY_FRACTION = 0.10  # keep 10% of the GPU free: allocator fragmentation, cuDNN / cuBLAS workspaces
CUDA_CONTEXT_GB = 1.0  # and 1 GB for the CUDA context and kernels, which no tensor accounts for
SETTINGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]  # (precision, checkpointing)

# ----------------------------------------------------------------------------------------------
# 1. The pixel-space baseline: a VDM-style factorised space-time UNet (Ho et al. 2022)
# ----------------------------------------------------------------------------------------------
# The triplane UNet's blocks, run on the (B, C, T, H, W) video itself: convolutions per frame (1x3x3),
# spatial attention over each frame's pixels at the low resolutions only, temporal attention along T
# at every pixel of every block. VDM's relative position bias in time changes neither FLOPs nor memory
# much, so it is left out.


@dataclass
class PixelUNetConfig:
    resolution: int = 256
    frames: int = 16
    channels: int = 3
    base_channels: int = 128  # matched_pixel_config() matches the triplane UNet's parameters
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (2, 3)  # spatial attention at 1/4 and 1/8 resolution, as VDM does
    heads: int = 8
    grad_checkpointing: bool = False


def frame_conv(cin, cout):
    return nn.Conv3d(cin, cout, kernel_size=(1, 3, 3), padding=(0, 1, 1))  # a 2D conv on every frame


class PixelResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a timestep scale-shift: pvdm.ResBlock, applied frame by frame."""

    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(pvdm.norm(cin), nn.SiLU(), frame_conv(cin, cout))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_norm = pvdm.norm(cout)
        self.out_layers = nn.Sequential(nn.SiLU(), frame_conv(cout, cout))
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)  # (B, cout, T, H, W)
        scale, shift = self.emb(emb)[:, :, None, None, None].chunk(2, dim=1)  # (B, cout, 1, 1, 1)
        return self.skip(x) + self.out_layers(self.out_norm(h) * (1 + scale) + shift)


class AxisAttention(nn.Module):
    """Self-attention over each frame's pixels, or along time at each pixel. Tokens are channels-last:
    the fused kernels of scaled_dot_product_attention need a contiguous last dimension (else the
    L x L matrix is materialised)."""

    PATTERNS = {"space": ("b c t h w -> (b t) (h w) c", "(b t) (h w) c -> b c t h w"),
                "time": ("b c t h w -> (b h w) t c", "(b h w) t c -> b c t h w")}

    def __init__(self, channels, heads, axis):
        super().__init__()
        self.norm, self.attn = pvdm.norm(channels), pvdm.Attention(channels, heads)
        self.to_tokens, self.to_video = self.PATTERNS[axis]

    def forward(self, x):
        b, _, t, h, w = x.shape
        out = self.attn(rearrange(self.norm(x), self.to_tokens))  # (B*T, H*W, C) or (B*H*W, T, C)
        return x + rearrange(out, self.to_video, b=b, t=t, h=h, w=w)  # (B, C, T, H, W)


class PixelBlock(nn.Module):
    """ResBlock, spatial attention (low resolutions only), temporal attention."""

    def __init__(self, cin, cout, emb_dim, heads, attend, use_checkpoint):
        super().__init__()
        self.res = PixelResBlock(cin, cout, emb_dim)
        self.space = AxisAttention(cout, heads, "space") if attend else nn.Identity()
        self.time = AxisAttention(cout, heads, "time")
        self.use_checkpoint = use_checkpoint

    def forward(self, x, emb):
        if self.use_checkpoint and self.training:
            return checkpoint(self.run, x, emb, use_reentrant=False)  # keep only the block input
        return self.run(x, emb)

    def run(self, x, emb):
        return self.time(self.space(self.res(x, emb)))


class PixelUNet(nn.Module):
    """epsilon(x_t, t) on videos (B, 3, T, H, W); the same UNet layout as pvdm.TriplaneUNet."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        base, emb_dim = cfg.base_channels, 4 * cfg.base_channels
        block = partial(PixelBlock, emb_dim=emb_dim, heads=cfg.heads,
                        use_checkpoint=cfg.grad_checkpointing)
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.input = frame_conv(cfg.channels, base)
        self.down, skips, c = nn.ModuleList(), [base], base
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(c, base * mult, attend=level in cfg.attention_levels))
                c = base * mult
                skips.append(c)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.AvgPool3d((1, 2, 2)))  # halve H and W, keep T
                skips.append(c)
        self.middle = nn.ModuleList([block(c, c, attend=True), block(c, c, attend=False)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                attend = level in cfg.attention_levels
                self.up.append(block(c + skips.pop(), base * mult, attend=attend))
                c = base * mult
            if level > 0:
                up = nn.Upsample(scale_factor=(1, 2, 2), mode="nearest")
                self.up.append(nn.Sequential(up, frame_conv(c, c)))
        self.out = nn.Sequential(pvdm.norm(c), nn.SiLU(), frame_conv(c, cfg.channels))

    def forward(self, x, t):
        emb = self.time_mlp(pvdm.timestep_embedding(t, self.cfg.base_channels))  # (B, E)
        h = self.input(x)  # (B, base, T, H, W)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, PixelBlock) else layer(h)
            hs.append(h)
        for layer in self.middle:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, PixelBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)  # UNet skip on channels
            else:
                h = layer(h)
        return self.out(h)  # (B, 3, T, H, W)


class PixelDiffusion(nn.Module):
    """Algorithm 1 (Ho et al. 2020) on pixels with pvdm's noise schedule: the cost is the UNet's."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        alpha_bar = pvdm.noise_schedule(pvdm.DiffusionConfig())[1]
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)

    def forward(self, x0):
        t = torch.randint(0, len(self.alpha_bar), (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        eps = self.unet(pvdm.q_sample(self.alpha_bar, x0, t, noise), t)  # (B, 3, T, H, W)
        return F.mse_loss(eps.float(), noise.float())


def count_parameters(build):
    with torch.device("meta"):  # shapes only: a 500M-parameter model costs no memory here
        return sum(p.numel() for p in build().parameters())


def matched_pixel_config(unet_cfg, resolution, frames):
    """The baseline with the triplane UNet's layout, spatial attention at its two lowest resolutions
    (as VDM), and the width (a multiple of 32, for GroupNorm) whose parameter count is closest to the
    triplane's. Parameters grow as width squared: one count gives the width, its neighbours checked."""
    target = count_parameters(partial(pvdm.TriplaneUNet, unet_cfg))
    levels = tuple(range(len(unet_cfg.channel_mult)))[-2:]
    cfg = PixelUNetConfig(resolution=resolution, frames=frames, channel_mult=unet_cfg.channel_mult,
                          num_res_blocks=unet_cfg.num_res_blocks, attention_levels=levels,
                          heads=unet_cfg.heads)
    params = lambda w: count_parameters(partial(PixelUNet, replace(cfg, base_channels=w)))
    guess = 32 * round(unet_cfg.base_channels * math.sqrt(target / params(unet_cfg.base_channels)) / 32)
    width = min((max(32, guess + d) for d in (-32, 0, 32)), key=lambda w: abs(params(w) - target))
    return replace(cfg, base_channels=width)


# ----------------------------------------------------------------------------------------------
# 2. Workloads: what a training step and a sampling step are, for each model
# ----------------------------------------------------------------------------------------------
# A workload builds its model (with or without activation checkpointing), makes inputs, and says what
# the training loss and one sampling evaluation are: the three models are measured the same way.


@dataclass
class Workload:
    name: str
    build: callable  # grad_checkpointing -> nn.Module
    inputs: callable  # (batch, device) -> tuple of tensors
    loss: callable  # (model, inputs) -> scalar training loss
    sample: callable  # (model, inputs) -> one network evaluation of sampling
    config: object = None  # the model's config, where the benchmark chose it


def autoencoder_workload(cfg):
    t, h, w = cfg.latent_size

    def decode(model, x):  # sampling decodes each generated latent once: three planes -> pixels
        b, c = x[0].shape[0], cfg.latent_channels
        zeros = x[0].new_zeros
        return model.decode((zeros(b, c, h, w), zeros(b, c, t, w), zeros(b, c, t, h)))

    return Workload(
        name="autoencoder",
        build=lambda ckpt: pvdm.ProjectedAutoencoder(replace(cfg, grad_checkpointing=ckpt)),
        inputs=lambda b, dev: (random_videos(b, cfg.frames, cfg.resolution, dev),),
        loss=lambda model, x: model(x[0])[0],
        sample=decode,
    )


def random_videos(b, frames, resolution, device):
    return torch.rand(b, 3, frames, resolution, resolution, device=device) * 2 - 1


def preset_config(preset, resolution):
    return pvdm.AutoencoderConfig(**{**pvdm.AUTOENCODER_PRESETS[preset], "resolution": resolution})


def half_way(x):
    return torch.full((len(x),), 500, device=x.device)  # a timestep for one sampling evaluation


def diffusion_workload(preset, resolution):
    ae_cfg = preset_config(preset, resolution)
    ucfg = pvdm.unet_config_for(ae_cfg, preset)

    def inputs(b, dev):
        z0, prev = (torch.rand(b, ucfg.latent_channels, ucfg.num_tokens, device=dev) * 2 - 1
                    for _ in "zp")
        return z0, prev, torch.ones(b, dtype=torch.bool, device=dev)

    return Workload(
        name="triplane UNet",
        build=lambda ckpt: pvdm.GaussianDiffusion(  # ckpt: what --grad-checkpointing sets
            pvdm.TriplaneUNet(replace(ucfg, grad_checkpointing=ckpt)), pvdm.DiffusionConfig()),
        inputs=inputs,
        loss=lambda model, x: model(*x),
        sample=lambda model, x: model.model(x[0], half_way(x[0]), x[1], x[2]),
    )


def pixel_workload(preset, resolution, frames=16):
    ucfg = pvdm.unet_config_for(pvdm.AutoencoderConfig(**pvdm.AUTOENCODER_PRESETS[preset]), preset)
    cfg = matched_pixel_config(ucfg, resolution, frames)
    return Workload(
        name="pixel 3D UNet",
        build=lambda ckpt: PixelDiffusion(PixelUNet(replace(cfg, grad_checkpointing=ckpt))),
        inputs=lambda b, dev: (random_videos(b, frames, resolution, dev),),
        loss=lambda model, x: model(x[0]),
        sample=lambda model, x: model.unet(x[0], half_way(x[0])),
        config=cfg,
    )


def small_workload():
    """An autoencoder that trains for real on CPU in a fraction of a second: to check the memory
    estimate against the CPU allocator."""
    return autoencoder_workload(pvdm.AutoencoderConfig(resolution=16, frames=8, patch=4, dim=32,
                                                       depth=1, heads=2, proj_depth=1))


def workloads(preset, resolution):
    return [autoencoder_workload(preset_config(preset, resolution)),
            diffusion_workload(preset, resolution), pixel_workload(preset, resolution)]


# ----------------------------------------------------------------------------------------------
# 3. FLOPs (torch.utils.flop_counter on fake tensors)
# ----------------------------------------------------------------------------------------------
# FlopCounterMode counts matrix products, convolutions and attention, 2 FLOPs per multiply-add as MFU
# figures do. It has no formula for the CPU flash attention kernel fake CPU tensors dispatch to, so
# that one is registered here with the CUDA kernels' formula.

aten = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v),
}


def count_flops(fn):
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def flops_per_clip(work):
    """(forward, training = forward + backward) FLOPs of one clip, and one sampling evaluation's."""
    with FakeTensorMode():
        model = work.build(False)
        x = work.inputs(1, "cpu")
        train = count_flops(lambda: work.loss(model, x).backward())
        with torch.no_grad():
            model.eval()
            sample = count_flops(lambda: work.sample(model, x))
    return train, sample


# ----------------------------------------------------------------------------------------------
# 4. Peak training memory (FakeTensorMode + MemTracker) and the largest batch that fits
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cuda_autocast_policy():
    """Fake tensors here are CPU tensors (fake CUDA tensors need a CUDA build of torch), so bf16 runs
    under CPU autocast. The two autocasts differ in one way that matters for memory: CUDA's computes
    group_norm and layer_norm in fp32 (torch.amp docs, "CUDA ops that can autocast to float32"), so
    their inputs are upcast and their outputs stored in fp32, where CPU's keeps bf16. This makes CPU
    autocast do as CUDA's. It swaps the functions themselves (nn.GroupNorm and nn.LayerNorm call them
    through torch.nn.functional), so it also holds when checkpointing re-runs a forward in backward."""
    originals = {name: getattr(F, name) for name in ("group_norm", "layer_norm")}
    upcast = lambda f: lambda x, *args, **kwargs: f(x.float(), *args, **kwargs)
    for name, f in originals.items():
        setattr(F, name, upcast(f))
    try:
        yield
    finally:
        for name, f in originals.items():
            setattr(F, name, f)


def train_step(work, model, opt, x, precision, device_type="cpu", emulate_cuda=False):
    """One whole training step: forward under autocast, backward, AdamW, gradients freed."""
    policy = cuda_autocast_policy() if emulate_cuda and precision == "bf16" else contextlib.nullcontext()
    with policy:  # over the backward too, where activation checkpointing re-runs the forward
        with autocast(device_type, precision):
            loss = work.loss(model, x)
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def new_optimizer(model, foreach=None):
    # AdamW's default is foreach on CUDA (a few big launches, and their temporaries) and a loop on CPU;
    # the memory estimate asks for foreach explicitly, as on the GPU it stands for.
    return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=foreach)


class PeakTracker(MemTracker):
    """MemTracker also keeps every module's own peak, updated after every op (a loop over all modules);
    only the global peak is wanted here, and skipping the rest makes it several times faster."""

    def _update_peak_stats(self, peak_state):
        for device, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snap["Total"]:
                self._peak_mem[device] = snap["Total"]
                self._peak_mem_snap[device] = dict(snap)


def with_optimizer_state(model):
    """AdamW with its two moment buffers already allocated, as at every step after the first: the steady
    state a long run lives in. (A step on zero gradients creates them without a forward pass.)"""
    opt = new_optimizer(model, foreach=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def estimate_train_memory(work, batch, precision, ckpt):
    """Peak bytes of one training step, on fake tensors: weights, gradients, AdamW's two moments, the
    input batch, activations and temporaries (bf16 with CUDA's autocast policy, see above)."""
    with FakeTensorMode():
        model = work.build(ckpt)
        opt, x = with_optimizer_state(model), work.inputs(batch, "cpu")
        tracker = PeakTracker()
        tracker.track_external(model, opt, *x)
        with tracker:
            train_step(work, model, opt, x, precision, emulate_cuda=True)
        return sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())


def usable_bytes(gpu_gb):
    return gpu_gb * GB * (1 - SAFETY_FRACTION) - CUDA_CONTEXT_GB * GB


def largest_batch(memory_at, budget):
    """The largest batch whose peak memory fits `budget` bytes. Peak memory grows with the batch, about
    linearly (weights and optimiser state are fixed, activations grow with it), so the line through
    batches 1 and 2 gives a first guess; the guess and the batch after it are then checked, and the
    answer searched up (doubling) or down (bisection) from there when the line was off, as it is when
    the peak of a small batch falls in the optimiser step rather than in the backward pass."""
    if memory_at(1) > budget:
        return 0
    per_clip = max(memory_at(2) - memory_at(1), 1)
    guess = max(1, int((budget - memory_at(1)) // per_clip) + 1)
    if memory_at(guess) <= budget:
        fits, step = guess, 1
        while memory_at(fits + step) <= budget:  # the line was pessimistic: search up
            fits, step = fits + step, 2 * step
        too_big = fits + step
    else:
        fits, too_big = 1, guess
    while too_big - fits > 1:  # bisection: fits always fits, too_big never does
        mid = (fits + too_big) // 2
        fits, too_big = (mid, too_big) if memory_at(mid) <= budget else (fits, mid)
    return fits


def measured_cpu_peak(work, batch, precision="fp32"):
    """The real peak of a training step on CPU, from the allocator itself (torch.profiler's memory
    events: every allocation and free, in time order), plus what was already allocated when it began
    (weights and AdamW's moments), to check estimate_train_memory against."""
    torch.manual_seed(0)
    model = work.build(False)
    opt, x = with_optimizer_state(model), work.inputs(batch, "cpu")  # foreach, as in the estimate
    resident = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers(), *x])
    resident += sum(v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values() if v.dim())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(work, model, opt, x, precision)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return resident + peak


# ----------------------------------------------------------------------------------------------
# 5. Time on the device at hand
# ----------------------------------------------------------------------------------------------


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn, device, burn_in=1, min_seconds=2.0, max_calls=10):
    """Mean wall time of fn after a burn-in (allocator warm-up, kernel selection, lazy init), over as
    many calls as fit in min_seconds (at least one, at most max_calls)."""
    for _ in range(burn_in):
        fn()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < max_calls and (calls == 0 or time.perf_counter() - start < min_seconds):
        fn()
        synchronize(device)
        calls += 1
    return (time.perf_counter() - start) / calls


def matmul_peak(device):
    """The device's achievable matrix-product rate: fp32 on CPU (bf16 there is far slower), bf16 on CUDA."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / seconds_per_call(lambda: a @ b, device, burn_in=2, min_seconds=1.0, max_calls=20)


def time_workload(work, batch, device, precision):
    """Seconds per training step and per sampling evaluation at `batch`; on CUDA also the real peak."""
    torch.manual_seed(0)
    model = work.build(False).to(device)
    opt, x = new_optimizer(model), work.inputs(batch, device)
    result = {"batch": batch, "precision": precision}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result["train_s"] = seconds_per_call(lambda: train_step(work, model, opt, x, precision, device.type), device)
    if device.type == "cuda":
        result["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
    model.eval()
    with torch.no_grad(), autocast(device.type, precision):
        result["sample_s"] = seconds_per_call(lambda: work.sample(model, x), device)
    return result


def data_throughput(resolution, frames=16, clips=16):
    """Clips per second from the synthetic dataset in one process (the DataLoader adds workers)."""
    dataset = data.make_dataset("synthetic", resolution=resolution, frames=frames)
    start = time.perf_counter()
    for i in range(clips):
        dataset[i]
    return clips / (time.perf_counter() - start)


def profile_train_step(work, batch, rows=12):
    """torch.profiler's top ops (by self CPU time) of a few training steps: where the time goes."""
    model = work.build(False)
    opt, x = new_optimizer(model), work.inputs(batch, "cpu")
    train_step(work, model, opt, x, "fp32")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            train_step(work, model, opt, x, "fp32")
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def write_bench_videos(folder, count=20, frames=150):
    """UCF-101-like files: 320x240 MPEG-4 part 2 in .avi, 25 fps, about 500 kb/s, bouncing shapes
    on a textured background so that the codec has real work to do."""
    shapes = data.SyntheticVideos(resolution=160, video_frames=frames)
    texture = np.random.default_rng(0).integers(0, 60, (240, 320, 3))
    for i in range(count):
        video = (shapes.render(i, range(frames))[:, :, 20:140] + 1) * 127.5    # (3, T, 120, 160)
        video = video.permute(1, 2, 3, 0).numpy().repeat(2, 1).repeat(2, 2)    # (T, 240, 320, 3)
        video = (video * 0.75 + texture).astype(np.uint8)
        with av.open(str(folder / f"v_Bench_g{i:02d}_c01.avi"), "w") as container:
            stream = container.add_stream("mpeg4", rate=25)
            stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
            stream.bit_rate = 500_000
            for frame in video:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())


def clips_per_second(dataset, workers, clips=64, batch=8):
    """Throughput of a DataLoader, after one batch of warm-up (worker start-up excluded)."""
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=clips + batch,
                                             generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    for _ in range(clips // batch):
        next(batches)
    return clips / (time.perf_counter() - start)


def bench_data_loading():
    """Clips per second of data.py's datasets, with 0 and 2 DataLoader workers."""
    with tempfile.TemporaryDirectory() as folder:
        data.CACHE_DIR = Path(folder) / "cache"  # no stale probe entries for a temporary folder
        start = time.perf_counter()
        write_bench_videos(Path(folder))
        print(f"wrote 20 videos in {time.perf_counter() - start:.0f} s")
        cases = [("synthetic 32x32x16", data.make_dataset("synthetic", resolution=32)),
                 ("synthetic 256x256x16", data.make_dataset("synthetic", resolution=256)),
                 ("320x240 .avi -> 256x256x16", data.make_dataset("folder", folder, resolution=256, split="all"))]
        print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
        for name, dataset in cases:
            rates = [clips_per_second(dataset, workers) for workers in (0, 2)]
            print(f"{name:28s} {rates[0]:7.1f} clips/s with 0 workers, {rates[1]:7.1f} with 2")


# ----------------------------------------------------------------------------------------------
# 6. The benchmark: measure, print one table, write JSON
# ----------------------------------------------------------------------------------------------


def setting_name(precision, ckpt):
    return precision + ("+ckpt" if ckpt else "")


def estimate(work, budget, every_setting):
    """FLOPs, peak memory at batch 1 in every setting, and the largest batch that fits the budget: in
    every setting, or (to save time at the smaller resolution) in bf16 with checkpointing only."""
    train, sample = flops_per_clip(work)
    memory = functools.cache(lambda setting, batch: estimate_train_memory(work, batch, *setting))
    peak1 = {setting_name(*s): memory(s, 1) for s in SETTINGS}
    searched = SETTINGS if every_setting else [("bf16", True)]
    max_batch = {setting_name(*s): largest_batch(partial(memory, s), budget) for s in searched}
    return {"train_flops": train, "sample_flops": sample, "peak_bytes_batch1": peak1, "max_batch": max_batch}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-mem", type=float, default=24, help="GPU memory (GB) for the largest-batch search")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the timings")
    parser.add_argument("--batch", type=int, default=4, help="batch of the timed steps")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the timings (torch's default)")
    parser.add_argument("--resolutions", help="estimated at these, 16 frames, paper presets (default 128,256)")
    parser.add_argument("--quick", action="store_true", help="tiny presets at 32x32 only: a smoke test")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of the tiny steps")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--data-loading", action="store_true", help="only measure data.py's clips per second")
    parser.add_argument("--paper-defaults", action="store_true",
                        help="only estimate the memory of the paper preset's default training steps (bf16)")
    args = parser.parse_args()
    if args.data_loading:
        return bench_data_loading()
    if args.paper_defaults:
        return bench_paper_defaults(args.gpu_mem)
    device = torch.device(args.device)
    if args.threads:  # on a CPU shared with other jobs, fewer threads than cores can be much faster
        torch.set_num_threads(args.threads)
    precision = "bf16" if device.type == "cuda" else "fp32"  # bf16 matrix products are slow on most CPUs
    tiny_res = pvdm.AUTOENCODER_PRESETS["tiny"]["resolution"]
    if args.quick and args.resolutions:
        parser.error("--quick estimates the tiny presets at their own size only; drop --resolutions or --quick.")
    resolutions = [int(r) for r in (args.resolutions or "128,256").split(",")]
    big, resolutions = ("tiny", [tiny_res]) if args.quick else ("paper", resolutions)
    top_res = resolutions[-1]
    # CPU: the tiny presets, as the quick start trains them; CUDA: the paper presets at the top resolution
    timed_preset, timed_res = ("paper", top_res) if device.type == "cuda" and not args.quick else ("tiny", tiny_res)
    budget = usable_bytes(args.gpu_mem)
    out = {"gpu_mem_gb": args.gpu_mem, "usable_bytes": budget, "device": str(device),
           "torch_threads": torch.get_num_threads(), "estimated_preset": big, "models": {}}

    # 1-3: FLOPs, memory and the largest batch, on fake tensors
    for res in resolutions:
        for work in workloads(big, res):
            m = out["models"].setdefault(work.name, {"params": count_parameters(partial(work.build, False))})
            if work.config is not None:
                m["config"] = asdict(work.config)
            m[res] = estimate(work, budget, every_setting=res == top_res)
            print(f"estimated {work.name} at {res}x{res}", flush=True)
    check = small_workload()
    out["memory_check_cpu"] = {"estimate": estimate_train_memory(check, 2, "fp32", False),
                               "allocator_peak": measured_cpu_peak(check, 2)}

    # 4: real time on this device
    out["matmul_peak_flops"] = peak = matmul_peak(device)
    for work in workloads(timed_preset, timed_res):
        t = time_workload(work, args.batch, device, precision)
        train, sample = flops_per_clip(work)
        t["train_flops_per_s"] = train * args.batch / t["train_s"]
        t["sample_flops_per_s"] = sample * args.batch / t["sample_s"]
        t["train_utilisation"] = t["train_flops_per_s"] / peak
        if device.type == "cuda":
            t["estimated_peak_bytes"] = estimate_train_memory(work, args.batch, precision, False)
        out["models"][work.name]["timed"] = {"preset": timed_preset, "resolution": timed_res, **t}
        print(f"timed {work.name}", flush=True)
    out["data_clips_per_s"] = data_throughput(tiny_res)

    ae, un, px = (out["models"][k] for k in ("autoencoder", "triplane UNet", "pixel 3D UNet"))
    out["autoencoder_max_batch"] = max(ae[top_res]["max_batch"].values())
    out["diffusion_max_batch"] = max(un[top_res]["max_batch"].values())
    out["denoise_flops_ratio"] = px[top_res]["sample_flops"] / un[top_res]["sample_flops"]
    out[f"train_step_utilisation_{device.type}"] = un["timed"]["train_utilisation"]
    out[f"autoencoder_train_step_utilisation_{device.type}"] = ae["timed"]["train_utilisation"]
    print_table(out, resolutions, args)
    if args.profile:
        for work in workloads("tiny", tiny_res)[:2]:
            print(f"\n{work.name} (tiny {tiny_res}px), {args.batch} clips, 3 training steps:")
            print(profile_train_step(work, args.batch))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def bench_paper_defaults(gpu_mem):
    """The training steps `train_autoencoder.py --data ucf101` and `train_diffusion.py --data ucf101` take by default:
    the paper preset's batch and activation checkpointing (pvdm.PRESETS), in bf16 as on CUDA, against the GPU."""
    ae_cfg = pvdm.AutoencoderConfig(**pvdm.AUTOENCODER_PRESETS["paper"])
    stages = {"train_autoencoder": autoencoder_workload(ae_cfg),
              "train_diffusion": diffusion_workload("paper", ae_cfg.resolution)}
    for stage, work in stages.items():
        recipe = pvdm.PRESETS["paper"][stage]
        need = estimate_train_memory(work, recipe["batch_size"], "bf16", recipe["grad_checkpointing"])
        print(f"{stage}.py --data ucf101: {work.name} at batch {recipe['batch_size']}, bf16, activation checkpointing "
              f"{'on' if recipe['grad_checkpointing'] else 'off'}: {need / GB:.2f} GB per training step, of "
              f"{usable_bytes(gpu_mem) / GB:.1f} GB usable on a {gpu_mem:g} GB GPU")


def print_table(out, resolutions, args):
    names = list(out["models"])
    rows = [("parameters (M)", [f"{out['models'][n]['params'] / 1e6:.1f}" for n in names])]
    for res in resolutions:
        ms = [out["models"][n][res] for n in names]
        rows.append((f"{res}px train GFLOP/clip", [f"{m['train_flops'] / 1e9:,.0f}" for m in ms]))
        rows.append((f"{res}px sample GFLOP/clip", [f"{m['sample_flops'] / 1e9:,.1f}" for m in ms]))
        for s in ms[0]["peak_bytes_batch1"]:
            rows.append((f"{res}px peak GB, b=1, {s}", [f"{m['peak_bytes_batch1'][s] / GB:.2f}" for m in ms]))
        for s in ms[0]["max_batch"]:
            rows.append((f"{res}px max batch, {s}", [str(m["max_batch"][s]) for m in ms]))
    timed = [out["models"][n]["timed"] for n in names]
    rows.append((f"timed: {timed[0]['preset']} {timed[0]['resolution']}px b={args.batch}", ["" for _ in names]))
    rows.append(("  train ms/step", [f"{t['train_s'] * 1e3:.0f}" for t in timed]))
    rows.append(("  sample ms/eval", [f"{t['sample_s'] * 1e3:.0f}" for t in timed]))
    rows.append(("  train GFLOP/s", [f"{t['train_flops_per_s'] / 1e9:.1f}" for t in timed]))
    rows.append(("  train utilisation", [f"{100 * t['train_utilisation']:.1f}%" for t in timed]))
    if "cuda_max_memory_allocated" in timed[0]:
        rows.append(("  CUDA peak GB, measured", [f"{t['cuda_max_memory_allocated'] / GB:.2f}" for t in timed]))
        rows.append(("  CUDA peak GB, estimated", [f"{t['estimated_peak_bytes'] / GB:.2f}" for t in timed]))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  " + "  ".join(f"{n:>15}" for n in names))
    for label, cells in rows:
        print(f"{label:{width}}  " + "  ".join(f"{c:>15}" for c in cells))
    print(f"\nmatmul peak ({out['device']}, {out['torch_threads']} threads): "
          f"{out['matmul_peak_flops'] / 1e9:.1f} GFLOP/s")
    print(f"max batch: largest that fits {args.gpu_mem:g} GB less {SAFETY_FRACTION:.0%} and {CUDA_CONTEXT_GB:g} GB "
          f"for the CUDA context ({out['usable_bytes'] / GB:.1f} GB usable); first guess linear from b=1, 2, "
          "then searched")
    check = out["memory_check_cpu"]
    ratio = check["estimate"] / check["allocator_peak"]
    print(f"memory estimate / CPU allocator's peak, small autoencoder: {ratio:.4f}")
    print(f"denoise FLOPs ratio (pixel / triplane, {resolutions[-1]}px): {out['denoise_flops_ratio']:.0f}x")
    print(f"synthetic data: {out['data_clips_per_s']:.0f} clips/s in one process")


if __name__ == "__main__":
    main()
