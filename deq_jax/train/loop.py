"""The training loop: run folder, logging, evaluation, checkpoints, exact resume.

    summary = deq_jax.train.train(config, "runs/digits")

A run folder holds ``config.json`` (the resolved config), ``metrics.jsonl``,
``checkpoints/<step>/`` (Orbax; the last ``train.keep_checkpoints``), ``summary.json`` and
``plots/``. ``train(..., resume=True)`` continues from the newest checkpoint; since
batches and all randomness are functions of ``(seed, step)`` and checkpoints fall on
log boundaries, the resumed run writes the same metrics as an uninterrupted one
(timings aside). SIGTERM or SIGINT stops a run at the next log boundary with a checkpoint
(:mod:`deq_jax.train.preemption`). On several processes (:mod:`deq_jax.train.distributed`)
each loads only its rows of every batch, all save and restore the checkpoints together,
and process 0 writes the rest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deq_jax.train import checkpoint, objective, plots, preemption
from deq_jax.train import step as step_lib
from deq_jax.train.config import budgets, resolve
from deq_jax.train.metrics import MetricsWriter, read
from deq_jax.train.optim import make_optimizer
from deq_jax.train.tasks import Task, make_task

TIMING_KEYS = ("step_time", "data_time", "examples_per_s", "train_time_s", "device_peak_mb")
SHORT = {"accuracy": "acc", "perplexity": "ppl", "bpc": "bpc"}  # progress-bar names


def _global_tree(tree, sharding: NamedSharding, rows: np.ndarray | None, batch_size: int):
    """Every leaf of ``tree`` (this process's rows of a batch, or None) as a global array."""
    return jax.tree.map(lambda leaf: step_lib.global_batch(leaf, sharding, rows, batch_size), tree)


def _config_json(c) -> dict:
    return json.loads(c.to_json_best_effort())


def _prepare_run_dir(run_dir: Path, c, resume: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    if config_path.exists():
        if not resume:
            raise FileExistsError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose another --workdir"
            )
        saved = json.loads(config_path.read_text())
        if saved != _config_json(c):
            diff = sorted(_flat_diff(saved, _config_json(c)))
            raise ValueError(f"--resume with a different config than the run's config.json: {diff}")
    else:
        tmp = config_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_config_json(c), indent=2, sort_keys=True) + "\n")
        tmp.replace(config_path)


def _flat_diff(a, b, prefix=""):
    for key in set(a) | set(b):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            yield from _flat_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            yield f"{prefix}{key}: {va!r} -> {vb!r}"


def evaluate_split(eval_fn, params, task: Task, mesh, limit: int, split: str) -> dict:
    """One pass of ``eval_fn`` (from :func:`~deq_jax.train.step.make_eval_step`) over a
    split at forward step limit ``limit``: quality (accuracy, top-5, loss and what derives
    from it), per-example solver means (steps, converged, residual), f evaluations per
    batch, and the Jacobian norm / spectral radius if ``eval_fn`` measures them."""
    data_sharding = NamedSharding(mesh, P(step_lib.DATA))
    size = task.eval_batch_size
    rows = step_lib.process_rows(data_sharding, size)  # each process loads its share of every batch
    # Batches are made again for every pass (none is kept: ImageNet's would not fit).
    # A model with segment memory carries it from batch to batch: each row of the eval
    # batches is one contiguous stream, so every token is scored with up to mem_len
    # tokens of context from the batches before. The sums are over the whole global batch
    # (the eval step reduces over every device), the same on every process.
    totals, first, batches = {}, 0, 0
    memory = None
    for batch in task.eval_sets[split](rows):
        inputs, targets, weights = (step_lib.global_batch(a, data_sharding, rows, size) for a in batch)
        if memory is None:
            local = objective.initial_memory(task.model, len(batch[0]))
            memory = _global_tree(local, data_sharding, rows, size)
        sums, memory = eval_fn(params, np.int32(limit), inputs, targets, weights, np.int32(first), memory)
        first, batches = first + len(inputs), batches + 1
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n, m = totals.pop("count"), totals.pop("examples")
    loss = totals["loss"] / n
    return {
        "accuracy": totals["correct"] / n,
        "accuracy_top5": totals["correct5"] / n,
        "loss": loss,
        **task.derived(loss),
        "steps": totals["steps"] / m,
        "converged": totals["converged"] / m,
        "residual": totals["residual"] / m,
        "nfe": totals["nfe"] / batches,  # per batch, as the batched loop runs
        **{k: totals[k] / m for k in ("jac", "spectral") if k in totals},
    }


def evaluate(eval_fns, params, task: Task, c, mesh, step: int, final: bool) -> list[dict]:
    """Evaluation rows on the task's first split: ``eval`` (trained step limit, with the
    Jacobian norm, and steps to tol at ``eval.max_steps``) and, if ``final``, one
    ``budget`` row per forward step budget plus a ``final`` row per other split."""

    def run(fn, limit, split):
        return evaluate_split(fn, params, task, mesh, limit, split)

    split = task.eval_split
    at_limit = run(eval_fns["jac"], c.forward.max_steps, split)
    generous = run(eval_fns["plain"], c.eval.max_steps, split)
    rows = [
        {
            "step": step,
            "kind": "eval",
            "split": split,
            **at_limit,
            "steps_to_tol": generous["steps"],
            "converged_to_tol": generous["converged"],
            "accuracy_to_tol": generous["accuracy"],
            "loss_to_tol": generous["loss"],
        }
    ]
    if final:
        for b in budgets(c):
            rows.append({"step": step, "kind": "budget", "split": split, "budget": b,
                         **run(eval_fns["plain"], b, split)})
        for other in list(task.eval_sets)[1:]:
            rows.append({"step": step, "kind": "final", "split": other,
                         **run(eval_fns["plain"], c.forward.max_steps, other)})
    return rows


def _quality(row: dict, task: Task) -> str:
    key = task.main_metric
    return f"{key} {row[key]:.4f}" if key == "accuracy" else f"{key} {row[key]:.3f}"


# Per-step metrics summed over a log interval, and the row key of each sum.
COUNTS = {"skipped": "skipped_steps", "fwd_nonfinite": "fwd_nonfinite_examples",
          "bwd_nonfinite": "bwd_nonfinite_examples"}


def _mean_rows(history: list[dict]) -> dict:
    """One ``train`` row from a log interval's per-step metrics: counts (:data:`COUNTS`) are
    sums; the loss is a plain mean, so it is NaN when a step of the interval had a
    non-finite loss (that step was skipped); every other metric is the mean over the steps
    where it is finite (``jr`` is measured on some steps only)."""
    out = {}
    for key in history[0]:
        values = np.array([h[key] for h in history], np.float64)
        if key in COUNTS:
            out[COUNTS[key]] = float(values.sum())
        elif key == "loss":
            out[key] = float(values.mean())
        else:
            finite = values[np.isfinite(values)]
            out[key] = float(finite.mean()) if finite.size else float("nan")
    return out


def _check_skips(skipped: list[float], first_step: int, streak: tuple[int, int], limit: int, row: dict):
    """Updates ``(streak length, its first step)`` with an interval's skipped flags (the
    interval starts at global step ``first_step``); ``FloatingPointError`` once ``limit``
    consecutive steps were skipped. Returns the new streak."""
    length, start = streak
    for i, flag in enumerate(skipped):
        length, start = (length + 1, start if length else first_step + i) if flag else (0, 0)
        if length >= limit:
            end = first_step + i
            cause = (
                f"{row['fwd_nonfinite_examples']:.0f} examples of the last interval met NaN/Inf in their forward "
                "solve: look for NaN/Inf in the inputs, or a cell that overflows"
                if row.get("fwd_nonfinite_examples")
                else "the training diverged: lower optim.learning_rate, raise jr.gamma or lower forward.max_steps"
            )
            raise FloatingPointError(
                f"{length} consecutive training steps ({start} to {end}) had a non-finite loss or gradient and "
                f"were skipped (train.max_skipped_steps = {limit}); the parameters are those from before step "
                f"{start} and every checkpoint written is finite. Likely cause: {cause}."
            )
    return length, start


@jax.jit
def _finite(tree) -> jax.Array:
    """Whether every float leaf of ``tree`` is finite, reduced on the devices (a leaf sharded
    over several processes is never fetched), the same answer on every process."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.bool_(True)


def _all_finite(tree) -> bool:
    return bool(_finite(tree))


def _check_same_start(start: int, run_dir: Path) -> None:
    """On several hosts every process restores from ``run_dir`` and writes to it together:
    all must have found the same newest checkpoint (``run_dir`` on a filesystem every host
    shares, or cloud storage). Otherwise every process stops with an error listing them."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    found = [int(s) for s in np.ravel(multihost_utils.process_allgather(np.int64(start)))]
    if len(set(found)) > 1:
        steps = ", ".join(f"process {i}: {s or 'none'}" for i, s in enumerate(found))
        raise RuntimeError(
            f"the processes found different newest checkpoints in {run_dir} ({steps}): the run folder must be "
            "one folder that every host shares (a shared filesystem or cloud storage), not a copy per host")


def train(config, run_dir, *, resume: bool = False, progress: bool = True) -> dict:
    """Trains a DEQ as ``config`` says (an MDEQ on images or a DEQ-Transformer on text,
    by ``data.name``), writing the run folder ``run_dir``.

    Args:
      config: a ConfigDict/dict of overrides of :func:`deq_jax.train.config.default_config`.
      run_dir: the run folder (created; must not hold another run unless ``resume``).
      resume: continue from the newest checkpoint of ``run_dir`` (same config required).
      progress: show a progress bar.

    Returns:
      The summary dict (also written to ``summary.json`` when the run completes).
    """
    c = resolve(config)
    run_dir = Path(run_dir)
    lead = jax.process_index() == 0
    if lead:
        _prepare_run_dir(run_dir, c, resume)

    mesh = step_lib.make_mesh()
    step_lib.check_batch(c.train.batch_size, mesh)
    step_lib.check_batch(c.eval.batch_size, mesh, "eval.batch_size")
    task = make_task(c)
    model = task.model
    tx, lr = make_optimizer(c)
    state = step_lib.init_state(model, c, tx, task.sample_input, mesh)
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    _sync("run folder ready")  # process 0 made it: the others open its checkpoints
    ckpts = checkpoint.Checkpoints(run_dir, c.train.keep_checkpoints)
    try:
        return _train(c, run_dir, resume, progress, task, mesh, tx, lr, state, writer, ckpts)
    finally:
        ckpts.close()  # waits for the last save; raises its error


def _sync(name: str) -> None:
    """A barrier across the processes of a multi-process run (nothing on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _train(c, run_dir: Path, resume: bool, progress: bool, task: Task, mesh, tx, lr, state, writer, ckpts) -> dict:
    """The training loop of :func:`train`, from its newest checkpoint when ``resume``."""
    from tqdm.auto import tqdm

    lead, model = jax.process_index() == 0, task.model
    start, train_time = 0, 0.0
    found = ckpts.steps() if resume else []
    _check_same_start(found[-1] if found else 0, run_dir)
    if found:  # restored into the live state's shardings (the memory stays split over `data`)
        state, start = ckpts.restore(state)
    if lead:
        writer.truncate_after(start)
        done = [r for r in read(writer.path) if r["kind"] == "train"] if writer.path.exists() else []
        train_time = done[-1]["train_time_s"] if done else 0.0

    eval_fns = {
        "jac": step_lib.make_eval_step(model, c, mesh, with_jacobian=True),
        "plain": step_lib.make_eval_step(model, c, mesh, with_jacobian=False),
    }
    data_sharding = NamedSharding(mesh, P(step_lib.DATA))
    batch_size = c.train.batch_size
    share = step_lib.process_rows(data_sharding, batch_size)  # this process's rows of every batch
    bar = tqdm(
        total=c.train.num_steps,
        initial=start,
        disable=not (progress and lead),
        desc=f"train {c.data.name}",
        dynamic_ncols=True,
    )
    history, tick, data_s = [], time.perf_counter(), 0.0
    # One compiled step per (mode, JR or not), made when first needed: the JR coin is
    # flipped on the host (step_lib.jr_coin), so a step without JR pays nothing for it.
    compiled, compile_s, step_mb = {}, {}, {}
    streak = (0, 0)  # consecutive skipped steps, and the first of them
    with preemption.watch() as requested:
        for s in range(start, c.train.num_steps):
            stopping = None
            t_data = time.perf_counter()  # the host prepares batch s while the device runs step s - 1
            inputs, targets = task.train_batch(s, share)
            if state.memory is not None and task.stream_start(s):  # the windows start over: no context
                empty = objective.initial_memory(model, len(inputs))
                state = state.replace(memory=_global_tree(empty, data_sharding, share, batch_size))
            mode = "unrolled" if s < c.train.pretrain_steps else "deq"
            kind = (mode, step_lib.jr_coin(c, s, mode))
            inputs = step_lib.global_batch(inputs, data_sharding, share, batch_size)
            targets = step_lib.global_batch(targets, data_sharding, share, batch_size)
            data_s += time.perf_counter() - t_data
            if kind not in compiled:  # compiled ahead of time, so that training time excludes it
                t0 = time.perf_counter()
                step_fn = step_lib.make_train_step(model, c, tx, lr, mesh, mode, jr=kind[1])
                compiled[kind] = step_fn.lower(state, inputs, targets).compile()
                name = mode + ("+jr" if kind[1] else "")
                compile_s[name] = time.perf_counter() - t0
                step_mb[kind] = _executable_mb(compiled[kind])
                tick += compile_s[name]
            state, metrics = compiled[kind](state, inputs, targets)
            history.append(metrics)
            bar.update(1)
            done_steps = s + 1
            if done_steps % c.train.log_every == 0 or done_steps == c.train.num_steps:
                history = jax.device_get(history)
                row = _mean_rows(history)
                row |= task.derived(row["loss"])
                elapsed = time.perf_counter() - tick
                train_time += elapsed
                row |= {
                    "step_time": elapsed / len(history),
                    # Host time per step spent on the batch (loading, augmenting, device_put).
                    # Dispatch is asynchronous, so it overlaps the device's work unless it is
                    # about as long as step_time: then the device waits for data.
                    "data_time": data_s / len(history),
                    "examples_per_s": len(history) * c.train.batch_size / elapsed,
                    "train_time_s": train_time,
                    "step_memory_mb": max(mb for k, mb in step_mb.items() if k[0] == mode),
                    "device_peak_mb": _device_peak_mb(),
                }
                if lead:
                    writer.write({"step": done_steps, "kind": "train", "mode": mode, **row})
                bar.set_postfix(
                    loss=f"{row['loss']:.3f}",
                    **{SHORT[task.main_metric]: f"{row[task.main_metric]:.3f}"},
                    fwd=f"{row['fwd_steps']:.1f}",
                    res=f"{row['fwd_residual']:.1e}",
                    jr=f"{row['jr']:.2e}",
                    gamma=f"{row['gamma']:.2f}",
                )
                skipped = [float(h["skipped"]) for h in history]
                streak = _check_skips(skipped, done_steps - len(history), streak, c.train.max_skipped_steps, row)
                history, tick, data_s = [], time.perf_counter(), 0.0
                # A signal stops the run here, at a log boundary: its checkpoint resumes to
                # exactly the metrics of an uninterrupted run. Every process stops at the same step.
                stopping = preemption.agreed(requested())
            final = done_steps == c.train.num_steps
            if done_steps % c.train.eval_every == 0 or final:
                t0 = time.perf_counter()
                rows = evaluate(eval_fns, state.params, task, c, mesh, done_steps, final)
                if lead:
                    for row in rows:
                        writer.write(row)
                    bar.write(
                        f"step {done_steps}: {task.eval_split} {_quality(rows[0], task)} | "
                        f"fwd steps {rows[0]['steps']:.2f} (to tol {rows[0]['steps_to_tol']:.2f}) | "
                        f"rel residual {rows[0]['residual']:.2e} | ||J||_F^2/d {rows[0]['jac']:.3e}"
                        + (f" | rho {rows[0]['spectral']:.3f}" if "spectral" in rows[0] else "")
                    )
                tick += time.perf_counter() - t0  # evaluation time is not training time
            if done_steps % c.train.checkpoint_every == 0 or final or stopping:  # every process saves its shards
                if not _all_finite(state):  # skipped steps make this unreachable; checked all the same
                    raise FloatingPointError(
                        f"the training state at step {done_steps} is not finite; no checkpoint was written for it "
                        "(the earlier ones are finite)"
                    )
                ckpts.save(done_steps, state)  # asynchronous: the write overlaps the next steps
            if stopping and not final:
                bar.close()
                ckpts.wait()
                raise preemption.Interrupted(done_steps, stopping, str(run_dir))
    bar.close()
    return _finish(run_dir, lead, task, compile_s)


QUALITY_KEYS = ("accuracy", "accuracy_top5", "loss", "perplexity", "bpc")


def _executable_mb(executable) -> float:
    """Memory one call of a compiled step needs by XLA's own analysis (arguments, outputs
    and temporaries, less donated buffers), in MiB; NaN where the backend gives none."""
    m = executable.memory_analysis()
    if m is None:
        return float("nan")
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return total / 2**20


def _device_peak_mb() -> float:
    """Peak memory in use on the first local device so far (MiB); NaN where the platform
    reports none (CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return float("nan")
    return stats["peak_bytes_in_use"] / 2**20


def _per_mode(train_rows: list[dict]) -> dict:
    """Training time (compilation excluded) and XLA's memory of one step, per mode."""
    time_s, memory = {}, {}
    previous = 0
    for r in train_rows:
        time_s[r["mode"]] = time_s.get(r["mode"], 0.0) + r["step_time"] * (r["step"] - previous)
        if r.get("step_memory_mb") is not None:
            memory[r["mode"]] = r["step_memory_mb"]
        previous = r["step"]
    return {"train_time_s_by_mode": time_s, "step_memory_mb": memory}


def _finish(run_dir: Path, lead: bool, task: Task, compile_s: dict) -> dict:
    rows = read(run_dir / "metrics.jsonl")
    last_step = max(r["step"] for r in rows)
    final = next(r for r in rows if r["kind"] == "eval" and r["step"] == last_step)
    train_rows = [r for r in rows if r["kind"] == "train"]
    split = final["split"]
    summary = {
        "run_dir": str(run_dir),
        "data": task.name,
        "steps": last_step,
        "eval_split": split,
        "main_metric": task.main_metric,
        **{f"{split}_{k}": final[k] for k in QUALITY_KEYS if k in final},
        **{f"{r['split']}_{k}": r[k] for r in rows if r["kind"] == "final" and r["step"] == last_step
           for k in QUALITY_KEYS if k in r},
        **task.baselines,
        "fwd_steps_at_limit": final["steps"],
        "fwd_steps_to_tol": final["steps_to_tol"],
        "converged_to_tol": final["converged_to_tol"],
        "residual_at_limit": final["residual"],
        "jacobian_frobenius_sq_per_dim": final["jac"],
        "spectral_radius": final.get("spectral"),
        "fwd_nfe_per_batch": final["nfe"],
        "train_time_s": train_rows[-1]["train_time_s"],
        **_per_mode(train_rows),
        "compile_s": compile_s,
        "budgets": {
            r["budget"]: {k: r[k] for k in QUALITY_KEYS + ("residual",) if k in r}
            for r in rows if r["kind"] == "budget" and r["step"] == last_step
        },
    }
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        summary["plots"] = [str(p) for p in plots.plot_runs([run_dir], run_dir / "plots")]
    return summary


def describe(summary: dict) -> str:
    """One line: the main metric (and its baseline), solver steps, residual, Jacobian norm, time."""
    key, split = summary["main_metric"], summary["eval_split"]
    quality = f"{split} {key} {summary[f'{split}_{key}']:.4g}"
    baseline = {"bpc": "unigram_bpc", "perplexity": "unigram_perplexity"}.get(key)
    if baseline in summary:
        quality += f" (unigram {summary[baseline]:.4g})"
    return (
        f"{quality} | forward steps at limit {summary['fwd_steps_at_limit']:.2f}, "
        f"to tol {summary['fwd_steps_to_tol']:.2f} | residual {summary['residual_at_limit']:.2e} | "
        f"||J||_F^2/d {summary['jacobian_frobenius_sq_per_dim']:.3e}"
        + (f" | rho {summary['spectral_radius']:.3f}" if summary.get("spectral_radius") is not None else "")
        + f" | train time {summary['train_time_s']:.0f} s (compilation excluded)"
    )
