"""lm-evaluation-harness against a real server, as users run it (`local-completions`): a multiple-choice task of our
own (loglikelihoods: echo + logprobs) and a generate_until task complete with their scores, and the
multiple-choice accuracy equals lm-eval's own `hf` model on the same weights (float32)."""
from __future__ import annotations

import json
import textwrap

import pytest

from tests.e2e.conftest import smol_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which planet is closest to the Sun?", ["Venus", "Earth", "Mercury", "Mars"], 2),
    ("What colour is the sky on a clear day?", ["green", "red", "yellow", "blue"], 3),
    ("What is 2 + 2?", ["4", "5", "3", "22"], 0),
    ("Which animal says moo?", ["dog", "cow", "cat", "duck"], 1),
    ("What do bees make?", ["milk", "silk", "honey", "wax paper"], 2),
    ("Water freezes at how many degrees Celsius?", ["100", "50", "10", "0"], 3),
    ("Which is the largest ocean?", ["Pacific", "Atlantic", "Indian", "Arctic"], 0),
    ("What is the opposite of hot?", ["warm", "cold", "wet", "loud"], 1),
]


@pytest.fixture(scope="module")
def server(default_model_dir):
    srv = smol_server(default_model_dir, "--max-model-len", "512")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a, "target": c[a]}) + "\n"
                            for q, c, a in QUESTIONS))
    (folder / "loraplex_tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: loraplex_tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
        """))
    (folder / "loraplex_tiny_gen.yaml").write_text(textwrap.dedent(f"""\
        task: loraplex_tiny_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: generate_until
        doc_to_text: "Q: {{{{question}}}}\\nA:"
        doc_to_target: "{{{{target}}}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 12
          do_sample: false
        metric_list:
          - metric: exact_match
        """))
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(folder))


def evaluate(task_manager, model: str, model_args: str, task: str) -> tuple[dict, list]:
    """(the task's scores, its samples: each with the loglikelihoods or generations it got)."""
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=task_manager,
                                  batch_size=1, log_samples=True)
    return out["results"][task], sorted(out["samples"][task], key=lambda s: s["doc_id"])


def test_local_completions_scores_match_hf(server, tasks, default_model_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    api = (f"model=smol,base_url={server.base_url}/v1/completions,tokenizer_backend=huggingface,"
           f"tokenizer={default_model_dir},num_concurrent=4,max_retries=1")
    ours, our_samples = evaluate(tasks, "local-completions", api, "loraplex_tiny_mc")
    theirs, their_samples = evaluate(tasks, "hf", f"pretrained={default_model_dir},dtype=float32,device=cpu",
                                     "loraplex_tiny_mc")
    print(f"acc: local-completions {ours['acc,none']}, hf {theirs['acc,none']}")
    assert ours["acc,none"] == theirs["acc,none"]
    assert 0.0 < ours["acc,none"] <= 1.0  # scored, and not all wrong (the questions are easy)
    for a, b in zip(our_samples, their_samples, strict=True):  # each choice's loglikelihood, as transformers has it
        # sums over a few tokens of float32 logprobs, each within DEFAULT_MODEL_ATOL of transformers'
        assert [r[0] for r in a["filtered_resps"]] == pytest.approx([r[0] for r in b["filtered_resps"]], abs=5e-3)
    generated, gen_samples = evaluate(tasks, "local-completions", api, "loraplex_tiny_gen")
    print(f"exact_match: {generated['exact_match,none']}")
    assert "exact_match,none" in generated and len(gen_samples) == len(QUESTIONS)
    assert all(s["resps"][0][0].strip() for s in gen_samples)  # every question got an answer
