"""PyTorch: the eager reference (CPU or CUDA) and, on CUDA, the fast GpuEngine; ModelWrapper
adapts a model to the flat four-tensor signature that ONNX and AOT export trace."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from algorithm.errors import ConfigError
from algorithm.serving.contract import INPUT_NAMES
from algorithm.serving.runtime import existing

logger = logging.getLogger(__name__)


class TorchRunner:
    """A UGTModel on CPU or CUDA: eager PyTorch (the reference), or the fast GpuEngine.

    ``engine``: None = the engine on CUDA, eager elsewhere; True/False; or a
    ``gpu.EngineConfig`` (or its dict). ``batching`` says how ``infer_requests`` combines
    requests of different lengths: "length_aware" packs their valid tokens (no padding; sorted
    and split by the engine's user/token limits), "pad" pads them all to the longest (the
    baseline a static-shape engine has). ``warmup`` (batch, seq_len) pairs are run once at load
    so their CUDA graphs are captured before the first request.
    """

    name = "torch"

    def __init__(
        self,
        model,
        device: str = "cpu",
        dtype: str = "fp32",
        engine=None,
        batching: str = "length_aware",
        warmup=(),
    ):
        self.torch = torch
        self.device = torch.device(device)
        if dtype not in ("fp32", "fp16", "bf16"):
            raise ConfigError("dtype", dtype, "one of fp32, fp16, bf16")
        if batching not in ("length_aware", "pad"):
            raise ConfigError("batching", batching, "'length_aware' or 'pad'")
        self.batching = batching
        if engine is None:
            engine = self.device.type == "cuda"
        self.engine = None
        self.launch_laps: dict | None = None  # profile_launches()
        if engine is not False:
            from algorithm.serving.runtime.gpu.engine import EngineConfig, GpuEngine

            if engine is True:
                engine = EngineConfig(dtype=dtype)
            elif isinstance(engine, dict):
                engine = EngineConfig(**{"dtype": dtype, **engine})
            if batching == "pad":
                engine = dataclasses.replace(engine, layout="padded")
            self.engine = GpuEngine(model, engine, self.device)
        else:
            torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
                dtype
            ]
            self.model = model.to(self.device, torch_dtype).eval()
        if warmup:
            self.warmup(warmup)

    @classmethod
    def from_checkpoint(
        cls,
        path,
        device: str = "cpu",
        dtype: str = "fp32",
        engine=None,
        batching: str = "length_aware",
        warmup=(),
    ) -> TorchRunner:
        from algorithm.ugt import UGTModel

        model = UGTModel.load(existing(path))
        return cls(
            model, device=device, dtype=dtype, engine=engine, batching=batching, warmup=warmup
        )

    def warmup(self, spec) -> int:
        """Serve synthetic requests so the shapes they need are captured before real traffic.

        ``spec`` items: ``[batch, seq_len]`` (batch single-row full-length requests, as a dynamic
        batch of them arrives) or ``{"lognormal": [median, sigma, max], "coverage": c,
        "max_users": u}`` (mixed lengths: the graphs of the engine's layout, packed or padded,
        that cover ``c`` of the dynamic batches of 1..u such histories, see
        ``gpu.batch.mix_warmup_lengths``). Returns the engine's captured graphs (0 when eager).
        """
        from algorithm.serving.runtime.gpu.batch import mix_warmup_lengths

        rng = np.random.default_rng(0)
        sizes = (1024, 4096, 16384)
        if self.engine is not None:
            sizes = self.engine.sizes
        config = self.engine.model_config if self.engine is not None else self.model.config
        limit = config.max_seq_length
        for item in spec or ():
            if isinstance(item, dict):
                median, sigma, longest = item["lognormal"]
                runs = mix_warmup_lengths(
                    median,
                    sigma,
                    int(longest),
                    coverage=float(item.get("coverage", 0.995)),
                    max_users=int(item.get("max_users", 64)),
                    layout=self.engine.config.layout if self.engine is not None else "packed",
                )
            else:
                b, n = (int(v) for v in item)
                runs = [[n] * b]
            for lengths in runs:
                # A mix's single history gets one masked position after it: a batch without
                # padding would take the dense route, keyed by its exact width, not the
                # packed bucket that real single histories of the mix reach once frozen.
                tail = isinstance(item, dict) and len(lengths) == 1 and lengths[0] < limit
                reqs = []
                for n in lengths:
                    req = {
                        name: rng.integers(0, c, (1, n + tail))
                        for name, c in zip(INPUT_NAMES[:3], sizes, strict=True)
                    }
                    req["attention_mask"] = np.ones((1, n + tail), dtype=np.int64)
                    req["attention_mask"][0, n:] = 0
                    reqs.append(req)
                self.infer_requests(reqs)
        if self.engine is None:
            return 0
        self.engine.freeze_graphs()
        return self.engine.graph_count

    def infer_torch(self, inputs: dict) -> dict:
        """Tensors in (any device), tensors out on the runner's device: no host copies of data.

        (The engine reads the B per-user lengths back to pick its layout; that is the only sync.)
        """
        torch = self.torch
        args = [inputs[k] for k in INPUT_NAMES]
        if self.engine is not None:
            recs, scores = self.engine(*args)
        else:
            with torch.inference_mode():
                recs, scores = self.model(*(a.to(self.device, torch.int64) for a in args))
        return {"recommendations": recs, "scores": scores.float()}

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = {k: torch.as_tensor(np.asarray(inputs[k], dtype=np.int64)) for k in INPUT_NAMES}
        out = self.infer_torch(args)
        return {k: v.cpu().numpy() for k, v in out.items()}

    def infer_requests(self, requests: list[dict], output: str = "numpy") -> list[dict]:
        """One output dict per request, in order, for requests of any lengths (Triton's batch).

        ``output``: "numpy" (host arrays) or "torch" (tensors left on the runner's device).
        """
        if not requests:
            return []
        from algorithm.serving.runtime.gpu.batch import FlatBatch

        batch = FlatBatch.from_requests(requests)
        recs, scores = self._infer_flat(batch, host=output == "numpy")
        if output == "numpy":
            recs, scores = recs.numpy(), scores.numpy()
        results, start = [], 0
        for r in batch.rows.tolist():
            results.append(
                {"recommendations": recs[start : start + r], "scores": scores[start : start + r]}
            )
            start += r
        return results

    def infer_batch(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """(recs int64 [users, K, 3], scores fp32 [users, K]) on the host for every row of a
        ``gpu.batch.FlatBatch`` (all requests of a Triton dynamic batch), rows in order: one
        layout on the host, one copy in, one forward, one copy out per output."""
        recs, scores = self._infer_flat(batch, host=True)
        return recs.numpy(), scores.numpy()

    def infer_batch_async(self, batch) -> PendingBatch:
        """``infer_batch`` that returns once the work is queued on the device: the layout is
        built and staged on the host, the copies in, the forward and the copies out (to pinned
        host memory) are queued on the engine's stream, and ``PendingBatch.result()`` waits for
        them. The caller may prepare the next batch meanwhile; this one's host inputs are no
        longer read after the call. Without a CUDA device the work is done in the call."""
        torch = self.torch
        if self.device.type != "cuda":
            recs, scores = self._infer_flat(batch, host=True)
            return PendingBatch(recs, scores, None)
        with torch.cuda.device(self.device):
            recs, scores = self._infer_flat(batch, host="async")
            t = time.perf_counter()
            blocking = self.engine is not None and self.engine.config.blocking_sync
            event = torch.cuda.Event(blocking=blocking)
            event.record(torch.cuda.current_stream(self.device))
            self._lap("event", t)
        return PendingBatch(recs, scores, event)

    def profile_launches(self) -> dict:
        """From now on ``infer_batch_async`` sums its host seconds per step into the returned
        dict (model.py's phase_stats report them): "layout", "stage_wait" (of that, waiting for
        the staging buffer's last copy), "run" (copies in, replay and copies out queued) and
        "event". Its keys are all there from the start, so another thread may copy it while
        batches are launched."""
        self.launch_laps = dict.fromkeys(("layout", "stage_wait", "run", "event"), 0.0)
        return self.launch_laps

    def _lap(self, name: str, since: float) -> float:
        """Add the time since ``since`` to ``launch_laps[name]`` (when profiling); returns now."""
        now = time.perf_counter()
        laps = self.launch_laps
        if laps is not None:
            laps[name] += now - since
        return now

    def _infer_flat(self, batch, host: bool | str):
        from algorithm.serving.runtime.gpu.batch import to_host

        torch = self.torch
        if self.engine is None:
            out = self.infer_torch(
                {k: torch.from_numpy(v) for k, v in zip(INPUT_NAMES, batch.padded(), strict=True)}
            )
            recs, scores = out["recommendations"], out["scores"]
            if not host:
                return recs, scores
            return to_host(recs, host), to_host(scores, host)
        engine = self.engine
        groups = self._groups(batch)
        if len(groups) == 1:
            staging = engine.layouts.staging
            t, waited = time.perf_counter(), staging.waited_s
            tokens = engine.tokens_from_batch(batch)
            t = self._lap("layout", t)
            if self.launch_laps is not None:
                self.launch_laps["stage_wait"] += staging.waited_s - waited
            out = engine.run(tokens, batch.users, host=host)
            self._lap("run", t)
            return out
        # several forwards (more users or tokens than one takes): rows back in request order
        first = np.zeros(len(batch.rows) + 1, dtype=np.int64)
        np.cumsum(batch.rows, out=first[1:])
        parts, where = [], []
        on_device = host == "async"  # the parts stay on the device, one copy out at the end
        for group in groups:
            sub = batch.subset(group)
            parts.append(
                engine.run(engine.tokens_from_batch(sub), sub.users, host=not on_device and host)
            )
            where.extend(np.arange(first[i], first[i + 1]) for i in group)
        index = torch.from_numpy(np.concatenate(where))
        out = []
        for k in range(2):
            cat = torch.cat([p[k] for p in parts])
            dst = torch.empty_like(cat)
            dst[index.to(cat.device)] = cat
            out.append(to_host(dst, host) if on_device else dst)
        return out[0], out[1]

    def _groups(self, batch) -> list[list[int]]:
        """Request indices per forward (engine.config's max_users / max_tokens)."""
        from algorithm.serving.runtime.gpu.batch import group_requests

        cfg = self.engine.config
        n, packed = len(batch.rows), self.batching == "length_aware"
        # an upper bound on the cost (packed: every position valid; padded: users x longest)
        bound = batch.values.shape[1] if packed else batch.users * int(batch.seq.max())
        if batch.users <= cfg.max_users and bound <= cfg.max_tokens:
            return [list(range(n))]
        if packed:
            row_len = batch.row_lengths(batch.valid(self.engine.sizes))
            firsts = np.concatenate([[0], np.cumsum(batch.rows)[:-1]])
            lengths = np.maximum.reduceat(np.maximum(row_len, 1), firsts).tolist()
        else:
            lengths = batch.seq.tolist()
        return group_requests(
            lengths,
            cfg.max_users,
            cfg.max_tokens,
            padded=not packed,
            rows=batch.rows.tolist(),
            sort=packed,
        )


class PendingBatch:
    """The outputs of a batch queued on the device (``TorchRunner.infer_batch_async``)."""

    __slots__ = ("recs", "scores", "event")

    def __init__(self, recs, scores, event):
        self.recs, self.scores, self.event = recs, scores, event

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(recs int64 [users, K, 3], scores fp32 [users, K]) on the host; waits for the device
        (the wait releases the GIL, so other threads of the process run meanwhile)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.recs.numpy(), self.scores.numpy()


class ModelWrapper(torch.nn.Module):
    """Adapts a model to the flat ONNX signature: 4 int64 tensors in, (int64 recs, fp32 scores) out.

    Accepts models whose forward takes the four tensors and returns a tuple/list or a dict with
    ``recommendations`` and ``scores``.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, encoder_l1_ids, encoder_l2_ids, encoder_l3_ids, attention_mask):
        out = self.model(encoder_l1_ids, encoder_l2_ids, encoder_l3_ids, attention_mask)
        if isinstance(out, dict):
            recs, scores = out["recommendations"], out["scores"]
        else:
            recs, scores = out[0], out[1]
        return recs.to(torch.int64), scores.to(torch.float32)
