"""Honest cost: analytic FLOPs and bytes per request, effective FLOPs, energy, a runtime model.

`model_cost` charges each engine step's real work to the requests it served;
`hardware` turns bytes into Kinetics-style effective FLOPs and reads NVML energy;
`runtime_model` fits runtime = f(prompt) + g x (output - 1) to profiled runs.
"""

from thinkwise.cost.hardware import DEVICE_PEAKS, EnergyMeter, device_intensity, effective_flops
from thinkwise.cost.model_cost import ModelCostSpec, attribute_step
from thinkwise.cost.runtime_model import ProfiledRun, RuntimeModel

__all__ = ["DEVICE_PEAKS", "EnergyMeter", "ModelCostSpec", "ProfiledRun", "RuntimeModel", "attribute_step",
           "device_intensity", "effective_flops"]
