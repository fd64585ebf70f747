"""Host cost of the python-backend model's by-batch path, without a server (issue 7).

Runs ``TritonPythonModel.execute()`` from algorithm/serving/triton_python/model.py over a
stand-in ``triton_python_backend_utils`` (tensors through DLPack, as on the GPU machine's numpy
2) for a dynamic batch of batch-1 requests, and reports microseconds per request:

- ``--stub-forward``: the engine's forward returns at once, so only the host work is timed (on
  any machine; compare two checkouts with ``PYTHONPATH=<checkout>``);
- on CUDA: execute() against the engine's own replay of the same layout, so the difference is
  the host work the GPU waits for (one instance, nothing overlapped).

    PYTHONPATH=. python benchmarks/gpu/host_path.py --device cpu --stub-forward

- ``--pipeline-depth N [--continuous]``: the pipelined paths (issue 14): execute() returns once
  the batch is queued (or left with the launcher), a second thread answers through the response
  senders. Each send waits ``--send-us`` with the GIL free, as the stub's round trip to the
  backend does (300-500 us on the GPU hosts). Reports wall and CPU microseconds per request over
  all threads of the process (``time.process_time``): the CPU one is what the GIL serializes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from algorithm.serving.runtime.gpu.engine import EngineConfig
from algorithm.serving.runtime.torch import TorchRunner
from algorithm.serving.triton.python_model.standin import Request, model_py_module, served_model
from algorithm.ugt import UGTConfig, UGTModel, random_inputs
from benchmarks.common import environment
from benchmarks.gpu.run_gpu import lognormal_lengths


def main() -> int:
    with model_py_module("ugt_model_py") as mp:
        return _run(mp)


def _run(mp) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="base", choices=("base", "tiny"))
    ap.add_argument("--stub-forward", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default="")
    ap.add_argument("--profile", type=int, default=0, help="print the top N functions (cProfile)")
    ap.add_argument("--pipeline-depth", type=int, default=0)
    ap.add_argument("--continuous", action="store_true", help="continuous batching (with a depth)")
    ap.add_argument("--send-us", type=float, default=400.0, help="pipelined: each send's wait")
    args = ap.parse_args()
    if args.pipeline_depth:
        return _run_pipelined(mp, args)
    cuda = args.device.startswith("cuda")
    cfg, runner = _runner(args.preset, args.device, args.stub_forward)
    phase_file = Path(tempfile.mkdtemp(prefix="ugt-phases-")) / "ugt.json"
    served = served_model(mp, runner, cfg.max_seq_length, cfg.codebook_sizes, True, phase_file)
    rng = np.random.default_rng(0)
    seq = min(args.seq, cfg.max_seq_length)
    lengths = _loads(args.batch, seq, rng)
    result = {
        "environment": environment(),
        "device": args.device,
        "stub_forward": args.stub_forward,
        "batch": args.batch,
    }
    for name, lens in lengths.items():
        reqs = [random_inputs(1, int(n), cfg.codebook_sizes, rng) for n in lens]
        for _ in range(3):
            served.execute([Request(r) for r in reqs])
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        _fresh_phases(mp, served, phase_file)  # the warm-up calls (captures) stay out
        times = []
        prof = None
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        for _ in range(args.iters):
            wrapped = [Request(r) for r in reqs]
            sync()
            t = time.perf_counter()
            responses = served.execute(wrapped)
            times.append(time.perf_counter() - t)
        if prof is not None:
            import pstats

            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
        assert all(r.error is None for r in responses), [r.error.message for r in responses]
        row = {"execute_ms": 1e3 * float(np.median(times))}
        ph = served.phases  # mean us per request per phase over these calls
        row["phases_us_per_request"] = {
            k: round(1e6 * v / ph.requests, 2) for k, v in ph.seconds.items()
        }
        if cuda and not args.stub_forward:
            t, rows = runner.engine.tokens_from_requests(reqs)  # the same layout, prepared once
            users = sum(rows)
            runner.engine.run(t, users)
            sync()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = []
            for _ in range(args.iters):
                a.record()
                runner.engine.run(t, users)
                b.record()
                b.synchronize()
                reps.append(a.elapsed_time(b))
            row["engine_run_ms"] = float(np.median(reps))
            row["host_us_per_request"] = (
                1e3 * (row["execute_ms"] - row["engine_run_ms"]) / args.batch
            )
        else:
            row["us_per_request"] = 1e3 * row["execute_ms"] / args.batch
        result[name] = row
        print(name, json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _loads(batch: int, seq: int, rng) -> dict:
    """The two loads each path is timed on: ``batch`` full-length histories, and a log-normal mix."""
    return {
        f"fixed{seq}": np.full(batch, seq),
        "mix": lognormal_lengths(rng, batch, longest=seq),
    }


def _fresh_phases(mp, served, phase_file) -> None:
    """New phase sums from here on (the warm-up's calls stay out), the old ones closed."""
    served.phases.close()
    served.phases = mp._Phases(phase_file)


def _runner(preset: str, device: str, stub_forward: bool) -> tuple[UGTConfig, TorchRunner]:
    """The preset's model (random weights) in a TorchRunner; with ``stub_forward`` the engine's
    forward returns zeros at once, so only the host's work is left."""
    cfg = UGTConfig.base() if preset == "base" else UGTConfig.tiny()
    torch.manual_seed(0)
    model = UGTModel(cfg).eval()
    engine = EngineConfig(dtype="bf16" if device.startswith("cuda") else "fp32")
    runner = TorchRunner(model, device=device, engine=engine)
    k = cfg.num_recommendations
    if stub_forward:

        def forward(t):
            return (
                torch.zeros(t.users, k, 3, dtype=torch.int64, device=runner.device),
                torch.zeros(t.users, k, device=runner.device),
            )

        runner.engine._forward = forward
    return cfg, runner


def _run_pipelined(mp, args) -> int:
    """Batches of ``--batch`` requests through the pipelined execute(), all answered: wall and
    CPU (all threads) microseconds per request, and model.py's phases."""
    from algorithm.serving.triton.python_model import standin

    cfg, runner = _runner(args.preset, "cpu", stub_forward=True)  # the host's work only
    send, wait = standin.ResponseSender.send, args.send_us / 1e6

    def slow_send(self, response=None, flags=0):  # the round trip, with the GIL free
        time.sleep(wait)
        send(self, response, flags)

    standin.ResponseSender.send = slow_send
    phase_file = Path(tempfile.mkdtemp(prefix="ugt-phases-")) / "ugt.json"
    served = served_model(
        mp,
        runner,
        cfg.max_seq_length,
        cfg.codebook_sizes,
        True,
        phase_file,
        pipeline_depth=args.pipeline_depth,
        continuous_batching=args.continuous,
        max_batch_size=64,
    )
    rng = np.random.default_rng(0)
    seq = min(args.seq, cfg.max_seq_length)
    result = {
        "environment": environment(),
        "device": "cpu",
        "batch": args.batch,
        "pipeline_depth": args.pipeline_depth,
        "continuous": args.continuous,
        "send_us": args.send_us,
    }
    try:
        for name, lens in _loads(args.batch, seq, rng).items():
            reqs = [random_inputs(1, int(n), cfg.codebook_sizes, rng) for n in lens]
            batches = [[Request(r) for r in reqs] for _ in range(args.iters + 3)]
            for b in batches[:3]:  # warm-up
                served.execute(b)
            for b in batches[:3]:
                b[-1].get_response_sender().done.wait(60)
            _fresh_phases(mp, served, phase_file)
            served.phases.launch_laps = runner.profile_launches()
            wall, cpu = time.perf_counter(), time.process_time()
            for b in batches[3:]:
                served.execute(b)
            for b in batches[3:]:
                for r in b:
                    assert r.get_response_sender().done.wait(60)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            n = args.iters * args.batch
            ph = served.phases
            row = {
                "wall_us_per_request": 1e6 * wall / n,
                "cpu_us_per_request": 1e6 * cpu / n,
                "phases_us_per_request": {
                    k: round(1e6 * v / max(ph.requests, 1), 2) for k, v in ph.seconds.items()
                },
            }
            result[name] = row
            print(name, json.dumps(row), flush=True)
    finally:
        served.finalize()
        standin.ResponseSender.send = send
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
