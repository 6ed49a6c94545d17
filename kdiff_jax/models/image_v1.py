"""k-diffusion's `image_v1` U-Net (ImageDenoiserModelV1) and the Karras augmentation wrapper, in Flax NNX, NHWC.

The network F(x, σ) that the Karras preconditioner wraps:
  c_noise = ln(σ)/4;  e = mapping(FourierFeatures(c_noise) + mapping_cond(cond_vec))
  x → [pixel_unshuffle] → proj_in → U-Net(e) → proj_out → [pixel_shuffle]
Every AdaGN of the U-Net is conditioned on e. With `has_variance` the last output channel, averaged over H and W,
is a per-sample log-variance.
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import jax.numpy as jnp
from flax import nnx

from .layers import (GELU, AdaGN, ConditionedModule, CrossAttention2d, Downsample2d, FourierFeatures, Identity,
                     SelfAttention2d, Upsample2d, conv, dropout2d, orthogonal_init, run_sequential,
                     torch_default_init)


class ResConvBlock(ConditionedModule):
    """main(x) + skip(x); main = AdaGN, GELU, conv3×3, Dropout2d, AdaGN, GELU, conv3×3, Dropout2d.

    skip is a bias-free 1×1 convolution when the channel count changes, else the identity.
    """

    def __init__(self, feats_in, c_in, c_mid, c_out, group_size=32, dropout_rate=0., *, dtype, rngs):
        self.main = nnx.List([
            AdaGN(feats_in, c_in, max(1, c_in // group_size), rngs=rngs),
            GELU(),
            conv(c_in, c_mid, 3, dtype=dtype, rngs=rngs),
            dropout2d(dropout_rate, rngs),
            AdaGN(feats_in, c_mid, max(1, c_mid // group_size), rngs=rngs),
            GELU(),
            conv(c_mid, c_out, 3, dtype=dtype, rngs=rngs),
            dropout2d(dropout_rate, rngs),
        ])
        self.skip = (None if c_in == c_out else
                     conv(c_in, c_out, 1, use_bias=False, kernel_init=orthogonal_init, dtype=dtype, rngs=rngs))

    def __call__(self, x, cond):
        skip = x if self.skip is None else self.skip(x)
        return run_sequential(self.main, x, cond) + skip


def _stage_layers(n_layers, feats_in, c_in, c_mid, c_out, group_size, head_size, dropout_rate, self_attn, cross_attn,
                  c_enc, dtype, rngs):
    """The ResConvBlocks of one U-Net stage, each followed by self- and/or cross-attention if enabled."""
    layers = []
    for i in range(n_layers):
        my_c_in = c_in if i == 0 else c_mid
        my_c_out = c_mid if i < n_layers - 1 else c_out
        layers.append(ResConvBlock(feats_in, my_c_in, c_mid, my_c_out, group_size, dropout_rate,
                                   dtype=dtype, rngs=rngs))
        groups, heads = max(1, my_c_out // group_size), max(1, my_c_out // head_size)
        if self_attn:
            layers.append(SelfAttention2d(my_c_out, heads, groups, feats_in, dropout_rate, dtype=dtype, rngs=rngs))
        if cross_attn:
            layers.append(CrossAttention2d(my_c_out, c_enc, heads, groups, feats_in, dropout_rate,
                                           dtype=dtype, rngs=rngs))
    return layers


class DBlock(ConditionedModule):
    """Encoder stage: layers[0] is a Downsample2d (or identity), then the stage's blocks."""

    def __init__(self, n_layers, feats_in, c_in, c_mid, c_out, group_size=32, head_size=64, dropout_rate=0.,
                 downsample=False, self_attn=False, cross_attn=False, c_enc=0, *, dtype, rngs):
        self.layers = nnx.List([Downsample2d() if downsample else Identity()] + _stage_layers(
            n_layers, feats_in, c_in, c_mid, c_out, group_size, head_size, dropout_rate, self_attn, cross_attn,
            c_enc, dtype, rngs))

    def __call__(self, x, cond):
        return run_sequential(self.layers, x, cond)


class UBlock(ConditionedModule):
    """Decoder stage: concatenates [x, skip] on channels, runs its blocks, then an Upsample2d (or identity)."""

    def __init__(self, n_layers, feats_in, c_in, c_mid, c_out, group_size=32, head_size=64, dropout_rate=0.,
                 upsample=False, self_attn=False, cross_attn=False, c_enc=0, *, dtype, rngs):
        self.layers = nnx.List(_stage_layers(
            n_layers, feats_in, c_in, c_mid, c_out, group_size, head_size, dropout_rate, self_attn, cross_attn,
            c_enc, dtype, rngs) + [Upsample2d() if upsample else Identity()])

    def __call__(self, x, cond, skip=None):
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
        return run_sequential(self.layers, x, cond)


class UNet(ConditionedModule):
    """Runs d_blocks[skip_stages:], then u_blocks (stored deepest first) with the encoder outputs as skips.

    As in k-diffusion, zip() truncates: with skip_stages = s the last s u_blocks exist but are not used.
    """

    def __init__(self, d_blocks, u_blocks, skip_stages=0):
        self.d_blocks = nnx.List(d_blocks)
        self.u_blocks = nnx.List(u_blocks)
        self.skip_stages = skip_stages

    def __call__(self, x, cond):
        skips = []
        for block in list(self.d_blocks)[self.skip_stages:]:
            x = block(x, cond)
            skips.append(x)
        for i, (block, skip) in enumerate(zip(self.u_blocks, reversed(skips))):
            x = block(x, cond, skip if i > 0 else None)
        return x


class MappingNet(nnx.Module):
    """n_layers × (Linear, GELU) with orthogonal init; layers at indices 0, 2, … as in PyTorch's Sequential."""

    def __init__(self, feats_in, feats_out, n_layers=2, *, rngs):
        layers = []
        for i in range(n_layers):
            layers += [nnx.Linear(feats_in if i == 0 else feats_out, feats_out, kernel_init=orthogonal_init,
                                  rngs=rngs), GELU()]
        self.layers = nnx.List(layers)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class ImageDenoiserModelV1(nnx.Module):
    """The image_v1 U-Net F(x, σ). Inputs and outputs are NHWC; σ has shape [N]."""

    def __init__(self, c_in: int, feats_in: int, depths: Sequence[int], channels: Sequence[int],
                 self_attn_depths: Sequence[bool], cross_attn_depths: Sequence[bool] | None = None,
                 mapping_cond_dim: int = 0, unet_cond_dim: int = 0, cross_cond_dim: int = 0,
                 dropout_rate: float = 0., patch_size: int = 1, skip_stages: int = 0, has_variance: bool = False,
                 *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.c_in = c_in
        self.channels = tuple(channels)
        self.unet_cond_dim = unet_cond_dim
        self.patch_size = patch_size
        self.has_variance = has_variance
        self.dtype = dtype
        self.timestep_embed = FourierFeatures(1, feats_in, rngs=rngs)
        self.mapping_cond = (nnx.Linear(mapping_cond_dim, feats_in, use_bias=False, kernel_init=torch_default_init,
                                        rngs=rngs) if mapping_cond_dim > 0 else None)
        self.mapping = MappingNet(feats_in, feats_in, rngs=rngs)
        width = channels[max(0, skip_stages - 1)]
        self.proj_in = conv((c_in + unet_cond_dim) * patch_size ** 2, width, 1, dtype=dtype, rngs=rngs)
        self.proj_out = conv(width, c_in * patch_size ** 2 + int(has_variance), 1, dtype=dtype,
                             kernel_init=nnx.initializers.zeros, rngs=rngs)
        if cross_cond_dim == 0:
            cross_attn_depths = [False] * len(self_attn_depths)
        d_blocks, u_blocks = [], []
        for i in range(len(depths)):
            d_blocks.append(DBlock(depths[i], feats_in, channels[max(0, i - 1)], channels[i], channels[i],
                                   downsample=i > skip_stages, self_attn=self_attn_depths[i],
                                   cross_attn=cross_attn_depths[i], c_enc=cross_cond_dim, dropout_rate=dropout_rate,
                                   dtype=dtype, rngs=rngs))
        for i in range(len(depths)):
            c_in_i = channels[i] * 2 if i < len(depths) - 1 else channels[i]
            u_blocks.append(UBlock(depths[i], feats_in, c_in_i, channels[i], channels[max(0, i - 1)],
                                   upsample=i > skip_stages, self_attn=self_attn_depths[i],
                                   cross_attn=cross_attn_depths[i], c_enc=cross_cond_dim, dropout_rate=dropout_rate,
                                   dtype=dtype, rngs=rngs))
        self.u_net = UNet(d_blocks, u_blocks[::-1], skip_stages=skip_stages)

    def __call__(self, x, sigma, mapping_cond=None, unet_cond=None, cross_cond=None, cross_cond_padding=None,
                 return_variance=False):
        if x.ndim != 4 or x.shape[-1] != self.c_in:
            layout = ' (channels first? kdiff_jax takes NHWC)' if x.ndim == 4 and x.shape[1] == self.c_in else ''
            raise ValueError(f'expected images [N, H, W, {self.c_in}] (NHWC), got shape {tuple(x.shape)}{layout}')
        sigma = jnp.broadcast_to(jnp.asarray(sigma), x.shape[:1])  # a scalar σ applies to every image, as in torch
        c_noise = jnp.log(sigma.astype(jnp.float32)) / 4
        timestep_embed = self.timestep_embed(c_noise[:, None])
        if mapping_cond is not None:
            timestep_embed = timestep_embed + self.mapping_cond(mapping_cond.astype(jnp.float32))
        cond = {'cond': self.mapping(timestep_embed)}
        if unet_cond is not None:
            x = jnp.concatenate([x, unet_cond.astype(x.dtype)], axis=-1)
        if cross_cond is not None:
            cond['cross'] = cross_cond
            cond['cross_padding'] = (jnp.zeros(cross_cond.shape[:2]) if cross_cond_padding is None
                                     else cross_cond_padding)
        p = self.patch_size
        if p > 1:  # pixel_unshuffle: output channel index = c·p² + i·p + j
            x = einops.rearrange(x, 'n (h i) (w j) c -> n h w (c i j)', i=p, j=p)
        x = self.proj_in(x.astype(self.dtype))
        x = self.u_net(x, cond)
        x = self.proj_out(x).astype(jnp.float32)
        if self.has_variance:
            x, logvar = x[..., :-1], x[..., -1].mean(axis=(1, 2))
        if p > 1:
            x = einops.rearrange(x, 'n h w (c i j) -> n (h i) (w j) c', i=p, j=p)
        if self.has_variance and return_variance:
            return x, logvar
        return x


class KarrasAugmentWrapper(nnx.Module):
    """Feeds the 9-dim augmentation conditioning (zeros at inference) as the first part of `mapping_cond`."""

    def __init__(self, inner_model: ImageDenoiserModelV1):
        self.inner_model = inner_model

    def __call__(self, x, sigma, aug_cond=None, mapping_cond=None, **kwargs):
        if aug_cond is None:
            aug_cond = jnp.zeros((x.shape[0], 9), jnp.float32)
        mapping_cond = aug_cond if mapping_cond is None else jnp.concatenate([aug_cond, mapping_cond], axis=1)
        return self.inner_model(x, sigma, mapping_cond=mapping_cond, **kwargs)
