"""Fused kernels on the GPU timed against the ops they replace (their results are tested in
test_gpu.py).

    python3 benchmarks/gpu/kernels_smoke.py --out $OUT/kernels.json

Kernels (algorithm/serving/gpu_kernels.py) at the sizes of the base preset at 64 x 1024:
add+LayerNorm over 65536 x 512 bf16 rows (num_warps swept), the embedding sum + LayerNorm, the
decoder's cache attention over 3200 beams, logsumexp over 3200 x 16384 fp32 logits; then the
engine at 64 x 1024 (random weights: timing only) fused vs unfused, with the kernel count of one
eager call each. Byte counts: each input read once, each output written once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_gpu import NAMES, kernel_rows, time_fn  # noqa: E402

from algorithm.serving.runtime.gpu import kernels as fk  # noqa: E402
from algorithm.serving.runtime.gpu.engine import EngineConfig, GpuEngine  # noqa: E402
from algorithm.ugt import UGTConfig, UGTModel, random_inputs  # noqa: E402


def bench(fn, iters=50) -> float:
    """Median ms over CUDA-event-timed calls (rotating inputs are the caller's job)."""
    return time_fn(fn, torch.device("cuda"), iters=iters, warmup=5)["median_ms"]


def kernels(out: dict) -> None:
    dev, bf = "cuda", torch.bfloat16
    n, d = 65536, 512
    norm = torch.nn.LayerNorm(d).to(dev, bf)
    sets = [
        (torch.randn(n, d, device=dev, dtype=bf), torch.randn(n, d, device=dev, dtype=bf))
        for _ in range(2)
    ]
    i = [0]

    def pick():
        i[0] += 1
        return sets[i[0] % 2]

    gb = n * d * 2 / 1e9

    def torch_add_ln():
        x, r = pick()
        y = x + r
        return F.layer_norm(y, (d,), norm.weight, norm.bias, norm.eps)

    rows = {"torch_add_then_layernorm": {"ms": bench(torch_add_ln), "gb_min": 5 * gb}}
    for per in (1, 2, 4, 8, 16):
        for w in (1, 2, 4, 8):
            rows[f"fused_add_ln_rows{per}_warps{w}"] = {
                "ms": bench(
                    lambda per=per, w=w: fk.add_layernorm(
                        *pick(), norm, rows_per_program=per, num_warps=w
                    )
                ),
                "gb_min": 4 * gb,
            }
    x, _ = pick()
    rows["torch_layernorm_only"] = {
        "ms": bench(lambda: F.layer_norm(x, (d,), norm.weight, norm.bias, norm.eps)),
        "gb_min": 2 * gb,
    }
    tables = [torch.randn(c, d, device=dev, dtype=bf) for c in (1024, 4096, 16384, 1024)]
    ids = torch.stack([torch.randint(0, c, (n,), device=dev) for c in (1024, 4096, 16384)])
    pos = torch.arange(n, device=dev) % 1024
    rows["torch_embed_sum_ln"] = {
        "ms": bench(
            lambda: F.layer_norm(
                tables[0][ids[0]] + tables[1][ids[1]] + tables[2][ids[2]] + tables[3][pos],
                (d,),
                norm.weight,
                norm.bias,
            )
        ),
        "gb_min": 6 * gb,
    }
    rows["fused_embed_ln"] = {
        "ms": bench(lambda: fk.embed_layernorm(ids, pos, tables, norm)),
        "gb_min": 6 * gb,
    }
    users, beams, heads = 64, 50, 8
    q1 = torch.randn(users, 3 * d, device=dev, dtype=bf)
    q2, q3 = (torch.randn(users * beams, 3 * d, device=dev, dtype=bf) for _ in range(2))
    par = torch.arange(users, device=dev).repeat_interleave(beams) * beams
    par = par + torch.randint(0, beams, (users * beams,), device=dev)
    rows["fused_step_attention_t3"] = {
        "ms": bench(lambda: fk.step_attention(q3, [q1, q2], par, beams, heads))
    }
    rows["torch_step_attention_t3"] = {
        "ms": bench(lambda: fk._step_attention_torch(q3, [q1, q2], par, beams, heads))
    }
    logits = torch.randn(users * beams, 16384, device=dev)
    rows["torch_logsumexp_3200x16384"] = {
        "ms": bench(lambda: torch.logsumexp(logits, -1, keepdim=True)),
        "gb_min": logits.numel() * 4 / 1e9,
    }
    for g in (0, 16, 32, 64):
        rows[f"fused_logsumexp_group{g}_3200x16384"] = {
            "ms": bench(lambda g=g: fk.logsumexp_groupmax(logits, g)),
            "gb_min": logits.numel() * 4 / 1e9,
        }
    for c in (16384, 4096):
        x = logits[:, :c].contiguous()
        rows[f"torch_topk50_3200x{c}"] = {"ms": bench(lambda x=x: x.topk(50, dim=-1))}
        for g in (16, 32, 64):
            gmax = fk.logsumexp_groupmax(x, g)[1]
            rows[f"grouped_topk50_g{g}_3200x{c}"] = {
                "ms": bench(lambda x=x, gm=gmax: GpuEngine._topk(x, 50, gm))
            }
    for r in rows.values():
        if "gb_min" in r:
            r["tb_per_s"] = r["gb_min"] / r["ms"]  # GB / ms = TB/s
    out["kernels"] = rows
    for k, r in rows.items():
        print(
            f"{k:<34} {r['ms']:8.3f} ms"
            + (f"  {r['tb_per_s']:.2f} TB/s" if "tb_per_s" in r else "")
        )


def kernel_count(engine, args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    engine(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        engine(*args)
        torch.cuda.synchronize()
    rows = kernel_rows(p)
    return {"kernels": sum(c for _, c, _ in rows), "kernel_ms": sum(t for t, _, _ in rows) / 1e3}


def engines(out: dict) -> None:
    torch.manual_seed(0)
    model = UGTModel(UGTConfig.base()).cuda().eval()
    rng = np.random.default_rng(0)
    inp = random_inputs(64, 1024, model.config.codebook_sizes, rng)
    args = [torch.from_numpy(inp[k]).cuda() for k in NAMES]
    variants = {
        "run2_engine_unfused_tanh": {"fused_ops": False, "gelu": "tanh_fused"},
        "fused_tanh": {"gelu": "tanh_fused"},
        "fused_tanh_group16": {"gelu": "tanh_fused", "topk_group": 16},
        "fused_tanh_group32": {"gelu": "tanh_fused", "topk_group": 32},
        "fused_tanh_group64": {"gelu": "tanh_fused", "topk_group": 64},
        "fused_exact": {},
    }
    rows = {}
    for name, opts in variants.items():
        t = time.monotonic()
        engine = GpuEngine(model, EngineConfig(dtype="bf16", **opts), "cuda")
        engine(*args)
        row = {"first_call_s": round(time.monotonic() - t, 2)}  # Triton JIT + graph capture
        row["ms"] = bench(lambda e=engine: e(*args), iters=20)
        eager = GpuEngine(model, EngineConfig(dtype="bf16", cuda_graphs=False, **opts), "cuda")
        row.update(kernel_count(eager, args))
        rows[name] = row
        print(name, row, flush=True)
    out["engines_64x1024_random_weights"] = rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernels.json")
    a = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    kernels(out)
    Path(a.out).write_text(json.dumps(out, indent=1))
    engines(out)
    Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
