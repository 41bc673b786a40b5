#!/usr/bin/env bash
# Everything that needs a GPU, as one run: the Triton backend's tests on the GPU (no interpreter),
# then the fused-op tables against cuBLAS, Liger and cut-cross-entropy, mode B at larger block budgets,
# then bf16 gradient precision.
#
# Usage, from the repository root of a checkout on a CUDA machine with torch and triton:
#     OUT=some/dir bash bench/gpu_run.sh
# Wheels found in .whl/ (liger-kernel, cut-cross-entropy) are installed into /tmp/site first; the
# tree itself runs uninstalled. Each step has its own time limit and writes its output to $OUT as
# it goes, so a step that overruns loses only itself (a table step prints only at its end). The
# default limits add up to 540 s, within the device tool's 600 s per command.
set -uo pipefail
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# .whl/ is git-ignored: the device tool's run needs carry=[".whl"] for it to arrive
if ! compgen -G ".whl/*.whl" >/dev/null; then
    wheels="NO WHEELS in .whl/: the Liger and cut-cross-entropy rows will be skipped"
elif python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site
    wheels="wheels installed: $(cd .whl && ls *.whl | tr '\n' ' ')"
else
    wheels="WHEEL INSTALL FAILED: the Liger and cut-cross-entropy rows will be skipped"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# installed, hpt_fast.kernels is the top-level kernels/ folder (setup.py's package_dir)
[ -e hpt_fast/kernels ] || ln -s ../kernels hpt_fast/kernels

{
    echo "$wheels"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

timeout "${TEST_LIMIT_S:-70}" python3 -m pytest -p no:cacheprovider -q -rfE \
    tests/test_fused_op.py tests/test_row_stats.py tests/test_op_interop.py -k triton 2>&1 | tee "$OUT/tests.txt"
# the random configurations: their Triton cases run on the GPU at full size (the others skip
# where the C++ extension is not built for this python)
timeout "${TEST_LIMIT_S:-70}" python3 -m pytest -p no:cacheprovider -q -rfE \
    tests/test_fused_op_random.py 2>&1 | tee -a "$OUT/tests.txt"

# a training-size bf16 case (Qwen2.5-7B's hidden size and vocabulary), then both dtypes at a
# smaller hidden size
timeout "${TABLE_LIMIT_S:-90}" python3 -m bench.fused_op_table --device cuda \
    --shapes 8192x3584x151936 --dtypes bfloat16 2>"$OUT/table_7b.log" | tee "$OUT/table_7b.md"
timeout "${TABLE_LIMIT_S:-90}" python3 -m bench.fused_op_table --device cuda \
    --shapes 4096x2048x151936 --dtypes bfloat16,float32 2>"$OUT/table_2k.log" | tee "$OUT/table_2k.md"
# mode B at larger block budgets, still within 1/8 of the naive logits at this shape (622 MB):
# how far token order with accum_dtype=None gets, against the default's vocabulary order
for mb in ${BUDGETS_MB:-256 512}; do
    HPT_FAST_MEMORY_BUDGET_MB=$mb timeout "${TABLE_LIMIT_S:-90}" python3 -m bench.fused_op_table --device cuda \
        --shapes 8192x3584x151936 --dtypes bfloat16 \
        --impls hpt_b_triton,hpt_b_triton_tokens,hpt_b_triton_lowp_sum \
        2>"$OUT/table_7b_budget$mb.log" | tee "$OUT/table_7b_budget$mb.md"
done
# bf16 gradient error against float64 by accum_dtype, where the float32 sum takes float32 products
timeout "${PRECISION_LIMIT_S:-40}" python3 -m bench.accum_precision --device cuda --tokens 8192 \
    2>"$OUT/precision.log" | tee "$OUT/precision.md"
