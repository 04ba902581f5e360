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
    return _checkpoint(model_dir)[0]


def _checkpoint(model_dir: str) -> tuple[list[str], dict | None]:
    """The checkpoint's ``.safetensors`` files and, for a sharded one, its index's weight
    map (tensor name -> shard path); None: every tensor of every file is read."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):  # (first, as transformers: an index may be left from a sharded save)
        return [single], None
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
            bad = [v for v in weight_map.values() if not isinstance(v, str) or not v]
            if bad:
                raise TypeError(f"weight_map names {bad[0]!r}, not a shard file name")
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # (UnicodeDecodeError: a ValueError)
            raise ValueError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e}); "
                             "download it again with the checkpoint.") from None
        weight_map = {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
        files = sorted(set(weight_map.values()))
        _regular_only(files, f" (named in {index})")
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"Shard {missing[0]} named in {index} is missing; "
                                    "download every shard of the checkpoint.")
        return files, weight_map
    others = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if others:
        _regular_only(others)
        return others, None
    pickled = [p for pat in _PICKLED for p in glob.glob(os.path.join(model_dir, pat))]
    if pickled:
        raise ValueError(
            f"{os.path.basename(pickled[0])} in {model_dir!r} is a pickled checkpoint; Loom loads only "
            "safetensors (pickles can run arbitrary code). Convert it, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True).")
    raise FileNotFoundError(f"No model.safetensors (or model.safetensors.index.json) in {model_dir!r}.")


def _regular_only(paths: list[str], named_by: str = "") -> None:
    """A ValueError naming the first of ``paths`` that exists but is not a regular file (a
    directory, FIFO or device: opening a FIFO waits for a writer forever). A link to nothing
    passes, to be named unreadable when opened."""
    odd = next((p for p in paths if os.path.exists(p) and not os.path.isfile(p)), None)
    if odd is not None:
        raise ValueError(f"{odd}{named_by} is not a regular file (a directory, FIFO or device named like a "
                         "checkpoint file); remove it, or put the checkpoint's file there.")


def iter_tensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, once: a sharded one's from the shard its index names
    (as transformers); without an index a name in two files is refused (which one is
    meant is unknown: e.g. a stray copy of some tensors next to the checkpoint)."""
    files, weight_map = _checkpoint(model_dir)
    seen: dict[str, str] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if weight_map is not None and weight_map.get(name) != path:
                        continue  # (the index maps it elsewhere, or not at all)
                    if name in seen:
                        raise ValueError(f"Tensor {name!r} is in both {seen[name]} and {path}; remove the "
                                         "file that does not belong to the checkpoint.")
                    seen[name] = path
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            if os.path.exists(path) and not os.access(path, os.R_OK):  # (safetensors reports it as "No such file or directory")
                raise PermissionError(f"{path} cannot be read by this user (permission denied); give it read "
                                      "access (chmod a+r), or run as its owner.") from None
            raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                             "corrupt: download it again.") from None
