"""`lmlab sample --num-samples N` and `lmlab answer` decode in batches and give what one-at-a-time decoding
gives: the i-th sample is the sample seeded SEED + i, and a batch of answers is the answers asked alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lmlab.core.config import SamplingParams
from lmlab.inference.generate import instruct, instruct_all, sample, samples
from lmlab.run.rundir import RunDir
from tests.helpers import ALPACA_TINY, lmlab

LEGACY = Path(__file__).parent / "data" / "legacy"


def test_n_samples_drawn_in_one_batch_are_the_samples_seeded_one_by_one():
    run = RunDir(LEGACY / "trained").load("best", "cpu")
    params = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=20, seed=11)
    batched = samples(run, "ROMEO:", params, 4)
    alone = [sample(run, "ROMEO:", SamplingParams(max_new_tokens=40, temperature=1.0, top_k=20, seed=11 + i))
             for i in range(4)]
    assert batched == alone and len(set(batched)) > 1


def test_answers_decoded_in_a_batch_are_the_answers_asked_alone():
    run = RunDir(LEGACY / "finetuned").load("best", "cpu")
    asks = [(r["instruction"], r.get("input", "")) for r in json.loads(ALPACA_TINY.read_text())[:5]]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    done = []
    batched = instruct_all(run, asks, params, batch=3, progress=lambda n, total: done.append((n, total)))
    assert batched == [instruct(run, instruction, input, params) for instruction, input in asks]
    assert done[-1] == (5, 5)


def test_sample_num_samples_prints_and_records_each_with_its_seed(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "trained", run)
    out = lmlab("sample", run, "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "4", "--num-samples", "3",
                "--device", "cpu", cwd=tmp_path).stdout
    assert [line for line in out.splitlines() if line.startswith("--- sample")] == \
        [f"--- sample {i + 1} of 3 (seed {4 + i})" for i in range(3)]
    headers = [line for line in (run / "samples.txt").read_text().splitlines() if line.startswith("--- checkpoint")]
    assert [h.split(", ")[1] for h in headers] == ["seed 4", "seed 5", "seed 6"]
    for bad in ("0", "-2"):
        refused = lmlab("sample", run, "--num-samples", bad, "--device", "cpu", cwd=tmp_path, ok=False)
        assert refused.returncode == 2 and f"argument --num-samples: '{bad}' is not a whole number from 1" in refused.stderr
        assert "Traceback" not in refused.stderr
    refused = lmlab("answer", run, "--data", ALPACA_TINY, "--out", tmp_path / "a.jsonl", "--batch-size", "0",
                    "--device", "cpu", cwd=tmp_path, ok=False)
    assert "argument --batch-size: '0' is not a whole number from 1" in refused.stderr and not (tmp_path / "a.jsonl").exists()
