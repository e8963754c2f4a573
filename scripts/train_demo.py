"""The README demo: a small MoRe trained from scratch on the built-in synthetic dataset, on CPU.

    bash run_demo.sh          # generates data/synthetic, trains, evaluates, draws logs/demo/report/
    bash run_train.sh scripts/train_demo.py cpu 2 29500 demo overwrite=true
    python scripts/train_demo.py --print-config            # the resolved recipe

DEMO below holds only what differs from the shared defaults (wetr/config.py, which are VOC's);
`train_entry` runs the same engine as scripts/train_voc.py. The data is `datasets.synthetic`'s (K=4,
128-pixel images, VOC layout; data.num_classes=5 counts background). Two processes (DDP over
gloo, as run_demo.sh starts them) of batch_size=4 make 8 images a step; one process needs
batch_size=8 for the same recipe. No ImageNet weights (model.pretrained=false), so sizes and
the schedule are scaled down. Knobs that differ from VOC (why each: logs/demo_recipe_search.md):
- model: ViT width 128, depth 4, 4 heads, 8-pixel patches (a 16x16 token grid), LargeFOV 128 wide;
- data.crop_size 96 (VOC 448); crops cover 0.5-1.0 of the image area (VOC 0.32-1.0);
- data.jitter_p 0.25: colour jitter on a quarter of the crops (VOC half);
- max_iters 1100, optim.lr 1e-3 with 50 warm-up steps, poly power 2 (VOC 20000, 6e-5, 1500, 0.9);
- optim.head_lr_mult 3: classifiers, GCR and decoder at 3x the backbone's rate (VOC 10x);
- cam.high / cam.low 0.55 / 0.2: the refined pseudo labels' background planes (VOC 0.7 / 0.25);
- cam.cam2mask 700, loss.after seg / reg 100: the loss schedule scaled to 1100 steps;
- loss.weights.seg 0.3 (VOC 0.12) and loss.weights.ptc 1.0 (VOC 0.3);
- val.size 128: validation during training at the images' own size (run_demo.sh's evaluation
  resizes to the 96-pixel crop, as the reference resizes VOC to its 448 crop).
Everything else (the other loss weights, the token-label thresholds, CAM scales, PAR) is VOC's.
"""
from tools.cli import train_entry

DEMO = dict(
    tag="demo",
    device="cpu",
    max_iters=1100,
    batch_size=4,                 # per process; run_demo.sh starts two
    log_every=50,
    eval_every=275,
    save_every=550,
    data=dict(name="voc", root="data/synthetic", train_split="train_aug", val_split="val",
              num_classes=5, crop_size=96, rescale=[0.5, 1.0], aug="voc", jitter_p=0.25,
              num_workers=1, prefetch_factor=2),
    model=dict(pretrained=False, embed_dim=128, depth=4, num_heads=4, patch_size=8,
               decoder_dim=128),
    optim=dict(lr=1e-3, warmup_iters=50, power=2.0, head_lr_mult=3.0),
    cam=dict(cam2mask=700, high=0.55, low=0.2),
    loss=dict(after=dict(seg=100, reg=100), weights=dict(seg=0.3, ptc=1.0)),
    val=dict(size=128),
)

if __name__ == "__main__":
    train_entry(DEMO)
