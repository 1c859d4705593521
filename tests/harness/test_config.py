import pytest

from harness.config import ConfigError, TrainConfig, from_dict, merge
from harness.train.optim import lr_at, param_groups, warmup_steps
from harness.config import OptimConfig, ScheduleConfig
from models import registry


def test_from_dict_builds_nested_config():
    cfg = from_dict(TrainConfig, {"model": "gpt2", "optim": {"lr": "1e-3", "betas": [0.9, 0.99]},
                                  "budget": {"flops": "1e12"}}).validate()
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.99) and cfg.budget.flops == 1e12


@pytest.mark.parametrize("data,field", [
    ({"modle": "gpt2"}, "modle"),
    ({"optim": {"learning_rate": 1}}, "optim.learning_rate"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"compile": "yes"}, "compile"),
    ({"data": {"source": 3}}, "data.source"),
])
def test_bad_keys_and_types_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_dict(TrainConfig, data)


@pytest.mark.parametrize("budget,match", [({}, "exactly one"), ({"steps": 0}, "budget.steps"),
                                          ({"flops": 0.0}, "budget.flops"), ({"steps": 3, "tokens": 5.0}, "exactly one")])
def test_budget_must_be_one_positive_quantity(budget, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, {"budget": budget}).validate()


def test_micro_batch_must_divide_batch():
    with pytest.raises(ConfigError, match="micro_batch_size"):
        from_dict(TrainConfig, {"batch_size": 8, "micro_batch_size": 3}).validate()
    assert from_dict(TrainConfig, {"batch_size": 8, "micro_batch_size": 2}).validate().grad_accum == 4


def test_merge_is_deep():
    assert merge({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 5}}) == {"a": {"b": 5, "c": 2}, "d": 1}


def test_cosine_schedule_warmup_peak_and_floor():
    sched = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, 1.0, sched) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_wsd_schedule_is_flat_then_decays():
    sched = ScheduleConfig(kind="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    lrs = [lr_at(s, 100, 1.0, sched) for s in range(100)]
    assert all(lr == 1.0 for lr in lrs[5:80]) and lrs[-1] == pytest.approx(0.0) and lrs[85] < 1.0
    assert warmup_steps(100, ScheduleConfig(warmup_fraction=0.05)) == 5


def test_weight_decay_groups():
    model = registry.build("tokenformer", "tiny")
    decay, no_decay = param_groups(model, OptimConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(("param_tokens", "weight")) for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {"norm_f.weight", "norm_f.bias"}
    decay2, no_decay2 = param_groups(model, OptimConfig(decay_pattention_tokens=False))
    assert [names[id(p)] for p in decay2["params"]] == ["tok_emb.weight"]
    mamba = registry.build("mamba", "tiny")
    mnames = {id(p): n for n, p in mamba.named_parameters()}
    exempt = {mnames[id(p)].rsplit(".", 1)[-1] for p in param_groups(mamba, OptimConfig())[1]["params"]}
    assert {"A_log", "D"} <= exempt
