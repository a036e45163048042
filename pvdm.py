"""
PVDM: video diffusion in a projected latent space.
Yu, Sohn, Kim and Shin, CVPR 2023, arXiv 2302.07685.

Read it top to bottom: it is built bottom-up, and no name is used above its definition.
  1. helpers           sinusoidal embeddings, packing planes, weight averaging
  2. attention blocks  the transformer pieces of the autoencoder
  3. autoencoder       video -> three 2D planes (z_s, z_h, z_w) -> video      (paper section 3.1)
  4. UNet blocks       ResBlock, 2D attention, cross-plane attention
  5. triplane UNet     one 2D UNet shared by the three planes                 (paper section 3.2)
  6. diffusion         joint (un)conditional DDPM/DDIM: Algorithms 1 and 2    (section 3.3)
  7. long videos       clip after clip, each conditioned on the one before    (section 3.3)
  8. discriminators    3D and 2D PatchGANs for the autoencoder's adversarial phase
  9. configs           dataclasses, and the presets table of tiny, shipped and paper
 10. measuring         PSNR, naive codes to judge an autoencoder against, weight fingerprints

One layout convention everywhere: a video is (B, C, T, H, W) with values in [-1, 1]. In the
autoencoder, tokens are channels-last (B, T, h, w, D) with h = H / p, w = W / p: frames are patched
in space only, so every frame count is T. A clip's latent is three planes of C channels:
    z_s (B, C, h, w)   time collapsed: what stays (content)
    z_h (B, C, T, w)   height collapsed: motion seen from above
    z_w (B, C, T, h)   width collapsed: motion seen from the side
For diffusion the three planes are flattened and packed into one tensor (B, C, h*w + T*w + T*h).
The letter t is the diffusion timestep alone.
"""
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

# ------------------------------------------------------------------------------
# 1. Helpers
# ------------------------------------------------------------------------------


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding, as in Transformers, of timesteps t (B,), fractional too -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (B, dim)


def pack(planes):
    """(z_s, z_h, z_w) -> (B, C, h*w + T*w + T*h): one array for the diffusion maths."""
    return torch.cat([p.flatten(2) for p in planes], dim=2)


def unpack(z, T, h, w):
    """Inverse of pack: (B, C, N) -> z_s (B, C, h, w), z_h (B, C, T, w), z_w (B, C, T, h)."""
    z_s, z_h, z_w = z.split([h * w, T * w, T * h], dim=2)
    return z_s.unflatten(2, (h, w)), z_h.unflatten(2, (T, w)), z_w.unflatten(2, (T, h))


@torch.no_grad()
def update_ema(ema, model, decay, step):
    """ema <- decay * ema + (1 - decay) * model, with the usual warm-up so early steps count."""
    decay = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


# ------------------------------------------------------------------------------
# 2. Attention blocks (autoencoder)
# ------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention on (N, L, D) through scaled_dot_product_attention, which uses
    flash / memory-efficient kernels on GPU (memory linear in L)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "n l (three h d) -> three n h l d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, D/heads)
        return self.proj(rearrange(out, "n h l d -> n l (h d)"))  # (N, L, D)


def mlp(dim, ratio=4):
    return nn.Sequential(
        nn.Linear(dim, ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(ratio * dim, dim))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block on (N, L, D)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SpaceTimeBlock(nn.Module):
    """Divided space-time attention (TimeSformer): each token attends along time, then over the
    h x w grid of its frame, then goes through the MLP. Cost O(T^2 + (hw)^2), not O((Thw)^2)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm_t, self.attn_t = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm_s, self.attn_s = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm_m, self.mlp = nn.LayerNorm(dim), mlp(dim)

    def forward(self, x):
        b, h = x.shape[0], x.shape[2]  # x (B, T, h, w, D)
        xt = rearrange(x, "b t h w d -> (b h w) t d")  # sequences along time
        xt = xt + self.attn_t(self.norm_t(xt))
        xs = rearrange(xt, "(b h w) t d -> (b t) (h w) d", b=b, h=h)  # sequences over one frame
        xs = xs + self.attn_s(self.norm_s(xs))
        xs = xs + self.mlp(self.norm_m(xs))
        return rearrange(xs, "(b t) (h w) d -> b t h w d", b=b, h=h)  # (B, T, h, w, D)


def run_blocks(blocks, x, use_checkpoint):
    """Apply blocks in turn; activation checkpointing keeps only each block's input for backward."""
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
    return x


# ------------------------------------------------------------------------------
# 3. Projected autoencoder (paper section 3.1)
# ------------------------------------------------------------------------------

# plane: (collapsed axis, tokens (B, T, h, w, D) -> sequences, summaries -> plane). The collapsed
# axis becomes a sequence that a small transformer summarises; the other two stay as a 2D grid.
PROJECTIONS = {
    "s": ("t", "b t h w d -> (b h w) t d", "(b h w) d -> b d h w"),  # -> (B, D, h, w)
    "h": ("h", "b t h w d -> (b t w) h d", "(b t w) d -> b d t w"),  # -> (B, D, T, w)
    "w": ("w", "b t h w d -> (b t h) w d", "(b t h) d -> b d t h"),  # -> (B, D, T, h)
}


class AxisProjection(nn.Module):
    """Summarise L tokens into one: a learned summary token is prepended, attends over them, and
    its output is read. (The original PVDM code appends it, yet reads position 0.)"""

    def __init__(self, dim, heads, depth, length):
        super().__init__()
        self.summary = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, length + 1, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, use_checkpoint=False):
        summary = self.summary.expand(x.shape[0], -1, -1)  # (N, 1, D)
        x = torch.cat([summary, x], dim=1) + self.pos  # (N, 1 + L, D)
        x = run_blocks(self.blocks, x, use_checkpoint)
        return self.norm(x[:, 0])  # (N, D): the summary token's output


def broadcast_sum(s, hp, wp):
    """Planes back to a volume: v[f, y, x] = s[y, x] + hp[f, x] + wp[f, y] for frame f.
    s (B, D, h, w), hp (B, D, T, w), wp (B, D, T, h) -> (B, D, T, h, w)."""
    return s[:, :, None, :, :] + hp[:, :, :, None, :] + wp[:, :, :, :, None]


class ProjectedAutoencoder(nn.Module):
    """Encoder: per-frame patches -> space-time transformer -> three axis projections -> 1x1 conv
    to C channels -> tanh. Decoder: 1x1 conv back to D -> broadcast-sum of the planes into a
    (T, h, w) volume -> space-time transformer -> per-frame un-patchify to pixels."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        T, h, w = cfg.latent_size
        d, p = cfg.dim, cfg.patch
        self.patch_embed = nn.Conv2d(cfg.channels, d, kernel_size=p, stride=p)
        self.enc_pos_t = nn.Parameter(torch.zeros(T, 1, 1, d))
        self.enc_pos_s = nn.Parameter(torch.zeros(h, w, d))
        self.encoder = nn.ModuleList(SpaceTimeBlock(d, cfg.heads) for _ in range(cfg.depth))
        self.enc_norm = nn.LayerNorm(d)
        C, axis_len = cfg.latent_channels, {"t": T, "h": h, "w": w}
        self.project = nn.ModuleDict(
            {k: AxisProjection(d, cfg.heads, cfg.proj_depth, axis_len[axis])
             for k, (axis, _, _) in PROJECTIONS.items()})
        self.to_latent = nn.ModuleDict({k: nn.Conv2d(d, C, 1) for k in PROJECTIONS})
        self.from_latent = nn.ModuleDict({k: nn.Conv2d(C, d, 1) for k in PROJECTIONS})
        self.dec_pos_t = nn.Parameter(torch.zeros(T, 1, 1, d))
        self.dec_pos_s = nn.Parameter(torch.zeros(h, w, d))
        self.decoder = nn.ModuleList(SpaceTimeBlock(d, cfg.heads) for _ in range(cfg.depth))
        self.dec_norm = nn.LayerNorm(d)
        # Un-patchify: each token to a p x p patch (the paper's, each patch drawn on its own), and
        # with cfg.pixel_head = k > 0 to k features per pixel that two 3x3 convolutions turn into
        # a correction, so an outline can cross a patch border.
        self.to_pixels = nn.Linear(d, p * p * (cfg.channels + cfg.pixel_head))
        self.pixel_head = nn.Sequential(
            nn.Conv2d(cfg.pixel_head, cfg.pixel_head, 3, padding=1), nn.GELU(),
            nn.Conv2d(cfg.pixel_head, cfg.channels, 3, padding=1)) if cfg.pixel_head else None
        self.initialize_weights()

    def initialize_weights(self):
        """All special initialisations in one place."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for name, param in self.named_parameters():
            if "pos" in name or "summary" in name:
                nn.init.normal_(param, std=0.02)
        if self.pixel_head is not None:
            # a zero correction: training starts from the paper's decoder
            nn.init.zeros_(self.pixel_head[-1].weight)
            nn.init.zeros_(self.pixel_head[-1].bias)

    def encode(self, x):
        """(B, 3, T, H, W) -> z_s (B, C, h, w), z_h (B, C, T, w), z_w (B, C, T, h), in [-1, 1]."""
        b = x.shape[0]
        tokens = self.patch_embed(rearrange(x, "b c t y x -> (b t) c y x"))  # (B*T, D, h, w)
        tokens = rearrange(tokens, "(b t) d h w -> b t h w d", b=b)  # (B, T, h, w, D)
        tokens = tokens + self.enc_pos_t + self.enc_pos_s
        tokens = self.enc_norm(run_blocks(self.encoder, tokens, self.use_checkpoint))
        return tuple(self.project_plane(tokens, k) for k in PROJECTIONS)

    def project_plane(self, tokens, key):
        """Collapse one axis of the token volume into a C-channel plane in [-1, 1]."""
        collapsed, to_seq, to_plane = PROJECTIONS[key]
        # the kept axes' sizes, named as in the einops patterns
        kept = {axis: n for axis, n in zip("thw", tokens.shape[1:4]) if axis != collapsed}
        seq = rearrange(tokens, to_seq)  # (B * a * b, L, D), L the collapsed axis
        summaries = self.project[key](seq, self.use_checkpoint)  # (B * a * b, D)
        plane = rearrange(summaries, to_plane, **kept)  # (B, D, a, b)
        # tanh bounds the latent: no KL term is needed, and the sampler can clip z_0
        return torch.tanh(self.to_latent[key](plane))  # (B, C, a, b)

    def decode(self, planes):
        """Three planes -> video (B, 3, T, H, W), clamped to [-1, 1]."""
        return self.decode_unclamped(planes).clamp(-1, 1)

    def decode_unclamped(self, planes):
        cfg, p = self.cfg, self.cfg.patch
        planes = [self.from_latent[k](z) for k, z in zip(PROJECTIONS, planes)]  # (B, D, ., .) each
        volume = broadcast_sum(*planes)  # (B, D, T, h, w)
        tokens = rearrange(volume, "b d t h w -> b t h w d")  # (B, T, h, w, D)
        tokens = tokens + self.dec_pos_t + self.dec_pos_s
        tokens = self.dec_norm(run_blocks(self.decoder, tokens, self.use_checkpoint))
        pixels = self.to_pixels(tokens)  # (B, T, h, w, p*p*(3 + k)): a patch per token
        # each patch to its place: (B, 3 + k, T, H, W)
        video = rearrange(pixels, "b t h w (p q c) -> b c t (h p) (w q)", p=p, q=p)
        if self.pixel_head is None:
            return video
        rgb, features = video.split([cfg.channels, cfg.pixel_head], dim=1)  # (B, 3 | k, T, H, W)
        frames = rearrange(features, "b c t y x -> (b t) c y x")  # (B*T, k, H, W)
        correction = self.pixel_head(frames)  # (B*T, 3, H, W)
        return rgb + rearrange(correction, "(b t) c y x -> b c t y x", t=tokens.shape[1])

    @property
    def use_checkpoint(self):
        return self.cfg.grad_checkpointing and self.training

    def forward(self, x):
        """(loss, x_hat): weighted L1 (the paper's) and L2, which pulls a model out of the
        'background only' solution L1 can stick in on sparse moving content. latent_noise makes the
        encoder keep codes further apart than the noise and the decoder read inexact planes."""
        planes = self.encode(x)
        if self.training and self.cfg.latent_noise > 0:
            planes = [z + self.cfg.latent_noise * torch.randn_like(z) for z in planes]
        x_hat = self.decode_unclamped(planes)
        error = x_hat - x
        loss = self.cfg.l1_weight * error.abs().mean() + self.cfg.l2_weight * error.pow(2).mean()
        if self.cfg.gradient_weight:
            # L2 on differences of neighbouring pixels (H and W): edges and corners
            edges = sum((x_hat.diff(dim=d) - x.diff(dim=d)).pow(2).mean() for d in (3, 4))
            loss = loss + self.cfg.gradient_weight * edges
        return loss, x_hat


# ------------------------------------------------------------------------------
# 4. UNet blocks
# ------------------------------------------------------------------------------


def norm(channels):
    # up to 32 groups, and a count that divides the channels (a skip concat of 96 + 48 gets 16)
    return nn.GroupNorm(math.gcd(min(32, channels // 4), channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the timestep embedding scales and shifts the second norm."""

    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_norm = norm(cout)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)  # (B, cout, a, b)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # (B, cout, 1, 1) each
        h = self.out_layers(self.out_norm(h) * (1 + scale) + shift)
        return self.skip(x) + h


class TokenAttention(nn.Module):
    """Residual self-attention over (B, C, L) tokens, GroupNorm first. Attention runs channels-last:
    the fused kernels need each head's features contiguous."""

    def __init__(self, channels, heads):
        super().__init__()
        self.norm, self.attn = norm(channels), Attention(channels, heads)

    def forward(self, x, pos=None):
        """x (B, C, L); pos (1, C, L), an optional position embedding added after the norm."""
        tokens = self.norm(x) if pos is None else self.norm(x) + pos
        return x + self.attn(tokens.transpose(1, 2)).transpose(1, 2)  # (B, C, L), (B, L, C) inside


class Attention2d(TokenAttention):
    """Self-attention over the positions of one plane."""

    def forward(self, x):
        return super().forward(x.flatten(2)).view_as(x)  # (B, C, a*b) -> (B, C, a, b)


class CrossPlaneAttention(TokenAttention):
    """The only place the planes exchange information: their tokens are packed, attended over
    jointly, and unpacked. Planes keeping an axis (T, h or w) share its learned embedding: tokens
    of z_s and z_h in column x carry the same w-embedding, so attention can line up where the
    planes describe the same pixels."""

    def __init__(self, channels, heads, T, h, w):
        super().__init__(channels, heads)
        self.pos_t, self.pos_h, self.pos_w = (
            nn.Parameter(0.02 * torch.randn(channels, n)) for n in (T, h, w))

    def forward(self, planes):
        # a plane's embedding (1, C, a, b): the sum of its two axes' embeddings
        grid = lambda rows, cols: (rows[:, :, None] + cols[:, None, :])[None]  # noqa: E731
        pos = pack([grid(self.pos_h, self.pos_w), grid(self.pos_t, self.pos_w),
                    grid(self.pos_t, self.pos_h)])  # (1, C, N)
        out = super().forward(pack(planes), pos)  # (B, C, N)
        return unpack(out, self.pos_t.shape[1], *planes[0].shape[2:])


def shared_weights(fn, planes, emb):
    """fn(plane, emb) for every plane; planes of one shape (z_h, z_w) go in one call, stacked on
    the batch axis: every layer works per sample, so only the number of operations changes."""
    groups = {}
    for i, p in enumerate(planes):
        groups.setdefault(p.shape, []).append(i)
    out = [None] * len(planes)
    for ids in groups.values():
        # (len(ids) * B, C, a, b), emb repeated to (len(ids) * B, E)
        stacked = fn(torch.cat([planes[i] for i in ids]), emb.repeat(len(ids), 1))
        for i, part in zip(ids, stacked.chunk(len(ids))):
            out[i] = part
    return out


class TriplaneBlock(nn.Module):
    """A ResBlock (and 2D attention) on each plane with shared weights, then cross-plane
    attention."""

    def __init__(self, cin, cout, emb_dim, heads, attend, sizes):
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim)
        self.attn = Attention2d(cout, heads) if attend else nn.Identity()
        self.mix = CrossPlaneAttention(cout, heads, *sizes)  # sizes: (T, h, w) at this level

    def forward(self, planes, emb):
        return self.mix(shared_weights(lambda x, e: self.attn(self.res(x, e)), planes, emb))


class Downsample(nn.Module):
    def forward(self, planes, emb=None):
        return [F.avg_pool2d(p, 2) for p in planes]


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, planes, emb=None):
        return [self.conv(F.interpolate(p, scale_factor=2.0, mode="nearest")) for p in planes]


# ------------------------------------------------------------------------------
# 5. Triplane UNet (paper section 3.2)
# ------------------------------------------------------------------------------


class TriplaneUNet(nn.Module):
    """eps (or v) of packed latents z_t (B, C, N) given t and a condition; the three planes go
    through one 2D UNet. The condition is concatenated on channels, and a learned flag added to
    the timestep embedding says whether it is real; with cfg.classes a class embedding is added
    too (DiT), index len(classes) being the null class."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        base, emb_dim, heads = cfg.base_channels, 4 * cfg.base_channels, cfg.heads
        self.time_mlp = nn.Sequential(
            nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_flag = nn.Embedding(2, emb_dim)
        self.class_emb = nn.Embedding(len(cfg.classes) + 1, emb_dim) if cfg.classes else None
        if self.class_emb is not None:
            # zero: training starts from the unconditional UNet
            nn.init.zeros_(self.class_emb.weight)
        self.input = nn.Conv2d(2 * cfg.latent_channels, base, 3, padding=1)

        def block(cin, cout, level, attend):
            # the planes' (T, h, w) halve at each level
            sizes = (cfg.frames >> level, cfg.size >> level, cfg.size >> level)
            return TriplaneBlock(cin, cout, emb_dim, heads, attend, sizes)

        self.down, skips, c = nn.ModuleList(), [base], base
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(c, base * mult, level, level in cfg.attention_levels))
                c = base * mult
                skips.append(c)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(Downsample())
                skips.append(c)
        deepest = len(cfg.channel_mult) - 1
        self.middle = nn.ModuleList([block(c, c, deepest, True), block(c, c, deepest, False)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                cin = c + skips.pop()
                self.up.append(block(cin, base * mult, level, level in cfg.attention_levels))
                c = base * mult
            if level > 0:
                self.up.append(Upsample(c))
        self.out = nn.Sequential(
            norm(c), nn.SiLU(), nn.Conv2d(c, cfg.latent_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # start as a zero predictor: a stable first step
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z, t, cond, has_cond, label=None):
        """z, cond (B, C, N); t (B,); has_cond (B,) bool; label (B,) classes, None for null."""
        cfg = self.cfg
        # a missing condition is zeros *and* flagged
        cond = cond * has_cond[:, None, None].to(cond.dtype)
        emb = self.time_mlp(timestep_embedding(t, cfg.base_channels))  # (B, E)
        emb = emb + self.cond_flag(has_cond.long())
        if self.class_emb is not None:
            null = torch.full_like(t, len(cfg.classes))
            emb = emb + self.class_emb(null if label is None else label)
        zc = torch.cat([z, cond], dim=1)  # (B, 2C, N): the condition enters on channels
        planes = unpack(zc, cfg.frames, cfg.size, cfg.size)
        planes = [self.input(p) for p in planes]  # (B, base, ., .) each
        hs = [planes]
        for block in self.down:
            planes = self.run(block, planes, emb)
            hs.append(planes)
        for block in self.middle:
            planes = self.run(block, planes, emb)
        for block in self.up:
            if isinstance(block, TriplaneBlock):  # UNet skip: concatenate the matching activation
                planes = [torch.cat([p, s], dim=1) for p, s in zip(planes, hs.pop())]
            planes = self.run(block, planes, emb)
        return pack([self.out(p) for p in planes])  # (B, C, N)

    def run(self, block, planes, emb):
        """One block; with activation checkpointing (training only) as run_blocks does."""
        if self.cfg.grad_checkpointing and self.training and isinstance(block, TriplaneBlock):
            return checkpoint(block, planes, emb, use_reentrant=False)
        return block(planes, emb)


# ------------------------------------------------------------------------------
# 6. Gaussian diffusion with joint conditional / unconditional training (paper section 3.3)
# ------------------------------------------------------------------------------


def noise_schedule(cfg):
    """beta_t and alpha_bar_t = prod_{s<=t} alpha_s, alpha_s = 1 - beta_s, for t = 0..T-1: latent
    diffusion's "linear" schedule, linear in sqrt(beta), then squared; the product in float64."""
    betas = torch.linspace(
        cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.timesteps, dtype=torch.float64) ** 2
    return betas.float(), torch.cumprod(1 - betas, dim=0).float()


def q_sample(alpha_bar, z0, t, noise):
    """Sample q(z_t | z_0) = N(sqrt(alpha_bar_t) z_0, (1 - alpha_bar_t) I) for timesteps t (B,)."""
    ab = alpha_bar[t].view(-1, *[1] * (z0.dim() - 1))  # (B, 1, ...)
    return ab.sqrt() * z0 + (1 - ab).sqrt() * noise


# Long videos condition each clip on the one before (section 7); here clips may also share frames.


def align_condition(z_prev, overlap, T, h, w):
    """Where the previous clip's latent enters the UNet, (B, C, N) -> (B, C, N). For disjoint clips
    (overlap 0) as it is, which puts its last frame (rows T - 1 of z_h, z_w) as far as can be from
    row 0, the frame that continues it. With k = `overlap` shared frames its last k rows move to
    rows 0..k-1, where the new clip shows the same frames, the rest zeros: convolutions see the
    frames to continue beside the frames to make. z_s stays as it is."""
    if overlap == 0:
        return z_prev
    z_s, z_h, z_w = unpack(z_prev, T, h, w)
    # rows T-k..T-1 -> 0..k-1, zeros after
    shift = lambda p: F.pad(p[:, :, T - overlap:], (0, 0, 0, T - overlap))  # noqa: E731
    return pack((z_s, shift(z_h), shift(z_w)))


def shared_rows(diffusion):
    """(1, 1, N) bool mask of what a new clip shares with the one before: rows 0..k-1 of z_h and
    z_w (z_s summarises the whole new clip)."""
    m = diffusion.model.cfg
    ones = torch.ones(1, 1, m.num_tokens, device=diffusion.alpha_bar.device)  # (1, 1, N)
    shared = diffusion.align(ones)  # 1 on z_s and on the shared rows
    shared[..., : m.size ** 2] = 0  # z_s (h*w values, packed first) is made anew
    return shared.bool()


def keep_shared_rows(diffusion, z, prev, t, generator=None):
    """Replace the shared rows of z by the previous clip's latent, aligned and noised to level t
    (clean after the last step), as in diffusion inpainting: the shared frames agree exactly and
    the UNet makes the rest fit them."""
    cond, shared = diffusion.align(prev), shared_rows(diffusion)
    if t >= 0:
        ab = diffusion.alpha_bar[t]
        noise = torch.randn(cond.shape, generator=generator, device=z.device)
        cond = ab.sqrt() * cond + (1 - ab).sqrt() * noise
    return torch.where(shared, cond, z)


class GaussianDiffusion(nn.Module):
    """DDPM (Ho et al. 2020) on packed latents z (B, C, N). The UNet predicts the noise eps (the
    paper's choice) or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) z_0 (Salimans & Ho 2022);
    the samplers work with eps (predict_eps)."""

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg
        betas, alpha_bar = noise_schedule(cfg)
        self.register_buffer("betas", betas, persistent=False)  # buffers, so .to(device) moves them
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)

    def q_sample(self, z0, t, noise):
        return q_sample(self.alpha_bar, z0, t, noise)

    def forward(self, z0, prev, has_prev, label=None):
        """Algorithm 1, the paper's joint objective: one network learns p(z) and p(z | previous
        clip). z0: a clip's latents; prev: the clip before's; has_prev (B,): False where there was
        none; label (B,): the class, or None.

            loss = E_{z_0, eps, t, c} [ w(t) || target - UNet(z_t, t, c * prev, c) ||^2 ],
            z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps,
            t ~ U{0..T-1},   c ~ Bernoulli(cond_prob),

        target = eps (the paper) or v; w(t) = 1 (the paper) or Min-SNR. The flag c enters the UNet
        too, so "no condition" and "a condition of zeros" never look alike. A share class_drop of
        the labels becomes the null class, to learn p(z) without one."""
        b = z0.shape[0]
        use_cond = has_prev & (torch.rand(b, device=z0.device) < self.cfg.cond_prob)  # (B,) c
        t = torch.randint(0, self.cfg.timesteps, (b,), device=z0.device)
        noise = torch.randn_like(z0)
        if label is not None:
            null = torch.full_like(label, len(self.model.cfg.classes))
            label = torch.where(torch.rand(b, device=z0.device) < self.cfg.class_drop, null, label)
        out = self.model(self.q_sample(z0, t, noise), t, self.condition(prev), use_cond, label)
        if self.cfg.prediction == "eps":
            target = noise
        else:
            # v: at high noise eps is nearly z_t itself, so an eps loss says little about z_0
            ab = self.alpha_bar[t][:, None, None]  # (B, 1, 1)
            target = ab.sqrt() * noise - (1 - ab).sqrt() * z0
        per_sample = (out.float() - target.float()).pow(2).mean(dim=(1, 2))  # (B,)
        return (self.loss_weight(t) * per_sample).mean()

    def loss_weight(self, t):
        """Loss weights (B,): 1 (the paper's), or Min-SNR-gamma with cfg.min_snr = gamma > 0 (Hang
        et al. 2023). An eps loss weighs z_0's squared error by SNR_t, a v loss by SNR_t + 1;
        Min-SNR makes both min(SNR_t, gamma), so nearly clean steps (fine detail) stop outweighing
        noisy ones (layout and motion)."""
        if not self.cfg.min_snr:
            return torch.ones(t.shape, device=t.device)
        snr = self.alpha_bar[t] / (1 - self.alpha_bar[t])  # (B,) signal-to-noise ratio
        return snr.clamp(max=self.cfg.min_snr) / (snr if self.cfg.prediction == "eps" else snr + 1)

    def condition(self, prev, generator=None):
        """The previous clip's latent as the UNet sees it: aligned, then noised."""
        return self.noisy_condition(self.align(prev), generator)

    def align(self, z_prev):
        """z_prev moved onto the frames it shares with the new clip (align_condition), if any."""
        if self.cfg.overlap == 0:
            return z_prev
        m = self.model.cfg
        return align_condition(z_prev, self.cfg.overlap, m.frames, m.size, m.size)

    def noisy_condition(self, cond, generator=None):
        """cond plus Gaussian noise of std cfg.cond_noise, in training and sampling alike, so the
        UNet relies on the clip before less literally and does not copy its small errors."""
        if not self.cfg.cond_noise:
            return cond
        return cond + self.cfg.cond_noise * torch.randn(
            cond.shape, generator=generator, device=cond.device)

    def predict_eps(self, z, t, cond, has_cond, label=None):
        """The UNet's output as a noise prediction, whatever it was trained to predict."""
        out = self.model(z, t, cond, has_cond, label)
        if self.cfg.prediction == "eps":
            return out
        ab = self.alpha_bar[t][:, None, None]  # (B, 1, 1), float32: bf16 loses 1 - ab at small t
        # from z_t = sqrt(ab) z_0 + sqrt(1 - ab) eps and v = sqrt(ab) eps - sqrt(1 - ab) z_0
        return (1 - ab).sqrt() * z.float() + ab.sqrt() * out.float()

    def guided_eps(self, z, t, cond, guidance, label=None, class_guidance=0.0):
        """Classifier-free guidance: eps = (1 + w) eps(z, c) - w eps(z) over the previous clip c,
        and again over the class y with its own weight (as in DiT)."""
        if label is not None and class_guidance:
            eps_y, eps_null = (self.guided_eps(z, t, cond, guidance, y) for y in (label, None))
            return (1 + class_guidance) * eps_y - class_guidance * eps_null
        b = z.shape[0]
        if cond is None:
            return self.predict_eps(z, t, torch.zeros_like(z),
                                    torch.zeros(b, dtype=torch.bool, device=z.device), label)
        if guidance == 0:
            return self.predict_eps(z, t, cond,
                                    torch.ones(b, dtype=torch.bool, device=z.device), label)
        # both passes in one batch
        flags = torch.cat([torch.ones(b), torch.zeros(b)]).bool().to(z.device)
        eps = self.predict_eps(z.repeat(2, 1, 1), t.repeat(2), cond.repeat(2, 1, 1), flags,
                               None if label is None else label.repeat(2))  # (2B, C, N)
        eps_c, eps_u = eps.chunk(2)  # (B, C, N) each: with and without the condition
        return (1 + guidance) * eps_c - guidance * eps_u

    @torch.no_grad()
    def sample(self, n, prev=None, steps=100, eta=1.0, guidance=0.0, generator=None,
               progress=None, label=None, class_guidance=0.0):
        """Algorithm 2, in the DDIM form (Song et al. 2021, eq. 12): walk a subsequence of `steps`
        timesteps from T - 1 down to 0. eta = 0 is deterministic DDIM; eta = 1 with steps = T is
        exactly DDPM ancestral sampling, since the update then draws from the posterior
        q(z_{t-1} | z_t, z_0). prev (n, C, N): the clip before's latent, or None; label (n,)."""
        cfg, device = self.model.cfg, self.alpha_bar.device
        z = torch.randn((n, cfg.latent_channels, cfg.num_tokens), generator=generator,
                        device=device)
        seen = None if prev is None else self.condition(prev, generator)  # once a clip
        times = torch.linspace(self.cfg.timesteps - 1, 0, steps, device=device)
        times = times.round().long().tolist()
        for i, t in enumerate(times):
            t_prev = times[i + 1] if i + 1 < len(times) else -1
            t_batch = torch.full((n,), t, device=device)
            eps = self.guided_eps(z, t_batch, seen, guidance, label, class_guidance).float()
            z = self.ddim_step(z, eps, t, t_prev, eta, generator)
            if prev is not None and self.cfg.overlap:  # hold the frames shared with the clip before
                z = keep_shared_rows(self, z, prev, t_prev, generator)
            if progress is not None:
                progress(i + 1, steps)
        return z

    def ddim_step(self, z, eps, t, t_prev, eta, generator=None):
        """One update z_t -> z_{t_prev}: predict z_0, then step along the predicted noise."""
        ab = self.alpha_bar[t]
        ab_prev = self.alpha_bar[t_prev] if t_prev >= 0 else torch.ones_like(ab)
        z0 = ((z - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)  # latents are tanh-bounded
        eps = (z - ab.sqrt() * z0) / (1 - ab).sqrt()  # the eps that agrees with the clipped z_0
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        noise = torch.randn(z.shape, generator=generator, device=z.device)
        return ab_prev.sqrt() * z0 + (1 - ab_prev - sigma**2).sqrt() * eps + sigma * noise


# ------------------------------------------------------------------------------
# 7. Long videos: clip after clip, each conditioned on the one before (paper section 3.3)
# ------------------------------------------------------------------------------


@torch.no_grad()
def generate_video(autoencoder, diffusion, frames, n=1, **sample_kwargs):
    """n videos of `frames` frames, clip by clip, each conditioned on the sampled latent of the one
    before. Clips share k = `overlap` frames, made twice; the cut lies in the middle of them, where
    each clip's decoder sees frames on both sides (k = 0: the paper's, cut at the edge). Yields each
    clip's new frames (n, 3, <=T, H, W) and latent (n, C, N): memory does not grow with length."""
    T, k = diffusion.model.cfg.frames, diffusion.cfg.overlap
    size, prev, made = diffusion.model.cfg.size, None, 0
    while made < frames:
        z = diffusion.sample(n, prev, **sample_kwargs)  # (n, C, N)
        video = autoencoder.decode(unpack(z, T, size, size))  # (n, 3, T, H, W)
        start = 0 if prev is None else k - k // 2  # this clip's first new frame: past the cut
        last = frames - made <= T - start  # the last clip keeps its frames past the next cut
        new = video[:, :, start: start + frames - made if last else T - k // 2]  # (n, 3, <=T, H, W)
        yield new, z
        made, prev = made + new.shape[2], z


def clips_needed(frames, T, overlap):
    """Clips generate_video samples for `frames` frames: the first and last reach k // 2 frames
    into the shared frames they alone cover, so together make one clip; every other adds T - k."""
    return 1 + max(0, math.ceil((frames - T) / (T - overlap)))


# ------------------------------------------------------------------------------
# 8. PatchGAN discriminators (the autoencoder's adversarial phase)
# ------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """A PatchGAN (pix2pix): each output logit judges a patch of a clip (B, 3, T, H, W; dims 3) or
    frame (B, 3, H, W; dims 2) as real or not. Returns every stage's activations, logits last."""

    def __init__(self, dims=3, channels=3, width=64, layers=3):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        stages = [nn.Sequential(conv(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2))]
        c = width
        for _ in range(layers - 1):
            stages.append(nn.Sequential(
                conv(c, 2 * c, 4, stride=2, padding=1), nn.GroupNorm(32, 2 * c), nn.LeakyReLU(0.2)))
            c *= 2
        stages.append(conv(c, 1, 3, padding=1))
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        activations = []
        for stage in self.stages:
            x = stage(x)
            activations.append(x)
        return activations  # the last: (B, 1, ...) logits, the input's size over 2^(layers)


class Discriminators(nn.Module):
    """The official PVDM code's pair: a 3D PatchGAN on the clip and a 2D one on one frame of it."""

    def __init__(self):
        super().__init__()
        self.video, self.frame = PatchDiscriminator(dims=3), PatchDiscriminator(dims=2)

    def forward(self, x, frame_ids):
        """x (B, 3, T, H, W), frame_ids (B,) -> the activations of both: [video's, frame's]."""
        frames = x[torch.arange(len(x), device=x.device), :, frame_ids]  # (B, 3, H, W)
        return [self.video(x), self.frame(frames)]


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: push real logits above +1 and fake ones below -1."""
    return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()


def hinge_g_loss(logits_fake):
    """Generator (autoencoder) side of the hinge game: raise the logits of its reconstructions."""
    return -logits_fake.mean()


def adversarial_loss(fake, real, gan_weight, feature_weight):
    """The autoencoder's loss from the Discriminators' activations for its reconstructions and
    (detached) real clips: hinge, plus feature matching (pix2pixHD), L1 between the earlier
    activations, so a reconstruction must look real in every layer, not just in the verdict."""
    loss = 0.0
    for acts_fake, acts_real in zip(fake, real):
        loss = loss + gan_weight * hinge_g_loss(acts_fake[-1])
        loss = loss + feature_weight * sum(
            F.l1_loss(f, r) for f, r in zip(acts_fake[:-1], acts_real[:-1]))
    return loss


def discriminator_loss(judged):
    """Both hinge losses, from the activations for real clips followed by as many fakes."""
    return sum(hinge_d_loss(*acts[-1].chunk(2)) for acts in judged)


# ------------------------------------------------------------------------------
# 9. Configs and presets
# ------------------------------------------------------------------------------


@dataclass
class AutoencoderConfig:
    resolution: int = 32
    frames: int = 16
    patch: int = 4
    channels: int = 3
    dim: int = 64
    depth: int = 2  # space-time blocks in the encoder, and again in the decoder
    heads: int = 4
    proj_depth: int = 1  # transformer blocks in each axis projection
    latent_channels: int = 4
    l1_weight: float = 0.0  # the paper's pixel loss (forward says why L2 is the default)
    l2_weight: float = 1.0
    gradient_weight: float = 0.0  # L2 on pixel differences (Mathieu et al. 2016's gradient loss)
    latent_noise: float = 0.0  # std of the noise on the planes in training
    pixel_head: int = 0  # features per pixel for 3x3 convs after un-patchify; 0: none
    grad_checkpointing: bool = False

    def __post_init__(self):
        if self.resolution % self.patch:
            raise ValueError(f"resolution {self.resolution} is not divisible by the patch size "
                             f"{self.patch}; pick a resolution that is a multiple of it.")
        if self.frames < 2:
            raise ValueError(f"frames must be at least 2 (got {self.frames}).")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}.")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be at least 1 (got {self.latent_channels}).")

    @property
    def latent_size(self):
        """(T, h, w): the one place latent sizes are derived from (frames, resolution, patch)."""
        return self.frames, self.resolution // self.patch, self.resolution // self.patch

    @property
    def latent_values(self):
        """Numbers in the latent of one clip: C channels of the planes h x w, T x w and T x h."""
        T, h, w = self.latent_size
        return self.latent_channels * (h * w + T * w + T * h)


@dataclass
class UNetConfig:
    latent_channels: int = 4
    frames: int = 16  # T of the latent planes
    size: int = 8  # h = w of the latent planes
    base_channels: int = 64
    channel_mult: tuple = (1, 2)
    num_res_blocks: int = 1
    attention_levels: tuple = (1,)  # levels (0 = full resolution) with 2D attention
    heads: int = 4
    grad_checkpointing: bool = False  # recompute each TriplaneBlock in backward: less memory
    classes: tuple = ()  # class names of a class-conditional UNet; () for none

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels, self.classes = tuple(self.attention_levels), tuple(self.classes)
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.frames % factor or self.size % factor:
            halvings = len(self.channel_mult) - 1
            raise ValueError(f"latent planes {self.frames}x{self.size} cannot be halved {halvings} "
                             f"times for channel_mult {self.channel_mult}; use fewer levels or "
                             "larger planes.")

    @property
    def num_tokens(self):
        return self.size * self.size + 2 * self.frames * self.size  # h*w + T*w + T*h


@dataclass
class DiffusionConfig:
    """The paper's settings by default (also for a checkpoint without a field)."""
    timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    cond_prob: float = 0.3  # paper: 0.3 on UCF-101, 0.2 on SkyTimelapse
    prediction: str = "eps"  # what the UNet outputs: "eps" (the paper) or "v"
    overlap: int = 0  # frames a clip shares with the one before; 0: the paper's disjoint clips
    min_snr: float = 0.0  # Min-SNR's gamma (loss_weight); 0: the paper's plain MSE
    cond_noise: float = 0.0  # std of the noise on the condition (noisy_condition); 0: none
    class_drop: float = 0.1  # share of labels dropped to the null class in training (DiT's)

    def __post_init__(self):
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v' (got {self.prediction!r}).")
        if self.min_snr < 0:
            raise ValueError(f"min_snr must be 0 (off) or positive (got {self.min_snr}).")
        if self.cond_noise < 0:
            raise ValueError(f"cond_noise must be 0 (off) or positive (got {self.cond_noise}).")


# Every default of a preset: the models' sizes and each stage's recipe; the trainers' flags default
# to it (--preset). `paper` is the official code's recipe, with bf16 (on CUDA) and activation
# checkpointing to fit a 24 GB GPU, less LPIPS (no VGG weights here) and the adversarial phase
# (--gan-start). `tiny` is the CPU quick start.
PRESETS = {
    "tiny": {
        # 8 latent channels, not the paper's 4: better reconstructions in a short CPU run
        "autoencoder": dict(resolution=32, frames=16, patch=4, dim=64, depth=2, heads=4,
                            proj_depth=1, latent_channels=8),
        # one attention head: four narrower ones cost CPU time for no better samples
        "unet": dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(1,), heads=1),
        "train_autoencoder": dict(steps=1750, batch_size=4, lr=3e-3, betas=(0.9, 0.99),
                                  warmup=100, lr_decay="cosine", l1_weight=0.0, l2_weight=1.0,
                                  gradient_weight=0.0, latent_noise=0.3, gan_start=None,
                                  grad_checkpointing=False),
        # clips share 12 of 16 frames: they continue each other better, at 29 clips for 128 frames
        "train_diffusion": dict(steps=2500, batch_size=8, lr=2e-3, warmup=100, lr_decay="cosine",
                                prediction="v", min_snr=5.0, cond_prob=0.7, overlap_share=0.75,
                                cond_noise=0.1, class_cond=False, grad_checkpointing=False),
    },
    # pretrained/'s model: tiny trained longer, wider, class-conditional, with a pixel head and a
    # gradient loss that keep outlines and corners; clips share 4 frames, so 128 frames take 11
    # clips, not 29, and the shapes keep their speed
    "shipped": {
        "autoencoder": dict(resolution=32, frames=16, patch=4, dim=96, depth=2, heads=4,
                            proj_depth=1, latent_channels=8, pixel_head=16),
        "unet": dict(base_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(1,), heads=1),
        "train_autoencoder": dict(steps=4000, batch_size=8, lr=2e-3, betas=(0.9, 0.99),
                                  warmup=200, lr_decay="cosine", l1_weight=0.0, l2_weight=1.0,
                                  gradient_weight=1.0, latent_noise=0.3, gan_start=None,
                                  grad_checkpointing=False),
        "train_diffusion": dict(steps=7500, batch_size=16, lr=1e-3, warmup=200, lr_decay="cosine",
                                prediction="v", min_snr=5.0, cond_prob=0.7, overlap_share=0.25,
                                cond_noise=0.1, class_cond=True, grad_checkpointing=False),
    },
    "paper": {
        "autoencoder": dict(resolution=256, frames=16, patch=8, dim=384, depth=8, heads=8,
                            proj_depth=4, latent_channels=4),
        "unet": dict(base_channels=256, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                     attention_levels=(0, 1, 2), heads=8),
        "train_autoencoder": dict(steps=100_000, batch_size=8, lr=1e-4, betas=(0.5, 0.9),
                                  warmup=0, lr_decay="constant", l1_weight=1.0, l2_weight=0.0,
                                  gradient_weight=0.0, latent_noise=0.0, gan_start=None,
                                  grad_checkpointing=True),
        "train_diffusion": dict(steps=400_000, batch_size=64, lr=1e-4, warmup=10_000,
                                lr_decay="constant", prediction="eps", min_snr=0.0, cond_prob=0.3,
                                overlap_share=0.0, cond_noise=0.0, class_cond=False,
                                grad_checkpointing=True),
    },
}
AUTOENCODER_PRESETS = {name: preset["autoencoder"] for name, preset in PRESETS.items()}
UNET_PRESETS = {name: preset["unet"] for name, preset in PRESETS.items()}


def unet_config_for(ae_cfg, preset, **options):
    """A UNetConfig with plane sizes from the autoencoder's; `options` set other fields."""
    t, h, _ = ae_cfg.latent_size
    return UNetConfig(latent_channels=ae_cfg.latent_channels, frames=t, size=h,
                      **UNET_PRESETS[preset], **options)


# ------------------------------------------------------------------------------
# 10. Measuring: PSNR, naive codes, fingerprints (for the scripts, not the method)
# ------------------------------------------------------------------------------


def psnr(x, y):
    """PSNR in dB of videos in [-1, 1] (peak-to-peak range 2), averaged over the batch."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4 / mse.clamp_min(1e-10))).mean().item()


def naive_code(x, size):
    """The naive code of videos x (B, C, T, H, W) on a (t, h, w) grid, decoded: x averaged over
    each cell, then trilinearly up-sampled back."""
    small = F.adaptive_avg_pool3d(x.float(), size)  # (B, C, t, h, w): the code
    return F.interpolate(small, size=x.shape[2:], mode="trilinear",
                         align_corners=False)  # (B, C, T, H, W)


def naive_code_sizes(shape, values):
    """Grid sizes (t, s, s), for each t the largest s, whose naive code of a (C, T, H, W) video
    holds at most `values` numbers: an autoencoder is judged against codes no larger."""
    C, T, H, W = shape
    sizes = [(t, min(H, W, math.isqrt(values // (C * t)))) for t in range(1, T + 1)]
    return [(t, s, s) for t, s in sizes if s > 0]


def best_naive_psnr(x, values):
    """(PSNR, size) of the best naive code of x (B, C, T, H, W) with at most `values` numbers."""
    sizes = naive_code_sizes(x.shape[1:], values)
    return max((psnr(naive_code(x, size), x), size) for size in sizes)


def fingerprint(module):
    """A short hash of a model's weights, so a diffusion checkpoint can name its autoencoder."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
