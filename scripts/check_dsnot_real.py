"""Our DSnoT against the restated reference loop (tests/unit/test_dsnot.py) on real SmolLM2 weights: block 3 q_proj
and o_proj, inputs from 8 calibration windows of runs/study/wanda-70 (run `make study` first), 50% and 70%.
Prints mask equality and the mean squared output error of the Wanda mask and the DSnoT mask.
Run: PYTHONPATH=. .venv/bin/python scripts/check_dsnot_real.py"""
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from sparse_recover.sparsity.stats import DSnoTStats
from sparse_recover.sparsity.patterns import Unstructured
from tests.unit.test_dsnot import _ours, _un_ref
torch.manual_seed(0)
m = AutoModelForCausalLM.from_pretrained("/root/.cache/sparse-recover/models/smollm2-135m", dtype=torch.float32)
ids = list(load_file("runs/study/wanda-70/seed-0/calib/windows.safetensors").values())[0][:8]
lin = {"q": m.model.layers[3].self_attn.q_proj, "o": m.model.layers[3].self_attn.o_proj}
xs = {k: [] for k in lin}
hooks = [mod.register_forward_hook(lambda mod, i, o, k=k: xs[k].append(i[0].detach())) for k, mod in lin.items()]
with torch.no_grad():
    for s in range(ids.shape[0]):
        m(ids[s:s+1].long())
for h in hooks: h.remove()
for k, mod in lin.items():
    w = mod.weight.detach().clone()
    stat = DSnoTStats(w.shape[1], torch.device("cpu"))
    for x in xs[k]: stat.add(x)
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs[k]])
    for sp in (0.5, 0.7):
        keep0, res = _ours(w, stat, Unstructured(sp))
        ref_keep, flagged = _un_ref(w, stat, sp)
        same = torch.equal(res.keep[~flagged], ref_keep[~flagged])
        err = lambda keep: ((X @ (w * ~keep).T) ** 2).mean().item()
        print(f"{k} {sp}: ours==ref on {(~flagged).sum().item()}/{w.shape[0]} unflagged rows: {same}; swaps {res.swaps}; "
              f"output error wanda {err(keep0):.4f} -> dsnot {err(res.keep):.4f} (ref {err(ref_keep):.4f})")
