"""The training configuration: every key, its default and its check.

Configs are ``ml_collections.ConfigDict`` files (``deq_jax/configs/*.py``, each a
``get_config()`` that starts from :func:`default_config`). :func:`resolve` merges a
config into the defaults and rejects unknown keys, so a typo never passes silently.
"""

from __future__ import annotations

import difflib

import ml_collections

from deq_jax import jacobian, solvers
from deq_jax.data.pipeline import IMAGE_DATA
from deq_jax.data.text import TEXT_DATA
from deq_jax.mixed_precision import COMPUTE_DTYPES
from deq_jax.solvers.base import MATMUL_PRECISIONS

SCHEDULES = ("constant", "staircase", "adaptive")
RANDOM_LOWER_RULES = ("every_step", "jr_steps")
BACKWARD_MODES = ("implicit", "phantom", "reversible")
OPTIMIZERS = ("adam", "sgd")
JR_MODES = jacobian.MODES


def default_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with the digits defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # Images (MDEQ): "digits" (embedded), "cifar10" (TFDS, prepared), "imagenet2012" (TFDS,
    # downloaded by hand and prepared; streamed). Text (DEQ-Transformer): "pydoc" and
    # "pydoc_words" (embedded), "tiny_shakespeare" (TFDS), "wikitext103" (files).
    c.data.name = "digits"
    c.data.data_dir = ""  # TFDS data_dir ("" = ~/tensorflow_datasets); the folder of the WikiText-103 files
    c.data.image_size = 0  # imagenet2012: side of the square crops (0 = 224); other image sets have fixed sizes
    c.data.augment = True  # images: training crop/flip (CIFAR-10: pad-4 crop + flip; ImageNet: resized crop + flip)
    # digits, cifar10: this fraction of the training set held out (stratified, from the seed)
    # as a "validation" split, evaluated first (the training-time evaluation rows and the
    # summary's main metric), the test set as a final split: for choosing hyperparameters
    # without looking at the test set. 0: no validation split.
    c.data.validation_fraction = 0.0

    c.model = ml_collections.ConfigDict()
    c.model.dropout = 0.0  # variational dropout inside the cell (mask fixed across solver steps)
    c.model.size = "digits"  # MDEQ: deq_jax.models.SIZES (digits, tiny, cifar, small)
    c.model.d_model = 128  # DEQ-Transformer: state width
    c.model.num_heads = 4  # DEQ-Transformer: attention heads (divide d_model)
    c.model.d_ff = 512  # DEQ-Transformer: feed-forward hidden width
    c.model.pre_ln = False  # DEQ-Transformer: pre-LN block (post-LN: unique fixed point at init)
    c.model.tie_embeddings = True  # DEQ-Transformer: output projection = embedding transpose
    c.model.mem_len = 0  # DEQ-Transformer: segment memory (positions of the stream before the segment)
    c.model.cutoffs = ""  # DEQ-Transformer: adaptive embeddings/softmax cluster starts, e.g. "20000,40000,200000"
    c.model.div_val = 1  # DEQ-Transformer: adaptive cluster i has width d_model // div_val**i
    # dtype the equilibrium cell computes in: "float32", or "bfloat16" for mixed precision
    # (parameters, solver and the rest of the model stay float32; set tolerances >= 1e-2).
    c.model.compute_dtype = "float32"

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32  # global batch, split over all devices
    c.train.num_steps = 500
    c.train.pretrain_steps = 150  # steps with the cell unrolled, before DEQ mode
    c.train.pretrain_layers = 4  # k weight-tied layers while pretraining
    c.train.seq_len = 64  # text: tokens per window (train and eval)
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.checkpoint_every = 50  # multiple of log_every (exact resume)
    c.train.keep_checkpoints = 3
    c.train.max_skipped_steps = 10  # consecutive non-finite (skipped) steps before the run stops

    c.forward = ml_collections.ConfigDict()
    c.forward.solver = "broyden"  # broyden | anderson | fixed_point_iteration | reversible (RevDEQ's iteration)
    c.forward.beta = 0.5  # the reversible iteration's relaxation, in (0, 2), not 1
    c.forward.max_steps = 12
    c.forward.tol = 1e-3
    c.forward.stop_mode = "rel"
    c.forward.random_lower = 2  # random change of the step limit, see random_lower_rule
    # "every_step" (DEQ-Sequence): limit - U{0..random_lower} on every DEQ step;
    # "jr_steps" (MDEQ-Vision): limit + U{-random_lower..+1} on steps that apply JR only.
    c.forward.random_lower_rule = "every_step"
    c.forward.causal = True  # text models: solve causally along the sequence (no effect on images)
    # Matmul precision of f in the solve: None = platform default (TF32 for float32 on NVIDIA
    # GPUs), or a jax.default_matmul_precision value, e.g. "highest" (full float32).
    c.forward.precision = ml_collections.config_dict.placeholder(str)
    # False: the training solves always run max_steps steps (per-example stopping kept, same
    # result), a trip count known at compile time: no loop predicate copied to the host per
    # step on a GPU. Evaluation solves always exit early.
    c.forward.early_exit = True

    c.backward = ml_collections.ConfigDict()
    # "implicit" (adjoint solve), "phantom", or "reversible" (the exact gradient of the reversible
    # iteration by running it backwards, deq_jax.Reversible; needs forward.solver "reversible")
    c.backward.mode = "implicit"
    c.backward.solver = "broyden"
    c.backward.max_steps = 12
    c.backward.tol = 1e-4
    c.backward.stop_mode = "rel"
    c.backward.precision = ml_collections.config_dict.placeholder(str)  # of the VJPs, as forward.precision
    c.backward.early_exit = True  # as forward.early_exit, for the adjoint solve
    c.backward.phantom_steps = 5
    c.backward.phantom_damping = 0.5

    c.jr = ml_collections.ConfigDict()
    # Weight of ||J_f(z*)||_F^2 / d in the loss; 0 disables JR. Digits: 4, because JR starts
    # with the DEQ phase (jr.pretrain_gamma 0) and has 350 steps to condition the cell; at 1
    # it did not separate from no JR over 3 seeds (docs/results.md, hard-stopped budgets).
    c.jr.gamma = 4.0
    c.jr.pretrain_gamma = 0.0  # JR weight while pretraining (unrolled); the official code's default 0
    c.jr.stop_step = -1  # JR is off from this global step on (-1: never stops)
    c.jr.num_probes = 1
    # How the Hutchinson estimate is formed: "jvp" (||J eps||^2, forward mode) or "vjp"
    # (||eps^T J||^2, the paper's). With Gaussian probes both have the same distribution;
    # "jvp" is cheaper for the MDEQ and DEQ-Transformer cells and keeps every convolution
    # of the term's gradient in XLA CPU's fast layout (benchmarks/jr_cost.py); "vjp" works
    # for cells without forward-mode derivatives (a custom_vjp inside the cell).
    c.jr.mode = "jvp"
    c.jr.prob = 0.5  # probability of applying JR at a step
    c.jr.schedule = "constant"  # constant | staircase | adaptive
    c.jr.staircase_delta = 0.1  # staircase: +delta every staircase_every steps after pretraining
    c.jr.staircase_every = 100
    c.jr.target_steps = 6.0  # adaptive: forward steps the schedule aims for
    c.jr.target_residual = 1e-3  # adaptive: mean relative residual it tolerates
    c.jr.slack = 0.25  # adaptive: lower gamma only below (1 - slack) * target_steps
    c.jr.up = 1.05  # adaptive: gamma *= up when over target
    c.jr.down = 0.98  # adaptive: gamma *= down when comfortably under
    c.jr.ema = 0.9  # adaptive: smoothing of the observed steps and residual
    c.jr.gamma_min = 0.05
    c.jr.gamma_max = 10.0

    # Fixed-point correction (deq_jax.Correction) of the DEQ training steps: the loss of n_states
    # iterates of the forward solve, the last z*, weighted gamma^(n_states - 1 - i); 1 = z* only.
    c.correction = ml_collections.ConfigDict()
    c.correction.n_states = 1
    c.correction.gamma = 0.8

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"  # adam | sgd (momentum, nesterov)
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 50
    c.optim.min_lr_ratio = 0.0  # cosine decays to learning_rate * min_lr_ratio
    c.optim.momentum = 0.9
    c.optim.weight_decay = 0.0  # Adam: decoupled (AdamW); SGD: added to the gradient before momentum
    c.optim.clip_norm = 1.0  # global-norm gradient clipping; 0 disables

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 200  # images per eval batch; text: streams (windows of train.seq_len)
    c.eval.max_steps = 30  # generous limit for "steps needed to reach tol"
    c.eval.budgets = "all"  # "all" = 1..forward.max_steps, or "1,2,4,8"
    c.eval.jac_probes = 4
    c.eval.spectral_iters = 100  # power-method VJPs for the spectral radius of J_f(z*); 0 skips it

    # Join a multi-process run that JAX detects (SLURM, Open MPI, Kubernetes, Cloud TPU); processes
    # started by hand take the --coordinator_address, --num_processes and --process_id flags instead.
    c.multihost = False
    return c


def _check_keys(config, reference, prefix=""):
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ValueError(
                f"unknown config key {path!r}{hint} Valid keys here: {sorted(reference.keys())}"
            )
        value, ref = config[key], reference[key]
        if isinstance(ref, ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                raise ValueError(f"config key {path!r} must be a group of keys, got {value!r}")
            _check_keys(value, ref, path + ".")


def _merge(target, source):
    for key in source.keys():
        if isinstance(target[key], ml_collections.ConfigDict):
            _merge(target[key], source[key])
        else:
            target[key] = source[key]


def resolve(config: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict:
    """Defaults updated by ``config``; unknown keys and bad values raise ``ValueError``.

    Returns a locked ConfigDict (assigning an unknown key later also fails).
    """
    resolved = default_config()
    _check_keys(config, resolved)
    _merge(resolved, config)
    validate(resolved)
    resolved.lock()
    return resolved


def _require(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


def validate(c: ml_collections.ConfigDict) -> None:
    """Value checks that would otherwise fail late (or silently) in training."""
    _require(
        c.data.name in IMAGE_DATA + TEXT_DATA,
        f"data.name must be one of {IMAGE_DATA + TEXT_DATA}, got {c.data.name!r}",
    )
    _require(
        c.data.image_size == 0 or (c.data.image_size > 0 and c.data.name == "imagenet2012"),
        f"data.image_size applies to imagenet2012 only and must be > 0 there (0: 224), got {c.data.image_size}",
    )
    _require(isinstance(c.data.augment, bool), f"data.augment must be True or False, got {c.data.augment!r}")
    _require(
        c.data.validation_fraction == 0
        or (0 < c.data.validation_fraction < 1 and c.data.name in ("digits", "cifar10")),
        f"data.validation_fraction must be 0, or in (0, 1) for digits and cifar10 (imagenet2012 and the text sets "
        f"have their own validation splits), got {c.data.validation_fraction}",
    )
    m = c.model
    _require(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
    if c.data.name in TEXT_DATA:
        _require(min(m.d_model, m.num_heads, m.d_ff) >= 1, "model.d_model, num_heads and d_ff must be >= 1")
        _require(m.mem_len >= 0, f"model.mem_len must be >= 0, got {m.mem_len}")
        _require(m.div_val >= 1, f"model.div_val must be >= 1, got {m.div_val}")
        cutoffs(c)
        _require(
            m.d_model % m.num_heads == 0 and (m.d_model // m.num_heads) % 2 == 0,
            f"model.d_model ({m.d_model}) must split into num_heads ({m.num_heads}) heads of even width (rotary)",
        )
    t = c.train
    _require(t.seq_len >= 1, f"train.seq_len must be >= 1, got {t.seq_len}")
    _require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _require(t.num_steps >= 1, f"train.num_steps must be >= 1, got {t.num_steps}")
    _require(
        0 <= t.pretrain_steps < t.num_steps,
        f"train.pretrain_steps must be in [0, train.num_steps) (some DEQ training must follow), got "
        f"{t.pretrain_steps} with train.num_steps {t.num_steps}",
    )
    _require(t.pretrain_layers >= 1, "train.pretrain_layers must be >= 1")
    for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "max_skipped_steps"):
        _require(t[key] >= 1, f"train.{key} must be >= 1, got {t[key]}")
    _require(
        t.checkpoint_every % t.log_every == 0,
        f"train.checkpoint_every ({t.checkpoint_every}) must be a multiple of train.log_every ({t.log_every}), "
        "so that a resumed run logs exactly what an uninterrupted one does",
    )
    for part in ("forward", "backward"):
        s = c[part]
        _require(
            s.solver in solvers.SOLVERS, f"{part}.solver must be one of {sorted(solvers.SOLVERS)}, got {s.solver!r}"
        )
        _require(s.max_steps >= 1 and s.tol > 0, f"{part}.max_steps must be >= 1 and {part}.tol > 0")
        _require(s.stop_mode in ("rel", "abs"), f"{part}.stop_mode must be 'rel' or 'abs', got {s.stop_mode!r}")
        _require(
            s.precision in MATMUL_PRECISIONS,
            f"{part}.precision must be one of {MATMUL_PRECISIONS}, got {s.precision!r}",
        )
    _require(
        0 <= c.forward.random_lower < c.forward.max_steps,
        "forward.random_lower must be in [0, forward.max_steps)",
    )
    _require(
        c.forward.random_lower_rule in RANDOM_LOWER_RULES,
        f"forward.random_lower_rule must be one of {RANDOM_LOWER_RULES}, got {c.forward.random_lower_rule!r}",
    )
    _require(isinstance(c.forward.causal, bool), f"forward.causal must be True or False, got {c.forward.causal!r}")
    _require(c.backward.mode in BACKWARD_MODES, f"backward.mode must be one of {BACKWARD_MODES}")
    _require(
        c.backward.mode != "reversible" or c.forward.solver == "reversible",
        f"backward.mode 'reversible' needs forward.solver 'reversible' (it runs that iteration backwards), "
        f"got forward.solver {c.forward.solver!r}",
    )
    if c.forward.solver == "reversible":
        _require(
            isinstance(c.forward.beta, (int, float)) and 0 < c.forward.beta < 2 and c.forward.beta != 1,
            f"forward.beta must be in (0, 2) and not 1, got {c.forward.beta!r}",
        )
    _require(
        c.model.compute_dtype in COMPUTE_DTYPES,
        f"model.compute_dtype must be one of {COMPUTE_DTYPES}, got {c.model.compute_dtype!r}",
    )
    j = c.jr
    _require(j.gamma >= 0, f"jr.gamma must be >= 0, got {j.gamma}")
    _require(j.pretrain_gamma >= 0, f"jr.pretrain_gamma must be >= 0, got {j.pretrain_gamma}")
    _require(
        j.stop_step == -1 or j.stop_step >= 0, f"jr.stop_step must be -1 (never) or a step >= 0, got {j.stop_step}"
    )
    _require(j.num_probes >= 1, "jr.num_probes must be >= 1")
    _require(j.mode in JR_MODES, f"jr.mode must be one of {JR_MODES}, got {j.mode!r}")
    _require(0 <= j.prob <= 1, f"jr.prob must be in [0, 1], got {j.prob}")
    _require(j.schedule in SCHEDULES, f"jr.schedule must be one of {SCHEDULES}, got {j.schedule!r}")
    _require(j.staircase_every >= 1, "jr.staircase_every must be >= 1")
    _require(j.up >= 1 and 0 < j.down <= 1, "jr.up must be >= 1 and jr.down in (0, 1]")
    _require(0 <= j.ema < 1 and 0 <= j.slack < 1, "jr.ema and jr.slack must be in [0, 1)")
    _require(0 < j.gamma_min <= j.gamma_max, "need 0 < jr.gamma_min <= jr.gamma_max")
    _require(
        isinstance(c.correction.n_states, int) and 1 <= c.correction.n_states <= c.forward.max_steps,
        f"correction.n_states must be in [1, forward.max_steps={c.forward.max_steps}], got {c.correction.n_states!r}",
    )
    _require(0 < c.correction.gamma <= 1, f"correction.gamma must be in (0, 1], got {c.correction.gamma}")
    o = c.optim
    _require(o.name in OPTIMIZERS, f"optim.name must be one of {OPTIMIZERS}, got {o.name!r}")
    _require(o.learning_rate > 0 and o.warmup_steps >= 0, "optim.learning_rate must be > 0, warmup_steps >= 0")
    _require(o.weight_decay >= 0 and o.clip_norm >= 0, "optim.weight_decay and optim.clip_norm must be >= 0")
    _require(c.eval.batch_size >= 1 and c.eval.jac_probes >= 1, "eval.batch_size and eval.jac_probes must be >= 1")
    _require(
        c.eval.spectral_iters == 0 or c.eval.spectral_iters >= 2,
        f"eval.spectral_iters must be 0 (off) or >= 2, got {c.eval.spectral_iters}",
    )
    _require(c.eval.max_steps >= c.forward.max_steps, "eval.max_steps must be >= forward.max_steps")
    budgets(c)


def budgets(c: ml_collections.ConfigDict) -> list[int]:
    """The forward step budgets evaluated at the end (the paper's Table 3 view)."""
    if c.eval.budgets == "all":
        return list(range(1, c.forward.max_steps + 1))
    try:
        values = sorted({int(b) for b in str(c.eval.budgets).split(",")})
    except ValueError:
        raise ValueError(f"eval.budgets must be 'all' or comma-separated ints, got {c.eval.budgets!r}") from None
    _require(all(1 <= b <= c.eval.max_steps for b in values), f"eval.budgets must lie in [1, {c.eval.max_steps}]")
    return values


def cutoffs(c: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The adaptive softmax's cluster starts (``model.cutoffs``; empty: no clusters)."""
    text = str(c.model.cutoffs).strip()
    if not text:
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"model.cutoffs must be comma-separated ints or '', got {c.model.cutoffs!r}") from None
    _require(all(a < b for a, b in zip(values, values[1:])) and values[0] > 0,
             f"model.cutoffs must be positive and increasing, got {c.model.cutoffs!r}")
    return values
