"""The fine-tuning product through a real server and the `openai` client: result files that match the events,
checkpoints served as models, pause and resume with the unpaused result, the adapter downloaded as a PEFT
archive that peft loads with the server's logits, DPO on preference data, and the errors around them."""
from __future__ import annotations

import csv
import io
import json
import math
import tarfile
import tempfile
import time

import httpx
import openai
import pytest
import torch

from tests.e2e.conftest import Server
from tests.e2e.test_fine_tuning_server import DATA, server_args, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
HP = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10}
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"], "validation_fraction": 0.2,
        "checkpoint_every": 2, "eval_every": 2, "self_distillation": 0.0}


def create(client, file_id, **kw):
    return client.fine_tuning.jobs.create(model="smol", training_file=file_id, suffix="p", seed=5,
                                          hyperparameters=HP, extra_body={"lora": LORA}, **kw)


def adapter_tensors(base_url: str, name: str, version: int | None = None) -> tuple[dict, dict]:
    from safetensors.torch import load
    params = {} if version is None else {"version": version}
    r = httpx.get(f"{base_url}/v1/adapters/{name}/content", params=params, timeout=60)
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]
        config = json.loads(tar.extractfile("adapter_config.json").read())
        tensors = load(tar.extractfile("adapter_model.safetensors").read())
    return config, tensors


def echo_logprobs(client, model: str, prompt: str) -> list[float]:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=0, temperature=0)
    return out.choices[0].logprobs.token_logprobs[1:]


def test_results_checkpoints_pause_resume_and_download(default_model_dir, tmp_path):
    ft_dir, adapter_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    server = Server(server_args(default_model_dir, ft_dir, adapter_dir))
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        uploaded = client.files.create(file=DATA.open("rb"), purpose="fine-tune")

        # paused as soon as it runs: no step while paused; resumed, it ends where an unpaused run ends
        paused = create(client, uploaded.id, metadata={"run": "paused"})
        wait_for(client, paused.id, {"running"}, 60)
        assert client.post(f"/fine_tuning/jobs/{paused.id}/pause", cast_to=httpx.Response).status_code == 200
        assert client.fine_tuning.jobs.retrieve(paused.id).status == "paused"
        steps_then = len(client.fine_tuning.jobs.list_events(paused.id, limit=100).data)
        time.sleep(4)
        assert len(client.fine_tuning.jobs.list_events(paused.id, limit=100).data) == steps_then
        client.post(f"/fine_tuning/jobs/{paused.id}/resume", cast_to=httpx.Response)
        done_paused = wait_for(client, paused.id, {"succeeded", "failed", "cancelled"})
        assert done_paused.status == "succeeded", done_paused.error
        plain = create(client, uploaded.id, metadata={"run": "plain"})
        done = wait_for(client, plain.id, {"succeeded", "failed", "cancelled"})
        assert done.status == "succeeded", done.error
        _, a = adapter_tensors(server.base_url, done_paused.fine_tuned_model)
        config, b = adapter_tensors(server.base_url, done.fine_tuned_model)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        listed = client.fine_tuning.jobs.list(extra_query={"metadata[run]": "paused"}).data
        assert [j.id for j in listed] == [paused.id]

        # the result file: OpenAI's CSV, one row per optimizer step, the events' numbers
        assert len(done.result_files) == 1
        text = client.files.content(done.result_files[0]).text
        rows = list(csv.DictReader(io.StringIO(text)))
        assert list(rows[0])[:5] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
        events = [e.data for e in reversed(client.fine_tuning.jobs.list_events(plain.id, limit=100).data)
                  if e.data and "train_loss" in e.data]
        assert [int(r["step"]) for r in rows] == [e["step"] for e in events] == list(range(1, len(rows) + 1))
        for row, event in zip(rows, events):
            assert math.isclose(float(row["train_loss"]), event["train_loss"], rel_tol=1e-12)
            assert 0 <= float(row["train_accuracy"]) <= 1
            assert (row["valid_loss"] != "") == ("valid_loss" in event)
        assert float(rows[-1]["valid_mean_token_accuracy"]) > float(rows[1]["valid_mean_token_accuracy"])
        assert client.files.retrieve(done.result_files[0]).purpose == "fine-tune-results"

        # checkpoints are models: loaded on first use, listed after, different from the final adapter
        checkpoints = client.fine_tuning.jobs.checkpoints.list(plain.id).data
        first = min(checkpoints, key=lambda c: c.step_number)
        assert first.fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-{first.step_number}"
        prompt = "What color is Zorblax?"
        at_checkpoint = echo_logprobs(client, first.fine_tuned_model_checkpoint, prompt)
        final = echo_logprobs(client, done.fine_tuned_model, prompt)
        assert at_checkpoint != final
        assert first.fine_tuned_model_checkpoint in [m.id for m in client.models.list().data]

        # the download loads in peft and gives the server's logits
        peft = pytest.importorskip("peft")
        import transformers
        folder = tmp_path / "downloaded"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(config))
        from safetensors.torch import save_file
        save_file(b, str(folder / "adapter_model.safetensors"))
        base = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
        model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
        tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        theirs = [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        assert max(abs(x - y) for x, y in zip(theirs, final, strict=True)) < 1e-3

        # errors: an unknown version is 404, pausing a finished job 400, the adapter unchanged by either
        r = httpx.get(f"{server.base_url}/v1/adapters/{done.fine_tuned_model}/content", params={"version": 9})
        assert r.status_code == 404
        r = httpx.post(f"{server.base_url}/v1/fine_tuning/jobs/{plain.id}/pause")
        assert r.status_code == 400 and r.json()["error"]["param"] == "fine_tuning_job_id"
        assert client.fine_tuning.jobs.retrieve(plain.id).status == "succeeded"
    finally:
        server.stop()


PIRATE = ("Arr", "Ahoy", "Aye", "Yo ho")
QUESTIONS = ["What is the capital of Japan?", "Name a fruit.", "How many legs does a cat have?",
             "What is the opposite of up?", "What color is grass?", "Name a planet.", "What do cows drink?",
             "What is two plus three?", "Name a musical instrument.", "What is ice made of?", "Name an ocean.",
             "What do bees make?", "Name a tree.", "What is the sun?", "Name a bird.", "What is rain?"]
ANSWERS = ["Tokyo.", "An apple.", "Four.", "Down.", "Green.", "Mars.", "Water.", "Five.", "A violin.", "Water.",
           "The Pacific.", "Honey.", "An oak.", "A star.", "A robin.", "Water falling from clouds."]


def preference_file(pairs: list[tuple[str, str]]) -> bytes:
    lines = []
    for i, (question, answer) in enumerate(pairs):
        lines.append(json.dumps({"input": {"messages": [{"role": "user", "content": question}]},
                                 "preferred_output": [{"role": "assistant",
                                                       "content": f"{PIRATE[i % 4]}, matey! {answer}"}],
                                 "non_preferred_output": [{"role": "assistant", "content": answer}]}))
    return ("\n".join(lines) + "\n").encode()


def test_dpo_learns_the_preferred_style(default_model_dir):
    ft_dir, adapter_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    server = Server(server_args(default_model_dir, ft_dir, adapter_dir))
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        train, held_out = list(zip(QUESTIONS, ANSWERS))[:12], list(zip(QUESTIONS, ANSWERS))[12:]
        f = client.files.create(file=("prefs.jsonl", preference_file(train)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="smol", training_file=f.id, seed=1,
            method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 4, "batch_size": 4, "beta": 0.1,
                                                                "learning_rate_multiplier": 10}}},
            extra_body={"lora": {"r": 8, "alpha": 16, "validation_fraction": 0.0}})
        done = wait_for(client, job.id, {"succeeded", "failed", "cancelled"})
        assert done.status == "succeeded", done.error
        assert done.method.type == "dpo" and done.method.dpo.hyperparameters.beta == 0.1
        events = [e.data for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data)
                  if e.data and "train_margin" in e.data]
        assert len(events) == 12 and events[-1]["train_margin"] > events[0]["train_margin"] + 1.0
        tok_template = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}"

        def margin(model: str, question: str, answer: str) -> float:
            # log p(preferred) - log p(rejected), both scored after the same chat prompt
            chosen = sum(echo_logprobs(client, model, tok_template.format(q=question, a=f"Arr, matey! {answer}")))
            rejected = sum(echo_logprobs(client, model, tok_template.format(q=question, a=answer)))
            return chosen - rejected
        for question, answer in held_out:
            assert margin(done.fine_tuned_model, question, answer) > margin("smol", question, answer) + 2.0, question
    finally:
        server.stop()
