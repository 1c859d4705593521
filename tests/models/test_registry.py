import pytest

from models import registry
from models.transformer_pp import MATCHED


def test_registry_has_the_four_architectures():
    assert {"tokenformer", "transformer_pp", "mamba", "gpt2"} <= set(registry.names())


def test_unknown_model_lists_valid_names():
    with pytest.raises(registry.UnknownModelError) as e:
        registry.build("tokenformerr")
    msg = str(e.value)
    assert "tokenformerr" in msg and all(n in msg for n in registry.names())


def test_unknown_preset_lists_valid_presets():
    with pytest.raises(registry.UnknownModelError) as e:
        registry.get_config("tokenformer", "7b")
    assert "7b" in str(e.value) and "150m" in str(e.value) and "1.5b" in str(e.value)


def test_unknown_override_field_is_named():
    with pytest.raises(registry.UnknownModelError, match="n_layer"):
        registry.get_config("gpt2", "tiny", n_layer=3)


def test_every_architecture_has_cpu_presets():
    for name in registry.names():
        assert {"tiny", "small"} <= set(registry.presets(name)), name


def test_table_rows_come_from_configs():
    rows = registry.table()
    row = next(r for r in rows if r["model"] == "tokenformer" and r["preset"] == "150m")
    assert (row["layers"], row["width"], row["seq_len"]) == (12, 768, 2048)
    assert row["params"] == 151_881_216
    assert row["params"] - row["non_embedding"] == 50304 * 768


@pytest.mark.parametrize("preset,target", sorted(MATCHED.items()))
def test_matched_transformer_pp_presets_hold_their_tokenformers_parameters(preset, target):
    """The tf* presets exist to compare Transformer++ with TokenFormer at equal size: each holds within 3% of
    the parameters its TokenFormer preset holds (both counted from the built modules, on the meta device)."""
    ours = registry.build("transformer_pp", preset, device="meta").counted_params()
    theirs = registry.build("tokenformer", target, device="meta").counted_params()
    assert abs(ours - theirs) / theirs < 0.03, (ours, theirs)
