"""What a resumed run changes: the checkpoint's recorded config against the new run's.

A checkpoint's `meta.json` holds the model it was trained with (`model_config`, as built: with
`init_from` that is the source's config.json) and the run's resolved config (`config`). On resume:
- the architecture must be the same, or the weights cannot be the ones trained: any field in
  `ARCHITECTURE` that differs is an error that lists them all (`model.num_experts 14 -> 8, ...`).
  It does not depend on `parallel.ep_size` (`num_experts` counts all routed experts);
- everything else may change (learning rate, schedule, data, logging, ZeRO stage, ep_size, world
  size, loss coefficients, rope_theta for a longer context, ...): `changes` lists it, and the trainer
  prints it once as `changed on resume: optim.lr 3e-4 -> 1e-2, ...` and records it in metrics.jsonl.
  Not the data sample sequence, though (`data.seq_len`, `data.seed`, `data.eval_fraction`, and the
  mixture unless `data.new_mixture_on_resume`): a resumed run continues it (`data.loader`).
"""

from __future__ import annotations

from typing import Any

from moe.config import ARCH_FIELDS, MOE_FIELDS

RETUNABLE = ("initializer_range", "max_position_embeddings", "rope_theta", "router_aux_loss_coef")
"""Model fields of ARCH_FIELDS/MOE_FIELDS that a resumed run may change: an init-only scale, the
context length and RoPE base (context extension), a loss weight."""
ARCHITECTURE = tuple(f for f in ARCH_FIELDS + MOE_FIELDS if f not in RETUNABLE)
"""Model fields that decide which parameters exist, their shapes, and how tokens are routed."""
PER_INVOCATION = ("checkpoint.resume", "stop_at_step", "run_dir")
"""How and where this process runs, not what the run is (a copied run directory resumes silently)."""

Change = tuple[Any, Any]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 1e-3}}` -> `{"optim.lr": 1e-3}` (lists are values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Change]:
    """Keys of `new` whose value differs in `old` (keys on one side only: another code version, skipped)."""
    return {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v}


def changes(
    meta: dict[str, Any], config: dict[str, Any], model: dict[str, Any], world_size: int
) -> dict[str, Change]:
    """Everything the new run changes, `{"optim.lr": (3e-4, 1e-2), ...}`, in config order.

    Args:
        meta: the checkpoint's meta.json.
        config: the new run's resolved config (enums as strings).
        model: the new run's model config (as built, `dataclasses.asdict`).
        world_size: the new run's number of processes.

    Raises:
        ValueError: the architecture differs; the message lists every differing field.
    """
    old_model = {f"model.{k}": v for k, v in meta.get("model_config", {}).items()}
    new_model = {f"model.{k}": v for k, v in model.items()}
    found = _differences(old_model, new_model)
    arch = {k: v for k, v in found.items() if k.removeprefix("model.") in ARCHITECTURE}
    if arch:
        raise ValueError(
            f"the model differs from the one it was trained with: {describe(arch)} (the architecture "
            "cannot change on resume; train this model in another run_dir)"
        )
    rest = {k: v for k, v in config.items() if k != "model"}
    old_rest = {k: v for k, v in meta.get("config", {}).items() if k != "model"}
    found |= _differences(flatten(old_rest), flatten(rest))
    if "world_size" in meta and meta["world_size"] != world_size:
        found["world_size"] = (meta["world_size"], world_size)
    return {k: v for k, v in found.items() if k not in PER_INVOCATION}


def format_value(v: Any) -> str:
    """As one would type it in an override: `3e-4`, `0.5`, `true`, `null`, `[1, 2]`."""
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, float):
        plain = repr(v)
        mantissa, _, exponent = f"{v:.6e}".partition("e")
        sci = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return sci if len(sci) < len(plain) or (len(sci) == len(plain) and abs(v) < 0.1) else plain
    if isinstance(v, list):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return str(v)


def describe(found: dict[str, Change]) -> str:
    """`optim.lr 3e-4 -> 1e-2, schedule.kind cosine -> constant`."""
    return ", ".join(f"{k} {format_value(a)} -> {format_value(b)}" for k, (a, b) in found.items())
