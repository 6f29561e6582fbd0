"""``taskfold`` command line: run a config through the stages, inspect a bundle."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.backbones import BackboneError
from pipeline.bundle import BundleError
from pipeline.config import ConfigError
from pipeline.data import DataError
from pipeline.run import STAGES
from pipeline.train import TrainingError

USER_ERRORS = (ConfigError, BundleError, BackboneError, DataError, TrainingError)


def _run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.run import Runner

    cfg = load_config(args.config)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    print(f"taskfold run {args.config} -> {out}")
    Runner(cfg, out, progress=not args.no_progress).run(until=args.until, force=tuple(args.force))
    if args.until == "report":
        print(f"done: {out / 'report.md'}, {out / 'results.json'}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.bundle import load_bundle
    from pipeline.storage import format_ledger

    bundle = load_bundle(Path(args.bundle))
    m = bundle.manifest
    title = (f"bundle {args.bundle}: method {m['method']['label']} ({m['method']['name']}), "
             f"backbone {m['backbone']['name']}, {len(bundle.tasks)} tasks, files verified (sha256)")
    print(format_ledger(m["ledger"], title))
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
    r.set_defaults(fn=_run)
    i = sub.add_parser("inspect", help="print the storage table of a bundle")
    i.add_argument("bundle", help="bundle directory (runs/<name>/bundles/<method>)")
    i.set_defaults(fn=_inspect)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except USER_ERRORS as err:
        print(f"taskfold: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("taskfold: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
