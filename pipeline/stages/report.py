"""The report stage: results.json, report.md and plots (always rewritten: cheap, and it picks up
``taskfold bench`` results saved since)."""
from __future__ import annotations

from pipeline.stages.base import Stage
from pipeline.stages.context import StageContext


class ReportStage(Stage):
    name = "report"

    def run(self, ctx: StageContext) -> dict:
        from pipeline.report import write_report

        out = write_report(ctx.cfg, ctx.run, ctx.timings)
        ctx.log(f"report: {ctx.run.report_file}")
        return out
