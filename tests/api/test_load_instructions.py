"""The job page says, per artifact, how to load it in every runtime of its format, naming the artifact."""

from __future__ import annotations

import html

from storage.models import Artifact, new_id


def _artifact(db, job_id, kind, fmt, hub_url=None):
    art_id = new_id("art")
    with db.session() as s:
        s.add(Artifact(id=art_id, job_id=job_id, kind=kind, format=fmt, location=None, files=[], file_count=0, size_bytes=0,
                       sha256="ab" * 32, hub_url=hub_url))
    return art_id


def test_each_artifact_carries_its_runtimes_load_commands(client, db, submit):
    job_id = submit(formats=["gptq", "compressed-tensors"])["id"]
    gptq = _artifact(db, job_id, "model", "gptq")
    ct = _artifact(db, job_id, "compressed-tensors", "compressed-tensors")
    page = html.unescape(client.get(f"/jobs/{job_id}").data.decode())
    for art_id, fmt in ((gptq, "gptq"), (ct, "compressed-tensors")):
        block = page[page.index(f'id="load-{art_id}"'):]
        block = block[: block.index("</details>")]
        assert f"How to load {fmt}" in block and f"./{art_id}" in block
        assert f'vllm serve "./{art_id}"' in block
        assert f'AutoModelForCausalLM.from_pretrained("./{art_id}", device_map="auto")' in block
    assert "pip install transformers compressed-tensors" in page and "pip install transformers optimum gptqmodel" in page


def test_a_hub_artifact_loads_by_its_repo_id(client, db, submit):
    job_id = submit(destination={"store": True, "hub": {"repo_id": "team/tiny-gptq"}})["id"]
    art = _artifact(db, job_id, "model", "gptq", hub_url="https://huggingface.co/team/tiny-gptq")
    page = html.unescape(client.get(f"/jobs/{job_id}").data.decode())
    block = page[page.index(f'id="load-{art}"'):]
    assert 'vllm serve "team/tiny-gptq"' in block[: block.index("</details>")]


def test_the_live_page_reads_the_same_instructions_as_json(client, db, submit):
    job_id = submit()["id"]
    assert client.get(f"/jobs/{job_id}/loads").get_json() == {}
    art = _artifact(db, job_id, "model", "gguf")
    loads = client.get(f"/jobs/{job_id}/loads").get_json()
    assert [h["runtime"] for h in loads[art]] == ["llama.cpp", "ollama", "transformers"]
    assert loads[art][0]["code"] == f'llama-cli -m "./{art}/model.gguf" -p "def fib(n):"'
    missing = client.get("/jobs/job_nope/loads")
    assert missing.status_code == 404 and missing.get_json()["error"] == "not_found"
