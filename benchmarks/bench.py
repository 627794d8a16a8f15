"""`make bench`: run `safegate bench` (defaults: Qwen2.5-0.5B shape, 5 interleaved pairs) and write
`benchmarks/results.json`. Extra arguments pass through, e.g. `python benchmarks/bench.py --shape tiny`."""

import sys

from safegate.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
