"""The model alone on one GPU, engine variants side by side (issue 14's model goals).

    GPU_SCRIPT=benchmarks/gpu/model_alone.py benchmarks/gpu/run_gpu.sh --out $OUT/model.json

One JSON: the environment; the ``base`` preset briefly trained on the GPU (so its rankings mean
something) and its fp32 reference (strict fp32 matmuls) on 128 in-distribution histories and on
64 x 1024 random ids; then for each engine variant (``--variants``, JSON {name: EngineConfig
options}; the first is the baseline) the recall@50 overlap against that reference, and its time
at 64 x 1024, the log-normal mix of 64, 1 x 128 and 1 x 1024: ``call`` is ``engine(l1, l2, l3,
mask)`` on device tensors (the model-alone number: layout, one sync for the lengths, graph
replay, outputs), ``replay`` the graph replay of a prepared layout. The variants' timings are
interleaved (``--rounds`` rounds, each variant once per round) so that a drifting clock or a
noisy neighbour hits them alike; a variant's number is its median over rounds. Then the CUDA
kernels of one eager call per variant (profile, top kernels) and, at 65536 rows, the pieces
``residual_gemm`` changes: the two residual GEMMs and the norm after each, plain against fused
into the GEMM. ``--fp8`` adds the encoder's four GEMM shapes in bf16 against fp8 (e4m3, row-wise
scales, ``torch._scaled_mm``) with their inputs already quantized: what fp8 could save if the
quantization were fused into the op that writes each input (not done here).
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_gpu import (  # noqa: E402
    NAMES,
    catalog_histories,
    engine_outputs,
    environment,
    kernel_rows,
    log,
    lognormal_lengths,
    mix_inputs,
    parity,
    reference_outputs,
    time_fn,
    trained_model,
)

from algorithm.serving.runtime.gpu import kernels as fk  # noqa: E402
from algorithm.serving.runtime.gpu.engine import EngineConfig, GpuEngine  # noqa: E402
from algorithm.serving.runtime.gpu.graphs import GraphCache  # noqa: E402
from algorithm.ugt import random_inputs  # noqa: E402

PICKED = {"dtype": "bf16", "gelu": "tanh_fused"}  # issue 7 run 10's pick, what the server runs
VARIANTS = {
    "picked": PICKED,
    "picked_residual_gemm": {**PICKED, "residual_gemm": True},
}


def shapes(cfg, rng, n: int = 1024) -> dict:
    """name -> inputs (numpy) of each timed shape (the names say the GPU sizes; ``n`` shrinks
    the histories for a CPU smoke run)."""
    return {
        "full_64x1024": random_inputs(64, n, cfg.codebook_sizes, rng),
        "mix_64": mix_inputs(cfg.codebook_sizes, lognormal_lengths(rng, 64, longest=n), rng),
        "1x128": random_inputs(1, n // 8, cfg.codebook_sizes, rng),
        "1x1024": random_inputs(1, n, cfg.codebook_sizes, rng),
    }


def one_by_one(engine, inp: dict, device) -> dict:
    """The engine's outputs for each user of ``inp`` called alone, on device tensors."""
    outs = [
        engine(*(torch.from_numpy(inp[k][i : i + 1]).to(device) for k in NAMES))
        for i in range(len(inp[NAMES[0]]))
    ]
    recs = torch.cat([r for r, _ in outs]).cpu().numpy()
    return {
        "recommendations": recs,
        "scores": torch.cat([s for _, s in outs]).float().cpu().numpy(),
    }


def timed(engines: dict, inputs: dict, device, rounds: int, iters: int) -> dict:
    """{variant: {shape: {"call": ms, "replay": ms, "rounds": [...]}}}, interleaved rounds."""
    args = {s: [torch.from_numpy(v[k]).to(device) for k in NAMES] for s, v in inputs.items()}
    prepared = {
        (n, s): e.tokens_from_arrays(*a) for n, e in engines.items() for s, a in args.items()
    }
    samples: dict = {n: {s: {"call": [], "replay": []} for s in args} for n in engines}
    for r in range(rounds):
        for name, engine in engines.items():
            for s, a in args.items():
                t, u = prepared[(name, s)]
                call = time_fn(lambda e=engine, a=a: e(*a), device, iters=iters, warmup=2)
                rep = time_fn(lambda e=engine, t=t, u=u: e.run(t, u), device, iters=iters)
                samples[name][s]["call"].append(call["median_ms"])
                samples[name][s]["replay"].append(rep["median_ms"])
        log(
            f"round {r + 1}: "
            + "; ".join(
                f"{n} {samples[n]['full_64x1024']['call'][-1]:.2f}/"
                f"{samples[n]['full_64x1024']['replay'][-1]:.2f}"
                for n in engines
            )
        )
    return {
        n: {
            s: {
                "call_ms": float(np.median(v["call"])),
                "replay_ms": float(np.median(v["replay"])),
                "host_ms": float(np.median(v["call"]) - np.median(v["replay"])),
                "rounds": v,
            }
            for s, v in per.items()
        }
        for n, per in samples.items()
    }


def profiled(model, opts, device, inputs) -> dict:
    """Kernels of one eager call at 64 x 1024 (no graphs), by total time."""
    engine = GpuEngine(model, EngineConfig(**{**opts, "cuda_graphs": False}), device)
    a = [torch.from_numpy(inputs[k]).to(device) for k in NAMES]
    engine(*a)
    return _kernel_summary(_kernels(lambda: engine(*a), device), top=14, width=120)


def _kernel_summary(rows, top: int, width: int) -> dict:
    """Total ms and count of ``kernel_rows``' kernels, and the ``top`` slowest."""
    return {
        "kernel_ms_total": sum(t for t, _, _ in rows) / 1e3,
        "kernels": sum(c for _, c, _ in rows),
        "top": [{"ms": t / 1e3, "count": c, "name": k[:width]} for t, c, k in rows[:top]],
    }


def breakdown(model, opts, device, inputs: dict) -> dict:
    """Where one forward's time goes, per shape: the encoder (with the memory's cross-attention
    K/V) against the whole forward, each captured in a CUDA graph of its own and replayed on
    the same prepared layout; the rest is the decoder's 3 beam steps with their heads and top-k.
    With each, the kernels of one eager run (count, ms) and the whole forward's slowest ones."""
    engine = GpuEngine(model, EngineConfig(**{**opts, "cuda_graphs": False}), device)
    encoder = engine._encode_fused if engine.config.fused_ops else engine._encode

    def parts(t):
        return {
            "encoder": lambda: engine._memory_kv(encoder(t), t),
            "forward": lambda: engine._forward(t),
        }

    out = {}
    with torch.inference_mode():
        for shape, inp in inputs.items():
            a = [torch.from_numpy(inp[k]).to(device) for k in NAMES]
            t0, _ = engine.tokens_from_arrays(*a)
            _, t = engine.layouts.graph_key_and_static(t0)  # bucketed as the graphs run it
            t = engine.layouts.materialized(t)
            row = {"users": t.users, "tokens": int(t.ids.shape[1])}
            for name, fn in parts(t).items():
                row[f"{name}_replay_ms"] = _graph_ms(fn, t, device)
                summary = _kernel_summary(_kernels(fn, device), top=30, width=100)
                row[f"{name}_kernels"] = summary["kernels"]
                row[f"{name}_kernel_ms"] = summary["kernel_ms_total"]
                if name == "forward":
                    row["forward_top"] = summary["top"]
            for key in ("replay_ms", "kernels", "kernel_ms"):
                row[f"decoder_{key}"] = row[f"forward_{key}"] - row[f"encoder_{key}"]
            log(
                f"breakdown {shape}: forward {row['forward_replay_ms']:.3f} ms "
                f"({row['forward_kernels']} kernels), encoder {row['encoder_replay_ms']:.3f} "
                f"({row['encoder_kernels']}), decoder {row['decoder_replay_ms']:.3f} "
                f"({row['decoder_kernels']})"
            )
            out[shape] = row
    return out


def _graph_ms(fn, t, device) -> float:
    """Median ms of ``fn`` captured in a CUDA graph (as the engine captures its forward) and
    replayed on the layout ``t`` (timed eagerly on a CPU)."""
    if device.type != "cuda":
        return time_fn(fn, device, iters=3, warmup=1)["median_ms"]
    graphs = GraphCache(device, True, 1, True)
    graph, _, _ = graphs.capture("timed", t, lambda _: fn(), "a breakdown part")
    return time_fn(graph.replay, device, iters=30, warmup=3)["median_ms"]


def _kernels(fn, device) -> list:
    """(device us, calls, name) of the kernels of one eager run of ``fn`` (none on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return []
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize(device)
    return kernel_rows(p)


def _ms(fn, device) -> float:
    return time_fn(fn, device, iters=50, warmup=5)["median_ms"]


def pieces(device, d=512, f=2048, n=65536) -> dict:
    """The residual sub-layer's end at n rows: GEMM + add+LayerNorm, plain against fused."""
    bf = torch.bfloat16
    norm = torch.nn.LayerNorm(d).to(device, bf)
    x = torch.randn(n, d, device=device, dtype=bf)
    vec = torch.randn(d, device=device).expand(n, d)
    out = {name: _piece(device, norm, x, vec, k) for name, k in (("attn_out", d), ("ffn_out", f))}
    for name, row in out.items():
        log(f"pieces {name}: {row}")
    sweep = {}  # the norm-only form's launch shape (the engine uses kernels.ADD_LN_ROWS/WARPS)
    for per in (1, 2, 4, 8):
        for warps in (1, 2, 4, 8):
            sweep[f"rows{per}_warps{warps}"] = _ms(
                lambda per=per, warps=warps: fk.add_layernorm(
                    x, vec, norm, store_residual=False, out_dtype=bf,
                    rows_per_program=per, num_warps=warps,
                ),
                device,
            )  # fmt: skip
    out["fused_layernorm_launch_sweep_ms"] = sweep
    log(f"norm-only sweep: {sweep}")
    return out


def _piece(device, norm, x, vec, k: int) -> dict:
    n, d = x.shape
    w = torch.randn(d, k, device=device, dtype=x.dtype) / k**0.5
    b = torch.randn(d, device=device, dtype=x.dtype)
    inp = torch.randn(n, k, device=device, dtype=x.dtype)
    y = F.linear(inp, w, b)
    row = {
        "plain_gemm_ms": _ms(lambda: F.linear(inp, w, b), device),
        "plain_add_layernorm_ms": _ms(lambda: fk.add_layernorm(y, x, norm), device),
        "fused_gemm_addmm_ms": _ms(lambda: x.addmm_(inp, w.t()), device),
        "fused_layernorm_ms": _ms(
            lambda: fk.add_layernorm(x, vec, norm, store_residual=False, out_dtype=x.dtype),
            device,
        ),
    }
    row["plain_total_ms"] = row["plain_gemm_ms"] + row["plain_add_layernorm_ms"]
    row["fused_total_ms"] = row["fused_gemm_addmm_ms"] + row["fused_layernorm_ms"]
    return row


def fp8_gemms(device, n=65536, d=512, f=2048) -> dict:
    """bf16 F.linear against torch._scaled_mm (e4m3, row-wise scales, bf16 out) per shape."""
    shapes = {"qkv": (d, 3 * d), "attn_out": (d, d), "ffn_in": (d, f), "ffn_out": (f, d)}
    out = {name: _fp8_row(device, n, k, m) for name, (k, m) in shapes.items()}
    for name, row in out.items():
        log(f"fp8 {name}: {row}")
    return out


def _fp8_row(device, n: int, k: int, m: int) -> dict:
    bf, f8 = torch.bfloat16, torch.float8_e4m3fn
    a = torch.randn(n, k, device=device, dtype=bf)
    w = torch.randn(m, k, device=device, dtype=bf) / k**0.5
    bias = torch.randn(m, device=device, dtype=bf)
    row = {"bf16_ms": _ms(lambda: F.linear(a, w, bias), device)}
    try:

        def quantize(t):
            scale = t.abs().amax(1, keepdim=True).float() / 448
            return (t / scale).to(f8), scale

        a8, sa = quantize(a)
        w8, sw = quantize(w)

        def mm():
            return torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw.t(), bias=bias, out_dtype=bf)

        row["fp8_rowwise_ms"] = _ms(mm, device)
        ref = F.linear(a.float(), w.float(), bias.float())
        row["fp8_rel_err"] = float((mm().float() - ref).norm() / ref.norm())
        row["quantize_input_ms"] = _ms(lambda: quantize(a), device)
    except Exception as e:  # an fp8 path this torch/GPU lacks is recorded, not fatal
        row["error"] = f"{type(e).__name__}: {e}"[:400]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default=json.dumps(VARIANTS))
    ap.add_argument("--train-steps", type=int, default=800)
    ap.add_argument("--train-seconds", type=float, default=25.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="encoder against decoder, per shape (first and last variant)",
    )
    ap.add_argument("--no-pieces", action="store_true", help="skip the residual pieces and sweep")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of every code path")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    variants = json.loads(args.variants)
    if cpu:  # fp32 and small shapes: the code paths, no numbers
        variants = {n: {**o, "dtype": "fp32"} for n, o in variants.items()}
    env = environment(device)
    env["command"] = "GPU_SCRIPT=benchmarks/gpu/model_alone.py benchmarks/gpu/run_gpu.sh " + (
        " ".join(sys.argv[1:] if argv is None else argv)
    )
    result: dict = {"environment": env, "variants": variants}
    out = Path(args.out)

    def write():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)

    preset, n = ("tiny", 32) if cpu else ("base", 1024)
    model, training = trained_model(preset, device, args.train_steps, args.train_seconds)
    result["training"] = training
    log(f"trained: {training}")
    rng = np.random.default_rng(0)
    inputs = shapes(model.config, rng, n)
    catalog = catalog_histories(model.config, 128, rng, longest=n)
    # 32 catalog users cut to n / 8 columns, each called alone on device tensors: the
    # engine's sync-free route (kind "inputs") where B x T <= sync_free_positions
    small = {k: v[:32, : n // 8] for k, v in catalog.items()}
    refs = {
        "catalog": reference_outputs(model, catalog, device),
        "full_64x1024": reference_outputs(model, inputs["full_64x1024"], device),
        "catalog_1x128": reference_outputs(model, small, device),
    }
    engines, result["parity"] = {}, {}
    for name, opts in variants.items():
        t = time.monotonic()
        engines[name] = e = GpuEngine(model, EngineConfig(**opts), device)
        result["parity"][name] = {
            "catalog": parity(refs["catalog"], engine_outputs(e, catalog)),
            "full_64x1024": parity(refs["full_64x1024"], engine_outputs(e, inputs["full_64x1024"])),
            "catalog_1x128_device": parity(refs["catalog_1x128"], one_by_one(e, small, device)),
            "build_s": round(time.monotonic() - t, 2),
        }
        log(f"{name}: recall {result['parity'][name]}")
    write()
    from served import host_check, host_check_delta  # the host's speed over the timing

    before = host_check()
    result["timing"] = timed(engines, inputs, device, args.rounds, args.iters)
    result["host_check"] = host_check_delta(before, host_check())
    log(f"host check over the timing: {result['host_check']}")
    write()
    for name, per in result["timing"].items():
        log(
            f"{name}: "
            + ", ".join(
                f"{s} {v['call_ms']:.2f} (replay {v['replay_ms']:.2f})" for s, v in per.items()
            )
        )
    engines.clear()
    if args.breakdown:
        result["breakdown"] = {
            n: breakdown(model, variants[n], device, inputs)
            for n in dict.fromkeys([next(iter(variants)), list(variants)[-1]])
        }
        write()
    if cpu:
        log(f"wrote {out} (CPU smoke: no profile, pieces or fp8)")
        return 0
    torch.cuda.empty_cache()
    result["profile_64x1024"] = {
        n: profiled(model, o, device, inputs["full_64x1024"]) for n, o in variants.items()
    }
    for n, p in result["profile_64x1024"].items():
        log(f"profile {n}: {p['kernel_ms_total']:.2f} ms in {p['kernels']} kernels")
    write()
    if not args.no_pieces:
        result["pieces_65536_rows"] = pieces(device)
        write()
    if args.fp8:
        result["fp8_gemms_65536_rows"] = fp8_gemms(device)
        write()
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
