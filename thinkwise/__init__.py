"""thinkwise: an LLM inference engine that spends compute where it buys accuracy."""

import thinkwise._threads  # noqa: F401  (must precede the first torch import)

from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.llm import LLM

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
