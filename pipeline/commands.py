"""What each ``taskfold`` command does (``pipeline.cli`` parses the arguments): run, inspect,
bench, export, predict, doctor."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.config import ConfigError


def run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.stages.jobs import Selection
    from pipeline.stages.runner import Runner
    from pipeline.training.runtime import world_from_env

    if args.dry_run:
        from pipeline.stages.dryrun import MISSING_DATA, plan

        cfg = load_config(args.config, check_paths=False)
        p = plan(cfg, world_from_env()[1])
        print(f"taskfold run {args.config} --dry-run: the config is valid")
        print("\n".join(p.lines))
        return MISSING_DATA if p.missing else 0
    cfg = load_config(args.config)
    selection = Selection.parse(args.shard, args.units)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; a run directory is a folder")
    rank = world_from_env()[0]
    if rank == 0:
        print(f"taskfold run {args.config} -> {out}")
    until = args.stage or args.until
    runner = Runner(cfg, out, progress=not args.no_progress and rank == 0, selection=selection)
    runner.run(until=until, force=tuple(args.force))
    if until == "report" and rank == 0 and not runner.ctx.pending:
        print(f"done: {out / 'report.md'}, {out / 'results.json'}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    from pipeline.core.bundle import load_bundle
    from pipeline.core.ledger import format_ledger

    bundle = load_bundle(Path(args.bundle))
    m = bundle.manifest
    title = (f"bundle {args.bundle}: method {m['method'].get('label', m['method']['name'])} ({m['method']['name']}), "
             f"backbone {m['backbone']['name']}, {len(bundle.tasks)} tasks; verified: every file listed and hashed "
             "(sha256), every tensor parsed, finite and fitting the backbone, the ledger recomputed from the files")
    print(format_ledger(bundle.ledger, title))
    return 0


PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _bench_source(path: Path) -> tuple[Path, dict, dict, Path]:
    """(exports folder, forms.json, settings, where bench/ goes) of a run directory or of a folder
    made by ``taskfold export``."""
    from pipeline.core.io import read_json
    from pipeline.stages.rundir import RunDir

    run = RunDir(path)
    if run.forms_file.is_file() and run.config_file.is_file():
        cfg = read_json(run.config_file)
        return run.exports, read_json(run.forms_file), {"image_size": cfg["backbone"]["image_size"],
                                                        **cfg["bench"], "threads": cfg["run"]["threads"]}, run.bench_dir
    if (path / "forms.json").is_file() and (path / "export.json").is_file():
        settings = {"image_size": read_json(path / "export.json")["image_size"], "batch_sizes": [1, 8], "warmup": 10,
                    "runs": 50, "threads": 2}
        return path, read_json(path / "forms.json"), settings, path / "bench"
    raise ConfigError(f"{run.forms_file}: not found; {path} is neither a run directory whose export stage wrote it "
                      "nor a folder made by `taskfold export` (forms.json, export.json); run `taskfold run CONFIG` "
                      "with export.forms first")


def bench(args: argparse.Namespace) -> int:
    from exporters.bench import bench_forms
    from pipeline.core.io import write_json
    from pipeline.data.config import safe_name
    from pipeline.report.deploy import forms_table, ranking_lines

    for flag, value, low in (("--runs", args.runs, 1), ("--warmup", args.warmup, 0), ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: must be >= {low}")
    if args.batch_sizes and not all(1 <= b <= 4096 for b in args.batch_sizes):
        raise ConfigError(f"--batch-sizes {args.batch_sizes}: each must be 1 to 4096")
    name = args.name or args.provider
    try:
        safe_name(name, "measurement name")
    except ValueError as err:
        raise ConfigError(f"--name: {err}") from None
    exports, forms, s, bench_dir = _bench_source(Path(args.run_dir))
    res = bench_forms(exports, forms, s["image_size"], args.batch_sizes or s["batch_sizes"],
                      s["warmup"] if args.warmup is None else args.warmup, args.runs or s["runs"],
                      args.threads or s["threads"], PROVIDERS[args.provider],
                      memory=not args.no_memory and args.provider == "cpu")
    out = bench_dir / f"{name}.json"
    write_json(out, res)
    print("\n".join(forms_table(res)))
    print("\n".join(["", f"forms per method, best first by {args.prefer}:"] + ranking_lines(res, args.prefer)))
    print(f"wrote {out}" + ("; `taskfold run` (report stage) adds it to report.md" if bench_dir.parent != exports
                             else ""))
    return 0


def _images(paths: list[str]):
    from PIL import Image

    from pipeline.data.readers import IMAGE_SUFFIXES

    files = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
    out = []
    for f in files:
        try:
            with Image.open(f) as img:
                out.append((f, img.convert("RGB")))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{f}: not a readable image ({err})") from None
    if not out:
        raise ConfigError(f"no images in {', '.join(paths)}")
    return out


def export(args: argparse.Namespace) -> int:
    import exporters
    from pipeline.api import load_bundle

    bundle = load_bundle(Path(args.bundle))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    calibration = None
    if args.calibration:
        task = bundle.tasks[0]
        model = bundle.model(task)
        calibration = model.inputs(img for _, img in _images([args.calibration])[: args.calibration_images]).numpy()
    exporters.export(bundle.bundle, out, args.forms, calibration=calibration, threads=args.threads)
    print(f"exported {args.bundle} -> {out} (time it with `taskfold bench {out}`)")
    return 0


def predict(args: argparse.Namespace) -> int:
    from pipeline.api import load_bundle

    images = _images(args.images)
    path = Path(args.model)
    if path.is_file() and path.suffix == ".onnx":
        rows = _predict_onnx(path, [img for _, img in images], args.k)
        task = "(from the file)"
    else:
        bundle = load_bundle(path)
        task = args.task or (bundle.tasks[0] if len(bundle.tasks) == 1 else None)
        if task not in bundle.tasks:
            raise ConfigError(f"--task: {args.task!r} is not a task of {path}; tasks: {bundle.tasks}")
        rows = bundle.predict(task, [img for _, img in images], k=args.k)
    if args.json:
        print(json.dumps({str(f): r for (f, _), r in zip(images, rows)}, indent=1))
        return 0
    for (f, _), r in zip(images, rows):
        print(f"{f}: " + ", ".join(f"{p['label']} {p['probability']:.3f}" for p in r))
    return 0


def _predict_onnx(path: Path, images: list, k: int) -> list:
    import numpy as np

    from exporters.bundles import read_metadata
    from exporters.runtime import session
    from pipeline.data.transforms import Preprocess, ToInput

    meta = read_metadata(path)
    if "taskfold.preprocess" not in meta:
        raise ConfigError(f"{path}: not a model exported by taskfold (no taskfold.preprocess metadata)")
    pre = json.loads(meta["taskfold.preprocess"])
    transform = ToInput(Preprocess(pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]),
                                   pre.get("interpolation") or "bilinear"), crop_pct=pre.get("crop_pct"))
    classes = json.loads(meta.get("taskfold.classes", "[]"))
    x = np.stack([transform(img, 0).numpy() for img in images])
    sess = session(path, 2)
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    out = []
    for row in probs:
        top = np.argsort(-row)[:k]
        out.append([{"label": classes[i] if i < len(classes) else str(i), "index": int(i),
                     "probability": float(row[i])} for i in top])
    return out


def doctor(args: argparse.Namespace) -> int:
    from pipeline.doctor import report

    print(report())
    return 0


def plan(args: argparse.Namespace) -> int:
    from pipeline.planner import plan as choose_plan

    def ratio(flag: str, text: str | None) -> float | None:
        if text is None:
            return None
        try:
            value = float(text.lower().removesuffix("x"))
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: expected a ratio like 1.2x") from None
        if not value > 0:
            raise ConfigError(f"{flag} {text!r}: must be above 0")
        return value

    record = choose_plan(Path(args.run_dir), ratio("--budget", args.budget), ratio("--latency", args.latency), args.name,
                         estimate=args.estimate)
    print(f"wrote {Path(args.run_dir) / record['bundle']} and its plan.json; `taskfold run` (report stage) adds it "
          "to report.md")
    return 0
