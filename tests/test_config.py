import subprocess
import sys

import pytest

from labs_lib.core.config import GPTConfig, ParallelConfig, TrainConfig, get_profile, override, validate


def test_profiles_and_env(monkeypatch):
    for name in ("ci", "cpu", "gpu"):
        profile = get_profile(name)
        validate(profile.model, profile.train, ParallelConfig(), 1, "cuda")
    monkeypatch.setenv("LABS_PROFILE", "ci")
    assert get_profile().name == "ci"
    assert get_profile().model.n_layer == 2
    get_profile().model.n_layer = 99  # copies: the table itself is not changed
    assert get_profile().model.n_layer == 2
    monkeypatch.setenv("LABS_PROFILE", "laptop")
    with pytest.raises(ValueError, match="LABS_PROFILE.*ci, cpu, gpu"):
        get_profile()


def test_preset():
    cfg = GPTConfig.preset("gpt2-small")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size) == (12, 12, 768, 50257, 1024)
    with pytest.raises(ValueError, match="gpt2-small"):
        GPTConfig.preset("gpt5")


def test_override_names_valid_fields():
    assert override(TrainConfig(), lr=0.5, max_steps=None).lr == 0.5
    with pytest.raises(ValueError, match="valid are"):
        override(TrainConfig(), learning_rate=0.1)


@pytest.mark.parametrize("model, train, parallel, world, match", [
    (dict(n_embd=100, n_head=3), {}, None, 1, "multiple of n_head"),
    (dict(dropout=1.0), {}, None, 1, "dropout"),
    ({}, dict(dtype="fp16"), None, 1, "use --dtype bf16"),
    ({}, dict(dtype="int8"), None, 1, "choose one of fp32, bf16, fp16"),
    ({}, dict(warmup_steps=500, max_steps=100), None, 1, "lower warmup_steps"),
    ({}, dict(min_lr=1.0, lr=0.1), None, 1, "min_lr"),
    ({}, dict(batch_size=0), None, 1, "batch_size must be >= 1"),
    (dict(vocab_size=256), dict(tokenizer_vocab=512), None, 1, "set vocab_size to at least 512"),
    ({}, {}, ParallelConfig(dp=2), 4, "launch 2 processes or change dp/tp/pp"),
    ({}, {}, ParallelConfig(tp=5), 5, "divisors of n_head"),
    (dict(n_layer=3), {}, ParallelConfig(pp=2), 2, "divisors of n_layer"),
    (dict(vocab_size=50257, n_head=4, n_embd=64), {}, ParallelConfig(tp=2), 2, "pad the vocabulary"),
])
def test_invalid_configs_name_the_fix(model, train, parallel, world, match):
    with pytest.raises(ValueError, match=match):
        validate(GPTConfig(**{"vocab_size": 512, **model}), TrainConfig(**train) if train else TrainConfig(),
                 parallel, world)


def test_bad_config_fails_before_training(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "labs_lib.train", "--profile", "ci", "--out", str(out),
                             "--n-head", "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "invalid configuration" in result.stderr and "multiple of n_head" in result.stderr
    assert not out.exists()


def test_launcher_rejects_bad_config_before_spawning(tmp_path):
    from labs_lib.jobs.launch import train_gpt

    with pytest.raises(ValueError, match="lower warmup_steps"):
        train_gpt(tmp_path / "run", nodes=1, nproc_per_node=2, profile="ci", max_steps=3, warmup_steps=10,
                  progress=False)
    assert not (tmp_path / "run").exists()


def test_project_root_is_the_checkout():
    from labs_lib.core.paths import PROJECT_ROOT

    assert (PROJECT_ROOT / "pyproject.toml").exists() and (PROJECT_ROOT / "slurm" / "local" / "up.sh").exists()
