"""LoRA-then-remask adapters in peft's format (`PeftModel.from_pretrained(base, RUN/finetune/peft)`).

LoRA-then-remask trains plain LoRA (peft's parameterisation: A (r, in), B (out, r), y = W x + (alpha / r) B A x);
the mask only comes back when `merge` multiplies W + s B A by it. So the trained adapter is a peft LoRA adapter
as it stands, and the finetune stage writes it next to its own files:

    RUN/finetune/peft/adapter_config.json        peft_type LORA, r, lora_alpha = s * r, target_modules, ...
    RUN/finetune/peft/adapter_model.safetensors  base_model.model.<module>.lora_{A,B}.weight

`base_model_name_or_path` is the sparse stage it was trained on. Loaded with peft onto that checkpoint, the model
computes what training computed; `merge_and_unload()` gives W + s B A, which is *not* sparse: remasking is
`sparse-recover merge`'s job. SPP and LoRS have no peft type; their format is adapter.safetensors (README).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def write_peft_adapter(folder: Path, weights: dict[str, torch.Tensor], *, targets: list[str],
                       resolved: dict[str, Any], base: str, conv1d: bool) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rank = int(resolved["rank"])
    state = {}
    for name in targets:
        for part in ("lora_A", "lora_B"):
            state[f"base_model.model.{name}.{part}.weight"] = weights[f"{name}.{part}"].contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": float(resolved["scaling"]) * rank,  # peft's scale is lora_alpha / r
        "lora_dropout": float(resolved.get("dropout") or 0.0),
        "target_modules": sorted(targets),  # the exact modules (peft matches a name or a dotted suffix)
        "bias": "none",
        "fan_in_fan_out": bool(conv1d),  # GPT-2's Conv1D stores (in, out)
        "inference_mode": True,
        "use_rslora": False,
        "init_lora_weights": True,
    }
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
