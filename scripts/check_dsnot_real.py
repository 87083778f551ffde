"""Our DSnoT against the restated reference loop (tests/unit/test_dsnot.py) on real SmolLM2 weights: block 3 q_proj
and o_proj, inputs from 8 calibration windows of runs/study/wanda-70 (run `make study` first), 50% and 70%.
Prints mask equality and the mean squared output error of the Wanda mask and the DSnoT mask.

    PYTHONPATH=. .venv/bin/python scripts/check_dsnot_real.py
"""
import torch
from safetensors.torch import load_file

from sparse_recover.models import load_model, resolve_model_source
from sparse_recover.sparsity.patterns import Unstructured
from sparse_recover.sparsity.stats import DSnoTStats
from tests.unit.test_dsnot import _ours, _un_ref

model = load_model(resolve_model_source("smollm2-135m"), torch.float32)
ids = next(iter(load_file("runs/study/wanda-70/seed-0/calib/windows.safetensors").values()))[:8]
attn = model.model.layers[3].self_attn
linears = {"q_proj": attn.q_proj, "o_proj": attn.o_proj}
inputs = {name: [] for name in linears}
hooks = [mod.register_forward_hook(lambda mod, args, out, name=name: inputs[name].append(args[0].detach()))
         for name, mod in linears.items()]
with torch.no_grad():
    for s in range(ids.shape[0]):
        model(ids[s : s + 1].long())
for hook in hooks:
    hook.remove()

for name, mod in linears.items():
    w = mod.weight.detach().clone()
    stat = DSnoTStats(w.shape[1], torch.device("cpu"))
    for x in inputs[name]:
        stat.add(x)
    x_all = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[name]])

    def out_err(keep: torch.Tensor) -> float:
        return ((x_all @ (w * ~keep).T) ** 2).mean().item()

    for sparsity in (0.5, 0.7):
        keep0, res = _ours(w, stat, Unstructured(sparsity))
        ref_keep, flagged = _un_ref(w, stat, sparsity)
        same = torch.equal(res.keep[~flagged], ref_keep[~flagged])
        print(f"{name} {sparsity}: ours == reference on {(~flagged).sum().item()}/{w.shape[0]} rows: {same}; "
              f"swaps {res.swaps}; output error Wanda {out_err(keep0):.4f} -> DSnoT {out_err(res.keep):.4f} "
              f"(reference {out_err(ref_keep):.4f})")
