"""Language modelling end to end: train steps (pre-/post-LN), perplexity, the loop, sampling."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq_jax.data import text
from deq_jax.models.deq_transformer import rotary
from deq_jax.train import config as config_lib
from deq_jax.train import loop
from deq_jax.train import step as step_lib
from deq_jax.train.optim import make_optimizer
from deq_jax.train.sampling import generate, load_run, next_token_logits_fn
from deq_jax.train.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]


def lm_config(**overrides):
    """A seconds-long pydoc run with a tiny DEQ-Transformer."""
    c = {
        "data": {"name": "pydoc"},
        "model": {"d_model": 32, "num_heads": 4, "d_ff": 64, "dropout": 0.1},
        "train": {"batch_size": 8, "seq_len": 16, "num_steps": 6, "pretrain_steps": 2, "pretrain_layers": 2,
                  "log_every": 2, "eval_every": 6, "checkpoint_every": 2, "keep_checkpoints": 1},
        "forward": {"max_steps": 6, "random_lower": 1},
        "backward": {"max_steps": 6},
        "jr": {"prob": 1.0},
        "eval": {"batch_size": 64, "max_steps": 8, "budgets": "2,6", "jac_probes": 1, "spectral_iters": 5},
    }
    for group, values in overrides.items():
        c.setdefault(group, {}).update(values)
    return config_lib.resolve(c)


@pytest.mark.parametrize("pre_ln", [True, False])
def test_pre_and_post_ln_both_train_a_step(pre_ln):
    c = lm_config(model={"pre_ln": pre_ln}, optim={"learning_rate": 3e-3, "warmup_steps": 0})
    task = make_task(c)
    mesh = step_lib.make_mesh()
    tx, lr = make_optimizer(c)
    state = step_lib.init_state(task.model, c, tx, task.sample_input, mesh)
    before = jax.device_get(state.params)
    train_step = step_lib.make_train_step(task.model, c, tx, lr, mesh, "deq", jr=True)
    inputs, targets = task.train_batch(0)
    losses = []
    for _ in range(3):  # the same batch: the loss must fall
        state, metrics = train_step(state, inputs, targets)
        losses.append(float(metrics["loss"]))
        assert np.isfinite(float(metrics["jr"])) and 1 <= float(metrics["fwd_steps"]) <= 6
    assert losses[-1] < losses[0]
    after = jax.device_get(state.params)
    # The attention and feed-forward weights live only inside the cell: they moved.
    for name in ("attention", "ff_in", "ff_out"):
        moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before["deq"]["cell"][name],
                             after["deq"]["cell"][name])
        assert max(jax.tree.leaves(moved)) > 0, name


def test_uniform_model_has_perplexity_equal_to_the_vocabulary_size():
    c = lm_config(model={"tie_embeddings": False})
    task = make_task(c)
    mesh = step_lib.make_mesh()
    tx, _ = make_optimizer(c)
    params = jax.device_get(step_lib.init_state(task.model, c, tx, task.sample_input, mesh).params)
    params["output"] = jax.tree.map(np.zeros_like, params["output"])  # logits all 0: uniform
    eval_fns = {
        "jac": step_lib.make_eval_step(task.model, c, mesh, with_jacobian=True),
        "plain": step_lib.make_eval_step(task.model, c, mesh, with_jacobian=False),
    }
    rows = loop.evaluate(eval_fns, params, task, c, mesh, step=0, final=True)
    v = task.data.vocab_size
    # XLA CPU's fused float32 log/exp are approximations: log(V) comes out 4e-6 high
    # (relative), so exp(loss) is V to 2e-5, not to float32 rounding.
    for row in rows:
        assert row["perplexity"] == pytest.approx(v, rel=5e-5)
        assert row["bpc"] == pytest.approx(np.log2(v), rel=1e-5)
    assert [r["split"] for r in rows] == ["valid", "valid", "valid", "test"]
    assert [r.get("budget") for r in rows if r["kind"] == "budget"] == [2, 6]


def test_rotary_scores_depend_on_relative_position_only():
    q = jax.random.normal(jax.random.key(0), (1, 1, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 2, 8))

    def score(tq, tk):  # q at position tq, k at position tk
        t = max(tq, tk) + 1
        qs = rotary(jnp.zeros((1, t, 2, 8)).at[:, tq].set(q[:, 0]))[:, tq]
        ks = rotary(jnp.zeros((1, t, 2, 8)).at[:, tk].set(k[:, 0]))[:, tk]
        return jnp.sum(qs * ks, -1)

    np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score(0, 0), jnp.sum(q * k, -1)[:, 0], rtol=1e-6)
    assert not np.allclose(score(5, 2), score(5, 4), atol=1e-3)


def test_text_config_errors():
    with pytest.raises(ValueError, match="even width"):
        config_lib.resolve({"data": {"name": "pydoc"}, "model": {"d_model": 36, "num_heads": 4}})
    with pytest.raises(ValueError, match="data.name must be one of"):
        config_lib.resolve({"data": {"name": "ptb"}})


def test_lm_run_reports_bpc_and_samples_deterministically(tmp_path):
    c = lm_config()
    run = tmp_path / "lm"
    summary = loop.train(c.to_dict(), run, progress=False)
    assert summary["main_metric"] == "bpc" and summary["eval_split"] == "valid"
    for key in ("valid_bpc", "valid_perplexity", "test_bpc", "unigram_bpc"):
        assert np.isfinite(summary[key]), key
    assert summary["valid_bpc"] == pytest.approx(np.log2(summary["valid_perplexity"]), rel=1e-6)
    assert summary["unigram_bpc"] == pytest.approx(text.unigram_bits(text.load_pydoc()), rel=1e-9)
    assert sorted(summary["budgets"]) == [2, 6] and (run / "plots" / "budgets.png").exists()
    assert "valid bpc" in loop.describe(summary) and "unigram" in loop.describe(summary)

    c2, task, params, step = load_run(run)
    assert step == 6 and c2.to_dict() == c.to_dict()
    kw = dict(length=20, temperature=1.0)
    a = generate(task, params, c2, "The ", seed=3, **kw)
    assert len(a) == 20 and a == generate(task, params, c2, "The ", seed=3, **kw)
    assert a != generate(task, params, c2, "The ", seed=4, **kw)
    greedy = generate(task, params, c2, "class ", length=5, temperature=0.0)
    assert greedy == generate(task, params, c2, "class ", length=5, temperature=0.0, seed=9)
    with pytest.raises(ValueError, match="at least one token"):
        generate(task, params, c2, "", length=5)
    # One compiled function per (model, solver): a freshly loaded task of the run reuses it.
    assert next_token_logits_fn(task, c2) is next_token_logits_fn(load_run(run)[1], c2)

    # The entry point prints the same text for the same seed.
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.sample", str(run), "--prompt=The ", "--length=20",
         "--temperature=1.0", "--seed=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == ("The " + a).splitlines()[-1]
    assert json.loads((run / "config.json").read_text())["data"]["name"] == "pydoc"


def test_language_models_solve_causally_by_default_in_training_evaluation_and_sampling():
    """The LM configs' forward and evaluation solvers are causal along the sequence, the
    image ones are not; sampling's logits at the last real token do not depend on what
    fills the rest of the fixed-size window (exactly), while an ordinary solver's do."""
    from deq_jax.configs import lm_pydoc
    from deq_jax.train import objective

    for c in (config_lib.resolve(lm_pydoc.get_config()), lm_config()):
        setup = objective.solvers_from_config(c)
        assert setup.forward.causal_axis == 1 and setup.eval_forward.causal_axis == 1
    assert config_lib.resolve(lm_pydoc.get_config()).forward.solver == "anderson"
    assert objective.solvers_from_config(config_lib.resolve({})).forward.causal_axis is None  # digits

    c = lm_config(model={"dropout": 0.0})
    task = make_task(c)
    params = task.model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32), unroll=1)["params"]
    # Gains x3: far from converged within the 6 steps, where leakage would show.
    params = jax.tree_util.tree_map_with_path(lambda path, p: p * 3.0 if path[-1].key == "g" else p, params)
    window = np.zeros((1, 16), np.int32)
    window[0, :5] = [3, 1, 4, 1, 5]
    filled = window.copy()
    filled[0, 5:] = np.arange(11) % task.data.vocab_size
    causal = next_token_logits_fn(task, c)
    np.testing.assert_array_equal(causal(params, window, 4), causal(params, filled, 4))
    ordinary = next_token_logits_fn(task, config_lib.resolve(dict(c.to_dict(), forward={**c.forward.to_dict(),
                                                                                        "causal": False})))
    assert float(jnp.max(jnp.abs(ordinary(params, window, 4) - ordinary(params, filled, 4)))) > 1e-4


# --- segment memory in training and evaluation ------------------------------------------------

_MEMORY_DEVICES = r'''
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
from test_lm import lm_config
from deq_jax.train import loop, objective, step as step_lib
from deq_jax.train.optim import make_optimizer
from deq_jax.train.tasks import make_task

c = lm_config(data={"name": "pydoc_words"}, model={"mem_len": 16, "dropout": 0.0}, jr={"prob": 0.0},
              optim={"name": "sgd", "learning_rate": 0.5, "warmup_steps": 0})
task = make_task(c)
out = {}
for n in (1, 4):
    mesh = step_lib.make_mesh(jax.devices()[:n])
    tx, lr = make_optimizer(c)
    state = step_lib.init_state(task.model, c, tx, task.sample_input, mesh)
    train_step = step_lib.make_train_step(task.model, c, tx, lr, mesh, "deq", jr=False)
    data = NamedSharding(mesh, P("data"))
    losses = []
    for s in range(3):  # consecutive windows: each row continues its own stream
        inputs, targets = (jax.device_put(a, data) for a in task.train_batch(s))
        state, metrics = train_step(state, inputs, targets)
        losses.append(float(metrics["loss"]))
    assert len(state.memory.states.sharding.device_set) == n
    assert bool(state.memory.valid.all())
    eval_fn = step_lib.make_eval_step(task.model, c, mesh, with_jacobian=False)
    row = loop.evaluate_split(eval_fn, state.params, task, mesh, 6, "valid")
    out[n] = (losses, jax.device_get(state.memory), row["loss"])
np.testing.assert_allclose(out[1][0], out[4][0], rtol=1e-5)
np.testing.assert_allclose(out[1][1].states, out[4][1].states, rtol=1e-4, atol=1e-5)
np.testing.assert_allclose(out[1][2], out[4][2], rtol=1e-5)
print("OK", out[1][0], out[1][2])
'''


def test_segment_memory_crosses_device_shards_in_training_and_evaluation():
    """Training with memory on 1 and 4 devices: the same losses, and the same memory (each
    row's memory stays on the device holding that row's stream); evaluation carrying memory
    across the valid stream gives the same loss."""
    # 4 simulated CPU devices, also on a machine with a GPU.
    env = {**__import__("os").environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_DEVICES, str(ROOT / "tests")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_training_memory_is_the_previous_window_and_empties_when_the_stream_starts_over():
    c = lm_config(data={"name": "pydoc_words"}, model={"mem_len": 24}, jr={"prob": 0.0})
    task = make_task(c)
    windows = text.stream_windows(task.data.train, c.train.batch_size, c.train.seq_len)
    assert [task.stream_start(s) for s in (0, 1, windows - 1, windows, windows + 1)] == [True, False, False, True,
                                                                                            False]
    mesh = step_lib.make_mesh()
    tx, lr = make_optimizer(c)
    state = step_lib.init_state(task.model, c, tx, task.sample_input, mesh)
    assert not bool(state.memory.valid.any())
    train_step = step_lib.make_train_step(task.model, c, tx, lr, mesh, "unrolled", jr=False)
    state, _ = train_step(state, *task.train_batch(0))
    # One 16-token window in a 24-slot memory: the last 16 slots are valid.
    np.testing.assert_array_equal(np.asarray(state.memory.valid[0]), np.arange(24) >= 8)
    state, _ = train_step(state, *task.train_batch(1))
    assert bool(state.memory.valid.all())
