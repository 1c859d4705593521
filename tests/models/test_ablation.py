"""The component ladder from Transformer++ to Tokenformer (harness/matrices/ablation_cpu.yaml)."""
import pytest
import torch
import yaml

from models import registry
from models.components import GeluMLP
from models.pattention import Pattention, pattention_weights
from models.tokenformer import TOKENFORMER

from .test_conformance import reference_flops
from pathlib import Path

LADDER = yaml.safe_load((Path(__file__).resolve().parents[2] / "harness/matrices/ablation_cpu.yaml").read_text())["models"]


def test_pattention_ffn_is_an_mlp_with_another_activation():
    d, n = 64, 256
    patt = Pattention(d, d, n)
    torch.nn.init.normal_(patt.key_param_tokens, std=0.02)
    torch.nn.init.normal_(patt.value_param_tokens, std=0.02)
    mlp = GeluMLP(d, n, bias=False, approximate="none")
    assert sum(p.numel() for p in patt.parameters()) == sum(p.numel() for p in mlp.parameters())
    with torch.no_grad():
        mlp.fc.weight.copy_(patt.key_param_tokens)          # K_P as the up projection (n, d)
        mlp.proj.weight.copy_(patt.value_param_tokens.T)    # V_P as the down projection (d, n)
    x = torch.randn(3, 7, d)
    swapped = mlp.proj(pattention_weights(mlp.fc(x), "l2_norm_gelu", n))  # the MLP with the activation swapped
    torch.testing.assert_close(swapped, patt(x), rtol=0, atol=0)
    assert (mlp(x) - patt(x)).abs().max() > 1e-3  # with plain GELU it is a different function


def test_transformer_pp_with_every_tokenformer_component_is_tokenformer():
    shape = {k: v for k, v in registry.get("tokenformer").presets["tiny"].items() if k not in TOKENFORMER}
    tpp = registry.build("transformer_pp", "tiny", **TOKENFORMER, **shape)
    tf = registry.build("tokenformer", "tiny")
    assert tpp.num_params() == tf.num_params() and tpp.config == tf.config
    tpp.load_state_dict(tf.state_dict())  # copy by name
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        assert torch.equal(tpp(x), tf(x))


@pytest.mark.parametrize("entry", LADDER, ids=[e["label"] for e in LADDER])
def test_every_rung_passes_conformance(entry):
    model = registry.build(entry["model"], entry["preset"], vocab_size=320, **entry.get("model_overrides", {})).eval()
    assert model.num_params() == model.counted_params()
    assert model.num_params(non_embedding=True) == model.counted_params(non_embedding=True)
    x = torch.randint(0, 320, (2, 48))
    y = x.clone()
    y[:, 30] = (y[:, 30] + 1) % 320
    with torch.no_grad():
        full, other = model(x), model(y)
        torch.testing.assert_close(full[:, :30], other[:, :30], rtol=0, atol=1e-5)  # causal
        cache = model.allocate_cache(2, 48)
        steps = [model.step(x[:, :16], cache)] + [model.step(x[:, t:t + 1], cache) for t in range(16, 48)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    model.train()
    analytic = model.flops_per_token(48) * x.numel()
    assert abs(reference_flops(model, x) - analytic) / analytic < 0.02


def test_iso_params_rungs_have_equal_non_embedding_parameters():
    counts = [registry.get_config(e["model"], e["preset"], **e.get("model_overrides", {})).num_params(True)
              for e in LADDER if e.get("matching") == "iso_params"]
    assert len(counts) == 6 and max(counts) / min(counts) < 1.005


@pytest.mark.parametrize("override,field,choices", [
    ({"ffn": "moe"}, "ffn", "swiglu, gelu_mlp, pattention"),
    ({"projection": "lora"}, "projection", "linear, pattention"),
    ({"norm": "scalenorm"}, "norm", "rmsnorm, layernorm"),
    ({"pattention_norm": "relu"}, "pattention_norm", "l2_norm_gelu, gelu_l2_norm, softmax"),
])
def test_unknown_component_names_field_and_choices(override, field, choices):
    with pytest.raises(ValueError) as e:
        registry.build("transformer_pp", "tiny", **override)
    msg = str(e.value)
    assert field in msg and choices in msg and "\n" not in msg


def test_incompatible_combination_is_one_line():
    with pytest.raises(ValueError, match="norm_bias") as e:
        registry.build("transformer_pp", "tiny", norm="rmsnorm", norm_bias=True)
    assert "\n" not in str(e.value)
