"""`raylib cem`: Transformer² few-shot adaptation by the cross-entropy method over the
mixing weights α of SVF experts (z_mix = 1 + Σₖ αₖ·(zₖ − 1), `svf.mix`; one α per expert or
per expert and layer).

Each iteration samples a population of α from a Gaussian (clipped to `bounds`), scores
every candidate on the few-shot rows, and refits mean/std on the elite fraction. The first
population also holds the anchors: each expert alone (one-hot α), the base model (α = 0) and
the uniform mix.

The result is the best-scoring candidate, with one guard against the winner's curse: scored
on a few dozen rows, the best of fifty candidates beats the best single expert partly by
luck. So a mix replaces the best single expert (or the base) only if its per-row gain over
it on the same rows is significant at `confidence` (a one-sided paired test,
`required_gain_z`); otherwise that anchor is the result. It is one test of the best mix, not
corrected for the ~50 mixes tried. Measured on jobs/bench/svf_quality.py's unseen task (96
few-shot rows, seeds 0-2, two sets of experts A and B), CEM's mean exact match on the test
set against the best single expert's 0.367:

    confidence            z needed   A (best mix z 2.28 / 1.19 / 2.6)   B (z 0.36 / 1.19 / 2.6)
    0 (best score wins)   0          0.393                              0.390
    0.8 (the default)     0.84       0.393                              0.402
    0.95                  1.64       0.372                              0.380
    Bonferroni, 44 mixes  3.05       0.365                              0.365

The mixes at z 1.19 and 2.6 were better on the test set (0.42 against 0.36 and 0.375), the
ones at 2.28 (A) and 0.36 (B) worse (0.34 and 0.33 against 0.365): a strict test keeps the
single expert, or the base, when a mix was the better answer. Few-shot rows must be samples
of the new task: on rows of the experts' own training prompts, mixes 2.3 standard errors
ahead of the best single expert were behind it on the task, and on 24 such rows a mix at
0.54 scored 0.27 on the test set against 0.36.

Parallelism: plain Ray actors (`CandidateScorer`), each loading the base model, applying
SVF and loading the experts' z vectors once; candidates only change z in place, so no
model is reloaded per candidate. A population is split into contiguous chunks, one per
actor, and gathered in order. Tune would add a trial (and a model load) per candidate;
actors give the same parallelism with one load per actor. Scores do not depend on the
number of actors (each actor uses one torch thread, greedy decoding), so the same seed
gives the same α on 1 or N actors.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from raylib.errors import ConfigError


class CEMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    population: PositiveInt = 16
    elite_frac: float = Field(0.25, gt=0, le=1)
    iterations: PositiveInt = 5
    init_std: float = Field(0.5, gt=0)
    min_std: float = Field(1e-3, ge=0)
    seed: int = 0
    bounds: tuple[float, float] = (-1.0, 2.0)
    per_layer: bool = False
    score: str = Field("exact_match", description="exact_match or any reward name / module:function")
    loglik_weight: float = Field(0.0, ge=0, description="adds weight × mean log-likelihood of the answers")
    confidence: float = Field(0.8, ge=0, lt=1, description="how sure a mix must be to beat the best anchor (single "
                              "expert or base): a one-sided paired test over the rows; 0: the best score wins")
    max_new_tokens: PositiveInt = 16
    actors: PositiveInt | None = Field(None, description="scoring actors; default: the cluster's CPUs (≤ population)")
    domain: str = "cem"

    @model_validator(mode="after")
    def _check(self) -> "CEMOptions":
        if self.bounds[0] >= self.bounds[1]:
            raise ValueError(f"bounds must be (low, high) with low < high, got {self.bounds}")
        return self


@dataclass
class CEMResult:
    alphas: list  # [K] or [K][L]
    score: float
    expert_dir: str
    history: list[dict] = field(default_factory=list)
    single_expert_scores: dict[str, float] = field(default_factory=dict)
    base_score: float | None = None
    selected: str = "mix"  # "mix", "base" or the expert dir that was kept
    best_mix: dict = field(default_factory=dict)  # the best mix seen: alphas, score, gain_z over the best anchor
    required_gain_z: float = 0.0  # the gain_z a mix needed (`confidence`)
    wall_time_s: float = 0.0


# --------------------------------------------------------------------------- preflight


def preflight(expert_dirs: list[str], fewshot: str, opts: CEMOptions) -> tuple[dict, list[dict]]:
    """Experts are SVF experts of one base model; the few-shot file has usable rows."""
    from raylib.data import load_rows
    from raylib.experts import read_expert
    from raylib.objectives import rewards

    if len(expert_dirs) < 2:
        raise ConfigError("--experts", "CEM mixes at least two experts", "pass two or more expert directories")
    if opts.population < len(expert_dirs) + 2:
        raise ConfigError("--population", f"{opts.population} candidates cannot hold the {len(expert_dirs) + 2} the "
                          "first iteration starts from (each expert alone, the base model, the uniform mix)",
                          f"use --population {len(expert_dirs) + 2} or more (default 16)")
    infos = []
    for d in expert_dirs:
        try:
            info = read_expert(d)
        except FileNotFoundError as exc:
            raise ConfigError("--experts", str(exc), "pass directories written by raylib train (with expert.json)") from None
        if info.method != "svf":
            raise ConfigError("--experts", f"{d} is a {info.method!r} expert; CEM mixes SVF z vectors",
                              "train the experts with method.name: svf")
        infos.append(info)
    bases = {i.base_model for i in infos}
    if len(bases) > 1:
        raise ConfigError("--experts", f"the experts come from different base models: {sorted(bases)}", "mix experts of one base")
    rows = [r for r in load_rows(fewshot, "--fewshot") if r.get("instruction") and r.get("output") not in (None, "")]
    if not rows:
        raise ConfigError("--fewshot", f"{fewshot} has no rows with instruction and output", "give JSONL rows like the training data")
    if opts.score != "exact_match":
        rewards.resolve(opts.score)  # raises ConfigError for an unknown name
    return {"base_model": infos[0].base_model, "template": infos[0].template}, rows


# --------------------------------------------------------------------------- scoring actor


class CandidateScorer:
    """Holds the base model with SVF applied and the experts' z vectors; scores α vectors."""

    def __init__(self, base_model: str, expert_dirs: list[str], rows: list[dict], template: str, opts: dict):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from raylib.methods import svf
        from raylib.noise import quiet_libraries

        quiet_libraries()  # no weight-loading progress bars in the driver's log
        torch.set_num_threads(1)  # results must not depend on how many actors share the machine
        self.opts = CEMOptions.model_validate(opts)
        self.rows, self.template = rows, template
        self.tokenizer = AutoTokenizer.from_pretrained(expert_dirs[0] if os.path.isfile(
            os.path.join(expert_dirs[0], "tokenizer_config.json")) else base_model)
        self.model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        cfg = svf.read_svf_config(expert_dirs[0])
        svf.apply_svf(self.model, cfg["targets"], cfg.get("layers"), forward="rebuild", model_path=base_model)
        self.model.eval()
        self.zs = svf.load_experts(expert_dirs)
        self.reward = None
        if self.opts.score != "exact_match":
            from raylib.objectives import rewards

            self.reward = rewards.resolve(self.opts.score)

    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def score(self, candidates: list) -> list[dict]:
        from raylib.methods import svf

        out = []
        for alphas in candidates:
            svf.set_z(self.model, svf.mix(self.zs, alphas))
            out.append(self._score_current())
        return out

    def _score_current(self) -> dict:
        """{"score", "task", "loglik", "rows"}: `rows` holds each row's score (task + weight ×
        that row's mean answer log-likelihood), `score` their mean."""
        from raylib import evaluation

        prompts = evaluation.prompts_for(self.rows, self.template, self.tokenizer)
        answers = evaluation.generate(self.model, self.tokenizer, prompts, self.opts.max_new_tokens)
        if self.reward is None:
            task = [float(a == str(r["output"]).strip()) for a, r in zip(answers, self.rows)]
        else:
            from raylib.objectives import rewards

            task = [float(x) for x in rewards.score(self.reward, self.opts.score, answers, self.rows)]
        loglik = self._loglik(prompts) if self.opts.loglik_weight else [0.0] * len(task)
        rows = [t + self.opts.loglik_weight * ll for t, ll in zip(task, loglik)]
        n = len(rows)
        return {"score": sum(rows) / n, "task": sum(task) / n, "loglik": sum(loglik) / n, "rows": rows}

    def _loglik(self, prompts: list[str]) -> list[float]:
        """Per row, the mean per-token log-likelihood of the reference answer (teacher forcing)."""
        import torch
        import torch.nn.functional as F

        out = []
        with torch.no_grad():
            for prompt, row in zip(prompts, self.rows):
                p = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
                a = self.tokenizer(str(row["output"]), add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p + a])
                logits = self.model(input_ids=ids, use_cache=False).logits[0, len(p) - 1 : -1].float()
                out.append(-F.cross_entropy(logits, torch.tensor(a), reduction="mean").item())
        return out


def paired_gain_z(rows: list[float], anchor_rows: list[float]) -> float:
    """How many standard errors a candidate's mean per-row gain over an anchor is, on the same
    rows (a paired z statistic; +inf when every row gains the same positive amount)."""
    import math

    diffs = [a - b for a, b in zip(rows, anchor_rows)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return math.inf if mean > 0 else (-math.inf if mean < 0 else 0.0)
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    if var == 0:
        return math.inf if mean > 0 else (-math.inf if mean < 0 else 0.0)
    return mean / math.sqrt(var / n)


def required_gain_z(confidence: float) -> float:
    """The paired z the best mix needs over the best anchor: one-sided at `confidence` (0: any
    gain). One test of the best mix, not corrected for the mixes tried: see the module docstring."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(confidence) if confidence > 0 else 0.0


def select(scored: list[dict], n_anchors: int, min_gain_z: float) -> tuple[dict, dict | None]:
    """The result among `scored` candidates ({"score", "rows", ...}; the first `n_anchors` are
    the single experts and the base): the best anchor, unless a mix beats it by `min_gain_z`
    standard errors (`paired_gain_z`); then the best-scoring such mix. Ties keep the earlier
    candidate. Also returns the best-scoring mix, significant or not (None without mixes)."""
    def best_of(cands):
        return max(cands, key=lambda c: c["score"], default=None)  # max keeps the first of equals

    anchor = best_of(scored[:n_anchors])
    mixes = scored[n_anchors:]
    for m in mixes:
        m["gain_z"] = paired_gain_z(m["rows"], anchor["rows"])
    significant = [m for m in mixes if m["score"] > anchor["score"] and m["gain_z"] >= min_gain_z]
    return best_of(significant) or anchor, best_of(mixes)


# --------------------------------------------------------------------------- the search


def run_cem(expert_dirs: list[str], fewshot: str, out_dir: str, opts: CEMOptions, address: str | None = None) -> CEMResult:
    import numpy as np
    import ray

    from raylib import launch

    from raylib import storage
    from raylib.experts import EXPERT_FILE, resolve_expert

    # experts may be URIs (s3://.../run): fetched once into the local expert cache
    sources = [d if storage.is_uri(d) else os.path.abspath(d) for d in expert_dirs]
    expert_dirs = [resolve_expert(d, "--experts") for d in expert_dirs]
    meta, rows = preflight(expert_dirs, fewshot, opts)
    out_loc = storage.resolve(out_dir, "--out")
    storage.probe(out_loc, "--out")
    out_dir = storage.staging_dir(out_loc)  # a URI: written locally, uploaded at the end
    os.makedirs(out_dir, exist_ok=True)
    launch.connect(address)

    n_actors = opts.actors or max(1, min(int(ray.cluster_resources().get("CPU", 1)), opts.population))
    actor_cls = ray.remote(num_cpus=1)(CandidateScorer)
    actors = [actor_cls.remote(meta["base_model"], expert_dirs, rows, meta["template"], opts.model_dump())
              for _ in range(n_actors)]
    try:
        n_layers = ray.get([a.num_layers.remote() for a in actors])[0]  # every actor has loaded its model
        started = time.time()  # the search itself, without model loading
        k = len(expert_dirs)
        n_layers = n_layers if opts.per_layer else 1
        shape = (k, n_layers) if opts.per_layer else (k,)
        rng = np.random.default_rng(opts.seed)
        mean = np.full(shape, 1.0 / k)
        std = np.full(shape, opts.init_std)
        lo, hi = opts.bounds
        n_elite = max(1, int(round(opts.elite_frac * opts.population)))
        best_so_far = -np.inf
        history, scored = [], []  # scored: every candidate, anchors first (the singles, then the base)

        def evaluate(cands: np.ndarray) -> list[dict]:
            chunks = np.array_split(np.arange(len(cands)), len(actors))
            refs = [a.score.remote([cands[i].tolist() for i in idx]) for a, idx in zip(actors, chunks) if len(idx)]
            return [s for part in ray.get(refs) for s in part]

        for it in range(opts.iterations):  # (a failing actor raises out of evaluate: see below)
            cands = np.clip(rng.normal(mean, std, size=(opts.population, *shape)), lo, hi)
            if it == 0:  # start from each expert alone, the base (α = 0) and the uniform mix
                anchors = [np.broadcast_to(np.eye(k)[j].reshape((k,) + (1,) * (len(shape) - 1)), shape) for j in range(k)]
                anchors += [np.zeros(shape), np.full(shape, 1.0 / k)]
                cands[: len(anchors)] = np.stack(anchors)
            scores = evaluate(cands)
            scored += [{**s, "alphas": c.tolist(), "iteration": it} for c, s in zip(cands, scores)]
            values = np.array([s["score"] for s in scores])
            order = sorted(range(len(values)), key=lambda i: (-values[i], i))  # stable: ties keep sample order
            elite = cands[order[:n_elite]]
            best_so_far = max(best_so_far, float(values.max()))
            mean, std = elite.mean(axis=0), np.maximum(elite.std(axis=0), opts.min_std)
            history.append({
                "iteration": it, "best": float(values.max()), "mean": float(values.mean()), "best_so_far": best_so_far,
                "mean_alphas": mean.tolist(), "std_alphas": std.tolist(),
            })
    except ray.exceptions.RayError as exc:  # an actor died or a score/reward function raised
        from raylib.errors import TrainingFailed

        kind, last, logs = launch.root_cause(exc)
        raise TrainingFailed(f"the CEM search failed while scoring candidates: {kind}: {last}. "
                             f"Actor output is in {logs}; no expert was written to {out_loc.uri}.") from exc
    finally:
        for a in actors:
            ray.kill(a)
    wall = time.time() - started
    needed_z = required_gain_z(opts.confidence)
    chosen, best_mix = select(scored, k + 1, needed_z)
    index = next(i for i, c in enumerate(scored) if c is chosen)
    selected = sources[index] if index < k else ("base" if index == k else "mix")
    result = CEMResult(
        alphas=chosen["alphas"], score=chosen["score"], expert_dir=out_dir, history=history,
        single_expert_scores={src: scored[j]["score"] for j, src in enumerate(sources)}, base_score=scored[k]["score"],
        selected=selected, required_gain_z=round(needed_z, 3), wall_time_s=round(wall, 2),
        best_mix={**{key: best_mix[key] for key in ("alphas", "score", "task", "iteration")},
                  "gain_z": min(max(best_mix["gain_z"], -1e3), 1e3)} if best_mix else {},  # capped: cem.json stays JSON
    )
    _write_outputs(result, expert_dirs, meta, opts, fewshot, n_actors)
    if out_loc.is_remote:
        storage.delete_file(out_loc, EXPERT_FILE)
        storage.upload_dir(out_dir, out_loc, last=EXPERT_FILE)
        result.expert_dir = out_loc.uri
    return result


# --------------------------------------------------------------------------- outputs


def _write_outputs(result: CEMResult, expert_dirs: list[str], meta: dict, opts: CEMOptions, fewshot: str, n_actors: int) -> None:
    """The composed expert (SVF format + expert.json, written last), cem.json, convergence.png."""
    from safetensors.torch import save_file

    from raylib.experts import EXPERT_FILE, ExpertInfo, read_expert, write_expert_json
    from raylib.methods import svf

    out = result.expert_dir
    marker = os.path.join(out, EXPERT_FILE)
    if os.path.exists(marker):
        os.remove(marker)
    mixed = svf.mix(svf.load_experts(expert_dirs), result.alphas)
    save_file({n: t.contiguous() for n, t in mixed.items()}, os.path.join(out, svf.Z_FILE))
    first = expert_dirs[0]
    for name in os.listdir(first):  # svf_config.json and the tokenizer files
        if name == svf.CONFIG_FILE or name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(os.path.join(first, name), os.path.join(out, name))
    log = {
        "alphas": result.alphas, "score": result.score, "experts": expert_dirs, "fewshot": os.path.abspath(fewshot),
        "single_expert_scores": result.single_expert_scores, "base_score": result.base_score,
        "selected": result.selected, "best_mix": result.best_mix, "required_gain_z": result.required_gain_z,
        "history": result.history,
        "options": opts.model_dump(), "actors": n_actors, "wall_time_s": result.wall_time_s,
    }
    with open(os.path.join(out, "cem.json"), "w") as f:
        json.dump(log, f, indent=2)
    _plot(result.history, os.path.join(out, "convergence.png"))
    first_info = read_expert(first)
    write_expert_json(out, ExpertInfo(
        method="svf", base_model=meta["base_model"], domain=opts.domain, template=meta["template"],
        metrics={"fewshot_score": result.score, "best_single_expert_score": max(result.single_expert_scores.values(), default=None),
                 "base_score": result.base_score},
        config={"cem": {"experts": expert_dirs, "alphas": result.alphas, **opts.model_dump()},
                "method": first_info.config.get("method", {"name": "svf"})},
    ))


def _plot(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [h["iteration"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(its, [h["best"] for h in history], marker="o", label="best of population")
    ax.plot(its, [h["mean"] for h in history], marker="o", label="population mean")
    ax.plot(its, [h["best_so_far"] for h in history], linestyle="--", label="best so far")
    ax.set_xlabel("iteration")
    ax.set_ylabel("few-shot score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def result_dict(result: CEMResult) -> dict:
    return asdict(result)
