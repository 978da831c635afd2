"""Thread settings that must be in place before torch is first imported.

On CPU, matmuls alternate between PyTorch (OpenMP threads) and numpy's OpenBLAS
(its own threads). GNU OpenMP's workers spin for a long time after each parallel
region and then steal the cores OpenBLAS needs, which measured 2-3x slower on this
2-core machine; a short spin count keeps both fast. Only a default: a value the user
set wins, and it has no effect if torch was imported before thinkwise.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")
