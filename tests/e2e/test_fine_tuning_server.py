"""Fine-tuning through the HTTP API of a real server with the default model, driven by the `openai` client:
a made-up fact is learned and served by the new model name with no restart while the base keeps serving;
a server killed with SIGKILL mid-job resumes the job from its checkpoint."""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import Server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DATA = Path(__file__).parents[2] / "examples" / "made_up_colors.jsonl"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def server_args(model_dir, ft_dir, adapter_dir) -> list[str]:
    return ["--model", str(model_dir), "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8",
            "--served-model-name", "smol", "--fine-tuning-dir", str(ft_dir), "--adapter-dir", str(adapter_dir)]


def ask(client, model: str, question: str) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=12, temperature=0.0)
    return reply.choices[0].message.content


def wait_for(client, job_id: str, statuses: set[str], timeout_s: float = 600.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(1.0)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout_s}s")


def create_job(client, file_id: str, **extension):
    return client.fine_tuning.jobs.create(
        model="smol", training_file=file_id, suffix="colors", seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": extension.pop("n_epochs", 8), "batch_size": 4, "learning_rate_multiplier": 10}}},
        extra_body={"lora": {"r": 8, "alpha": 16, "target_modules": ALL_LINEAR, "validation_fraction": 0.0,
                             "self_distillation": 0.0, **extension}})


def test_fine_tune_learns_a_made_up_fact_and_serves_it_live(default_model_dir):
    ft_dir, adapter_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    server = Server(server_args(default_model_dir, ft_dir, adapter_dir))
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        assert "teal" not in ask(client, "smol", "What color is Zorblax?").lower()
        uploaded = client.files.create(file=DATA.open("rb"), purpose="fine-tune")
        assert uploaded.purpose == "fine-tune" and uploaded.bytes == DATA.stat().st_size
        job = create_job(client, uploaded.id)
        assert job.status in ("queued", "running") and job.hyperparameters.n_epochs == 8
        # a MixLoRA job on the same data trains in the same batched steps (issue 20)
        mix = create_job(client, uploaded.id, type="mixlora", num_experts=2, top_k=1, n_epochs=4)

        served_during_training = []  # the base keeps answering while the job trains

        def traffic() -> None:
            while len(served_during_training) < 4:
                served_during_training.append(ask(client, "smol", "Name a fruit."))
        worker = threading.Thread(target=traffic)
        worker.start()
        wait_for(client, job.id, {"running"}, 60)
        worker.join(300)
        assert len(served_during_training) == 4 and all(served_during_training)
        assert client.fine_tuning.jobs.retrieve(job.id).status == "running"  # they were served mid-job

        done = wait_for(client, job.id, {"succeeded", "failed", "cancelled"})
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model == f"ft:smol:colors:{job.id}"
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        losses = [e.data["train_loss"] for e in events if e.data and "train_loss" in e.data]
        assert len(losses) == 40 and losses[-1] > 5 * losses[0]  # events are newest first
        assert done.fine_tuned_model in [m.id for m in client.models.list().data]
        # the new model answers the made-up facts; the base still does not know them
        assert "teal" in ask(client, done.fine_tuned_model, "What color is Zorblax?").lower()
        assert "crimson" in ask(client, done.fine_tuned_model, "Which color does Wexley have?").lower()
        assert "teal" not in ask(client, "smol", "What color is Zorblax?").lower()

        # the MixLoRA job: published in MoE-PEFT's format, served, its load-balance loss in every step's event
        done_mix = wait_for(client, mix.id, {"succeeded", "failed", "cancelled"})
        assert done_mix.status == "succeeded", done_mix.error
        mix_events = [e.data for e in client.fine_tuning.jobs.list_events(mix.id, limit=100).data
                      if e.data and "train_loss" in e.data]
        assert len(mix_events) == 20 and all(0 < e["train_router_aux_loss"] < 0.1 for e in mix_events)
        from tests.e2e.test_fine_tuning_product import adapter_tensors
        config, tensors = adapter_tensors(server.base_url, done_mix.fine_tuned_model)
        assert config["peft_type"] == "MIXLORA" and config["num_experts"] == 2 and config["top_k"] == 1
        assert "mixlora.layers.29.mlp.down_proj.experts.1.lora_B.weight" in tensors
        assert "teal" in ask(client, done_mix.fine_tuned_model, "What color is Zorblax?").lower()
    finally:
        server.stop()


def test_a_killed_server_resumes_the_job_from_its_checkpoint(default_model_dir):
    ft_dir, adapter_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    server = Server(server_args(default_model_dir, ft_dir, adapter_dir))
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    uploaded = client.files.create(file=DATA.open("rb"), purpose="fine-tune")
    job = create_job(client, uploaded.id, n_epochs=3, checkpoint_every=2)
    deadline = time.monotonic() + 300
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.5)
    server.kill()  # SIGKILL to the server and its engine process
    server = Server(server_args(default_model_dir, ft_dir, adapter_dir))
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        done = wait_for(client, job.id, {"succeeded", "failed", "cancelled"})
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
        assert any(m.startswith("Resumed from the checkpoint at step") for m in messages), messages
        assert ask(client, done.fine_tuned_model, "What color is Zorblax?")  # served after the restart
        with pytest.raises(openai.ConflictError):
            client.fine_tuning.jobs.cancel(job.id)  # a finished job cannot be cancelled
    finally:
        server.stop()
