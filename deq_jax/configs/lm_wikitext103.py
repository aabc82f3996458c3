"""Word-level DEQ-Transformer (pre-LN) + JR on WikiText-103, after the official
``DEQ-Sequence/wt103_deq_transformer_preln_reg.sh`` (needs GPUs).

Point ``--config.data.data_dir`` at the folder holding ``wiki.{train,valid,test}.tokens``
(unzipped ``wikitext-103-v1.zip``; docs/guides/data.md). The paper's row (Tables 1 and
5, DEQ-T (Pre-LN) + JR): 24.5 perplexity with 14/14 NFEs.

The official model's parts are here: adaptive input embeddings and adaptive softmax with
the official cutoffs, ``div_val`` and ties, and a 300-position segment memory carried
across training segments and across the whole evaluation stream. What differs is in the
table: chiefly rotary positions instead of Transformer-XL's relative encoding (both are
relative: a score depends on positions only through their distance, which is what lets
the memory's positions continue across the segment boundary; rotary needs no extra
parameters and no ``rel_shift``), the closing LayerNorm of our pre-LN block, the injection
added to z rather than to q/k/v, and one dropout site. Parameters: the official model
prints 97,851,488 (``train_transformer.py``, its storage-tied tail output projections
counted twice; 97,691,888 counted once); this config has 96,226,088, counted from the
shapes by ``tests/test_imagenet.py::test_wikitext103_config_parameter_count``: the same
feed-forward layer (67,297,400) and adaptive embedding/softmax (26,466,788 counted once),
981,400 fewer in the injection (a 700 -> 700 dense layer instead of a 700 -> 2100 conv),
490,000 fewer in attention (no r_net and relative biases), 5,600 more in LayerNorm scales
and biases (the official LayerNorms have none).

Every hyperparameter: ours, the official script (HEAD 1fb7059, line numbers; "default" =
argparse default in ``DEQ-Sequence/train_transformer.py``), and the paper's Table 4
(WikiText-103 column). "-" = not stated there.

| key | ours | official (wt103_deq_transformer_preln_reg.sh) | paper Table 4 | why different |
|---|---|---|---|---|
| model | weight-tied pre-LN block, d_model 700, 10 heads of 70, d_ff 48000, weight norm | --d_model 700, --n_head 10, --d_head 70, --d_inner 48000, --pre_lnorm, --wnorm (l.13-17, 29-30) | 700, LayerNorm, weight norm | |
| pre-LN block | LayerNorm before each sublayer and one closing the block | LayerNorm before attention (on [mems, z]) and feed-forward, none after (models/deq_transformer.py l.53-59, 120-121) | Pre- and Post-LN | ours without the closing norm made the adjoint solve fail (deq_transformer.py doc) |
| input injection | adaptive embedding (x sqrt(700)) through a 700x700 dense layer, added to z in every cell call | 1x1 conv (700 -> 2100) of the embedding added to the q/k/v projection of [mems, z] (deq_transformer.py l.126, 233) | - | one design for all our text models; 0.98M fewer parameters |
| positions | rotary on q and k; memory slot j at position j, segment position t at mem_len + t | Transformer-XL relative encoding: sinusoids of distance through r_net, r_w_bias, r_r_bias (deq_transformer.py l.74-143) | - | both relative; rotary adds no parameters (official r_net + biases: 0.49M) |
| memory | --config.model.mem_len 300: the block inputs z* + injection of the last 300 positions, stop-gradient, attended as keys/values; carried across consecutive training windows (emptied when the windows start over) and across the whole valid/test stream | --mem_len 300 (l.27): z* and the injection u of the last 300 positions, detached (deq_transformer.py l.277-301, 326-338, 383) | - | |
| embedding / softmax | adaptive, model.cutoffs "20000,40000,200000", model.div_val 4 (widths 700/175/43/10), tables tied to the output, tail projections tied (one array), head projection separate; vocabulary sorted by training frequency, `<eos>` first | --adaptive --div_val 4, cutoffs 20k/40k/200k (l.9-10; train_transformer.py l.240-244), tie_weights, tie_projs [False, True, True, True] (storage shared, two parameters) | 700 (embedding size) | a true tie (one gradient) |
| dropout | 0.06 variational, on the feed-forward hidden layer | --dropout 0.06 (l.18): variational on the feed-forward hidden and output, attention output, embeddings and positional embeddings (deq_transformer.py l.31-33, 80, 221-223, 323, 336, 382); --dropatt 0.01 on attention weights (l.19) | 0.06 | ours has one dropout site and no attention dropout |
| sequence length | 150 (train and eval windows) | --tgt_len 150, --eval_tgt_len 150 (l.26, 28) | 150 | |
| batch | 56 | --batch_size 56 (l.40), 4 GPUs | 60 | the script |
| forward solver | Anderson (memory 5), limit 14, tol 1e-3, rel, causal | --f_solver anderson (l.31; m=6, lib/solvers.py l.201), --f_thres 14, --stop_mode rel (l.34-35), eps 1e-3 (default) | 12, eps 1e-3 | no config key for Anderson's memory (default 5); causal solving is ours (design: budgets and sampling never see the future) |
| backward solver | Broyden implicit, limit 14, tol 1e-3, rel | --b_solver broyden, --b_thres 14 (l.32, 36); no stop_mode/eps passed: rel, 1e-3 (deq_transformer.py l.377-378) | 12, eps 1e-4 | the script |
| residual | per example (per sequence) | one norm over the whole batch tensor (lib/solvers.py l.155-156, 231-232) | - | per-example stopping |
| random step limit | limit - U{0..2} on every DEQ step (`every_step`) | --rand_f_thres_delta 2 (l.33), train_transformer.py l.453 | - | |
| jr.gamma | 2.0, staircase +0.1 every 30000 steps after pretraining (2.0 -> 2.8) | --jac_loss_weight 2.0, --jac_incremental 30000 (l.37, 39): +0.1 at steps 60k, 90k, ... 270k (train_transformer.py l.565-568) | 1.6 -> 2.5 | the script; ours steps at 62k, 92k, ... (every 30000 after pretraining), the same 8 steps shifted by 2000 |
| jr.prob | 0.4 | --jac_loss_freq 0.4 (l.38) | 0.35 | the script |
| jr.num_probes | 1 | vecs=1 (deq_transformer.py l.366-370) | 1 or 2 | |
| jr.pretrain_gamma | 0 | no JR while pretraining (deq_transformer.py l.340-351) | - | |
| jr.stop_step | never | no stop | - | |
| pretraining | 32000 steps, 2 unrolled layers | --pretrain_steps 32000, --n_layer 2 (l.11, 23) | - | |
| steps | 300000 | --max_step 300000 (l.25) | 23 epochs (Table 1 caption: 250K steps) | the script |
| optimizer | Adam (b1 0.9, b2 0.999, eps 1e-8) | --optim Adam (l.20), torch defaults | Adam | |
| learning rate | 2.5e-4, linear warm-up 16000 steps, then cosine to 0 at step 300000 | --lr 0.00025, --warmup_step 16000 (l.21-22); CosineAnnealingLR(max_step, eta_min 0) (train_transformer.py l.348, 496-497) | 0.00025, 1 epoch warm-up, cosine | the official cosine is measured from step 0 (at step 16000 it is already 0.7% below the peak); ours starts its cosine after the warm-up |
| weight decay | 0 | default 0.0 | 0 | |
| gradient clipping | global norm 0.25 | default --clip 0.25, every step (train_transformer.py l.489) | - | |
| eval | valid stream in 16 contiguous streams, 150-token windows, memory carried across the stream, at limit 14, budgets 1..14, steps to tol (limit 30) | eval batch max(16, #GPUs) (train_transformer.py l.234), --eval_tgt_len 150, mem_len 300, f_thres 14 (l.418) | - | our evaluation adds the solver statistics |
| eval/log/checkpoint | every 5000 / 200 / 5000 steps | --eval-interval 5000 (l.24), --log-interval 200 (default) | - | |
| seed | 0 | --seed 1111 (default) | - | |
"""

from deq_jax.train.config import default_config


def get_config():
    c = default_config()
    c.data.name = "wikitext103"
    c.data.data_dir = ""  # required: --config.data.data_dir=/path/to/wikitext-103
    c.model.d_model = 700
    c.model.num_heads = 10
    c.model.d_ff = 48000
    c.model.pre_ln = True
    c.model.tie_embeddings = True
    c.model.dropout = 0.06
    c.model.mem_len = 300
    c.model.cutoffs = "20000,40000,200000"
    c.model.div_val = 4
    c.train.seq_len = 150
    c.train.batch_size = 56
    c.train.num_steps = 300_000
    c.train.pretrain_steps = 32_000
    c.train.pretrain_layers = 2
    c.train.log_every = 200
    c.train.eval_every = 5000
    c.train.checkpoint_every = 5000
    c.forward.solver = "anderson"
    c.forward.max_steps = 14
    c.forward.tol = 1e-3
    c.forward.stop_mode = "rel"
    c.forward.random_lower = 2
    c.forward.random_lower_rule = "every_step"
    c.forward.causal = True
    c.backward.mode = "implicit"
    c.backward.solver = "broyden"
    c.backward.max_steps = 14
    c.backward.tol = 1e-3
    c.backward.stop_mode = "rel"
    c.jr.gamma = 2.0
    c.jr.schedule = "staircase"
    c.jr.staircase_delta = 0.1
    c.jr.staircase_every = 30_000
    c.jr.prob = 0.4
    c.jr.num_probes = 1
    c.jr.pretrain_gamma = 0.0
    c.jr.stop_step = -1
    c.optim.name = "adam"
    c.optim.learning_rate = 2.5e-4
    c.optim.warmup_steps = 16_000
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 0.25
    c.eval.batch_size = 16
    c.eval.max_steps = 30
    c.eval.budgets = "all"
    c.eval.jac_probes = 1
    return c
