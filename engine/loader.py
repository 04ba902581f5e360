"""Checkpoint loading: safetensors only (single file or sharded index)."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "*.pt", "*.pth", "*.ckpt")


def safetensor_files(model_dir: str) -> list[str]:
    """The checkpoint's ``.safetensors`` files, or a clear error."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({os.path.join(model_dir, v) for v in weight_map.values()})
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"Shard {missing[0]} named in {index} is missing; "
                                    "download every shard of the checkpoint.")
        return files
    if os.path.isfile(single):
        return [single]
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
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
