"""How to load an artifact in each runtime that reads its format (for the model card and the job page)."""

from __future__ import annotations

from quantfarm import registry

_PIP = {
    "gptq": "pip install transformers optimum gptqmodel",
    "awq": "pip install transformers gptqmodel",
    "bitsandbytes": "pip install transformers bitsandbytes",
    "compressed-tensors": "pip install transformers compressed-tensors",
    "gguf": "pip install transformers gguf",
    "bitsandbytes-peft": "pip install transformers bitsandbytes peft",
}
GGUF_FILE = "model.gguf"


def _local(ref: str) -> bool:
    return ref.startswith((".", "/", "<"))


def _transformers(fmt: str, ref: str) -> str:
    extra = f', gguf_file="{GGUF_FILE}"' if fmt == "gguf" else ""
    return "\n".join([
        f"# {_PIP.get(fmt, 'pip install transformers')}",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{ref}"{extra}, device_map="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{ref}"{extra})',
    ])


def _llama_cpp(fmt: str, ref: str) -> str:
    if _local(ref):
        return f'llama-cli -m "{ref}/{GGUF_FILE}" -p "def fib(n):"'
    return f'llama-cli -hf "{ref}" -p "def fib(n):"'


def _ollama(fmt: str, ref: str) -> str:
    if _local(ref):
        return f"printf 'FROM {ref}/{GGUF_FILE}\\n' > Modelfile\nollama create my-model -f Modelfile\nollama run my-model"
    return f"ollama run hf.co/{ref}"


def _vllm(fmt: str, ref: str) -> str:
    return f'pip install vllm\nvllm serve "{ref}"'


def _peft(fmt: str, ref: str) -> str:
    return "\n".join([
        f"# {_PIP[fmt]}",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{ref}", device_map="auto")  # the NF4 base',
        f'model = PeftModel.from_pretrained(base, "{ref}", subfolder="adapter", is_trainable=True)  # ready for QLoRA',
        f'tokenizer = AutoTokenizer.from_pretrained("{ref}")',
    ])


_SNIPPETS = {"peft": ("python", _peft), "transformers": ("python", _transformers), "vllm": ("bash", _vllm), "llama.cpp": ("bash", _llama_cpp),
             "ollama": ("bash", _ollama)}


def load_instructions(fmt: str, ref: str) -> list[dict[str, str]]:
    """Return ``[{runtime, language, code}]`` for every runtime the format's registry entry names.

    ``ref`` is what the user passes to the loader: a Hub repo id or a local folder.
    """
    entry = registry.format_entry(fmt)
    out = []
    for runtime in entry.runtimes if entry else ("transformers",):
        language, snippet = _SNIPPETS[runtime]
        out.append({"runtime": runtime, "language": language, "code": snippet(fmt, ref)})
    return out


def artifact_loads(job: dict) -> dict[str, list[dict[str, str]]]:
    """How to load each artifact of a job view: from its Hub repo, or from a folder named after the artifact."""
    hub = ((job.get("spec") or {}).get("destination") or {}).get("hub") or {}
    out = {}
    for a in job.get("artifacts", []):
        ref = hub["repo_id"] if a.get("hub_url") and hub.get("repo_id") else f"./{a['id']}"
        out[a["id"]] = load_instructions(a["format"], ref)
    return out
