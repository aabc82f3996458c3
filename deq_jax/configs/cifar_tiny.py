"""CIFAR-10 with the official TINY MDEQ (2 branches x 24 channels), no JR (needs a GPU for full length).

After ``MDEQ-Vision/experiments/cifar/cls_mdeq_TINY.yaml`` of locuslab/deq: a small,
unregularized MDEQ. It is **not** the paper's CIFAR-10 recipe: the paper's CIFAR-10 numbers
(Tables 2-4) come from the 4-branch LARGE model with JR, ``deq_jax/configs/cifar.py``
(``cls_mdeq_LARGE_reg.yaml``). The paper column below is the CIFAR-10 column of Table 4,
for reference only. Add JR with e.g. ``--config.jr.gamma=0.5 --config.jr.prob=0.05``.

Every hyperparameter: ours, the official file (HEAD 1fb7059, line numbers; "default" =
absent from the yaml, ``lib/config/default.py``), and Table 4. "-" = not stated there.

| key | ours | official (cls_mdeq_TINY.yaml) | paper Table 4 (LARGE model) | why different |
|---|---|---|---|---|
| augmentation | none (`data.augment` False) | none: AUGMENT False (l.59; tools/cls_train.py l.167) | - | |
| normalization | mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616) | same mean, std (0.2023, 0.1994, 0.2010) (cls_train.py l.166) | - | ours: std over all training pixels (see cifar.py) |
| model.size | `tiny`: 2 branches of 24 channels | NUM_BRANCHES 2 (l.24), NUM_CHANNELS 24/24 (l.36-38) | [28,56,112,224] (4 scales) | TINY is not the paper's model |
| block inner width | 5x | EXPANSION_FACTOR 5 (l.16) | - | |
| head | bottleneck per branch, HEAD_CHANNELS 8/16 (x4 out), final 200 | same (l.29-32; lib/models/mdeq.py) | - | BatchNorm there, GroupNorm here |
| parameters | 0.16M | (same structure) | 10M (LARGE) | |
| stem | two 3x3 stride-1 convs, GroupNorm 8 + ReLU | two 3x3 stride-1 convs + BatchNorm + ReLU (DOWNSAMPLE_TIMES 0, l.15) | - | GroupNorm: no batch statistics |
| injection conv | none | none (2 branches, no downsampling: stage0 is None, mdeq_core.py l.337-339) | - | |
| GroupNorm groups | 8 in the cell; 4 after fusion, no scale/bias | NUM_GROUPS 8 (l.12); NUM_GROUPS//2, POST_GN_AFFINE false (l.17) | GroupNorm | |
| weight norm | every cell conv | WNORM (l.14): block and post-fusion convs | yes | ours also the fusion convs |
| dropout | 0.25 variational, block's inner activation | DROPOUT 0.25 (l.13), block's second conv output | 0.25 | placement (see imagenet.py) |
| forward solver | Broyden, limit 18, tol 1e-3, rel | broyden, F_THRES 18, STOP_MODE rel (l.41-44), eps 1e-3 (lib/solvers.py default) | 7 | residual per example here, whole-batch norm there |
| backward solver | Broyden implicit, limit 20, tol 1e-3, rel | broyden, B_THRES 20 (l.42, 45) | 8, eps 1e-4 | |
| random step limit | `jr_steps`, 2 (inert: no JR steps) | RAND_F_THRES_DELTA default 2, only on JR steps (cls_function.py l.63): inert | - | |
| JR | off (gamma 0, prob 0) | JAC_LOSS_WEIGHT 0.0 (l.52), JAC_LOSS_FREQ default 0 | gamma 0.5, p 0.05, M 1 | TINY has no JR |
| pretraining | 3000 steps, 10 unrolled layers | PRETRAIN_STEPS 3000 (l.69), NUM_LAYERS 10 (l.10) | - | |
| epochs / steps | 50 epochs = 19,500 steps | END_EPOCH 50 (l.66) = 19,550 steps (partial batch kept) | 200 epochs | we drop the last partial batch |
| batch | 128 | 64 per GPU x 2 GPUs (l.1, 64) | 96 | |
| optimizer | Adam (b1 0.9, b2 0.999, eps 1e-8) | adam (l.75), torch defaults | Adam | |
| learning rate | 1e-3, cosine to 1e-6 (min_lr_ratio 1e-3), no warm-up | LR 0.001 (l.76), CosineAnnealingLR(eta_min=1e-6) over all steps (cls_train.py l.197-198) | 0.001, cosine, no warm-up | |
| weight decay | 2.5e-6, decoupled (AdamW: lr x 2.5e-6 x w a step) | WD 2.5e-6 (l.77), torch Adam weight_decay: L2 added to the gradient before the moments | 0 | deq_jax's Adam weight decay is decoupled (train/optim.py); either way the term is tiny |
| gradient clipping | none | TRAIN.CLIP -1 (default.py l.109) | - | |
| eval batch | 64 | 32 per GPU x 2 (l.61) | - | |
| eval | top-1, solver statistics, Jacobian norm, budgets 1..18, every 10 epochs | top-1 every epoch | - | each of our evaluations is two passes |
| seed | 0 | 42 | - | |
"""

from deq_jax.train.config import default_config

STEPS_PER_EPOCH = 50_000 // 128  # 390 (our epochs drop the last partial batch)


def get_config():
    c = default_config()
    c.data.name = "cifar10"
    c.data.augment = False
    c.model.size = "tiny"
    c.model.dropout = 0.25
    c.train.batch_size = 128
    c.train.num_steps = 50 * STEPS_PER_EPOCH
    c.train.pretrain_steps = 3000
    c.train.pretrain_layers = 10
    c.train.log_every = 100
    c.train.eval_every = 10 * STEPS_PER_EPOCH
    c.train.checkpoint_every = 1000
    c.forward.solver = "broyden"
    c.forward.max_steps = 18
    c.forward.tol = 1e-3
    c.forward.stop_mode = "rel"
    c.forward.random_lower = 2
    c.forward.random_lower_rule = "jr_steps"
    c.backward.mode = "implicit"
    c.backward.solver = "broyden"
    c.backward.max_steps = 20
    c.backward.tol = 1e-3
    c.backward.stop_mode = "rel"
    c.jr.gamma = 0.0
    c.jr.prob = 0.0
    c.jr.pretrain_gamma = 0.0
    c.jr.num_probes = 2
    c.optim.name = "adam"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 0
    c.optim.min_lr_ratio = 1e-6 / 1e-3
    c.optim.weight_decay = 2.5e-6
    c.optim.clip_norm = 0.0
    c.eval.batch_size = 64
    c.eval.max_steps = 30
    c.eval.budgets = "all"
    c.eval.jac_probes = 2
    return c
