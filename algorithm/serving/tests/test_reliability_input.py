"""Bad input at the server edge: Hypothesis-generated malformed requests, interleaved with good
ones and sent concurrently to the real tritonserver (python backend, dynamic batching).

Every bad request must get INVALID_ARGUMENT with a message naming the input and the problem;
every good one (all-masked histories included) the reference answer; the server stays up and
its memory (tritonserver + python stub) stops growing once warmed up.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from algorithm.serving import TritonServer
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.runtime.onnxruntime import OnnxRuntimeRunner
from algorithm.serving.tests.reliability_helpers import (
    CODEBOOKS,
    NP_TO_TRITON,
    fire,
    grpc_inputs,
    python_model,
    server_rss,
    valid_request,
)
from algorithm.serving.verify.parity import compare_outputs

MODEL = "ugt_fuzz"
MAX_BS, MAX_SEQ = 8, 256
ID_NAMES = INPUT_NAMES[:3]
BAD_PER_ROUND, GOOD_PER_ROUND = 18, 5
WARMUP_ROUNDS, ROUNDS = 16, 44  # (16 + 44) x 18 = 1,080 malformed requests
# The allocators' and ONNX Runtime's arena's growth past the warm-up's peak: up to ~40 MiB with
# whole-batch runs; 47-56 MiB with the runner's 2-row slices, whose arena grows more gradually
# although its peak is ~40 MiB lower (268 vs 308 MiB). A retained oversized payload adds 2-8 MB
# each, ~60 of them hundreds of MB.
RSS_SLACK = 80 << 20
ANY_INPUT = "(" + "|".join(INPUT_NAMES) + ")"
WRONG_DTYPES = (np.int32, np.int8, np.uint64, np.float32, np.float16, np.bool_)
BAD_KINDS = (
    "id_negative",
    "id_beyond",
    "mask_value",
    "seq_zero",
    "seq_over",
    "oversized",
    "batch_over",
    "seq_mismatch",
    "batch_mismatch",
    "dtype",
    "missing",
    "rank",
    "truncated",
)
INT64 = st.integers(-(2**63), 2**63 - 1)


@pytest.fixture(scope="module")
def fuzz_server(onnx_model, tmp_path_factory):
    import tritonclient.grpc as grpcclient

    repo = tmp_path_factory.mktemp("fuzz_repo")
    python_model(repo, onnx_model, MODEL, max_batch_size=MAX_BS, max_seq_length=MAX_SEQ)
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        yield server, client
        client.close()


# ------------------------------------------------------------------------------ the strategies
@st.composite
def good_cases(draw):
    """("good", arrays, None): valid ids; ragged, full, all-masked, and edge sizes."""
    shape = draw(st.sampled_from(("ragged", "full", "all_masked", "edge")))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, seq = draw(st.integers(1, MAX_BS)), draw(st.integers(1, 48))
    if shape == "edge":
        batch, seq = draw(st.sampled_from(((1, 1), (MAX_BS, 1), (1, MAX_SEQ), (MAX_BS, 64))))
    x = valid_request(rng, batch, seq, ragged=shape != "full")
    if shape == "all_masked":
        # No real item: a defined (empty) history, not an error; ids may be anything valid.
        x = {
            n: rng.integers(0, c, (batch, seq), dtype=np.int64)
            for n, c in zip(ID_NAMES, CODEBOOKS, strict=True)
        }
        x["attention_mask"] = np.zeros((batch, seq), dtype=np.int64)
    return shape, x, None


@st.composite
def bad_cases(draw):
    """(kind, arrays or InferInputs, regex the error must match)."""
    kind = draw(st.sampled_from(BAD_KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, seq = draw(st.integers(1, MAX_BS)), draw(st.integers(1, 48))
    x = valid_request(rng, batch, seq)
    r, c = draw(st.integers(0, batch - 1)), draw(st.integers(0, seq - 1))
    if kind in ("id_negative", "id_beyond"):
        i = draw(st.integers(0, 2))
        name, size = ID_NAMES[i], CODEBOOKS[i]
        v = draw(
            st.integers(-(2**63), -1) if kind == "id_negative" else st.integers(size, 2**63 - 1)
        )
        x[name][r, c] = v
        return kind, x, rf"{name}: id {v} at \[{r}, {c}\] is outside its codebook \[0, {size}\)"
    if kind == "mask_value":
        v = draw(INT64.filter(lambda v: v not in (0, 1)))
        x["attention_mask"][r, c] = v
        return (
            kind,
            x,
            rf"attention_mask: value {v} at \[{r}, {c}\]; only 0 \(padding\) and 1 \(item\)",
        )
    if kind in ("seq_zero", "seq_over", "oversized"):
        n = {
            "seq_zero": 0,
            "seq_over": draw(st.integers(MAX_SEQ + 1, 4 * MAX_SEQ)),
            "oversized": draw(st.integers(50_000, 250_000)),
        }[kind]
        b = 1 if kind == "oversized" else batch  # up to 2 MB per input, 8 MB per request
        x = (
            valid_request(rng, b, n, ragged=False)
            if n
            else {name: np.zeros((b, 0), np.int64) for name in INPUT_NAMES}
        )
        return kind, x, rf"encoder_l1_ids: sequence length {n} outside \[1, {MAX_SEQ}\]"
    if kind == "batch_over":
        b = draw(st.integers(MAX_BS + 1, 64))
        return kind, valid_request(rng, b, seq), rf"batch-size must be <= {MAX_BS} for '{MODEL}'"
    name = draw(st.sampled_from(INPUT_NAMES))
    if kind == "seq_mismatch":
        other = draw(st.integers(1, 64).filter(lambda n: n != seq))
        x[name] = valid_request(rng, batch, other)[name]
        named = ID_NAMES[1] if name == ID_NAMES[0] else name  # model.py compares with l1
        return kind, x, rf"{named}: shape \[\d+, \d+\] differs from encoder_l1_ids \[\d+, \d+\]"
    if kind == "batch_mismatch":
        other = draw(st.integers(1, MAX_BS).filter(lambda n: n != batch))
        x[name] = valid_request(rng, other, seq)[name]
        return kind, x, rf"input '{ANY_INPUT}' batch size does not match other inputs"
    if kind == "dtype":
        dtype = draw(st.sampled_from(WRONG_DTYPES))
        x[name] = x[name].astype(dtype)
        t = NP_TO_TRITON[dtype]
        return kind, x, rf"input '{name}' data-type is '{t}', but model '{MODEL}' expects 'INT64'"
    if kind == "missing":
        dropped = draw(st.lists(st.sampled_from(INPUT_NAMES), min_size=1, max_size=3, unique=True))
        x = {n: a for n, a in x.items() if n not in dropped}
        return (
            kind,
            x,
            r"missing required input\(s\) \[" + "".join(rf"(?=[^\]]*'{n}')" for n in dropped),
        )
    if kind == "rank":
        x[name] = x[name][..., None] if draw(st.booleans()) else x[name][:, None, :]
        return (
            kind,
            x,
            rf"unexpected shape for input '{name}' for model '{MODEL}'. Expected \[-1,-1\]",
        )
    # truncated: a payload whose byte count disagrees with its declared shape
    inputs = grpc_inputs(x)
    victim = next(i for i in inputs if i.name() == name)
    cut = draw(st.integers(1, 8 * batch * seq))
    victim._raw_content = (
        victim._raw_content[:-cut] if draw(st.booleans()) else victim._raw_content + b"\0" * cut
    )
    return kind, inputs, rf"input byte size mismatch for input '{name}' for model '{MODEL}'"


ROUND = st.tuples(
    st.lists(bad_cases(), min_size=BAD_PER_ROUND, max_size=BAD_PER_ROUND),
    st.lists(good_cases(), min_size=GOOD_PER_ROUND, max_size=GOOD_PER_ROUND),
    st.randoms(use_true_random=False),
)
FUZZ = settings(
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.server
def test_fuzzed_malformed_requests_get_clear_errors_and_good_ones_right_answers(
    fuzz_server, onnx_model
):
    server, client = fuzz_server
    ref = OnnxRuntimeRunner(onnx_model, intra_op_threads=1)
    seen = {"bad": 0, "good": 0, "kinds": set()}
    rss: list[int] = []

    def one_round(round_):
        bad, good, shuffle = round_
        cases = bad + good
        shuffle.shuffle(cases)  # bad and good requests meet in the same dynamic batches
        results = fire(client, MODEL, [x for _, x, _ in cases])
        for (kind, x, pattern), (got, error) in zip(cases, results, strict=True):
            if pattern is None:
                assert error is None, (kind, {n: a.shape for n, a in x.items()}, error)
                assert np.isfinite(got["scores"]).all(), kind
                m = compare_outputs(ref.infer(x), got)
                assert m["recall_overlap"] >= 0.99 and m["max_common_item_score_diff"] < 1e-3, (
                    kind,
                    m,
                )
                seen["good"] += 1
            else:
                assert got is None, f"{kind} was answered"
                message = error.message()
                assert error.status() == "StatusCode.INVALID_ARGUMENT", (
                    kind,
                    error.status(),
                    message,
                )
                assert re.search(pattern, message), (kind, pattern, message)
                seen["bad"] += 1
                seen["kinds"].add(kind)
        rss.append(server_rss(server))

    warmup = seed(1)(settings(FUZZ, max_examples=WARMUP_ROUNDS)(given(ROUND)(one_round)))
    fuzz = seed(2)(settings(FUZZ, max_examples=ROUNDS)(given(ROUND)(one_round)))
    pid = server.process.pid
    warmup()
    warm_peak, n_warm = max(rss), len(rss)
    fuzz()
    run_peak, rss_end = max(rss[n_warm:]), rss[-1]
    print(
        f"fuzz: {seen['bad']} malformed + {seen['good']} good requests; server+stub RSS peak "
        f"{warm_peak / 2**20:.1f} MiB in warm-up, peak {run_peak / 2**20:.1f} and last "
        f"{rss_end / 2**20:.1f} MiB in the run"
    )

    assert seen["bad"] >= 1000 and seen["kinds"] == set(BAD_KINDS), seen
    # The same server process answered everything and still serves.
    assert server.process.pid == pid and server.is_alive() and server.model_ready(MODEL)
    # Warmed up on the same distribution, the run must not push memory past the warm-up's peak
    # by more than the noise: keeping the payloads of the ~60 oversized requests alone (2-8 MB
    # each) would add hundreds of MB.
    assert run_peak - warm_peak < RSS_SLACK, (
        warm_peak >> 20,
        run_peak >> 20,
        [r >> 20 for r in rss],
    )


@pytest.mark.server
def test_a_good_request_after_the_fuzz_still_gets_the_reference_answer(fuzz_server, onnx_model):
    """After all the malformed traffic a request still gets exactly the reference answer."""
    server, client = fuzz_server
    x = valid_request(np.random.default_rng(42), 3, 40)
    ((got, error),) = fire(client, MODEL, [x])
    assert error is None
    expected = OnnxRuntimeRunner(onnx_model).infer(x)
    np.testing.assert_array_equal(got["recommendations"], expected["recommendations"])
    np.testing.assert_allclose(got["scores"], expected["scores"], atol=1e-4)
