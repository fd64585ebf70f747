"""GpuEngine and the torch runner's GPU paths: same function as UGTModel, less work.

CPU tests run the engine's full logic (packing, bucketing, KV-cached beam steps, two-stage
top-k on raw logits, request grouping) in fp32 with the reference attention loop and compare it
with ``UGTModel.forward``; ``gpu`` tests run flash attention, bf16 and CUDA graphs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from algorithm.errors import ConfigError
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.runtime.gpu import kernels as fk
from algorithm.serving.runtime.gpu.batch import (
    FlatBatch,
    bucket_tokens,
    bucket_users,
    group_requests,
    packed_index,
    previous_token_bucket,
)
from algorithm.serving.runtime.gpu.engine import EngineConfig, GpuEngine, count_flops
from algorithm.serving.runtime.torch import TorchRunner
from algorithm.serving.verify.parity import compare_outputs
from algorithm.ugt import SyntheticCatalog, UGTConfig, UGTModel, random_inputs

SMALL = UGTConfig.tiny(codebook_sizes=(64, 128, 256), num_recommendations=10, max_seq_length=64)


@pytest.fixture(scope="module")
def model():
    """A small model with sharpened heads, so its scores are far from ties (random init is flat)."""
    torch.manual_seed(0)
    m = UGTModel(SMALL).eval()
    with torch.no_grad():
        for h in m.heads:
            h.weight.mul_(50)
    return m


def _ragged(rng, batch=6, seq=40):
    inp = random_inputs(batch, seq, SMALL.codebook_sizes, rng, ragged=True)
    inp["encoder_l2_ids"][0, 1] = 999  # outside its codebook: padding, as in the reference
    inp["encoder_l1_ids"][1, 0] = -3
    inp["attention_mask"][2, 1] = 0  # a hole inside a history
    inp["attention_mask"][3, :] = 0  # all padding: only the null memory slot
    return inp


def _reference(model, inp):
    with torch.inference_mode():
        recs, scores = model(*(torch.as_tensor(inp[k]) for k in INPUT_NAMES))
    return {"recommendations": recs.numpy(), "scores": scores.numpy()}


def _as_np(recs, scores):
    return {"recommendations": recs.cpu().numpy(), "scores": scores.float().cpu().numpy()}


def _assert_same(ref, out, max_diff=1e-4):
    report = compare_outputs(ref, out)
    assert report["exact_match_rate"] == 1.0, report
    assert report["max_score_diff"] < max_diff, report


# -- the function --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"layout": "packed", "dense_when_full": False},
        {"layout": "packed", "gelu": "tanh_fused"},
        {"layout": "padded"},
        {"layout": "packed", "head_precision": "fp32"},
        {"layout": "packed", "topk": "flat", "step_attention": "einsum", "fused_ops": False},
        {"layout": "packed", "fused_ops": False},
        {"layout": "padded", "fused_ops": False},
        {"layout": "packed", "topk_group": 2},
        {"layout": "packed", "topk_group": 4, "fused_ops": False},
        {"layout": "packed", "residual_gemm": False},
        {"layout": "padded", "residual_gemm": False, "gelu": "tanh_fused"},
        {"layout": "packed", "decoder_tables": False},
    ],
    ids=[
        "packed",
        "packed-fused-gelu",
        "padded",
        "fp32-heads",
        "flat-topk-einsum",
        "unfused",
        "unfused-padded",
        "grouped-topk",
        "grouped-topk-unfused",
        "residual-add-in-norm",
        "residual-add-in-norm-padded",
        "decoder-layer0-per-forward",
    ],
)
def test_engine_matches_reference_on_ragged_batches(model, rng, options):
    inp = _ragged(rng)
    engine = GpuEngine(model, EngineConfig(dtype="fp32", **options), device="cpu")
    _assert_same(_reference(model, inp), _as_np(*engine(*(inp[k] for k in INPUT_NAMES))))


@pytest.mark.parametrize(
    "options",
    [{}, {"fused_ops": False}, {"residual_gemm": False}],
    ids=["fused", "unfused", "residual-add-in-norm"],
)
def test_full_batches_take_the_dense_path_and_match(model, rng, options):
    inp = random_inputs(3, 24, SMALL.codebook_sizes, rng)
    engine = GpuEngine(model, EngineConfig(dtype="fp32", **options), device="cpu")
    tokens, users = engine.tokens_from_arrays(*(inp[k] for k in INPUT_NAMES))
    assert (tokens.kind, users, tokens.ids.shape) == ("dense", 3, (3, 72))
    _assert_same(_reference(model, inp), _as_np(*engine.run(tokens, users)))


def test_engine_does_not_modify_the_callers_model(model):
    before = model.heads[0].weight.clone()
    GpuEngine(model, EngineConfig(dtype="bf16"), device="cpu")
    assert model.heads[0].weight.dtype == torch.float32 and torch.equal(
        model.heads[0].weight, before
    )


def test_packed_layout_keeps_only_valid_tokens_at_their_positions(model, rng):
    inp = _ragged(rng, batch=4, seq=12)
    engine = GpuEngine(model, EngineConfig(dtype="fp32", dense_when_full=False), device="cpu")
    tokens, _ = engine.tokens_from_arrays(*(inp[k] for k in INPUT_NAMES))
    valid = inp["attention_mask"] > 0
    for ids, size in zip(
        ("encoder_l1_ids", "encoder_l2_ids", "encoder_l3_ids"), SMALL.codebook_sizes, strict=True
    ):
        valid &= (inp[ids] >= 0) & (inp[ids] < size)
    rows, cols = np.nonzero(valid)
    assert tokens.kind == "packed" and tokens.lengths == tuple(valid.sum(1))
    assert tokens.pos.tolist() == cols.tolist()
    assert tokens.ids[0].tolist() == inp["encoder_l1_ids"][rows, cols].tolist()
    cu = tokens.cu.tolist()
    assert cu == [0, *np.cumsum(valid.sum(1)).tolist()]
    # memory rows: each user's null slot, then its tokens
    assert tokens.null_idx.tolist() == [c + i for i, c in enumerate(cu[:-1])]
    assert sorted(tokens.null_idx.tolist() + tokens.tok_to_mem.tolist()) == list(
        range(len(rows) + 4)
    )


@pytest.mark.parametrize("full", [False, True], ids=["packed", "dense"])
def test_host_layout_equals_the_device_route_bucketed(model, rng, full):
    """tokens_from_batch builds on the host, already bucketed, what the device route builds and
    then pads to its CUDA-graph bucket; the bucketed forward (dummy users too) stays exact."""
    inp = _ragged(rng, batch=5, seq=20)
    widths = [20] * 5 if full else [8 + 3 * i for i in range(5)]
    if full:
        inp = random_inputs(5, 20, SMALL.codebook_sizes, rng)
    engine = GpuEngine(model, EngineConfig(dtype="fp32"), device="cpu")
    engine.graphs.enabled = True  # bucketing on; nothing is captured on a CPU
    reqs = [{k: v[i : i + 1, : widths[i]] for k, v in inp.items()} for i in range(5)]
    batch = FlatBatch.from_requests(reqs)
    host = engine.layouts.materialized(engine.tokens_from_batch(batch))
    padded = dict(zip(INPUT_NAMES, batch.padded(), strict=True))
    key, dev = engine.layouts.graph_key_and_static(engine.tokens_from_arrays(*padded.values())[0])
    assert host.key == key and host.kind == ("dense" if full else "packed")
    assert host.max_len == dev.max_len and host.users == dev.users
    for a, b in zip(host.tensors(), dev.tensors(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if not full:
        assert host.lengths == tuple(dev.lengths)
    recs, scores = engine._forward(host)
    _assert_same(_reference(model, padded), _as_np(recs[:5], scores[:5]))


def test_flat_batch_pads_and_splits_requests(rng):
    reqs = [random_inputs(b, n, SMALL.codebook_sizes, rng) for b, n in ((1, 4), (2, 7), (1, 1))]
    batch = FlatBatch.from_requests(reqs)
    assert batch.rows.tolist() == [1, 2, 1] and batch.seq.tolist() == [4, 7, 1]
    assert batch.users == 4 and batch.values.shape == (4, 4 + 14 + 1)
    padded = batch.padded()
    assert padded[0].shape == (4, 7)
    np.testing.assert_array_equal(padded[3][0], [1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(padded[1][1:3], reqs[1]["encoder_l2_ids"])
    sub = batch.subset([2, 0])
    assert sub.rows.tolist() == [1, 1] and sub.values.shape == (4, 5)
    np.testing.assert_array_equal(sub.values[0, 1:], reqs[0]["encoder_l1_ids"][0])
    with pytest.raises(ValueError, match="one shape"):
        FlatBatch.from_requests([{**reqs[0], "attention_mask": reqs[1]["attention_mask"]}])


def test_requests_over_the_engine_limits_split_and_keep_their_order(model, rng):
    inp = _ragged(rng, batch=6, seq=30)
    reqs = [{k: v[i : i + 1, : 4 + 5 * i] for k, v in inp.items()} for i in range(6)]
    for batching in ("length_aware", "pad"):
        cfg = EngineConfig(dtype="fp32", max_users=2, max_tokens=40)
        runner = TorchRunner(model, engine=cfg, batching=batching)
        for req, out in zip(reqs, runner.infer_requests(reqs), strict=True):
            _assert_same(_reference(model, req), out)


def test_requests_of_mixed_lengths_match_one_by_one(model, rng):
    inp = _ragged(rng, batch=6, seq=30)
    reqs = [{k: v[i : i + 1, : 4 + 5 * i] for k, v in inp.items()} for i in range(6)]
    reqs.append({k: v[1:4, :9] for k, v in inp.items()})  # a request of 3 users
    for batching in ("length_aware", "pad"):
        runner = TorchRunner(model, engine=EngineConfig(dtype="fp32"), batching=batching)
        outs = runner.infer_requests(reqs)
        assert [o["recommendations"].shape[0] for o in outs] == [1] * 6 + [3]
        for req, out in zip(reqs, outs, strict=True):
            _assert_same(_reference(model, req), out)


def test_eager_runner_keeps_its_contract(model, rng):
    inp = _ragged(rng)
    runner = TorchRunner(UGTModel(SMALL).eval())
    assert runner.engine is None
    out = runner.infer(inp)
    assert out["recommendations"].dtype == np.int64 and out["scores"].dtype == np.float32
    assert out["recommendations"].shape == (6, SMALL.num_recommendations, 3)
    reqs = [{k: v[i : i + 1, : 3 + i] for k, v in inp.items()} for i in range(3)]
    assert [o["scores"].shape for o in runner.infer_requests(reqs)] == [(1, 10)] * 3


def test_infer_torch_returns_tensors_on_the_runner_device(model, rng):
    inp = random_inputs(2, 16, SMALL.codebook_sizes, rng)
    runner = TorchRunner(model, engine=EngineConfig(dtype="fp32"))
    out = runner.infer_torch({k: torch.from_numpy(v) for k, v in inp.items()})
    assert isinstance(out["scores"], torch.Tensor) and out["scores"].dtype == torch.float32
    assert out["recommendations"].device == runner.device


def test_warmup_serves_dense_and_mixed_requests_then_freezes(model):
    spec = [[2, 8], {"lognormal": [6, 0.5, 20], "coverage": 0.9, "max_users": 3}]
    runner = TorchRunner(
        model, engine=EngineConfig(dtype="fp32", capture_new_shapes=False), warmup=spec
    )
    assert (
        runner.engine.graph_count == 0 and runner.engine.graphs.frozen
    )  # no CUDA here: eager, every path ran


def test_bf16_engine_keeps_recall_of_a_trained_model(trained):
    """bf16 weights + fp32 scoring vs the fp32 reference on in-distribution histories (CPU)."""
    model, _, _ = trained
    batch = SyntheticCatalog(codebook_sizes=tuple(model.config.codebook_sizes), seed=0).batch(
        48, 4, 48, np.random.default_rng(5)
    )
    engine = GpuEngine(model, EngineConfig(dtype="bf16", head_precision="fp32"), device="cpu")
    report = compare_outputs(
        _reference(model, batch), _as_np(*engine(*(batch[k] for k in INPUT_NAMES)))
    )
    assert report["recall_overlap"] >= 0.95, report
    assert report["finite_scores"]


# -- buckets, grouping, FLOPs --------------------------------------------------------------------
def test_token_buckets_waste_at_most_an_eighth_and_are_monotone():
    prev = 0
    for n in range(1, 70000, 37):
        b = bucket_tokens(n)
        assert b >= n and b >= prev and (n <= 64 or b <= n * 1.125 + 1)
        assert previous_token_bucket(b) < n or b == 64
        prev = b
    assert bucket_tokens(65536) == 65536 and bucket_tokens(65537) == 73728
    assert previous_token_bucket(73728) == 65536
    assert [bucket_users(n) for n in (1, 3, 9, 33, 64, 65)] == [1, 4, 16, 40, 64, 96]


def test_group_requests_respects_limits_and_keeps_every_request():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 200).tolist()
    for padded in (False, True):
        groups = group_requests(lengths, max_users=16, max_tokens=2048, padded=padded)
        assert sorted(i for g in groups for i in g) == list(range(200))
        for g in groups:
            cost = len(g) * max(lengths[i] for i in g) if padded else sum(lengths[i] for i in g)
            assert len(g) <= 16 and (cost <= 2048 or len(g) == 1)
    # the pad-to-longest baseline keeps arrival order
    assert group_requests([5, 1, 3], 2, 100, padded=True, sort=False) == [[0, 1], [2]]


def test_grouped_topk_finds_the_plain_topk():
    logits = torch.randn(5, 3, 256, generator=torch.Generator().manual_seed(0))
    gmax = logits.view(5, 3, 32, 8).amax(-1)
    v, i = GpuEngine._topk(logits, 10, gmax)
    want_v, want_i = logits.topk(10, dim=-1)
    assert torch.equal(v, want_v) and torch.equal(i, want_i)


def _beam_search_step(device, users=4, beams=12, codes=512, group=8, seed=0):
    """One beam step through the grouped top-k's three functions, and what it must equal: the
    best ``beams`` of every (beam, code) by score + log-softmax, over all codes."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(users, beams, codes, generator=g) * 3).to(device)
    scores = torch.randn(users, beams, generator=g).to(device)
    hist = torch.randint(0, 99, (users, beams, 2), generator=g).to(device)
    rows = logits.view(users * beams, codes)
    lse, gmax = fk.logsumexp_groupmax(rows, group)
    vals, cols = fk.topk_in_groups(rows, fk.topk_groups(gmax, beams), group, lse, scores)
    got = fk.beam_select(vals.view(users, -1), cols.view(users, -1), hist, beams)
    full = (scores.unsqueeze(-1) + logits.log_softmax(-1)).view(users, -1)
    want, flat = full.topk(beams, dim=-1)
    return got, (want, flat // codes, flat % codes, hist)


def _check_beam_step(got, want):
    (scores, out, parent, new), (want_scores, beam, code, hist) = got, want
    users, beams = want_scores.shape
    assert torch.allclose(scores, want_scores, atol=1e-5)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # best first
    for s in range(users):  # the same (beam, code) pairs; order only among equal scores
        pairs = {(int(b), int(c)) for b, c in zip(beam[s], code[s], strict=True)}
        got_beam = parent.view(users, beams)[s] - s * beams
        assert {(int(b), int(c)) for b, c in zip(got_beam, new[s], strict=True)} == pairs
        assert torch.equal(out[s, :, :2], hist[s][got_beam]) and torch.equal(out[s, :, 2], new[s])


def test_grouped_beam_step_finds_the_best_beams():
    """The torch forms of the fused beam kernels (CPU, and the GPU's fallback)."""
    for seed in range(3):
        _check_beam_step(*_beam_search_step("cpu", seed=seed))


def test_input_validity_reads_what_the_reference_reads(rng):
    from algorithm.serving.runtime.gpu.batch import valid_tokens

    inp = _ragged(rng)
    args = [torch.from_numpy(inp[k]) for k in INPUT_NAMES]
    ids, valid, lengths = fk.input_validity(*args, SMALL.codebook_sizes)
    want = valid_tokens(*(inp[k] for k in INPUT_NAMES), SMALL.codebook_sizes)
    assert torch.equal(valid, torch.from_numpy(want)) and lengths.tolist() == want.sum(1).tolist()
    assert torch.equal(ids, torch.stack(args[:3]))


def test_inputs_packed_on_the_device_give_the_host_layout(rng):
    """pack_inputs (the sync-free route) packs what tokens_from_arrays' packed route packs,
    with the offsets packed_index gives; the padding positions follow, outside every slot."""
    for batch, seq in ((6, 40), (1, 1), (3, 5)):
        inp = (
            _ragged(rng, batch, seq)
            if batch > 3
            else random_inputs(batch, seq, SMALL.codebook_sizes, rng, ragged=True)
        )
        raw = torch.stack([torch.from_numpy(inp[k]) for k in INPUT_NAMES])
        ids, pos, *offsets = fk.pack_inputs(raw, SMALL.codebook_sizes)
        _, valid, lengths = fk.input_validity(*raw, SMALL.codebook_sizes)
        rows, cols = valid.nonzero(as_tuple=True)
        n = len(rows)
        assert torch.equal(ids[:, :n], raw[:3, rows, cols]) and torch.equal(pos[:n], cols)
        assert (ids[:, n:] == 0).all() and ids.shape == (3, batch * seq)
        want = packed_index(lengths.tolist())
        cu, cu_mem, null_idx, tok_to_mem = offsets
        assert cu.tolist() == want["cu"].tolist() and cu_mem.tolist() == want["cu_mem"].tolist()
        assert null_idx.tolist() == want["null_idx"].tolist()
        assert tok_to_mem[:n].tolist() == want["tok_to_mem"].tolist()
        # padding rows: after the last slot's memory, each its own
        assert tok_to_mem[n:].tolist() == list(range(n + batch, batch * seq + batch))


@pytest.mark.parametrize("options", [{}, {"fused_ops": False}], ids=["fused", "unfused"])
def test_small_device_inputs_skip_the_host_round_trip_and_match(model, rng, options):
    """Inputs on the engine's device of at most sync_free_positions positions are packed by the
    forward itself (kind "inputs", keyed by (B, T)); larger ones keep the synced packed route."""
    engine = GpuEngine(model, EngineConfig(dtype="fp32", **options), device="cpu")
    assert engine.layouts.sync_free == 0  # graphs off (a CPU): nothing to gain
    engine.layouts.sync_free = 240
    inp = _ragged(rng)  # 6 x 40: an empty history, holes, ids outside their codebooks
    args = [torch.from_numpy(inp[k]) for k in INPUT_NAMES]
    tokens, users = engine.tokens_from_arrays(*args)
    assert (tokens.kind, tokens.key, users) == ("inputs", ("inputs", 6, 40), 6)
    _assert_same(_reference(model, inp), _as_np(*engine.run(tokens, users)))
    big = _ragged(rng, batch=7)
    assert engine.tokens_from_arrays(*(big[k] for k in INPUT_NAMES))[0].kind == "packed"


def test_packed_index_offsets():
    idx = packed_index([2, 0, 3], extra=[1])
    assert idx["cu"].tolist() == [0, 2, 2, 5, 6]
    assert idx["cu_mem"].tolist() == [0, 3, 4, 8, 10]
    assert idx["null_idx"].tolist() == [0, 3, 4, 8]
    assert idx["tok_to_mem"].tolist() == [1, 2, 5, 6, 7, 9]


def test_flop_count_matches_torch_flop_counter(model, rng):
    """The analytic count equals what torch's FlopCounterMode sees for every linear layer."""
    from torch.utils.flop_counter import FlopCounterMode

    inp = random_inputs(3, 16, SMALL.codebook_sizes, rng)
    args = [torch.from_numpy(inp[k]) for k in INPUT_NAMES]
    linear = ("encoder_linear", "memory_kv", "decoder_linear", "heads")
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model(*args)
    ref = count_flops(SMALL, [16] * 3)
    assert fc.get_flop_counts()["Global"][torch.ops.aten.addmm] == sum(ref[k] for k in linear)
    engine = GpuEngine(model, EngineConfig(dtype="fp32"), device="cpu")

    def addmm_(c, a, b, *rest, out_shape=None, **kw):  # residual_gemm's in-place x += a @ b
        return 2 * a[0] * a[1] * b[1]

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_}) as fc:
        engine(*args)
    cached = count_flops(SMALL, [16] * 3, kv_cache=True)
    counts = fc.get_flop_counts()["Global"]
    assert counts[torch.ops.aten.addmm] + counts[torch.ops.aten.addmm_] == sum(
        cached[k] for k in linear
    )
    base = count_flops(UGTConfig.base(), [1024] * 64)
    assert 5.0e12 < base["total"] < 5.6e12  # the "about 5 TFLOP"


def test_engine_config_names_bad_fields():
    with pytest.raises(ConfigError, match="layout"):
        EngineConfig(layout="ragged")
    with pytest.raises(ConfigError, match="topk_group"):
        EngineConfig(topk_group=24)
    with pytest.raises(ConfigError, match="varlen_kernel"):
        GpuEngine(UGTModel(SMALL), EngineConfig(dtype="fp32", varlen_kernel="flash"), device="cpu")
    with pytest.raises(ConfigError, match="varlen_kernel"):
        GpuEngine(UGTModel(SMALL), EngineConfig(dtype="fp32", varlen_kernel="fa4"), device="cpu")
    with pytest.raises(ConfigError, match="sync_free_positions"):
        EngineConfig(sync_free_positions=fk.PACK_MAX_POSITIONS + 1)
    with pytest.raises(ConfigError, match="batching"):
        TorchRunner(UGTModel(SMALL), batching="sorted")


# -- on a GPU ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_gpu_engine_matches_reference(model, rng, graphs):
    engine = GpuEngine(model, EngineConfig(dtype="bf16", cuda_graphs=graphs), device="cuda")
    for inp in (_ragged(rng), random_inputs(4, 32, SMALL.codebook_sizes, rng)):
        out = _as_np(*engine(*(inp[k] for k in INPUT_NAMES)))
        report = compare_outputs(_reference(model, inp), out)
        assert report["recall_overlap"] >= 0.9 and report["finite_scores"], report
    assert engine.graph_count == (2 if graphs else 0)


@pytest.mark.gpu
def test_gpu_graph_replay_equals_eager(model, rng):
    eager = GpuEngine(model, EngineConfig(dtype="bf16", cuda_graphs=False), device="cuda")
    graphed = GpuEngine(model, EngineConfig(dtype="bf16"), device="cuda")
    for _ in range(3):  # the same bucket replayed with new data
        inp = _ragged(rng, batch=5, seq=int(rng.integers(20, 60)))
        a = eager(*(inp[k] for k in INPUT_NAMES))
        b = graphed(*(inp[k] for k in INPUT_NAMES))
        assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-3)


@pytest.mark.gpu
def test_gpu_frozen_engine_runs_new_shapes_eagerly(model, rng):
    engine = GpuEngine(model, EngineConfig(dtype="bf16", capture_new_shapes=False), device="cuda")
    engine.warmup([(2, 16)])
    engine.freeze_graphs()
    inp = _ragged(rng)
    engine(*(inp[k] for k in INPUT_NAMES))
    assert (engine.graph_count, engine.eager_runs) == (1, 1)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_engine_on_a_second_device_captures_there(model, rng):
    """Triton puts instances on cuda:1 while the process's current device stays cuda:0."""
    engine = GpuEngine(model, EngineConfig(dtype="bf16"), device="cuda:1")
    inp = _ragged(rng)
    recs, scores = engine(*(inp[k] for k in INPUT_NAMES))
    assert recs.device == torch.device("cuda:1") and engine.graph_count == 1
    assert compare_outputs(_reference(model, inp), _as_np(recs, scores))["recall_overlap"] >= 0.9


@pytest.mark.gpu
def test_gpu_runner_requests_and_device_outputs(model, rng):
    runner = TorchRunner(model, device="cuda", dtype="bf16")
    inp = _ragged(rng)
    reqs = [{k: v[i : i + 1] for k, v in inp.items()} for i in range(6)]
    outs = runner.infer_requests(reqs, output="torch")
    assert all(o["scores"].is_cuda for o in outs)
    ref = _reference(model, inp)
    got = {
        k: np.concatenate([o[k].cpu().numpy() for o in outs]) for k in ("recommendations", "scores")
    }
    assert compare_outputs(ref, got)["recall_overlap"] >= 0.9


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("graphs", "blocking"),
    [(False, False), (True, False), (True, True)],
    ids=["eager", "cuda-graphs", "cuda-graphs-blocking-sync"],
)
def test_gpu_batches_queued_back_to_back_each_get_their_own_answers(model, rng, graphs, blocking):
    """infer_batch_async (the pipelined model.py): several batches of one shape queued before
    any is read back replay the same CUDA graph, whose inputs and outputs are static; each
    batch's copies in and out are ordered around its replay, so each gets its own answers,
    equal to the blocking path's; a batch over the engine's limits (several forwards) too."""
    engine = EngineConfig(dtype="bf16", cuda_graphs=graphs, max_users=4, blocking_sync=blocking)
    runner = TorchRunner(model, device="cuda", dtype="bf16", engine=engine)
    laps = runner.profile_launches()  # as model.py's phase_stats do
    batches = []
    for n in (3, 3, 3, 6):  # three of one graph, then one split into two forwards
        inp = random_inputs(n, 48, SMALL.codebook_sizes, rng)
        batches.append(
            FlatBatch.from_requests([{k: v[i : i + 1] for k, v in inp.items()} for i in range(n)])
        )
    expected = [runner.infer_batch(b) for b in batches]
    pending = [runner.infer_batch_async(b) for b in batches]
    assert pending[-1].recs.is_pinned()
    for (recs, scores), p in zip(expected, pending, strict=True):
        got_recs, got_scores = p.result()
        np.testing.assert_array_equal(recs, got_recs)
        np.testing.assert_allclose(scores, got_scores, atol=1e-3)
    assert all(p.done() for p in pending)
    assert laps["layout"] > 0 and laps["run"] > 0 and laps["event"] > 0


@pytest.mark.gpu
def test_gpu_continuous_batching_answers_each_request_with_its_own_rows(model, rng):
    """model.py with continuous batching over the CUDA-graph engine: requests from several
    threads at once are merged into batches on the launcher thread, and each request gets the
    fp32 reference's answer for its own rows."""
    import threading

    from algorithm.serving.triton.python_model.standin import (
        Request,
        answered,
        model_py_module,
        served_model,
    )

    engine = EngineConfig(dtype="bf16", max_users=8)
    runner = TorchRunner(model, device="cuda", dtype="bf16", engine=engine)
    requests = [
        random_inputs(int(rng.integers(1, 3)), int(rng.integers(1, 65)), SMALL.codebook_sizes, rng)
        for _ in range(48)
    ]
    expected = [_reference(model, r) for r in requests]
    with model_py_module("ugt_model_py_gpu_continuous") as model_py:
        served = served_model(
            model_py,
            runner,
            SMALL.max_seq_length,
            SMALL.codebook_sizes,
            True,
            pipeline_depth=1,
            continuous_batching=True,
            max_batch_size=8,
        )
        sent = [[Request(r)] for r in requests]
        threads = [
            threading.Thread(
                target=lambda part: [served.execute(b) for b in part], args=(sent[i::4],)
            )
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        got = [answered(b, None)[0] for b in sent]
        served.finalize()
    # bf16 answers depend a little on the batch they ran in: each is held to its own
    # request's fp32 reference (another request's answer would not pass)
    for i, (ref, resp) in enumerate(zip(expected, got, strict=True)):
        assert resp.error is None, resp.error and resp.error.message
        assert resp.outputs["recommendations"].shape == ref["recommendations"].shape, i
        assert compare_outputs(ref, resp.outputs)["recall_overlap"] >= 0.9, i


@pytest.mark.gpu
@pytest.mark.skipif(not fk.TRITON, reason="needs triton (the fused kernels' GPU implementation)")
def test_gpu_fused_kernels_compute_the_torch_functions():
    """Each Triton kernel against the same function in fp32 torch ops, on fresh random inputs."""
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    dev, bf = "cuda", torch.bfloat16
    n, d, heads, users, beams = 300, 512, 8, 6, 50
    norm = torch.nn.LayerNorm(d).to(dev, bf)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()

    def ln(x):
        return F.layer_norm(x.float(), (d,), norm.weight.float(), norm.bias.float(), norm.eps)

    def close(got, want, tol=1e-2):
        assert torch.isfinite(got).all()
        assert float((got.float() - want).norm() / want.norm()) < tol

    x, r = torch.randn(n, d, device=dev, dtype=bf), torch.randn(n, d, device=dev, dtype=bf)
    got_r, got_h = fk.add_layernorm(x, r, norm)
    close(got_r, x.float() + r.float())
    close(got_h, ln(x.float() + r.float()))
    table, lvl = torch.randn(40, d, device=dev, dtype=bf), torch.randn(d, device=dev, dtype=bf)
    idx = torch.randint(0, 40, (n,), device=dev)
    got_r, got_h = fk.add_layernorm(table, lvl.expand(n, d), norm, x_rows=idx)
    close(got_h, ln(table[idx].float() + lvl.float()))
    out = torch.full((n + users, d), float("nan"), device=dev, dtype=torch.float32)
    rows = torch.randperm(n + users, device=dev)[:n]
    none, got = fk.add_layernorm(x, r, norm, store_residual=False, out=out, out_rows=rows)
    assert none is None and int(torch.isnan(got).any(1).sum()) == users
    close(got[rows], ln(x.float() + r.float()))
    out = torch.full((n + n // 50, d), float("nan"), device=dev, dtype=bf)
    fk.add_layernorm(x, r, norm, store_residual=False, out=out, segment=50)
    close(out.view(n // 50, 51, d)[:, 1:].reshape(n, d), ln(x.float() + r.float()))
    pending = torch.randn(d, device=dev)  # residual_gemm's form: an fp32 row, the norm only
    none, got = fk.add_layernorm(x, pending.expand(n, d), norm, store_residual=False, out_dtype=bf)
    assert none is None and got.dtype == bf
    close(got, ln(x.float() + pending))
    tables = [torch.randn(c, d, device=dev, dtype=bf) for c in (30, 40, 50, 64)]
    ids = torch.stack([torch.randint(0, c, (n,), device=dev) for c in (30, 40, 50)])
    pos = torch.randint(0, 64, (n,), device=dev)
    got_x, got_h = fk.embed_layernorm(ids, pos, tables, norm)
    want = sum(t[i].float() for t, i in zip(tables, (*ids, pos), strict=True))
    close(got_x, want)
    close(got_h, ln(want))
    q1 = torch.randn(users, 3 * d, device=dev, dtype=bf)
    q2, q3 = (torch.randn(users * beams, 3 * d, device=dev, dtype=bf) for _ in range(2))
    par = torch.arange(users, device=dev).repeat_interleave(beams) * beams
    par = par + torch.randint(0, beams, (users * beams,), device=dev)
    for past, parent, qkv in (([q1], None, q2), ([q1, q2], par, q3)):
        got = fk.step_attention(qkv, past, parent, beams, heads)
        close(
            got,
            fk._step_attention_torch(qkv.float(), [p.float() for p in past], parent, beams, heads),
        )
    logits = torch.randn(70, 5000, device=dev) * 4
    logits[0, :999] = float("-inf")
    lse, gmax = fk.logsumexp_groupmax(logits, 0)
    close(lse, torch.logsumexp(logits, -1, keepdim=True), tol=1e-6)
    logits = torch.randn(70, 4096, device=dev) * 4
    lse, gmax = fk.logsumexp_groupmax(logits, 32)
    close(lse, torch.logsumexp(logits, -1, keepdim=True), tol=1e-6)
    assert torch.equal(gmax, logits.view(70, 128, 32).amax(-1))


@pytest.mark.gpu
@pytest.mark.skipif(not fk.TRITON, reason="needs triton (the fused kernels' GPU implementation)")
def test_gpu_fused_beam_and_input_kernels_match_their_torch_forms(rng):
    inp = _ragged(rng)  # the inputs' one-launch read
    args = [torch.from_numpy(inp[k]).cuda() for k in INPUT_NAMES]
    got = fk.input_validity(*args, SMALL.codebook_sizes)
    want = fk.input_validity(*args, SMALL.codebook_sizes, fused=False)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    raw = torch.stack(args)  # the sync-free route's packing, one launch
    got = fk.pack_inputs(raw, SMALL.codebook_sizes)
    want = fk.pack_inputs(raw, SMALL.codebook_sizes, fused=False)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    for seed in range(3):
        _check_beam_step(*_beam_search_step("cuda", seed=seed))
    # the base preset's last level: 50 beams over 4096 codes in groups of 16
    _check_beam_step(*_beam_search_step("cuda", users=2, beams=50, codes=4096, group=16))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "graphs, options",
    [
        (False, {}),
        (True, {}),
        (True, {"residual_gemm": False}),
        (True, {"topk_group": 4}),
        (True, {"fused_inputs": False}),
        (True, {"sync_free_positions": 0, "decoder_tables": False}),
    ],
    ids=[
        "eager",
        "cuda-graphs",
        "residual-add-in-norm",
        "fused-beam-kernels-every-level",
        "inputs-unfused",
        "synced-inputs-layer0-per-forward",
    ],
)
def test_gpu_fused_and_unfused_engines_agree(model, rng, graphs, options):
    fused = GpuEngine(
        model, EngineConfig(dtype="bf16", cuda_graphs=graphs, **options), device="cuda"
    )
    plain = GpuEngine(
        model, EngineConfig(dtype="bf16", cuda_graphs=graphs, fused_ops=False), device="cuda"
    )
    for rep in range(1 + 2 * graphs):  # with graphs: captured, then replayed on other inputs
        for inp in (_ragged(rng), random_inputs(4, 32, SMALL.codebook_sizes, rng)):
            args = [inp[k] for k in INPUT_NAMES]
            if rep:  # device inputs: read in one launch (fused_inputs)
                args = [torch.from_numpy(a).cuda() for a in args]
            report = compare_outputs(_as_np(*plain(*args)), _as_np(*fused(*args)))
            assert report["recall_overlap"] >= 0.9 and report["finite_scores"], report


def test_fa4_kernel_names_its_install_when_missing():
    import importlib.util

    from algorithm.serving.runtime.gpu.engine import _fa4_varlen

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    with pytest.raises(ConfigError, match="varlen_kernel") as e:
        _fa4_varlen()
    assert "pip install flash-attn-4" in e.value.hint


@pytest.mark.gpu
def test_gpu_fa4_attention_agrees_with_flash(model, rng):
    """varlen_kernel="fa4" (FlashAttention-4, installed by run_issue14_fa4.sh) answers as the
    default flash kernel does, eagerly and replayed; without the package it names the fix."""
    try:
        fa4 = GpuEngine(model, EngineConfig(dtype="bf16", varlen_kernel="fa4"), device="cuda")
    except ConfigError as e:
        assert "flash-attn-4" in str(e.hint)
        pytest.skip(f"FlashAttention-4 is not installed: {e}")
    flash = GpuEngine(model, EngineConfig(dtype="bf16"), device="cuda")
    for _ in range(2):  # captured, then replayed on other inputs
        inp = _ragged(rng, batch=12, seq=60)
        args = [inp[k] for k in INPUT_NAMES]
        report = compare_outputs(_as_np(*flash(*args)), _as_np(*fa4(*args)))
        assert report["recall_overlap"] >= 0.9 and report["finite_scores"], report


@pytest.mark.gpu
def test_gpu_small_device_inputs_replay_their_own_graph_without_a_sync(model, rng):
    """Device inputs of <= sync_free_positions positions: one graph per (B, T), replayed on new
    inputs (other holes, an empty history) with the answers of the synced route."""
    fast = GpuEngine(model, EngineConfig(dtype="bf16"), device="cuda")
    synced = GpuEngine(model, EngineConfig(dtype="bf16", sync_free_positions=0), device="cuda")
    for _ in range(3):
        inp = _ragged(rng)
        args = [torch.from_numpy(inp[k]).cuda() for k in INPUT_NAMES]
        assert fast.tokens_from_arrays(*args)[0].kind == "inputs"
        a, b = fast(*args), synced(*args)
        report = compare_outputs(_as_np(*b), _as_np(*a))
        assert report["recall_overlap"] >= 0.9 and report["finite_scores"], report
    assert list(fast.graphs.keys()) == [("inputs", 6, 40)]


@pytest.mark.gpu
def test_gpu_host_layouts_replay_their_graphs_from_one_buffer(model, rng):
    """Dynamic batches of changing shapes through the staged (pinned, one-copy) route: every
    answer stays right while the staging buffer and the graphs' static buffers are reused."""
    runner = TorchRunner(model, device="cuda", dtype="bf16")
    for trial in range(4):
        inp = _ragged(rng, batch=6, seq=24 + 8 * trial)
        full = trial % 2 == 1  # dense (all full) and packed batches in turn
        if full:
            inp = random_inputs(6, 24 + 8 * trial, SMALL.codebook_sizes, rng)
        width = inp["attention_mask"].shape[1]
        reqs = [
            {k: v[i : i + 1, : width if full else 5 + 3 * i] for k, v in inp.items()}
            for i in range(6)
        ]
        refs = [_reference(model, r) for r in reqs]
        ref = {k: np.concatenate([r[k] for r in refs]) for k in ("recommendations", "scores")}
        for _ in range(2):  # the second pass replays the graph captured by the first
            outs = runner.infer_requests(reqs)
            got = {k: np.concatenate([o[k] for o in outs]) for k in ("recommendations", "scores")}
            assert compare_outputs(ref, got)["recall_overlap"] >= 0.9, trial
    graphs = runner.engine.graphs.values()
    assert len(graphs) >= 2 and all(static.buf is not None for _, static, _ in graphs)


@pytest.mark.gpu
def test_gpu_frozen_engine_answers_an_unwarmed_batch_from_a_larger_graph(model, rng):
    engine = EngineConfig(dtype="bf16", capture_new_shapes=False)
    runner = TorchRunner(model, device="cuda", dtype="bf16", engine=engine)

    def requests(lengths):
        inp = random_inputs(len(lengths), max(lengths), SMALL.codebook_sizes, rng)
        return [{k: v[i : i + 1, :n] for k, v in inp.items()} for i, n in enumerate(lengths)]

    runner.infer_requests(requests([30, 35, 41]))  # captures the (4 users, 112 tokens) graph
    runner.engine.freeze_graphs()
    reqs = requests([20, 25, 30])  # its own bucket, 80 tokens, was never captured
    outs = runner.infer_requests(reqs)
    e = runner.engine
    assert (e.rounded_up, e.eager_runs, e.graph_count) == (1, 0, 1)
    for req, out in zip(reqs, outs, strict=True):
        assert compare_outputs(_reference(model, req), out)["recall_overlap"] >= 0.9


# -- warm-up of a realistic mix ------------------------------------------------------------------
def test_mix_warmup_covers_the_dynamic_batches_of_a_lognormal_mix(model):
    from algorithm.serving.runtime.gpu.batch import mix_warmup_lengths

    engine = GpuEngine(model, EngineConfig(dtype="fp32"), device="cpu")

    def key(lengths):  # the engine's own graph key for a packed batch of these histories
        return engine.layouts.bucket_packed(len(lengths), int(sum(lengths)))[0]

    batches = mix_warmup_lengths(200, 0.8, 1024, coverage=0.995, max_users=64)
    assert all(min(b) >= 1 and max(b) <= 1024 for b in batches)
    assert all(len(set(b)) > 1 for b in batches if len(b) > 1)  # unequal: the packed route
    warmed = {key(b) for b in batches}
    assert len(warmed) == len(batches) < 260
    rng = np.random.default_rng(1)
    seen = [
        key(np.clip(np.rint(np.exp(rng.normal(np.log(200), 0.8, int(u)))), 1, 1024).astype(int))
        for u in rng.integers(1, 65, 5000)
    ]
    assert np.mean([k in warmed for k in seen]) >= 0.99
    # small batches, as 3 instances at concurrency 8 form them, at the served coverage: before
    # every key had a spare slot, 4% of these landed on a bucket's top, a key no warm-up had
    # captured (they ran eagerly: the served mix's P99 tail)
    warmed = {key(b) for b in mix_warmup_lengths(200, 0.8, 1024, coverage=0.9995)}
    small = [
        key(np.clip(np.rint(np.exp(rng.normal(np.log(200), 0.8, int(u)))), 1, 1024).astype(int))
        for u in rng.integers(1, 5, 5000)
    ]
    assert np.mean([k in warmed for k in small]) >= 0.997


def test_packed_bucket_gives_every_batch_of_a_key_the_same_slots():
    from algorithm.serving.runtime.gpu.batch import bucket_tokens, packed_bucket

    for users in (1, 3, 8, 17, 64):
        for tokens in range(users, users * 1024 + 1, 7):
            bb, nb, spare = packed_bucket(users, tokens)
            assert spare >= 1 and tokens + (bb - users) + spare == nb == bucket_tokens(nb)
    assert packed_bucket(1, 255)[1:] == (256, 1)
    assert packed_bucket(1, 256)[1:] == (288, 32)  # on the top of 256: the next bucket


def test_mix_warmup_covers_the_padded_batches_too():
    from algorithm.serving.runtime.gpu.batch import bucket_tokens, bucket_users, mix_warmup_lengths

    def key(lengths):  # the padded layout's graph key: users bucket, longest history's bucket
        return bucket_users(len(lengths)), bucket_tokens(int(max(lengths)), minimum=16)

    batches = mix_warmup_lengths(200, 0.8, 1024, coverage=0.995, layout="padded")
    warmed = {key(b) for b in batches}
    rng = np.random.default_rng(2)
    seen = [
        key(np.clip(np.rint(np.exp(rng.normal(np.log(200), 0.8, int(u)))), 1, 1024).astype(int))
        for u in rng.integers(1, 65, 5000)
    ]
    assert np.mean([k in warmed for k in seen]) >= 0.99


def test_frozen_engine_routes_an_unwarmed_full_batch_to_packed_graphs(model):
    engine = GpuEngine(model, EngineConfig(dtype="fp32", capture_new_shapes=False), device="cpu")
    assert engine.layouts.dense_graph_ready(1, 237)  # no graphs on CPU: dense whenever full
    engine.graphs.enabled, engine.graphs.frozen = True, True  # as on a GPU after warm-up
    engine.graphs[("dense", 64, 1024)] = None
    assert engine.layouts.dense_graph_ready(64, 1024)
    assert not engine.layouts.dense_graph_ready(1, 237)  # a single history of a mix: packed bucket


def test_frozen_engine_pads_an_unwarmed_packed_batch_to_a_larger_warmed_bucket(model):
    engine = GpuEngine(model, EngineConfig(dtype="fp32", capture_new_shapes=False), device="cpu")
    assert engine.layouts.bucket_packed(3, 150)[:3] == (("packed", 4, 160), [1, 9], 160)
    engine.graphs.enabled, engine.graphs.frozen = True, True  # as on a GPU after warm-up
    for nb in (128, 176, 208):
        engine.graphs[("packed", 4, nb)] = None
    engine.graphs[("packed", 8, 160)] = None
    key, extra, nb, max_len = engine.layouts.bucket_packed(3, 150)
    assert (key, extra, nb) == (("packed", 4, 176), [1, 25], 176) and engine.rounded_up == 1
    assert max(extra) <= max_len == SMALL.max_seq_length
    # each larger bucket would need a spare slot longer than one history: no graph, eager
    assert engine.layouts.bucket_packed(3, 60)[0] == ("packed", 4, 64) and engine.rounded_up == 1
    assert engine.layouts.bucket_packed(3, 120)[0] == ("packed", 4, 128)  # warmed: its own bucket
    # no graph of its users bucket fits: the smallest larger users bucket's that does
    engine.graphs[("packed", 8, 96)] = None
    key, extra, nb, max_len = engine.layouts.bucket_packed(3, 40)
    assert (key, extra) == (("packed", 8, 96), [1] * 5 + [51]) and engine.rounded_up == 2
    engine.config.round_up_users = False  # as before: its own key, no graph, eager
    assert engine.layouts.bucket_packed(3, 40)[0] == ("packed", 4, 64) and engine.rounded_up == 2


def test_gpu_benchmark_reads_each_load_curve_at_the_p99_budget():
    from benchmarks.gpu.served import throughput_at_p99

    def pts(*rows):
        return {f"g_mix_c{c}": {"concurrency": c, "p99_ms": p, "throughput": x} for c, p, x in rows}

    curve = pts((8, 6.0, 1000.0), (16, 12.0, 2000.0), (24, 18.0, 2400.0))
    assert throughput_at_p99(curve, "g_mix_", 15.0) == pytest.approx(2200.0)
    assert throughput_at_p99(curve, "g_mix_", 20.0) == 2400.0  # all within: no extrapolation
    assert throughput_at_p99(pts((8, 16.0, 900.0)), "g_mix_", 15.0) is None
    curve["g_mix_c32"] = {"error": "timed out"}  # a failed point is left out of the curve
    assert throughput_at_p99(curve, "g_mix_", 15.0) == pytest.approx(2200.0)
    assert throughput_at_p99(curve, "other_", 15.0) is None


def test_gpu_benchmark_summary_keeps_each_variant_to_its_own_points():
    """A variant named like another plus a suffix ("pipe" and "pipe_old_engine") does not take
    the other's points into its summary (runs 13-14 wrote their summaries before this fix)."""
    from types import SimpleNamespace

    from benchmarks.gpu.served import instance_summary

    point = {"throughput": 1.0, "p50_ms": 1.0, "p99_ms": 2.0, "gpu_util_per_gpu": [0.5]}
    pts = {
        f"{tag}_{load}": point
        for tag in ("pipe", "pipe_old_engine")
        for load in ("fixed1024_c1", "mix_packed_c64")
    }
    so = SimpleNamespace(slo_ms=30.0)
    assert sorted(instance_summary(pts, "pipe", so, False)) == ["fixed1024_c1", "mix_packed_c64"]
    assert sorted(instance_summary(pts, "pipe_old_engine", so, False)) == [
        "fixed1024_c1",
        "mix_packed_c64",
    ]
