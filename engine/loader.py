"""Checkpoint loading: safetensors only (single file or sharded index)."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

try:
    from safetensors import SafetensorError
except ImportError:  # (older safetensors: its errors are plain exceptions)
    SafetensorError = RuntimeError

_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "*.pt", "*.pth", "*.ckpt")


def safetensor_files(model_dir: str) -> list[str]:
    """The checkpoint's ``.safetensors`` files, or a clear error."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):  # (first, as transformers: an index may be left from a sharded save)
        return [single]
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e}); "
                             "download it again with the checkpoint.") from None
        files = sorted({os.path.join(model_dir, v) for v in weight_map.values()})
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"Shard {missing[0]} named in {index} is missing; "
                                    "download every shard of the checkpoint.")
        return files
    others = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if others:
        return others
    pickled = [p for pat in _PICKLED for p in glob.glob(os.path.join(model_dir, pat))]
    if pickled:
        raise ValueError(
            f"{os.path.basename(pickled[0])} in {model_dir!r} is a pickled checkpoint; Loom loads only "
            "safetensors (pickles can run arbitrary code). Convert it, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True).")
    raise FileNotFoundError(f"No model.safetensors (or model.safetensors.index.json) in {model_dir!r}.")


def iter_tensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensor_files(model_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                             "corrupt: download it again.") from None
