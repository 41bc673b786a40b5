"""``python tests/train_with_fake_vllm.py [CONFIG] [key=value ...]``: ``python -m hpt_fast.train`` with
tests/fake_vllm.py standing in for the ``vllm`` package, for tests of the trainer's vLLM path.

When the trainer is done, each rank writes what its fake engine saw next to the run:
``<output_dir>/fake_vllm_rank{R}.json`` (the engine's constructor arguments and its calls in order)
and ``fake_vllm_rank{R}.safetensors`` (the weights last loaded into it).
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fake_vllm  # noqa: E402

sys.modules["vllm"] = fake_vllm
_engines: list = []
_init = fake_vllm.LLM.__init__


def _record_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    _engines.append(self)


fake_vllm.LLM.__init__ = _record_init

from safetensors.torch import save_file  # noqa: E402

from hpt_fast.train import main, run_config  # noqa: E402
from hpt_fast.trainer import leave_process_group  # noqa: E402


def _describe(event: tuple) -> list:
    if event[0] == "generate":
        return ["generate", event[1]]
    if event[0] == "load_weights":
        return ["load_weights", event[1]]
    return [event[0], None if len(event) < 2 else (list(event[1]) if isinstance(event[1], tuple) else event[1])]


if __name__ == "__main__":
    code = main(sys.argv[1:])
    out = Path(run_config(sys.argv[1:]).train.output_dir)
    rank = int(os.environ.get("RANK", 0))
    (llm,) = _engines
    record = {"init": {k: v for k, v in llm.init_kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))},
              "events": [_describe(e) for e in llm.events]}
    (out / f"fake_vllm_rank{rank}.json").write_text(json.dumps(record))
    save_file({k: v.contiguous() for k, v in llm.model.weights.items()}, str(out / f"fake_vllm_rank{rank}.safetensors"))
    if code == 0:
        leave_process_group()  # as hpt_fast.train's own entry point does
    sys.exit(code)
