"""A real server with LoRA, driven by the official openai client: upload an adapter, chat with it,
re-publish it while a stream on the old version runs, unload it; hostile uploads change nothing."""
from __future__ import annotations

import io
import json
import math
import re
import tarfile
import threading
import zipfile
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.engine.llm_engine import _read_model_config
from tests.adapters.peft_factory import write_random_peft
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": "Bearer admin-s3cret"}
PROMPT = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def lora_server(default_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    srv = Server(["--model", str(default_model_dir), "--dtype", "float32", "--max-model-len", "512",
                  "--max-num-seqs", "16", "--served-model-name", "smol", "--admin-api-key", "admin-s3cret",
                  "--adapter-dir", str(store), "--max-lora-rank", "16", "--max-upload-bytes", "8MiB"])
    srv.store = store
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def smol_config(default_model_dir):
    return _read_model_config(str(default_model_dir))


@pytest.fixture
def client(lora_server):
    return openai.OpenAI(base_url=lora_server.base_url + "/v1", api_key="unused", max_retries=0)


def tar_gz(folder: Path, prefix: str = "adapter") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for f in sorted(folder.iterdir()):
            tf.add(f, arcname=f"{prefix}/{f.name}")
    return buf.getvalue()


def zipped(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def upload(server, name: str, data: bytes, filename: str = "a.tar.gz", headers=ADMIN) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/adapters", data={"name": name}, files={"file": (filename, data)},
                      headers=headers, timeout=60)


def chat(client, model: str, max_tokens: int = 24) -> str:
    r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0,
                                       extra_body={"ignore_eos": True})
    return r.choices[0].message.content


def test_upload_chat_republish_during_stream_unload(lora_server, client, smol_config, tmp_path):
    v1 = write_random_peft(tmp_path / "v1", smol_config, r=8, seed=1, std=0.04)
    v2 = write_random_peft(tmp_path / "v2", smol_config, r=16, seed=2, std=0.04,
                           target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert upload(lora_server, "poet", tar_gz(v1), headers={}).status_code == 401  # admin key required
    r = upload(lora_server, "poet", tar_gz(v1))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["rank"] == 8

    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"smol", "poet"} and models["poet"].parent == "smol"
    base_text, v1_text = chat(client, "smol", 60), chat(client, "poet", 60)
    assert v1_text != base_text and chat(client, "poet", 60) == v1_text

    # a long stream on v1; v2 is published after its first tokens; the stream must end on v1's weights
    stream = client.chat.completions.create(model="poet", messages=PROMPT, max_tokens=60, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    pieces, published = [], threading.Event()
    for i, chunk in enumerate(stream):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if i == 3:
            mid_stream = httpx.get(lora_server.base_url + "/metrics").text  # what an endpoint picker reads
            r = upload(lora_server, "poet", tar_gz(v2))
            assert r.status_code == 201 and r.json()["version"] == 2, r.text
            published.set()
            v2_text = chat(client, "poet", 60)  # served while the v1 stream is still running
    assert published.is_set() and "".join(pieces) == v1_text
    assert v2_text not in (v1_text, base_text) and chat(client, "poet", 60) == v2_text

    info = httpx.get(lora_server.base_url + "/v1/adapters/poet").json()
    assert [v["version"] for v in info["versions"]] == [1, 2] and info["version"] == 2 and info["rank"] == 16
    assert info["versions"][1]["resident"] in ("device", "host")

    metrics = httpx.get(lora_server.base_url + "/metrics").text
    assert 'loraplex:generation_tokens_total{model_name="poet"}' in metrics
    assert "loraplex:lora_pool_pages_used" in metrics and "loraplex:lora_adapter_load_seconds_count" in metrics
    assert 'running_lora_adapters="poet"' in mid_stream and 'max_lora="' in mid_stream
    assert re.search(r'loraplex:lora_adapter_loaded\{adapter_name="poet",level="(device|host)",rank="16",'
                     r'version="2"\} 1\.0', metrics)

    r = httpx.post(lora_server.base_url + "/v1/unload_lora_adapter", json={"lora_name": "poet"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        chat(client, "poet")
    assert "poet" not in {m.id for m in client.models.list().data}
    assert chat(client, "smol", 60) == base_text


def test_vllm_load_lora_adapter_from_a_path(lora_server, client, smol_config, tmp_path):
    folder = write_random_peft(tmp_path / "x", smol_config, r=4, seed=5, std=0.04)
    url = lora_server.base_url
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "pathy", "lora_path": str(folder)}, headers=ADMIN)
    assert r.status_code == 200 and "added successfully" in r.text
    first = chat(client, "pathy")
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "pathy", "lora_path": str(folder)}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists"
    other = write_random_peft(tmp_path / "y", smol_config, r=4, seed=6, std=0.04)
    r = httpx.post(url + "/v1/load_lora_adapter",
                   json={"lora_name": "pathy", "lora_path": str(other), "load_inplace": True}, headers=ADMIN)
    assert r.status_code == 200
    assert chat(client, "pathy") != first
    assert httpx.delete(url + "/v1/adapters/pathy", headers=ADMIN).json()["deleted"] is True
    assert httpx.delete(url + "/v1/adapters/pathy", headers=ADMIN).status_code == 404


def _store_listing(server) -> tuple:
    files = sorted(str(p.relative_to(server.store)) for p in server.store.rglob("*")
                   if "tmp" not in p.parts and not p.name.startswith("store.sqlite3"))
    return httpx.get(server.base_url + "/v1/adapters").json()["data"], files


def test_hostile_uploads_are_refused_and_change_nothing(lora_server, smol_config, tmp_path):
    good = write_random_peft(tmp_path / "good", smol_config, r=8, seed=9)
    config, weights = (good / "adapter_config.json").read_bytes(), (good / "adapter_model.safetensors").read_bytes()
    tensors = load_file(str(good / "adapter_model.safetensors"))

    def with_tensors(change) -> bytes:
        t = {k: v.clone() for k, v in tensors.items()}
        change(t)
        buf = tmp_path / "w.safetensors"
        save_file(t, str(buf))
        return buf.read_bytes()

    def with_config(**changes) -> bytes:
        return json.dumps({**json.loads(config), **changes}).encode()

    key = next(iter(tensors))
    traversal = io.BytesIO()
    with tarfile.open(fileobj=traversal, mode="w:gz") as tf:
        for name, data in (("../../evil.txt", b"x"), ("adapter_config.json", config)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    symlink = io.BytesIO()
    with tarfile.open(fileobj=symlink, mode="w:gz") as tf:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    cases = {
        "traversal": (traversal.getvalue(), 400),
        "absolute": (zipped({"/tmp/abs.json": config}), 400),
        "symlink": (symlink.getvalue(), 400),
        "zip bomb": (zipped({"adapter_config.json": config, "adapter_model.safetensors": b"\0" * (40 << 20)}), 413),
        "oversize": (b"PK\x03\x04" + torch.randn(3 << 20).numpy().tobytes(), 413),
        "pickle": (zipped({"adapter_config.json": config, "adapter_model.bin": b"\x80\x04cos\nsystem\n."}), 400),
        "not an archive": (b"hello world", 400),
        "NaN weights": (zipped({"adapter_config.json": config, "adapter_model.safetensors":
                                with_tensors(lambda t: t[key].fill_(math.nan))}), 400),
        "wrong shapes": (zipped({"adapter_config.json": config, "adapter_model.safetensors":
                                 with_tensors(lambda t: t.update({key: torch.zeros(8, 100)}))}), 400),
        "rank too high": (zipped({"adapter_config.json": with_config(r=32), "adapter_model.safetensors": weights}), 422),
        "DoRA without magnitudes": (zipped({"adapter_config.json": with_config(use_dora=True),
                                            "adapter_model.safetensors": weights}), 400),
        "DoRA magnitude shape": (zipped({"adapter_config.json": with_config(use_dora=True), "adapter_model.safetensors":
                                         with_tensors(lambda t: t.update({k.replace("lora_A.weight",
                                                      "lora_magnitude_vector"): torch.ones(7) for k in list(t)
                                                      if "lora_A" in k}))}), 400),
        "unknown module": (zipped({"adapter_config.json": config, "adapter_model.safetensors": with_tensors(
            lambda t: t.update({"base_model.model.model.layers.0.mlp.fc9.lora_A.weight": torch.zeros(8, 4)}))}), 400),
        "modules_to_save without its weights": (zipped({"adapter_config.json": with_config(modules_to_save=["lm_head"]),
                                                        "adapter_model.safetensors": weights}), 400),
        "modules_to_save we do not serve": (zipped({"adapter_config.json": with_config(modules_to_save=["norm"]),
                                                    "adapter_model.safetensors": weights}), 422),
    }
    before = _store_listing(lora_server)
    for what, (data, status) in cases.items():
        r = upload(lora_server, "evil", data)
        assert r.status_code == status, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"], what
    for bad_name in ("../x", "a/b", ".hidden", "smol"):
        r = upload(lora_server, bad_name, zipped({"adapter_config.json": config, "adapter_model.safetensors": weights}))
        assert r.status_code in (400, 404, 409), (bad_name, r.text)
    assert _store_listing(lora_server) == before
    assert not Path("/tmp/abs.json").exists() and not (lora_server.store.parent / "evil.txt").exists()
    # and the server still serves
    r = upload(lora_server, "fine", zipped({"adapter_config.json": config, "adapter_model.safetensors": weights}))
    assert r.status_code == 201, r.text


def test_nf4_server_with_an_adapter(default_model_dir, smol_config, tmp_path):
    folder = write_random_peft(tmp_path / "q", smol_config, r=8, seed=3, std=0.04)
    srv = Server(["--model", str(default_model_dir), "--dtype", "float32", "--max-model-len", "256",
                  "--max-num-seqs", "8", "--served-model-name", "smol", "--quantization", "nf4",
                  "--lora-modules", f"quokka={folder}"])
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"smol", "quokka"}
        base, adapted = chat(client, "smol", 24), chat(client, "quokka", 24)
        assert base and adapted and base != adapted
        metrics = httpx.get(srv.base_url + "/metrics").text
        weights = [line for line in metrics.splitlines() if line.startswith('loraplex:memory_bytes{') and 'weights' in line]
        assert weights and float(weights[0].split()[-1]) < 0.6 * 651306368  # well under the fp32 weights
    finally:
        srv.stop()


def test_a_pinned_version_serves_its_own_weights(lora_server, client, smol_config, tmp_path):
    """`model: "name@N"` (or `name@vN`) serves version N however many versions were published after it; the
    name alone serves the newest; a version that does not exist is a 404."""
    folders = [write_random_peft(tmp_path / f"v{i}", smol_config, r=8, seed=70 + i, std=0.05) for i in (1, 2, 3)]
    answers = []
    for folder in folders[:2]:
        assert upload(lora_server, "fern", tar_gz(folder)).status_code == 201
        answers.append(chat(client, "fern"))
    assert answers[0] != answers[1]
    assert chat(client, "fern@1") == answers[0] and chat(client, "fern@v1") == answers[0]
    assert chat(client, "fern@2") == answers[1] == chat(client, "fern")
    assert upload(lora_server, "fern", tar_gz(folders[2])).status_code == 201  # v3 retires v1 and v2 as current
    v3 = chat(client, "fern")
    assert v3 not in answers
    assert [chat(client, f"fern@{n}") for n in (1, 2, 3, 1)] == [*answers, v3, answers[0]]
    r = client.chat.completions.with_raw_response.create(model="fern@1", messages=PROMPT, max_tokens=2)
    assert json.loads(r.text)["model"] == "fern@1"
    for missing in ("fern@9", "nope@1"):
        with pytest.raises(openai.NotFoundError):
            chat(client, missing)
    assert httpx.delete(lora_server.base_url + "/v1/adapters/fern", headers=ADMIN).status_code == 200
    with pytest.raises(openai.NotFoundError):
        chat(client, "fern@1")


def test_adapter_metadata_with_the_upload_and_edited_later(lora_server, smol_config, tmp_path):
    folder = write_random_peft(tmp_path / "a", smol_config, r=8, seed=81, std=0.05)
    base = lora_server.base_url
    r = httpx.post(base + "/v1/adapters", headers=ADMIN, timeout=60, files={"file": ("a.tar.gz", tar_gz(folder))},
                   data={"name": "sage", "description": "Answers like a sage.", "examples": '["What is time?"]'})
    assert r.status_code == 201 and r.json()["metadata"] == {"description": "Answers like a sage.",
                                                             "examples": ["What is time?"]}
    listed = {a["id"]: a for a in httpx.get(base + "/v1/adapters").json()["data"]}
    assert listed["sage"]["metadata"]["examples"] == ["What is time?"] and listed["sage"]["resident"]
    r = httpx.patch(base + "/v1/adapters/sage", headers=ADMIN, json={"metadata": {"examples": ["Why?", "How?"]}})
    assert r.status_code == 200 and r.json()["metadata"] == {"description": "Answers like a sage.",
                                                             "examples": ["Why?", "How?"]}
    for bad in ({"metadata": {"examples": "Why?"}}, {"metadata": {"colour": 1}}, {"rank": 4}, [1]):
        r = httpx.patch(base + "/v1/adapters/sage", headers=ADMIN, json=bad)
        assert r.status_code == 400, r.text
    assert httpx.patch(base + "/v1/adapters/sage", json={"metadata": {}}).status_code == 401  # admin only
    assert httpx.patch(base + "/v1/adapters/nope", headers=ADMIN, json={"metadata": {}}).status_code == 404
    r = httpx.post(base + "/v1/adapters", headers=ADMIN, timeout=60, files={"file": ("a.tar.gz", tar_gz(folder))},
                   data={"name": "sage", "examples": "not json"})
    assert r.status_code == 400
    got = httpx.get(base + "/v1/adapters/sage").json()
    assert got["metadata"]["examples"] == ["Why?", "How?"] and [v["version"] for v in got["versions"]] == [1]


def test_mixlora_upload_serves_beside_lora_and_hostile_mixlora_is_refused(lora_server, client, smol_config, tmp_path):
    """A MixLoRA adapter (MoE-PEFT format, uploaded as MoE-PEFT writes it: adapter_model.bin, which an upload
    refuses, then safetensors) is served under its name beside a LoRA and the base; answers equal alone and
    concurrently; malformed MixLoRA uploads are 400/422 and leave the store as it was."""
    from loraplex.adapters.synthetic import write_random_mixlora
    mix = write_random_mixlora(tmp_path / "mix", smol_config, r=2, alpha=4, num_experts=4, top_k=2, seed=11, std=0.05,
                               target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), write_bin=True)
    bin_only = {"adapter_config.json": (mix / "adapter_config.json").read_bytes(),
                "adapter_model.bin": (mix / "adapter_model.bin").read_bytes()}
    r = upload(lora_server, "moe", zipped(bin_only))
    assert r.status_code == 400 and "pickle" in r.json()["error"]["message"]  # never unpickled from uploads
    (mix / "adapter_model.bin").unlink()
    r = upload(lora_server, "moe", tar_gz(mix))
    assert r.status_code == 201, r.text
    assert r.json()["type"] == "mixlora" and httpx.get(lora_server.base_url + "/v1/adapters/moe").json()["type"] == \
        "mixlora"
    assert upload(lora_server, "plain", tar_gz(write_random_peft(tmp_path / "p", smol_config, r=8, seed=12,
                                                                 std=0.05))).status_code == 201
    alone = {m: chat(client, m) for m in ("smol", "moe", "plain")}
    assert len(set(alone.values())) == 3
    results: dict[str, str] = {}
    threads = [threading.Thread(target=lambda m=m, i=i: results.__setitem__(f"{m}{i}", chat(client, m)))
               for m in alone for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {f"{m}{i}": alone[m] for m in alone for i in range(2)}

    config = json.loads((mix / "adapter_config.json").read_text())
    tensors = load_file(str(mix / "adapter_model.safetensors"))

    def case(config_changes=None, change=None) -> bytes:
        t = {k: v.clone() for k, v in tensors.items()}
        if change:
            change(t)
        save_file(t, str(tmp_path / "w.safetensors"))
        return zipped({"adapter_config.json": json.dumps({**config, **(config_changes or {})}).encode(),
                       "adapter_model.safetensors": (tmp_path / "w.safetensors").read_bytes()})
    expert = "mixlora.layers.3.mlp.up_proj.experts.{e}.lora_A.weight"
    cases = {
        "fewer experts than num_experts": (case({"num_experts": 5}), 400),
        "an expert beyond num_experts": (case(change=lambda t: t.update({expert.format(e=4): t[expert.format(e=0)].clone()})),
                                         400),
        "expert shape": (case(change=lambda t: t.update({expert.format(e=1): torch.zeros(2, 100)})), 400),
        "router for a missing layer": (case(change=lambda t: t.update(
            {"mixlora.layers.30.mlp.moe_gate.weight": torch.zeros(4, 576)})), 400),
        "router shape": (case(change=lambda t: t.update({"mixlora.layers.0.mlp.moe_gate.weight": torch.zeros(3, 576)})),
                         400),
        "NaN router": (case(change=lambda t: t["mixlora.layers.2.mlp.moe_gate.weight"].fill_(math.nan)), 400),
        "top_k > num_experts": (case({"top_k": 5}), 400),
        "more experts than the server takes": (case({"num_experts": 17}), 400),
        "switch routing": (case({"routing_strategy": "mixlora-switch"}), 422),
        "gelu experts on a silu model": (case({"act_fn": "gelu"}), 422),
    }
    before = _store_listing(lora_server)
    for what, (data, status) in cases.items():
        r = upload(lora_server, "evil-moe", data)
        assert r.status_code == status, (what, r.status_code, r.text)
        assert r.json()["error"]["message"], what
    assert _store_listing(lora_server) == before
    assert chat(client, "moe") == alone["moe"]
    for name in ("moe", "plain"):
        assert httpx.delete(lora_server.base_url + f"/v1/adapters/{name}", headers=ADMIN).status_code == 200


def test_lora_scale_and_adapter_combinations(lora_server, client, smol_config, tmp_path):
    """lora_scale 0 is the base model and 1 the adapter; `adapters` with weights (0 drops one) and merge methods;
    requests at different strengths and combinations running together answer as they do alone; bad
    combinations are 4xx and change nothing."""
    for name, r, seed in (("sharp", 8, 11), ("soft", 8, 12), ("thin", 4, 13)):
        folder = write_random_peft(tmp_path / name, smol_config, r=r, seed=seed, std=0.04)
        assert upload(lora_server, name, tar_gz(folder)).status_code == 201

    def ask(model="smol", **extra) -> str:
        r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=24, temperature=0,
                                           extra_body={"ignore_eos": True, **extra})
        return r.choices[0].message.content

    base, sharp = ask(), ask("sharp")
    assert sharp != base
    assert ask("sharp", lora_scale=0.0) == base and ask("sharp", lora_scale=1.0) == sharp
    half = ask("sharp", lora_scale=0.5)
    assert half not in (base, sharp)
    assert ask(adapters=[{"name": "sharp"}]) == sharp
    assert ask(adapters=[{"name": "sharp", "weight": 1.0}, {"name": "soft", "weight": 0.0}]) == sharp
    assert ask(adapters=[{"name": "sharp@1", "weight": 0.5}]) == half
    mixed = {"half": dict(model="sharp", lora_scale=0.5), "sharp": dict(model="sharp"), "base": {},
             "linear": dict(adapters=[{"name": "sharp", "weight": 0.7}, {"name": "thin", "weight": 0.6}]),
             "ties": dict(adapters=[{"name": "sharp"}, {"name": "soft", "weight": 0.8}],
                          merge={"method": "ties", "density": 0.5}),
             "dare": dict(adapters=[{"name": "sharp"}, {"name": "soft"}],
                          merge={"method": "dare_ties", "density": 0.6, "seed": 3})}
    alone = {k: ask(**kw) for k, kw in mixed.items()}
    assert len(set(alone.values())) == len(alone)
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda k=k, kw=kw: together.__setitem__(k, ask(**kw))) for k, kw in
               mixed.items() for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone

    models = sorted(m.id for m in client.models.list().data)
    bad = [
        (dict(adapters=[{"name": "sharp"}, {"name": "nope"}]), 404, "nope"),
        (dict(adapters=[{"name": "sharp"}, {"name": "soft"}], merge={"method": "ties", "density": -0.5}), 400,
         "density"),
        (dict(adapters=[{"name": "sharp"}, {"name": "thin"}], merge={"method": "ties", "density": 0.5}), 400,
         "one rank"),
        (dict(adapters=[{"name": "sharp", "weight": 0.1 * i} for i in range(9)]), 400, "1 to 8"),
        (dict(model="sharp", adapters=[{"name": "soft"}]), 400, "base model"),
        (dict(merge={"method": "ties"}), 400, "merge"),
        (dict(lora_scale=0.5), 400, "lora_scale needs an adapter"),
        (dict(adapters=[{"name": "smol"}]), 400, "base model"),
        (dict(adapters=[{"name": "sharp"}, {"name": "soft"}], merge={"method": "svd"}), 400, "merge method"),
    ]
    for body, status, message in bad:
        body = {"model": "smol", "messages": PROMPT, "max_tokens": 4, **body}
        r = httpx.post(lora_server.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == status and message in r.json()["error"]["message"], (body, r.text)
    assert sorted(m.id for m in client.models.list().data) == models


def test_dora_upload_serves_and_refuses_strength(lora_server, client, smol_config, tmp_path):
    """A DoRA adapter (PEFT use_dora) uploads as type dora, answers unlike its plain-LoRA twin, runs beside other
    requests, and refuses lora_scale and combinations with a 400."""
    dora = write_random_peft(tmp_path / "dora", smol_config, r=8, seed=21, std=0.04, use_dora=True)
    r = upload(lora_server, "dora-poet", tar_gz(dora))
    assert r.status_code == 201, r.text
    assert r.json()["type"] == "dora"
    twin = tmp_path / "twin"
    twin.mkdir()
    state = {k: v for k, v in load_file(str(dora / "adapter_model.safetensors")).items() if "magnitude" not in k}
    save_file(state, str(twin / "adapter_model.safetensors"))
    (twin / "adapter_config.json").write_text(json.dumps({**json.loads((dora / "adapter_config.json").read_text()),
                                                          "use_dora": False}))
    assert upload(lora_server, "dora-twin", tar_gz(twin)).status_code == 201
    answers = {m: chat(client, m) for m in ("smol", "dora-poet", "dora-twin")}
    assert len(set(answers.values())) == 3
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda m=m: together.__setitem__(m, chat(client, m))) for m in answers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == answers
    for extra in ({"lora_scale": 0.5}, {"adapters": [{"name": "dora-poet"}, {"name": "dora-twin"}]}):
        body = {"model": "dora-poet" if "lora_scale" in extra else "smol", "messages": PROMPT, "max_tokens": 4,
                **extra}
        r = httpx.post(lora_server.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and "DoRA" in r.json()["error"]["message"], r.text


def test_adapter_with_its_own_output_head(lora_server, client, smol_config, default_model_dir, tmp_path):
    """modules_to_save=["lm_head"] (a head trained whole, PEFT's layout), loaded from a path: it answers unlike its
    LoRA-only twin, beside other requests, and refuses lora_scale with a 400."""
    base = load_file(str(default_model_dir / "model.safetensors"))
    embed = base.get("model.embed_tokens.weight")
    head = base.get("lm_head.weight", embed)  # tied: the head is the embedding
    folder = write_random_peft(tmp_path / "headed", smol_config, r=4, seed=31, std=0.04,
                               extra_config={"modules_to_save": ["lm_head"]})
    state = load_file(str(folder / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    state["base_model.model.lm_head.weight"] = (head.float() + 0.05 * torch.randn(head.shape, generator=gen)).to(
        torch.bfloat16)
    save_file(state, str(folder / "adapter_model.safetensors"))
    twin = write_random_peft(tmp_path / "twin", smol_config, r=4, seed=31, std=0.04)
    url = lora_server.base_url
    for name, path in (("headed", folder), ("headless", twin)):
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                       headers=ADMIN, timeout=120)
        assert r.status_code == 200, r.text
    answers = {m: chat(client, m) for m in ("smol", "headed", "headless")}
    assert len(set(answers.values())) == 3
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda m=m: together.__setitem__(m, chat(client, m))) for m in answers for _ in
               range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == answers
    r = httpx.post(url + "/v1/chat/completions", json={"model": "headed", "messages": PROMPT, "max_tokens": 4,
                                                        "lora_scale": 0.5}, timeout=60)
    assert r.status_code == 400 and "lm_head" in r.json()["error"]["message"], r.text
    for name in ("headed", "headless"):
        assert httpx.delete(url + f"/v1/adapters/{name}", headers=ADMIN).status_code == 200
