"""Export a full-size model with random weights (float32, or --dtype) in a child process; print time, peak RSS and
its ratio to the weights' size. Usage: python scripts/bench_export.py [--preset gemma-2b] [--dtype fp16] [--keep DIR]"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="gemma-2b")
    parser.add_argument("--dtype", default=None, help="the export's --dtype (fp32 by default; fp16 for gemma-4-e2b, "
                        "whose 4.6 G weights take 17 GiB in float32)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the artifact here instead of deleting it")
    parser.add_argument("--verify", action="store_true", help="also run the parity check (a second model in memory)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-export-", dir=args.keep.parent if args.keep else None))
    output = args.keep or workdir / "artifact"
    command = [sys.executable, "-m", "exporter.cli", "--model", f"random:{args.preset}", "--output", str(output),
               "--quiet", "--overwrite"]
    if not args.verify:
        command.append("--no-verify")
    if args.dtype:
        command += ["--dtype", args.dtype]
    start = time.perf_counter()
    status = subprocess.call(command)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if status != 0:
        print(f"export failed with exit code {status}", file=sys.stderr)
        return status
    from runtime import read_manifest

    manifest = read_manifest(output, verify=False)
    weights = manifest.export.weight_bytes
    size = sum(f.size for f in manifest.files.values())
    print(json.dumps({
        "preset": args.preset,
        "dtype": manifest.precision.dtype,
        "seconds": round(seconds, 1),
        "trace_seconds": manifest.export.trace_seconds,
        "weight_gib": round(weights / 2**30, 2),
        "artifact_gib": round(size / 2**30, 2),
        "peak_rss_gib": round(peak / 2**30, 2),
        "peak_rss_over_weights": round(peak / weights, 2),
    }, indent=2))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
