"""Progress output: step bars on a terminal only; a log redirected to a file gets the per-epoch
lines, not a line per step."""
from __future__ import annotations

import io
import sys

from pipeline.methods import build_method
from pipeline.methods.context import Schedule
from pipeline.training.incremental import train_task


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _train(backbones, digits16):
    bb, _ = backbones["tiny_convnet"]
    method = build_method("linear_probe")
    return train_task(bb, digits16, method, Schedule(epochs=2, batch_size=32, lr=0.05), seed=0, progress=True)


def test_no_step_bars_when_the_output_is_not_a_terminal(backbones, digits16, capsys):
    _train(backbones, digits16)
    out, err = capsys.readouterr()
    assert "linear_probe/digits epoch 1: loss" in out + err
    assert "linear_probe/digits epoch 2: loss" in out + err
    assert "it/s" not in err and "\r" not in err, err[:300]


def test_step_bars_on_a_terminal(backbones, digits16, monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    _train(backbones, digits16)
    assert "linear_probe/digits epoch 1/2" in term.getvalue()  # the bar's description
