"""The benchmark cells: a dense tanh cell and an MDEQ-like convolutional block.

Each problem is ``(f, params, x, z0)`` with ``f(params, x, z) -> z`` on a batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense(spectral_norm: float = 0.9, batch: int = 64, width: int = 512, seed: int = 0, injection: float = 1.0):
    """f(z) = tanh(z W + c): W symmetric Gaussian scaled to ``spectral_norm``, c = x U + b,
    U ~ ``injection`` N(0, 1/width).

    With ``injection`` 1 the pre-activations are O(1) and saturate the tanh, so even at
    spectral norm 1.2 f contracts and plain iteration converges. With 0.25 they stay near
    tanh's linear range, J_f's spectral radius is close to ``spectral_norm``, and at 1.2
    plain iteration stalls: ``dense_hard``."""
    kw, ku, kb, kx = jax.random.split(jax.random.PRNGKey(seed), 4)
    a = jax.random.normal(kw, (width, width))
    w = (a + a.T) / 2
    w = spectral_norm * w / jnp.max(jnp.abs(jnp.linalg.eigvalsh(w)))
    params = {
        "w": w,
        "u": injection * jax.random.normal(ku, (width, width)) / jnp.sqrt(width),
        "b": 0.1 * jax.random.normal(kb, (width,)),
    }
    x = jax.random.normal(kx, (batch, width))

    def f(p, x, z):
        return jnp.tanh(z @ p["w"] + x @ p["u"] + p["b"])

    return f, params, x, jnp.zeros((batch, width))


def group_norm(z, scale, bias, groups: int, eps: float = 1e-5):
    """GroupNorm over (H, W, C/groups) per example and group; z is [B, H, W, C]."""
    b, h, w, c = z.shape
    zg = z.reshape(b, h, w, groups, c // groups)
    mean = jnp.mean(zg, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(zg - mean), axis=(1, 2, 4), keepdims=True)
    zg = (zg - mean) * jax.lax.rsqrt(var + eps)
    return zg.reshape(b, h, w, c) * scale + bias


def conv(batch: int = 32, size: int = 32, channels: int = 16, groups: int = 4, seed: int = 0):
    """f(z) = GN3(relu(z + GN2(conv(relu(GN1(conv(z, w1))), w2)) + x)), 3x3 SAME convs."""
    k1, k2, kx = jax.random.split(jax.random.PRNGKey(seed), 3)
    fan_in = 9 * channels
    ones, zeros = jnp.ones((channels,)), jnp.zeros((channels,))
    params = {
        "w1": jax.random.normal(k1, (3, 3, channels, channels)) / jnp.sqrt(fan_in),
        "w2": jax.random.normal(k2, (3, 3, channels, channels)) / jnp.sqrt(fan_in),
        "gn": [(ones, zeros), (ones, zeros), (ones, zeros)],
    }
    x = 2.0 * jax.random.normal(kx, (batch, size, size, channels))

    def conv2d(z, w):
        return jax.lax.conv_general_dilated(z, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def f(p, x, z):
        (s1, b1), (s2, b2), (s3, b3) = p["gn"]
        h = jax.nn.relu(group_norm(conv2d(z, p["w1"]), s1, b1, groups))
        h = group_norm(conv2d(h, p["w2"]), s2, b2, groups)
        return group_norm(jax.nn.relu(z + h + x), s3, b3, groups)

    return f, params, x, jnp.zeros((batch, size, size, channels))


PROBLEMS = {
    "dense": lambda: dense(0.9),
    "dense_hard": lambda: dense(1.2, injection=0.25),
    "conv": conv,
}


def transformer(batch: int = 16, length: int = 64, d_model: int = 128, gain: float = 2.0, seed: int = 0):
    """The DEQ-Transformer cell of the pydoc config (post-LN, 4 heads, d_ff 4 d_model), at
    random tokens, causal along axis 1 of z ``[B, T, d_model]``.

    ``gain`` scales every weight-norm gain: at 1 (initialization) a few steps reach tol;
    at 2 the cell is about as hard as a trained unregularized one (tol 1e-3 is not
    reached in 12 steps)."""
    from deq_jax.models import DEQTransformer

    model = DEQTransformer(100, d_model=d_model, num_heads=4, d_ff=4 * d_model, pre_ln=False)
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, 100)
    params = model.init(jax.random.PRNGKey(seed + 1), tokens, unroll=1)["params"]
    params = jax.tree_util.tree_map_with_path(lambda path, p: p * gain if path[-1].key == "g" else p, params)
    x = model.apply({"params": params}, tokens, None, method="inject")

    def f(p, x, z):
        return model.apply({"params": p}, x, z, method="cell")

    return f, params, x, jnp.zeros_like(x["injection"])
