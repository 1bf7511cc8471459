"""``llmjax.environment``: what a run records of the machine and software it ran on."""

import json

import jax
import optax

from llmjax import environment


def test_describe_names_this_process_machine_and_versions():
    described = environment.describe()
    assert json.loads(json.dumps(described)) == described  # plain JSON values only
    assert described["versions"]["jax"] == jax.__version__ and described["versions"]["optax"] == optax.__version__
    assert described["versions"]["llmjax"] is not None
    assert described["devices"] == {jax.devices()[0].device_kind: jax.device_count()}  # conftest: 8 fake CPUs
    assert described["backend"] == jax.default_backend() and described["process_count"] == 1
    assert described["cpu"] and described["cpu_count"] >= 1
    assert set(described["simd"]) <= set(environment.SIMD_FLAGS)
    line = environment.one_line(described)
    assert described["cpu"] in line and f"jax {jax.__version__}" in line and f"{jax.device_count()} x " in line


def test_cpu_name_and_vector_extensions_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Some Xeon(R) CPU @ 2.0GHz\n"
                   "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw\n\nprocessor\t: 1\n")
    assert environment.cpu_model(x86) == "Some Xeon(R) CPU @ 2.0GHz"
    assert environment.vector_extensions(x86) == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm sve\nCPU implementer\t: 0x41\n")
    assert environment.vector_extensions(arm) == ["asimd", "sve"]
    missing = tmp_path / "none"
    assert environment.vector_extensions(missing) == [] and environment.cpu_model(missing)  # platform's name
