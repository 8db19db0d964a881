"""The multi-task set behind scripts/bench/eval_mixlora.py: deterministic, four tasks, every question's key right."""
from __future__ import annotations

from loraplex.bench.multitask import _VELISH, TASKS, make_multitask


def test_multitask_set_is_deterministic_balanced_and_keyed_right():
    train, questions = make_multitask(seed=3, train_per_task=20, eval_per_task=10)
    assert (train, questions) == make_multitask(seed=3, train_per_task=20, eval_per_task=10)
    assert make_multitask(seed=4, train_per_task=20, eval_per_task=10)[1] != questions
    assert len(train) == 80 and [q.task for q in questions] == [t for t in TASKS for _ in range(10)]
    trained_prompts = {e["messages"][0]["content"] for e in train}
    for q in questions:
        assert len(q.options) == 4 == len(set(q.options)) and q.prompt not in trained_prompts
        answer = q.options[q.answer]
        if q.task == "arithmetic":
            a, b = (int(t.strip("?.")) for t in q.prompt.split() if t.strip("?.").isdigit())
            assert answer == str(a + b)
        elif q.task == "reversal":
            word = q.prompt.split("'")[1]
            assert answer == word[::-1]
            assert all(word not in e["messages"][0]["content"] for e in train if "'" in e["messages"][0]["content"]
                       and e["messages"][1]["content"] == word[::-1])  # held-out words
        elif q.task == "mood":
            assert answer == ("JOY" if any(w in q.prompt for w in ("wonderful", "delightful", "excellent", "lovely",
                                                                   "fantastic", "charming", "superb", "pleasant"))
                              else "GLOOM")
        else:
            assert answer == _VELISH[q.prompt.split("'")[1]]
