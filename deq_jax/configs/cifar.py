"""CIFAR-10 with the paper's MDEQ + JR, after the official ``cls_mdeq_LARGE_reg.yaml`` (needs a GPU).

The paper's CIFAR-10 numbers (Table 2, MDEQ + JR: 93.1% +- 0.3, 6 NFEs at inference, 10M
parameters) come from this model. Prepare CIFAR-10 with TFDS (see
``deq_jax.data.cifar10.PREPARE_HINT``) and pass ``--config.data.data_dir``.

Every hyperparameter: ours, the official file
``MDEQ-Vision/experiments/cifar/cls_mdeq_LARGE_reg.yaml`` of locuslab/deq (HEAD 1fb7059,
line numbers; "default" = absent from the yaml, ``lib/config/default.py``), and the paper's
Table 4 (CIFAR-10 column). "-" = not stated there.

| key | ours | official (LARGE_reg.yaml) | paper Table 4 | why different |
|---|---|---|---|---|
| augmentation | random 32x32 crop of the 4-pixel zero-padded image + h-flip | RandomCrop(32, padding=4) + RandomHorizontalFlip (AUGMENT default True; tools/cls_train.py l.167) | - | |
| normalization | mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616) | same mean, std (0.2023, 0.1994, 0.2010) (cls_train.py l.166) | - | ours: the std over all training pixels; the official values are not that statistic (about 20% smaller). A fixed rescaling of the input; kept so that cifar10 batches stay as they were |
| model.size | `cifar`: branches 32/64/128/256, 4 branches | NUM_CHANNELS 32/64/128/256 (l.42-46), NUM_BRANCHES 4 (l.24) | [28,56,112,224] | the file (Table 4's widths match no CIFAR yaml's NUM_CHANNELS; they equal SMALL_reg's HEAD_CHANNELS) |
| block inner width | 5x | EXPANSION_FACTOR 5 (l.16) | - | |
| head | bottleneck per branch, HEAD_CHANNELS 14/28/56/112 (x4 out), final 1680 | same (l.31-36; lib/models/mdeq.py) | - | BatchNorm there, GroupNorm here |
| parameters | 11.1M | (same structure) | 10M (Table 2) | |
| stem | two 3x3 stride-1 convs, GroupNorm 8 + ReLU | two 3x3 stride-1 convs + BatchNorm + ReLU (DOWNSAMPLE_TIMES 0, l.15) | no downsampling | GroupNorm: no batch statistics (per-example solving, nothing to sync) |
| injection conv | 1x1 conv + GroupNorm + ReLU | 1x1 conv + BatchNorm + ReLU (4 branches: stage0, mdeq_core.py l.337-343) | - | as the stem |
| GroupNorm groups | 8 in the cell; 4 after fusion, no scale/bias | NUM_GROUPS 8 (l.12); NUM_GROUPS//2, POST_GN_AFFINE false (l.17) | GroupNorm | same |
| weight norm | every cell conv | WNORM (l.14): block and post-fusion convs (mdeq_core.py l.72-73, 219) | yes | ours also the fusion convs |
| dropout | 0.22 variational, block's inner activation | DROPOUT 0.22 (l.13), block's second conv output | 0.25 | the file; placement differs (see imagenet.py) |
| forward solver | Broyden, limit 8, tol 1e-3, rel | broyden, F_THRES 8, STOP_MODE rel (l.49-52), eps 1e-3 (lib/solvers.py default) | 7, eps 1e-3 | the file; residual per example here, whole-batch norm there (lib/solvers.py l.155-156) |
| backward solver | Broyden implicit, limit 7, tol 1e-3, rel | broyden, B_THRES 7 (l.53) | 8, eps 1e-4 | the file (eps: solver default 1e-3) |
| random step limit | limit + U{-2..+1} on JR steps only (`jr_steps`) | RAND_F_THRES_DELTA 2 (l.54), cls_function.py l.63 | - | |
| jr.gamma | 0.4 constant | JAC_LOSS_WEIGHT 0.4 (l.62), JAC_INCREMENTAL default 1e8 | 0.5 | the file |
| jr.prob | 0.02 | JAC_LOSS_FREQ 0.02 (l.61) | 0.05 | the file |
| jr.pretrain_gamma | 0 | PRETRAIN_JAC_LOSS_WEIGHT 0.0 (l.63) | - | |
| jr.stop_step | 46800 = start of epoch 90 (520 steps an epoch) | JAC_STOP_EPOCH 90 (l.64): JR off from epoch index 90 (cls_function.py l.54) | - (not in the paper) | the same epoch; our epochs are 520 steps, the official 521 |
| jr.num_probes | 2 | jac_loss_estimate default vecs=2 (lib/jacobian.py l.7) | 1 | the file |
| pretraining | 16000 steps, 8 unrolled layers | PRETRAIN_STEPS 16000 (l.80), NUM_LAYERS 8 (l.10) | - | |
| epochs / steps | 220 epochs = 114,400 steps | END_EPOCH 220 (l.77) = 114,620 steps (partial batch kept) | 200 epochs | the file; we drop the last partial batch |
| batch | 96 | 96 per GPU x 1 GPU (l.1, 75) | 96 | |
| optimizer | Adam (optax defaults: b1 0.9, b2 0.999, eps 1e-8) | adam (l.86), torch defaults (same values) | Adam | |
| learning rate | 1e-3, cosine to 1e-6 (min_lr_ratio 1e-3), no warm-up | LR 0.001 (l.87), CosineAnnealingLR(eta_min=1e-6) over all steps (cls_train.py l.197-198) | 0.001, cosine, no warm-up | |
| weight decay | 0 | WD 0.0 (l.88) | 0 | |
| gradient clipping | none | TRAIN.CLIP -1 (default.py l.109) | - | |
| eval batch | 96 | 96 (l.72) | - | |
| eval | top-1, solver statistics, Jacobian norm, budgets 1..8 (Table 3 view) every 10 epochs | top-1 every epoch | - | each of our evaluations is two passes |
| seed | 0 | 42 | - | streams differ across frameworks anyway |
"""

from deq_jax.train.config import default_config

STEPS_PER_EPOCH = 50_000 // 96  # 520 (our epochs drop the last partial batch)


def get_config():
    c = default_config()
    c.data.name = "cifar10"
    c.model.size = "cifar"
    c.model.dropout = 0.22
    c.train.batch_size = 96
    c.train.num_steps = 220 * STEPS_PER_EPOCH
    c.train.pretrain_steps = 16_000
    c.train.pretrain_layers = 8
    c.train.log_every = 100
    c.train.eval_every = 10 * STEPS_PER_EPOCH
    c.train.checkpoint_every = 5000
    c.forward.solver = "broyden"
    c.forward.max_steps = 8
    c.forward.tol = 1e-3
    c.forward.stop_mode = "rel"
    c.forward.random_lower = 2
    c.forward.random_lower_rule = "jr_steps"
    c.backward.mode = "implicit"
    c.backward.solver = "broyden"
    c.backward.max_steps = 7
    c.backward.tol = 1e-3
    c.backward.stop_mode = "rel"
    c.jr.gamma = 0.4
    c.jr.schedule = "constant"
    c.jr.prob = 0.02
    c.jr.pretrain_gamma = 0.0
    c.jr.stop_step = 90 * STEPS_PER_EPOCH
    c.jr.num_probes = 2
    c.optim.name = "adam"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 0
    c.optim.min_lr_ratio = 1e-6 / 1e-3
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 0.0
    c.eval.batch_size = 96
    c.eval.max_steps = 30
    c.eval.budgets = "all"
    c.eval.jac_probes = 2
    return c
