"""The model configs module names what the model code implements, without importing it."""

from llmjax.model_config import ACTIVATION_NAMES, DTYPE_NAMES
from llmjax.models.layers import ACTIVATIONS, DTYPES


def test_activation_and_dtype_names_match_the_model_code():
    assert set(ACTIVATION_NAMES) == set(ACTIVATIONS)
    assert set(DTYPE_NAMES) == set(DTYPES)
