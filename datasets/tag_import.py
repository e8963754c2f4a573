"""Read a folder of images and their tags into the tag-dataset layout (datasets/tags.py).

The CLI is tools/prepare_tags.py; `datasets.tag_dataset_writer.import_tags` is the whole import,
this module the reading and checking of its inputs. Sources of tags:
- CSV `image,tags` (header optional): tags separated by `;` when the cell holds one (so a name
  may contain spaces: `traffic light;dog`), else by spaces; class names or indices (1..K, as in
  masks; `index_base=0` for 0..K-1); an empty cell makes a background-only image;
- JSON `{"image": ["tag", ...]}` (a string value is split at `;`);
- one sub-folder per class (`folders`): every image under `<images>/<class>/` has that tag.
An image key is its path relative to the images folder, or, when unique, its file name or its
name without extension. Classes: `--classes FILE` (one name a line, in the order wanted), else
the sorted tag names (sorted folder names). Every check runs before anything is written; each
problem is one `TagImportError` line naming the file / row and the fix.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from utils.errors import UserError

from .tags import read_class_file
from .voc import image_size as voc_image_size

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class TagImportError(UserError, ValueError):
    """Bad input to the import (one line: the file / row, what is wrong, the fix)."""


@dataclass
class Source:
    """Where the tags come from: exactly one of csv / json / folders."""
    csv: str | None = None
    json: str | None = None
    folders: bool = False
    classes: str | None = None          # class-names file; default: sorted tag names
    index_base: int = 1                 # numeric tags count classes from this


@dataclass
class Split:
    val_fraction: float = 0.1           # share of the images in val (images with masks first)
    val_list: str | None = None         # explicit val images (one key a line) instead
    seed: int = 0                       # seed of the val draw


@dataclass
class Imported:
    classes: list[str]
    lists: dict[str, list[str]]
    labels: np.ndarray                  # (N, K) uint8, rows in `names` order
    names: list[str]
    masks: dict[str, str] = field(default_factory=dict)   # image entry -> source mask path
    unlisted: int = 0                   # images under the folder without a row
    untagged: int = 0                   # listed images without any tag (background only)
    differ: list[str] = field(default_factory=list)      # masks showing other classes than tags


def scan_images(folder: str, skip: Sequence[str] = ()) -> list[str]:
    """Sorted paths (relative, `/`-separated) of the JPEG / PNG files under `folder`, hidden
    folders and the `skip` folders (the output root and its masks, when inside) left out."""
    if not os.path.isdir(folder):
        raise TagImportError(f"{folder}: images folder not found; fix: pass --images DIR")
    skip = {os.path.realpath(s) for s in skip}
    found = []
    for d, dirs, files in os.walk(folder):
        dirs[:] = [x for x in dirs if not x.startswith(".")
                   and os.path.realpath(os.path.join(d, x)) not in skip]
        rel = os.path.relpath(d, folder).replace(os.sep, "/")
        for f in files:
            if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."):
                found.append(f if rel == "." else f"{rel}/{f}")
    return sorted(found)


class ImageIndex:
    """Finds an image from a key: its relative path, else its unique file name, else its unique
    name without extension (relative or not)."""

    def __init__(self, folder: str, paths: Sequence[str]):
        self.folder, self.paths = folder, set(paths)
        self.by: dict[str, list[str]] = {}
        for p in paths:
            base = p.rsplit("/", 1)[-1]
            for key in {base, os.path.splitext(p)[0], os.path.splitext(base)[0]}:
                self.by.setdefault(key, []).append(p)

    def find(self, key: str, where: str) -> str:
        key = key.strip().replace("\\", "/")
        key = key[2:] if key.startswith("./") else key
        if key in self.paths:
            return key
        hits = self.by.get(key, [])
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise TagImportError(f"{where}: {key!r} matches {len(hits)} images ({hits[0]}, "
                                 f"{hits[1]}); fix: give the path relative to {self.folder}")
        raise TagImportError(f"{where}: image {key!r} not found under {self.folder}; fix: correct "
                             f"the name (a path relative to that folder) or remove the row")


def split_cell(cell: str, semicolons: bool | None = None) -> list[str]:
    """'cat; big dog' -> ['cat', 'big dog'] with semicolons (names may hold spaces), 'cat dog'
    -> ['cat', 'dog'] without; semicolons=None: whether the cell holds one."""
    if semicolons is None:
        semicolons = ";" in cell
    parts = cell.split(";") if semicolons else cell.split()
    return [p.strip() for p in parts if p.strip()]


def read_csv(path: str, known: Sequence[str] = ()) -> list[tuple[str, str, list[str]]]:
    """-> (where, image key, tags) per row; a first row `image,...` is a header. When any tag
    cell holds a `;`, `;` separates the tags of every row (so `big dog` stays one name), else
    blanks do, except in a cell that is one of the `known` class names as a whole."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue
                where = f"{path} row {reader.line_num}"
                if not rows and cells[0].strip().lower() in ("image", "file", "filename", "path"):
                    continue
                rows.append((where, cells[0], cells[1:]))
    except FileNotFoundError:
        raise TagImportError(f"{path}: tag file not found; fix: pass --csv FILE") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TagImportError(f"{path}: not a UTF-8 CSV ({exc}); fix: save it as UTF-8 CSV") from None
    semicolons = any(";" in c for _, _, cells in rows for c in cells)
    known = set(known)
    return [(w, key, [t for c in cells for t in
                      ([c.strip()] if c.strip() in known else split_cell(c, semicolons))])
            for w, key, cells in rows]


def read_json(path: str) -> list[tuple[str, str, list[str]]]:
    """{"image": ["tag", ...] or "tag;tag"} -> (where, image key, tags); a repeated key is an
    error (json.load would keep the last silently)."""
    def pairs(items):
        seen = set()
        for k, _ in items:
            if k in seen:
                raise TagImportError(f"{path}: image {k!r} appears twice; fix: merge its tags "
                                     f"into one entry")
            seen.add(k)
        return dict(items)
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f, object_pairs_hook=pairs)
    except FileNotFoundError:
        raise TagImportError(f"{path}: tag file not found; fix: pass --json FILE") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TagImportError(f"{path}: not valid JSON ({exc}); fix: write "
                             '{"image": ["tag", ...]}') from None
    if not isinstance(data, dict):
        raise TagImportError(f'{path}: expected an object {{"image": ["tag", ...]}}')
    rows = []
    for key, tags in data.items():
        if isinstance(tags, str):   # "cat;big dog": `;` separates, names keep their spaces
            tags = split_cell(tags, semicolons=True)
        if not isinstance(tags, list) or not all(isinstance(t, (str, int)) for t in tags):
            raise TagImportError(f"{path} entry {key!r}: tags must be a list of names or "
                                 f"indices; got {tags!r}")
        rows.append((f"{path} entry {key!r}", key, [str(t).strip() for t in tags]))
    return rows


def folder_rows(paths: Sequence[str], folder: str) -> list[tuple[str, str, list[str]]]:
    """One sub-folder per class: (where, path, [its top-level folder]); images at the top
    level have no class folder, which is an error."""
    rows = []
    for p in paths:
        if "/" not in p:
            raise TagImportError(f"{os.path.join(folder, p)}: not inside a class sub-folder; fix: "
                                 f"move it into {folder}/<class>/ or remove it")
        rows.append((os.path.join(folder, p), p, [p.split("/", 1)[0]]))
    return rows


def class_list(source: Source, rows) -> list[str]:
    """The K foreground class names: the --classes file, else the sorted non-numeric tags."""
    if source.classes:
        names = read_class_file(source.classes)
        where = source.classes
    else:
        names = sorted({t for _, _, tags in rows for t in tags if not t.isdigit()})
        where = "the tags"
        if any(t.isdigit() for _, _, tags in rows for t in tags):
            raise TagImportError("numeric tags (class indices) need the class names; fix: pass "
                                 "--classes FILE (one name a line, class 1 first)")
    if not names:
        raise TagImportError(f"no class names in {where}; fix: tag the images or pass --classes")
    seen = set()
    for n in names:
        if n.lower() == "background":
            raise TagImportError(f"{where}: 'background' is class 0, implicit; fix: remove it "
                                 f"(an image with no tag is background only)")
        if n in seen:
            raise TagImportError(f"{where}: class {n!r} appears twice; fix: list it once")
        seen.add(n)
    return names


def tag_labels(rows, classes: Sequence[str], index_base: int, class_source: str) -> np.ndarray:
    """(N, K) uint8 from the rows' tags (names, or indices from `index_base`)."""
    index = {n: i for i, n in enumerate(classes)}
    k = len(classes)
    labels = np.zeros((len(rows), k), dtype=np.uint8)
    for r, (where, _, tags) in enumerate(rows):
        for t in tags:
            if t in index:
                labels[r, index[t]] = 1
            elif t.isdigit() and index_base <= int(t) < k + index_base:
                labels[r, int(t) - index_base] = 1
            elif t.isdigit():
                raise TagImportError(f"{where}: class index {t} outside {index_base}.."
                                     f"{k - 1 + index_base} ({k} classes in {class_source}); "
                                     f"fix: correct the index (or --index-base)")
            else:
                raise TagImportError(f"{where}: tag {t!r} is not in the class list "
                                     f"({class_source}); fix: correct the tag or add the class")
    return labels


def resolve_rows(rows, index: ImageIndex) -> list[str]:
    """Image entry of every row; a second row for one image is an error naming both."""
    first: dict[str, str] = {}
    out = []
    for where, key, _ in rows:
        name = index.find(key, where)
        if name in first:
            raise TagImportError(f"{where}: duplicate row for {name} (first at {first[name]}); "
                                 f"fix: merge the two rows into one")
        if "\n" in name or "\r" in name or name != name.lstrip():
            raise TagImportError(f"{os.path.join(index.folder, name)}: a file name with a line "
                                 f"break or leading blanks cannot go in a split list; fix: "
                                 f"rename it")
        first[name] = where
        out.append(name)
    return out


def image_size(path: str, where: str) -> tuple[int, int]:
    """(H, W) from the header; an unreadable file is one line naming it."""
    try:
        return voc_image_size(path)
    except ValueError as exc:
        raise TagImportError(f"{path} ({where}): {exc}; fix: replace the file or remove its "
                             f"row") from None
