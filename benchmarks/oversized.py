"""What oversized requests cost the real tritonserver's memory, and what bounds it (issue 19).

    .venv/bin/python -m benchmarks.oversized --onnx demo-output/model.onnx \\
        [--elements 5000000] [--concurrency 4] [--variants default,grpc_pool_0] [--protocols grpc,http]

The served model is the python-backend repository the bundled server runs (ONNX Runtime, one
instance, max_batch_size x max_seq_length from --max-batch/--max-seq, default 64 x 1024, the
deployment defaults). Every request is 4 int64 inputs of [1, N], which model.py refuses by shape
(after Triton has read every byte):

- ``oversized_1``: one request with N = --elements (5,000,000: 160 MB, the issue's example);
- ``oversized_c``: --concurrency of them at once;
- ``at_limit_c``: --concurrency requests of max_batch x max_seq items each, the largest body a
  proxy with the derived limit (``security.max_request_bytes``, the generated ingress's
  ``proxy-body-size``) lets through: the "after" of the deployment, where nothing larger arrives.

Each scenario runs on a fresh server, for each protocol and each server variant: ``default`` is
the server as ``TritonServer`` starts it; ``grpc_pool_0`` adds ``--grpc-infer-allocation-pool-size=0``
(Triton keeps no gRPC request objects, and the input buffers they hold, for reuse). The memory of tritonserver plus its python stub is sampled every 50 ms from
``/proc/<pid>/smaps_rollup``: RSS (shared pages counted once per process) and PSS (shared pages
split, so the sum is what the machine holds), at rest, at the peak, and 2 s after the last answer.
A short closed loop of valid requests (batch 1, seq 64, concurrency 4) measures what the variant
costs in throughput. Writes benchmarks/results/oversized-<stamp>.json and prints a table.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from algorithm.serving import ExportConfig, TritonConfig, TritonConfigGenerator, TritonServer
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.security import max_request_bytes

from .common import environment, write_result

MODEL = "ugt"
VARIANTS = {"default": [], "grpc_pool_0": ["--grpc-infer-allocation-pool-size=0"]}
_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_Shmem")


def _memory(pids: list[int]) -> dict[str, int]:
    """Summed smaps_rollup fields (bytes) of the processes still alive."""
    total = dict.fromkeys(_FIELDS, 0)
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            if name in total:
                total[name] += int(rest.split()[0]) << 10
    return total


def _pids(server) -> list[int]:
    import psutil

    root = psutil.Process(server.process.pid)
    return [root.pid, *(p.pid for p in root.children(recursive=True))]


class Sampler:
    """Peak of each field while running (every 50 ms)."""

    def __init__(self, server):
        self.server, self.peak = server, dict.fromkeys(_FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            now = _memory(_pids(self.server))
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def _send(server, protocol: str, items: int, count: int, timeout_s: float) -> list[str]:
    """``count`` requests of 4 x [1, items] int64 at once; their error messages (first line)."""
    x = np.zeros((1, items), np.int64)
    errors: list[str] = []

    def one():
        try:
            if protocol == "grpc":
                import tritonclient.grpc as client

                c = client.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
                inputs = []
                for name in INPUT_NAMES:
                    inp = client.InferInput(name, list(x.shape), "INT64")
                    inp.set_data_from_numpy(x)
                    inputs.append(inp)
                c.infer(MODEL, inputs, client_timeout=timeout_s)
            else:
                import tritonclient.http as client

                c = client.InferenceServerClient(
                    f"127.0.0.1:{server.http_port}", network_timeout=timeout_s
                )
                inputs = []
                for name in INPUT_NAMES:
                    inp = client.InferInput(name, list(x.shape), "INT64")
                    inp.set_data_from_numpy(x, binary_data=True)
                    inputs.append(inp)
                c.infer(MODEL, inputs)
            errors.append("answered")
        except Exception as e:  # the expected outcome: model.py refuses the shape
            errors.append(str(e).strip().splitlines()[0][:160])

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 30)
    return errors


def _throughput(server, seconds: float) -> dict:
    from algorithm.serving import BenchmarkConfig
    from algorithm.serving.benchmark import TritonBenchmark

    cfg = BenchmarkConfig(
        num_warmup_requests=20,
        num_requests=50,
        measurement_window_s=seconds,
        max_trials=3,
        codebook_sizes=(1024, 4096, 16384),
    )
    r = TritonBenchmark(cfg).run(
        f"127.0.0.1:{server.grpc_port}", MODEL, batch_size=1, seq_length=64, concurrency=4
    )
    return {"throughput_rps": r.throughput, "p50_ms": r.latency_p50, "p99_ms": r.latency_p99}


def _scenario(repo, variant, protocol, items, count, settle_s, timeout_s) -> dict:
    with TritonServer(
        repo, http_port=0, grpc_port=0, metrics_port=0, extra_args=VARIANTS[variant]
    ) as server:
        _send(server, protocol, 16, 1, timeout_s)  # the first request's one-time allocations
        time.sleep(settle_s)
        rest = _memory(_pids(server))
        t0 = time.perf_counter()
        with Sampler(server) as sampler:
            errors = _send(server, protocol, items, count, timeout_s)
            seconds = time.perf_counter() - t0
            time.sleep(settle_s)
        after = _memory(_pids(server))
        alive = server.is_ready()
    payload = count * items * len(INPUT_NAMES) * 8
    return {
        "variant": variant,
        "protocol": protocol,
        "items_per_input": items,
        "requests": count,
        "payload_bytes": payload,
        "seconds": seconds,
        "rest": rest,
        "peak": sampler.peak,
        "after": after,
        "peak_pss_rise_per_payload_byte": (sampler.peak["Pss"] - rest["Pss"]) / payload,
        "server_ready_after": alive,
        "errors": {e: errors.count(e) for e in sorted(set(errors))},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--onnx", type=Path, default=Path("demo-output/model.onnx"))
    ap.add_argument("--elements", type=int, default=5_000_000, help="items of one oversized input")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-seq", type=int, default=1024)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--protocols", default="grpc,http")
    ap.add_argument("--settle-s", type=float, default=2.0)
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--throughput-s", type=float, default=2.0, help="0 skips the closed loop")
    args = ap.parse_args()
    variants = args.variants.split(",")
    protocols = args.protocols.split(",")
    limit = max_request_bytes(args.max_batch, args.max_seq)
    at_limit = args.max_batch * args.max_seq  # items of one input in the largest valid request
    scenarios = {
        "oversized_1": (args.elements, 1),
        "oversized_c": (args.elements, args.concurrency),
        "at_limit_c": (at_limit, args.concurrency),
    }
    rows, speed = [], {}
    with tempfile.TemporaryDirectory(prefix="oversized-") as tmp:
        repo = Path(tmp) / "repo"
        ec = ExportConfig(
            model_name=MODEL, max_batch_size=args.max_batch, max_seq_length=args.max_seq
        )
        tc = TritonConfig(
            platform="python",
            instance_kind="KIND_CPU",
            instance_count=1,
            max_queue_delay_us=1000,
            runtime_threads=1,
        )
        TritonConfigGenerator(ec, tc).generate(repo, model_file=args.onnx)
        for variant in variants:
            for protocol in protocols:
                for name, (items, count) in scenarios.items():
                    row = _scenario(
                        repo, variant, protocol, items, count, args.settle_s, args.timeout_s
                    )
                    row["scenario"] = name
                    rows.append(row)
                    print(
                        f"{variant:11} {protocol:4} {name:11} rest {row['rest']['Pss'] >> 20} MiB, "
                        f"peak {row['peak']['Pss'] >> 20} MiB, after {row['after']['Pss'] >> 20} MiB "
                        f"(PSS); {row['errors']}",
                        flush=True,
                    )
            if args.throughput_s > 0:
                with TritonServer(
                    repo, http_port=0, grpc_port=0, metrics_port=0, extra_args=VARIANTS[variant]
                ) as server:
                    speed[variant] = _throughput(server, args.throughput_s)
                print(f"{variant:11} closed loop: {speed[variant]}", flush=True)
    data = {
        "benchmark": "oversized requests: tritonserver + python stub memory",
        "environment": environment(),
        "config": {
            **vars(args),
            "onnx": str(args.onnx),
            "variants": {v: VARIANTS[v] for v in variants},
            "max_request_bytes": limit,
            "oversized_request_bytes": args.elements * len(INPUT_NAMES) * 8,
        },
        "rows": rows,
        "closed_loop_batch1_seq64_c4": speed,
    }
    path = write_result("oversized", data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
