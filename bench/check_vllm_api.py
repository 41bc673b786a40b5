"""Checks that every vLLM class, method, keyword and field VLLMEngine uses exists in a vLLM release.

Usage (from the repository root):
    python bench/check_vllm_api.py                      # the installed vllm
    python bench/check_vllm_api.py --wheel vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl

What is checked is what ``hpt_fast/rollout/vllm.py`` declares it uses (``VLLM_API_USED``,
``VLLM_MODEL_PATH``, ``VLLM_FIELDS_USED``, ``LOGPROBS_MODE``), read from vLLM's source with ``ast``:
nothing of vLLM is imported, so the check runs on any machine, including one where vLLM cannot
(a wheel can be fetched with ``pip download --no-deps vllm==X -d DIR``). One line per check; the
exit status is 1 if any fails.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.cli import cli_description  # noqa: E402
from hpt_fast.rollout.vllm import LOGPROBS_MODE, VLLM_API_USED, VLLM_FIELDS_USED, VLLM_MODEL_PATH  # noqa: E402

# where each class is defined in vLLM (the internals may move between releases: then this fails)
LOCATIONS = {
    "LLM": "vllm/entrypoints/llm.py",
    "SamplingParams": "vllm/sampling_params.py",
    "EngineArgs": "vllm/engine/arg_utils.py",
    "TokensPrompt": "vllm/inputs/llm.py",
    "RequestOutput": "vllm/outputs.py",
    "CompletionOutput": "vllm/outputs.py",
    "Logprob": "vllm/logprobs.py",
    "LLMEngine": "vllm/v1/engine/llm_engine.py",
    "UniProcExecutor": "vllm/v1/executor/uniproc_executor.py",
    "WorkerWrapperBase": "vllm/v1/worker/worker_base.py",
    "Worker": "vllm/v1/worker/gpu_worker.py",
    "GPUModelRunner": "vllm/v1/worker/gpu_model_runner.py",
    "Qwen2ForCausalLM": "vllm/model_executor/models/qwen2.py",
    "LlamaForCausalLM": "vllm/model_executor/models/llama.py",
}
# (class, attribute) down to the model: the in-process executors ("uni", and "external_launcher",
# a subclass) hold a WorkerWrapperBase, which forwards unknown attributes to its .worker
MODEL_CHAIN = [
    ("LLM", "llm_engine"),
    ("LLMEngine", "model_executor"),
    ("UniProcExecutor", "driver_worker"),
    ("WorkerWrapperBase", "worker"),
    ("Worker", "model_runner"),
    ("GPUModelRunner", "model"),
]
FORWARDING = "WorkerWrapperBase"
LOGPROBS_MODE_FILE = "vllm/config/model.py"
IMPORTED_FROM_VLLM = ("LLM", "SamplingParams")  # ``from vllm import ...`` in the engine


class Source:
    """vLLM's source files by path (``vllm/...py``), from an installed package or a wheel."""

    def __init__(self, wheel: Optional[Path]):
        if wheel is not None:
            self._zip: Optional[zipfile.ZipFile] = zipfile.ZipFile(wheel)
            self.origin = str(wheel)
        else:
            spec = importlib.util.find_spec("vllm")  # locates the package without importing it
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit("vllm is not installed: pass --wheel PATH (pip download --no-deps vllm==X)")
            self._zip = None
            self._root = Path(list(spec.submodule_search_locations)[0]).parent
            self.origin = str(self._root / "vllm")
        self._trees: dict[str, ast.Module] = {}

    def tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            text = self._zip.read(path).decode() if self._zip else (self._root / path).read_text()
            self._trees[path] = ast.parse(text)
        return self._trees[path]

    def exists(self, path: str) -> bool:
        if self._zip:
            return path in self._zip.namelist()
        return (self._root / path).is_file()

    def module_path(self, module: str) -> Optional[str]:
        base = module.replace(".", "/")
        return next((p for p in (f"{base}.py", f"{base}/__init__.py") if self.exists(p)), None)


@dataclass
class ClassInfo:
    node: ast.ClassDef
    path: str


def find_class(source: Source, name: str, path: Optional[str] = None) -> ClassInfo:
    path = path or LOCATIONS[name]
    for node in source.tree(path).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return ClassInfo(node, path)
    raise LookupError(f"class {name} not found in {path}")


def bases(source: Source, info: ClassInfo) -> Iterator[ClassInfo]:
    """The base classes defined in vLLM, found through the defining file's imports."""
    tree = source.tree(info.path)
    for base in info.node.bases:
        name = base.id if isinstance(base, ast.Name) else None
        if name is None:
            continue
        if any(isinstance(n, ast.ClassDef) and n.name == name for n in tree.body):
            yield find_class(source, name, info.path)
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vllm"):
                if any(alias.name == name for alias in node.names):
                    path = source.module_path(node.module)
                    if path:
                        yield find_class(source, name, path)


def method(info: ClassInfo, name: str) -> Optional[ast.FunctionDef]:
    return next((n for n in info.node.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def parameters(fn: ast.FunctionDef) -> tuple[set[str], bool]:
    """Names a caller may pass by keyword (self excluded), and whether **kwargs is accepted."""
    args = fn.args
    names = {a.arg for a in args.args + args.kwonlyargs}  # positional-only ones cannot be keywords
    return names - {"self", "cls"}, args.kwarg is not None


def class_fields(info: ClassInfo) -> set[str]:
    """Annotated class-body names (dataclass / msgspec.Struct / TypedDict fields)."""
    return {n.target.id for n in info.node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def assigned_attributes(source: Source, info: ClassInfo) -> set[str]:
    """``self.X`` assigned (or annotated) anywhere in the class or its vLLM bases, plus its fields."""
    found = class_fields(info)
    for node in ast.walk(info.node):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                found.add(target.attr)
    for base in bases(source, info):
        found |= assigned_attributes(source, base)
    return found


class Report:
    def __init__(self) -> None:
        self.failures = 0

    def check(self, ok: bool, what: str, detail: str = "") -> None:
        self.failures += not ok
        print(f"{'ok     ' if ok else 'MISSING'} {what}{f'  ({detail})' if detail else ''}")


def check_exports(source: Source, report: Report) -> None:
    tree = source.tree("vllm/__init__.py")
    table = next(
        ast.literal_eval(n.value) for n in tree.body
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "MODULE_ATTRS" for t in n.targets)
    )
    for name in IMPORTED_FROM_VLLM:
        target = table.get(name, "")
        module = "vllm" + target.split(":")[0] if target else ""
        ok = source.module_path(module) == LOCATIONS[name]
        report.check(ok, f"from vllm import {name}", target or "not exported")


def check_calls(source: Source, report: Report) -> None:
    engine_args = class_fields(find_class(source, "EngineArgs"))
    for target, keywords in VLLM_API_USED.items():
        cls_name, _, meth_name = target.partition(".")
        info = find_class(source, cls_name)
        if cls_name == "SamplingParams":  # a msgspec.Struct: its fields are its keywords
            accepted, forwards = class_fields(info), False
        else:
            fn = method(info, meth_name or "__init__")
            if fn is None:
                report.check(False, target, "no such method")
                continue
            accepted, forwards = parameters(fn)
        for keyword in keywords:
            if keyword in accepted:
                report.check(True, f"{target}({keyword}=)")
            elif cls_name == "LLM" and not meth_name and forwards:
                report.check(keyword in engine_args, f"{target}({keyword}=)", "through **kwargs to EngineArgs")
            else:
                report.check(False, f"{target}({keyword}=)")
        if not keywords:
            report.check(True, f"{target}()")


def check_fields(source: Source, report: Report) -> None:
    for cls_name, names in VLLM_FIELDS_USED.items():
        known = assigned_attributes(source, find_class(source, cls_name))
        for name in names:
            report.check(name in known, f"{cls_name}.{name}")


def check_model_path(source: Source, report: Report) -> None:
    attrs = tuple(attr for cls, attr in MODEL_CHAIN if cls != FORWARDING)
    report.check(attrs == VLLM_MODEL_PATH, "model path " + ".".join(VLLM_MODEL_PATH),
                 "this script's chain: " + ".".join(attrs))
    for cls_name, attr in MODEL_CHAIN:
        report.check(attr in assigned_attributes(source, find_class(source, cls_name)), f"{cls_name}.{attr}")
    report.check(method(find_class(source, FORWARDING), "__getattr__") is not None, f"{FORWARDING}.__getattr__")
    for model in ("Qwen2ForCausalLM", "LlamaForCausalLM"):
        fn = method(find_class(source, model), "load_weights")
        report.check(fn is not None and "weights" in parameters(fn)[0], f"{model}.load_weights(weights)")


def check_logprobs_mode(source: Source, report: Report) -> None:
    tree = source.tree(LOGPROBS_MODE_FILE)
    literal = next(
        (n.value for n in tree.body if isinstance(n, ast.Assign)
         and any(isinstance(t, ast.Name) and t.id == "LogprobsMode" for t in n.targets)),
        None,
    )
    values = {c.value for c in ast.walk(literal) if isinstance(c, ast.Constant)} if literal is not None else set()
    report.check(LOGPROBS_MODE in values, f"LogprobsMode {LOGPROBS_MODE!r}", ", ".join(sorted(values)))


def main() -> int:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--wheel", type=Path, help="check this vLLM wheel instead of the installed package")
    wheel = parser.parse_args().wheel
    if wheel is not None and not wheel.is_file():
        parser.error(f"--wheel: no such file: {wheel}")
    source = Source(wheel)
    print(f"vLLM source: {source.origin}")
    report = Report()
    for check in (check_exports, check_calls, check_fields, check_model_path, check_logprobs_mode):
        try:
            check(source, report)
        except (LookupError, KeyError, StopIteration) as err:
            report.check(False, check.__name__, repr(err))
    print(f"{report.failures} missing" if report.failures else "all present")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
