"""Hugging Face interop: read Qwen2 / Qwen2-MoE checkpoint directories, write them back.

Design choices:
- Both directions stream tensor by tensor: reading goes through `safe_open` (memory-mapped), writing
  through `ShardedWriter`, which flushes a shard as soon as it is full. A 14B checkpoint never sits in
  memory at once.
- Routed experts are 3-D in memory (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) and per-expert on
  disk (`mlp.experts.E.{gate,up,down}_proj.weight`), the public Qwen1.5-MoE-A2.7B layout and the only
  one that transformers 4.x and 5.x both read. 5.x's fused keys are accepted on input.
- A checkpoint directory is written under a temporary name and renamed when complete, so an
  interrupted write never leaves something that looks like a checkpoint.
- Every mismatch is a ValueError naming the file, the key and both shapes, raised before any output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe.config import ModelConfig

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_EXPERT_KEY = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is unknown; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_config(checkpoint_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Our ModelConfig and the raw dict from `<dir>/config.json`."""
    path = Path(checkpoint_dir) / CONFIG_NAME
    if not Path(checkpoint_dir).is_dir():
        raise ValueError(f"checkpoint directory {checkpoint_dir} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is missing: not a Hugging Face checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return ModelConfig.from_hf_dict(raw, source=str(path)), raw


class CheckpointReader:
    """Lazy, memory-mapped access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, checkpoint_dir: str | Path):
        self.dir = Path(checkpoint_dir)
        index = self.dir / SAFE_INDEX_NAME
        single = self.dir / SAFE_WEIGHTS_NAME
        self.key_to_file: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._shard_keys: dict[Path, set[str]] = {}
        self._index: Path | None = None
        if index.is_file():
            self._index = index
            try:
                weight_map = json.loads(index.read_text()).get("weight_map")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise ValueError(
                    f"{index} is not a valid index (JSON object with a 'weight_map'): {e}"
                ) from None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map'")
            for key, fname in weight_map.items():
                if not isinstance(fname, str):
                    raise ValueError(f"{index}: weight_map[{key!r}] = {fname!r} is not a file name")
                self.key_to_file[key] = self.dir / fname
            for f in set(self.key_to_file.values()):
                if not f.is_file():
                    raise ValueError(f"{f} is listed in {index} but missing")
        elif single.is_file():
            self.key_to_file = dict.fromkeys(self._open(single).keys(), single)
        else:
            if any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pt")):
                raise ValueError(f"{self.dir} holds pickle weights; only safetensors checkpoints are read")
            raise ValueError(f"{self.dir} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}")

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __iter__(self) -> Iterator[str]:
        return iter(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def _handle(self, key: str) -> Any:
        if key not in self.key_to_file:
            raise ValueError(f"{self.dir}: key {key!r} is missing from the checkpoint")
        path = self.key_to_file[key]
        handle = self._open(path)
        if key not in self._shard_keys[path]:  # else safetensors' own error, which names neither
            raise ValueError(f"{self._index} maps {key!r} to {path}, which does not hold it")
        return handle

    def _open(self, path: Path) -> Any:
        if path not in self._handles:
            try:
                handle = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"{path}: cannot be read as safetensors ({e})") from None
            self._handles[path], self._shard_keys[path] = handle, set(handle.keys())
        return self._handles[path]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get(self, key: str, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor stored under `key`; with `expected_shape`, a ValueError naming both shapes on mismatch."""
        if expected_shape is not None:
            self.check_shape(key, expected_shape)
        return self._handle(key).get_tensor(key)

    def check_shape(self, key: str, expected: tuple[int, ...]) -> None:
        got = self.shape(key)
        if got != tuple(expected):
            raise ValueError(
                f"{self.key_to_file[key]}: tensor {key!r} has shape {list(got)} but the config implies {list(expected)}"
            )


# ---- key mapping ---------------------------------------------------------------------------------


def expert_key(layer: int, expert: int, proj: str) -> str:
    """Per-expert Hugging Face key, e.g. `model.layers.3.mlp.experts.17.gate_proj.weight`."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the per-expert Hugging Face layout with its shape, in a stable order."""
    h, kv, v = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
        }
        if cfg.is_moe_layer(i):
            im, ish = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
            shapes[p + "mlp.gate.weight"] = (cfg.num_experts, h)
            for e in range(cfg.num_experts):
                shapes |= {
                    expert_key(i, e, "gate_proj"): (im, h),
                    expert_key(i, e, "up_proj"): (im, h),
                    expert_key(i, e, "down_proj"): (h, im),
                }
            if ish > 0:
                shapes |= {
                    p + "mlp.shared_expert.gate_proj.weight": (ish, h),
                    p + "mlp.shared_expert.up_proj.weight": (ish, h),
                    p + "mlp.shared_expert.down_proj.weight": (h, ish),
                    p + "mlp.shared_expert_gate.weight": (1, h),
                }
        else:
            f = cfg.intermediate_size
            shapes |= {
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def to_hf_tensors(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Our parameter -> (HF key, tensor) pairs; 3-D experts are split per expert (views, no copies)."""
    if name.endswith("mlp.experts.gate_up_proj"):
        layer = int(name.split(".")[2])
        inter = tensor.shape[1] // 2
        for e in range(tensor.shape[0]):
            yield expert_key(layer, e, "gate_proj"), tensor[e, :inter]
            yield expert_key(layer, e, "up_proj"), tensor[e, inter:]
    elif name.endswith("mlp.experts.down_proj"):
        layer = int(name.split(".")[2])
        for e in range(tensor.shape[0]):
            yield expert_key(layer, e, "down_proj"), tensor[e]
    elif name.endswith("mlp.gate.selection_bias"):
        return  # aux-loss-free balancing state; transformers' Qwen2-MoE has no such tensor
    else:
        yield name, tensor


def empty_shared_expert(cfg: ModelConfig, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Zero-width shared expert and zero gate for a MoE layer without one.

    transformers' Qwen2-MoE always builds a shared expert; with width 0 it contributes nothing, and
    writing these tensors lets `from_pretrained` load without "newly initialized" weights.
    """
    h, p = cfg.hidden_size, f"model.layers.{layer}.mlp."
    yield p + "shared_expert.gate_proj.weight", torch.zeros(0, h)
    yield p + "shared_expert.up_proj.weight", torch.zeros(0, h)
    yield p + "shared_expert.down_proj.weight", torch.zeros(h, 0)
    yield p + "shared_expert_gate.weight", torch.zeros(1, h)


def read_param(reader: CheckpointReader, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Our parameter `name` of `shape`, assembled from the checkpoint (per-expert or fused layout)."""
    if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
        if name in reader:  # transformers 5.x fused layout (save_original_format=False)
            return reader.get(name, shape)
        layer = int(name.split(".")[2])
        num_experts = shape[0]
        if name.endswith("gate_up_proj"):
            inter, h = shape[1] // 2, shape[2]
            rows = [
                torch.cat(
                    [
                        reader.get(expert_key(layer, e, "gate_proj"), (inter, h)),
                        reader.get(expert_key(layer, e, "up_proj"), (inter, h)),
                    ]
                )
                for e in range(num_experts)
            ]
        else:
            rows = [reader.get(expert_key(layer, e, "down_proj"), shape[1:]) for e in range(num_experts)]
        return torch.stack(rows)
    return reader.get(name, shape)


SELECTION_BIAS_HF = "e_score_correction_bias"
"""Name under which exports write a router's selection bias (`model.layers.N.mlp.gate.<this>`)."""


def _accepted_hf_keys(cfg: ModelConfig) -> set[str]:
    keys = set(expected_hf_shapes(cfg))
    keys.add("lm_head.weight")  # also present (and ignored) in some tied checkpoints
    for i in cfg.moe_layers:
        p = f"model.layers.{i}.mlp."
        keys |= {p + "experts.gate_up_proj", p + "experts.down_proj"}
        keys.add(
            p + "gate." + SELECTION_BIAS_HF
        )  # ours: the routers' aux-loss-free bias (transformers ignores it)
        if cfg.shared_expert_intermediate_size == 0:  # transformers writes 0-width shared experts
            keys |= {p + f"shared_expert.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
            keys.add(p + "shared_expert_gate.weight")
    return keys


def load_hf_weights(model: torch.nn.Module, checkpoint_dir: str | Path) -> None:
    """Copy a Hugging Face checkpoint's tensors into `model` (already built for its config).

    Raises:
        ValueError: on a missing key, an unexpected key, or a shape that disagrees with the config.
    """
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    reader = CheckpointReader(checkpoint_dir)
    unexpected = sorted(set(reader) - _accepted_hf_keys(cfg))
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ValueError(f"{checkpoint_dir}: unexpected keys for this config: {unexpected[:5]}{more}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = read_param(reader, name, tuple(param.shape))
            param.copy_(value.to(param.dtype))
        for name, module in model.named_modules():
            key = f"{name}.{SELECTION_BIAS_HF}"
            if hasattr(module, "selection_bias") and key in reader:
                module.selection_bias.copy_(reader.get(key, tuple(module.selection_bias.shape)).float())
                module.use_selection_bias = bool(module.selection_bias.any())


def from_pretrained(
    checkpoint_dir: str | Path,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> torch.nn.Module:
    """Build our model from a Hugging Face Qwen2 / Qwen2-MoE directory (weights streamed, no double copy).

    Args:
        checkpoint_dir: directory with config.json and safetensors weights.
        dtype: parameter dtype.
        device: where the parameters live.
        **overrides: ModelConfig fields to change (e.g. `expert_backend="torch"`).
    """
    from moe.model import Qwen2MoEForCausalLM

    cfg, _ = read_config(checkpoint_dir)
    cfg = cfg.replace(**overrides).validate()
    with torch.device("meta"):
        model = Qwen2MoEForCausalLM(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.to(parse_dtype(dtype))
    model.init_weights()  # buffers and anything not in the checkpoint get defined values
    load_hf_weights(model, checkpoint_dir)
    return model


# ---- writing -------------------------------------------------------------------------------------


def publish_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Give a completed temporary directory its final name (replacing an existing one, if any)."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, out_dir)


def check_output_dir(out_dir: str | Path, overwrite: bool, overwrite_key: str = "overwrite") -> None:
    """Refuse an output that cannot become a checkpoint directory, before any work is done
    (`overwrite_key`: the option the message names).

    Raises:
        ValueError: `out_dir` (or a parent) is not a directory, or is a non-empty one without `overwrite`.
    """
    out_dir = Path(out_dir)
    for parent in out_dir.parents:  # the nearest existing parent must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"output {out_dir}: {parent} exists and is not a directory")
            break
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"output directory {out_dir} exists and is not empty (set {overwrite_key}=true to replace it)"
        )


class ShardedWriter:
    """Writes `model-0000i-of-0000n.safetensors` shards and the index into a temporary directory.

    Use as a context manager; `add()` tensors in order, they are written as soon as a shard is full.
    On success the temporary directory is renamed to `out_dir`; on an exception it is deleted.

    Memory: the writer holds the tensors of the shard being filled, at most `max_shard_bytes` in the
    output dtype (or one tensor, if a single tensor is larger), plus the tensor being added. Each is
    converted (and a view copied) when added, so a view never keeps its whole base tensor alive.
    """

    def __init__(
        self,
        out_dir: str | Path,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        overwrite: bool = False,
        dtype: torch.dtype | None = None,
    ):
        self.out_dir = Path(out_dir)
        check_output_dir(self.out_dir, overwrite)
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}"
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self.dtype = dtype
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def __enter__(self) -> ShardedWriter:
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        return self

    def add(self, key: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Queue `tensor` under `key`, a float tensor cast to `dtype` (default: the writer's dtype).

        The tensor is referenced, not copied, when it already owns its storage in the output dtype:
        do not modify it before the writer closes.
        """
        if key in self._pending or any(key in s for s in self._shards):
            raise ValueError(f"tensor {key!r} written twice")
        t = tensor.detach()
        dtype = dtype or self.dtype
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if t.untyped_storage().nbytes() != nbytes:  # a view: safetensors refuses shared storage
            t = t.clone()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[key] = t
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.tmp_dir / name), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def write_json(self, name: str, obj: Any) -> None:
        (self.tmp_dir / name).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def copy_file(self, src: str | Path) -> None:
        shutil.copy2(src, self.tmp_dir / Path(src).name)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            return
        self._flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, keys in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp_dir / f"shard-{i:05d}.safetensors", self.tmp_dir / final)
            weight_map |= {k: final for k in keys}
        self.write_json(
            SAFE_INDEX_NAME, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        )
        publish_dir(self.tmp_dir, self.out_dir)


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    d = cfg.to_hf_dict(torch_dtype=dtype_name(dtype))
    d["transformers_version"] = _transformers_version()
    return d


def _transformers_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:  # transformers is optional for writing
        return "5.0.0"


def write_metadata(
    writer: ShardedWriter, cfg: ModelConfig, dtype: torch.dtype, tokenizer_dir: str | Path | None = None
) -> None:
    """config.json, generation_config.json and (if given) the tokenizer files of `tokenizer_dir`."""
    writer.write_json(CONFIG_NAME, hf_config_dict(cfg, dtype))
    gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id") if getattr(cfg, k) is not None}
    writer.write_json(GENERATION_CONFIG_NAME, {**gen, "transformers_version": _transformers_version()})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                writer.copy_file(Path(tokenizer_dir) / name)


def save_pretrained(
    model: torch.nn.Module,
    out_dir: str | Path,
    dtype: str | torch.dtype = "bfloat16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    tokenizer_dir: str | Path | None = None,
) -> None:
    """Write `model` as a Hugging Face checkpoint that transformers' `from_pretrained` loads."""
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    dt = parse_dtype(dtype)
    with ShardedWriter(out_dir, max_shard_bytes, overwrite=overwrite, dtype=dt) as w:
        write_metadata(w, cfg, dt, tokenizer_dir)
        for name, param in model.named_parameters():
            for key, t in to_hf_tensors(name, param):
                w.add(key, t)
        if cfg.shared_expert_intermediate_size == 0:
            for layer in cfg.moe_layers:
                for key, t in empty_shared_expert(cfg, layer):
                    w.add(key, t)
        add_selection_biases(
            w,
            (
                (f"{n}.selection_bias", m.selection_bias)
                for n, m in model.named_modules()
                if hasattr(m, "selection_bias")
            ),
        )


def selection_bias_key(buffer_name: str) -> str:
    """`model.layers.N.mlp.gate.selection_bias` (our buffer) -> its key in a Hugging Face checkpoint."""
    return buffer_name.removesuffix("selection_bias") + SELECTION_BIAS_HF


def add_selection_biases(writer: ShardedWriter, biases: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Write the routers' non-zero selection biases (buffer name, tensor) in fp32 whatever the writer's
    dtype: bf16 would round the small steps they learn (1.0011 -> 1.0) and change the routing.
    An all-zero bias is a no-op and is left out (transformers reports every extra key). Returns the
    number written."""
    written = 0
    for name, bias in biases:
        if bool(bias.any()):
            writer.add(selection_bias_key(name), bias, dtype=torch.float32)
            written += 1
    return written
