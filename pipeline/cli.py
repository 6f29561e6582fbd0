"""``taskfold`` command line: run a config through the stages, inspect a bundle, export a bundle on
its own, predict with a bundle or an exported model, bench the deployment forms on this machine,
and doctor (what a bug report needs). The commands themselves are in ``pipeline.commands``."""
from __future__ import annotations

import argparse
import sys

from pipeline import commands
from pipeline.core.errors import TaskfoldError
from pipeline.shrinkage import ESTIMATES
from pipeline.stages.runner import STAGES


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
    r.set_defaults(fn=commands.run)
    i = sub.add_parser("inspect", help="print the storage table of a bundle")
    i.add_argument("bundle", help="bundle directory (runs/<name>/bundles/<method>)")
    i.set_defaults(fn=commands.inspect)
    b = sub.add_parser("bench", help="time every deployment form of a finished run on this machine")
    b.add_argument("run_dir", help="a run directory whose export stage wrote exports/forms.json, or a folder "
                                   "made by `taskfold export`")
    b.add_argument("--provider", choices=sorted(commands.PROVIDERS), default="cpu",
                   help="onnxruntime execution provider")
    b.add_argument("--name", help="name of this measurement in bench/ and the report (default: the provider)")
    b.add_argument("--batch-sizes", type=int, nargs="+", help="default: the run's bench.batch_sizes")
    b.add_argument("--runs", type=int, help="timed runs per target (default: the run's bench.runs)")
    b.add_argument("--warmup", type=int, help="untimed runs per target first")
    b.add_argument("--threads", type=int, help="intra-op threads (default: the run's run.threads)")
    b.add_argument("--no-memory", action="store_true", help="skip the resident-memory probes (CPU only anyway)")
    b.add_argument("--prefer", choices=["storage", "latency", "memory"], default="storage",
                   help="rank each method's forms by this first (then the other two)")
    b.set_defaults(fn=commands.bench)
    e = sub.add_parser("export", help="export a bundle on its own: merged ONNX per task and the deployment forms")
    e.add_argument("bundle", help="bundle directory")
    e.add_argument("--out", required=True, help="folder to write (time it afterwards with `taskfold bench OUT`)")
    e.add_argument("--forms", nargs="*", help="forms besides merged (default: every form); none: merged only")
    e.add_argument("--calibration", help="a folder of images that calibrate INT8 (without it, no INT8 form)")
    e.add_argument("--calibration-images", type=int, default=64, help="at most this many of them")
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(fn=commands.export)
    pr = sub.add_parser("predict", help="classify images with a bundle's task, or an exported model file")
    pr.add_argument("model", help="a bundle directory, or an .onnx file exported by taskfold")
    pr.add_argument("images", nargs="+", help="image files or folders of them")
    pr.add_argument("--task", help="the bundle's task (needed when it has several)")
    pr.add_argument("-k", type=int, default=3, help="classes per image, most likely first")
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.set_defaults(fn=commands.predict)
    pl = sub.add_parser("plan", help="the best entry per task within a storage (and latency) budget, as a bundle")
    pl.add_argument("run_dir", help="a finished run directory")
    pl.add_argument("--budget", required=True, help="N x base for all tasks, e.g. 1.2x")
    pl.add_argument("--latency", help="each task's merged latency / base at most this, e.g. 1.0x (needs the bench)")
    pl.add_argument("--name", help="the plan's folder under plans/ (default: from the budget)")
    pl.add_argument("--estimate", choices=ESTIMATES, default="shrunk",
                    help="the accuracy per task the choice trusts: shrunk (default) pulls each validation accuracy "
                         "toward the entry's strength on the other tasks, as far as the split's noise explains; raw "
                         "takes it as measured")
    pl.set_defaults(fn=commands.plan)
    d = sub.add_parser("doctor", help="versions, device, runtime providers, offline data and weights")
    d.set_defaults(fn=commands.doctor)
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
