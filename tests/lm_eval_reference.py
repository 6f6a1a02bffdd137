"""lm-evaluation-harness as the reference for `lmlab eval --task` and for `lmlab serve`'s log-probabilities: task
files run as local lm-eval tasks (a YAML in an --include_path folder, the items read from the JSON-lines file by
the `json` dataset builder: nothing downloads), by its `hf` backend on an exported folder or its
`local-completions` backend against a server; what the tests assert on and `benchmarks/eval_tasks.py` times.

Run as `python -m tests.lm_eval_reference SPEC.json`, it prints one JSON object: per task its acc, acc_norm and
each item's per-choice log-likelihoods, and the seconds lm-eval took. In its own process, as a user runs lm-eval.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Which lm-eval task a layout is: the generic layout's fields as they are, HellaSwag's through lm-eval's own
# hellaswag preparation (its process_docs), so the reference prepares the text, not lmlab.
YAML = {
    "generic": ('doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n', ""),
    "hellaswag": ('process_docs: !function utils.process_docs\ndoc_to_text: "{{query}}"\ndoc_to_choice: "choices"\n'
                  'doc_to_target: "{{label}}"\n', "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa\n"),
}


def write_task(folder: Path, name: str, items: Path, layout: str) -> str:
    """A local lm-eval task NAME reading `items` (JSON lines in `layout`) as its validation split, in `folder`
    (the --include_path); one folder per layout, each with its own utils.py."""
    folder = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    fields, utils = YAML[layout]
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {items.resolve()}\n"
        f"validation_split: validation\noutput_type: multiple_choice\n{fields}"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n", encoding="utf-8")
    if utils:
        (folder / "utils.py").write_text(utils, encoding="utf-8")
    return name


def evaluate(model: str, model_args: str, tasks: list[str], include_path: str, batch_size: int = 1) -> dict[str, Any]:
    """lm-eval's simple_evaluate on local tasks only (its own hundreds are not indexed): per task acc, acc_norm and
    each item's per-choice log-likelihoods, in item order; and the seconds it took, model loading included."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=batch_size,
                                      task_manager=TaskManager(include_path=include_path, include_defaults=False),
                                      log_samples=True, device="cpu")
    found = {}
    for task in tasks:
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        found[task] = {"acc": results["results"][task]["acc,none"],
                       "acc_norm": results["results"][task]["acc_norm,none"],
                       "loglikelihoods": [[resp[0][0] for resp in s["resps"]] for s in samples]}
    return {"tasks": found, "seconds": time.perf_counter() - started}


def run(model: str, model_args: str, tasks: list[str], include_path: Path, cache: Path,
        batch_size: int = 1) -> dict[str, Any]:
    """`evaluate` in a process of its own, offline, its caches under `cache`."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache / "hf"),
           "HF_DATASETS_CACHE": str(cache / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    spec = cache / f"spec-{model}.json"
    spec.write_text(json.dumps({"model": model, "model_args": model_args, "tasks": tasks,
                                "include_path": str(include_path), "batch_size": batch_size}))
    done = subprocess.run([sys.executable, "-m", "tests.lm_eval_reference", str(spec)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(evaluate(**json.loads(Path(sys.argv[1]).read_text()))))
