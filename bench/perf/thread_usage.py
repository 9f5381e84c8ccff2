"""Which threads of a training process use the CPU: run a command, sample every thread's CPU time from /proc every
few seconds, and print the busiest threads of each interval (Linux only).

    python bench/perf/thread_usage.py --every 5 -- python3 bench/perf/train_one.py --system swiftune ...

A step bound by the host runs on one Python thread (forward) and the autograd engine's device thread (backward).
Other busy threads (OpenMP workers spinning after a CPU op, copy threads, the profiler) compete with them for
cores; this shows them, with the CPU each named thread is allowed to run on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def thread_times(pid: int) -> dict[int, tuple[str, float, int]]:
    """{thread id: (name, user + system CPU seconds, CPU it last ran on)} of process ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue  # the thread ended between listdir and open
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        # fields[0] is field 3 of proc(5): utime and stime are fields 14 and 15, the last CPU is field 39
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, int(fields[36]))
    return out


def busiest(before: dict, after: dict, seconds: float, top: int) -> list[str]:
    """The ``top`` threads by CPU share over the interval, as printable lines."""
    rows = []
    for tid, (name, cpu, last_cpu) in after.items():
        used = cpu - before.get(tid, (name, 0.0, 0))[1]
        if used > 0:
            rows.append((used / seconds, tid, name, last_cpu))
    rows.sort(reverse=True)
    return [f"    {share * 100:5.0f}%  tid {tid:<8} cpu {last:<3} {name}" for share, tid, name, last in rows[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("give the command to sample after --")
    child = subprocess.Popen(command)
    start = time.perf_counter()
    before, last = thread_times(child.pid), time.perf_counter()
    while child.poll() is None:
        time.sleep(args.every)
        try:
            now_times, now = thread_times(child.pid), time.perf_counter()
        except FileNotFoundError:
            break  # the process ended while sleeping
        # threads that ended during the interval drop out of both sides
        total = sum(cpu - before.get(tid, (name, 0.0, 0))[1] for tid, (name, cpu, _) in now_times.items())
        print(f"[{now - start:6.1f} s] {len(now_times)} threads, {100 * total / (now - last):.0f}% CPU", flush=True)
        print("\n".join(busiest(before, now_times, now - last, args.top)), flush=True)
        before, last = now_times, now
    sys.exit(child.wait())


if __name__ == "__main__":
    main()
