"""The timing the benchmarks share: interleaved rounds measured against bare forwards, in wall and CPU time, and the
process's resident set (current and high-water mark) for peak-memory children."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(call: Callable[[], object]) -> tuple[float, float, object]:
    """Wall time, CPU time and result of `call()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = call()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def interleaved_rounds(bare: Callable[[], object], calls: dict, rounds: int, reference: str, progress: bool) -> dict:
    """Run every `(method, task)` call once per round, in an order rotated each round, each after three `bare`
    forwards. Per call: wall and CPU seconds, both as multiples of the round's median bare forward (`x_wall`,
    `x_cpu`), and `to_ref`, its wall time over the `reference` method's on the same task in the same round.
    Returns those records, the last round's outputs and each round's median bare forward."""
    results = {}
    names = list(calls)
    rec = {key: {"wall": [], "cpu": [], "x_wall": [], "x_cpu": [], "to_ref": []} for key in names}
    bare_walls, bare_cpus = [], []
    for round_ in range(rounds):
        start = time.perf_counter()
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        this_round, round_bare_wall, round_bare_cpu = {}, [], []
        for key in order:
            for _ in range(3):
                wall, cpu, _out = timed(bare)
                round_bare_wall.append(wall)
                round_bare_cpu.append(cpu)
            wall, cpu, results[key] = timed(calls[key])
            this_round[key] = (wall, cpu)
            if progress:
                print(f"    {key[0]} {key[1]}: {wall:.2f} s", flush=True)
        bw, bc = statistics.median(round_bare_wall), statistics.median(round_bare_cpu)
        bare_walls.append(bw)
        bare_cpus.append(bc)
        for key, (wall, cpu) in this_round.items():
            rec[key]["wall"].append(wall)
            rec[key]["cpu"].append(cpu)
            rec[key]["x_wall"].append(wall / bw)
            rec[key]["x_cpu"].append(cpu / bc)
            ref = this_round.get((reference, key[1]))
            if ref is not None:
                rec[key]["to_ref"].append(wall / ref[0])
        print(f"  round {round_ + 1}/{rounds}: {time.perf_counter() - start:.0f} s, bare forward {bw * 1e3:.1f} ms", flush=True)
    return {"rec": rec, "results": results, "bare_wall": bare_walls, "bare_cpu": bare_cpus}


def resident() -> dict[str, int]:
    """This process's resident set now (`VmRSS`) and its high-water mark (`VmHWM`), in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values
