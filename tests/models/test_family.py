"""The family registry: one record per family, agreeing with the run config's table and the modules."""

import jax
import pytest

from llmjax.batch import FORMATS
from llmjax.model_config import MODEL_CONFIGS
from llmjax.models import FAMILIES, build_model, dummy_inputs, model_family
from tests.train.helpers import TINY


def test_records_agree_with_model_configs():
    assert {name: family.config_class for name, family in FAMILIES.items()} == MODEL_CONFIGS
    assert all(family.name == name for name, family in FAMILIES.items())
    assert {family.batch_format for family in FAMILIES.values()} == set(FORMATS)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_record_builds_the_module_its_flag_describes(name):
    config = TINY[name]
    family = model_family(config)
    model = build_model(config)
    assert family is FAMILIES[name] and isinstance(model, family.module())
    # The calls the seq2seq/causal glue (loss, generation) relies on exist on the module.
    assert all(hasattr(model, method) for method in (("encode", "decode") if family.seq2seq else ("init_cache",)))
    inputs = dummy_inputs(config, batch=2, length=3)
    assert len(inputs) == (2 if family.seq2seq else 1)
    logits = jax.eval_shape(lambda r: model.init_with_output(r, *inputs)[0], jax.random.key(0))
    assert logits.shape == (2, 3, config.vocab_size)


def test_unknown_config_type_is_named():
    with pytest.raises(TypeError, match="unknown model config type dict"):
        model_family({})
