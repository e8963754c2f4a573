"""The README demo: a small MoRe trained from scratch on the built-in synthetic dataset, on CPU.

    bash run_demo.sh          # generates data/synthetic, trains, evaluates, draws logs/demo/report/
    bash run_train.sh scripts/train_demo.py cpu 1 29500 demo overwrite=true

Same method and losses as VOC; only sizes and the schedule are scaled down (no ImageNet weights
here, so a higher learning rate and a tiny ViT).
"""
from wetr.engine import main

DEMO = dict(
    tag="demo",
    device="cpu",
    max_iters=1200,
    batch_size=8,
    log_every=50,
    eval_every=400,
    save_every=400,
    data=dict(name="voc", root="data/synthetic", train_split="train_aug", val_split="val",
              num_classes=5, crop_size=128, aug="voc", num_workers=1, prefetch_factor=2),
    model=dict(pretrained=False, embed_dim=128, depth=4, num_heads=4),
    optim=dict(lr=1e-3, warmup_iters=100),
    cam=dict(scales=[1.0, 0.5, 0.75, 1.5], cam2mask=800),
    loss=dict(after=dict(seg=200, reg=200)),
    val=dict(size=128),
)

if __name__ == "__main__":
    main(DEMO)
