"""The lm-evaluation-harness model `llmflash` on local tasks (YAML + JSON written here; no hub),
against lm-eval's own "hf" model on the same weights (a tiny transformers llama built here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
WORDS = ["fox", "dog", "flash", "memory", "model", "token", "brown", "lazy", "quick", "slower"]


def write_tasks(root: Path) -> Path:
    """Three tasks over local JSON Lines files: multiple choice (loglikelihood), perplexity
    (loglikelihood_rolling) and a short greedy answer (generate_until)."""
    docs = []
    for i in range(20):
        choices = [f" {WORDS[(i + k) % len(WORDS)]}" for k in range(4)]
        docs.append({"question": f"The quick brown {WORDS[i % 7]} jumps over the", "choices": choices,
                     "gold": i % 4, "text": f"Flash memory is larger than DRAM. The {WORDS[i % 10]} reads.",
                     "answer": WORDS[(i * 3) % 10]})
    root.mkdir(parents=True, exist_ok=True)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (root / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['.', '\\n']\n  max_gen_toks: 6\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from llmflash import convert
    from tiny_models import build

    root = tmp_path_factory.mktemp("lm-eval")
    build("llama-gqa", root / "hf", seed=3)
    model = convert(root / "hf", root / "model", dtype="float32", progress=False)
    return root / "hf", model, write_tasks(root / "tasks")


def evaluate(model: str, model_args: str, tasks_dir: Path, samples: bool = False) -> dict:
    os.environ.update(OFFLINE)
    import llmflash.integrations.lm_eval  # noqa: F401  (registers "llmflash")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc", "tiny_ppl", "tiny_gen"],
                           task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False), batch_size=1, device="cpu",
                           log_samples=samples)


def test_same_scores_as_transformers(setup):
    hf_dir, model_dir, tasks = setup
    ours = evaluate("llmflash", f"pretrained={model_dir},mode=dense", tasks, samples=True)
    ref = evaluate("hf", f"pretrained={hf_dir},dtype=float32", tasks, samples=True)
    for task, metric in [("tiny_mc", "acc,none"), ("tiny_mc", "acc_norm,none"), ("tiny_gen", "exact_match,none")]:
        assert abs(ours["results"][task][metric] - ref["results"][task][metric]) <= 0.01, (task, metric)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        a, b = ours["results"]["tiny_ppl"][metric], ref["results"]["tiny_ppl"][metric]
        assert abs(a - b) <= 1e-3 * abs(b), (metric, a, b)
    # per document: the same log-likelihoods and the same generated answers
    mine = {s["doc_id"]: s for s in ours["samples"]["tiny_mc"]}
    for s in ref["samples"]["tiny_mc"]:
        for a, b in zip(mine[s["doc_id"]]["resps"], s["resps"]):  # per choice: [[logprob, is_greedy]]
            assert abs(float(a[0][0]) - float(b[0][0])) < 1e-3
    gen = {s["doc_id"]: s["resps"] for s in ours["samples"]["tiny_gen"]}
    assert all(gen[s["doc_id"]] == s["resps"] for s in ref["samples"]["tiny_gen"])


def test_command_line_with_run_options(setup, tmp_path):
    """`python -m llmflash.integrations.lm_eval` is lm-eval's command with `llmflash` registered;
    mode, memory, sparsity and density pass through --model_args."""
    _, model_dir, tasks = setup
    out = subprocess.run([sys.executable, "-m", "llmflash.integrations.lm_eval", "--model", "llmflash",
                          "--model_args", f"pretrained={model_dir},mode=dense,sparsity=magnitude,density=0.5",
                          "--tasks", "tiny_mc", "--include_path", str(tasks), "--output_path", str(tmp_path / "out")],
                         cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    assert results["results"]["tiny_mc"]["acc,none"] >= 0
    assert results["config"]["model_args"]["sparsity"] == "magnitude"


def test_model_args_reach_the_runtime(setup):
    """sparsity/density change the likelihoods (each token sees only its selected neurons)."""
    import llmflash.integrations.lm_eval as plugin
    from lm_eval.api.instance import Instance

    _, model_dir, _ = setup
    request = [Instance("loglikelihood", {}, ("The quick brown fox", " jumps over the lazy dog"), 0)]
    dense = plugin.LLMFlashLM.create_from_arg_string(f"pretrained={model_dir},mode=dense")
    sparse = plugin.LLMFlashLM.create_from_arg_string(f"pretrained={model_dir},mode=dense,sparsity=magnitude,"
                                                      "density=0.25")
    assert sparse.model.options.sparsity == "magnitude" and sparse.model.options.density == 0.25
    (a, _), = dense.loglikelihood(request, disable_tqdm=True)
    (b, _), = sparse.loglikelihood(request, disable_tqdm=True)
    assert a != b
