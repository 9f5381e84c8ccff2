"""Where the CPU time of a training step goes (cProfile over a few steps after warm-up), for steps that the CPU
bounds (see idle_profile.py): the top functions by own time and by cumulative time.

    python bench/perf/cpu_profile.py --shape 8b --quant nf4 --point 2x2048
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import idle_profile

    parser = idle_profile.step_arguments(__doc__)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=35)
    args = parser.parse_args()
    model, loss_of, optimizer, batch = idle_profile.setup(args)
    idle_profile.issue_times(loss_of, model, optimizer, batch, 3)
    issue, wall = idle_profile.issue_times(loss_of, model, optimizer, batch, 3)
    print(f"unprofiled: CPU issue {issue * 1e3:.1f} ms, wall {wall * 1e3:.1f} ms a step", flush=True)
    profiler = cProfile.Profile()
    profiler.enable()
    idle_profile.issue_times(loss_of, model, optimizer, batch, args.steps)
    profiler.disable()
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(args.top)
        lines = [line for line in text.getvalue().splitlines() if line.strip()]
        start = next(i for i, line in enumerate(lines) if "ncalls" in line)
        print(f"--- by {key}, {args.steps} steps")
        print("\n".join(line[:150] for line in lines[start : start + args.top + 1]))


if __name__ == "__main__":
    main()
