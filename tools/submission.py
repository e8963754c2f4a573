"""The PASCAL VOC test-server submission: results/VOC2012/Segmentation/comp6_test_cls/<name>.png
(palette PNGs of class indices), packed as results.tar.gz and checked before upload."""
from __future__ import annotations

import tarfile
from pathlib import Path

from PIL import Image

from utils.io import atomic_open

from .outputs import SERVER_DIR


def check_server_pngs(folder: Path, expected: int) -> list[Path]:
    """The server folder's PNGs, sorted; ValueError naming the first problem (count, mode)."""
    pngs = sorted(folder.glob("*.png"))
    if len(pngs) != expected:
        raise ValueError(f"{folder} holds {len(pngs)} PNGs, the split lists {expected}")
    for p in pngs:
        with Image.open(p) as im:
            if im.mode != "P":
                raise ValueError(f"{p} is mode {im.mode}; the server reads palette ('P') PNGs")
    return pngs


def pack_voc_test(out_dir: Path, expected: int) -> str:
    """Write out_dir/results.tar.gz (members results/VOC2012/Segmentation/comp6_test_cls/*.png)
    after checking the count (`expected`: the split list's images, 1456 on VOC test) and the
    palette mode. Returns the one line to print: what to upload, or why it is not ready."""
    folder = out_dir.joinpath(*SERVER_DIR)
    try:
        pngs = check_server_pngs(folder, expected)
    except ValueError as exc:
        return f"test-server archive not written: {exc}"
    archive = out_dir / "results.tar.gz"
    with atomic_open(archive, "wb", durable=True) as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        for p in pngs:
            tar.add(p, arcname="/".join((*SERVER_DIR, p.name)))
    return (f"upload {archive} ({len(pngs)} palette PNGs in {'/'.join(SERVER_DIR)}) to the PASCAL "
            f"VOC evaluation server, segmentation competition comp6")
