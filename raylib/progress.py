"""Live progress from rank 0 to the driver: a tiny Ray actor and a printer thread.

Ray Train hands metrics to the driver only with checkpoints, so per-step progress takes its
own path: rank 0 sends fire-and-forget events to `ProgressSink`; the driver drains it twice
a second, draws a bar (tqdm on a terminal, plain lines in logs such as `ray job logs`) and
appends every event to `<output.dir>/metrics.jsonl`.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import ray


@ray.remote(num_cpus=0)
class ProgressSink:
    def __init__(self):
        self._events: list[dict] = []

    def push(self, event: dict) -> None:
        self._events.append({**event, "time": time.time()})

    def drain(self) -> list[dict]:
        events, self._events = self._events, []
        return events


def _workers(e: dict) -> str:
    """'; 2 workers on cpu, 1 torch thread each' (from the start event, when it says)."""
    if "device" not in e:
        return ""
    n, threads = e.get("world_size", 1), e.get("torch_threads")
    text = f"; {n} worker{'s' if n != 1 else ''} on {e['device']}"
    if threads:
        text += f", {threads} torch thread{'s' if threads != 1 else ''}" + (" each" if n != 1 else "")
    return text


class ProgressPrinter:
    def __init__(self, sink, metrics_path: str | None, enabled: bool = True, stream=None, listeners=()):
        self.sink, self.metrics_path, self.enabled = sink, metrics_path, enabled
        self.listeners = list(listeners)  # e.g. raylib.tracking.Tracker: called with every event
        self.stream = stream or sys.stderr
        self.start_event: dict | None = None
        self.last_step: dict | None = None
        self.evals: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="raylib-progress")
        self._bar = None
        self._printed_step = 0

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()  # events that arrived after the last tick
        if self._bar is not None:
            self._bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()

    def _poll(self) -> None:
        try:
            events = ray.get(self.sink.drain.remote(), timeout=10)
        except Exception:  # the driver is shutting down; progress is best effort
            return
        if not events:
            return
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                for e in events:
                    f.write(json.dumps(e, default=str) + "\n")
        for e in events:
            self._show(e)
            for listener in self.listeners:
                listener(e)

    def _show(self, e: dict) -> None:
        kind = e.get("type")
        if kind == "start":
            self.start_event = e
            if self.enabled:
                resumed = f", resumed from step {e['step']}" if e.get("resumed_from") else ""
                before = e.get("eval_loss_before")
                before = f"{before:.4f}" if isinstance(before, float) else "n/a"
                self._write(
                    f"training: {e['trainable_params']:,} trainable / {e['total_params']:,} params; "
                    f"data: {e['data']}; {e['total_steps']} steps{resumed}; eval loss before: {before}"
                    f"{_workers(e)}"
                )
        elif kind == "step":
            self.last_step = e
            if self.enabled:
                self._show_step(e)
        elif kind == "eval":
            self.evals.append(e)
            if self.enabled and e.get("eval_loss") is not None:
                if "eval_reward_accuracy" in e:  # preference objectives
                    detail = f"reward accuracy {e['eval_reward_accuracy']:.3f}, margin {e['eval_reward_margin']:.3f}"
                elif "eval_accuracy" in e:  # classification
                    detail = f"accuracy {e['eval_accuracy']:.3f}, macro-F1 {e.get('eval_macro_f1', 0):.3f}"
                else:
                    detail = f"token accuracy {e.get('eval_token_accuracy', 0):.3f}"
                self._write(f"step {e['step']}: eval loss {e['eval_loss']:.4f}, {detail}")
            if self.enabled and e.get("stopped_early"):
                self._write(f"step {e['step']}: early stopping: {e['stopped_early']}")

    def _show_step(self, e: dict) -> None:
        postfix = f"loss={e['loss']:.4f} lr={e['lr']:.2e} tok/s={e['tokens_per_s']:,.0f}"
        if self.stream.isatty():
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=e["total_steps"], initial=e["step"] - 1, unit="step", file=self.stream, dynamic_ncols=True)
            self._bar.update(e["step"] - self._bar.n)
            self._bar.set_postfix_str(postfix)
        else:  # logs: a line every ~5% of the run
            every = max(1, e["total_steps"] // 20)
            if e["step"] - self._printed_step >= every or e["step"] == e["total_steps"]:
                self._printed_step = e["step"]
                self._write(f"step {e['step']}/{e['total_steps']} {postfix}")

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)
