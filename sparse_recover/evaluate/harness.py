"""lm-eval on the in-memory model: the zero-shot and MMLU protocols, any lm-eval task, local task data,
and the built-in offline `wiki-suite`.

The names callers import live here; the work is split by responsibility:
  tasks.py        task names and planning, `check_tasks` (validation before a model is loaded)
  local_data.py   DATA_DIR: task YAMLs that read local copies of the standard tasks
  lm_eval_run.py  `run_lm_eval`: the lm-eval call, error mapping and the result dict
"""

from __future__ import annotations

from sparse_recover.evaluate.lm_eval_run import BATCH_SIZE_CPU_AUTO, run_lm_eval
from sparse_recover.evaluate.tasks import GROUP_NAMES, MMLU, MMLU_FEWSHOT, WIKI_SUITE, ZEROSHOT, check_tasks

__all__ = ["BATCH_SIZE_CPU_AUTO", "GROUP_NAMES", "MMLU", "MMLU_FEWSHOT", "WIKI_SUITE", "ZEROSHOT", "check_tasks",
           "run_lm_eval"]
