"""Issue 14: would FlashAttention-4's Hopper forward (PyPI ``flash-attn-4``, CuTe DSL) beat the
engine's attention? The encoder's self-attention at the engine's shapes (8 heads of 64, bf16):
dense 64 x 1024 (today: torch SDPA, which picks cuDNN) and the packed log-normal mix of 64
(today: torch's FlashAttention-2 varlen kernel), each against FA4 on the same tensors.

For every kernel: the output's largest difference from an fp32 reference (a subset of users,
torch SDPA in fp32 math), its median time over CUDA events, TFLOP/s (4 * S_q * S_k * D * H per
user), its first call's time (FA4: JIT compilation), and its time replayed in a CUDA graph
(the engine replays graphs; FA4's eager call is bound by its Python launch) with whether the
replay gives the eager output. Writes one JSON; a kernel that fails says why in it.

    python3 benchmarks/gpu/attention_probe.py --out $OUT/attention_probe.json
(FA4 and its CUTLASS DSL wheels must be importable: run_issue14_fa4.sh installs them.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_gpu import environment, log, lognormal_lengths, time_fn  # noqa: E402

H, D = 8, 64


def _events(fn) -> float:
    """Median ms per call over CUDA events (30 calls after 5 warm-up calls)."""
    return time_fn(fn, torch.device("cuda"), iters=30, warmup=5)["median_ms"]


def _reference(q, k, v, cu, users: int):
    """fp32 attention of the first ``users`` segments of packed [N, H, D] q/k/v."""
    out = []
    for i in range(users):
        s, e = int(cu[i]), int(cu[i + 1])
        t = [x[s:e].float().transpose(0, 1) for x in (q, k, v)]
        out.append(F.scaled_dot_product_attention(*t).transpose(0, 1))
    return torch.cat(out)


def _flops(lengths) -> float:
    return float(sum(4 * n * n * D * H for n in lengths))


def _row(name, fn, check, lengths, first_s=None) -> dict:
    row: dict = {"kernel": name}
    try:
        t = time.monotonic()
        out = fn()
        torch.cuda.synchronize()
        row["first_call_s"] = round(time.monotonic() - t, 3) if first_s is None else first_s
        row["max_abs_diff_vs_fp32"] = check(out)
        ms = _events(fn)
        row["ms"] = ms
        row["tflops"] = _flops(lengths) / ms / 1e9
        row.update(_graph_check(fn))
        if "graph_ms" in row:
            row["graph_tflops"] = _flops(lengths) / row["graph_ms"] / 1e9
    except Exception as e:  # a kernel that cannot run is a result too
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()[-2000:]
    log(f"{name}: { ({k: v for k, v in row.items() if k != 'traceback'}) }")
    return row


def _graph_check(fn) -> dict:
    """Capture ``fn`` in a CUDA graph; does a replay reproduce the eager output?"""
    try:
        eager = fn().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        torch.cuda.synchronize()
        return {
            "graph_equals_eager": bool(torch.equal(out, eager)),
            "graph_ms": _events(graph.replay),
        }
    except Exception as e:
        return {"graph_error": f"{type(e).__name__}: {e}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    env = environment(device)
    env["command"] = "python3 benchmarks/gpu/attention_probe.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    result: dict = {"environment": env, "heads": H, "head_dim": D}
    try:
        import importlib.metadata as md

        result["fa4_versions"] = {
            p: md.version(p) for p in ("flash-attn-4", "nvidia-cutlass-dsl", "quack-kernels")
        }
        from flash_attn.cute.interface import flash_attn_func, flash_attn_varlen_func
    except Exception as e:
        result["fa4_import_error"] = f"{type(e).__name__}: {e}"
        flash_attn_func = flash_attn_varlen_func = None
        log(f"FA4 does not import: {result['fa4_import_error']}")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    shapes = {
        "dense_64x1024": [1024] * 64,
        "mix_64": [int(n) for n in lognormal_lengths(rng, 64, longest=1024)],
    }
    result["shapes"] = {}
    for shape, lengths in shapes.items():
        n = sum(lengths)
        q, k, v = (torch.randn(n, H, D, device=device, dtype=torch.bfloat16) for _ in range(3))
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
        cu_d, longest = cu.to(device), max(lengths)
        ref = _reference(q, k, v, cu, 8)
        rows = int(cu[8])

        def check(out, ref=ref, rows=rows):
            return float((out.reshape(-1, H, D)[:rows].float() - ref).abs().max())

        runs = []
        if shape.startswith("dense"):
            b = len(lengths)
            qd, kd, vd = (x.view(b, -1, H, D).transpose(1, 2) for x in (q, k, v))  # [B, H, S, D]

            def sdpa(qd=qd, kd=kd, vd=vd):
                return F.scaled_dot_product_attention(qd, kd, vd).transpose(1, 2)

            runs.append(_row("torch_sdpa (today's dense path)", sdpa, check, lengths))
            if flash_attn_func is not None:
                qb, kb, vb = (x.view(b, -1, H, D) for x in (q, k, v))
                fa4 = lambda qb=qb, kb=kb, vb=vb: flash_attn_func(qb, kb, vb)[0]  # noqa: E731
                runs.append(_row("fa4_dense", fa4, check, lengths))

        def fa2(q=q, k=k, v=v, cu_d=cu_d, longest=longest):
            return torch.ops.aten._flash_attention_forward(
                q, k, v, cu_d, cu_d, longest, longest, 0.0, False, False
            )[0]

        runs.append(_row("torch_flash_varlen (today's packed path)", fa2, check, lengths))
        if flash_attn_varlen_func is not None:

            def fa4v(q=q, k=k, v=v, cu_d=cu_d, longest=longest):
                return flash_attn_varlen_func(
                    q, k, v, cu_seqlens_q=cu_d, cu_seqlens_k=cu_d,
                    max_seqlen_q=longest, max_seqlen_k=longest,
                )[0]  # fmt: skip

            runs.append(_row("fa4_varlen", fa4v, check, lengths))
        result["shapes"][shape] = {"users": len(lengths), "tokens": n, "kernels": runs}
        Path(args.out).write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
