"""Dense vs sparse accuracy through lm-eval's `llmflash` model, on a local zero-shot task.

The standard zero-shot tasks (piqa, arc, hellaswag) come from the Hugging Face hub, which this
machine cannot reach; this script writes a local cloze task instead: sentences from the docstrings
of Python's standard library (on every machine), context = the sentence without its last word,
choices = the true last word and three last words of other sentences (acc and acc_norm). Then it
runs lm-eval once per configuration (model_args) and prints the accuracies.

    .venv/bin/python experiments/lm_eval_sparsity.py RELU_MODEL_DIR --docs 200 \\
        --config mode=dense --config mode=dense,sparsity=exact --config mode=dense,sparsity=predictor
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import re
import tempfile
from pathlib import Path

MODULES = ["abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy",
           "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
           "getopt", "glob", "gzip", "heapq", "hmac", "html", "http", "imaplib", "inspect", "io", "ipaddress",
           "itertools", "json", "locale", "logging", "mailbox", "mimetypes", "numbers", "operator", "optparse",
           "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shelve", "shlex",
           "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
           "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest",
           "urllib", "uuid", "warnings", "weakref", "xml", "zipfile", "zlib"]


def sentences() -> list[str]:
    out = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        texts = [module.__doc__ or ""] + [getattr(module, a).__doc__ or "" for a in dir(module)
                                          if not a.startswith("_") and callable(getattr(module, a, None))]
        for text in texts:
            if not isinstance(text, str):
                continue
            for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
                words = s.rstrip(".!?").split()
                if 8 <= len(words) <= 40 and all(re.fullmatch(r"[A-Za-z][A-Za-z,;'-]*", w) for w in words[-1:]):
                    out.append(" ".join(words))
    return sorted(set(out))


def write_task(root: Path, docs: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    pool = sentences()
    rng.shuffle(pool)
    pool = pool[:docs]
    last = [s.split()[-1].strip(",;") for s in pool]
    rows = []
    for i, s in enumerate(pool):
        words = s.split()
        answer = words[-1].strip(",;")
        others = [w for w in rng.sample(last, 12) if w.lower() != answer.lower()]
        distractors = list(dict.fromkeys(others))[:3]
        choices = distractors + [answer]
        rng.shuffle(choices)
        rows.append({"context": " ".join(words[:-1]), "choices": [f" {c}" for c in choices],
                     "gold": choices.index(answer)})
    data = root / "stdlib_cloze.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "stdlib_cloze.yaml").write_text(
        f"task: stdlib_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return root


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--docs", type=int, default=200)
    p.add_argument("--config", action="append", default=None, help="model_args besides pretrained (repeatable)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import llmflash.integrations.lm_eval  # noqa: F401
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    configs = args.config or ["mode=dense", "mode=dense,sparsity=predictor"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tasks = write_task(Path(tmp), args.docs)
        for config in configs:
            r = simple_evaluate(model="llmflash", model_args=f"pretrained={args.model},{config}",
                                tasks=["stdlib_cloze"], task_manager=TaskManager(include_path=str(tasks)),
                                batch_size=1)
            res = r["results"]["stdlib_cloze"]
            results[config] = {k: res[k] for k in ("acc,none", "acc_stderr,none", "acc_norm,none",
                                                  "acc_norm_stderr,none")}
            results[config]["docs"] = r["n-samples"]["stdlib_cloze"]["effective"]
            print(config, json.dumps(results[config]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
