"""What every benchmark shares: where its result file goes and what the file says about the run.

A benchmark's JSON is evidence for a table in the README, so it must say how it was made:
`run_record()` adds the exact command, the time, the machine (CPU, cores, GPU) and the
versions of every library a comparison depends on (thinkwise, torch, transformers, triton,
numpy, gguf ...). `add_output_arguments` / `output_path` give each run a NEW file
(`<name>-<UTC time>.json` under $OUT or benchmarks/results) unless `--out` names one, and
refuse to replace an existing file without `--overwrite`, so a rerun never silently
destroys the committed numbers. `require_cuda` ends a GPU benchmark on a machine without
one with a one-line message instead of a CUDA traceback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LIBRARIES = ("thinkwise", "torch", "transformers", "triton", "numpy", "gguf", "safetensors", "tokenizers",
             "accelerate", "httpx", "uvicorn", "fastapi")


def add_output_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", default=None,
                        help=f"result JSON (default: $OUT or benchmarks/results, {name}-<UTC time>.json: a new file)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def output_path(args: argparse.Namespace, name: str) -> Path:
    """The file this run writes; exits with a one-line message rather than replace one silently."""
    if args.out:
        path = Path(args.out)
    else:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = Path(os.environ.get("OUT") or RESULTS_DIR) / f"{name}-{stamp}.json"
    if path.exists() and not getattr(args, "overwrite", False):
        sys.exit(f"error: {path} exists; pass --overwrite to replace it, or --out NEW.json")
    return path


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for library in LIBRARIES:
        try:
            versions[library] = metadata.version(library)
        except metadata.PackageNotFoundError:
            pass
    return versions


def machine() -> dict:
    info = {"system": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()]}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["gpu_count"] = torch.cuda.device_count()
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def run_record() -> dict:
    """The command, time, machine and library versions of this run."""
    return {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": library_versions(),
    }


def write_result(path: Path, report: dict) -> None:
    """`report` plus the run record, as JSON at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, "run": run_record()}, indent=2))
    print(f"wrote {path}")


def require_cuda(script: str) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"error: {script} measures a CUDA GPU and this machine has none visible; on a CPU run "
                 "python benchmarks/cpu_generate.py")
