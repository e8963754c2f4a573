"""Import your own images and their tags as a training dataset (data.name=tags).

    python tools/prepare_tags.py --images photos/ --csv tags.csv --out data/mytags
    python tools/prepare_tags.py --images photos/ --json tags.json --classes classes.txt \\
        --masks hand_masks/ --val-fraction 0.2 --seed 1 --out data/mytags
    python tools/prepare_tags.py --images by_class/ --folders --out data/mytags

Images: every .jpg / .jpeg / .png under --images (sub-folders too, any file name, any size);
they are not copied: the split lists hold paths relative to that folder. Tags: a CSV
`image,tags` (tags separated by `;`, or by spaces when the file has no `;` — a cell that is
one --classes name stays whole; class names or indices 1..K), a
JSON {"image": ["tag", ...]}, or one sub-folder per class (--folders). An image with an empty
tag cell is kept as background only; an image without a row is not imported. Masks (optional,
--masks): palette or grey index PNGs named like their image (`sub/name.png` or
`sub/name.jpg.png`), values 0 background, 1..K in class-list order, 255 ignore; images with a
mask go to val. Writes at --out: tags.json, ImageSets/Segmentation/{train,val}.txt,
cls_labels.npz, class_names.txt, masks/. Rerunning with the same inputs writes the same files;
a bad input is one `error:` line naming the file / row and the fix (exit status 2).
Train: bash run_train.sh scripts/train_voc.py cpu 2 29500 mytag data.name=tags data.root=OUT
(docs/OWN_DATASET.md).
"""
from __future__ import annotations

import argparse
import time
from typing import Sequence

from utils.errors import user_errors


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/prepare_tags.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="More: docs/OWN_DATASET.md.")
    parser.add_argument("--images", required=True, help="folder of the images (searched "
                        "recursively; list entries are paths relative to it)")
    tags = parser.add_mutually_exclusive_group(required=True)
    tags.add_argument("--csv", help="CSV `image,tags` (header optional; tags by `;` or spaces)")
    tags.add_argument("--json", help='JSON {"image": ["tag", ...]}')
    tags.add_argument("--folders", action="store_true",
                      help="one sub-folder of --images per class")
    parser.add_argument("--classes", help="class names, one a line, in the order wanted "
                        "(default: the tags' names sorted; needed for numeric tags)")
    parser.add_argument("--index-base", type=int, choices=(0, 1), default=1,
                        help="numeric tags count classes from 1 (as masks do; default) or 0")
    parser.add_argument("--masks", help="folder of val masks (index PNGs named like their image)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of the images in val; images with masks go there first "
                        "(default 0.1)")
    parser.add_argument("--val-list", help="file of val images (one a line) instead of a draw")
    parser.add_argument("--seed", type=int, default=0, help="seed of the val draw (default 0)")
    parser.add_argument("--out", required=True, help="output root (becomes data.root)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # imported after the arguments: --help and usage errors do not wait for torch
    from datasets.tag_dataset_writer import import_tags
    from datasets.tag_import import Source, Split

    source = Source(csv=args.csv, json=args.json, folders=args.folders, classes=args.classes,
                    index_base=args.index_base)
    split = Split(val_fraction=args.val_fraction, val_list=args.val_list, seed=args.seed)
    t0 = time.perf_counter()
    with user_errors():
        res = import_tags(args.images, source, args.out, split, args.masks)
    k = len(res.classes)
    shown = ", ".join(res.classes[:8]) + (", ..." if k > 8 else "")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s: K={k} classes ({shown}); "
          f"train {len(res.lists['train'])} / val {len(res.lists['val'])} images, "
          f"{len(res.masks)} with masks")
    if res.untagged:
        print(f"note: {res.untagged} image(s) without tags kept as background only")
    if res.differ:
        print(f"note: {len(res.differ)} mask(s) show other classes than their image's tags "
              f"(first: {res.differ[0]}); validation labels the maps with the tags")
    if res.unlisted:
        print(f"note: {res.unlisted} image(s) under {args.images} have no row; not imported")
    if not any(n in res.masks for n in res.lists["val"]):
        print("note: no val masks: training validates the classifier (F1, precision / recall); "
              "mIoU needs masks (--masks)")
    print(f"train: bash run_train.sh scripts/train_voc.py cpu 2 29500 mytag data.name=tags "
          f"data.root={args.out}")


if __name__ == "__main__":
    main()
