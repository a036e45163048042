"""
bench.py: what a training and a sampling step of PVDM cost, beside a pixel-space VDM-style 3D UNet
of the same size: FLOPs per clip and peak training memory, both on fake tensors (no GPU needed),
the largest batch that fits --gpu-mem GB, and time per step on the device at hand.

    python bench.py                   # the full table (slow on a CPU: the paper sizes)
    python bench.py --quick           # the tiny presets only (a few minutes)
    python bench.py --profile         # plus torch.profiler's top ops of tiny steps
    python bench.py --data-loading    # only data.py's clips per second
    python bench.py --paper-defaults  # only the memory of the paper preset's steps
"""
import argparse
import contextlib
import functools
import itertools
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
from runtime import autocast, device_name, float_in, positive_int, resolve_device, run_cleanly

GB = 1e9  # decimal, as GPUs are sold ("24 GB")
SAFETY_FRACTION = 0.10  # kept free: allocator fragmentation, cuDNN / cuBLAS workspaces
CUDA_CONTEXT_GB = 1.0  # the CUDA context and kernels, which no tensor holds
SETTINGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]  # (precision, ckpt)
CPU = torch.profiler.ProfilerActivity.CPU

# ---- 1. The pixel-space baseline: a VDM-style factorised space-time UNet (Ho et al. 2022)


@dataclass
class PixelUNetConfig:
    base_channels: int = 128  # matched_pixel_config() sets it
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (2, 3)  # spatial attention at 1/4 and 1/8 resolution, as VDM
    heads: int = 8
    grad_checkpointing: bool = False


def frame_conv(cin, cout):
    return nn.Conv3d(cin, cout, kernel_size=(1, 3, 3), padding=(0, 1, 1))  # 2D on every frame


class PixelResBlock(nn.Module):
    """pvdm.ResBlock, frame by frame."""

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
    """Self-attention over each frame's pixels, or along time at each pixel (channels-last, as the
    fused attention kernels need)."""

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
            return checkpoint(self.run, x, emb, use_reentrant=False)  # keeps the input only
        return self.run(x, emb)

    def run(self, x, emb):
        return self.time(self.space(self.res(x, emb)))


class PixelUNet(nn.Module):
    """epsilon(x_t, t) on videos (B, 3, T, H, W), laid out as pvdm.TriplaneUNet."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        base, emb_dim = cfg.base_channels, 4 * cfg.base_channels
        block = partial(PixelBlock, emb_dim=emb_dim, heads=cfg.heads,
                        use_checkpoint=cfg.grad_checkpointing)
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.input = frame_conv(3, base)
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
        self.out = nn.Sequential(pvdm.norm(c), nn.SiLU(), frame_conv(c, 3))

    def forward(self, x, t):
        emb = self.time_mlp(pvdm.timestep_embedding(t, self.cfg.base_channels))  # (B, E)
        hs = [self.input(x)]  # (B, base, T, H, W)
        for layer in self.down:
            hs.append(layer(hs[-1], emb) if isinstance(layer, PixelBlock) else layer(hs[-1]))
        h = hs[-1]
        for layer in self.middle:
            h = layer(h, emb)
        for layer in self.up:  # a block takes the UNet skip on channels
            is_block = isinstance(layer, PixelBlock)
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if is_block else layer(h)
        return self.out(h)  # (B, 3, T, H, W)


class PixelDiffusion(nn.Module):
    """Algorithm 1 (Ho et al. 2020) on pixels, with pvdm's noise schedule."""

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


def count_parameters(make, *args):
    with torch.device("meta"):  # shapes only, no memory
        return sum(p.numel() for p in make(*args).parameters())


def matched_pixel_config(unet_cfg):
    """The triplane UNet's layout, spatial attention at the two lowest resolutions (as VDM), and
    the width (a multiple of 32) whose parameter count is nearest the triplane UNet's."""
    target = count_parameters(pvdm.TriplaneUNet, unet_cfg)
    levels = tuple(range(len(unet_cfg.channel_mult)))[-2:]
    cfg = PixelUNetConfig(channel_mult=unet_cfg.channel_mult, attention_levels=levels,
                          num_res_blocks=unet_cfg.num_res_blocks, heads=unet_cfg.heads)
    params = lambda w: count_parameters(PixelUNet, replace(cfg, base_channels=w))  # noqa: E731
    base = unet_cfg.base_channels
    guess = 32 * round(base * math.sqrt(target / params(base)) / 32)
    width = min((max(32, guess + d) for d in (-32, 0, 32)), key=lambda w: abs(params(w) - target))
    return replace(cfg, base_channels=width)


# ---- 2. Workloads: a training step and a sampling step of each model


@dataclass
class Workload:
    name: str
    make: callable  # config -> nn.Module
    config: object
    inputs: callable  # (batch, device) -> tuple of tensors
    loss: callable  # (model, inputs) -> training loss
    sample: callable  # (model, inputs) -> one sampling evaluation

    def build(self, ckpt):  # ckpt: activation checkpointing
        return self.make(replace(self.config, grad_checkpointing=ckpt))


def random_videos(b, frames, resolution, device):
    return torch.rand(b, 3, frames, resolution, resolution, device=device) * 2 - 1


def half_way(x):
    return torch.full((len(x),), 500, device=x.device)  # the t of a sampling step


def preset_config(preset, resolution):
    return pvdm.AutoencoderConfig(**{**pvdm.AUTOENCODER_PRESETS[preset], "resolution": resolution})


def autoencoder_workload(cfg):
    t, h, w = cfg.latent_size

    def decode(model, x):  # sampling decodes each generated latent once
        b, c, zeros = len(x[0]), cfg.latent_channels, x[0].new_zeros
        return model.decode((zeros(b, c, h, w), zeros(b, c, t, w), zeros(b, c, t, h)))

    return Workload("autoencoder", pvdm.ProjectedAutoencoder, cfg,
                    inputs=lambda b, dev: (random_videos(b, cfg.frames, cfg.resolution, dev),),
                    loss=lambda model, x: model(x[0])[0], sample=decode)


def diffusion_workload(preset, resolution):
    ucfg = pvdm.unet_config_for(preset_config(preset, resolution), preset)

    def inputs(b, dev):
        z0, prev = (torch.rand(b, ucfg.latent_channels, ucfg.num_tokens, device=dev) * 2 - 1
                    for _ in "zp")
        return z0, prev, torch.ones(b, dtype=torch.bool, device=dev)

    def make(c):
        return pvdm.GaussianDiffusion(pvdm.TriplaneUNet(c), pvdm.DiffusionConfig())

    return Workload("triplane UNet", make, ucfg, inputs, loss=lambda model, x: model(*x),
                    sample=lambda model, x: model.model(x[0], half_way(x[0]), x[1], x[2]))


def pixel_workload(preset, resolution, frames=16):
    ucfg = pvdm.unet_config_for(pvdm.AutoencoderConfig(**pvdm.AUTOENCODER_PRESETS[preset]), preset)
    cfg = matched_pixel_config(ucfg)
    return Workload("pixel 3D UNet", lambda c: PixelDiffusion(PixelUNet(c)), cfg,
                    inputs=lambda b, dev: (random_videos(b, frames, resolution, dev),),
                    loss=lambda model, x: model(x[0]),
                    sample=lambda model, x: model.unet(x[0], half_way(x[0])))


def small_workload():
    """An autoencoder that trains on CPU in a moment: the memory estimate's check."""
    return autoencoder_workload(pvdm.AutoencoderConfig(resolution=16, frames=8, patch=4, dim=32,
                                                       depth=1, heads=2, proj_depth=1))


def workloads(preset, resolution):
    return [autoencoder_workload(preset_config(preset, resolution)),
            diffusion_workload(preset, resolution), pixel_workload(preset, resolution)]


# ---- 3. FLOPs (torch.utils.flop_counter on fake tensors)
# 2 FLOPs per multiply-add, as MFU counts. The CPU flash attention kernel (fake tensors are CPU
# tensors) gets the CUDA kernels' formula.

CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v)}


def count_flops(fn):
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def flops_per_clip(work):
    """FLOPs of a training step (forward + backward) and a sampling evaluation, per clip."""
    with FakeTensorMode():
        model, x = work.build(False), work.inputs(1, "cpu")
        train = count_flops(lambda: work.loss(model, x).backward())
        with torch.no_grad():
            model.eval()
            sample = count_flops(lambda: work.sample(model, x))
    return train, sample


# ---- 4. Peak training memory (MemTracker on fake tensors) and the largest batch that fits


@contextlib.contextmanager
def cuda_autocast_policy():
    """CPU autocast (fake tensors are CPU tensors) keeps group_norm and layer_norm in bf16 where
    CUDA's runs them in fp32 (torch.amp docs): upcast their inputs, as CUDA does."""
    saved = F.group_norm, F.layer_norm
    F.group_norm, F.layer_norm = (lambda x, *a, f=f, **k: f(x.float(), *a, **k) for f in saved)
    try:
        yield
    finally:
        F.group_norm, F.layer_norm = saved


def train_step(work, model, opt, x, precision, device_type="cpu"):
    """Forward under autocast, backward, AdamW, gradients freed."""
    with autocast(device_type, precision):
        loss = work.loss(model, x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def new_optimizer(model, foreach=None):
    # foreach (a few big launches, and their temporaries) is AdamW's default on CUDA only
    return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=foreach)


class PeakTracker(MemTracker):
    """The global peak only: per-module peaks make MemTracker several times slower."""

    def _update_peak_stats(self, peak_state):
        for device, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snap["Total"]:
                self._peak_mem[device] = snap["Total"]
                self._peak_mem_snap[device] = dict(snap)


def with_optimizer_state(model):
    """AdamW with its moments allocated (a step on zero gradients), as after the first step."""
    opt = new_optimizer(model, foreach=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def estimate_train_memory(work, batch, precision, ckpt):
    """Peak bytes of one training step, every live tensor counted, on fake tensors."""
    with FakeTensorMode():
        model = work.build(ckpt)
        opt, x = with_optimizer_state(model), work.inputs(batch, "cpu")
        tracker = PeakTracker()
        tracker.track_external(model, opt, *x)
        with tracker, cuda_autocast_policy():  # also where checkpointing re-runs a forward
            train_step(work, model, opt, x, precision)
        return sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())


def usable_bytes(gpu_gb):
    return gpu_gb * GB * (1 - SAFETY_FRACTION) - CUDA_CONTEXT_GB * GB


def largest_batch(memory_at, budget):
    """The largest batch that fits `budget`: the line through batches 1 and 2 guesses, then a
    search up (doubling) or down (bisection)."""
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
    """The real peak of a CPU training step, from torch.profiler's memory events."""
    torch.manual_seed(0)
    model = work.build(False)
    opt, x = with_optimizer_state(model), work.inputs(batch, "cpu")  # foreach, as in the estimate
    state = [v for s in opt.state.values() for v in s.values() if v.dim()]
    resident = sum(t.untyped_storage().nbytes()
                   for t in [*model.parameters(), *model.buffers(), *x, *state])
    with torch.profiler.profile(activities=[CPU], profile_memory=True) as prof:
        train_step(work, model, opt, x, precision)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    return resident + max([0, *itertools.accumulate(nbytes for _, nbytes in events)])


# ---- 5. Time on the device at hand


def seconds_per_call(fn, device, burn_in=1, min_seconds=2.0, max_calls=10):
    """Mean seconds per call of fn after a burn-in, over the calls that fit in min_seconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(burn_in):
        fn()
    sync()
    calls, start = 0, time.perf_counter()
    while calls < max_calls and (calls == 0 or time.perf_counter() - start < min_seconds):
        fn()
        sync()
        calls += 1
    return (time.perf_counter() - start) / calls


def matmul_peak(device):
    """The matrix-product rate: fp32 on CPU (bf16 is far slower there), bf16 on CUDA."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in "ab")
    seconds = seconds_per_call(lambda: a @ b, device, burn_in=2, min_seconds=1.0, max_calls=20)
    return 2 * n**3 / seconds


def time_workload(work, batch, device, precision, peak):
    """Seconds per training step and sampling evaluation, FLOP rates; on CUDA the peak."""
    torch.manual_seed(0)
    model, cuda = work.build(False).to(device), device.type == "cuda"
    opt, x = new_optimizer(model), work.inputs(batch, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step = lambda: train_step(work, model, opt, x, precision, device.type)  # noqa: E731
    t = {"batch": batch, "precision": precision, "train_s": seconds_per_call(step, device)}
    if cuda:
        t["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
        t["estimated_peak_bytes"] = estimate_train_memory(work, batch, precision, False)
    model.eval()
    with torch.no_grad(), autocast(device.type, precision):
        t["sample_s"] = seconds_per_call(lambda: work.sample(model, x), device)
    train, sample = flops_per_clip(work)
    t["train_flops_per_s"] = train * batch / t["train_s"]
    t["sample_flops_per_s"] = sample * batch / t["sample_s"]
    t["train_utilisation"] = t["train_flops_per_s"] / peak
    return t


def print_profile(tiny, batch):
    """torch.profiler's top ops in three training steps of the tiny PVDM models."""
    for work in workloads("tiny", tiny)[:2]:
        model = work.build(False)
        opt, x = new_optimizer(model), work.inputs(batch, "cpu")
        train_step(work, model, opt, x, "fp32")  # burn-in
        with torch.profiler.profile(activities=[CPU]) as prof:
            for _ in range(3):
                train_step(work, model, opt, x, "fp32")
        print(f"\n{work.name} (tiny {tiny}px), {batch} clips, 3 training steps:\n"
              + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def write_bench_videos(folder, count=20, frames=150):
    """UCF-101-like: 320x240 MPEG-4 part 2 .avi, 25 fps, 500 kb/s; shapes on a texture."""
    shapes = data.SyntheticVideos(resolution=160, video_frames=frames)
    texture = np.random.default_rng(0).integers(0, 60, (240, 320, 3))
    for i in range(count):
        video = (shapes.render(i, range(frames))[:, :, 20:140] + 1) * 127.5  # (3, T, 120, 160)
        video = video.permute(1, 2, 3, 0).numpy().repeat(2, 1).repeat(2, 2)  # (T, 240, 320, 3)
        video = (video * 0.75 + texture).astype(np.uint8)
        with av.open(str(folder / f"v_Bench_g{i:02d}_c01.avi"), "w") as container:
            stream = container.add_stream("mpeg4", rate=25, width=320, height=240,
                                          pix_fmt="yuv420p", bit_rate=500_000)
            for frame in video:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())


def clips_per_second(dataset, workers, clips=64, batch=8):
    """Clips per second of a DataLoader after one batch (worker start-up excluded)."""
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=clips + batch,
                                             generator=torch.Generator().manual_seed(0))
    batches = iter(torch.utils.data.DataLoader(dataset, batch, sampler=sampler,
                                               num_workers=workers))
    next(batches)
    start = time.perf_counter()
    for _ in range(clips // batch):
        next(batches)
    return clips / (time.perf_counter() - start)


def bench_data_loading():
    """Clips per second of data.py's datasets, with 0 and 2 DataLoader workers."""
    with tempfile.TemporaryDirectory() as folder:
        data.CACHE_DIR = Path(folder) / "cache"  # no stale probes
        write_bench_videos(Path(folder))
        print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
        for name, kind, size in [("synthetic 32x32x16", "synthetic", 32),
                                 ("synthetic 256x256x16", "synthetic", 256),
                                 ("320x240 .avi -> 256x256x16", "folder", 256)]:
            source = dict(data_dir=folder, split="all") if kind == "folder" else {}
            dataset = data.make_dataset(kind, resolution=size, **source)
            rates = [clips_per_second(dataset, workers) for workers in (0, 2)]
            print(f"{name:28s} {rates[0]:7.1f} clips/s with 0 workers, {rates[1]:7.1f} with 2")


# ---- 6. The benchmark: measure, print one table, write JSON


def estimate(work, budget, every_setting):
    """FLOPs, peak memory at batch 1, and the largest batch (smaller sizes: bf16 + ckpt only)."""
    train, sample = flops_per_clip(work)
    memory = functools.cache(lambda setting, batch: estimate_train_memory(work, batch, *setting))
    searched = SETTINGS if every_setting else [("bf16", True)]
    return {"train_flops": train, "sample_flops": sample,
            "peak_bytes_batch1": {p + "+ckpt" * c: memory((p, c), 1) for p, c in SETTINGS},
            "max_batch": {p + "+ckpt" * c: largest_batch(partial(memory, (p, c)), budget)
                          for p, c in searched}}


def bench(args, out):
    """The models estimated (paper presets; --quick: tiny) and timed (CUDA: paper; CPU: tiny)."""
    device = resolve_device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"  # bf16 is slow on most CPUs
    tiny = pvdm.AUTOENCODER_PRESETS["tiny"]["resolution"]
    big, sizes = ("tiny", [tiny]) if args.quick else ("paper", args.resolutions or [128, 256])
    timed = ("paper", sizes[-1]) if device.type == "cuda" and not args.quick else ("tiny", tiny)
    out |= {"device": str(device), "torch_threads": torch.get_num_threads(),
            "estimated_preset": big, "models": {}}
    for res in sizes:
        for work in workloads(big, res):
            m = out["models"].setdefault(work.name, {"config": asdict(work.config)})
            m["params"] = count_parameters(work.build, False)
            m[res] = estimate(work, out["usable_bytes"], every_setting=res == sizes[-1])
            print(f"estimated {work.name} at {res}x{res}", flush=True)
    check = small_workload()
    out["memory_check_cpu"] = {"estimate": estimate_train_memory(check, 2, "fp32", False),
                               "allocator_peak": measured_cpu_peak(check, 2)}
    out["matmul_peak_flops"] = peak = matmul_peak(device)
    for work in workloads(*timed):
        t = time_workload(work, args.batch, device, precision, peak)
        out["models"][work.name]["timed"] = {"preset": timed[0], "resolution": timed[1], **t}
        print(f"timed {work.name}", flush=True)
    synthetic = data.make_dataset("synthetic", resolution=tiny)
    out["data_clips_per_s"] = clips_per_second(synthetic, workers=0)
    _, unet, pixel = (m[sizes[-1]] for m in out["models"].values())
    out["denoise_flops_ratio"] = pixel["sample_flops"] / unet["sample_flops"]
    print_table(out, sizes, args)
    if args.profile:
        print_profile(tiny, args.batch)


def bench_paper_defaults(args, out):
    """The memory of the training steps the paper preset takes (its batch and checkpointing)."""
    for res in args.resolutions or [pvdm.AUTOENCODER_PRESETS["paper"]["resolution"]]:
        works = autoencoder_workload(preset_config("paper", res)), diffusion_workload("paper", res)
        for stage, work in zip(("train_autoencoder", "train_diffusion"), works):
            recipe = pvdm.PRESETS["paper"][stage]
            batch, ckpt = recipe["batch_size"], recipe["grad_checkpointing"]
            need = estimate_train_memory(work, batch, "bf16", ckpt)
            out.setdefault("paper_defaults", {}).setdefault(stage, {})[res] = need
            print(f"{stage}.py --data ucf101: {work.name} {res}x{res}, batch {batch}, bf16, "
                  f"checkpointing {'on' if ckpt else 'off'}: {need / GB:.2f} GB per step, of "
                  f"{out['usable_bytes'] / GB:.1f} GB usable on {args.gpu_mem:g} GB")


TIMED_ROWS = [("  train ms/step", "{:.0f}", 1e-3, "timed", "train_s"),
              ("  sample ms/eval", "{:.0f}", 1e-3, "timed", "sample_s"),
              ("  train GFLOP/s", "{:.1f}", 1e9, "timed", "train_flops_per_s"),
              ("  train utilisation", "{:.1%}", 1, "timed", "train_utilisation"),
              ("  CUDA peak GB, measured", "{:.2f}", GB, "timed", "cuda_max_memory_allocated"),
              ("  CUDA peak GB, estimated", "{:.2f}", GB, "timed", "estimated_peak_bytes")]


def print_table(out, sizes, args):
    """A row per figure: label, format, divisor, keys into a model's figures."""
    models = out["models"]
    first = next(iter(models.values()))
    t = first["timed"]
    rows = [("parameters (M)", "{:.1f}", 1e6, "params")]
    for r in sizes:
        rows += [(f"{r}px train GFLOP/clip", "{:,.0f}", 1e9, r, "train_flops"),
                 (f"{r}px sample GFLOP/clip", "{:,.1f}", 1e9, r, "sample_flops")]
        rows += [(f"{r}px peak GB, b=1, {s}", "{:.2f}", GB, r, "peak_bytes_batch1", s)
                 for s in first[r]["peak_bytes_batch1"]]
        rows += [(f"{r}px max batch, {s}", "{:.0f}", 1, r, "max_batch", s)
                 for s in first[r]["max_batch"]]
    rows.append((f"timed: {t['preset']} {t['resolution']}px b={args.batch}", "", 1, "params"))
    rows += [row for row in TIMED_ROWS if row[-1] in t]
    width = max(len(row[0]) for row in rows)
    print(f"\n{'':{width}}" + "".join(f"{name:>17}" for name in models))
    for label, fmt, scale, *keys in rows:
        cells = (fmt.format(functools.reduce(dict.get, keys, m) / scale) for m in models.values())
        print(f"{label:{width}}" + "".join(f"{cell:>17}" for cell in cells))
    check = out["memory_check_cpu"]
    print(f"\nmatmul peak ({out['device']}, {out['torch_threads']} threads): "
          f"{out['matmul_peak_flops'] / 1e9:.1f} GFLOP/s\n"
          f"max batch: the largest that fits {args.gpu_mem:g} GB less {SAFETY_FRACTION:.0%} and "
          f"{CUDA_CONTEXT_GB:g} GB for CUDA ({out['usable_bytes'] / GB:.1f} GB usable)\n"
          "memory estimate / CPU allocator's peak, small autoencoder: "
          f"{check['estimate'] / check['allocator_peak']:.4f}\n"
          f"denoise FLOPs ratio (pixel / triplane, {sizes[-1]}px): "
          f"{out['denoise_flops_ratio']:.0f}x\n"
          f"synthetic data: {out['data_clips_per_s']:.0f} clips/s in one process")


def resolutions(text):
    """An argparse type: comma-separated sizes the paper presets can be built at."""
    sizes = [positive_int(r) for r in text.split(",")]
    for r in sizes:
        try:
            pvdm.unet_config_for(preset_config("paper", r), "paper")
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"the paper presets do not fit {r}x{r} "
                                             f"({str(e).split(';')[0]}); pass multiples of 64")
    return sizes


# the flags each mode reads (it refuses the others)
MODE_FLAGS = {"data_loading": {"threads"}, "paper_defaults": {"gpu_mem", "json", "resolutions"},
              "quick": {"gpu_mem", "device", "batch", "threads", "profile", "json"}}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-mem", type=float_in(0, math.inf, open_low=True, open_high=True),
                   default=24, help="GPU GB for the largest batches")
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N, for the timings")
    p.add_argument("--batch", type=positive_int, default=4, help="batch of the timed steps")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's)")
    p.add_argument("--resolutions", type=resolutions, help="sizes estimated (default 128,256)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    for mode in ("--quick", "--profile", "--data-loading", "--paper-defaults"):  # see above
        p.add_argument(mode, action="store_true")
    args = p.parse_args(argv)
    given = {k for k, v in vars(args).items() if v != p.get_default(k)}
    for mode, reads in MODE_FLAGS.items():
        unread = sorted(given - reads - {mode})
        if mode in given and unread:
            p.error(f"--{mode} does not use --{unread[0]}; drop one of them.".replace("_", "-"))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:  # fewer threads than cores can be faster on a shared CPU
        torch.set_num_threads(args.threads)
    if args.data_loading:
        return bench_data_loading()
    out = {"gpu_mem_gb": args.gpu_mem, "usable_bytes": usable_bytes(args.gpu_mem)}
    (bench_paper_defaults if args.paper_defaults else bench)(args, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    run_cleanly(main)
