"""In-Shop Clothes Retrieval (query against gallery).

    python -m gl_jax.main --config=configs/inshop.py --config.data.root=/data/InShop \
        --config.model.init_from=/ckpt/bninception --workdir=W

Data: `Eval/list_eval_partition.txt` and `Img/` (3,997 training items; 14,218 queries
against 12,612 gallery images). Recall@{1,10,20,30,40,50} of queries against the gallery.
The Group Loss papers give no In-Shop recipe: these are the SOP hyperparameters
(10 x 6, T = 54), not tuned. Hardware: one GPU. For reference, Proxy-Anchor reports
Recall@1 91.9 with BN-Inception 512-d.
"""
from configs import common


def get_config(arg: str | None = None):
    config = common.get_config("inshop")
    config.model.name = "bninception"
    config.sampler.classes_per_batch = 10
    config.sampler.samples_per_class = 6
    config.loss.temperature = 54.0
    config.loss.anchors_per_class = 2
    common.paper_group_loss(config)
    config.optimizer.lr = 6.078e-4
    config.optimizer.weight_decay = 5.27e-12
    config.evals.ks = (1, 10, 20, 30, 40, 50)
    config.evals.nmi = False
    if arg == "quick":
        common.quick(config)
        config.evals.ks = (1, 10)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'quick' or nothing")
    return config
