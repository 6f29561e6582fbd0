"""TAPS: task-adaptive parameter sharing, incremental and joint (see ``gate``)."""
from pipeline.methods.taps.gate import JointTapsGate, TapsConfig, TapsFacts, TapsGate, straight_through_gate
from pipeline.methods.taps.incremental import Taps, gates
from pipeline.methods.taps.joint import JointTaps, JointTapsConfig, joint_gates

__all__ = ["JointTapsGate", "TapsConfig", "TapsFacts", "TapsGate", "straight_through_gate", "Taps", "gates",
           "JointTaps", "JointTapsConfig", "joint_gates"]
