"""Does memory stay flat as the data set grows? One training epoch over a synthetic JPEG image
folder of each size, in a fresh interpreter each; reports the peak resident memory of the run
(the process and its DataLoader workers, sampled from /proc) as a ratio to the smallest size,
and the images per second of the loader alone against the training step's.

    .venv/bin/python benchmarks/data_scale.py [--sizes 2000 20000] [--backbone efficientnet_lite0]
        [--image-size 64] [--workdir /tmp/taskfold_data_scale]

The folders have 10 classes of JPEGs of mixed sizes (24 to 160 px a side, RGB and grayscale);
they are made once and reused.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, n: int, classes: int = 10) -> Path:
    """``n`` JPEGs in ``classes`` class folders, mixed sizes and modes (made once)."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return root
    rng = np.random.default_rng(n)
    for i in range(n):
        c = i % classes
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(24, 161, 2))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[: h // 3, :, c % 3] = 255  # some class signal
        img = Image.fromarray(arr)
        (img.convert("L") if i % 5 == 0 else img).save(d / f"{i:06d}.jpg", quality=85)
    done.write_text(str(n))
    return root


def tree_rss_mb(pid: int) -> float:
    """Proportional resident memory (PSS: shared pages split between the processes that map
    them, so forked DataLoader workers do not count the parent's pages again) of a process and
    all its descendants (MB)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        p = int(d.name)
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(p)
        try:
            rollup = (d / "smaps_rollup").read_text()
            rss[p] = next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
        except (OSError, StopIteration):
            rss[p] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total / 1024


CHILD = """
import json, sys, time, torch
from pipeline.config import parse_config
from pipeline.stages.runner import Runner
from pipeline.training.evaluate import batches
cfg = parse_config(json.loads(sys.argv[1]))
runner = Runner(cfg, sys.argv[2], progress=False, log=lambda s: None)
runner.run(until="prepare")
ctx = runner.ctx
data = ctx.data("folder")
t0 = time.perf_counter(); n = 0
for batch in data.train.loader(cfg.train.batch_size, seed=0):
    n += len(batch.y)
loader_s = time.perf_counter() - t0
t0 = time.perf_counter()
runner.run(until="train")
res = json.load(open(f"{sys.argv[2]}/train/finetune/folder/result.json"))
print(json.dumps({"images": n, "loader_images_per_s": n / loader_s, "train_seconds": res["train_seconds"],
                  "step_ms": res["step_ms"], "workers": ctx.workers(ctx.pools("folder"))}))
"""


def run_one(args, folder: Path, n: int) -> dict:
    cfg = {"run": {"threads": args.threads, "workers": args.workers},
           "backbone": {"name": args.backbone, "weights": args.weights, "image_size": args.image_size},
           "tasks": [{"name": "folder", "source": {"type": "image_folder", "root": str(folder)}, "val_size": 200,
                      "test_size": 200}],
           "methods": ["finetune"], "train": {"epochs": 1, "batch_size": args.batch, "recalibrate_norms": False},
           "export": {"onnx": False}}
    out = Path(args.workdir) / f"run_{n}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg), str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while p.poll() is None:
        peak = max(peak, tree_rss_mb(p.pid))
        time.sleep(0.25)
    stdout, stderr = p.communicate()
    if p.returncode:
        raise SystemExit(f"run over {n} images failed:\n{stderr[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["peak_rss_mb"] = peak
    res["train_images_per_s"] = res["images"] / res["train_seconds"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="packaged")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", default="auto")
    p.add_argument("--workdir", default="/tmp/taskfold_data_scale")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.workers != "auto":
        args.workers = int(args.workers)
    rows = {}
    for n in args.sizes:
        t0 = time.perf_counter()
        folder = make_folder(Path(args.workdir) / f"images_{n}", n)
        print(f"{n} images in {folder} ({time.perf_counter() - t0:.0f} s to make or check)", flush=True)
        rows[n] = run_one(args, folder, n)
        print(f"  {rows[n]}", flush=True)
    first = rows[args.sizes[0]]["peak_rss_mb"]
    print(f"\n{args.backbone} {args.image_size}px, batch {args.batch}, {args.threads} threads, one epoch of fine-tune")
    print("| images | peak PSS MB (process + workers) | x smallest | loader images/s | training images/s | "
          "loader / training |\n|---|---|---|---|---|---|")
    for n, r in rows.items():
        print(f"| {n:,} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / first:.3f} | {r['loader_images_per_s']:.0f} | "
              f"{r['train_images_per_s']:.0f} | {r['loader_images_per_s'] / r['train_images_per_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
