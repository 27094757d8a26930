import pytest
import yaml

from critique_rl.config import DEMO_PRESET, TrainConfig, from_dict, load_config
from critique_rl.errors import ConfigError, UserError


def test_defaults_are_valid_and_demo_preset_applies():
    cfg = load_config(None)
    assert cfg.sft_mistake_rate == DEMO_PRESET["sft_mistake_rate"]
    assert cfg.prompts_per_step * cfg.num_generations == cfg.generation_batch_size


def test_unknown_key_suggests_the_close_field():
    with pytest.raises(ConfigError) as e:
        from_dict(TrainConfig, {"num_generation": 4})
    assert e.value.field == "num_generation" and "num_generations" in str(e.value)


@pytest.mark.parametrize(
    "data, field",
    [
        ({"num_generations": "eight"}, "num_generations"),
        ({"learning_rate": True}, "learning_rate"),
        ({"reward_funcs": "correctness"}, "reward_funcs"),
        ({"critic": {"timeout_s": "fast"}}, "critic.timeout_s"),
        ({"critic": {"backend": "magic"}}, "critic.backend"),
        ({"memory": {"nope": 1}}, "memory.nope"),
        ({"num_generations": 1}, "num_generations"),
        ({"generation_batch_size": 30, "num_generations": 8}, "generation_batch_size"),
        ({"mini_batch_size": 48}, "mini_batch_size"),
        ({"tiny_hidden_size": 64, "tiny_heads": 4}, "tiny_heads"),
        ({"model": "/no/such/model/dir"}, "model"),
        ({"advantage_estimator": "ppo"}, "advantage_estimator"),
        ({"reward_weights": [1.0, 2.0]}, "reward_weights"),
        ({"critic": {"backend": "openai"}}, "critic.model"),
        ({"rollout_backend": "sglang"}, "rollout_backend"),
        ({"vllm": {"mode": "server"}}, "vllm.base_url"),
        ({"vllm": {"gpu_memory_utilization": 1.5}}, "vllm.gpu_memory_utilization"),
        ({"vllm": {"mode": "remote"}}, "vllm.mode"),
        ({"tis_cap": 0}, "tis_cap"),
    ],
)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        from_dict(TrainConfig, data)
    assert e.value.field == field
    assert field in str(e.value)


def test_vllm_backend_is_accepted():
    cfg = from_dict(TrainConfig, {"rollout_backend": "vllm", "tis_cap": 3, "vllm": {
        "mode": "server", "base_url": "http://127.0.0.1:8000/v1", "gpu_memory_utilization": 0.5}})
    assert cfg.rollout_backend == "vllm" and cfg.tis_cap == 3.0
    assert cfg.vllm.mode == "server" and cfg.vllm.gpu_memory_utilization == 0.5
    assert from_dict(TrainConfig, {"tis_cap": None}).tis_cap is None


def test_int_is_accepted_for_float_and_yaml_roundtrip(tmp_path):
    cfg = from_dict(TrainConfig, {"learning_rate": 1, "critic": {"backend": "rule"}})
    assert cfg.learning_rate == 1.0
    path = tmp_path / "c.yaml"
    cfg.save_yaml(path)
    again = load_config(path)
    assert again == cfg


def test_load_config_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(UserError, match="mapping"):
        load_config(bad)


def test_example_configs_are_valid(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples"
    cpu = load_config(root / "critique_grpo_cpu.yaml")
    assert cpu.critic.backend == "rule" and cpu.memory.enabled
    cal = load_config(root / "calibration_cpu.yaml")
    assert cal.task == "addition_conf" and cal.reward_funcs == ["correctness", "brier"]
    assert cal.reward_aggregator == "dvao"
    gpu = yaml.safe_load((root / "critique_grpo_gpu.yaml").read_text())
    model_dir = tmp_path / "qwen"
    model_dir.mkdir()
    gpu["model"] = str(model_dir)  # the recipe points at a local dir that exists only on the GPU box
    cfg = from_dict(TrainConfig, gpu)
    assert cfg.critic.backend == "openai" and cfg.reward_aggregator == "dvao"


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learning_rate: 3e-4\n")
    assert load_config(p).learning_rate == 3e-4


def test_public_api_names():
    import critique_rl

    assert critique_rl.CritiqueGRPOConfig is TrainConfig
    assert critique_rl.CritiqueGRPOTrainer.__name__ == "CritiqueGRPOTrainer"


def test_vllm_example_configs_are_valid(tmp_path):
    from pathlib import Path

    from critique_rl.config import DEMO_PRESET

    root = Path(__file__).resolve().parents[1] / "examples"
    for name, mode in (("vllm_colocate_1gpu.yaml", "colocate"), ("vllm_server_8gpu.yaml", "server")):
        data = yaml.safe_load((root / name).read_text())
        data["model"] = str(tmp_path)  # the recipes point at a local dir that exists only on the GPU box
        cfg = from_dict(TrainConfig, data)
        assert cfg.rollout_backend == "vllm" and cfg.vllm.mode == mode and cfg.tis_cap == 2.0
    assert cfg.vllm.base_url and cfg.critic.base_url
    demo = load_config(root / "demo_vllm_cpu.yaml")
    assert demo.rollout_backend == "vllm"
    assert demo == dataclasses_replace(load_config(None, output_dir="runs/demo_vllm"), rollout_backend="vllm")
    assert set(yaml.safe_load((root / "demo_vllm_cpu.yaml").read_text())) == set(DEMO_PRESET) | {"rollout_backend",
                                                                                                 "vllm"}


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)
