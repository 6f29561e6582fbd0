"""The stage runner: prepare -> train -> fold -> export -> bench -> report, into one run dir.

Each stage records the hash of its inputs in ``stages/<stage>.json``; a stage whose record
matches (and whose outputs exist) is skipped. Training is resumable per (method, task)
from its last epoch checkpoint. Every output is written under a temp name and renamed.

Run dir layout::

    config.resolved.json
    prepared/<task>.safetensors           uint8 images + labels per split
    train/<label>/<task>/{checkpoint.pt, delta.safetensors, result.json}
    train/<label>/<task>/pass<p>/...        methods that pass over the tasks more than once
    train/<label>/@joint/{shared.safetensors, result.json}  joint methods: the shared weights
    bundles/<label>/                      see pipeline.bundle
    exports/base.onnx, exports/<label>/<task>.onnx
    stages/<stage>.json                   input hash + what the stage measured
    results.json, report.md, plots/*.png
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, safe_open, save_file

from exporters.onnx import EXPORT_FORMAT
from exporters.runtime import onnxruntime
from pipeline.backbones import Backbone, TaskNet, build_backbone
from pipeline.bundle import backbone_id, base_state, load_bundle, read_delta, write_bundle, write_delta
from pipeline.config import RunConfig
from pipeline.data import TaskData, load_task, normalise
from pipeline.delta import TaskDelta
from pipeline.fold import compare, merge
from pipeline.io import atomic_path, read_json, write_json
from pipeline.methods import build_method
from pipeline.methods.base import Method
from pipeline.train import Schedule, evaluate, train_task

STAGES = ("prepare", "train", "fold", "export", "bench", "report")

# merged vs adapted logits: float re-association only, so this is generous and still catches real bugs
FOLD_TOLERANCE = 1e-3
# a joint entry's own folder under train/<label>/; task names cannot contain "@", so no clash
JOINT_UNIT = "@joint"


class FoldError(RuntimeError):
    """The merged model does not reproduce the adapted one."""


class Runner:
    def __init__(self, cfg: RunConfig, out: Path, progress: bool = True, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        self.log = log
        self._backbone: Backbone | None = None
        self._data: dict[str, TaskData] = {}
        self.hashes: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self._joint_hashes: dict[str, str] = {}  # joint entry label -> its unit's hash
        self._joint_bases: dict[str, Backbone] = {}  # joint entry label -> backbone with its shared weights

    # ------------------------------------------------------------ helpers

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            b = self.cfg.backbone
            self._backbone = build_backbone(b.name, b.weights, b.kwargs, seed=self.cfg.run.seed)
        return self._backbone

    def data(self, task: str) -> TaskData:
        if task not in self._data:
            path = self.out / "prepared" / f"{task}.safetensors"
            with safe_open(str(path), framework="pt") as f:
                k = int(f.metadata()["num_classes"])
            self._data[task] = TaskData.from_tensors(task, k, load_file(str(path)))
        return self._data[task]

    def joint_base(self, label: str) -> Backbone:
        """The backbone with the shared weights a joint entry trained (its bundle's base)."""
        if label not in self._joint_bases:
            path = self.out / "train" / label / JOINT_UNIT / "shared.safetensors"
            features = copy.deepcopy(self.backbone.features)
            features.load_state_dict({k.removeprefix("features."): v for k, v in load_file(str(path)).items()})
            self._joint_bases[label] = dataclasses.replace(self.backbone, features=features)
        return self._joint_bases[label]

    def start_backbone(self, m) -> Backbone:
        """What an entry trains from: the pretrained backbone, or the joint entry named by ``base``."""
        return self.joint_base(m.base) if m.base else self.backbone

    def bundle_backbone(self, m) -> Backbone:
        """What an entry's deltas merge onto: its own shared weights for a joint entry."""
        return self.joint_base(m.label) if build_method(m.name).joint else self.start_backbone(m)

    def record(self, stage: str) -> dict | None:
        p = self.out / "stages" / f"{stage}.json"
        return read_json(p) if p.is_file() else None

    def _fresh(self, stage: str, h: str) -> dict | None:
        rec = self.record(stage)
        if rec and rec.get("hash") == h and all((self.out / o).exists() for o in rec.get("outputs", [])):
            return rec
        return None

    def _save_record(self, stage: str, h: str, outputs: list[str], **data) -> dict:
        rec = {"hash": h, "outputs": outputs, **data}
        write_json(self.out / "stages" / f"{stage}.json", rec)
        return rec

    def _images(self, task: str, split: str = "test") -> torch.Tensor:
        s = getattr(self.data(task), split)
        return normalise(s.images, self.backbone.mean, self.backbone.std)

    # ------------------------------------------------------------ stages

    def run(self, until: str = "report", force: tuple[str, ...] = ()) -> dict:
        if until not in STAGES:
            raise ValueError(f"--until: unknown stage {until!r}; stages: {', '.join(STAGES)}")
        if STAGES.index(until) >= STAGES.index("export"):
            onnxruntime()  # fail now, not after training, when no runtime is installed
        torch.set_num_threads(self.cfg.run.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "config.resolved.json", self.cfg.to_jsonable())
        for name in force:  # a forced stage's outputs change what every later stage read
            for later in STAGES[STAGES.index(name):]:
                (self.out / "stages" / f"{later}.json").unlink(missing_ok=True)
        results = {}
        for stage in STAGES:
            t0 = time.perf_counter()
            results[stage] = getattr(self, f"stage_{stage}")()
            self.timings[stage] = round(time.perf_counter() - t0, 2)
            if stage == until:
                break
        return results

    def stage_prepare(self) -> dict:
        c = self.cfg
        h = c.section_hash("prepare", c.backbone.model_dump(), [t.model_dump() for t in c.tasks], c.run.seed)
        self.hashes["prepare"] = h
        if rec := self._fresh("prepare", h):
            self.log("prepare: up to date, skipped")
            return rec
        self.log(f"prepare: {len(c.tasks)} tasks at {c.backbone.image_size}px, backbone {c.backbone.name}")
        loaded = {t.name: load_task(t, c.backbone.image_size, c.run.seed) for t in c.tasks}  # all or nothing
        outputs, tasks = [], {}
        for t in c.tasks:
            data = loaded[t.name]
            rel = f"prepared/{t.name}.safetensors"
            with atomic_path(self.out / rel) as tmp:
                save_file(data.tensors(), str(tmp), metadata={"num_classes": str(data.num_classes)})
            self._data[t.name] = data
            outputs.append(rel)
            tasks[t.name] = {"num_classes": data.num_classes, "train": len(data.train), "val": len(data.val),
                             "test": len(data.test), "domain": t.domain, "source": t.source.type}
            self.log(f"  {t.name}: {tasks[t.name]}")
        return self._save_record("prepare", h, outputs, tasks=tasks)

    def _unit_hash(self, label: str, task: str, earlier: list[str] = (), pass_: int = 1) -> str:
        """A unit's input hash; ``earlier``: the hashes of the units it borrows from (pool methods)."""
        entry = next(m for m in self.cfg.to_jsonable()["methods"] if m["label"] == label)
        extra = [list(earlier), pass_] if earlier or pass_ > 1 else []
        if base := self.cfg.method(label).base:
            extra.append(self._joint_hashes[base])
        return self.cfg.section_hash("train", self.hashes["prepare"], entry, task, self.cfg.train.model_dump(),
                                     self.cfg.run.seed, *extra)

    def _units(self, label: str, passes: int) -> Iterator[tuple[int, str, Path, str]]:
        """(pass, task, unit directory, version id) of every training unit of an entry, in order."""
        for p in range(1, passes + 1):
            for t in self.cfg.tasks:
                unit = self.out / "train" / label / t.name
                yield p, t.name, unit if passes == 1 else unit / f"pass{p}", f"{t.name}@{p}"

    def stage_train(self) -> dict:
        c = self.cfg
        units = {}
        for m in c.methods:
            units.update(self._train_method(m))
        self.hashes["train"] = c.section_hash(units)
        return {"units": units}

    def _train_method(self, m) -> dict[str, str]:
        """Train every task of one method entry, pass after pass; a pool method's unit sees the
        versions trained before it and borrows from the one each task keeps (best validation)."""
        method = build_method(m.name, m.params)
        if method.joint:
            return self._train_joint(m, method)
        passes = method.passes
        versions, kept, units, chain = {}, {}, {}, []
        history: dict[str, list[dict]] = {}
        for p, task, unit, vid in self._units(m.label, passes):
            h = self._unit_hash(m.label, task, chain if method.uses_pool else [], p)
            res = unit / "result.json"
            tag = f"{m.label}/{task}" + (f" pass {p}/{passes}" if passes > 1 else "")
            if res.is_file() and read_json(res).get("hash") == h and (unit / "delta.safetensors").is_file():
                self.log(f"train {tag}: up to date, skipped")
            else:
                pool = [kept[k][0] for k in kept] if method.uses_pool else []
                self._train_unit(m, build_method(m.name, m.params), task, unit, h, tag, versions, pool)
            units[f"{m.label}/{task}" + (f"/pass{p}" if passes > 1 else "")] = h
            chain.append(h)
            if not method.uses_pool and passes == 1:
                continue  # nothing later reads this unit's delta or compares its passes
            versions[vid] = read_delta(unit / "delta.safetensors").link(versions)
            result = read_json(res)
            history.setdefault(task, []).append({"pass": p, "version": vid, **{
                k: result[k] for k in ("val_acc", "test_acc", "train_seconds")}, "params": versions[vid].params()})
            if task not in kept or result["val_acc"] > kept[task][1]:
                kept[task] = (vid, result["val_acc"], unit)
        if passes > 1:
            for task, (vid, _, unit) in kept.items():
                best = read_json(unit / "result.json")
                write_json(self.out / "train" / m.label / task / "result.json",
                           best | {"kept": vid, "passes": history[task]})
        return units

    def _versions(self, m) -> tuple[Method, dict[str, str], dict[str, TaskDelta]]:
        """(method, task -> kept version id, every version's delta, linked) of a trained entry."""
        method = build_method(m.name, m.params)
        versions = {vid: read_delta(unit / "delta.safetensors") for _, _, unit, vid in self._units(m.label, method.passes)}
        for d in versions.values():
            d.link(versions)
        final = {t.name: read_json(self.out / "train" / m.label / t.name / "result.json").get("kept", f"{t.name}@1")
                 for t in self.cfg.tasks}
        return method, final, versions

    def _schedule(self, m) -> Schedule:
        c = self.cfg
        return Schedule(m.epochs or c.train.epochs, c.train.batch_size, m.lr or c.train.lr, c.train.momentum,
                        c.train.weight_decay, c.train.head_lr_scale, c.train.recalibrate_norms)

    def _fold_check(self, model, base: TaskNet, delta: TaskDelta, tag: str) -> dict:
        """Does ``delta`` merged onto ``base`` reproduce ``model`` on the task's test images?"""
        check = compare(model, merge(base, delta), self._images(delta.task)[:256])
        if check["max_abs_diff"] > FOLD_TOLERANCE or check["argmax_agree"] < 1.0:
            raise FoldError(f"{tag}: merged model differs from the adapted one: {check}")
        return check

    def _train_unit(self, m, method, task: str, unit: Path, h: str, tag: str, versions: dict, pool: list[str]) -> None:
        c = self.cfg
        schedule = self._schedule(m)
        data = self.data(task)
        backbone = self.start_backbone(m)
        self.log(f"train {tag}: {schedule.epochs} epochs, lr {schedule.lr}, {len(data.train)} images"
                 + (f", pool: base + {', '.join(pool)}" if pool else "") + (f", from {m.base}'s shared weights"
                                                                           if m.base else ""))
        outcome = train_task(backbone, data, method, schedule, c.run.seed, unit, h, self.progress,
                             versions=versions, pool=pool)
        if outcome.resumed_from_epoch:
            self.log(f"  resumed from epoch {outcome.resumed_from_epoch}")
        delta = method.task_delta(outcome.model, task)
        check = self._fold_check(outcome.model, backbone.base_net(), delta, tag)
        with atomic_path(unit / "delta.safetensors") as tmp:
            write_delta(tmp, delta)
        result = {
            "hash": h, "method": m.name, "label": m.label, "task": task,
            "val_acc": evaluate(outcome.model, data.val, self.backbone.mean, self.backbone.std),
            "test_acc": evaluate(outcome.model, data.test, self.backbone.mean, self.backbone.std),
            "history": outcome.history, "train_seconds": round(outcome.seconds, 2),
            "step_ms": round(1e3 * outcome.step_seconds / max(1, outcome.steps), 2),
            "fold_check": check, "describe": method.describe(outcome.model),
        }
        write_json(unit / "result.json", result)
        (unit / "checkpoint.pt").unlink(missing_ok=True)
        shutil.rmtree(unit / "scratch", ignore_errors=True)
        self.log(f"  {tag}: test acc {result['test_acc']:.4f}, fold max diff {check['max_abs_diff']:.2e}")

    def _train_joint(self, m, method) -> dict[str, str]:
        """One unit for all tasks: ``train/<label>/@joint/`` holds the shared weights, and every
        task gets ``train/<label>/<task>/{delta.safetensors, result.json}`` as incremental
        methods do, so fold and report read both alike."""
        c = self.cfg
        names = [t.name for t in c.tasks]
        h = self._unit_hash(m.label, names)  # one unit for every task
        unit = self.out / "train" / m.label / JOINT_UNIT
        done = (unit / "result.json").is_file() and read_json(unit / "result.json").get("hash") == h and all(
            (self.out / "train" / m.label / t / "delta.safetensors").is_file() for t in names)
        if done:
            self.log(f"train {m.label} (joint, {len(names)} tasks): up to date, skipped")
        else:
            self._train_joint_unit(m, method, unit, h)
        self._joint_hashes[m.label] = h
        return {f"{m.label}/joint": h}

    def _train_joint_unit(self, m, method, unit: Path, h: str) -> None:
        from pipeline.train_joint import train_joint

        c = self.cfg
        schedule = self._schedule(m)
        tasks = {t.name: self.data(t.name) for t in c.tasks}
        self.log(f"train {m.label}: joint over {len(tasks)} tasks, {schedule.epochs} epochs, lr {schedule.lr}, "
                 f"one batch of every task per step" + (f", from {m.base}'s shared weights" if m.base else ""))
        outcome = train_joint(self.start_backbone(m), tasks, method, schedule, c.run.seed, unit, h, self.progress)
        model, base = outcome.model, outcome.model.shared_base()
        seconds = round(outcome.unit_seconds, 2)  # a search and every candidate included
        deltas = {task: method.task_delta(model, task) for task in tasks}
        checks = {t: self._fold_check(model.use(t), base, d, f"{m.label}/{t}") for t, d in deltas.items()}
        for task, data in tasks.items():  # every task checked before anything is written
            tag, check = f"{m.label}/{task}", checks[task]
            folder = self.out / "train" / m.label / task
            with atomic_path(folder / "delta.safetensors") as tmp:
                write_delta(tmp, deltas[task])
            result = {
                "hash": h, "method": m.name, "label": m.label, "task": task, "joint": True,
                "val_acc": evaluate(model.use(task), data.val, self.backbone.mean, self.backbone.std),
                "test_acc": evaluate(model.use(task), data.test, self.backbone.mean, self.backbone.std),
                "history": [{"epoch": e["epoch"], "val_acc": e["val_acc"][task]} for e in outcome.history],
                "train_seconds": seconds,  # the joint unit's, shared by every task
                "step_ms": round(1e3 * outcome.step_seconds / max(1, outcome.steps), 2),
                "fold_check": check, "describe": method.describe(model, task),
            }
            write_json(folder / "result.json", result)
            self.log(f"  {tag}: test acc {result['test_acc']:.4f}, fold max diff {check['max_abs_diff']:.2e}")
        with atomic_path(unit / "shared.safetensors") as tmp:
            save_file(base_state(dataclasses.replace(self.backbone, features=base.features)), str(tmp))
        write_json(unit / "result.json", {"hash": h, "history": outcome.history, "candidates": outcome.candidates,
                                          "kept_candidate": outcome.candidate, "train_seconds": seconds,
                                          "step_ms": round(1e3 * outcome.step_seconds / max(1, outcome.steps), 2)})
        self._joint_bases.pop(m.label, None)
        shutil.rmtree(unit / "scratch", ignore_errors=True)

    def stage_fold(self) -> dict:
        c = self.cfg
        h = c.section_hash("fold", self.hashes["train"])
        self.hashes["fold"] = h
        if rec := self._fresh("fold", h):
            self.log("fold: up to date, skipped")
            return rec
        prepared = self.record("prepare")["tasks"]
        bundles = {}
        for m in c.methods:
            method, final, versions = self._versions(m)
            backbone = self.bundle_backbone(m)
            shared = m.label if method.joint else m.base
            weights = c.backbone.weights + (f" + joint training ({shared})" if shared else "")
            manifest = write_bundle(
                self.out / "bundles" / m.label, backbone, backbone_id(backbone, weights, c.backbone.image_size),
                method.bundle_deltas(final, versions),
                {"name": m.name, "label": m.label, "params": m.params.model_dump(mode="json")},
                {t.name: prepared[t.name]["num_classes"] for t in c.tasks},
            )
            bundles[m.label] = manifest["ledger"]
            self.log(f"fold {m.label}: {manifest['ledger']['total']['n_x_base']:.3f} x base, "
                     f"{manifest['ledger']['total']['bytes_on_disk']:,} bytes")
        return self._save_record("fold", h, [f"bundles/{m.label}/manifest.json" for m in c.methods], ledgers=bundles)

    def stage_export(self) -> dict:
        c = self.cfg
        h = c.section_hash("export", EXPORT_FORMAT, self.hashes["fold"], c.export.model_dump())
        self.hashes["export"] = h
        if not c.export.onnx:
            self.log("export: disabled in config")
            return self._save_record("export", h, [], parity={})
        if rec := self._fresh("export", h):
            self.log("export: up to date, skipped")
            return rec
        from exporters.compute import count_flops
        from exporters.onnx import OnnxExporter, base_model, parity, session

        exporter = OnnxExporter(c.backbone.image_size, c.export.opset)
        first = c.tasks[0].name
        base = base_model(self.backbone.features, self.backbone.num_features, self.data(first).num_classes)
        outputs = ["exports/base.onnx"]
        exporter.export(base, self.out / outputs[0])
        results, flops = {}, {"base": count_flops(base, c.backbone.image_size)}
        for m in c.methods:
            bundle = load_bundle(self.out / "bundles" / m.label, expect_backbone=c.backbone.name)
            for task in bundle.tasks:
                rel = f"exports/{m.label}/{task}.onnx"
                merged = bundle.merged(task)
                flops[f"{m.label}/{task}"] = count_flops(merged, c.backbone.image_size)
                exporter.export(merged, self.out / rel)
                check = parity(merged, session(self.out / rel, c.run.threads), self._images(task))
                results[f"{m.label}/{task}"] = check
                outputs.append(rel)
                self.log(f"export {rel}: max |onnx - torch| {check['max_abs_diff']:.2e}, "
                         f"argmax agreement {check['argmax_agree']:.4f} on {check['images']} test images")
        forms = {}
        if c.export.forms:
            forms = self._export_forms(exporter)
            outputs.append("exports/forms.json")
        self.log(f"export: {len(outputs)} ONNX files from {exporter.traces} trace(s)")
        return self._save_record("export", h, outputs, parity=results, flops=flops, traces=exporter.traces, **forms)

    def _export_forms(self, exporter) -> dict:
        from exporters.deploy import FormBuilder

        c = self.cfg
        self.log(f"export: deployment forms {', '.join(c.export.forms)}")
        images = {}
        for t in c.tasks:
            calib = self._images(t.name, "train")[: c.export.calibration_images].numpy()
            images[t.name] = (calib, self._images(t.name).numpy(), self.data(t.name).test.labels.numpy())
        bundles = {m.label: load_bundle(self.out / "bundles" / m.label, expect_backbone=c.backbone.name)
                   for m in c.methods}
        built = FormBuilder(self.out / "exports", exporter, c.export.forms, c.run.threads, self.log,
                            c.export.int8).build(bundles, images)
        for key, check in built["checks"].items():
            acc = f", accuracy {check['reference_accuracy']:.4f} -> {check['accuracy']:.4f}" if "accuracy" in check else ""
            self.log(f"  {key}: max diff {check['max_abs_diff']:.2e}, argmax agreement {check['argmax_agree']:.4f}{acc}")
        return {"forms": built["forms"], "form_checks": built["checks"]}

    def stage_bench(self) -> dict:
        c = self.cfg
        h = c.section_hash("bench", self.hashes["export"], c.bench.model_dump(), c.run.threads)
        self.hashes["bench"] = h
        if not c.export.onnx:
            return self._save_record("bench", h, [], latency={})
        if rec := self._fresh("bench", h):
            self.log("bench: up to date, skipped")
            return rec
        from exporters.latency import measure
        from exporters.onnx import session

        # a second, independent session of the base: its ratio is the noise floor of the bench
        files = {"base": self.out / "exports" / "base.onnx", "base_repeat": self.out / "exports" / "base.onnx"}
        for m in c.methods:
            for t in c.tasks:
                files[f"{m.label}/{t.name}"] = self.out / "exports" / m.label / f"{t.name}.onnx"
        sessions = {k: session(p, c.run.threads) for k, p in files.items()}
        latency = {}
        for bs in c.bench.batch_sizes:
            self.log(f"bench: onnxruntime CPU, batch {bs}, {len(sessions)} models, {c.bench.runs} runs each")
            res = measure(sessions, c.backbone.image_size, bs, c.bench.warmup, c.bench.runs)
            base = res["base"]["median_ms"]
            for k, r in res.items():
                r["ratio_to_base"] = r["median_ms"] / base
            latency[f"batch{bs}"] = res
        del sessions
        deploy = {}
        forms = self.record("export").get("forms")
        if c.bench.forms and forms:
            from exporters.bench import bench_forms

            deploy = bench_forms(self.out / "exports", forms, c.backbone.image_size, c.bench.batch_sizes,
                                 c.bench.warmup, c.bench.runs, c.run.threads, log=self.log)
        return self._save_record("bench", h, [], latency=latency, threads=c.run.threads, deploy=deploy)

    def stage_report(self) -> dict:
        from pipeline.report import write_report

        results = write_report(self)
        self.log(f"report: {self.out / 'report.md'}")
        return results
