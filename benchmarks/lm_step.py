"""Word-level training step of the WikiText-103 config: adaptive vs full softmax, memory.

    python benchmarks/lm_step.py                          # CPU sizes (a few minutes on 2 cores)
    python benchmarks/lm_step.py --full                   # the config's own sizes (GPU)
    python benchmarks/lm_step.py --vocab 267735 --d_model 128 --d_ff 512

Builds the ``lm_wikitext103`` config's train step (``deq_jax.train.step.make_train_step``:
pre-LN DEQ-Transformer, segment memory, Anderson forward and Broyden implicit backward
at 14 steps, JR on every DEQ+JR step) on random Zipf-distributed tokens, and times, per
output layer (the adaptive softmax with the config's cutoffs scaled to the vocabulary,
and a full tied softmax over the same vocabulary):

* pretraining (2 unrolled cells), DEQ without JR and DEQ with JR: the median of
  ``--repeats`` steps after a compile-and-warm-up step, in ms, and tokens per second;
* the memory XLA's own analysis says one call of the compiled step needs (MiB);
* the ratio full / adaptive of each step time (> 1: adaptive is faster), measured in one
  run (these machines are noisy: compare ratios, not absolute times across runs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax.configs import lm_wikitext103
from deq_jax.models import DEQTransformer
from deq_jax.train import config as config_lib
from deq_jax.train import step as step_lib
from deq_jax.train.loop import _executable_mb
from deq_jax.train.optim import make_optimizer

MODES = (("pretrain", "unrolled", 0.0), ("deq", "deq", 0.0), ("deq+jr", "deq", 1.0))


def scaled_cutoffs(vocab: int) -> str:
    """The official cutoffs (20000, 40000, 200000 of 267735) at the same fractions of ``vocab``."""
    return ",".join(str(max(1, round(vocab * c / 267_735))) for c in (20_000, 40_000, 200_000))


def build_config(args, adaptive: bool, jr_prob: float):
    c = lm_wikitext103.get_config()
    c.data.data_dir = "unused"
    if not args.full:
        c.model.update(d_model=args.d_model, num_heads=args.num_heads, d_ff=args.d_ff, mem_len=args.mem_len)
        c.train.update(batch_size=args.batch, seq_len=args.seq_len)
    c.model.cutoffs = scaled_cutoffs(args.vocab) if adaptive else ""
    c.model.div_val = 4 if adaptive else 1
    c.jr.prob = jr_prob
    return config_lib.resolve(c)


def time_step(args, adaptive: bool, mode: str, jr_prob: float) -> dict:
    c = build_config(args, adaptive, jr_prob)
    m = c.model
    model = DEQTransformer(args.vocab, d_model=m.d_model, num_heads=m.num_heads, d_ff=m.d_ff, pre_ln=m.pre_ln,
                           dropout=m.dropout, mem_len=m.mem_len, cutoffs=config_lib.cutoffs(c), div_val=m.div_val)
    mesh = step_lib.make_mesh()
    tx, lr = make_optimizer(c)
    sample = np.zeros((1, c.train.seq_len), np.int32)
    state = step_lib.init_state(model, c, tx, sample, mesh)
    jr = jr_prob > 0 and step_lib.jr_weight_enabled(c, mode)
    step = step_lib.make_train_step(model, c, tx, lr, mesh, mode, jr=jr)
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, args.vocab + 1)
    tokens = rng.choice(args.vocab, (args.repeats + 2, c.train.batch_size, c.train.seq_len + 1), p=p / p.sum())
    batches = [(jnp.asarray(t[:, :-1], jnp.int32), jnp.asarray(t[:, 1:], jnp.int32)) for t in tokens]
    compiled = step.lower(state, *batches[0]).compile()
    state, metrics = compiled(state, *batches[0])  # warm up
    jax.block_until_ready(metrics)
    times = []
    for inputs, targets in batches[1:]:
        start = time.perf_counter()
        state, metrics = compiled(state, inputs, targets)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    ms = 1e3 * statistics.median(times)
    return {"ms": ms, "tokens_per_s": c.train.batch_size * c.train.seq_len / (ms / 1e3), "mb": _executable_mb(compiled),
            "loss": float(metrics["loss"]), "batch": c.train.batch_size, "seq_len": c.train.seq_len,
            "d_model": m.d_model, "cutoffs": m.cutoffs}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=267_735, help="vocabulary size (WikiText-103: 267735)")
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--d_ff", type=int, default=512)
    parser.add_argument("--mem_len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="the config's own widths, batch and lengths (GPU)")
    args = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, vocab {args.vocab}")
    rows = {}
    for name, mode, jr_prob in MODES:
        for adaptive in (True, False):
            rows[name, adaptive] = time_step(args, adaptive, mode, jr_prob)
    r = rows["deq", True]
    print(f"batch {r['batch']} x {r['seq_len']} tokens, d_model {r['d_model']}, adaptive cutoffs {r['cutoffs']}, "
          f"div_val 4; median of {args.repeats} steps\n")
    print("| step | adaptive ms | full softmax ms | full / adaptive | adaptive tokens/s | full tokens/s "
          "| adaptive MiB | full MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, _, _ in MODES:
        a, f = rows[name, True], rows[name, False]
        print(f"| {name} | {a['ms']:.1f} | {f['ms']:.1f} | {f['ms'] / a['ms']:.2f} | {a['tokens_per_s']:.0f} "
              f"| {f['tokens_per_s']:.0f} | {a['mb']:.0f} | {f['mb']:.0f} |")


if __name__ == "__main__":
    main()
