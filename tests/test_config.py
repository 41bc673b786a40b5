"""The run config: shipped files, YAML loading with base files, key=value overrides, errors, dump."""
from pathlib import Path

import pytest
import torch

from hpt_fast.config import (
    Config, ConfigError, OptimConfig, apply_override, build_estimators, dump_config, load_config, validate,
)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
BASELINES = ("sft", "grpo", "sft_then_grpo", "luffy", "srft")


def test_every_baseline_is_shipped_for_the_7b_and_the_toy():
    names = {p.stem for p in CONFIGS}
    expected = {"toy", "qwen2.5-math-7b-hpt", "llama3.1-8b-hpt"} | set(BASELINES) | {f"toy-{b}" for b in BASELINES}
    assert expected <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads_validates_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert build_estimators(cfg)
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_toy_yaml_is_the_embedded_default():
    assert load_config(CONFIGS[0].parent / "toy.yaml") == Config() == load_config()


def test_published_settings():
    qwen = load_config(CONFIGS[0].parent / "qwen2.5-math-7b-hpt.yaml")
    assert (qwen.algorithm.method, qwen.algorithm.gamma, qwen.rollout.n) == ("hpt", 0.0, 8)
    assert (qwen.optim.lr, qwen.optim.grad_clip, qwen.optim.skip_grad_norm_above) == (5e-6, 1.0, 80.0)
    # "lr 5e-6 constant": the first update already at the full rate
    assert [qwen.optim.lr_factor(s, 1000) for s in (0, 1, 999)] == [1.0, 1.0, 1.0]
    assert (qwen.train.prompts_per_step, qwen.train.mini_batch_prompts, qwen.train.total_steps) == (128, 64, 500)
    est = build_estimators(qwen)["hpt"]
    assert (est.hparams.loss_agg, est.hparams.max_response_length, est.hparams.entropy_coef) == ("token-sum-norm", 8192, 0.001)
    llama = load_config(CONFIGS[0].parent / "llama3.1-8b-hpt.yaml")
    # SFT when at most 2 of 8 are correct; everything else inherited through base:
    assert llama.algorithm.gamma == 0.25 and llama.optim.lr == 5e-6 and llama.train.prompts_per_step == 128
    assert "{prompt}" in llama.data.prompt_template


def test_method_rules_and_estimators():
    cfg = load_config(CONFIGS[0].parent / "sft_then_grpo.yaml")
    assert [cfg.algorithm.batch_rule(s) for s in (0, 249, 250)] == ["sft", "sft", "rl"]
    est = build_estimators(cfg)
    assert (est["sft"].name, est["rl"].name) == ("sft", "grpo")
    assert cfg.rollouts_per_prompt("sft") == 0 and cfg.rollouts_per_prompt("rl") == 8
    luffy = load_config(CONFIGS[0].parent / "luffy.yaml")
    assert luffy.algorithm.batch_rule(0) == "luffy" and luffy.rollouts_per_prompt("luffy") == 7
    # the HPT repository's LUFFY and SRFT scripts: lr 1e-6 and no step skipped, unlike its HPT script
    srft = load_config(CONFIGS[0].parent / "srft.yaml")
    for baseline in (luffy, srft):
        assert baseline.optim.lr == 1e-6 and baseline.optim.skip_grad_norm_above is None
        assert baseline.algorithm.entropy_coef == 0.001 and baseline.train.total_steps == 500


def test_overrides_are_parsed_by_field_type():
    cfg = load_config(None, [
        "rollout.n=4", "optim.lr=5e-6", "data.shuffle=false", "model.tokenizer=some/dir", "deepspeed.zero_stage=2",
        "data.train_files=a.parquet,b.parquet", "validation.files=[x.json, y.json]", "optim.grad_clip=null",
        "algorithm.estimator_hparams.clip_high=0.28", "rollout.engine=native", "algorithm.entropy_coef=0",
    ])
    assert cfg.rollout.n == 4 and cfg.optim.lr == 5e-6 and cfg.data.shuffle is False
    assert cfg.model.tokenizer == "some/dir" and cfg.deepspeed.zero_stage == 2 and cfg.optim.grad_clip is None
    assert cfg.data.train_files == ["a.parquet", "b.parquet"] and cfg.validation.files == ["x.json", "y.json"]
    assert cfg.algorithm.estimator_hparams == {"clip_high": 0.28} and cfg.algorithm.entropy_coef == 0.0
    assert build_estimators(cfg)["hpt"].hparams.clip_high == 0.28
    cfg = load_config(None, ["algorithm.method=grpo", "algorithm.estimator_hparams={clip_low: 0.1, clip_high: 0.3}"])
    assert build_estimators(cfg)["rl"].hparams.clip_low == 0.1


def test_yaml_reads_exponent_floats_and_base_merges_sections(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 5e-6\n  weight_decay: 0.1\nrollout:\n  n: 4\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim:\n  lr: 1e-5\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.rollout.n) == (1e-5, 0.1, 4)


@pytest.mark.parametrize("overrides, message", [
    (["rollout.nn=3"], r"rollout\.nn: unknown key \(did you mean 'rollout\.n'"),
    (["model.pth=x"], r"model\.pth: unknown key \(did you mean 'model\.path'"),
    (["rollout.n=abc"], r"rollout\.n: expected int, got 'abc'"),
    (["rollout.n=2.5"], r"rollout\.n: expected int"),
    (["data.shuffle=maybe"], r"data\.shuffle: expected bool"),
    (["algorithm.method=hpx"], r"algorithm\.method: 'hpx' is not one of .*did you mean 'hpt'"),
    (["deepspeed.zero_stage=4"], r"deepspeed\.zero_stage: 4 is not one of 0, 1, 2, 3"),
    (["deepspeed.zero_stage=true"], r"deepspeed\.zero_stage: True is not one of 0, 1, 2, 3"),
    (["optim.lr=nan"], r"optim\.lr: must be a finite number"),
    (["optim.lr=0"], r"optim\.lr: must be > 0"),
    (["rollout=3"], r"rollout: is a section"),
    (["rollout.n.x=3"], r"rollout\.n: is a setting, not a section"),
    (["rollout.n"], r"expected key=value"),
    (["algorithm.gamma=1.5"], r"algorithm\.gamma: must be a fraction in \[0, 1\]"),
    (["rollout.top_p=0"], r"rollout\.top_p: must be in \(0, 1\]"),
    (["rollout.temperature=0"], r"rollout\.temperature: must be > 0"),
    (["reward.num_workers=0"], r"reward\.num_workers: must be >= 1, got 0"),
    (["reward.timeout_s=.inf"], r"reward\.timeout_s: must be a finite number, got inf"),
    (["reward.timeout_s=0"], r"reward\.timeout_s: must be a finite number > 0, got 0"),
    (["train.mini_batch_prompts=5"], r"train\.mini_batch_prompts: must divide train\.prompts_per_step = 32"),
    (["deepspeed.micro_batch_tokens=100"], r"deepspeed\.micro_batch_tokens: must hold one whole sequence"),
    (["data.prompt_template=Q: {question}"], r"data\.prompt_template: must contain \{prompt\}"),
    (["data.train_files=[]"], r"data\.train_files: needs at least one file"),
    (["validation.files=[]"], r"validation\.files: is empty but validation\.every > 0"),
    (["rollout.engine=vllm", "train.mini_batch_prompts=16"], r"rollout\.old_logprobs: 'sampler' log-probs .* use 'recompute'"),
    (["rollout.engine=vllm", "rollout.old_logprobs=recompute", "rollout.top_p=0.9"], r"rollout\.top_p: must be 1\.0 with the vLLM"),
    (["rollout.engine=vllm", "rollout.temperature=2.5"], r"rollout\.temperature: must be in \[0\.01, 2\.0\] with the vLLM engine"),
    (["rollout.engine=vllm", "validation.temperature=0.005"], r"validation\.temperature: must be in \[0\.01, 2\.0\] or 0 with"),
    (["rollout.vllm.kv_cache_memory_bytes=0"], r"rollout\.vllm\.kv_cache_memory_bytes: must be >= 1 or null"),
    (["rollout.vllm.sleep_level=3"], r"rollout\.vllm\.sleep_level: 3 is not one of 1, 2"),
    (["train.mini_batch_prompts=0"], r"train\.mini_batch_prompts: must be >= 1 or null"),
    (["deepspeed.bf16=true", "train.mini_batch_prompts=16"], r"rollout\.old_logprobs"),
    (["algorithm.method=luffy", "rollout.n=1"], r"rollout\.n: luffy groups 1 demonstration"),
    (["rollout.n=1"], r"rollout\.n: hpt's rollout advantages are centred .* with n = 1 every advantage is 0 .*: needs n >= 2, got 1"),
    (["algorithm.method=grpo", "rollout.n=1"], r"rollout\.n: grpo's .* needs n >= 2 \(or algorithm\.estimator=reinforce\), got 1"),
    (["algorithm.method=sft_then_rl", "algorithm.sft_steps=1", "algorithm.estimator=dr_grpo", "rollout.n=1"], r"rollout\.n: sft_then_rl's .* needs n >= 2"),
    (["algorithm.method=sft_then_rl"], r"algorithm\.sft_steps: sft_then_rl needs at least one SFT step"),
    (["algorithm.estimator=grpo"], r"algorithm\.estimator: preset 'grpo' cannot train the 'hpt' batch rule.*hpt"),
    (["algorithm.estimator=ppo2"], r"algorithm\.estimator: unknown preset 'ppo2' \(did you mean 'ppo'"),
    (["algorithm.estimator_hparams.shaping_gamma=0.2"], r"algorithm\.estimator_hparams: hpt does not take shaping_gamma"),
    (["algorithm.estimator_hparams.clip_high=-1"], r"algorithm\.estimator_hparams: clip_high must be"),
    (["algorithm.estimator_hparams.entropy_coef=0.1"], r"estimator_hparams\.entropy_coef: set algorithm\.entropy_coef"),
    (["algorithm.estimator_hparams.max_response_length=9"], r"set data\.max_response_length"),
    (["fused_op.chunk_size=0"], r"fused_op\.chunk_size: must be >= 1 or null"),
    (["fused_op.accum_dtype=bfloat16"], r"fused_op\.accum_dtype: 'bfloat16' is not one of 'float32', 'inputs'"),
    (["fused_op.backend=cuda"], r"fused_op\.backend: 'cuda' is not one of 'auto', 'torch', 'cpu', 'triton'"),
    (["train.keep_checkpoints=-1"], r"train\.keep_checkpoints: must be >= 0, got -1"),
    (["train.seed=-1"], r"train\.seed: must be >= 0, got -1"),
    (["toy.seed=-3"], r"toy\.seed: must be >= 0, got -3"),
    (["model.path=/nowhere/model"], r"model\.path: no such directory: /nowhere/model \(a local model directory, or a"),
    (["model.tokenizer=./nowhere"], r"model\.tokenizer: no such directory: \./nowhere"),
    (["model.path=runs/x/model"], r"model\.path: no such directory: runs/x/model"),
])
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_method_sft_takes_the_settings_of_the_sft_preset_and_refuses_the_others() -> None:
    """method=sft does not ignore the estimator settings: those the sft preset has (entropy_coef,
    sft_coef, loss_agg) reach its estimator, any other is a ConfigError; sft_then_rl's are its RL
    phase's, and its SFT phase is the plain sft preset."""
    cfg = load_config(None, ["algorithm.method=sft", "algorithm.entropy_coef=0.01",
                             "algorithm.estimator_hparams={sft_coef: 2.0, loss_agg: token-sum-norm}"])
    hp = build_estimators(cfg)["sft"].hparams
    assert (hp.entropy_coef, hp.sft_coef, hp.loss_agg, hp.max_response_length) == (0.01, 2.0, "token-sum-norm", 64)
    with pytest.raises(ConfigError, match=r"^algorithm\.estimator_hparams: sft does not take clip_high; it takes: "
                       r"loss_agg, max_response_length, entropy_coef, sft_coef$"):
        load_config(None, ["algorithm.method=sft", "algorithm.estimator_hparams.clip_high=0.28"])
    est = build_estimators(load_config(None, ["algorithm.method=sft_then_rl", "algorithm.sft_steps=1",
                                              "algorithm.entropy_coef=0.01"]))
    assert (est["rl"].hparams.entropy_coef, est["sft"].hparams.entropy_coef) == (0.01, 0.0)


def test_a_micro_batch_of_exactly_one_whole_sequence_is_enough() -> None:
    """deepspeed.micro_batch_tokens must hold a prompt of max_prompt_length and a response of
    max_response_length: exactly their sum is accepted, one token less refused."""
    lengths = ["data.max_prompt_length=40", "data.max_response_length=24"]
    assert load_config(None, [*lengths, "deepspeed.micro_batch_tokens=64"]).deepspeed.micro_batch_tokens == 64
    with pytest.raises(ConfigError, match=r"deepspeed\.micro_batch_tokens: must hold one whole sequence, "
                       r"max_prompt_length \+ max_response_length = 64, got 63"):
        load_config(None, [*lengths, "deepspeed.micro_batch_tokens=63"])


def test_one_rollout_per_prompt_is_allowed_where_nothing_is_centred():
    """REINFORCE's advantage is the reward itself, and SFT has no rollouts."""
    for overrides in (["algorithm.method=grpo", "algorithm.estimator=reinforce"], ["algorithm.method=sft"]):
        assert load_config(None, overrides + ["rollout.n=1"]).rollout.n == 1


def test_a_directory_that_is_not_a_saved_model_is_named(tmp_path):
    """A run directory given for its checkpoint: transformers would blame a missing library."""
    with pytest.raises(ConfigError, match=r"model\.path: .* has no config\.json: not a model directory"):
        load_config(None, [f"model.path={tmp_path}"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"model\.path: .* has no tokenizer_config\.json or tokenizer\.json"):
        load_config(None, [f"model.path={tmp_path}"])
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert load_config(None, [f"model.path={tmp_path}"]).model.path == str(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("rollout:\n  nn: 3\n", r"rollout\.nn: unknown key \(did you mean 'rollout\.n'"),
    ("rolout:\n  n: 3\n", r"rolout: unknown key \(did you mean 'rollout'"),
    ("rollout:\n  n: eight\n", r"rollout\.n: expected int, got 'eight'"),
    ("rollout: 3\n", r"rollout: expected a mapping"),
    ("data:\n  train_files: a.parquet\n", r"data\.train_files: expected list\[str\]"),
    ("data:\n  train_files: [1]\n", r"data\.train_files\[0\]: expected str"),
    ("- a\n- b\n", r"expected a mapping of sections"),
    ("optim: {lr: [1\n", r"not valid YAML"),
    ("base: 3\n", r"base: expected a file path"),
])
def test_bad_yaml_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_base_cycle_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_config_built_in_code_is_type_checked():
    cfg = Config()
    cfg.rollout.n = "eight"
    with pytest.raises(ConfigError, match=r"rollout\.n: expected int"):
        validate(cfg)
    cfg = Config()
    apply_override(cfg, "optim.lr=1e-4")
    validate(cfg)
    assert cfg.optim.lr == 1e-4


def test_fused_op_settings_become_the_op_arguments():
    kw = load_config(None, ["fused_op.accum_dtype=inputs", "fused_op.chunk_size=64", "fused_op.grad_order=vocab"])
    assert kw.fused_op.op_kwargs() == dict(backend="auto", chunk_size=64, grad_order="vocab", accum_dtype=None)
    assert load_config(None).fused_op.op_kwargs()["accum_dtype"] is torch.float32


def test_lr_schedules():
    assert [OptimConfig(schedule="constant", warmup_steps=2).lr_factor(s, 10) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    cosine = OptimConfig(schedule="cosine", warmup_steps=0, min_lr_ratio=0.1)
    assert cosine.lr_factor(0, 11) == pytest.approx(1.0)
    assert cosine.lr_factor(5, 11) == pytest.approx(0.55)
    assert cosine.lr_factor(10, 11) == pytest.approx(0.1)
    linear = OptimConfig(schedule="linear", warmup_steps=1)
    assert [linear.lr_factor(s, 5) for s in (0, 1, 2, 4)] == pytest.approx([1.0, 1.0, 2 / 3, 0.0])


def test_model_paths_may_be_hub_ids_or_existing_directories(tmp_path):
    """Only a value that can only be a local directory must exist: a hub id is left to
    transformers."""
    for name in ("config.json", "tokenizer.json"):  # a directory save_pretrained wrote
        (tmp_path / name).write_text("{}")
    for path in ("Qwen/Qwen2.5-Math-7B", "gpt2", str(tmp_path), "toy"):
        assert load_config(None, [f"model.path={path}", f"model.tokenizer={path}"]).model.path == path
