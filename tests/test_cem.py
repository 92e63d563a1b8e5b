"""`raylib cem`: CEM over the mixing weights of SVF experts, scored by parallel Ray actors.

Experts for two synthetic domains are trained here (plain loop, short); the few-shot task
mixes both domains, so neither expert alone is the right answer for every row."""

from __future__ import annotations

import json
import os

import pytest

from helpers import job_dict, run_cli


@pytest.fixture(scope="module")
def svf_experts(tiny_model, tmp_path_factory) -> dict[str, str]:
    from raylib.config import validate_job
    from raylib.synthetic import write_dataset
    from raylib.train_loop import PlainSession, run

    root = tmp_path_factory.mktemp("svf-experts")
    experts = {}
    for domain in ("arithmetic", "comparison"):
        data = write_dataset(str(root / f"data-{domain}"), n_train=400, n_eval=20, domains=[domain])
        job = validate_job(job_dict(
            tiny_model, data, str(root / domain),
            method={"name": "svf", "targets": "all-linear", "cache_dir": str(root / "svd-cache")},
            train={"max_steps": 60, "checkpoint_every": 0, "eval_every": 0, "lr": 0.2, "batch_size": 8,
                   "lr_scheduler": "constant"},
            output={"domain": domain}))
        session = PlainSession(str(root / f"ckpt-{domain}"))
        run(job, session)
        experts[domain] = os.path.join(session.reports[-1]["checkpoint"], "expert")
    return experts


@pytest.fixture(scope="module")
def fewshot(tmp_path_factory) -> str:
    from raylib.synthetic import make_rows, write_jsonl

    rows = make_rows(12, domains=["arithmetic", "comparison"], seed=777)
    return write_jsonl(rows, str(tmp_path_factory.mktemp("fewshot") / "fewshot.jsonl"))


def _cem(experts, fewshot, out, actors, seed=0):
    return run_cli("cem", "--experts", experts["arithmetic"], "--experts", experts["comparison"], "--fewshot", fewshot,
                   "--out", str(out), "--population", "6", "--iterations", "2", "--init-std", "0.4",
                   "--seed", str(seed), "--actors", str(actors), "--loglik-weight", "1.0", timeout=900)


def test_cem_mix_beats_or_matches_best_single_expert_and_is_seeded(svf_experts, fewshot, tmp_path):
    one = _cem(svf_experts, fewshot, tmp_path / "one", actors=1)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    two = _cem(svf_experts, fewshot, tmp_path / "two", actors=2)
    assert two.returncode == 0, two.stderr[-3000:]

    log1 = json.loads((tmp_path / "one" / "cem.json").read_text())
    log2 = json.loads((tmp_path / "two" / "cem.json").read_text())
    assert log1["alphas"] == log2["alphas"] and log1["score"] == log2["score"]  # same seed, any number of actors
    assert log2["actors"] == 2
    best_single = max(log1["single_expert_scores"].values())
    assert log1["score"] >= best_single and log1["score"] >= log1["base_score"], log1
    assert log1["selected"] in ("mix", "base", *log1["single_expert_scores"]) and log1["best_mix"]["alphas"]
    assert len(log1["history"]) == 2 and (tmp_path / "one" / "convergence.png").stat().st_size > 1000
    assert any(h["best"] > h["mean"] for h in log1["history"]), log1["history"]  # the candidates really differ

    # the composed expert is a loadable SVF expert whose z is the α-mix, and it scores what CEM reported
    import torch

    from raylib.evaluation import exact_match
    from raylib.experts import read_expert
    from raylib.methods import get_method, svf
    from raylib.models import load_tokenizer

    info = read_expert(str(tmp_path / "one"))
    assert info.method == "svf" and info.domain == "cem" and info.metrics["fewshot_score"] == log1["score"]
    from transformers import AutoModelForCausalLM

    model = get_method("svf").load(AutoModelForCausalLM.from_pretrained(info.base_model), str(tmp_path / "one"))
    mixed = svf.mix(svf.load_experts([svf_experts["arithmetic"], svf_experts["comparison"]]), log1["alphas"])
    for name, z in svf.get_z(model).items():
        torch.testing.assert_close(z.float(), mixed[name])
    rows = [json.loads(line) for line in open(fewshot)]
    torch.set_num_threads(1)
    from raylib.config import ModelConfig

    tok = load_tokenizer(ModelConfig(path=info.base_model))
    from raylib.search.cem import CandidateScorer

    scorer = CandidateScorer(info.base_model, [svf_experts["arithmetic"], svf_experts["comparison"]], rows,
                             info.template, {"loglik_weight": 1.0})
    rescored = scorer.score([log1["alphas"]])[0]
    assert rescored["score"] == pytest.approx(log1["score"], abs=1e-6)
    assert exact_match(model, tok, rows) == pytest.approx(rescored["task"])


def test_cem_keeps_the_best_single_expert_unless_a_mix_is_significantly_better():
    """The winner's-curse guard (`cem.select`): on 20 rows, a mix one row ahead of the best
    single expert is luck; a mix ten rows ahead (and never behind) is not."""
    from raylib.search.cem import paired_gain_z, required_gain_z, select

    def cand(name, rows):
        return {"name": name, "rows": rows, "score": sum(rows) / len(rows)}

    single = cand("single", [1.0] * 8 + [0.0] * 12)
    weak = cand("weak", [0.0] * 20)
    base = cand("base", [1.0] * 6 + [0.0] * 14)
    lucky = cand("lucky", [1.0] * 9 + [0.0] * 11)  # +1 row
    strong = cand("strong", [1.0] * 18 + [0.0] * 2)  # +10 rows, never behind
    chosen, best_mix = select([single, weak, base, lucky], 3, min_gain_z=1.645)
    assert chosen["name"] == "single" and best_mix["name"] == "lucky" and 0 < best_mix["gain_z"] < 1.645
    chosen, _ = select([single, weak, base, lucky, strong], 3, min_gain_z=1.645)
    assert chosen["name"] == "strong" and paired_gain_z(strong["rows"], single["rows"]) > 3
    assert select([single, weak, base, lucky], 3, min_gain_z=0)[0]["name"] == "lucky"  # 0: the best score wins
    near_base = cand("near_base", [1.0] * 7 + [0.0] * 13)
    assert select([weak, base, near_base], 2, min_gain_z=1.645)[0]["name"] == "base"  # the base is an anchor too
    assert required_gain_z(0.95) == pytest.approx(1.645, abs=1e-3) and required_gain_z(0.8) == pytest.approx(0.842, abs=1e-3)
    assert required_gain_z(0) == 0  # one-sided; 0: no guard


def test_cem_rejects_bad_input_before_ray(svf_experts, fewshot, tmp_path, tiny_model):
    proc = run_cli("cem", "--experts", svf_experts["arithmetic"], "--fewshot", fewshot, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "at least two experts" in proc.stderr
    proc = run_cli("cem", "--experts", svf_experts["arithmetic"], "--experts", str(tmp_path), "--fewshot", fewshot,
                   "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "expert.json" in proc.stderr
    proc = run_cli("cem", "--experts", svf_experts["arithmetic"], "--experts", svf_experts["comparison"],
                   "--fewshot", fewshot, "--out", str(tmp_path / "o"), "--elite-frac", "0")
    assert proc.returncode == 2 and "--elite-frac" in proc.stderr
    proc = run_cli("cem", "--experts", svf_experts["arithmetic"], "--experts", svf_experts["comparison"],
                   "--fewshot", fewshot, "--out", str(tmp_path / "o"), "--population", "3")
    assert proc.returncode == 2 and "--population" in proc.stderr
    assert "Started a local Ray" not in proc.stderr
