"""Adaptive embedding / adaptive softmax against independent truths: a full softmax and the
cluster factorization written by hand in NumPy float64 from the module's parameters,
central finite differences in float64, and the WT103 parameter shapes counted by hand."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from deq_jax.models.adaptive import AdaptiveSoftmax, cluster_layout, param_count

HI = jax.lax.Precision.HIGHEST
# vocab 11 in clusters [0, 3), [3, 6), [6, 11) with widths 8, 4, 2
SMALL = dict(vocab_size=11, d_model=8, cutoffs=(3, 6), div_val=2)


def _setup(cfg, tie=True, batch=(2, 5), seed=0, scale=0.5, dtype=jnp.float32):
    return _setup_cached(tuple(sorted(cfg.items())), tie, batch, seed, scale, jnp.dtype(dtype))


@functools.cache
def _setup_cached(cfg, tie, batch, seed, scale, dtype):
    """Module, randomized parameters (scale ``scale``, so that logits are O(1) and biases
    non-zero; the N(0, 0.01) init would make every distribution near-uniform), ``h`` and
    targets covering every cluster."""
    cfg = dict(cfg)
    model = AdaptiveSoftmax(**cfg, tie_projections=tie, precision=HI, param_dtype=dtype)

    def make(key):  # jitted: eager init dispatches (and compiles) op by op, which is slow
        k0, k1, k2, k3 = jax.random.split(key, 4)
        h = jax.random.normal(k1, (*batch, cfg["d_model"]), dtype)
        targets = jax.random.randint(k2, batch, 0, cfg["vocab_size"])
        targets = targets.at[0, :3].set(jnp.array([0, cfg["vocab_size"] // 2, cfg["vocab_size"] - 1]))
        params = model.init(k0, h, targets)["params"]
        flat, unravel = ravel_pytree(params)
        return unravel(scale * jax.random.normal(k3, flat.shape, flat.dtype)), h, targets

    params, h, targets = jax.jit(make)(jax.random.PRNGKey(seed))
    return model, {"params": params}, h, targets


def _np(params):
    return {k: np.asarray(v, np.float64) for k, v in params["params"].items()}


def _np_log_probs(p, h, cfg, tie=True):
    """Adaptive log-softmax written out in NumPy float64 from the parameters."""
    bounds, _ = cluster_layout(cfg["vocab_size"], cfg["d_model"], cfg["cutoffs"], cfg["div_val"])
    h = np.asarray(h, np.float64)
    k = len(bounds) - 2

    def lsm(x):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    def out_proj(i):
        if cfg["div_val"] == 1:
            return None
        if i == 0:
            return p["out_proj_0"]
        return p[f"in_proj_{i}"] if tie else p[f"out_proj_{i}"]

    def logits(i, w, b):
        proj = out_proj(i)
        hp = h if proj is None else h @ proj.T
        return hp @ w.T + b

    if k == 0:
        return lsm(logits(0, p["table_0"], p["bias_0"]))
    head = lsm(
        logits(0, np.concatenate([p["table_0"], p["cluster_weight"]]), np.concatenate([p["bias_0"], p["cluster_bias"]]))
    )
    n0 = bounds[1]
    parts = [head[..., :n0]]
    for i in range(1, k + 1):
        parts.append(head[..., n0 + i - 1 : n0 + i] + lsm(logits(i, p[f"table_{i}"], p[f"bias_{i}"])))
    return np.concatenate(parts, -1)


def test_no_clusters_is_a_full_tied_softmax():
    cfg = dict(vocab_size=13, d_model=8, cutoffs=(), div_val=1)
    model, v, h, t = _setup(cfg)
    assert set(v["params"]) == {"table_0", "bias_0"}  # plain table, no projection, no cluster logits
    e, b = v["params"]["table_0"], v["params"]["bias_0"]
    ref = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", h, e, precision=HI) + b, axis=-1)
    np.testing.assert_allclose(model.apply(v, h, method="log_probs"), ref, atol=1e-5)
    np.testing.assert_allclose(model.apply(v, h, t), jnp.take_along_axis(ref, t[..., None], -1)[..., 0], atol=1e-5)
    np.testing.assert_allclose(model.apply(v, t, method="embed"), e[t] * math.sqrt(8), atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_clusters_normalize_and_factorize(tie):
    model, v, h, t = _setup(SMALL, tie)
    lps = model.apply(v, h, method="log_probs")
    assert lps.shape == (*t.shape, 11) and lps.dtype == jnp.float32
    np.testing.assert_allclose(jnp.exp(lps).sum(-1), 1.0, atol=1e-5)
    lp = model.apply(v, h, t)
    np.testing.assert_allclose(lp, jnp.take_along_axis(lps, t[..., None], -1)[..., 0], atol=1e-6)
    np.testing.assert_allclose(lps, _np_log_probs(_np(v), h, SMALL, tie), atol=1e-5)

    # p(t) = p(cluster | h) p(t | cluster, h), by hand for one token in each cluster
    p, x = _np(v), np.asarray(h[0, 0], np.float64)
    h0 = x @ p["out_proj_0"].T
    head = np.concatenate([p["table_0"] @ h0 + p["bias_0"], p["cluster_weight"] @ h0 + p["cluster_bias"]])
    head = np.exp(head - head.max()) / np.exp(head - head.max()).sum()
    for token, cluster, lo in [(1, 0, 0), (4, 1, 3), (9, 2, 6)]:
        if cluster == 0:
            want = head[token]
        else:
            proj = p[f"in_proj_{cluster}"] if tie else p[f"out_proj_{cluster}"]
            tail = p[f"table_{cluster}"] @ (proj @ x) + p[f"bias_{cluster}"]
            tail = np.exp(tail - tail.max()) / np.exp(tail - tail.max()).sum()
            want = head[3 + cluster - 1] * tail[token - lo]  # cluster i is head column n_0 + i - 1
        got = model.apply(v, h[:1, :1], jnp.full((1, 1), token))[0, 0]
        np.testing.assert_allclose(np.exp(got), want, rtol=1e-5)


@pytest.mark.parametrize(
    "cfg,tie",
    [
        (SMALL, True),
        (SMALL, False),
        (dict(vocab_size=7, d_model=6, cutoffs=(2,), div_val=1), True),
        (dict(vocab_size=5, d_model=4, cutoffs=(), div_val=3), True),
    ],
)
def test_gradients_match_central_differences_in_float64(cfg, tie):
    with jax.enable_x64(True):
        model, v, h, t = _setup(cfg, tie, dtype=jnp.float64)
        flat, unravel = ravel_pytree((v["params"], h))
        assert flat.dtype == jnp.float64

        def f(x):
            params, hh = unravel(x)
            return model.apply({"params": params}, hh, t).sum()

        # and of the embedding (tied tables get both contributions): one function, two outputs
        g_emb = jax.random.normal(jax.random.PRNGKey(7), (*t.shape, cfg["d_model"]), jnp.float64)

        def both(x):
            params, _ = unravel(x)
            return jnp.stack([f(x), jnp.sum(g_emb * model.apply({"params": params}, t, method="embed"))])

        e = 1e-6 * jnp.eye(flat.size, dtype=flat.dtype)  # central differences at every coordinate
        jac, fd = jax.jit(  # [2, n]
            lambda x: (jax.jacrev(both)(x), (jax.vmap(both)(x + e) - jax.vmap(both)(x - e)).T / 2e-6)
        )(flat)
        assert float(jnp.abs(jac[0]).max()) > 1e-2 and float(jnp.abs(jac[1]).max()) > 1e-2  # non-trivial
        np.testing.assert_allclose(jac, fd, atol=1e-7, rtol=1e-6)


def test_output_weights_are_the_input_tables_and_tail_projections_are_shared():
    model, v, h, t = _setup(SMALL, tie=True)
    names = set(v["params"])
    tables, biases, in_projs = ({f"{n}_{i}" for i in range(3)} for n in ("table", "bias", "in_proj"))
    assert names == tables | biases | in_projs | {"out_proj_0", "cluster_weight", "cluster_bias"}
    tokens = jnp.array([[1, 4, 9]])  # one per cluster
    hh = h[:1, :3]
    fwd = jax.jit(lambda x: (model.apply(x, tokens, method="embed"), model.apply(x, hh, tokens)))

    def changed(name):
        """Which of (embed of cluster i's token, log_prob of cluster i's token) change when
        parameter `name` is perturbed."""
        p2 = dict(v["params"])
        # random noise, not a constant shift: a constant shift would cancel
        p2[name] = p2[name] + 0.3 * jax.random.normal(jax.random.PRNGKey(3), p2[name].shape)
        (e1, l1), (e2, l2) = fwd(v), fwd({"params": p2})
        return [bool(jnp.any(e1[0, i] != e2[0, i])) for i in range(3)], [bool(l1[0, i] != l2[0, i]) for i in range(3)]

    # table i: embed of cluster i and log_prob of cluster i both move (one parameter)
    assert changed("table_1") == ([False, True, False], [False, True, False])
    assert changed("table_2") == ([False, False, True], [False, False, True])
    assert changed("table_0") == ([True, False, False], [True, True, True])  # head normalizer
    # tied tail projections: one array serves both directions
    assert changed("in_proj_1") == ([False, True, False], [False, True, False])
    assert changed("in_proj_2") == ([False, False, True], [False, False, True])
    # the head projections are separate
    assert changed("in_proj_0") == ([True, False, False], [False, False, False])
    assert changed("out_proj_0") == ([False, False, False], [True, True, True])

    # untied: out_proj_i exist and in_proj_i no longer reaches the softmax
    model_u, vu, _, _ = _setup(SMALL, tie=False)
    assert set(vu["params"]) == names | {"out_proj_1", "out_proj_2"}
    p2 = dict(vu["params"])
    p2["in_proj_1"] = p2["in_proj_1"] + 0.3 * jax.random.normal(jax.random.PRNGKey(3), p2["in_proj_1"].shape)
    np.testing.assert_array_equal(model_u.apply(vu, hh, tokens), model_u.apply({"params": p2}, hh, tokens))


def test_wt103_parameter_count():
    """WT103: vocab 267735, d_model 700, cutoffs (20000, 40000, 200000), div_val 4 (widths
    700, 175, 43, 10).

    By hand: tables 20000*700 + 20000*175 + 160000*43 + 67735*10 = 25,057,350; input
    projections 700*(700 + 175 + 43 + 10) = 649,600; output biases 267,735; cluster weight
    + bias 3*700 + 3 = 2,103; with true ties the output side adds only the untied head
    projection 700*700 = 490,000. Adaptive part: 25,057,350 + 649,600 + 267,735 + 2,103 +
    490,000 = 26,466,788.

    Official: the PyTorch model prints 97,851,488 parameters in total, because its tail
    out_projs are tied by storage only and ``model.parameters()`` counts them twice
    (700*(175 + 43 + 10) = 159,600 extra); without double counting it is 97,691,888.
    """
    assert 20000 * 700 + 20000 * 175 + 160000 * 43 + 67735 * 10 == 25_057_350
    assert 700 * (700 + 175 + 43 + 10) == 649_600
    assert 25_057_350 + 649_600 + 267_735 + 2_103 + 490_000 == 26_466_788
    assert 97_851_488 - 700 * (175 + 43 + 10) == 97_691_888

    cfg = dict(vocab_size=267735, d_model=700, cutoffs=(20000, 40000, 200000), div_val=4)
    model = AdaptiveSoftmax(**cfg)  # tie_projections=True by default
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32), method="embed")
    )["params"]
    size = {k: math.prod(s.shape) for k, s in shapes.items()}
    assert [shapes[f"table_{i}"].shape for i in range(4)] == [(20000, 700), (20000, 175), (160000, 43), (67735, 10)]
    group = lambda prefix: sum(n for k, n in size.items() if k.startswith(prefix))  # noqa: E731
    assert group("table_") == 25_057_350
    assert group("in_proj_") == 649_600
    assert group("bias_") == 267_735
    assert group("cluster_") == 2_103
    assert group("out_proj_") == 490_000 and set(k for k in size if k.startswith("out_proj_")) == {"out_proj_0"}
    assert sum(size.values()) == 26_466_788
    assert param_count(**cfg) == {
        "tables": 25_057_350, "in_projs": 649_600, "out_projs": 490_000, "biases": 267_735, "clusters": 2_103,
        "total": 26_466_788,
    }
    # untied tail projections: the official double-counted figure for the adaptive part
    assert param_count(**cfg, tie_projections=False)["total"] == 26_466_788 + 159_600


@pytest.mark.parametrize(
    "cfg",
    [
        SMALL,
        dict(vocab_size=7, d_model=6, cutoffs=(2,), div_val=1),
        dict(vocab_size=5, d_model=4, cutoffs=(), div_val=3),
        dict(vocab_size=30, d_model=16, cutoffs=(4, 9, 20), div_val=2),
    ],
)
@pytest.mark.parametrize("tie", [True, False])
def test_param_count_matches_init(cfg, tie):
    model = AdaptiveSoftmax(**cfg, tie_projections=tie)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32), method="embed"))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == param_count(**cfg, tie_projections=tie)["total"]


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_matches_eager(self):
        model, v, h, t = _setup(SMALL)
        ref_lps = _np_log_probs(_np(v), h, SMALL)
        lp = self.variant(lambda v, h, t: model.apply(v, h, t))(v, h, t)
        lps = self.variant(lambda v, h: model.apply(v, h, method="log_probs"))(v, h)
        emb = self.variant(lambda v, t: model.apply(v, t, method="embed"))(v, t)
        np.testing.assert_allclose(lps, ref_lps, atol=1e-5)
        np.testing.assert_allclose(lp, np.take_along_axis(ref_lps, np.asarray(t)[..., None], -1)[..., 0], atol=1e-5)
        chex.assert_shape(emb, (*t.shape, 8))


def test_embed_by_hand_per_cluster():
    model, v, _, _ = _setup(SMALL)
    p = _np(v)
    tokens = jnp.array([[0, 2, 3, 5, 6, 10]])
    got = np.asarray(model.apply(v, tokens, method="embed"))[0]
    for j, tok in enumerate([0, 2, 3, 5, 6, 10]):
        i = 0 if tok < 3 else 1 if tok < 6 else 2
        want = p[f"table_{i}"][tok - (0, 3, 6)[i]] @ p[f"in_proj_{i}"] * math.sqrt(8)
        np.testing.assert_allclose(got[j], want, rtol=1e-5, atol=1e-6)


def test_bfloat16_h_gives_float32_log_probs():
    model, v, h, t = _setup(SMALL)
    hb = h.astype(jnp.bfloat16)
    lp = model.apply(v, hb, t)
    lps = model.apply(v, hb, method="log_probs")
    assert lp.dtype == jnp.float32 and lps.dtype == jnp.float32
    np.testing.assert_allclose(jnp.exp(lps).sum(-1), 1.0, atol=1e-5)  # normalized in float32
    np.testing.assert_allclose(lp, model.apply(v, h, t), atol=0.1)  # bfloat16 inputs, loose
    assert model.apply(v, jnp.zeros((1, 1), jnp.int32), method="embed").dtype == jnp.float32
    bf = AdaptiveSoftmax(**SMALL, dtype=jnp.bfloat16)
    assert bf.apply(v, jnp.zeros((1, 1), jnp.int32), method="embed").dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cutoffs=(6, 3)), "strictly increasing"),
        (dict(cutoffs=(3, 3)), "strictly increasing"),
        (dict(cutoffs=(3, 11)), "< vocab_size"),
        (dict(cutoffs=(0, 6)), "> 0"),
        (dict(cutoffs=(-1,)), "> 0"),
        (dict(div_val=0), "div_val"),
        (dict(d_model=8, div_val=3, cutoffs=(2, 4, 6)), "width"),
        (dict(vocab_size=0, cutoffs=()), "vocab_size"),
    ],
)
def test_bad_configurations_raise(kwargs, match):
    cfg = {**SMALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        AdaptiveSoftmax(**cfg)
    with pytest.raises(ValueError, match=match):
        param_count(**cfg)


def test_wrong_hidden_size_raises():
    model, v, h, t = _setup(SMALL)
    with pytest.raises(ValueError, match="d_model"):
        model.apply(v, h[..., :4], t)
