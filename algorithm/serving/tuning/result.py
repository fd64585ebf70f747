"""TuneResult: what a tune measured, what won, and the side-by-side run of the tuned config (the
winner, or when none met the budget the candidate that came closest) and the config it would
replace."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from algorithm.serving.tuning.search import Candidate, Judge


@dataclass
class TuneResult:
    """Every candidate in the order measured (the first is the config as it was: the default),
    the winner (None when no candidate met the budget; then ``closest`` is the one whose P99
    came nearest), the side-by-side rounds, and where the winning config was written."""

    model_name: str
    judge: Judge
    candidates: list[Candidate]
    winner: Candidate | None
    closest: Candidate | None = None
    rounds: list[dict[str, Candidate]] = field(default_factory=list)  # {"default", "tuned"}
    values: dict = field(default_factory=dict)  # the values each setting was searched over
    stopped: str | None = None  # "time budget" when it ended the search early
    written: dict | None = None  # {"config", "previous"} in the repository
    not_written: str | None = None  # why an improved winner was not written
    winner_config: str | None = None  # config.pbtxt text of the winner
    server_config_check: dict | None = None  # the written config, loaded back by the server
    seconds: float = 0.0
    context: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)  # report files

    @property
    def baseline(self) -> Candidate:
        return self.candidates[0]

    @property
    def slo_p99_ms(self) -> float:
        return self.judge.slo_p99_ms

    @property
    def met_budget(self) -> bool:
        return self.winner is not None

    @property
    def improved(self) -> bool:
        """The winner is another config than the one the model had."""
        return self.winner is not None and self.winner.settings != self.baseline.settings

    @property
    def tuned(self) -> Candidate | None:
        """What the same-run rounds compare with the default: the winner, else the closest."""
        return self.winner if self.winner is not None else self.closest

    def side_by_side(self) -> dict | None:
        """The default and the tuned config in the same run (medians over the rounds): throughput
        within the budget (0 in a round where a config met it at no level) and best P99."""
        if not self.rounds:
            return None
        out: dict = {"tuned_met_budget": self.winner is not None}
        for which in ("default", "tuned"):
            thr = [self.judge.throughput(r[which]) or 0.0 for r in self.rounds]
            p99 = [p for p in (self.judge.best_p99(r[which]) for r in self.rounds) if p is not None]
            out[f"{which}_throughput"] = statistics.median(thr)
            out[f"{which}_best_p99_ms"] = statistics.median(p99) if p99 else None
        base = out["default_throughput"]
        out["speedup"] = out["tuned_throughput"] / base if base > 0 else None
        out["rounds"] = len(self.rounds)
        return out

    def summary(self) -> str:
        """One line: the answer."""
        j = self.judge
        sbs = self.side_by_side()
        if self.winner is None:
            c = self.closest
            if c is None:
                return f"no candidate of {self.model_name} could be measured"
            text = (
                f"no setting met P99 <= {j.slo_p99_ms:g} ms: the best P99 was "
                f"{j.best_p99(c):.1f} ms, at {c.settings.label}"
            )
            if sbs and sbs["default_best_p99_ms"] and sbs["tuned_best_p99_ms"]:
                text += (
                    f" (same run: {sbs['tuned_best_p99_ms']:.1f} ms against "
                    f"{sbs['default_best_p99_ms']:.1f} ms of the current config)"
                )
            return text
        w = self.winner
        text = (
            f"{w.settings.label}: {j.throughput(w):.0f} req/s within P99 {j.slo_p99_ms:g} ms"
            f" (P99 {j.best_point(w).latency_p99:.1f} ms)"
        )
        if not self.improved:
            return text + "; the current config is already the best found"
        if sbs and sbs["speedup"] is not None:
            text += f"; x{sbs['speedup']:.2f} the current config in the same run"
        elif sbs:
            text += "; the current config met the budget at no level in the same run"
        if self.not_written:
            text += f"; not written: {self.not_written}"
        return text

    def to_dict(self) -> dict:
        j = self.judge
        rows = []
        for i, c in enumerate(self.candidates):
            best = j.best_point(c)
            rows.append(
                {
                    "index": i,
                    **c.to_dict(),
                    "throughput_within_budget": j.throughput(c),
                    "best_p99_ms": j.best_p99(c),
                    "best_point": best.key if best else None,
                    "meets_budget": best is not None,
                }
            )
        return {
            "model_name": self.model_name,
            "slo_p99_ms": j.slo_p99_ms,
            "max_rejected_percent": j.max_rejected_percent,
            "summary": self.summary(),
            "met_budget": self.met_budget,
            "improved": self.improved,
            "winner": self.candidates.index(self.winner) if self.winner else None,
            "closest": self.candidates.index(self.closest) if self.closest else None,
            "winner_settings": self.winner.settings.to_dict() if self.winner else None,
            "default_settings": self.baseline.settings.to_dict(),
            "candidates": rows,
            "side_by_side": self.side_by_side(),
            "rounds": [{k: c.to_dict() for k, c in r.items()} for r in self.rounds],
            "values": {
                k: [list(v) if isinstance(v, tuple) else v for v in vs]
                for k, vs in self.values.items()
            },
            "stopped": self.stopped,
            "written": self.written,
            "not_written": self.not_written,
            "server_config_check": self.server_config_check,
            "winner_config": self.winner_config,
            "seconds": round(self.seconds, 1),
            "context": self.context,
            "paths": self.paths,
        }


__all__ = ["TuneResult"]
