"""A/B routing without a server: the stable split (guide 10.4's ABTestingRouter), the
experiment's config, the router model in a repository (config, changes, validation), the
per-arm results read from a metrics page, the report and the ``ugt-serving abtest`` commands.
The routing inside the real server is test_abtest_server.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from algorithm.errors import ConfigError, RepositoryError
from algorithm.serving import (
    ABExperiment,
    ABTestingRouter,
    ExperimentConfig,
    ExportConfig,
    TritonConfig,
    TritonConfigGenerator,
    validate_deployment,
)
from algorithm.serving.bench.experiment import (
    histogram_percentile,
    render_markdown,
    router_results,
    write_experiment_report,
)
from algorithm.serving.traffic import bucket, goes_to_a, mirrored, user_key
from algorithm.serving.triton.routing import read_experiment, update_router
from algorithm.serving.triton.schema import parse_config

USERS = [f"user-{i}" for i in range(10_000)]


# ------------------------------------------------------------------------------- the hash
def test_bucket_is_blake2b_of_salt_and_id_and_pinned():
    """The split is defined by bytes, not by the process: pinned values hold on every Python."""
    digest = hashlib.blake2b(b"ugt_router\xffuser-1", digest_size=8).digest()
    assert bucket("user-1", "ugt_router") == int.from_bytes(digest, "big") / 2**64
    assert bucket("user-1", "ugt_router") == pytest.approx(0.9923669267468113, abs=0)
    assert bucket(42, "exp-2024") == pytest.approx(0.4452721608979864, abs=0)
    assert bucket("用户", "ugt_router") == pytest.approx(0.41797769753832315, abs=0)


def test_int_and_text_ids_are_one_user_and_bad_ids_are_refused():
    assert user_key(42) == user_key("42") == user_key(b"42") == b"42"
    router = ABTestingRouter("model_v1", "model_v2", traffic_split=0.5)
    assert [router.route(42) for _ in range(3)] == [router.route("42")] * 3
    for bad in (None, True, "", "x" * 300, 1.5, b"\xff\xfe"):
        with pytest.raises(ConfigError) as e:
            router.route(bad)
        assert e.value.field == "user_id"


def test_the_split_matches_traffic_split_within_binomial_tolerance():
    for split in (0.1, 0.5, 0.9):
        router = ABTestingRouter("model_a", "model_b", traffic_split=split)
        n_a = sum(router.route(u) == "model_a" for u in USERS)
        sd = (len(USERS) * split * (1 - split)) ** 0.5
        assert abs(n_a - split * len(USERS)) <= 4 * sd, (split, n_a)
    assert {ABTestingRouter("a", "b", 0.0).route(u) for u in USERS[:500]} == {"b"}
    assert {ABTestingRouter("a", "b", 1.0).route(u) for u in USERS[:500]} == {"a"}


def test_growing_b_moves_users_from_a_to_b_only_and_salts_split_independently():
    before = ABTestingRouter("a", "b", 0.7)
    after = ABTestingRouter("a", "b", 0.5)
    moved = [(before.route(u), after.route(u)) for u in USERS]
    assert ("b", "a") not in moved and moved.count(("a", "b")) > 1000
    # Another experiment: its B is about half from each arm of the first.
    other = ABTestingRouter("a", "b", 0.5, experiment="ranking-2")
    both = sum(after.route(u) == other.route(u) for u in USERS) / len(USERS)
    assert 0.45 < both < 0.55
    # Shadow mode mirrors exactly the users an A/B split of 1 - fraction would give to B.
    assert [mirrored(u, 0.2, "s") for u in USERS] == [not goes_to_a(u, 0.8, "s") for u in USERS]


def test_the_guide_signature_and_its_validation():
    router = ABTestingRouter("model_v1", "model_v2", traffic_split=0.5)
    assert (router.model_a, router.model_b, router.traffic_split) == ("model_v1", "model_v2", 0.5)
    assert router.route("user_123") in ("model_v1", "model_v2")
    for split in (-0.1, 1.5, "0.5", True, float("nan")):
        with pytest.raises(ConfigError) as e:
            ABTestingRouter("a", "b", traffic_split=split)
        assert e.value.field == "traffic_split" and isinstance(e.value, ValueError)
    with pytest.raises(ConfigError):
        ABTestingRouter("", "b")


def test_two_processes_with_different_hash_seeds_route_alike():
    code = (
        "import json; from algorithm.serving import ABTestingRouter; "
        "r = ABTestingRouter('a', 'b', 0.3); "
        f"print(json.dumps([r.route(u) for u in {USERS[:2000]!r}]))"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        for seed in ("1", "2")
    ]
    here = [ABTestingRouter("a", "b", 0.3).route(u) for u in USERS[:2000]]
    assert json.loads(runs[0]) == json.loads(runs[1]) == here


# ------------------------------------------------------------------------------ the config
def test_experiment_config_validates_and_round_trips_through_parameters():
    exp = ExperimentConfig(model_a="a", model_b="b", traffic_split=0.25, experiment="exp1")
    assert ExperimentConfig.from_parameters(exp.to_parameters()) == exp
    assert exp.name == "exp1" and exp.hash_salt == "exp1"
    assert ExperimentConfig(model_a="a", model_b="b").hash_salt == "ugt_router"
    bad = [
        ({"traffic_split": 1.01}, "traffic_split"),
        ({"shadow_fraction": -0.5}, "shadow_fraction"),
        ({"model_b": "ugt_recommend"}, "model_b"),
        ({"router_name": "ugt_recommend"}, "router_name"),
        ({"mode": "canary"}, "mode"),
        ({"status": "paused"}, "status"),
        ({"model_a": "../x"}, "model_a"),
        ({"salt": "a\nb"}, "salt"),
        ({"workers": 0}, "workers"),
    ]
    for fields, field in bad:
        with pytest.raises(ConfigError) as e:
            ExperimentConfig(**fields)
        assert e.value.field == field
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_parameters({"traffic_split": "half"})
    assert e.value.field == "traffic_split"


# -------------------------------------------------------------------------- the repository
def _arm(repo, name: str, k: int = 50) -> None:
    ec = ExportConfig(model_name=name, max_batch_size=8, max_seq_length=64, num_recommendations=k)
    tc = TritonConfig(platform="python", instance_kind="KIND_CPU", instance_count=1)
    TritonConfigGenerator(ec, tc).generate(repo)


@pytest.fixture
def repo(tmp_path):
    _arm(tmp_path, "ugt_a")
    _arm(tmp_path, "ugt_b")
    return tmp_path


def test_the_router_config_is_the_arms_contract_plus_user_id_and_arm(repo):
    exp = ABExperiment.create(
        repo, ExperimentConfig(router_name="rt", model_a="ugt_a", model_b="ugt_b", workers=16)
    )
    config = parse_config((repo / "rt" / "config.pbtxt").read_text())
    arm = parse_config((repo / "ugt_a" / "config.pbtxt").read_text())
    assert [i.name for i in config.input] == [i.name for i in arm.input] + ["user_id"]
    assert [o.name for o in config.output] == [o.name for o in arm.output] + ["arm"]
    assert list(config.output[0].dims) == list(arm.output[0].dims)
    kind = config.instance_group[0].kind
    assert config.backend == "python" and kind == config.instance_group[0].KIND_CPU
    assert config.max_batch_size == 16 and config.HasField("dynamic_batching")
    assert config.parameters["arm_max_batch_size"].string_value == "8"
    assert (
        (repo / "rt" / "1" / "model.py").read_text().startswith('"""Triton python-backend router')
    )
    check = validate_deployment(repo, "rt")
    assert check["valid"], check["errors"]
    assert check["info"]["platform"] == "router"
    assert check["info"]["experiment"]["traffic_split"] == 0.5
    assert exp.router().route("u1") == ABTestingRouter("ugt_a", "ugt_b", 0.5, "rt").route("u1")


def test_arms_that_differ_or_are_missing_are_refused_with_the_reason(repo):
    _arm(repo, "ugt_k10", k=10)
    with pytest.raises(RepositoryError, match="differ in inputs/outputs"):
        ABExperiment.create(
            repo, ExperimentConfig(router_name="rt", model_a="ugt_a", model_b="ugt_k10")
        )
    with pytest.raises(RepositoryError, match="ugt_nope") as e:
        ABExperiment.create(
            repo, ExperimentConfig(router_name="rt", model_a="ugt_a", model_b="ugt_nope")
        )
    assert "Deploy both arms" in e.value.hint
    # a folder holding a model is never overwritten by a router
    with pytest.raises(RepositoryError, match="not a router"):
        ABExperiment.create(
            repo, ExperimentConfig(router_name="ugt_k10", model_a="ugt_a", model_b="ugt_b")
        )
    assert not (repo / "rt").exists()


def test_changes_rewrite_the_config_and_the_history(repo):
    exp = ABExperiment.create(
        repo, ExperimentConfig(router_name="rt", model_a="ugt_a", model_b="ugt_b", mode="shadow")
    )
    assert exp.router().route("u1") == "ugt_a"  # shadow: A answers everyone
    result = exp.set_split(traffic_split=0.2, mode="ab")
    assert result["experiment"]["traffic_split"] == 0.2 and result["experiment"]["mode"] == "ab"
    assert "not requested" in result["server"]
    assert read_experiment(repo, "rt").traffic_split == 0.2
    assert exp.promote()["experiment"]["status"] == "promoted"
    assert {exp.router().route(u) for u in USERS[:200]} == {"ugt_b"}
    assert exp.stop()["experiment"]["status"] == "stopped"
    assert {exp.router().route(u) for u in USERS[:200]} == {"ugt_a"}
    assert exp.set_split(traffic_split=0.5)["experiment"]["status"] == "running"
    actions = [e["action"] for e in exp.history["events"]]
    assert actions == ["created", "split", "promoted", "stopped", "split"]
    assert validate_deployment(repo, "rt")["valid"]
    with pytest.raises(ConfigError) as e:
        update_router(repo, "rt", "split", model_b="ugt_a")
    assert e.value.field == "model_b"
    with pytest.raises(ConfigError):
        exp.set_split(traffic_split=2.0)
    assert read_experiment(repo, "rt").traffic_split == 0.5  # a refused change leaves it
    with pytest.raises(RepositoryError, match="not found"):
        update_router(repo, "rt_missing", "split", traffic_split=0.1)


def test_validation_finds_a_broken_router(repo):
    ABExperiment.create(repo, ExperimentConfig(router_name="rt", model_a="ugt_a", model_b="ugt_b"))
    (repo / "rt" / "1" / "model.py").unlink()
    (repo / "ugt_b" / "config.pbtxt").unlink()
    errors = validate_deployment(repo, "rt")["errors"]
    assert any("model.py missing" in e for e in errors)
    assert any("ugt_b" in e and "not found" in e for e in errors)


# ------------------------------------------------------------------------------ results
ROUTER_METRICS = """\
# TYPE ugt_router_requests_total counter
ugt_router_requests_total{arm="a",model="ugt_a",outcome="success",path="served",router="rt"} 90
ugt_router_requests_total{arm="a",model="ugt_a",outcome="error",path="served",router="rt"} 10
ugt_router_requests_total{arm="b",model="ugt_b",outcome="success",path="shadow",router="rt"} 30
ugt_router_requests_total{arm="b",model="ugt_b",outcome="dropped",path="shadow",router="rt"} 2
ugt_router_requests_total{arm="a",model="x",outcome="success",path="served",router="other"} 7
ugt_router_users_total{arm="a",model="ugt_a",path="served",router="rt"} 90
ugt_router_users_total{arm="b",model="ugt_b",path="shadow",router="rt"} 30
ugt_router_latency_us_count{arm="a",model="ugt_a",path="served",router="rt"} 90
ugt_router_latency_us_sum{arm="a",model="ugt_a",path="served",router="rt"} 180000
ugt_router_latency_us_bucket{arm="a",model="ugt_a",path="served",router="rt",le="1000"} 0
ugt_router_latency_us_bucket{arm="a",model="ugt_a",path="served",router="rt",le="2000"} 45
ugt_router_latency_us_bucket{arm="a",model="ugt_a",path="served",router="rt",le="4000"} 90
ugt_router_latency_us_bucket{arm="a",model="ugt_a",path="served",router="rt",le="+Inf"} 90
ugt_router_shadow_sum{router="rt",stat="users"} 30
ugt_router_shadow_sum{router="rt",stat="recall_overlap"} 24
ugt_router_shadow_sum{router="rt",stat="top1_agreement"} 15
ugt_router_shadow_sum{router="rt",stat="mean_score_diff"} 0.3
"""


def test_percentiles_from_histogram_buckets():
    buckets = [(1000.0, 0), (2000.0, 45), (4000.0, 90), (float("inf"), 90)]
    assert histogram_percentile(buckets, 50) == pytest.approx(2000 + 2000 * 0 / 45 + 2000 * 0.0)
    assert histogram_percentile(buckets, 25) == pytest.approx(1000 + 1000 * 22.5 / 45)
    assert histogram_percentile(buckets, 99) == pytest.approx(2000 + 2000 * (89.1 - 45) / 45)
    assert histogram_percentile([(1.0, 0), (float("inf"), 5)], 99) == 1.0
    assert histogram_percentile([], 50) is None


def test_router_results_read_one_routers_counters():
    r = router_results(ROUTER_METRICS, "rt")
    a = r["arms"]["a"]["served"]
    assert a["requests"] == {"success": 90, "error": 10, "total": 100}
    assert a["users"] == 90 and a["error_rate"] == pytest.approx(0.1)
    assert a["latency_ms"]["mean"] == pytest.approx(2.0) and a["latency_ms"]["count"] == 90
    assert a["latency_ms"]["p50"] == pytest.approx(2.0)
    shadow = r["arms"]["b"]["shadow"]
    assert shadow["requests"]["dropped"] == 2 and shadow["users"] == 30
    assert r["shadow"] == {
        "compared_users": 30,
        "recall_overlap": pytest.approx(0.8),
        "top1_agreement": pytest.approx(0.5),
        "mean_score_diff": pytest.approx(0.01),
    }
    assert router_results(ROUTER_METRICS, "nobody") == {"arms": {}, "shadow": {"compared_users": 0}}


def test_the_report_writes_markdown_json_and_a_plot(tmp_path):
    exp = ExperimentConfig(router_name="rt", model_a="ugt_a", model_b="ugt_b", mode="shadow")
    live = router_results(ROUTER_METRICS, "rt")
    live["arm_statistics"] = {
        "a": {"model": "ugt_a", "success": 100, "fail": 0, "request_ms": 2.1, "queue_ms": 0.4,
              "compute_infer_ms": 1.2, "inference_count": 100, "execution_count": 40},
    }  # fmt: skip
    history = {
        "experiment": "rt",
        "events": [{"time": "t0", "action": "created", "mode": "shadow"}],
    }
    paths = write_experiment_report(tmp_path / "out", exp, history, live)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| A | ugt_a | served | 100 | 90 | 10 |" in text
    assert "recall@K overlap: 0.8000" in text and "| t0 | created | shadow |" in text
    assert (
        json.loads((tmp_path / "out" / "report.json").read_text())["live"]["shadow"][
            "compared_users"
        ]
        == 30
    )
    assert (tmp_path / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert set(paths) == {"markdown", "json", "plot"}
    assert "No live results" in render_markdown(exp, history, None)


# ---------------------------------------------------------------------------------- the CLI
def _cli(*args):
    from typer.testing import CliRunner

    from algorithm.serving.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_the_abtest_commands(repo, tmp_path):
    r = _cli(
        "--json",
        "abtest",
        "create",
        "rt",
        "-a",
        "ugt_a",
        "-b",
        "ugt_b",
        "--split",
        "0.3",
        "-r",
        repo,
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["traffic_split"] == 0.3
    r = _cli("--json", "abtest", "route", "u1", "42", "--router", "rt", "-r", repo)
    assert json.loads(r.stdout) == {
        u: ABTestingRouter("ugt_a", "ugt_b", 0.3, experiment="rt").route(u) for u in ("u1", "42")
    }
    r = _cli("--json", "abtest", "split", "rt", "0.6", "-r", repo)
    assert r.exit_code == 0 and json.loads(r.stdout)["experiment"]["traffic_split"] == 0.6
    r = _cli("--json", "abtest", "split", "rt", "0.25", "--mode", "shadow", "-r", repo)
    assert json.loads(r.stdout)["experiment"]["shadow_fraction"] == 0.25
    for command, status in (("promote", "promoted"), ("stop", "stopped")):
        r = _cli("--json", "abtest", command, "rt", "-r", repo)
        assert json.loads(r.stdout)["experiment"]["status"] == status
    r = _cli("--json", "abtest", "status", "rt", "-r", repo)
    data = json.loads(r.stdout)
    assert data["results"] is None and [e["action"] for e in data["events"]][-2:] == [
        "promoted",
        "stopped",
    ]
    r = _cli("--json", "abtest", "report", "rt", "-r", repo, "-o", tmp_path / "rep")
    assert json.loads(r.stdout)["markdown"].endswith("report.md")
    # errors: one line and a hint, exit 1
    r = _cli("abtest", "create", "rt2", "-a", "ugt_a", "-b", "ugt_missing", "-r", repo)
    assert r.exit_code == 1 and "ugt_missing" in r.output and "hint:" in r.output
    r = _cli("abtest", "status", "rt", "-r", repo, "--url", "127.0.0.1:9", "--metrics-url",
             "http://127.0.0.1:9/metrics")  # fmt: skip
    assert r.exit_code == 1 and "no answer" in r.output


def test_the_load_generator_can_send_user_ids():
    from algorithm.serving.bench.loadgen import Client, make_requests

    reqs = make_requests(4, np.full(8, 16), (1024, 4096, 16384), np.random.default_rng(0), 100)
    assert len(reqs) == 2 and reqs[0]["user_id"].shape == (4, 1)
    assert all(u.startswith(b"user-") for u in reqs[0]["user_id"][:, 0])

    async def names():
        client = Client("localhost:1", "grpc", 1, 1.0)
        try:
            return [(i.name(), i.datatype()) for i in client.inputs(reqs[0])]
        finally:
            await client.close()

    sent = asyncio.run(names())
    assert sent[-1] == ("user_id", "BYTES") and len(sent) == 5
    assert "user_id" not in make_requests(4, np.full(4, 8), (8, 8, 8), np.random.default_rng(0))[0]
