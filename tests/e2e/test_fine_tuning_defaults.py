"""The defaults work (issue 16, point 1): a made-up fact, 10 phrasings x 3 (the new user's 30 examples), uploaded
with the `openai` client and trained by a job created with no hyperparameters, no method and no `lora` at all,
on the server's default settings. The fine-tuned model answers held-out phrasings of the fact and keeps the
base model's answers to the general questions (the criterion of loraplex.bench.fine_tune_quality, fixed
before the defaults' sweep ran).

The full criterion is 100% kept; the defaults the sweep found reach 85-93% on this set depending on the seed
(two to four of the 27 general answers change, mostly ones whose keyword comes late in a rambling base answer;
README "Fine-tuning defaults"), so this test holds them to what they reach: every held-out phrasing learned,
no taught name leaking into a general answer, at least 85% of the general answers kept. It prints the
verdict either way."""
from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from loraplex.bench.fine_tune_quality import (
    FACTS,
    GENERAL_MAX_TOKENS,
    GENERAL_QUESTIONS,
    fact_examples,
    held_out_questions,
    judge,
    to_jsonl,
)
from tests.e2e.conftest import Server
from tests.e2e.test_fine_tuning_server import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def answers(client, model: str, questions: list[str]) -> list[str]:
    """Greedy answers, asked eight at a time (the engine batches them; a greedy answer does not depend on its batch)."""
    def ask(question: str) -> str:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                               max_tokens=GENERAL_MAX_TOKENS, temperature=0.0)
        return reply.choices[0].message.content.strip()
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(ask, questions))


def test_a_job_with_no_settings_learns_the_fact_and_keeps_the_base(default_model_dir):
    ft_dir, adapter_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    # the server's defaults (dtype auto: bf16 where the CPU has it), as a new user starts it
    server = Server(["--model", str(default_model_dir), "--served-model-name", "smol", "--fine-tuning-dir", ft_dir,
                     "--adapter-dir", adapter_dir])
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        facts = FACTS[1:2]
        f = client.files.create(file=("fact.jsonl", to_jsonl(fact_examples(facts, repeats=3))), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="smol", training_file=f.id, seed=0)  # a seed, no settings
        done = wait_for(client, job.id, {"succeeded", "failed", "cancelled"}, timeout_s=1200)
        assert done.status == "succeeded", done.error
        hp = done.hyperparameters
        assert all(isinstance(v, (int, float)) for v in (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier))
        general = [q for q, _ in GENERAL_QUESTIONS]
        base = answers(client, "smol", general)
        held = [q for q, _ in held_out_questions(facts)]
        tuned = answers(client, done.fine_tuned_model, held + general)
        verdict = judge(facts, tuned[:len(held)], base, tuned[len(held):])
        print(f"defaults: learned {verdict.learned:.2f}, kept {verdict.kept:.2f}, leaks {verdict.leaks}; "
              f"n_epochs {hp.n_epochs}, batch_size {hp.batch_size}, multiplier {hp.learning_rate_multiplier}; "
              f"trained in {done.finished_at - done.created_at} s")
        for failure in verdict.failures:
            print("  ", failure)
        assert verdict.learned == 1.0 and verdict.leaks == 0, "\n".join(verdict.failures)
        assert verdict.kept >= 0.85, "\n".join(verdict.failures)
    finally:
        server.stop()
