"""Run llama.cpp's ``convert_hf_to_gguf.py`` with the pre-tokenizer name given on the command line.

``python llamacpp_convert.py LLAMA_CPP_SRC PRE [convert_hf_to_gguf.py arguments...]``

convert_hf_to_gguf.py names a BPE tokenizer's pre-tokenizer by hashing the ids it
gives a fixed test string, against a table of published models; a tokenizer
trained here is in no table, so it stops with "BPE pre-tokenizer was not
recognized". Its documented remedy (convert_hf_to_gguf_update.py) downloads the
listed models' tokenizers from the Hub. This wrapper instead answers the lookup
(``get_vocab_base_pre``) with ``PRE`` and changes nothing else. The bench passes
the name our writer derives from tokenizer.json, and checks separately that
llama.cpp then tokenizes the held-out text exactly as transformers does.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    src, pre, rest = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    sys.path[:0] = [str(src), str(src / "gguf-py")]  # llama.cpp's own gguf-py, as convert_hf_to_gguf.py itself prefers
    from conversion import base

    def get_vocab_base_pre(self, tokenizer) -> str:
        return pre

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(src / "convert_hf_to_gguf.py"), *rest]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
