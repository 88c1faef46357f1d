"""Both reward benchmarks in one run (CPU defaults; pass throughput options after `--`).

    python benchmarks/run_all.py [-- --encoder qwen3-8b-random --max-tokens 4096]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import repetition_bench  # noqa: E402
import throughput_bench  # noqa: E402

if __name__ == "__main__":
    extra = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else []
    repetition_bench.main([])
    throughput_bench.main(extra)
