"""The parts of `tune` that need no server: settings in and out of Triton's ModelConfig, the
search (over a deterministic stand-in for the measurements), the stored points, the judge, and
the config replace/restore. The live-server tests are in test_tune.py."""

from __future__ import annotations

import json

import pytest

from algorithm.errors import ConfigError, RepositoryError
from algorithm.serving.bench.result import BenchmarkResult
from algorithm.serving.config import BenchmarkConfig, ExportConfig, TritonConfig, TuneConfig
from algorithm.serving.triton.config_file import (
    PREVIOUS_FILE,
    replace_config,
    restore_config,
)
from algorithm.serving.triton.schema import config_to_text, parse_config
from algorithm.serving.triton_config import TritonConfigGenerator
from algorithm.serving.tuning.search import (
    Candidate,
    CoordinateSearch,
    Judge,
    candidate_values,
    closest,
    winner,
)
from algorithm.serving.tuning.settings import (
    ServingSettings,
    apply_settings,
    config_from_json,
    config_json,
    read_settings,
)
from algorithm.serving.tuning.store import PointStore

EC = ExportConfig(model_name="ugt", precision="fp32", max_batch_size=32)
CPU = TritonConfig(
    platform="python",
    python_runtime="onnxruntime",
    instance_kind="KIND_CPU",
    gpus=(),
    instance_count=2,
    runtime_threads=1,
    preferred_batch_sizes=(4, 8, 16),
    max_queue_delay_us=100,
)
GPU = TritonConfig(platform="python", python_runtime="torch", instance_count=3)


def _config(tc: TritonConfig = CPU, ec: ExportConfig = EC):
    return TritonConfigGenerator(ec, tc).build_config()


# -------------------------------------------------------------------------------- settings
def test_settings_read_back_what_apply_wrote_and_nothing_else_changes():
    base = _config()
    s = read_settings(base)
    assert s == ServingSettings(2, 32, (4, 8, 16), 100, 0, 0, 1, None)
    want = s.replace(
        instance_count=3,
        runtime_threads=2,
        max_batch_size=16,
        preferred_batch_sizes=(8, 16, 32),  # 32 > max batch: left out
        max_queue_delay_us=500,
        max_queue_size=64,
        queue_timeout_us=15000,
    )
    new = parse_config(config_to_text(apply_settings(base, want)))
    got = read_settings(new)
    assert got == want.replace(preferred_batch_sizes=(8, 16))
    assert new.parameters["threads"].string_value == "2"
    # what the tune does not search stays as it was
    for field in ("input", "output", "model_warmup", "version_policy", "backend"):
        assert getattr(new, field) == getattr(base, field)
    assert {k: v.string_value for k, v in new.parameters.items() if k != "threads"} == {
        k: v.string_value for k, v in base.parameters.items() if k != "threads"
    }
    # the queue policy goes away again, and so does dynamic batching
    plain = apply_settings(new, got.replace(max_queue_size=0, queue_timeout_us=0))
    assert not plain.dynamic_batching.HasField("default_queue_policy")
    off = apply_settings(base, s.replace(preferred_batch_sizes=None))
    assert not off.HasField("dynamic_batching") and read_settings(off).preferred_batch_sizes is None
    # the JSON of Triton's load override and of its config API
    assert read_settings(config_from_json(config_json(apply_settings(base, want)))) == got


def test_gpu_engine_has_batching_mode_and_no_thread_knob():
    base = _config(GPU)
    s = read_settings(base)
    assert s.gpu_batching == "length_aware" and s.runtime_threads is None
    new = apply_settings(base, s.replace(gpu_batching="pad", instance_count=2))
    assert new.parameters["batching"].string_value == "pad"
    assert [g.count for g in new.instance_group] == [2] and list(new.instance_group[0].gpus) == [0]
    assert "threads" not in new.parameters or new.parameters["threads"].string_value == "0"
    cpu_torch = read_settings(_config(CPU.replace(python_runtime="torch")))
    assert cpu_torch.runtime_threads is None  # the torch runner reads OMP_NUM_THREADS instead
    # the torch runner's pipeline depth: read (absent = 0), written, and taken off again
    assert s.pipeline_depth == 0 and read_settings(_config(CPU)).pipeline_depth is None
    piped = apply_settings(base, s.replace(pipeline_depth=2))
    assert piped.parameters["pipeline_depth"].string_value == "2"
    assert read_settings(piped).pipeline_depth == 2 and "pipe2" in read_settings(piped).label
    # a pipeline's host waits on the GPU block (as the generator writes it)
    assert json.loads(piped.parameters["engine"].string_value)["blocking_sync"] is True
    assert "pipeline_depth" not in apply_settings(piped, s).parameters
    # continuous batching needs a pipeline: a candidate without one drops it too (model.py would
    # refuse to load it), one with a pipeline keeps it
    piped.parameters["continuous_batching"].string_value = "true"
    assert "continuous_batching" not in apply_settings(piped, s).parameters
    again = apply_settings(piped, s.replace(pipeline_depth=1))
    assert again.parameters["continuous_batching"].string_value == "true"


def test_a_model_without_batching_cannot_be_tuned():
    from algorithm.serving.triton.schema import model_config_pb2

    with pytest.raises(ConfigError, match="max_batch_size"):
        read_settings(model_config_pb2().ModelConfig(name="ugt", max_batch_size=0))


def test_candidate_values_keep_the_current_value_and_follow_the_model():
    base = read_settings(_config())
    v = candidate_values(base, TuneConfig(), slo_p99_ms=30.0, cpu_count=2)
    assert v["instance_count"] == [1, 2, 3, 4] and v["runtime_threads"] == [1, 2]
    assert v["max_batch_size"] == [8, 16, 32]
    assert (4, 8, 16) in v["preferred_batch_sizes"] and () in v["preferred_batch_sizes"]
    assert max(v["max_queue_delay_us"]) <= 30_000 / 4 and 100 in v["max_queue_delay_us"]
    assert "gpu_batching" not in v and "queue_policy" not in v  # no GPU engine, no rejections
    listed = candidate_values(
        base, TuneConfig(instance_counts=(3, 1), max_queue_delays_us=(0,)), 30.0, cpu_count=2
    )
    assert listed["instance_count"] == [1, 2, 3] and listed["max_queue_delay_us"] == [0, 100]
    with_policy = candidate_values(base, TuneConfig(max_rejected_percent=1.0), 30.0, cpu_count=2)
    assert with_policy["queue_policy"][0] == (0, 0) and (0, 15000) in with_policy["queue_policy"]
    only = candidate_values(base, TuneConfig(settings=("instance_count",)), 30.0, cpu_count=2)
    assert list(only) == ["instance_count"]
    gpu = candidate_values(read_settings(_config(GPU)), TuneConfig(), 15.0, gpu=True)
    assert gpu["gpu_batching"] == ["length_aware", "pad"] and gpu["instance_count"] == [1, 2, 3, 4]
    assert gpu["pipeline_depth"] == [0, 2] and "pipeline_depth" not in v
    with pytest.raises(ConfigError, match="max_batch_sizes"):
        candidate_values(base, TuneConfig(max_batch_sizes=(64,)), 30.0, max_batch_limit=32)


def test_tune_config_names_bad_fields():
    with pytest.raises(ConfigError, match="settings"):
        TuneConfig(settings=("instances",))
    with pytest.raises(ConfigError, match="queue_policies"):
        TuneConfig(queue_policies=((1, 2, 3),))
    with pytest.raises(ConfigError, match="gpu_batchings"):
        TuneConfig(gpu_batchings=("packed",))
    with pytest.raises(ConfigError, match="pipeline_depths"):
        TuneConfig(pipeline_depths=(9,))
    from algorithm.serving.tune import ServingTuner

    with pytest.raises(ConfigError, match="one batch size"):
        ServingTuner(benchmark_config=BenchmarkConfig(test_batch_sizes=(1, 8)))


# ----------------------------------------------------------------------------------- judge
def _result(load, throughput, p99, ok=100, failed=0, rejected=0) -> BenchmarkResult:
    return BenchmarkResult(
        throughput,
        p99 / 2,
        p99 * 0.8,
        p99 * 0.9,
        p99,
        p99 / 2,
        p99 / 4,
        p99 * 1.2,
        ok + failed + rejected,
        ok,
        failed,
        rejected_requests=rejected,
        concurrency=load,
    )


def test_judge_counts_the_best_point_within_budget_and_refuses_failures():
    j = Judge(30.0)
    s = ServingSettings(1, 8, ())
    c = Candidate(s, "x", [_result(1, 100, 10), _result(4, 300, 25), _result(16, 500, 60)])
    assert j.throughput(c) == 300 and j.best_point(c).concurrency == 4 and j.best_p99(c) == 10
    assert not j.point_ok(_result(4, 300, 20, failed=1))
    assert not j.point_ok(_result(4, 300, 20, rejected=1))
    assert Judge(30.0, max_rejected_percent=2.0).point_ok(_result(4, 300, 20, ok=99, rejected=1))
    past = Candidate(s, "x", [_result(1, 90, 40)])
    broken = Candidate(s, "x", error="failed to load")
    assert j.score(c) > j.score(past) > j.score(broken)
    assert j.clearly_worse(past, c, 5) and not j.clearly_worse(c, past, 5)
    near = Candidate(s, "x", [_result(4, 290, 25)])
    assert not j.clearly_worse(near, c, 5) and j.clearly_worse(near, c, 1)


# ---------------------------------------------------------------------------------- search
def _model(s: ServingSettings) -> tuple[float, float]:
    """A stand-in server: throughput peaks at 3 instances; P99 grows with instances past 3 and
    with the queue delay. Deterministic, so the test checks the search, not the machine."""
    thr = {1: 300, 2: 500, 3: 600, 4: 580, 5: 400}[s.instance_count]
    p99 = 20 + 8 * max(0, s.instance_count - 3) + s.max_queue_delay_us / 50
    if s.preferred_batch_sizes == ():
        thr *= 1.1
    return thr, p99


def _search(base, values, slo=30.0, budget=None):
    calls = []

    def measure(settings, step):
        calls.append(settings.key)
        thr, p99 = _model(settings)
        return Candidate(settings, step, [_result(16, thr, p99)])

    def has_time():
        return budget is None or len(calls) < budget

    search = CoordinateSearch(base, values, Judge(slo), measure, 5.0, has_time)
    return search, search.run(), calls


def test_search_climbs_one_setting_at_a_time_and_stops_past_the_budget():
    base = ServingSettings(2, 32, (4, 8), 100)
    values = {
        "instance_count": [1, 2, 3, 4, 5],
        "preferred_batch_sizes": [(4, 8), ()],
        "max_queue_delay_us": [0, 100, 1000, 2000],
    }
    search, cands, calls = _search(base, values)
    labels = [c.settings.label for c in cands]
    assert len(calls) == len(set(calls)) == len(cands)  # nothing measured twice
    assert cands[0].step == "baseline" and cands[0].settings == base
    # up from 2: 3 is better, 4 is within noise, 5 is past the budget -> stop; never down to 1
    assert [c.settings.instance_count for c in cands if c.step == "instance_count"] == [3, 4, 5]
    assert "i1 mb32 pref[4,8] d100us" not in labels
    # delay: 1000 us breaks the budget (P99 40 ms): that direction stops there, and the
    # other one (0 us) is tried because going up found nothing better
    delays = [c.settings.max_queue_delay_us for c in cands if c.step == "max_queue_delay_us"]
    assert delays == [1000, 0]
    best = winner(cands, Judge(30.0))
    assert best.settings == ServingSettings(3, 32, (), 100)
    assert Judge(30.0).throughput(best) == max(
        Judge(30.0).throughput(c) or 0 for c in cands
    )  # the winner: the most throughput among those within the budget
    assert search.stopped is None


def test_candidates_that_serve_alike_are_measured_once():
    # after max batch 8, the preferred sets [4, 8, 16] and [4, 8] are the same config
    base = ServingSettings(2, 8, (4, 8), 100)
    _, cands, calls = _search(base, {"preferred_batch_sizes": [(4, 8), (4, 8, 16), ()]})
    assert len(calls) == 2 and [c.settings.preferred_batch_sizes for c in cands] == [(4, 8), ()]


def test_search_goes_down_when_up_does_not_help_and_honours_the_time_budget():
    base = ServingSettings(4, 32, (4, 8), 100)
    _, cands, _ = _search(base, {"instance_count": [1, 2, 3, 4, 5]})
    tried = [c.settings.instance_count for c in cands]
    assert tried[:2] == [4, 5] and 3 in tried  # 5 is worse: then downwards
    search, cands, calls = _search(base, {"instance_count": [1, 2, 3, 4, 5]}, budget=2)
    assert len(cands) == 2 and search.stopped == "time budget"


def test_no_candidate_within_the_budget_gives_the_closest():
    base = ServingSettings(2, 32, (4, 8), 100)
    _, cands, _ = _search(base, {"instance_count": [1, 2, 3, 4]}, slo=5.0)
    j = Judge(5.0)
    assert winner(cands, j) is None
    near = closest(cands, j)
    assert j.best_p99(near) == min(j.best_p99(c) for c in cands)


# ----------------------------------------------------------------------------------- store
def test_stored_points_resume_only_under_the_same_context(tmp_path):
    s = ServingSettings(2, 32, (4, 8), 100, runtime_threads=1)
    c = Candidate(s, "instance_count", [_result(4, 300, 20)], seconds=3.0)
    store = PointStore(tmp_path, {"model": "m", "config": "a"})
    assert store.get(s.key) is None
    store.put(c)
    again = PointStore(tmp_path, {"model": "m", "config": "a"}).get(s.key)
    assert again.reused and again.settings == s and again.results[0].throughput == 300
    assert PointStore(tmp_path, {"model": "m", "config": "b"}).get(s.key) is None
    assert PointStore(tmp_path, {"model": "m", "config": "a"}, enabled=False).get(s.key) is None
    other = PointStore(tmp_path, {"model": "m", "config": "b"})
    other.put(c)  # a second context keeps the first one's points
    assert PointStore(tmp_path, {"model": "m", "config": "a"}).get(s.key) is not None
    (tmp_path / "tune_points.json").write_text("{not json")
    assert len(PointStore(tmp_path, {"model": "m", "config": "a"})) == 0


# ----------------------------------------------------------------------------- config file
def test_replace_keeps_the_previous_config_and_restore_swaps_back(tmp_path):
    model_dir = tmp_path / "ugt"
    model_dir.mkdir()
    original = config_to_text(_config())
    (model_dir / "config.pbtxt").write_text(original)
    with pytest.raises(RepositoryError, match="no earlier config"):
        restore_config(model_dir)
    with pytest.raises(RepositoryError, match="does not parse"):
        replace_config(model_dir, "max_batch_size: oops")
    assert (model_dir / "config.pbtxt").read_text() == original
    assert not (model_dir / PREVIOUS_FILE).exists()
    tuned = config_to_text(
        apply_settings(_config(), read_settings(_config()).replace(instance_count=1))
    )
    paths = replace_config(model_dir, tuned)
    assert (model_dir / "config.pbtxt").read_text() == tuned
    assert (model_dir / PREVIOUS_FILE).read_text() == original
    assert json.dumps(paths)  # plain paths
    restore_config(model_dir)
    assert (model_dir / "config.pbtxt").read_text() == original
    assert (model_dir / PREVIOUS_FILE).read_text() == tuned  # the restore can be undone too
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.pbtxt", PREVIOUS_FILE]
