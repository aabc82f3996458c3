"""ImageNet with MDEQ-small + JR, after the official ``cls_mdeq_SMALL_reg.yaml`` (needs GPUs).

Prepare ImageNet once (see ``deq_jax.data.imagenet.PREPARE_HINT``: the ILSVRC 2012 archives
downloaded by hand, then ``tfds build imagenet2012 --manual_dir ... --file_format
array_record``) and pass ``--config.data.data_dir``. The paper's row (Table 2, MDEQ-small +
JR): 74.5% top-1, 14 NFEs, 17M parameters.

Every hyperparameter: ours, the official file
``MDEQ-Vision/experiments/imagenet/cls_mdeq_SMALL_reg.yaml`` of locuslab/deq (HEAD 1fb7059,
line numbers; "default" = absent from the yaml, ``lib/config/default.py``), and the paper's
Table 4 (ImageNet column). "-" = not stated there.

| key | ours | official (SMALL_reg.yaml) | paper Table 4 | why different |
|---|---|---|---|---|
| data | imagenet2012 (TFDS array_record, streamed) | ImageFolder of the JPEGs (l.65-70) | ImageNet | same images; read through TFDS |
| train augmentation | random-resized-crop (area 0.08-1, ratio 3/4-4/3) to 224, h-flip | torchvision RandomResizedCrop(224) + RandomHorizontalFlip (tools/cls_train.py l.148-153) | - | same rule, numpy; antialiased bilinear resize as PIL's |
| eval preprocessing | shorter side 256, center crop 224 | Resize(int(224/0.875)) + CenterCrop(224) (cls_train.py l.154-159) | - | same |
| normalization | ImageNet mean/std | same (cls_train.py l.147) | - | |
| image size | 224 (`deq_jax.data.imagenet.IMAGE_SIZE`) | 224 (l.18-20) | 224x224 | |
| model.size | `small`: branches 32/64/128/256 | NUM_CHANNELS 32/64/128/256 (l.42-46), 4 branches (l.24) | [32,64,128,256] | |
| block inner width | 5x (expand) | EXPANSION_FACTOR 5 (l.16) | - | |
| head | bottleneck per branch, HEAD_CHANNELS 28/56/112/224 (x4 out), final 2048 | same (l.31-36; lib/models/mdeq.py) | - | BatchNorm there, GroupNorm here (below) |
| parameters | 18.6M | (same structure) | 17M (Table 2: small+JR 17M, small 18M) | with the unregularized SMALL.yaml head (24/48/96/192) ours has 16.8M: the paper's two counts look swapped relative to the yaml heads |
| stem | two 3x3 stride-2 convs (224 -> 56), GroupNorm 8 + ReLU each | two 3x3 stride-2 convs, BatchNorm + ReLU (DOWNSAMPLE_TIMES 2, l.15; mdeq_core.py l.322-328) | 2 input downsamplings | GroupNorm: no batch statistics (examples stay independent for per-example solving; nothing to sync across devices) |
| injection conv | 1x1 conv + GroupNorm + ReLU | 1x1 conv + BatchNorm + ReLU (stage0, mdeq_core.py l.337-343) | - | as the stem |
| GroupNorm groups | 8 in the cell; 4 after fusion, no scale/bias | NUM_GROUPS 8 (l.12); post-fusion NUM_GROUPS//2 with POST_GN_AFFINE false (l.17) | GroupNorm | same; head norms use gcd(width, 8) groups (28 is not a multiple of 8) where the official head has BatchNorm |
| weight norm | on every cell conv (block, fusion up/down, post-fusion) | WNORM (l.14) on block convs and post-fusion convs only (mdeq_core.py l.72-73, 219) | yes | ours also normalizes the fusion convs |
| dropout | 0.02, variational, on the block's inner (5x) activation | DROPOUT 0.02 (l.13), variational, on the block's second conv output | 0.02 | placement: ours before conv2 |
| block order | injection added after the 2nd GroupNorm | added before it (mdeq_core.py l.90-91) | - | deq_jax's block; kept for all sizes |
| head input | z* | in training f(z*), one more cell call (mdeq_core.py l.449); z* in evaluation | - | |
| forward solver | Broyden, limit 14, tol 1e-3, abs | broyden, F_THRES 14, STOP_MODE abs (l.49-52), eps 1e-3 (lib/solvers.py default) | 14, eps 1e-3 | residual per example here; one norm over the whole batch tensor there (lib/solvers.py l.155-156), so abs tol 1e-3 per example is looser than 1e-3 over 32 examples |
| backward solver | Broyden implicit, limit 14, tol 1e-3, abs | broyden, B_THRES 14 (l.50, 53), same stop mode/eps | 14, eps 1e-4 | the official code passes no eps: its default 1e-3, not Table 4's 1e-4 |
| Broyden memory | 20 (>= 14: never forgets) | whole history up to the limit | - | same for limit 14 |
| random step limit | limit + U{-2..+1} on JR steps only (`jr_steps`) | RAND_F_THRES_DELTA 2 (l.54), cls_function.py l.63 | - | |
| jr.gamma | 2.5, staircase +0.1 every 50000 DEQ steps (2.5 -> 3.4) | JAC_LOSS_WEIGHT 2.5, JAC_INCREMENTAL 50000 (l.62-63) | 2.0 -> 3.0 | the file, not Table 4 |
| jr.prob | 0.08 | JAC_LOSS_FREQ 0.08 (l.61) | 0.1 | the file |
| jr.pretrain_gamma | 0.03 | PRETRAIN_JAC_LOSS_WEIGHT 0.03 (l.64) | - | |
| jr.stop_step | never | JAC_STOP_EPOCH default 1e8 | - | |
| jr.num_probes | 2 | jac_loss_estimate default vecs=2 (lib/jacobian.py) | 1 or 2 | |
| pretraining | 510000 steps, 5 unrolled layers (about 51 epochs) | PRETRAIN_STEPS 510000 (l.80), NUM_LAYERS 5 (l.10) | - | |
| epochs / steps | 100 epochs = 1,000,900 steps (10009 a epoch, last partial batch dropped) | END_EPOCH 100 (l.77); 10010 steps an epoch (partial batch kept) | 120 epochs | the file |
| batch | 128 global | 32 per GPU x 4 GPUs (l.1, 75) | 112 | the file; the official BatchNorms see 32 images, ours none |
| optimizer | SGD, momentum 0.9, Nesterov | sgd, MOMENTUM 0.9, NESTEROV (l.86, 89-90) | SGD | |
| learning rate | 0.04, cosine to 1e-6 (min_lr_ratio 2.5e-5), no warm-up | LR 0.04 (l.87), CosineAnnealingLR(eta_min=1e-6) over all steps (cls_train.py l.197-198) | 0.05, cosine, no warm-up | the file |
| weight decay | 2e-5, added to the gradient before momentum (optax add_decayed_weights + sgd) | WD 2e-5 (l.88), torch SGD weight_decay (coupled) | 5e-5 | the file; for SGD ours is the same coupled L2 as torch's (all parameters) |
| gradient clipping | none | TRAIN.CLIP -1 (default.py l.109) | - | |
| eval batch | 128 | 32 per GPU x 4 (l.72) | - | |
| eval metrics | top-1 and top-5, loss, solver steps/residual, Jacobian norm, budgets 1..14 | top-1 and top-5 (cls_train.py l.214) | - | our evaluation adds the solver statistics |
| eval/log/checkpoint | eval every 5 epochs, log every 1000 steps | validation every epoch, PRINT_FREQ 1000 (l.6) | - | each of our evaluations is two passes over the 50k images |
| seed | 0 | torch.manual_seed(42) | - | random streams differ across frameworks anyway |
"""

from deq_jax.train.config import default_config

STEPS_PER_EPOCH = 1_281_167 // 128  # 10009 (our epochs drop the last partial batch)


def get_config():
    c = default_config()
    c.data.name = "imagenet2012"
    c.data.data_dir = ""  # the TFDS data_dir holding imagenet2012 (array_record)
    c.data.image_size = 224
    c.model.size = "small"
    c.model.dropout = 0.02
    c.train.batch_size = 128
    c.train.num_steps = 100 * STEPS_PER_EPOCH
    c.train.pretrain_steps = 510_000
    c.train.pretrain_layers = 5
    c.train.log_every = 1000
    c.train.eval_every = 5 * STEPS_PER_EPOCH
    c.train.checkpoint_every = 10_000
    c.train.keep_checkpoints = 3
    c.forward.solver = "broyden"
    c.forward.max_steps = 14
    c.forward.tol = 1e-3
    c.forward.stop_mode = "abs"
    c.forward.random_lower = 2
    c.forward.random_lower_rule = "jr_steps"
    c.backward.mode = "implicit"
    c.backward.solver = "broyden"
    c.backward.max_steps = 14
    c.backward.tol = 1e-3
    c.backward.stop_mode = "abs"
    c.jr.gamma = 2.5
    c.jr.schedule = "staircase"
    c.jr.staircase_delta = 0.1
    c.jr.staircase_every = 50_000
    c.jr.prob = 0.08
    c.jr.pretrain_gamma = 0.03
    c.jr.stop_step = -1
    c.jr.num_probes = 2
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.04
    c.optim.momentum = 0.9
    c.optim.warmup_steps = 0
    c.optim.min_lr_ratio = 1e-6 / 0.04
    c.optim.weight_decay = 2e-5
    c.optim.clip_norm = 0.0
    c.eval.batch_size = 128
    c.eval.max_steps = 30
    c.eval.budgets = "all"
    c.eval.jac_probes = 2
    return c
