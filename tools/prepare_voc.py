"""Split lists and image labels for PASCAL VOC 2012 + SegmentationClassAug (METHOD.md §9).

    python -m tools.prepare_voc --root data/VOCdevkit/VOC2012
    python -m tools.prepare_voc --root /ro/VOC2012 --list-dir data/voc_lists   # read-only dataset

Expects <root>/SegmentationClassAug/*.png (the SBD-augmented masks, which also cover val) and the
official <root>/ImageSets/Segmentation/val.txt. Writes into list_dir (default
<root>/ImageSets/Segmentation): train_aug.txt (every SegmentationClassAug name not in val; 10582
for the real dataset), val.txt (1449), test.txt when the official test list is present, and
cls_labels.npz (`names`, `labels` (N, K) uint8: classes present in each mask, 0 and 255 excluded)
for every mask. Every file is written atomically (temp file + os.replace); the code is
datasets/voc_lists.py.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from datasets.voc import LABEL_FILE, default_list_dir
# the writers live in datasets/voc_lists.py (the synthetic dataset uses them too)
from datasets.voc_lists import prepare_voc
from utils.errors import user_errors


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="VOCdevkit/VOC2012 folder")
    parser.add_argument("--list-dir", default=None,
                        help="folder for lists and labels (default <root>/ImageSets/Segmentation)")
    parser.add_argument("--num-fg-classes", type=int, default=20,
                        help="number of foreground classes K (VOC: 20)")
    args = parser.parse_args(argv)
    with user_errors():
        counts = prepare_voc(args.root, args.list_dir, args.num_fg_classes)
    out = args.list_dir or default_list_dir(args.root)
    written = ", ".join(f"{k}.txt ({v})" for k, v in counts.items())
    print(f"wrote {written} and {LABEL_FILE} to {out}")
    if "val" not in counts:
        val = os.path.join(default_list_dir(args.root), "val.txt")
        print(f"note: no official val list at {val}; train_aug holds every mask")


if __name__ == "__main__":
    main()
