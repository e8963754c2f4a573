"""Train MoRe on PASCAL VOC 2012 (train_aug -> val). Edit VOC below or override key=value.

    bash run_train.sh scripts/train_voc.py 0 1 29500 train_voc
    bash run_train.sh scripts/train_voc.py 0,1 2 29500 train_voc data.root=/datasets/VOC2012
    torchrun --nproc_per_node=1 -m scripts.train_voc data.root=/datasets/VOC2012 max_iters=200

Defaults shared with COCO: wetr/config.py. Reference: 1 GPU, batch 4, 20k iterations.
The authors' effective batch on other hardware: `global_batch=4` (e.g. 2 GPUs with batch_size=2,
or 1 GPU with batch_size=2 and two accumulated micro-batches).
"""
from tools.cli import train_entry

# The authors' effective batch: 1 GPU x 4 images (their script and their published log alike).
AUTHORS_GLOBAL_BATCH = 1 * 4

VOC = dict(
    tag="train_voc",
    max_iters=20000,
    batch_size=4,
    global_batch=0,               # 0: batch_size x processes; AUTHORS_GLOBAL_BATCH on any GPU count
    eval_every=2000,
    save_every=2000,
    data=dict(name="voc", root="data/VOCdevkit/VOC2012", train_split="train_aug",
              val_split="val", num_classes=21, crop_size=448, aug="voc", jitter_p=0.5),
    cam=dict(scales=[1.0, 0.5, 0.75, 1.5], cam2mask=10000),
    loss=dict(weights=dict(cle=0.2, une=0.1, ptc=0.3, seg=0.12, reg=0.05),
              after=dict(cle=-1, une=-1, ptc=-1, seg=2000, reg=2000), cle_temp=0.5),
)

if __name__ == "__main__":
    train_entry(VOC)
