"""SVF method: exactness at z = 1, the factor cache, save/mix/merge/export, `raylib params`,
SFT with resume, and per-domain experts beating the base (exact match)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import job_dict, run_cli, run_python

from raylib.config import validate_job
from raylib.methods import get_method, svf
from raylib.models import count_parameters, load_model, load_tokenizer
from raylib.train_loop import PlainSession, run


def _base(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


@pytest.mark.parametrize("mode", ["rebuild", "factored"])
def test_z_one_reproduces_the_base_logits(tiny_model, tmp_path, mode):
    ids = torch.randint(3, 400, (2, 24))
    base = _base(tiny_model)
    with torch.no_grad():
        want = base(ids).logits
    model = svf.apply_svf(base, "all-linear", forward=mode, cache_dir=str(tmp_path), model_path=tiny_model)
    assert len(svf.svf_modules(model)) == 14 and all(m.mode == mode for m in svf.svf_modules(model).values())
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # with autograd on (the training path) too
    torch.testing.assert_close(model(ids).logits.detach(), want, atol=1e-4, rtol=1e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".z") for n in trainable)


def test_decomposition_is_cached_once_per_base(tiny_model, tmp_path):
    cache = str(tmp_path / "cache")
    svf.apply_svf(_base(tiny_model), "mlp", cache_dir=cache, model_path=tiny_model)
    files = [f for f in os.listdir(cache) if f.endswith(".safetensors")]
    assert len(files) == 1
    mtime = os.path.getmtime(os.path.join(cache, files[0]))
    # a second job / replica on the same base loads the file instead of recomputing it
    svf.apply_svf(_base(tiny_model), "mlp", cache_dir=cache, model_path=tiny_model)
    assert os.path.getmtime(os.path.join(cache, files[0])) == mtime
    # other targets are another entry; a changed base is another key
    svf.apply_svf(_base(tiny_model), "attn", cache_dir=cache, model_path=tiny_model)
    assert len([f for f in os.listdir(cache) if f.endswith(".safetensors")]) == 2


def test_concurrent_processes_compute_the_factors_once(tiny_model, tmp_path):
    import subprocess
    import sys

    cache = str(tmp_path / "cache")
    code = (f"from transformers import AutoModelForCausalLM; from raylib.methods import svf; import logging; "
            f"logging.basicConfig(level=logging.INFO); "
            f"svf.apply_svf(AutoModelForCausalLM.from_pretrained({tiny_model!r}), 'all-linear', "
            f"cache_dir={cache!r}, model_path={tiny_model!r})")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert sum("decomposed" in log for log in logs) == 1 and sum("loaded SVD factors" in log for log in logs) == 1


def test_save_mix_set_merge_and_export(tiny_model, tmp_path):
    ids = torch.randint(3, 400, (1, 16))
    model = svf.apply_svf(_base(tiny_model), "all-linear", cache_dir=str(tmp_path / "c"), model_path=tiny_model)
    names = list(svf.svf_modules(model))
    torch.manual_seed(0)
    za = {n: 1 + 0.2 * torch.randn_like(z) for n, z in svf.get_z(model).items()}
    zb = {n: 1 + 0.2 * torch.randn_like(z) for n, z in za.items()}
    dirs = []
    for name, z in (("a", za), ("b", zb)):
        svf.set_z(model, z)
        d = str(tmp_path / name)
        svf.SVF().save(model, d)
        dirs.append(d)
    assert sorted(svf.load_z(dirs[0])) == sorted(names)
    cfg = svf.read_svf_config(dirs[0])
    assert cfg["targets"] == "all-linear" and cfg["trainable_params"] == 768

    mixed = svf.mix(svf.load_experts(dirs), [0.25, 0.75])
    for n in names:
        torch.testing.assert_close(mixed[n], 0.25 * za[n] + 0.75 * zb[n])
    half, none = svf.mix(svf.load_experts(dirs), [0.5, 0.0]), svf.mix(svf.load_experts(dirs), [0.0, 0.0])
    for n in names:  # weights scale each expert's change to the base: 0 is the base, 0.5 half of a's change
        torch.testing.assert_close(half[n], 1 + 0.5 * (za[n] - 1))
        torch.testing.assert_close(none[n], torch.ones_like(za[n]))
    per_layer = svf.mix(svf.load_experts(dirs), [[1.0, 0.0], [0.0, 1.0]])  # layer 0 from a, layer 1 from b
    for n in names:
        torch.testing.assert_close(per_layer[n], za[n] if ".layers.0." in n else zb[n])

    # switch experts in place on one model (what a serve replica does per request)
    svf.apply_expert(model, dirs, [0.25, 0.75])
    with torch.no_grad():
        mixed_logits = model(ids).logits
    svf.set_z(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _base(tiny_model)(ids).logits, atol=1e-4, rtol=1e-4)
    with svf.base_mode(model):
        pass
    svf.apply_expert(model, dirs[0])

    # merged export: a normal HF model dir, loaded by plain transformers
    out = svf.export_merged(tiny_model, dirs, str(tmp_path / "merged"), alphas=[0.25, 0.75], cache_dir=str(tmp_path / "c"))
    proc = run_python(f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({out!r}).eval()
ids = torch.tensor({ids.tolist()})
with torch.no_grad():
    print(m(ids).logits.flatten()[:64].tolist())
print(type(m.model.layers[0].mlp.up_proj).__name__)
""")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "Linear"
    torch.testing.assert_close(torch.tensor(json.loads(lines[0])), mixed_logits.flatten()[:64], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("method,targets", [("svf", "mlp"), ("svf", "all-linear"), ("svf", "attn"),
                                            ("lora", "all-linear"), ("lora", "mlp")])
def test_params_command_matches_the_real_model(tiny_model, tmp_path, method, targets):
    proc = run_cli("params", tiny_model, "--method", method, "--targets", targets, "--r", "4", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    counted = json.loads(proc.stdout.strip().splitlines()[-1])
    if method == "svf":
        opts = {"name": "svf", "targets": targets, "cache_dir": str(tmp_path)}
    else:
        opts = {"name": "lora", "r": 4, "target_modules": "all-linear" if targets == "all-linear"
                else ["gate_proj", "up_proj", "down_proj"]}
    job = validate_job(job_dict(tiny_model, {"train": "x", "eval": None}, "o", method=opts))
    real = get_method(method).apply(load_model(job.model), job)
    trainable, total = count_parameters(real)
    assert (counted["trainable"], counted["total"]) == (trainable, total)
    assert counted["base"] == count_parameters(load_model(job.model))[1]
    # the same from a bare config.json
    proc = run_cli("params", os.path.join(tiny_model, "config.json"), "--method", method, "--targets", targets,
                   "--r", "4", "--json")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["trainable"] == trainable


def test_svf_sft_trains_only_z_and_resumes_exactly(tiny_model, demo_data, tmp_path):
    job = validate_job(job_dict(tiny_model, demo_data, str(tmp_path / "o"),
                                method={"name": "svf", "targets": "all-linear", "cache_dir": str(tmp_path / "c")},
                                train={"max_steps": 6, "checkpoint_every": 3, "lr": 0.05}))
    full = PlainSession(str(tmp_path / "full"))
    run(job, full)
    final = full.reports[-1]
    assert final["trainable_params"] == 768
    assert final["eval_loss"] < final["eval_loss_before"]
    expert = os.path.join(final["checkpoint"], "expert")
    assert {"expert.json", svf.CONFIG_FILE, svf.Z_FILE} <= set(os.listdir(expert))
    info = json.load(open(os.path.join(expert, "expert.json")))
    assert info["method"] == "svf" and info["config"]["method"]["targets"] == "all-linear"

    resumed = PlainSession(str(tmp_path / "resumed"), resume_from=full.reports[0]["checkpoint"])
    run(job, resumed)
    a, b = svf.load_z(expert), svf.load_z(os.path.join(resumed.reports[-1]["checkpoint"], "expert"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    # Method.load: base + expert -> a model with the trained z
    loaded = get_method("svf").load(load_model(job.model), expert)
    for n, z in svf.get_z(loaded).items():
        torch.testing.assert_close(z, a[n])


@pytest.mark.slow
def test_one_svf_expert_per_domain_beats_the_base(instruct_tiny_model, tmp_path):
    """The domains' SVF experts beat the base on their held-out test splits (no test prompt,
    and for strings no test word, is a training prompt): none is worse than the base, the mean
    gain is at least 0.15 exact match and two domains gain 0.15 or more.

    The instruct base can do the tasks but in the template picks either operation
    (`tiny_models.INSTRUCT_TINY`); SVF only rescales singular values, so a domain's ceiling is
    the skill the base has. Its arithmetic is weak (0.13 in the plain format), which caps that
    domain's gain, and leaves it to float details: with these settings on an AVX-512 EPYC,
    arithmetic 0.095 -> 0.11 with 2 torch threads here and -> 0.155 with 1 (the benchmark's;
    the base itself is bit-identical either way), strings 0.600 -> 0.875, comparison
    0.280 -> 0.575; over seeds 0-2 (1 thread) the worst margins were +0.06, +0.22 and +0.285.
    So no margin is asserted per domain. At lr 0.02: +0.035, +0.115, +0.31."""
    from raylib.evaluation import exact_match
    from raylib.synthetic import DOMAINS, write_dataset

    tiny_model = instruct_tiny_model

    results = {}
    for domain in DOMAINS:
        data = write_dataset(str(tmp_path / domain), n_train=800, n_eval=200, domains=[domain], held_out=True)
        raw = job_dict(tiny_model, data, str(tmp_path / f"o-{domain}"),
                       method={"name": "svf", "targets": "all-linear", "cache_dir": str(tmp_path / "c")},
                       train={"max_steps": 300, "checkpoint_every": 0, "eval_every": 0, "batch_size": 8,
                              "lr_scheduler": "constant", "seed": 0},
                       output={"domain": domain})
        del raw["train"]["lr"]  # SVF's default learning rate
        job = validate_job(raw)
        session = PlainSession(str(tmp_path / f"ck-{domain}"))
        run(job, session)
        tok = load_tokenizer(job.model)
        rows = [json.loads(line) for line in open(data["eval"])]
        base_em = exact_match(load_model(job.model), tok, rows)
        expert = get_method("svf").load(load_model(job.model), os.path.join(session.reports[-1]["checkpoint"], "expert"))
        results[domain] = (base_em, exact_match(expert, tok, rows))
    print("exact match (base, expert):", results)
    gains = [e - b for b, e in results.values()]
    assert min(gains) >= 0 and sum(gains) / len(gains) >= 0.15, results
    assert sum(g >= 0.15 for g in gains) >= 2, results


@pytest.mark.parametrize("forward", ["rebuild", "factored"])
def test_svf_on_bf16_weights_learns_at_a_small_learning_rate(forward, tiny_model, demo_data, tmp_path):
    """z is fp32, but with σ⊙z rounded to bf16 per singular value every change of z below
    2^-8 relative vanished from the forward pass: 10 steps at lr 1e-4 left the eval loss
    bit-identical. The scaling is now formed in fp32 and rounded per element."""
    raw = job_dict(tiny_model, demo_data, str(tmp_path / "o"), method={"name": "svf", "targets": "mlp", "forward": forward},
                   train={"max_steps": 10, "lr": 1e-4, "checkpoint_every": 0})
    raw["model"]["dtype"] = "bf16"
    session = PlainSession(str(tmp_path / "ckpt"))
    out = run(validate_job(raw), session)
    final = session.reports[-1]
    zs = [m.z for m in svf.svf_modules(out["model"]).values()]
    assert all(z.dtype == torch.float32 for z in zs)
    assert max(float((z.detach() - 1).abs().max()) for z in zs) < 2 ** -9  # every z moved less than bf16 resolves at 1.0
    assert final["eval_loss"] < final["eval_loss_before"] - 1e-3, final


@pytest.mark.slow
def test_the_svf_quality_benchmark_runs_sft_reinforce_and_the_unseen_task(instruct_tiny_model, tmp_path):
    """`jobs/bench/svf_quality.py --quick` end to end (SFT and REINFORCE experts, then routing
    and CEM on the unseen task): the benchmark is how the README's SVF figures are made, and
    its REINFORCE runs once broke unnoticed. Asserts the summary line is complete, not figures."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "bench", "svf_quality.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--objectives", "sft", "reinforce", "--methods", "svf-all",
                           "--base", instruct_tiny_model, "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["domains"]) == {"arithmetic", "strings", "comparison"}
    assert all(0 <= v[k] <= 1 for v in summary["domains"].values() for k in ("base", "svf"))
    assert set(summary["worst_seed_margin"]) == {"svf-all/sft", "svf-all/reinforce"}
    assert set(summary["unseen"]) == {"base", "best_single", "prompt", "classifier", "cem"}
    assert (tmp_path / os.listdir(tmp_path)[0] / "svf_quality.png").stat().st_size > 1000
