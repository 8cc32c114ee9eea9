#!/usr/bin/env python
"""Copy a small, deterministic ImageNet sample from ../shared into demo_data/imagenet/.

calib/: images picked evenly over the 1000 classes of shared/data/imagenet/calib1000 (training images).
val/:   images picked evenly (by file name) from shared/data/imagenet/val1300 (ILSVRC2012 validation).

If the raw copies exceed --max-mb, every image is re-encoded as JPEG (quality --quality, short side capped
at 256 pixels) so the sample stays small enough to ship with the repository.

Usage:
    python scripts/make_demo_sample.py [--n-calib 128] [--n-val 200] [--max-mb 8]
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
from pathlib import Path

from PIL import Image

from hf_adaquant.data import read_labels_csv, repo_root, shared_dir

SOURCE_TEMPLATE = """# Demo ImageNet sample: {split}

{n} images copied from the project's offline data folder `shared/data/imagenet/{src}/`:
{what}

- Selection: evenly spaced over the source list sorted by file name (indices `round(i * {total} / {n})`),
  i.e. spread over classes; made by `scripts/make_demo_sample.py`, which is deterministic.
- Encoding: {encoding}
- `labels.csv`: `filename,label_index,synset` with the standard ILSVRC2012 0..999 class index.
- Licence: ImageNet images are for non-commercial research and educational use only, under the ImageNet
  terms of access (https://image-net.org/download.php). The copyright of each image belongs to its owner.
- Calibration images (`calib/`) and evaluation images (`val/`) never overlap.
"""

WHAT = {
    "calib1000": "ImageNet-1k (ILSVRC2012) *training* images, one per class in the source, short side 256.",
    "val1300": "ILSVRC2012 *validation* images (227x227 as published), disjoint from the calibration images.",
}


def pick(rows: list, n: int) -> list:
    """Return ``n`` rows evenly spaced over ``rows`` (all of them if ``n >= len(rows)``)."""
    if n >= len(rows):
        return list(rows)
    return [rows[round(i * len(rows) / n)] for i in range(n)]


def reencode(src: Path, quality: int, max_side: int) -> bytes:
    """Decode ``src``, cap its short side at ``max_side`` (bicubic) and encode as JPEG."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        if min(w, h) > max_side:
            scale = max_side / min(w, h)
            im = im.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality, optimize=True)
        return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=None, help="shared/ folder (default: auto)")
    parser.add_argument("--out", type=Path, default=repo_root() / "demo_data" / "imagenet")
    parser.add_argument("--n-calib", type=int, default=128)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--max-mb", type=float, default=8.0)
    parser.add_argument("--quality", type=int, default=85)
    args = parser.parse_args()

    shared = args.shared or shared_dir()
    if shared is None:
        raise SystemExit("shared/ folder not found; pass --shared or set HF_ADAQUANT_SHARED")
    src_root = shared / "data" / "imagenet"
    plan = {
        "calib": ("calib1000", args.n_calib),
        "val": ("val1300", args.n_val),
    }
    chosen = {}
    raw_bytes = 0
    for split, (src, n) in plan.items():
        rows = read_labels_csv(src_root / src)
        chosen[split] = (src, len(rows), pick(rows, n))
        raw_bytes += sum((src_root / src / r[0]).stat().st_size for r in chosen[split][2])
    do_reencode = raw_bytes > args.max_mb * 1e6
    print(f"raw size {raw_bytes / 1e6:.2f} MB -> {'re-encode' if do_reencode else 'copy as is'}")

    total = 0
    for split, (src, n_src, rows) in chosen.items():
        out = args.out / split
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for name, _, _ in rows:
            if do_reencode:
                stem = Path(name).stem
                data = reencode(src_root / src / name, args.quality, 256)
                (out / f"{stem}.jpg").write_bytes(data)
            else:
                shutil.copyfile(src_root / src / name, out / name)
        names = [f"{Path(r[0]).stem}.jpg" if do_reencode else r[0] for r in rows]
        with (out / "labels.csv").open("w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["filename", "label_index", "synset"])
            for new_name, (_, label, synset) in zip(names, rows):
                writer.writerow([new_name, label, synset])
        encoding = (
            f"re-encoded as JPEG quality {args.quality} with the short side capped at 256 px (bicubic)."
            if do_reencode
            else "original files, copied byte for byte."
        )
        (out / "SOURCE.md").write_text(
            SOURCE_TEMPLATE.format(
                split=split, n=len(rows), src=src, what=WHAT[src], total=n_src, encoding=encoding
            )
        )
        size = sum(p.stat().st_size for p in out.iterdir())
        total += size
        classes = len({r[1] for r in rows})
        print(f"{split}: {len(rows)} images, {classes} classes, {size / 1e6:.2f} MB -> {out}")
    print(f"total {total / 1e6:.2f} MB")
    if total > args.max_mb * 1e6:
        raise SystemExit(f"sample is {total / 1e6:.2f} MB, over the {args.max_mb} MB budget")


if __name__ == "__main__":
    main()
