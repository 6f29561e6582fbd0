"""``taskfold`` command line: run a config through the stages, inspect a bundle, bench a run's
deployment forms on this machine."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.core.errors import TaskfoldError
from pipeline.stages.runner import STAGES


def _run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.stages.jobs import Selection
    from pipeline.stages.runner import Runner
    from pipeline.training.runtime import world_from_env

    if args.dry_run:
        from pipeline.stages.plan import MISSING_DATA, plan

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


def _inspect(args: argparse.Namespace) -> int:
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


def _bench(args: argparse.Namespace) -> int:
    from exporters.bench import bench_forms
    from pipeline.core.io import read_json, write_json
    from pipeline.report.deploy import forms_table
    from pipeline.stages.rundir import RunDir

    from pipeline.data.config import safe_name

    for flag, value, low in (("--runs", args.runs, 1), ("--warmup", args.warmup, 0), ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: must be >= {low}")
    if args.batch_sizes and not all(1 <= b <= 4096 for b in args.batch_sizes):
        raise ConfigError(f"--batch-sizes {args.batch_sizes}: each must be 1 to 4096")
    if args.name is not None:
        try:
            safe_name(args.name, "measurement name")
        except ValueError as err:
            raise ConfigError(f"--name: {err}") from None
    run = RunDir(Path(args.run_dir))
    for f in (run.forms_file, run.config_file):
        if not f.is_file():
            raise ConfigError(f"{f}: not found; run `taskfold run CONFIG` with export.forms first")
    cfg = read_json(run.config_file)
    bench = cfg["bench"]
    name = args.name or args.provider
    res = bench_forms(run.exports, read_json(run.forms_file), cfg["backbone"]["image_size"],
                      args.batch_sizes or bench["batch_sizes"], bench["warmup"] if args.warmup is None else args.warmup,
                      args.runs or bench["runs"], args.threads or cfg["run"]["threads"], PROVIDERS[args.provider],
                      memory=not args.no_memory and args.provider == "cpu")
    out = run.bench_file(name)
    write_json(out, res)
    print("\n".join(forms_table(res)))
    print(f"wrote {out}; `taskfold run` (report stage) adds it to report.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="taskfold", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a config: " + " -> ".join(STAGES))
    r.add_argument("config", help="YAML run config (see examples/)")
    r.add_argument("--out", help="run directory (default: runs/<config name>)")
    r.add_argument("--until", default="report", choices=STAGES, help="stop after this stage")
    r.add_argument("--force", action="append", default=[], choices=STAGES, help="rerun this stage even if up to date")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    r.add_argument("--stage", choices=STAGES, help="run up to this stage (same as --until)")
    r.add_argument("--shard", metavar="I/N", help="train only every N-th unit from the I-th (0-based): one of N jobs "
                                                  "sharing the run directory; stops after the train stage")
    r.add_argument("--units", metavar="PATTERN", action="append",
                   help="train only units whose key matches (fnmatch on label/task, label/joint); repeatable")
    r.add_argument("--dry-run", action="store_true", help="validate the config and print the plan: units, images, "
                   "steps, peak memory; no data is read beyond listing it, nothing is written. Exit 3 if data is absent")
    r.set_defaults(fn=_run)
    i = sub.add_parser("inspect", help="print the storage table of a bundle")
    i.add_argument("bundle", help="bundle directory (runs/<name>/bundles/<method>)")
    i.set_defaults(fn=_inspect)
    b = sub.add_parser("bench", help="time every deployment form of a finished run on this machine")
    b.add_argument("run_dir", help="a run directory (runs/<name>) whose export stage wrote exports/forms.json")
    b.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu", help="onnxruntime execution provider")
    b.add_argument("--name", help="name of this measurement in bench/ and the report (default: the provider)")
    b.add_argument("--batch-sizes", type=int, nargs="+", help="default: the run's bench.batch_sizes")
    b.add_argument("--runs", type=int, help="timed runs per target (default: the run's bench.runs)")
    b.add_argument("--warmup", type=int, help="untimed runs per target first")
    b.add_argument("--threads", type=int, help="intra-op threads (default: the run's run.threads)")
    b.add_argument("--no-memory", action="store_true", help="skip the resident-memory probes (CPU only anyway)")
    b.set_defaults(fn=_bench)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except TaskfoldError as err:
        print(f"taskfold: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full or read-only disk, a folder that cannot be created: name the path
        where = err.filename or "a file"
        print(f"taskfold: error: cannot write or read {where}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("taskfold: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
