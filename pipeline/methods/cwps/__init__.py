"""CWPS: channel-wise parameter sharing with a composite parent (see ``method``)."""
from pipeline.methods.cwps.method import Cwps
from pipeline.methods.cwps.mixing import ChannelGate, ChannelMix, CwpsConfig, CwpsFacts, kernel_distance, mixed_layers
from pipeline.methods.cwps.pool import pointer_tensor, pool_rows, rebase

__all__ = ["Cwps", "ChannelGate", "ChannelMix", "CwpsConfig", "CwpsFacts", "kernel_distance", "mixed_layers",
           "pointer_tensor", "pool_rows", "rebase"]
