"""Model configuration read from a Hugging Face ``config.json``."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype, default: torch.dtype) -> torch.dtype:
    """``"auto"`` -> ``default``; a name or a ``torch.dtype`` -> that dtype."""
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower().replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.lower().replace("torch.", "")]
    raise ValueError(f"dtype={dtype!r} is not supported; use 'auto', 'float32', 'bfloat16' or 'float16'.")


def read_json_object(path: str, what: str = "a JSON object") -> dict:
    """The JSON object in ``path``; one ValueError naming the file when it is not valid
    JSON or holds something else."""
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}).") from None
        except RecursionError:  # (json's parser recurses per nesting level)
            raise ValueError(f"{path} is not a JSON file Loom can read: it nests arrays / objects too deeply; "
                             "use the file that came with the checkpoint.") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}), as JSON files must be; "
                             "download it again, or save it as UTF-8.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold {what}, not {type(raw).__name__}.")
    return raw


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # biases on q / k / v_proj
    qk_norm: bool
    torch_dtype: torch.dtype | None
    hidden_act: str = "silu"
    o_bias: bool = False  # a bias on o_proj (Llama / Qwen3 attention_bias)
    mlp_bias: bool = False  # biases on gate / up / down_proj (Llama mlp_bias)
    eos_token_ids: list[int] = field(default_factory=list)
    # what sets max_position_embeddings, for errors: the field itself, or a Mistral
    # sliding window that caps it
    context_source: str = "max_position_embeddings"
    # config.json's dtype as written when torch_dtype could not take it (None: it could)
    unsupported_dtype: str | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_attention_heads={self.num_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}.")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings.")
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; Loom implements 'silu'.")

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if os.path.isfile(model_dir):
            raise FileNotFoundError(f"{model_dir!r} is a file; pass the model directory that holds it "
                                    "(config.json + *.safetensors).")
        if not os.path.isdir(model_dir):
            home = os.path.expanduser(model_dir)
            if home != model_dir and os.path.isdir(home):  # (a path quoted, or after '--model=', keeps its '~')
                raise FileNotFoundError(f"Model directory {model_dir!r} does not exist: '~' is not expanded "
                                        f"here; pass {home!r}.")
            raise FileNotFoundError(f"Model directory {model_dir!r} does not exist; pass a local "
                                    "Hugging Face model directory (config.json + *.safetensors).")
        try:
            model_dir.encode("utf-8")
        except UnicodeEncodeError:  # (bytes a Linux path may hold: Python keeps them as lone surrogates)
            raise ValueError(f"Model directory {model_dir!r} has a name that is not UTF-8, which the tokenizers "
                             "and safetensors libraries cannot open; rename it (or link to it from a UTF-8 "
                             "path).") from None
        if not os.access(model_dir, os.R_OK | os.X_OK):  # (else its files read as missing)
            raise PermissionError(f"Model directory {model_dir!r} cannot be read by this user (permission "
                                  "denied); give it read access (chmod -R a+rX), or run as its owner.")
        snapshots = os.path.join(model_dir, "snapshots")
        if not os.path.isfile(path) and os.path.isdir(snapshots):  # (a Hugging Face cache's repository folder)
            found = ", ".join(repr(os.path.join(snapshots, s)) for s in sorted(os.listdir(snapshots)))
            raise FileNotFoundError(f"{model_dir!r} is a Hugging Face cache's repository folder, not a model "
                                    f"directory; pass one of its snapshots: {found or '(none: not downloaded)'}.")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: {model_dir!r} is not a Hugging Face model "
                                    "directory (it needs config.json and *.safetensors).")
        return cls.from_dict(read_json_object(path, "a JSON object (a model config)"))

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        archs = raw.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ValueError(f"config.json's architectures={archs!r} must be a list of class names, e.g. "
                             "[\"LlamaForCausalLM\"]; use the config.json that came with the weights.")
        if archs:
            arch = archs[0]
        else:  # (as transformers: the model type names the architecture)
            mt = raw.get("model_type")
            name = f"model_type={mt!r}" if mt is not None else "<missing>"
            arch = _MODEL_TYPES.get(mt, name) if isinstance(mt, str) else name  # (a list is no dict key)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"Architecture {arch!r} is not supported by Loom; supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
        mt = raw.get("model_type")
        if archs and mt is not None and (not isinstance(mt, str) or _MODEL_TYPES.get(mt) != arch):
            # (transformers' AutoModelForCausalLM builds the model that model_type names, whatever
            # architectures says: e.g. "mistral" over ["LlamaForCausalLM"] adds Mistral's window)
            raise ValueError(f"config.json's model_type={mt!r} and architectures={archs!r} name different models "
                             f"(transformers builds the model_type's); which one the weights are is unclear: use "
                             "the config.json that came with the weights.")
        q = raw.get("quantization_config")
        if q:
            method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
            raise ValueError(f"The checkpoint is quantized (quantization_config, quant_method={method!r}); "
                             "Loom loads float32 / bfloat16 / float16 weights only: use the unquantized "
                             "checkpoint.")
        def size(key, default=None):  # a positive integer field (None / absent: the default)
            v = raw.get(key)
            if v is None:
                if default is None:
                    raise ValueError(f"config.json lacks the required field {key!r}.")
                return default
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"config.json's {key}={v!r} must be a positive integer; use the config.json "
                                 "that came with the weights.")
            return v
        hidden, heads = size("hidden_size"), size("num_attention_heads")
        # a field config.json leaves out takes its value from the architecture's transformers
        # config class (a null kv heads / head_dim field: derived, as there)
        defaults = _ABSENT_DEFAULTS[arch]
        absent = {k: v for k, v in defaults.items() if k not in raw}
        if arch == "MistralForCausalLM" and type(raw.get("head_dim")) is int and raw["head_dim"] == 0:
            raw = {**raw, "head_dim": None}  # (Mistral's modules take `head_dim or hidden_size // heads`)
        cfg = dict(
            architecture=arch,
            vocab_size=size("vocab_size"),
            hidden_size=hidden,
            intermediate_size=size("intermediate_size"),
            num_layers=size("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=size("num_key_value_heads", absent.get("num_key_value_heads", heads)),
            head_dim=size("head_dim", absent.get("head_dim", max(hidden // heads, 1))),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=size("max_position_embeddings", defaults["max_position_embeddings"]),
        )
        kv = cfg["num_kv_heads"]
        if "num_key_value_heads" in absent and heads % kv:
            raise ValueError(f"config.json has no num_key_value_heads, and transformers' default for "
                             f"{arch} ({kv}) does not divide num_attention_heads={heads}: add the checkpoint's "
                             "num_key_value_heads to config.json.")
        if "max_position_embeddings" not in raw:
            cfg["context_source"] = f"max_position_embeddings (absent: {arch}'s default in transformers)"
        eps = cfg["rms_norm_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"config.json's rms_norm_eps={eps!r} must be a number >= 0.")
        rope = _rope_fields(raw)
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        if not _positive_number(theta) or theta <= 1:
            raise ValueError(f"config.json's rope_theta={theta!r} must be a number > 1 (the RoPE base, e.g. "
                             "10000.0); use the config.json that came with the weights.")
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype is not None and not isinstance(rtype, str):
            raise ValueError(f"config.json's rope_type={rtype!r} must be a string, e.g. 'yarn'.")
        partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            if not _positive_number(partial) or partial > 1:
                raise ValueError(f"config.json's partial_rotary_factor={partial!r} must be a number in (0, 1] "
                                 "(the part of each head RoPE rotates); use the config.json that came with the "
                                 "weights.")
            # (transformers 5's default RoPE for these architectures never reads the field; its
            # scaled ones make int(head_dim x factor)-wide cos / sin, which q * cos cannot take;
            # 'proportional' gives the other pairs frequency 0, as engine/rope.py does too)
            if rtype != "proportional":
                if rtype in (None, "default"):
                    how = ("as transformers 5's Llama / Qwen / Mistral code does with default RoPE (it ignores "
                           "the field), which is wrong for a model trained rotating part of each head")
                else:
                    how = (f"and transformers 5's Llama / Qwen / Mistral code fails on it with rope scaling "
                           f"{rtype!r} (it makes cos / sin for part of each head, which its attention cannot "
                           "apply)")
                raise ValueError(f"config.json's partial_rotary_factor={partial!r}: Loom rotates whole heads, "
                                 f"{how}; remove the field if the checkpoint rotates whole heads.")
        scaling = None if rtype in (None, "default") else {**rope, "rope_type": rtype}
        if rtype == "proportional":
            scaling["partial_rotary_factor"] = partial
        for k in ("factor", "attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow",
                  "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            v = (scaling or {}).get(k)
            if v is not None and not (_positive_number(v) or (v == 0 and k.startswith("mscale") and v is not False)):
                raise ValueError(f"config.json's rope scaling {rtype!r}: {k}={v!r} must be a number > 0; use "
                                 "the config.json that came with the weights.")
        if rtype in ("yarn", "llama3"):
            # as transformers 5 fills it: the top-level field first, then the scaling's, then the context
            # (absent too: then the architecture's default context)
            orig = raw.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
            orig = orig or cfg["max_position_embeddings"]
            if not _positive_number(orig):
                raise ValueError(f"config.json's original_max_position_embeddings={orig!r} must be a number > 0.")
            scaling["original_max_position_embeddings"] = orig
        if rtype == "yarn":
            num = (int, float)
            if scaling.get("factor") is None and isinstance(orig, num) and orig > 0:
                scaling["factor"] = cfg["max_position_embeddings"] / orig  # (DeepSeek-V3's configs)
            # The context YaRN extends to (Qwen2.5 / Qwen3 keep max_position_embeddings at the
            # pretraining context and add the scaling): factor x the original context.
            f = scaling.get("factor")
            if isinstance(f, num) and not isinstance(f, bool) and isinstance(orig, num) and \
                    int(f * orig) > cfg["max_position_embeddings"]:
                cfg["max_position_embeddings"] = int(f * orig)
                cfg["context_source"] = "rope_scaling yarn: factor x original_max_position_embeddings"
        sliding = _sliding_window(raw, arch, cfg["num_layers"])
        if sliding:
            # A window over some layers (Mistral's on all); Loom attends the full context,
            # which is exact only while sequences stay within the window.
            if int(sliding) < cfg["max_position_embeddings"]:
                cfg["max_position_embeddings"] = int(sliding)
                cfg["context_source"] = ("sliding_window: Loom attends the whole context, which is "
                                         "exact only inside the window")
        for key in ("attention_bias", "mlp_bias", "tie_word_embeddings", "use_sliding_window"):
            v = raw.get(key)
            if v is not None and (not isinstance(v, int) or v not in (0, 1)):  # (bool("false") is True)
                raise ValueError(f"config.json's {key}={v!r} must be true or false (JSON booleans); use the "
                                 "config.json that came with the weights.")
        attn_bias = bool(raw.get("attention_bias", False))
        dt = raw.get("dtype") or raw.get("torch_dtype") or "float32"  # (transformers 5: dtype, then the old name)
        try:
            torch_dtype, bad_dtype = parse_dtype(dt, torch.float32), None
        except ValueError:  # (fails only if dtype="auto" asks for it: LLM says so)
            torch_dtype, bad_dtype = None, str(dt)
        return cls(
            **cfg,
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # the biases and norms the architecture's transformers modules have: the loader
            # takes exactly these (a tensor the config does not declare is refused)
            qkv_bias=arch == "Qwen2ForCausalLM" or (arch != "MistralForCausalLM" and attn_bias),
            o_bias=arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") and attn_bias,
            mlp_bias=arch == "LlamaForCausalLM" and bool(raw.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            torch_dtype=torch_dtype,
            unsupported_dtype=bad_dtype,
            hidden_act=raw.get("hidden_act", "silu"),
            eos_token_ids=token_id_list(raw.get("eos_token_id"), "config.json's eos_token_id"),
        )


# transformers 5's config classes' defaults for the fields config.json may leave out that
# Loom reads (rms_norm_eps 1e-6, rope_theta 10000, tie_word_embeddings false are every one's;
# Mistral's sliding_window 4096 is read in _sliding_window)
_ABSENT_DEFAULTS = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048},
    "Qwen2ForCausalLM": {"max_position_embeddings": 32768, "num_key_value_heads": 32},
    "Qwen3ForCausalLM": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128},
    "MistralForCausalLM": {"max_position_embeddings": 131072, "num_key_value_heads": 8},
}

_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _sliding_window(raw: dict, arch: str, num_layers: int) -> int | None:
    """The attention window some layer of the model uses, as transformers builds it
    (None: every layer attends the whole context). Mistral applies ``sliding_window`` to
    every layer (its config has no ``use_sliding_window``); Qwen2 / Qwen3 only with
    ``use_sliding_window``, on the layers ``layer_types`` names (default: the layers from
    ``max_window_layers`` on); Llama has none."""
    if arch == "LlamaForCausalLM":
        return None
    if arch == "MistralForCausalLM":  # (absent: transformers' MistralConfig default)
        window = raw.get("sliding_window", 4096)
    else:
        if not raw.get("use_sliding_window", False):
            return None
        window = raw.get("sliding_window", 4096)
    if window is None or window == 0:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"config.json's sliding_window={window!r} must be a positive integer or null "
                         "(no window); use the config.json that came with the weights.")
    if arch == "MistralForCausalLM":
        return window
    types = raw.get("layer_types")
    if types is None:
        first = raw.get("max_window_layers", 28)
        if isinstance(first, bool) or not isinstance(first, int):
            raise ValueError(f"config.json's max_window_layers={first!r} must be an integer (the first layer with "
                             "the sliding window); use the config.json that came with the weights.")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    elif not (isinstance(types, list) and all(isinstance(t, str) for t in types) and len(types) == num_layers):
        raise ValueError(f"config.json's layer_types={types!r} must be a list of num_hidden_layers={num_layers} "
                         "names (\"full_attention\" / \"sliding_attention\"); use the config.json that came with "
                         "the weights.")
    return window if "sliding_attention" in types else None


def _positive_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _rope_fields(raw: dict) -> dict:
    """config.json's RoPE fields as transformers 5 reads them: ``rope_scaling`` (the older
    field, which model cards have users add for long contexts) over ``rope_parameters``."""
    params, scaling = raw.get("rope_parameters"), raw.get("rope_scaling")
    for name, v in (("rope_parameters", params), ("rope_scaling", scaling)):
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"config.json's {name}={v!r} must be an object (e.g. {{\"rope_type\": \"yarn\", "
                             "\"factor\": 4.0, ...}) or null; use the config.json that came with the weights.")
        if v and any(isinstance(x, dict) for x in v.values()):
            raise ValueError(f"config.json's {name} holds RoPE parameters per layer type; the architectures "
                             "Loom loads have one set for all layers.")
    if params and scaling and "rope_theta" not in scaling and "rope_theta" not in raw \
            and params.get("rope_theta", 10000.0) != 10000.0:
        # transformers takes rope_scaling alone and its theta from the top level or 10000.0:
        # not what a config that keeps its theta in rope_parameters means
        raise ValueError(f"config.json has both rope_parameters and rope_scaling; transformers reads "
                         f"rope_scaling alone, whose rope_theta is missing (it takes 10000.0, not "
                         f"rope_parameters' {params['rope_theta']!r}): add \"rope_theta\" to rope_scaling, or "
                         "move the scaling's fields into rope_parameters.")
    return dict(scaling or params or {})


def token_id_list(x, what: str) -> list[int]:
    """A token id field (an integer, a list of them, or null) as a list; one ValueError
    naming ``what`` for anything else."""
    ids = [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
        raise ValueError(f"{what}={x!r} must be a token id (an integer >= 0), a list of them, or null.")
    return ids
