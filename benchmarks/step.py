"""Milliseconds per training step of one zoo model, under the settings that
decide small-batch CPU speed. Each variant runs in its own fresh process.

    python benchmarks/step.py [--model ResNet18] [--batch-size 10] [--steps 60] [--repeats 3]
        [--variants eager,alloc,channels-last,compile,bf16]
    python benchmarks/step.py --profile [--model ResNet18]   # where an eager step's time goes

Variants (each at 1 and 2 threads): ``eager`` (torch's defaults), ``alloc``
(eager with htfl's allocator tuning), ``channels-last``, ``compile``
(torch.compile, inductor), ``bf16`` (autocast to bfloat16; not the same
numbers). Prints the median step time over repeats, the minor page faults per
step and the achieved GFLOP/s (FLOPs from torch's FlopCounterMode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch, torch.nn.functional as F
from htfl_plugins.engine.perf import tune_allocator
from htfl_plugins.models import build_model
from htfl_plugins.plugins import get_plugins
model_name, variant = sys.argv[1], sys.argv[5]
batch, steps, threads = (int(v) for v in sys.argv[2:5])
if variant == "alloc":
    tune_allocator()
torch.set_num_threads(threads)
torch.manual_seed(0)
model = build_model(get_plugins(), model_name, 1, 28, 10, 512)
x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
from torch.utils.flop_counter import FlopCounterMode
with FlopCounterMode(display=False) as fc:
    F.cross_entropy(model(x), y).backward()
flops = fc.get_total_flops()
if variant == "channels-last":
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
fwd = torch.compile(model) if variant == "compile" else model
opt = torch.optim.SGD(model.parameters(), lr=0.01)
def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
        loss = F.cross_entropy(fwd(x), y)
    loss.backward()
    opt.step()
for _ in range(5):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t0 = time.perf_counter()
for _ in range(steps):
    step()
dt = (time.perf_counter() - t0) / steps
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
print(json.dumps({"ms": dt * 1e3, "faults": faults, "gflops": flops / dt / 1e9}))
"""


PROFILE = r"""
import sys, torch, torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from htfl_plugins.models import build_model
from htfl_plugins.plugins import get_plugins
torch.set_num_threads(2)
torch.manual_seed(0)
model = build_model(get_plugins(), sys.argv[1], 1, 28, 10, 512)
batch = int(sys.argv[2])
x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
for _ in range(10):
    step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(20):
        step()
print(f"20 steps of {sys.argv[1]}, batch {batch}, 2 threads")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ResNet18")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="eager,alloc,channels-last,compile,bf16")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler's table of one eager step on 2 threads instead")
    a = p.parse_args(argv)
    if a.profile:
        return subprocess.run([sys.executable, "-c", PROFILE, a.model, str(a.batch_size)], check=True).returncode
    print(f"{a.model}, batch {a.batch_size}, 1×28×28, {a.steps} steps, median of {a.repeats} processes")
    print("| variant | threads | ms / step | minor faults / step | GFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for variant in a.variants.split(","):
        for threads in (1, 2):
            runs = []
            for _ in range(a.repeats):  # interleaving would be fairer; fresh processes matter more
                out = subprocess.run([sys.executable, "-c", CHILD, a.model, str(a.batch_size), str(a.steps),
                                      str(threads), variant], capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            ms = statistics.median(r["ms"] for r in runs)
            faults = statistics.median(r["faults"] for r in runs)
            gflops = statistics.median(r["gflops"] for r in runs)
            print(f"| {variant} | {threads} | {ms:.1f} | {faults:.0f} | {gflops:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
