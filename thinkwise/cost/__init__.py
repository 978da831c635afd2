"""Honest cost: analytic FLOPs and bytes per request, effective FLOPs, GPU time, energy, a runtime model.

`model_cost` charges each engine step's real work to the requests it served;
`hardware` prices bytes as Kinetics-style effective FLOPs, times steps on the GPU and
reads NVML energy; `runtime_model` fits runtime = f(prompt) + g x (output - 1) to runs
profiled on this machine. This package sits at the bottom: stdlib, numpy and torch only.
"""

from thinkwise.cost.hardware import (DEVICE_INTENSITY, DEVICE_PEAKS, EnergyMeter, StepMeter, device_intensity,
                                     effective_flops, measured_peaks)
from thinkwise.cost.model_cost import ModelCostSpec, attribute_step
from thinkwise.cost.runtime_model import ProfiledRun, RuntimeModel, profile, split_held_out

__all__ = ["DEVICE_INTENSITY", "DEVICE_PEAKS", "EnergyMeter", "ModelCostSpec", "ProfiledRun", "RuntimeModel",
           "StepMeter", "attribute_step", "device_intensity", "effective_flops", "measured_peaks", "profile",
           "split_held_out"]
