"""A/B tests and shadow traffic between two served models (module guide 10.4, and beyond it).

``ABTestingRouter(model_a, model_b, traffic_split=0.5).route(user_id)`` is the guide's router:
it names the model that serves a user. It routes with ``traffic.bucket`` (a stable BLAKE2b of
the experiment's salt and the user id), never with Python's per-process ``hash()``, so the
answer is the same in every process, on every Python version and after restarts.

Routing a client is not enough when every client must be routed alike. ``ABExperiment`` puts
the router inside Triton: a router model in the repository (``triton/routing.py`` writes it,
``triton/python_model/router.py`` runs it) that takes the arms' inputs plus ``user_id`` and
answers with the serving arm's outputs plus ``arm``. The in-server router and
``ABTestingRouter`` use the same function, so a client can predict its arm.

    exp = ABExperiment.create("model_repository", ExperimentConfig(
        router_name="ugt_router", model_a="ugt_recommend", model_b="ugt_candidate",
        mode="shadow", shadow_fraction=0.2),
        url="localhost:8000", metrics_url="http://localhost:8002/metrics")
    exp.set_split(traffic_split=0.9, mode="ab")   # 90 % of users on A, 10 % on B
    exp.report("abtest-report")                    # report.md, report.json, report.png
    exp.promote()                                   # everyone on B; or exp.stop(): everyone on A

Each change is one atomic rewrite of the router's config.pbtxt; with ``url`` (a server in
explicit model-control mode) the router is reloaded at once, and Triton swaps router instances
with no failed request. A server in poll mode picks the change up on its next poll.
"""

from __future__ import annotations

import logging
from pathlib import Path

from algorithm.errors import ConfigError, RepositoryError
from algorithm.serving.bench.experiment import collect, write_experiment_report
from algorithm.serving.config import ExperimentConfig, check_name
from algorithm.serving.security import read_admin_key
from algorithm.serving.traffic import UserIdError, goes_to_a
from algorithm.serving.triton.admin import request_model_load
from algorithm.serving.triton.routing import (
    read_experiment,
    read_history,
    update_router,
    write_router,
)
from algorithm.serving.triton.validation import validate_deployment

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = ExperimentConfig.router_name  # a router's salt unless it names another


class ABTestingRouter:
    """Names the model that serves a user (guide 10.4), with a stable hash.

    ``traffic_split`` is model A's share of users, in [0, 1]. ``experiment`` (or ``salt``)
    keeps experiments independent: the same user may be in A in one and in B in another. The
    default agrees with a router created with the default name; ``from_repository`` reads a
    router's own settings."""

    def __init__(
        self,
        model_a: str,
        model_b: str,
        traffic_split: float = 0.5,
        experiment: str = DEFAULT_EXPERIMENT,
        salt: str = "",
    ):
        for field, value in (("model_a", model_a), ("model_b", model_b)):
            if not isinstance(value, str) or not value:
                raise ConfigError(field, value, "a model name")
        if (
            isinstance(traffic_split, bool)
            or not isinstance(traffic_split, (int, float))
            or not 0.0 <= traffic_split <= 1.0
        ):
            raise ConfigError("traffic_split", traffic_split, "a number in [0, 1]: A's share")
        if not isinstance(salt, str) or not isinstance(experiment, str):
            raise ConfigError("salt", salt, "text")
        self.model_a = model_a
        self.model_b = model_b
        self.traffic_split = float(traffic_split)
        self.experiment = experiment
        self.salt = salt or experiment

    def route(self, user_id: str | int) -> str:
        """The model that serves ``user_id`` (a str or an int; 42 and "42" are one user)."""
        return self.model_a if self.arm(user_id) == "a" else self.model_b

    def arm(self, user_id: str | int) -> str:
        """ "a" or "b" for ``user_id``."""
        try:
            return "a" if goes_to_a(user_id, self.traffic_split, self.salt) else "b"
        except UserIdError as e:
            raise ConfigError("user_id", user_id, str(e)) from None

    @classmethod
    def from_experiment(cls, exp: ExperimentConfig) -> ABTestingRouter:
        """The router that answers as ``exp``'s router model does: its split in A/B mode; all
        users on A in shadow mode or once stopped, on B once promoted."""
        split = exp.traffic_split if exp.mode == "ab" else 1.0
        split = {"promoted": 0.0, "stopped": 1.0}.get(exp.status, split)
        return cls(exp.model_a, exp.model_b, split, experiment=exp.name, salt=exp.hash_salt)

    @classmethod
    def from_repository(cls, repository, router_name: str = DEFAULT_EXPERIMENT):
        return cls.from_experiment(read_experiment(repository, router_name))

    def __repr__(self) -> str:
        return (
            f"ABTestingRouter({self.model_a!r}, {self.model_b!r}, "
            f"traffic_split={self.traffic_split}, salt={self.salt!r})"
        )


class ABExperiment:
    """One experiment's router in a model repository, and the server that runs it.

    ``url`` is the server's HTTP endpoint (host:port): with it every change reloads the
    router (explicit model control) and ``results`` / ``report`` read the arms' statistics;
    ``metrics_url`` is its metrics page. ``headers`` go with the statistics requests (e.g. an
    admin key on a server that restricts them)."""

    def __init__(
        self,
        repository,
        router_name: str = DEFAULT_EXPERIMENT,
        url: str | None = None,
        metrics_url: str | None = None,
        headers: dict | None = None,
    ):
        self.repository = Path(repository)
        self.router_name = check_name("router_name", router_name)
        self.url, self.metrics_url, self.headers = url, metrics_url, headers

    @classmethod
    def create(cls, repository, config: ExperimentConfig, url: str | None = None, **kw):
        """Write the router of ``config`` into ``repository`` (both arms must be there with the
        same inputs and outputs), check it with ``validate_deployment`` and, with ``url``,
        load it on the server."""
        write_router(repository, config)
        result = validate_deployment(repository, config.router_name)
        if not result["valid"]:
            raise RepositoryError("; ".join(result["errors"]))
        exp = cls(repository, config.router_name, url=url, **kw)
        exp.reload()
        return exp

    # -- the experiment --------------------------------------------------------------------
    @property
    def config(self) -> ExperimentConfig:
        return read_experiment(self.repository, self.router_name)

    @property
    def history(self) -> dict:
        return read_history(self.repository, self.router_name)

    def router(self) -> ABTestingRouter:
        """A client-side router that agrees with the served one."""
        return ABTestingRouter.from_experiment(self.config)

    def reload(self) -> str:
        """Ask the server (``url``) to load the router's current config."""
        if not self.url:
            return "not requested (a server in poll mode picks it up; explicit mode needs a url)"
        # a server whose admin APIs are restricted needs the key ($TRITON_ADMIN_KEY[_FILE])
        request_model_load(self.url, self.router_name, admin_key=read_admin_key())
        return f"reloaded on {self.url}"

    def _change(self, action: str, **changes) -> dict:
        exp = update_router(self.repository, self.router_name, action, **changes)
        return {"experiment": exp.to_dict(), "server": self.reload()}

    def set_split(
        self,
        traffic_split: float | None = None,
        shadow_fraction: float | None = None,
        mode: str | None = None,
    ) -> dict:
        """Change A's share of users (A/B), the mirrored share (shadow) and/or the mode; routing
        by them (re)starts (status "running"). Users only move towards the arm that grows."""
        changes = {
            k: v
            for k, v in (
                ("traffic_split", traffic_split),
                ("shadow_fraction", shadow_fraction),
                ("mode", mode),
            )
            if v is not None
        }
        if not changes:
            raise ConfigError("split", None, "a traffic_split, a shadow_fraction or a mode")
        return self._change("split", status="running", **changes)

    def promote(self) -> dict:
        """Send every user to B (status "promoted") in one atomic change."""
        return self._change("promoted", status="promoted")

    def stop(self) -> dict:
        """Send every user to A and mirror nothing (status "stopped")."""
        return self._change("stopped", status="stopped")

    # -- results ---------------------------------------------------------------------------
    def results(self) -> dict | None:
        """Live per-arm results (``bench/experiment.py``), or None without ``url`` and
        ``metrics_url``."""
        if not (self.url and self.metrics_url):
            return None
        return collect(self.config, self.url, self.metrics_url, self.headers)

    def status(self) -> dict:
        """The experiment, its history and (with a server) its live results."""
        exp = self.config
        return {
            "experiment": exp.to_dict(),
            "events": self.history.get("events", []),
            "results": self.results(),
        }

    def report(self, output_dir) -> dict:
        """report.md + report.json (+ report.png with live results) in ``output_dir``."""
        return write_experiment_report(output_dir, self.config, self.history, self.results())


__all__ = ["ABExperiment", "ABTestingRouter"]
