"""Typed YAML config: overrides, nested sections, errors naming the nearest valid keys."""
import dataclasses

import pytest

from bmgpt_jax import config as cl
from bmgpt_jax.models.llama import LlamaConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    mesh: tuple[int, ...] = (-1, 1, 1)
    flag: bool = False


def test_yaml_plus_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  lr: 3\n  name: x\nmesh: [2, 2, 2]\n")
    cfg = cl.load(Outer, p, ["inner.steps=7", "flag=true", "inner.lr=5e-4"])
    assert cfg == Outer(Inner(lr=5e-4, steps=7, name="x"), (2, 2, 2), True)
    assert isinstance(cl.load(Outer, p).inner.lr, float)


def test_unknown_key_names_nearest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  stpes: 3\n")
    with pytest.raises(cl.ConfigError, match=r"unknown config key inner\.'stpes'; did you mean 'steps'"):
        cl.load(Outer, p)
    with pytest.raises(cl.ConfigError, match=r"'fleg'; did you mean 'flag'"):
        cl.load(Outer, None, ["fleg=1"])
    with pytest.raises(cl.ConfigError, match=r"inner\.'lrr'; did you mean 'lr'"):
        cl.load(Outer, None, ["inner.lrr=1"])


def test_wrong_types_are_errors():
    with pytest.raises(cl.ConfigError, match="inner.steps: expected an integer, got 'many'"):
        cl.load(Outer, None, ["inner.steps=many"])
    with pytest.raises(cl.ConfigError, match="flag: expected true/false"):
        cl.load(Outer, None, ["flag=3"])
    with pytest.raises(cl.ConfigError, match="not of the form key=value"):
        cl.load(Outer, None, ["flag"])
    with pytest.raises(cl.ConfigError, match=r"remat: 'some' is not one of \['none', 'full', 'dots'\]"):
        cl.load(LlamaConfig, "llama_tiny", ["remat=some"])
    with pytest.raises(cl.ConfigError, match=r"override 'inner.steps=\[': the value is not valid YAML \(expected "
                                             r"the node content, but found '<stream end>'\)$"):
        cl.load(Outer, None, ["inner.steps=["])
    with pytest.raises(cl.ConfigError, match=r"unknown escape character '.'\); in a double-quoted string a "
                                             r"backslash is doubled"):
        cl.load(Outer, None, ['inner.steps=["\\."]'])


def test_a_config_named_with_its_folder_is_found_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cl.resolve_path("configs/llama_tiny.yaml") == cl.CONFIG_DIR / "llama_tiny.yaml"
    assert cl.resolve_path("configs/llama_tiny") == cl.CONFIG_DIR / "llama_tiny.yaml"
    with pytest.raises(cl.ConfigError, match="config file 'configs/nope' not found"):
        cl.resolve_path("configs/nope")


def test_base_file_merges_and_round_trips(tmp_path):
    (tmp_path / "base.yaml").write_text("inner:\n  lr: 1\n  steps: 2\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ninner:\n  steps: 4\n")
    cfg = cl.load(Outer, tmp_path / "child.yaml")
    assert cfg.inner == Inner(lr=1.0, steps=4)
    assert cl.from_dict(Outer, cl.to_dict(cfg)) == cfg


def test_model_validation_runs(tmp_path):
    with pytest.raises(ValueError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        cl.load(LlamaConfig, "llama_tiny", ["num_kv_heads=3"])
    with pytest.raises(cl.ConfigError, match="config file 'nope' not found"):
        cl.load(LlamaConfig, "nope")


def test_every_shipped_config_loads():
    from bmgpt_jax.training import loop as train
    from bmgpt_jax.models.biomedgpt import BioMedGPTConfig
    from bmgpt_jax.models.esm import EsmConfig
    from bmgpt_jax.models.gin import GinConfig
    kinds = {"llama_": LlamaConfig, "biomedgpt_lm_7b": LlamaConfig, "esm2_": EsmConfig, "gin_": GinConfig}
    for path in sorted(cl.CONFIG_DIR.glob("*.yaml")):
        name = path.stem
        cls = next((c for prefix, c in kinds.items() if name.startswith(prefix)), None)
        if name == "biomedgpt_10b":
            cls = BioMedGPTConfig
        cfg = cl.load(cls, path) if cls else train.load_config(path)
        assert cl.from_dict(type(cfg), cl.to_dict(cfg)) == cfg, name              # a plain form that reloads
    assert train.load_config("biomedgpt_10b_finetune").model.esm.hidden_size == 2560


def test_gin_config_checks_itself_however_it_is_built():
    """GinConfig's `__post_init__` checks each field's type and range, so a config built in code, read from a
    model folder's JSON or from YAML is refused alike, naming the field (with its full key from YAML); a bare
    `GinConfig(num_layers="x")` was accepted and failed later as "'<' not supported between 'str' and 'int'"."""
    from bmgpt_jax.models.biomedgpt import BioMedGPTConfig
    from bmgpt_jax.models.gin import GinConfig
    for kwargs, message in [({"num_layers": "x"}, r"^num_layers: expected an integer, got 'x'$"),
                            ({"emb_dim": 3.0}, r"^emb_dim: expected an integer, got 3\.0$"),
                            ({"max_atoms": "64"}, r"^max_atoms: '64' fits none of"),
                            ({"over_cap": "drop"}, r"^over_cap: 'drop' is not one of \['subsample', 'error'\]$"),
                            ({"num_layers": 1}, r"^num_layers: a GIN needs at least 2 layers, got 1$"),
                            ({"max_atoms": 0}, r"^max_atoms: a cap must be >= 1 \(null: no cap\), got 0$"),
                            ({"drop_ratio": 1.5}, r"^drop_ratio: must be in \[0, 1\), got 1\.5$")]:
        with pytest.raises(cl.ConfigError, match=message):
            GinConfig(**kwargs)
    assert GinConfig(drop_ratio=0).drop_ratio == 0.0 and isinstance(GinConfig(drop_ratio=0).drop_ratio, float)
    with pytest.raises(cl.ConfigError, match=r"^gin\.max_atoms: a cap must be >= 1 \(null: no cap\), got 0$"):
        cl.load(BioMedGPTConfig, "biomedgpt_10b", ["gin.max_atoms=0"])
    with pytest.raises(cl.ConfigError, match=r"^gin\.num_layers: expected an integer, got 'x'$"):
        cl.load(BioMedGPTConfig, "biomedgpt_10b", ["gin.num_layers=x"])


@pytest.mark.parametrize("override, message", [
    ("data.window_batches=0", "data.window_batches=0: must be >= 1"),
    ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
    ("data.batch_size=-8", "data.batch_size=-8: must be >= 1"),
    ("data.num_epochs=-1", "data.num_epochs=-1: must be >= 0"),
    ("data.max_protein_len=0", "data.max_protein_len=0: must be >= 1"),
    ("data.workers=-1", "data.workers=-1: must be >= 0"),
    ("data.seed=-1", "data.seed=-1: must be >= 0"),
    ("data.seq_buckets=[0,96]", "data.seq_buckets=[0, 96]: every length must be >= 1"),
    ("model.lm.lora_rank=-1", "model.lm.lora_rank=-1: must be >= 0"),
    ("model.lm.num_layers=0", "model.lm.num_layers=0: must be >= 1"),
    ("model.lm.num_kv_heads=0", "model.lm.num_kv_heads=0: must be >= 1"),   # was a ZeroDivisionError
    ("model.lm.rope_theta=0", "model.lm.rope_theta=0.0: must be > 0"),
    ("model.esm.num_heads=0", "model.esm.num_heads=0: must be >= 1"),
    ("optim.lr=-1", "optim.lr=-1.0: must be >= 0"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0: must be >= 0"),
    ("optim.end_lr_ratio=2", "optim.end_lr_ratio=2.0: must be in [0, 1]"),
    ("optim.b2=1", "optim.b2=1.0: must be in [0, 1)"),
])
def test_out_of_range_values_name_the_dotted_key(override, message):
    """Refused while the config is read (before any data build or compile), in one line naming the key."""
    from bmgpt_jax.training import loop as train
    with pytest.raises(cl.ConfigError) as e:
        train.load_config("tiny", [override])
    assert str(e.value) == message


def test_range_limits_themselves_are_accepted():
    from bmgpt_jax.training import loop as train
    cfg = train.load_config("tiny", ["optim.lr=0", "optim.weight_decay=0", "optim.warmup_steps=0",
                                     "optim.end_lr_ratio=1", "optim.b1=0", "data.num_epochs=0", "data.workers=0",
                                     "data.max_protein_len=1", "model.lm.lora_rank=0", "model.lm.vocab_size=0",
                                     "steps=1"])
    assert (cfg.optim.lr, cfg.optim.end_lr_ratio, cfg.data.workers, cfg.model.lm.lora_rank) == (0.0, 1.0, 0, 0)


def test_a_range_error_outside_the_loader_names_the_class():
    with pytest.raises(cl.RangeError, match=r"^LlamaConfig\.num_layers=0: must be >= 1$"):
        LlamaConfig(num_layers=0)


def test_train_refuses_an_out_of_range_value_in_one_line(tmp_path, capsys):
    from bmgpt_jax.training import loop as train
    assert train.main(["data.window_batches=0", f"out_dir={tmp_path / 'run'}", "steps=1"]) == 2
    assert capsys.readouterr().err == "train: ConfigError: data.window_batches=0: must be >= 1\n"
    assert not (tmp_path / "run").exists()


def test_a_section_check_names_its_section():
    """A check across fields of a nested section (not a single value's range) names the section's dotted path."""
    from bmgpt_jax.training import loop as train
    with pytest.raises(cl.ConfigError, match=r"^model\.esm: hidden_size=32 is not a multiple of num_heads=3$"):
        train.load_config("tiny", ["model.esm.num_heads=3"])
    with pytest.raises(cl.ConfigError, match=r"^model\.lm: lora_targets \['up_proj'\] are not attention projections"):
        train.load_config("tiny", ["model.lm.lora_targets=[up_proj]"])
    with pytest.raises(ValueError, match=r"^optim\.grad_accum must be >= 1, got 0$"):   # already named: as it was
        train.load_config("tiny", ["optim.grad_accum=0"])


def test_a_bad_config_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: lm\nsteps: [1\n")
    with pytest.raises(cl.ConfigError) as e:
        cl.read_yaml(bad)
    assert str(e.value) == (f"{bad}: not valid YAML at line 2, column 8: while parsing a flow sequence: expected ',' "
                            "or ']', but got '<stream end>' (line 3, column 1)")
    (tmp_path / "child.yaml").write_text("base: bad.yaml\n")            # an included file is the one named
    with pytest.raises(cl.ConfigError, match=f"^{bad}: not valid YAML at line 2"):
        cl.read_yaml(tmp_path / "child.yaml")
    (tmp_path / "list.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(cl.ConfigError, match=r"list\.yaml: base: expected a file name, got \['a\.yaml'\]$"):
        cl.read_yaml(tmp_path / "list.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(cl.ConfigError, match=r"binary\.yaml: not a text \(UTF-8\) file"):
        cl.read_yaml(tmp_path / "binary.yaml")
    monkeypatch.chdir(cl.CONFIG_DIR.parent)
    with pytest.raises(cl.ConfigError, match=r"^config file 'configs' is a folder: give a YAML file in it"):
        cl.resolve_path("configs")
    from bmgpt_jax.training import loop as train
    assert train.main(["--config", str(bad), f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train: ConfigError: {bad}: not valid YAML at line 2") and err.count("\n") == 1
    assert train.main(["--config", "configs", f"out_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.startswith("train: ConfigError: config file 'configs' is a folder")
