"""Malformed recipe documents fail with a RecipeError that names the bad field, never with
a KeyError, TypeError or traceback (fuzzed with hypothesis)."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import preset_map
from unet_surgery import RecipeError, SelectionError, apply, load_recipe
from unet_surgery.cli import main
from unet_surgery.recipes import parse_recipe, to_data

VALID = {
    "name": "t",
    "base_resolution": [512, 512],
    "target_resolutions": [[1024, 1024]],
    "passes": [
        {"type": "redilate", "select": {"kernel": 3, "level": "1..", "stage": ["down", "mid"]}, "factor": 2,
         "schedule": {"tau": 30, "steps": 50}},
        {"type": "disperse", "select": {"paths": ["down_blocks.1.resnets.0.conv1"]}, "transform": {"large": 5}},
        {"type": "noise_damped_cfg", "select": {}, "factors": {"mid_block.resnets.0.conv1": 2}},
        {"type": "scale_fusion", "select": {"op": "attention", "kind": "self"}, "blur": "spatial"},
    ],
    "sampling": {"stages": [[512, 512], [1024, 1024]], "restart_step": 15},
}


def test_the_base_document_is_valid() -> None:
    assert parse_recipe(copy.deepcopy(VALID)).name == "t"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("passes", 0, "select", "level"), "deep", "passes[0].select.level: expected int or range, got 'deep'"),
        (("passes", 0, "factor"), -1, "passes[0].factor: factor must be between 1 and 64, got -1"),
        (("passes", 0, "type"), "no_such_pass", "passes[0].type: expected one of redilate"),
        (("passes", 1, "transform", "large"), 4, "passes[1].transform: large kernel size must be odd, got 4"),
        (("passes", 3, "blur"), "box", "passes[3].blur: expected one of published, published-2024, volumetric, spatial, got 'box'"),
        (("sampling", "stages"), [[1024, 1024], [512, 512]], "sampling.stages[1]: stages must not shrink"),
        (("sampling", "restart_step"), 80, "sampling.restart_step: must be in [0, 50)"),
        (("base_resolution",), [512], "base_resolution: expected a list of 2 values"),
        (("passes", 0, "select", "stage"), ["middle"], "passes[0].select.stage[0]: expected one of down, mid, up"),
        (("passes", 0, "schedule", "progressive"), "yes", "passes[0].schedule.progressive: expected true or false"),
        # an odd table key is quoted in the error path (found by the fuzz test below in CI)
        (("passes", 2, "factors"), {":": 0.0}, "passes[2].factors[':']: factor must be between 1 and 64, got 0"),
        # a dilation below 1 would enlarge the input (ScaleCrafter's factors are >= 1)
        (("passes", 2, "factors"), {"mid_block.resnets.0.conv1": 0.5},
         "passes[2].factors.mid_block.resnets.0.conv1: factor must be between 1 and 64, got 0.5"),
        (("passes", 0, "factor"), 0.5, "passes[0].factor: factor must be between 1 and 64, got 0.5"),
    ],
)
def test_errors_name_the_field(path, value, message) -> None:
    doc = copy.deepcopy(VALID)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(RecipeError) as info:
        parse_recipe(doc)
    assert str(info.value).startswith(message)


def test_unknown_and_missing_fields() -> None:
    doc = copy.deepcopy(VALID)
    doc["passes"][0]["select"]["levle"] = 2
    with pytest.raises(RecipeError, match=r"^passes\[0\]\.select\.levle: unknown field"):
        parse_recipe(doc)
    doc = copy.deepcopy(VALID)
    del doc["passes"][0]["select"]
    with pytest.raises(RecipeError, match=r"^passes\[0\]\.select: required field is missing"):
        parse_recipe(doc)


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5),
    st.lists(st.integers(-2, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


ALL_PATHS = [p for p in _paths(VALID) if p]
FIELD = re.compile(r"^([A-Za-z_]\w*)?(\[\d+\]|\[.+\]|\.[\w.\-*]+)*: |^(a recipe|expected)")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_PATHS), JUNK, st.booleans())
def test_fuzzed_documents_fail_only_with_recipe_error(path, junk, delete) -> None:
    doc = copy.deepcopy(VALID)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = junk
    try:
        recipe = parse_recipe(doc)
    except RecipeError as exc:
        assert FIELD.match(str(exc)), str(exc)
    else:
        assert parse_recipe(to_data(recipe)) == recipe


@settings(max_examples=100, deadline=None)
@given(JUNK)
def test_fuzzed_top_level_documents(junk) -> None:
    with pytest.raises(RecipeError):
        parse_recipe(junk)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(ALL_PATHS), JUNK)
def test_cli_validate_never_shows_a_traceback(tmp_path, capsys, path, junk) -> None:
    doc = copy.deepcopy(VALID)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = junk
    file = tmp_path / "r.yaml"
    file.write_text(yaml.safe_dump(doc))
    code = main(["recipes", "validate", str(file)])
    _out, err = capsys.readouterr()
    assert code in (0, 2)
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and "r.yaml:" in err


def test_yaml_is_loaded_safely(tmp_path) -> None:
    file = tmp_path / "evil.yaml"
    file.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        load_recipe(file)


def test_unknown_recipe_name_suggests() -> None:
    with pytest.raises(RecipeError, match="Did you mean scalecrafter-sd15-2048x2048"):
        load_recipe("scalecrafter-sd15-2048x2084")


def test_selector_matching_nothing_lists_closest_paths(tiny_sd15) -> None:
    unet_map = preset_map("sd15", "tiny")
    doc = copy.deepcopy(VALID)
    doc["passes"] = [{"type": "redilate", "select": {"paths": ["down_blocks.1.resnet.0.conv1"]}, "factor": 2}]
    with pytest.raises(SelectionError, match=r"closest: down_blocks\.1\.resnets\.0\.conv1"):
        apply(tiny_sd15, doc, unet_map=unet_map, force=True)
    doc["passes"] = [{"type": "redilate", "select": {"level": 9}, "factor": 2}]
    with pytest.raises(SelectionError, match="matched no layer"):
        apply(tiny_sd15, doc, unet_map=unet_map, force=True)


def test_recipe_version_is_checked_and_defaults_to_one() -> None:
    doc = copy.deepcopy(VALID)
    assert "version" not in doc and parse_recipe(doc).version == 1  # old files still load
    doc["version"] = 2
    doc["passes"][0]["new_field_of_version_2"] = True  # refused for its version, not its fields
    with pytest.raises(RecipeError, match=r"^version: recipe format version 2 is not one this unet-surgery reads \(1\)"):
        parse_recipe(doc)
    assert to_data(parse_recipe(VALID))["version"] == 1  # written out explicitly


def test_unread_dilate_tau_is_dropped_with_a_warning() -> None:
    doc = copy.deepcopy(VALID)
    doc["sampling"] = {**doc.get("sampling", {"stages": [[512, 512], [1024, 1024]]}), "dilate_tau": 35}
    with pytest.warns(UserWarning, match="dilate_tau is ignored"):
        recipe = parse_recipe(doc)
    assert recipe.sampling is not None and not hasattr(recipe.sampling, "dilate_tau")


def test_on_missing_error_refuses_a_listed_path_the_model_lacks_and_warn_skips_it(tiny_sd15) -> None:
    unet_map = preset_map("sd15", "tiny")
    typo = "down_blocks.1.resnet.0.conv1"  # resnets, not resnet
    doc = copy.deepcopy(VALID)
    doc["passes"] = [{"type": "redilate", "select": {"paths": ["down_blocks.1.resnets.0.conv2", typo]}, "factor": 2}]
    with pytest.raises(SelectionError, match=r"passes\[0\] \(redilate\): 1 listed layer\(s\) do not exist .*"
                                             r"closest: down_blocks\.1\.resnets\.0\.conv1.*on_missing: warn"):
        apply(tiny_sd15, doc, unet_map=unet_map, force=True)
    doc["passes"][0]["on_missing"] = "warn"
    with apply(tiny_sd15, doc, unet_map=unet_map, force=True) as patch:
        assert sorted(patch.plan.layers) == ["down_blocks.1.resnets.0.conv2"]
        assert f"missing in model, skipped: passes[0] {typo} (closest: down_blocks.1.resnets.0.conv1" in patch.report()
