import pytest

from llmjax.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    DataConfig,
    MeshConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from llmjax.models import DecoderConfig, T5Config


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def run_file(tmp_path):
    _write(tmp_path / "model" / "small.yaml", "family: t5\nd_model: 32\nnum_heads: 2\nd_kv: 16\n")
    _write(tmp_path / "mesh" / "two.yaml", "data: 2\nfsdp: 1\ntensor: 1\n")
    return _write(tmp_path / "run.yaml", (
        "model: {include: model/small.yaml, num_layers: 3}\n"
        "mesh: {include: mesh/two.yaml}\n"
        "train: {steps: 50, batch_size: 8}\n"
        "optim: {learning_rate: 1e-4}\n"   # YAML 1.1 reads 1e-4 as a string; floats accept it
    ))


def test_includes_and_local_keys(run_file):
    cfg = load_config(run_file)
    assert cfg.model == T5Config(d_model=32, num_heads=2, d_kv=16, num_layers=3)
    assert cfg.mesh == MeshConfig(data=2, fsdp=1, tensor=1)
    assert cfg.train.steps == 50 and cfg.train.batch_size == 8
    assert cfg.optim.learning_rate == 1e-4
    assert cfg.family == "t5"


def test_overrides_are_yaml_typed(run_file):
    cfg = load_config(run_file, ["train.steps=7", "train.seed=3", "checkpoint.dir=/tmp/ck",
                                 "checkpoint.every_steps=2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=1",
                                 "model.dropout_rate=0", "train.export_hf=null", "optim.clip_grad_norm=null",
                                 "train.resume=false"])
    assert cfg.train.steps == 7 and cfg.train.seed == 3 and cfg.train.resume is False
    assert cfg.checkpoint.dir == "/tmp/ck" and cfg.checkpoint.every_steps == 2
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, 2, 1)
    assert cfg.model.dropout_rate == 0.0 and isinstance(cfg.model.dropout_rate, float)
    assert cfg.optim.clip_grad_norm is None
    assert str(cfg.checkpoint_dir) == "/tmp/ck"


def test_override_can_swap_the_included_model(run_file, tmp_path):
    _write(tmp_path / "model" / "dec.yaml", "family: decoder\nhidden_size: 32\nintermediate_size: 64\n"
                                            "num_hidden_layers: 1\nnum_attention_heads: 2\nvocab_size: 64\n")
    # run.yaml's own `num_layers` is a T5 field: a decoder rejects it by name
    with pytest.raises(ConfigError, match="unknown config key 'model.num_layers'"):
        load_config(run_file, ["model.include=model/dec.yaml"])
    plain = _write(tmp_path / "plain.yaml", "model: {include: model/small.yaml}\n")
    cfg = load_config(plain, ["model.include=model/dec.yaml", "data.tokenizer_vocab_size=64"])
    assert cfg.model == DecoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=64)


@pytest.mark.parametrize("override,message", [
    ("train.stpes=3", "unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
    ("trian.steps=3", "unknown config key 'trian' (did you mean 'train'?)"),
    ("model.d_modle=3", "unknown config key 'model.d_modle' (did you mean 'model.d_model'?)"),
    ("optim.nmae=adamw", "did you mean 'optim.name'?"),
    ("train.steps=ten", "train.steps: expected int, got 'ten' (str)"),
    ("train.steps=1.5", "train.steps: expected int, got 1.5 (float)"),
    ("train.resume=3", "train.resume: expected bool, got 3 (int)"),
    ("optim.clip_grad_norm=big", "optim.clip_grad_norm: expected float or null, got 'big' (str)"),
    ("model.d_model=[1, 2]", "model.d_model: expected int, got [1, 2] (list)"),
    ("train.nan_policy=skp", "train.nan_policy='skp' is not allowed (did you mean 'skip'?); use one of ['abort', 'skip']"),
    ("optim.name=adam", "use one of ['adamw', 'adafactor']"),
    ("model.family=t6", "model.family='t6' is unknown (did you mean 't5'?)"),
    ("train.steps", "override 'train.steps' must look like key=value, e.g. train.steps=100"),
    ("train.steps.x=1", "train.steps is a value, not a section"),
])
def test_bad_overrides_name_the_key(run_file, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(run_file, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=9", "train.batch_size=9 must be divisible by train.microbatches * (mesh.data * mesh.fsdp)"),
    ("train.microbatches=3", "train.batch_size=8 must be divisible by train.microbatches * (mesh.data * mesh.fsdp) = 3 * 2 = 6"),
    ("mesh.data=-1", None),  # data-parallel size unknown until devices are: checked by the mesh
    ("mesh.fsdp=-1", "only one mesh axis may be -1"),
    ("mesh.tensor=0", "mesh sizes must be >= 1 or -1"),
    ("optim.warmup_steps=50", "optim.warmup_steps=50 must be < train.steps=50"),
    ("optim.b2=0.99", "optim.b2 applies to adamw only"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps must be positive"),
    ("data.noise_density=1.5", "data.noise_density must be in (0, 1)"),
    ("data.tokenizer_vocab_size=40000", "data.tokenizer_vocab_size=40000 exceeds model.vocab_size=32128"),
    ("model.num_heads=0", "T5Config.num_heads must be positive"),
    ("optim.loraplus_lr_ratio=16", "optim.loraplus_lr_ratio sets the learning rate of LoRA's B matrices (LoRA+); add "
                                   "a lora: section"),
    ("optim.loraplus_lr_ratio=0", "optim.loraplus_lr_ratio must be positive or null, got 0"),
])
def test_validation(run_file, override, message):
    overrides = [override] + (["optim.name=adafactor"] if "b2" in override else [])
    if message is None:
        load_config(run_file, overrides + ["mesh.fsdp=1"])
        return
    if "mesh.fsdp=-1" in override:
        overrides.append("mesh.data=-1")
    with pytest.raises(ConfigError) as err:
        load_config(run_file, overrides)
    assert message in str(err.value)


def test_missing_include_and_missing_model(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "model: {include: nowhere.yaml}\n")
    with pytest.raises(ConfigError, match="included file 'nowhere.yaml' not found"):
        load_config(bad)
    no_model = _write(tmp_path / "nomodel.yaml", "train: {steps: 3}\n")
    with pytest.raises(ConfigError, match="missing section 'model'"):
        load_config(no_model)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_dump_and_reload_round_trip(run_file, tmp_path):
    cfg = load_config(run_file, ["train.export_hf=out/hf", "optim.name=adafactor", "optim.b1=0.9"])
    dump_config(cfg, tmp_path / "saved" / "config.yaml")
    assert load_config(tmp_path / "saved" / "config.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_to_dict(cfg)["model"]["family"] == "t5"


def test_decoder_family_and_python_construction():
    cfg = RunConfig(model=DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2),
                    data=DataConfig(tokenizer_vocab_size=64),
                    train=TrainConfig(steps=5, batch_size=4), mesh=MeshConfig(data=2))
    assert cfg.family == "decoder"
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="train.nan_policy='explode' is not allowed"):
        TrainConfig(nan_policy="explode")
    with pytest.raises(ConfigError, match="optim.schedule='exp' is not allowed"):
        OptimConfig(schedule="exp")


def test_default_run_config_loads():
    cfg = load_config()
    assert DEFAULT_CONFIG_PATH.name == "pretrain_t5_tiny.yaml"
    assert cfg.family == "t5" and cfg.data.objective == "span_corruption"
    assert cfg.model.d_model <= 128 and cfg.train.steps >= 100


def test_mesh_resolves_against_the_devices():
    assert MeshConfig(data=2, fsdp=-1).resolve(8) == MeshConfig(data=2, fsdp=4, tensor=1)
    assert MeshConfig().resolve(8) == MeshConfig(data=8, fsdp=1, tensor=1)  # the default: all devices on data
    assert MeshConfig(2, 2, 2).resolve(8) == MeshConfig(2, 2, 2)
    with pytest.raises(ConfigError, match=r"data\*fsdp\*tensor = 2\*2\*1 = 4 but there are 8 devices"):
        MeshConfig(2, 2, 1).resolve(8)
    with pytest.raises(ConfigError, match="8 devices are not divisible by the fixed axes' product 3"):
        MeshConfig(3, -1, 1).resolve(8)
    with pytest.raises(ConfigError, match="mesh data\\*fsdp = 2 is not a multiple of the 4 processes"):
        MeshConfig(1, 2, 4).resolve(8, process_count=4)


def test_batch_is_checked_against_the_resolved_mesh(run_file):
    cfg = load_config(run_file, ["mesh.data=-1", "train.batch_size=12"])  # 12 rows: fine until devices are known
    assert cfg.for_devices(4).mesh == MeshConfig(data=4, fsdp=1, tensor=1)
    with pytest.raises(ConfigError, match=r"train.batch_size=12 must be divisible by .* = 1 \* 8 = 8"):
        cfg.for_devices(8)
