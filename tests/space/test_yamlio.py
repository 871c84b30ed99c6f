import time

import pytest
import yaml

from space.builder import build_model
from space.errors import ConfigError, ModelConfigError
from space.yamlio import MAX_FILE_BYTES, format_model_yaml, parse_yaml_text, read_yaml
from tests.conftest import tiny_yaml

ALIAS_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(98 + k)}: &{chr(98 + k)} [*{chr(97 + k)},*{chr(97 + k)},*{chr(97 + k)},*{chr(97 + k)},"
       f"*{chr(97 + k)},*{chr(97 + k)},*{chr(97 + k)},*{chr(97 + k)},*{chr(97 + k)}]" for k in range(8)]
)


def test_alias_bomb_fails_fast(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB + "\nnc: 3\n")
    start = time.perf_counter()
    with pytest.raises(ModelConfigError, match=r"bomb.yaml: YAML expands to more than 200,000 nodes"):
        build_model(path)
    assert time.perf_counter() - start < 2


def test_recursive_alias_and_deep_nesting_are_rejected():
    with pytest.raises(ConfigError, match="recursive YAML alias"):
        parse_yaml_text("a: &a [1, *a]\n", "x.yaml")
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        parse_yaml_text("a: " + "[" * 40 + "]" * 40 + "\n", "x.yaml")


def test_moderate_aliases_still_work():
    assert parse_yaml_text("a: &a [1, 2]\nb: *a\n", "x") == {"a": [1, 2], "b": [1, 2]}


def test_oversized_non_utf8_and_invalid_files(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("#" * (MAX_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match=r"big.yaml: 1,048,577 bytes is over the 1,048,576-byte limit"):
        read_yaml(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"nc: 3\nname: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin.yaml: not UTF-8 text \(byte 0xe9 at offset 15\); save the file"):
        read_yaml(latin)
    broken = tmp_path / "broken.yaml"
    broken.write_text("nc: [3\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML at line 2, column 1"):
        read_yaml(broken)
    with pytest.raises(ConfigError, match=r"is a folder"):
        read_yaml(tmp_path)


def test_python_tags_are_not_constructed():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_yaml_text("nc: !!python/object/apply:os.system ['touch PWNED']\n", "evil.yaml")


def test_formatted_model_yaml_round_trips():
    cfg = tiny_yaml()
    text = format_model_yaml(cfg, header="tiny", comments={0: "P1/2"})
    assert text.startswith("# tiny\n")
    assert "[-1, 1, RepVGGBlock, [16, 3, 2]],  # 0-P1/2" in text
    assert "[-1, 1, nn.Upsample, [None, 2, 'nearest']]" in text
    assert "[[15, 18, 21], 1, Detect, [nc, anchors]]" in text
    assert yaml.safe_load(text) == cfg
