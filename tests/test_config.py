import pytest

from engine import config
from engine.config import ConfigError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_embedded_default_loads_with_paths_relative_to_the_file():
    cfg = config.load()
    assert cfg.serve.host == "127.0.0.1" and cfg.serve.port == 8000
    assert cfg.embed.dim == 512
    assert cfg.source.path == str(config.DEFAULT_CONFIG.parent.parent / "lookalike-demo" / "catalog.parquet")


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "bad.yaml", "source: {path: c.parquet}\nembed:\n  batchsize: 8\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value)
    assert "embed.batchsize: unknown key" in str(err.value)


def test_bad_value_names_file_and_key(tmp_path):
    path = write(tmp_path, "bad.yaml", "source: {path: c.parquet}\nserve: {port: 70000}\nindex:\n  validate: {min_recall_at_10: 2}\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    msg = str(err.value)
    assert f"{path}: serve.port:" in msg
    assert f"{path}: index.validate.min_recall_at_10:" in msg


def test_set_override_is_typed_and_checked():
    cfg = config.load(None, ["embed.batch_size=7", "index.validate.sample=300"])
    assert cfg.embed.batch_size == 7 and cfg.index.validate_.sample == 300
    with pytest.raises(ConfigError, match=r"with --set overrides\): embed.batch_size"):
        config.load(None, ["embed.batch_size=many"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        config.load(None, ["embed.batch_size"])


def test_overlay_extends_base_and_resolves_paths_against_each_file(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base", "base.yaml", "source: {path: data/c.csv}\nembed: {batch_size: 8, dim: 256}\n")
    over = write(tmp_path, "prod.yaml", "extends: base/base.yaml\nembed: {batch_size: 64}\nstorage: {root: out}\n")
    cfg = config.load(over)
    assert cfg.embed.batch_size == 64 and cfg.embed.dim == 256
    assert cfg.source.path == str(tmp_path / "base" / "data" / "c.csv")
    assert cfg.storage.root == str(tmp_path / "out")


def test_an_empty_mapping_in_an_overlay_replaces_the_bases(tmp_path):
    """A BigQuery table without a base's filter columns must be able to turn them off."""
    base = write(tmp_path, "base.yaml", f"extends: {config.DEFAULT_CONFIG}\n"
                 "index: {filter_columns: {in_stock: bool, brand: string, price: float}}\n")
    over = write(tmp_path, "bq.yaml", f"extends: {base}\nindex: {{filter_columns: {{}}}}\n")
    assert config.load(base).index.filter_columns and config.load(over).index.filter_columns == {}
    kept = write(tmp_path, "k.yaml", f"extends: {base}\nindex: {{filter_columns: {{size: int}}}}\n")
    assert set(config.load(kept).index.filter_columns) == {"in_stock", "brand", "price", "size"}


def test_unreadable_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(write(tmp_path, "broken.yaml", "source: [unclosed\n"))


def test_cli_config_error_exit_code_and_message(tmp_path, capsys):
    from engine import cli

    path = write(tmp_path, "bad.yaml", "source: {path: c.parquet}\nembed: {device: tpu}\n")
    assert cli.main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "embed.device" in err
