"""Our GGUF against llama.cpp's own on the bench model: size, tensor types and perplexity side by side.

Ours: the ``gguf`` method run through the engine as a worker runs a job (Q8_0, Q4_K_M, and
Q4_K_M with the importance matrix from our calibration pass). llama.cpp's: ``convert_hf_to_gguf.py``
to F32, then ``llama-quantize`` (Q8_0, Q4_K_M, and Q4_K_M with ``llama-imatrix``'s matrix
computed on the same calibration windows, decoded to text).

One evaluator for every file: ``llama-perplexity``. The F32 run tokenizes the held-out text
(the formats bench's held-out windows, decoded) and saves the tokens and its logits
(``--kl-divergence-base``); every other file is scored on those saved tokens
(``--kl-divergence``), so all see the same windows, and the KL divergence to F32 comes too.
Each file is also scored by transformers' GGUF loader on the held-out token windows
(``bench/tools/eval_ppl.py``, all tokens of each window; llama-perplexity scores the second
half of each window only, so the two columns differ in level).

    python -m bench.llamacpp --llama-bin DIR --llama-src DIR [--model DIR] [--quick] [--no-hf] [--no-write]

``--llama-bin`` holds llama-quantize, llama-imatrix and llama-perplexity (default $LLAMA_CPP_BIN);
``--llama-src`` is the llama.cpp tree with convert_hf_to_gguf.py and gguf-py (default $LLAMA_CPP_SRC).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import CACHE, OUR_PYTHON, THREADS, TOOLS, fmt, md_table, pinned_env, run_measured, started_and_load, write_section
from bench.data import EVAL_WINDOWS, SEQ_LEN, bench_model, windows

BEGIN, END = "<!-- llamacpp:begin -->", "<!-- llamacpp:end -->"
OURS = [("Q8_0", {"quant_type": "Q8_0"}), ("Q4_K_M", {"quant_type": "Q4_K_M"}), ("Q4_K_M + imatrix", {"quant_type": "Q4_K_M", "imatrix": True})]
CONVERT_REQ = "sentencepiece>=0.1.98,<0.3.0"  # convert_hf_to_gguf.py imports it for every Llama (requirements-convert_legacy_llama.txt)


def _sh(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 3600) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout, check=False)
    out = r.stdout + r.stderr
    log.write_text(" ".join(map(str, cmd)) + "\n" + out)
    if r.returncode:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({r.returncode}), log {log}:\n{out[-2000:]}")
    return out


def _convert_env() -> dict:
    """The convert script's environment: its sentencepiece installed beside (never into) our venv when missing."""
    env = pinned_env()
    if importlib.util.find_spec("sentencepiece") is None:
        site = CACHE / "llamacpp-site"
        if not (site / "sentencepiece").is_dir():
            subprocess.run([str(OUR_PYTHON), "-m", "pip", "install", "-q", "--target", str(site), CONVERT_REQ], check=True)
        env["PYTHONPATH"] = str(site)
    return env


def _text(ids_path: Path, tok, out: Path) -> Path:
    """The windows of ``ids_path`` decoded back to text, one after another (special tokens left out)."""
    import torch

    out.write_text("".join(tok.decode(w, skip_special_tokens=True) for w in torch.load(ids_path).tolist()))
    return out


def ours(model: Path, work: Path, calib_samples: int) -> dict[str, Path]:
    import torch

    from quantfarm import spec
    from storage.artifacts import LocalStore
    from workers.engine.pipeline import QuantizeRequest
    from workers.engine.run import quantize

    files = {}
    for n, (label, options) in enumerate(OURS):
        req = QuantizeRequest(source_dir=model, method="gguf", options=spec.GGUFOptions(**options),
                              calibration=spec.Calibration(num_samples=calib_samples, seq_len=SEQ_LEN), formats=["gguf"])
        res = quantize(req, LocalStore(work / f"ours{n}-ckpt"), work / f"ours{n}", device=torch.device("cpu"))
        files[f"ours {label}"] = res.outputs[0].out_dir / "model.gguf"
    return files


def theirs(model: Path, work: Path, bin_dir: Path, src: Path, pre: str, calib_txt: Path, chunks: int) -> dict[str, Path]:
    def place(name: str) -> Path:  # each file as model.gguf in a folder of its own, as transformers' loader is pointed at it
        (work / name).mkdir(exist_ok=True)
        return work / name / "model.gguf"

    f32 = place("llama-F32")
    _sh([OUR_PYTHON, TOOLS / "llamacpp_convert.py", src, pre, model, "--outtype", "f32", "--outfile", f32], work / "convert.log", _convert_env())
    files = {"llama.cpp F32": f32}
    for label, qtype in (("Q8_0", "Q8_0"), ("Q4_K_M", "Q4_K_M")):
        files[f"llama.cpp {label}"] = place(f"llama-{label}")
        _sh([bin_dir / "llama-quantize", f32, files[f"llama.cpp {label}"], qtype, THREADS], work / f"quantize-{label}.log")
    imatrix = work / "imatrix.gguf"
    _sh([bin_dir / "llama-imatrix", "-m", f32, "-f", calib_txt, "-c", SEQ_LEN, "-b", SEQ_LEN, "--chunks", chunks, "--no-ppl",
         "-t", THREADS, "-o", imatrix], work / "imatrix.log")
    files["llama.cpp Q4_K_M + imatrix"] = place("llama-Q4_K_M-imatrix")
    _sh([bin_dir / "llama-quantize", "--imatrix", imatrix, f32, files["llama.cpp Q4_K_M + imatrix"], "Q4_K_M", THREADS],
        work / "quantize-imatrix.log")
    return files


def _num(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def llama_ppl(bin_dir: Path, path: Path, held_txt: Path, base: Path, chunks: int, log: Path, *, first: bool) -> dict:
    """llama-perplexity of ``path``: the first call writes ``base`` (tokens + logits), the others read it."""
    cmd = [bin_dir / "llama-perplexity", "-m", path, "-c", SEQ_LEN, "-b", SEQ_LEN, "-t", THREADS, "--kl-divergence-base", base]
    out = _sh(cmd + (["-f", held_txt, "--chunks", chunks] if first else ["--kl-divergence"]), log)
    return parse_ppl(out, first=first)


def parse_ppl(out: str, *, first: bool) -> dict:
    if first:
        return {"ppl": _num(r"Final estimate: PPL = ([\d.]+)", out)}
    # the closing statistics are sometimes cut from the captured output; the last per-chunk row carries the running value
    rows = re.findall(r"^\s*\d+\s+.*?([\d.]+) ±\s+[\d.]+ %\s*$", out, re.M)
    top = _num(r"Same top p:\s*([\d.]+)", out)
    return {"ppl": _num(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", out), "kld": _num(r"Mean\s+KLD:\s*([-\d.]+)", out),
            "same_top_p": top if top is not None else (float(rows[-1]) if rows else None)}


def base_tokens(base: Path) -> list[int]:
    """The tokens llama-perplexity saved at the head of a --kl-divergence-base file."""
    import numpy as np

    raw = base.read_bytes()
    assert raw[:8] == b"_logits_", base
    n_ctx, _n_vocab, n_chunk = np.frombuffer(raw[8:20], dtype=np.int32)
    return np.frombuffer(raw[20:20 + 4 * n_ctx * n_chunk], dtype=np.int32).tolist()


def describe(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(path)
    types: dict[str, int] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    tok = {k: hashlib.sha256(json.dumps(f.contents()).encode()).hexdigest()[:12] if k.endswith((".tokens", ".merges", ".token_type"))
           else f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}
    return {"size_bytes": path.stat().st_size, "types": dict(sorted(types.items())), "tokenizer": tok}


def compare(a: Path, b: Path) -> dict:
    """Tensor by tensor: the same GGML type, and how many of the quantized blocks are byte-identical."""
    import gguf
    import numpy as np

    ta, tb = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in (a, b))
    differ = sorted(f"{n} {ta[n].tensor_type.name}/{tb[n].tensor_type.name}" for n in ta if n in tb and ta[n].tensor_type != tb[n].tensor_type)
    same = total = 0
    for n, t in ta.items():
        if n in tb and t.tensor_type == tb[n].tensor_type and t.tensor_type.name not in ("F32", "F16"):
            size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
            x, y = (np.asarray(u.data).view(np.uint8).reshape(-1, size) for u in (t, tb[n]))
            same += int((x == y).all(axis=1).sum())
            total += len(x)
    tok_a, tok_b = (describe(p)["tokenizer"] for p in (a, b))
    return {"missing": sorted(set(ta) ^ set(tb)), "type_differs": differ, "identical_blocks": same, "blocks": total,
            "tokenizer_differs": sorted(k for k in set(tok_a) | set(tok_b) if tok_a.get(k) != tok_b.get(k))}


def run(bin_dir: Path, src: Path, *, quick: bool = False, hf: bool = True, model: Path | None = None, log=print) -> dict:
    import torch
    from transformers import AutoTokenizer

    from workers.engine.gguf_writer import pre_tokenizer_name

    model = Path(model) if model else bench_model(quick)
    n_eval, n_calib = (32, 16) if quick else (EVAL_WINDOWS, 128)
    calib, held = windows(model, num_samples=n_calib, seq_len=SEQ_LEN, eval_windows=n_eval)
    work = CACHE / "llamacpp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(model)
    held_txt, calib_txt = _text(held, tok, work / "held.txt"), _text(calib, tok, work / "calib.txt")
    pre = pre_tokenizer_name(json.loads((model / "tokenizer.json").read_text()).get("pre_tokenizer"))
    torch.set_num_threads(THREADS)
    log("llamacpp bench: llama.cpp's files")
    files = theirs(model, work, bin_dir, src, pre, calib_txt, n_calib)
    log("llamacpp bench: ours, through the engine")
    files.update(ours(model, work, n_calib))
    base = work / "f32.kld"
    rows = {}
    for label, path in files.items():
        log(f"llamacpp bench: scoring {label}")
        rows[label] = {**describe(path), "llama": llama_ppl(bin_dir, path, held_txt, base, n_eval, work / f"ppl-{path.parent.name}.log",
                                                          first=label == "llama.cpp F32")}
        if hf:
            res = run_measured(f"llamacpp-{path.parent.name}", OUR_PYTHON, TOOLS / "eval_ppl.py",
                               ["--model", str(path.parent), "--eval", str(held), "--kind", "gguf"], env=pinned_env())
            rows[label]["hf_ppl"] = res.result.get("perplexity") if res.ok else None
    llama_tok = base_tokens(base)
    hf_tok = tok(held_txt.read_text(), add_special_tokens=False)["input_ids"][: len(llama_tok)]
    agree = next((i for i, (x, y) in enumerate(zip(llama_tok, hf_tok)) if x != y), min(len(llama_tok), len(hf_tok)))
    pairs = {q: compare(files[f"ours {q}"], files[f"llama.cpp {q}"]) for q, _ in OURS}
    version = _sh([bin_dir / "llama-perplexity", "--version"], work / "version.log").strip().splitlines()
    return {"model": model.name, "pre": pre, "eval_windows": n_eval, "calib_windows": n_calib, "rows": rows, "pairs": pairs,
            "tokens_scored": len(llama_tok), "tokens_equal_to_transformers": agree, "llama_version": " ".join(version[-2:])}


def table(r: dict) -> str:
    f32 = r["rows"]["llama.cpp F32"]
    out = []
    for label, x in r["rows"].items():
        lp, hp = x["llama"]["ppl"], x.get("hf_ppl")
        out.append([label, f"{x['size_bytes']:,}", ", ".join(f"{k} {v}" for k, v in x["types"].items()), fmt(lp, 4),
                    f"{lp - f32['llama']['ppl']:+.4f}" if lp is not None else "—", fmt(x["llama"].get("kld"), 5),
                    fmt(x["llama"].get("same_top_p"), 2), fmt(hp, 3), f"{hp - f32['hf_ppl']:+.3f}" if hp and f32.get("hf_ppl") else "—"])
    return md_table(["file", "bytes", "tensor types", "llama-perplexity", "Δ vs F32", "KLD vs F32", "same top token %",
                     "transformers ppl", "Δ vs F32"], out)


def render(r: dict, argv: list[str], started: str, load: str, origin: str, note: str = "") -> str:
    ppl = (lambda k: r["rows"][k]["llama"]["ppl"])
    lines = [BEGIN, "## GGUF: ours against llama.cpp's own llama-quantize", "",
             f"`python -m bench.llamacpp {shlex.join(argv)}` — started {started}, load average {load} "
             f"(end {', '.join(f'{x:.2f}' for x in os.getloadavg())}); llama.cpp {r['llama_version']}{' (' + origin + ')' if origin else ''}.",
             "", *([note, ""] if note else []),
             f"Model `{r['model']}`. llama.cpp's files: `convert_hf_to_gguf.py --outtype f32`, then `llama-quantize` "
             f"(`--imatrix` from `llama-imatrix -c {SEQ_LEN} --chunks {r['calib_windows']}` on our {r['calib_windows']} "
             "calibration windows decoded to text). Ours: the `gguf` method through the engine, as a job runs it. "
             f"Every file is scored by `llama-perplexity -c {SEQ_LEN}` on the same {r['tokens_scored']:,} tokens (the F32 run "
             "saved them with `--kl-divergence-base`; the others read them back with `--kl-divergence`), which scores the "
             "second half of each window; `transformers ppl` is `bench/tools/eval_ppl.py --kind gguf` on the "
             f"{r['eval_windows']} held-out windows, all tokens.", "",
             f"Tokenizer: `convert_hf_to_gguf.py` stops on this tokenizer (\"BPE pre-tokenizer was not recognized\": it knows "
             "pre-tokenizers by hashing a published model's ids), so `bench/tools/llamacpp_convert.py` answers that one lookup "
             f"with `{r['pre']}`, the name our writer derives from tokenizer.json (ByteLevel with GPT-2's regex). llama.cpp's "
             f"tokens of the held-out text equal transformers' for the first {r['tokens_equal_to_transformers']:,} of "
             f"{r['tokens_scored']:,}.", "", table(r), ""]
    for q, c in r["pairs"].items():
        lines.append(f"- {q}: tensors missing on one side: {len(c['missing'])}; type differs: "
                     f"{', '.join(c['type_differs']) or 'none'}; byte-identical quantized blocks {c['identical_blocks']:,} of "
                     f"{c['blocks']:,}; tokenizer keys that differ: {', '.join(c['tokenizer_differs']) or 'none'}.")
    d = {q: ppl(f"ours {q}") - ppl(f"llama.cpp {q}") for q, _ in OURS}
    lines += ["", "llama.cpp loads and scores every file we write (goal met). Ours minus llama.cpp's, llama-perplexity: "
              + "; ".join(f"{q} {v:+.4f}" for q, v in d.items()) + f" (F32 {ppl('llama.cpp F32'):.4f}).", END]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", default=os.environ.get("LLAMA_CPP_BIN"), help="folder of llama-quantize, llama-imatrix, llama-perplexity")
    ap.add_argument("--llama-src", default=os.environ.get("LLAMA_CPP_SRC"), help="llama.cpp tree with convert_hf_to_gguf.py and gguf-py")
    ap.add_argument("--origin", default="", help="where that llama.cpp came from, for the record")
    ap.add_argument("--model", help="another trained model folder (default: the bench model)")
    ap.add_argument("--note", default="", help="a line for RESULTS.md under the command (why this model, ...)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers column")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    if not a.llama_bin or not a.llama_src:
        ap.error("give --llama-bin and --llama-src (or LLAMA_CPP_BIN and LLAMA_CPP_SRC)")
    started, load = started_and_load()
    r = run(Path(a.llama_bin), Path(a.llama_src), quick=a.quick, hf=not a.no_hf, model=a.model)
    (CACHE / "llamacpp" / "result.json").write_text(json.dumps(r, indent=1, default=str))
    shown = [{"--llama-bin": "$LLAMA_CPP_BIN", "--llama-src": "$LLAMA_CPP_SRC"}.get(argv[i - 1], x) if i else x for i, x in enumerate(argv)]
    text = render(r, shown, started, load, a.origin, a.note)
    print(text)
    if not a.no_write and not a.quick:
        write_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
