"""
Sample videos of any length from a trained PVDM: clip 1 unconditionally, then each clip conditioned on
the latent of the clip before it (paper section 3.3), decoded and appended to the file as it comes.

    python sample.py --frames 128                        # after the quick start: samples/video_0000.mp4, ...
    python sample.py --frames 128 --save-latents         # also the three latent planes of every clip, as images
    python sample.py --num-videos 2048 --steps 400 --eta 1 --out samples/ucf   # the paper's sampler, for FVD

The video writers live here too (open_video_writer, write_video, save_frame_strip, save_latent_images):
the training scripts import them for their previews.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import av
import numpy as np
import torch
from PIL import Image

import pvdm

# ----------------------------------------------------------------------------------------------
# Writing videos and images (also used by the training scripts for their previews)
# ----------------------------------------------------------------------------------------------


def to_uint8(video):
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 numpy frames, the layout video files and PNGs want."""
    frames = ((video.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return frames.permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)


class VideoWriter:
    """Append frames to an mp4 or a gif as they come (PyAV); close() finishes the file.
    mp4: H.264 in yuv420p, the format every player reads. yuv420p stores colour at half resolution, so
    frame sides must be even: an odd side is padded by repeating its last row or column.
    gif: FFmpeg's encoder, which keeps every frame (Pillow's merges identical neighbours, changing the
    frame count), with a 256-colour palette per frame chosen by Pillow."""

    def __init__(self, path, fps):
        self.gif = path.lower().endswith(".gif")
        self.container = av.open(path, mode="w")
        self.stream = self.container.add_stream("gif" if self.gif else "libx264", rate=fps)
        self.stream.pix_fmt = "pal8" if self.gif else "yuv420p"
        if not self.gif:  # near lossless, so metrics read from these files see the model, not the codec
            self.stream.options = {"crf": "12"}
        self.count = 0

    def append(self, frames):
        """frames: (T, H, W, 3) uint8."""
        if not self.gif:
            odd_h, odd_w = frames.shape[1] % 2, frames.shape[2] % 2
            frames = np.pad(frames, ((0, 0), (0, odd_h), (0, odd_w), (0, 0)), mode="edge")  # (T, even H, even W, 3)
        if self.count == 0:
            self.stream.height, self.stream.width = frames.shape[1:3]
        for frame in np.ascontiguousarray(frames):
            frame = palette_frame(frame) if self.gif else yuv_frame(frame)
            frame.pts = self.count
            self.mux(self.stream.encode(frame))
            self.count += 1

    def mux(self, packets):
        for packet in packets:
            self.container.mux(packet)

    def close(self):
        if self.count:
            self.mux(self.stream.encode())  # flush the frames the encoder still holds
        self.container.close()


def yuv_frame(frame):
    """(H, W, 3) uint8 -> a PyAV yuv420p frame. Converted here rather than inside encode(): with PyAV's implicit
    conversion the same frames gave slightly different files about half the time, converted here rarely.
    H.264 files are still not guaranteed bit-exact, so compare decoded videos with a small tolerance."""
    return av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")


def palette_frame(frame):
    """(H, W, 3) uint8 -> a PyAV pal8 frame: Pillow picks the 256 colours, PyAV wants them as opaque ARGB."""
    image = Image.fromarray(frame).quantize(256)  # palette indices (H, W)
    rgb = np.array(image.getpalette(), np.uint8).reshape(-1, 3)  # (colours, 3)
    palette = np.zeros((256, 4), np.uint8)
    palette[:, 0], palette[: len(rgb), 1:] = 255, rgb
    return av.VideoFrame.from_ndarray((np.array(image), palette), format="pal8")


def open_video_writer(path, fps=8):
    """A writer for path (.mp4 or .gif) with append(frames (T, H, W, 3) uint8) and close(), so a long video
    goes to disk clip by clip and memory does not grow with its length."""
    if not path.lower().endswith((".mp4", ".gif")):
        raise ValueError(f"cannot write {path}: only .mp4 and .gif videos are supported.")
    return VideoWriter(path, fps)


def write_video(path, video, fps=8):
    """Write a whole video (3, T, H, W) in [-1, 1] in one go; a batch (B, 3, T, H, W) is stacked top to
    bottom into one video, so a preview shows several samples at once."""
    if video.dim() == 5:
        video = torch.cat(list(video), dim=2)  # (3, T, B*H, W)
    with contextlib.closing(open_video_writer(path, fps)) as writer:
        writer.append(to_uint8(video))


def upscale(image, scale):
    """Nearest-neighbour upscaling of an (H, W, ...) array: tiny frames and latent planes stay crisp."""
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


def tile(rows, gap, background):
    """A grid of equally sized (H, W, ...) images, rows may be short; `gap` pixels between cells."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(row) for row in rows)
    grid = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, *rows[0][0].shape[2:]), background, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[i * (h + gap): i * (h + gap) + h, j * (w + gap): j * (w + gap) + w] = image
    return grid


def save_frame_strip(path, rows, scale=None):
    """A PNG contact sheet: one row per video (or clip) (3, T, H, W) in [-1, 1], its T frames left to right,
    upscaled (nearest) to about 96 pixels so 32x32 frames can be seen. Rows may differ in length."""
    frames = [to_uint8(video) for video in rows]  # (T, H, W, 3) each
    scale = scale or max(1, 96 // frames[0].shape[1])
    Image.fromarray(tile([[upscale(f, scale) for f in video] for video in frames], gap=2, background=255)).save(path)


def save_latent_images(prefix, planes, scale=None):
    """The three latent planes of one clip as PNGs, one grayscale tile per channel, left to right:
    prefix_zs.png (h x w, what stays), prefix_zh.png (t x w) and prefix_zw.png (t x h), the motion seen from
    above and from the side. Values map linearly from the tanh range [-1, 1] to black..white, without
    per-image stretching, so planes and clips can be compared. One scale for all three keeps their sizes honest."""
    scale = scale or max(1, 128 // max(max(p.shape[1:]) for p in planes))
    for name, plane in zip(("zs", "zh", "zw"), planes):
        channels = ((plane.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        gray = [upscale(c, scale)[..., None].repeat(3, axis=2) for c in channels]  # (a*scale, b*scale, 3) each
        image = tile([gray], gap=max(1, scale // 2), background=(200, 40, 40))  # red gaps: no latent value
        Image.fromarray(image).save(f"{prefix}_{name}.png")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample long videos from a trained PVDM, clip by clip.")
    p.add_argument("--diffusion", default="runs/diffusion/diffusion.pt", help="stage-2 checkpoint")
    p.add_argument("--autoencoder", help="stage-1 checkpoint (default: the one recorded in --diffusion)")
    p.add_argument("--frames", type=int, help="frames per video, any number (default: one clip)")
    p.add_argument("--num-videos", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="videos sampled together")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim",
                   help="ddim: --steps steps with noise --eta; ddpm: all T steps with eta 1 (slow)")
    p.add_argument("--steps", type=int, help="DDIM steps (default 50; the paper: 400)")
    p.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic, 1 DDPM-like (default 1, as in the paper)")
    p.add_argument("--cfg", type=float, default=0.0,
                   help="classifier-free guidance weight w on the previous clip (clips 2 onward)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples", help="folder for the videos, contact sheets and samples.json")
    p.add_argument("--format", nargs="+", choices=["mp4", "gif"], default=["mp4"], help="one or both")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--no-ema", action="store_true", help="sample the raw weights instead of their EMA")
    p.add_argument("--save-latents", action="store_true", help="also write each clip's three latent planes as PNGs")
    args = p.parse_args(argv)
    for flag in ("frames", "num_videos", "batch_size", "steps", "fps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be a positive number (got {value}).")
    if args.sampler == "ddpm" and (args.steps is not None or args.eta is not None):
        p.error("--sampler ddpm always runs all T steps with eta 1; drop --steps/--eta or use --sampler ddim.")
    if args.eta is not None and args.eta < 0:
        p.error(f"--eta must be at least 0 (got {args.eta}).")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} asked for, but this torch sees no CUDA GPU; use --device cpu.")
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def load_models(args, device):
    """The diffusion checkpoint (EMA weights unless --no-ema) and the autoencoder it was trained with,
    refusing a pair that does not belong together: its latents would be noise to the UNet."""
    ckpt = pvdm.load_checkpoint(args.diffusion, "diffusion")
    args.autoencoder = args.autoencoder or ckpt["autoencoder"]["path"]
    if not os.path.isfile(args.autoencoder):
        raise SystemExit(f"error: no autoencoder at {args.autoencoder} (the one {args.diffusion} was trained "
                         "with); pass its path with --autoencoder.")
    autoencoder = pvdm.load_autoencoder(args.autoencoder, device)
    ucfg = pvdm.UNetConfig(**ckpt["unet_config"])
    ae_shape = (autoencoder.cfg.latent_channels, *autoencoder.cfg.latent_size)
    if ae_shape != (ucfg.latent_channels, ucfg.frames, ucfg.size, ucfg.size):
        raise SystemExit(f"error: {args.autoencoder} makes latents of shape (C, t, h, w) = {ae_shape}, but "
                         f"{args.diffusion} denoises {(ucfg.latent_channels, ucfg.frames, ucfg.size, ucfg.size)}; "
                         "pass the autoencoder the diffusion model was trained with.")
    if pvdm.fingerprint(autoencoder) != ckpt["autoencoder"]["fingerprint"]:
        raise SystemExit(f"error: {args.diffusion} was trained with a different autoencoder than {args.autoencoder} "
                         "(weights fingerprint differs); pass the one it was trained with.")
    unet = pvdm.TriplaneUNet(ucfg)
    unet.load_state_dict(ckpt["model" if args.no_ema else "ema"])
    diffusion = pvdm.GaussianDiffusion(unet, pvdm.DiffusionConfig(**ckpt["diffusion_config"]))
    return autoencoder, diffusion.to(device).eval(), ckpt["step"]


def sampler_settings(args, timesteps):
    """(steps, eta) for diffusion.sample: DDPM is the DDIM update with every step and eta = 1."""
    if args.sampler == "ddpm":
        return timesteps, 1.0
    steps = args.steps or 50
    if steps > timesteps:
        raise SystemExit(f"error: --steps {steps} exceeds the model's {timesteps} diffusion steps; use at most that.")
    return steps, 1.0 if args.eta is None else args.eta


def batch_generator(seed, index, device):
    """Each batch gets its own generator, seeded from (seed, batch index): the same flags give the same
    videos, and no two (seed, batch) pairs share noise, as seed + index would."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


def autocast(device, precision):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def fmt_time(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


class Progress:
    """One status line on stderr, rewritten at each denoising step: where we are, time spent, time left."""

    def __init__(self, total_steps, n_clips):
        self.total, self.n_clips, self.done, self.start = total_steps, n_clips, 0, time.time()
        self.videos, self.clip = "", 0

    def new_batch(self, videos):
        self.videos, self.clip = videos, 0

    def step(self, i, steps):
        """The sampler's callback after step i of `steps`."""
        self.done += 1
        if i == 1:  # the sampler has started the next clip
            self.clip += 1
        elapsed = time.time() - self.start
        left = elapsed / self.done * (self.total - self.done)
        sys.stderr.write(f"\r{self.videos} | clip {self.clip}/{self.n_clips} | step {i}/{steps} | "
                         f"{fmt_time(elapsed)} elapsed, ~{fmt_time(left)} left ")
        sys.stderr.flush()


class Continuity:
    """How much consecutive frames differ (mean absolute difference, grey levels 0-255), kept apart for pairs
    inside a clip and pairs across a clip boundary. A model that continues its previous clip makes the two
    alike; one that starts each clip afresh jumps at every boundary."""

    def __init__(self):
        self.sums = {"within": 0.0, "across": 0.0}
        self.counts = {"within": 0, "across": 0}
        self.last = {}  # video name -> its latest frame, until forget()

    def add(self, video, frames):
        """frames (<=T, H, W, 3) uint8: the next clip of the video named `video`."""
        frames = frames.astype(np.float64)
        diffs = {"within": np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))}  # (<=T - 1,)
        if video in self.last:
            diffs["across"] = np.abs(frames[0] - self.last[video]).mean(keepdims=True)
        self.last[video] = frames[-1].astype(np.uint8)
        for key, d in diffs.items():
            self.sums[key] += d.sum()
            self.counts[key] += d.size

    def forget(self, videos):
        """Drop the last frames of finished videos, so memory does not grow with --num-videos."""
        for video in videos:
            self.last.pop(video, None)

    def means(self):
        """{"within": mean change inside clips, "across": mean change at clip boundaries}, None where unseen."""
        return {k: self.sums[k] / self.counts[k] if self.counts[k] else None for k in self.sums}


def check_out_dir(out, names, formats):
    """Refuse a folder holding videos of another run: evaluate.py would mix them into the statistics."""
    ours = {f"{name}.{fmt}" for name in names for fmt in formats}
    stale = sorted(f for f in os.listdir(out) if f.endswith((".mp4", ".gif")) and f not in ours)
    if stale:
        raise SystemExit(f"error: {out} already holds {len(stale)} other video(s) such as {stale[0]}; "
                         "pick an empty --out or remove them.")


def sample_batch(args, autoencoder, diffusion, names, generator, progress, continuity, **sample_kwargs):
    """Generate one batch of videos clip by clip, appending each decoded clip to its files at once."""
    clip_len = autoencoder.cfg.frames
    sheets = [[] for _ in names]  # a few frames per clip for each contact sheet: memory grows by 4 frames a clip
    with contextlib.ExitStack() as files:  # closes every file, also when sampling fails half-way
        writers = [[files.enter_context(contextlib.closing(open_video_writer(path, args.fps)))
                    for path in (os.path.join(args.out, f"{name}.{fmt}") for fmt in args.format)]
                   for name in names]  # writers[i]: the files of video i
        clips = pvdm.generate_video(autoencoder, diffusion, args.frames, n=len(names), generator=generator,
                                    progress=progress.step, **sample_kwargs)
        for k, (video, z) in enumerate(clips):  # video (n, 3, <=T, H, W), z (n, C, N)
            planes = pvdm.unpack(z, *autoencoder.cfg.latent_size)
            for i, name in enumerate(names):
                frames = to_uint8(video[i])  # (<=T, H, W, 3)
                for writer in writers[i]:
                    writer.append(frames)
                continuity.add(name, frames)
                sheets[i].append(video[i, :, :: max(1, clip_len // 4)].float().cpu())  # (3, <=4, H, W)
                if args.save_latents:
                    save_latent_images(os.path.join(args.out, "latents", f"{name}_clip{k:02d}"),
                                       [p[i] for p in planes])
    continuity.forget(names)
    for name, rows in zip(names, sheets):
        save_frame_strip(os.path.join(args.out, f"{name}.png"), rows)  # one row per clip


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    autoencoder, diffusion, train_step = load_models(args, device)
    steps, eta = sampler_settings(args, diffusion.cfg.timesteps)
    clip_len = autoencoder.cfg.frames
    args.frames = args.frames or clip_len
    n_clips = math.ceil(args.frames / clip_len)
    names = [f"video_{i:04d}" for i in range(args.num_videos)]
    os.makedirs(os.path.join(args.out, "latents") if args.save_latents else args.out, exist_ok=True)
    check_out_dir(args.out, names, args.format)
    print(f"sampling {args.num_videos} video(s) of {args.frames} frames ({n_clips} clip(s) of {clip_len}) with "
          f"{args.sampler} {steps} steps, eta {eta}, cfg {args.cfg}, {'raw' if args.no_ema else 'EMA'} weights "
          f"of step {train_step}, on {device} in {args.precision}", file=sys.stderr)

    # batch by batch; each batch has its own seeded generator so the result does not depend on timing
    batches = [names[i:i + args.batch_size] for i in range(0, len(names), args.batch_size)]
    progress, continuity = Progress(len(batches) * n_clips * steps, n_clips), Continuity()
    with autocast(device, args.precision):
        for b, batch in enumerate(batches):
            progress.new_batch(f"videos {b * args.batch_size + 1}-{b * args.batch_size + len(batch)} of {len(names)}")
            sample_batch(args, autoencoder, diffusion, batch, batch_generator(args.seed, b, device), progress,
                         continuity, steps=steps, eta=eta, guidance=args.cfg)
    elapsed = time.time() - progress.start
    print(f"\nwrote {len(names)} video(s) of {args.frames} frames at {autoencoder.cfg.resolution}x"
          f"{autoencoder.cfg.resolution} to {args.out}/ in {fmt_time(elapsed)} "
          f"({elapsed / (len(names) * n_clips):.2f} s per clip per video)", file=sys.stderr)
    change = continuity.means()
    if change["across"] is not None:
        print(f"frame-to-frame change: {change['within']:.1f} grey levels inside clips, {change['across']:.1f} "
              "across clip boundaries (alike when each clip continues the one before)", file=sys.stderr)

    # how these videos were made: evaluate.py prints it with every FVD
    info = {"sampler": args.sampler, "steps": steps, "eta": eta, "cfg": args.cfg, "ema": not args.no_ema,
            "frames": args.frames, "resolution": autoencoder.cfg.resolution, "num_videos": args.num_videos,
            "seed": args.seed, "diffusion": args.diffusion, "autoencoder": args.autoencoder,
            "diffusion_step": train_step, "batch_size": args.batch_size, "precision": args.precision,
            "device": str(device), "fps": args.fps,
            "frame_change": {k: None if v is None else round(v, 2) for k, v in change.items()}}
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
