#!/usr/bin/env bash
# Everything that needs a GPU, as one run, most wanted first: the Triton backend's tests on the GPU
# (no interpreter), the torch backend's tests there, the fused-op table against cuBLAS, Liger, cut-cross-entropy and TRL at a training
# shape, the op's steps back to back against the GEMMs' sustained rate, the op's phases timed
# unprofiled, the statistics kernel with and without mode A's logit sums, the soft cap in every
# library that has one, torch AMP's mixed precision (float32 leaves), gradient
# precision, a profile of mode B's step, the random-configuration tests, the block budget's effect
# on mode A and mode B, a second table shape with float32, the rollout engine against transformers'
# generate, then profiles of the trainer's steps.
#
# Usage, from the repository root of a checkout on a CUDA machine with torch and triton:
#     OUT=some/dir bash bench/gpu_run.sh
# Wheels found in .whl/ (liger-kernel, cut-cross-entropy; trl with datasets, dill and multiprocess
# for TRL's fused LM head, the rest of its imports being in the GPU image; deepspeed, math-verify and
# their dependencies for the trainer's steps) are installed into /tmp/site first; the
# tree itself runs uninstalled. Every step writes <step>.out (stdout) and <step>.err into $WORK
# and has its own time limit, cut to what is left of DEADLINE_S (default 540 s, within the device
# tool's 600 s per command); a step with under 15 s left is skipped and named in skipped.txt, so an
# overrun loses the last steps, not the whole run. After every step $WORK is packed into
# $OUT/gpu_run.tgz: the device tool brings back only a few files per command. STEPS (names
# separated by spaces, e.g. "tests_triton phase_times") runs only those steps; TABLE_IMPLS (names
# separated by commas) limits table_7b to those implementations and the bare GEMMs.
set -uo pipefail
OUT=${OUT:-bench/gpu_out}
WORK=${WORK:-$(mktemp -d /tmp/gpu_run.XXXXXX)}  # fresh, so an archive holds one run only
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-540}

# step NAME LIMIT_S COMMAND...: run COMMAND under the smaller of LIMIT_S and the time left
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n ${STEPS:-} && " $STEPS " != *" $name "* ]]; then
        return
    fi
    local left=$((DEADLINE_S - ($(date +%s) - START)))
    ((left < limit)) && limit=$left
    if ((limit < 15)); then
        echo "$name: skipped, ${left} s left" | tee -a "$WORK/skipped.txt"
        return
    fi
    echo "== $name (limit ${limit} s, $(( $(date +%s) - START )) s in)"
    timeout "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
    echo "   exit $? after $(( $(date +%s) - START )) s"
    tar czf "$OUT/gpu_run.tgz" -C "$WORK" .
}

# .whl/ is git-ignored: the device tool's run needs carry=[".whl"] for it to arrive
if ! compgen -G ".whl/*.whl" >/dev/null; then
    wheels="NO WHEELS in .whl/: the Liger, cut-cross-entropy and TRL rows will be skipped"
elif python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site
    wheels="wheels installed: $(cd .whl && ls *.whl | tr '\n' ' ')"
else
    wheels="WHEEL INSTALL FAILED: the Liger, cut-cross-entropy and TRL rows will be skipped"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# installed, hpt_fast.kernels is the top-level kernels/ folder (setup.py's package_dir)
[ -e hpt_fast/kernels ] || ln -s ../kernels hpt_fast/kernels

{
    echo "$wheels"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$WORK/machine.txt"

TRAINING_SHAPE=8192x3584x151936  # Qwen2.5-7B's hidden size and vocabulary, 8192 tokens
# Most wanted first: a step cut by the deadline is one of the last.
step tests_triton "${TEST_LIMIT_S:-70}" python3 -m pytest -p no:cacheprovider -q -rfE \
    tests/test_fused_op.py tests/test_row_stats.py tests/test_op_interop.py -k "triton or cuda"
# the torch backend (the readable reference, "any device") on the GPU too
step tests_torch_cuda "${TEST_LIMIT_S:-70}" env HPT_FAST_TEST_TORCH_DEVICE=cuda python3 -m pytest \
    -p no:cacheprovider -q -rfE tests/test_fused_op.py tests/test_row_stats.py tests/test_op_interop.py \
    -k "torch and not triton"
step table_7b "${TABLE_LIMIT_S:-130}" python3 -m bench.fused_op_table --device cuda \
    --shapes $TRAINING_SHAPE --dtypes bfloat16 ${TABLE_IMPLS:+--impls $TABLE_IMPLS}
# the op's steps back to back against bare GEMMs alone and in long bursts, with the SM clock,
# power and clock-limit reasons sampled (does the card hold the floor's GEMM rate through a step?);
# nvidia-smi's performance counters before and after
step smi_before 15 nvidia-smi -q -d PERFORMANCE,POWER,CLOCK
step sustained "${SUSTAINED_LIMIT_S:-90}" python3 -m bench.sustained_rate --device cuda \
    --impls hpt_b_triton,hpt_b_triton_lowp_sum,hpt_b_triton_one_chunk,hpt_a_triton,naive,liger_flce,cce
step smi_after 15 nvidia-smi -q -d PERFORMANCE,POWER,CLOCK
# each phase of the op on the device's timeline, unprofiled: is the idle time before the first
# kernel that the profiler shows there without it?
step phase_times "${PHASES_LIMIT_S:-40}" python3 -m bench.phase_times --device cuda \
    --impls hpt_b_triton,hpt_b_triton_lowp_sum,hpt_a_triton
# mode A's logit sums (return_logit_mean, return_log_sum_sq_probs) in the statistics kernel: every
# tiling with and without them, on the training shape's block
step row_sums "${ROW_SUMS_LIMIT_S:-40}" python3 -m bench.row_kernel_sweep --device cuda --sums
# Gemma 2's soft cap of 30, the op's beside each library's own
step table_7b_softcap "${SOFTCAP_LIMIT_S:-60}" python3 -m bench.fused_op_table --device cuda \
    --shapes $TRAINING_SHAPE --dtypes bfloat16 \
    --impls hpt_a_triton,hpt_a_triton_softcap,hpt_b_triton_softcap,naive_softcap,liger_flce_softcap,trl_chunked_softcap,cce_softcap
# a whole model's step with its own loss patched (patch_causal_lm_loss) against transformers' own:
# a 2-layer Qwen2 with the 7B's H and V, 8192 tokens in rows of 2048
step causal_lm_loss "${CAUSAL_LM_LIMIT_S:-90}" python3 -m bench.causal_lm_loss --device cuda \
    --tokens 8192 --seq 2048 --hidden 3584 --layers 2 --repeats 10
# torch AMP: float32 leaves, forward under autocast; the op taking them itself (float32 weight
# gradient summed in place, so token order) against bf16 casts of them handed to it (vocabulary
# order, bf16 gradients cast back by autograd)
step table_7b_amp "${AMP_LIMIT_S:-60}" python3 -m bench.fused_op_table --device cuda \
    --shapes $TRAINING_SHAPE --dtypes bfloat16 \
    --impls hpt_b_triton,hpt_b_triton_autocast,hpt_b_triton_autocast_cast,hpt_a_triton_autocast,naive_autocast
# gradient error against float64 by accum_dtype, where the float32 sum takes float32 products,
# and of the float32 gradients under autocast
step precision "${PRECISION_LIMIT_S:-40}" python3 -m bench.accum_precision --device cuda --tokens 8192
# where the default mode B step spends its time now
step profile "${PROFILE_LIMIT_S:-40}" python3 -m bench.profile_op --device cuda --impls hpt_b_triton,hpt_b_triton_lowp_sum --rows 16
# the random configurations: their Triton cases run on the GPU at full size (the others skip
# where the C++ extension is not built for this python)
step tests_random "${TEST_LIMIT_S:-70}" python3 -m pytest -p no:cacheprovider -q -rfE tests/test_fused_op_random.py
# the block budget (the default is 1/12 of the naive float32 logits, 396 MiB at this shape; the
# earlier session measured 128, 256, 512 and 1024 MiB)
for mb in ${BUDGETS_MB:-256 1024}; do
    step "table_7b_budget$mb" "${BUDGET_LIMIT_S:-45}" env HPT_FAST_MEMORY_BUDGET_MB=$mb \
        python3 -m bench.fused_op_table --device cuda --shapes $TRAINING_SHAPE --dtypes bfloat16 \
        --impls hpt_a_triton,hpt_b_triton,hpt_b_triton_tokens,hpt_b_triton_lowp_sum
done
step table_2k "${TABLE_LIMIT_S:-110}" python3 -m bench.fused_op_table --device cuda \
    --shapes 4096x2048x151936 --dtypes bfloat16,float32
# NativeEngine against transformers' generate on the GPU, float32 and bf16 (where SDPA picks cuDNN's
# attention, which plans every new shape: the engine's decode turns it off)
step rollout "${ROLLOUT_LIMIT_S:-45}" python3 -m bench.rollout_throughput --device cuda --no-memory
# with peak memory: four more processes, each starting torch and CUDA (45 s was too short)
step rollout_bf16 "${ROLLOUT_MEMORY_LIMIT_S:-100}" python3 -m bench.rollout_throughput --device cuda --dtype bfloat16
# the trainer's embedded default on the GPU (needs deepspeed and math-verify among the wheels):
# where its steps' time goes, float32 and bf16, with Liger's model kernels
step train_profile "${TRAIN_LIMIT_S:-90}" python3 -m bench.profile_train_step model.liger_kernels=true \
    train.output_dir=/tmp/train_profile --warmup 3 --steps 3
step train_profile_bf16 "${TRAIN_LIMIT_S:-90}" python3 -m bench.profile_train_step model.liger_kernels=true \
    deepspeed.bf16=true train.output_dir=/tmp/train_profile_bf16 --warmup 3 --steps 3
echo "done after $(( $(date +%s) - START )) s" | tee -a "$WORK/machine.txt"
tar czf "$OUT/gpu_run.tgz" -C "$WORK" .
