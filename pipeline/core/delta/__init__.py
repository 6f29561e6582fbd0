"""The delta vocabulary: one module per kind, the ``TaskDelta`` that maps module paths to
kinds, the file codec and the explicit registry of kinds (see ``base`` for the contract)."""
from pipeline.core.delta.base import Delta, own_tensors, tensor_bits
from pipeline.core.delta.channel_select import BASE_SOURCE, ChannelSelect
from pipeline.core.delta.codec import read_delta, write_delta
from pipeline.core.delta.head import Head
from pipeline.core.delta.lowrank import CPPart, LowRank, LowRankBranch, cp_dense
from pipeline.core.delta.overlay import Norm, Replace
from pipeline.core.delta.registry import KINDS
from pipeline.core.delta.skip import Skip
from pipeline.core.delta.task_delta import TaskDelta

__all__ = ["Delta", "own_tensors", "tensor_bits", "BASE_SOURCE", "ChannelSelect", "read_delta", "write_delta",
           "Head", "CPPart", "LowRank", "LowRankBranch", "cp_dense", "Norm", "Replace", "KINDS", "Skip", "TaskDelta"]
