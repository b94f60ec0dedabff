"""Hostile recipes, selectors, configs and transform sizes end in one clear line, quickly.

The CLI cases call the real entry point: exit code 2, exactly one ``error:`` line on stderr,
no traceback. Before the fixes the alias bombs and the backtracking selector ran for minutes
and gigabytes; here they must simply end with that line. Expected outcomes come from the documents themselves
(an alias bomb's expanded size is 9**k by construction), not from the code under test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unet_surgery.cli import main
from unet_surgery.core.pathregex import PatternError, compile_path_pattern
from unet_surgery.errors import RecipeError
from unet_surgery.loading import resolve_model
from unet_surgery.recipes.library import load_recipe
from unet_surgery.recipes.schema import parse_recipe

GOOD = """name: ok
base_resolution: [512, 512]
target_resolutions: [[1024, 1024]]
passes:
- type: redilate
  select: {op: conv2d, kernel: 3, paths: ['PATH']}
  factor: FACTOR
"""


def good(path: str = "down_blocks.*", factor: str = "2") -> str:
    return GOOD.replace("PATH", path).replace("FACTOR", factor)


def cli(*args: str) -> tuple[int, list[str]]:
    """Exit code and non-empty stderr lines of ``unet-surgery ARGS`` (a traceback would escape)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return code, [line for line in err.getvalue().splitlines() if line.strip()]


def alias_bomb(field: str, levels: int = 9) -> str:
    """``levels`` anchors each listing the previous nine times: 9**levels strings, ~500 bytes."""
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    body = good().replace("name: ok\n", "")
    return "\n".join(lines) + f"\n{field}: *a{levels}\n" + ("" if field == "name" else "name: ok\n") + body


HOSTILE_RECIPES: dict[str, bytes] = {
    "alias bomb in name": alias_bomb("name").encode(),
    "alias bomb in source": alias_bomb("source").encode(),
    "recursive alias": b"name: &x [*x]\n",
    "deep nesting": ("x: " + "[" * 5000 + "]" * 5000 + "\n").encode(),
    "deep json-style mapping": ("x: " + "{a: " * 200 + "1" + "}" * 200 + "\n").encode(),
    "5000-digit integer": good(factor="9" * 5000).encode(),
    "binary": bytes(range(256)) * 4,
    "UTF-16": good().encode("utf-16"),
    "NUL inside": good().encode() + b"\x00",
    "too large": b"# " + b"x" * (2 << 20) + b"\n",
    "invalid regex": good(path="re:(").encode(),
    "backreference": good(path="re:(down)\\1").encode(),
    "factor 1e-300": good(factor="1.0e-300").encode(),
    "factor 1e300": good(factor="1.0e+300").encode(),
    "factor .nan": good(factor=".nan").encode(),
    "huge resolution": good().replace("[512, 512]", "[512, 99999999999999999999]").encode(),
}


@pytest.mark.parametrize("kind", list(HOSTILE_RECIPES))
def test_hostile_recipes_are_one_recipe_error(kind: str, tmp_path: Path) -> None:
    file = tmp_path / "r.yaml"
    file.write_bytes(HOSTILE_RECIPES[kind])
    with pytest.raises(RecipeError) as info:
        load_recipe(file)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_hostile_recipes_through_the_cli_exit_2_in_one_line(tmp_path: Path) -> None:
    files = []
    for i, data in enumerate(HOSTILE_RECIPES.values()):
        files.append(tmp_path / f"r{i}.yaml")
        files[-1].write_bytes(data)
    for file in files:  # one process per file: each must fail on its own
        code, err = cli("recipes", "validate", str(file))
        assert code == 2 and len(err) == 1 and "error:" in err[0] and "Traceback" not in err[0], (file, err)
    code, err = cli("recipes", "validate", str(tmp_path / "absent.yaml"))
    assert code == 2 and len(err) == 1


def test_a_valid_recipe_still_loads(tmp_path: Path) -> None:
    file = tmp_path / "r.yaml"
    file.write_text(good(path="re:down_blocks\\.[12]\\..*conv[12]"))
    recipe = load_recipe(file)
    assert recipe.passes[0].select.paths == ("re:down_blocks\\.[12]\\..*conv[12]",)


def test_a_backtracking_selector_plans_against_a_real_map(tmp_path: Path) -> None:
    from tests.conftest import preset_map
    from unet_surgery.errors import SelectionError
    from unet_surgery.passes import make_plan

    file = tmp_path / "r.yaml"
    file.write_text(good(path="re:([a-z_0-9.]+)+X"))
    with pytest.raises(SelectionError, match="matched no layer"):
        make_plan(load_recipe(file), preset_map("sd15", "tiny"))


# --- the path matcher agrees with Python's re, in linear time -------------------------------------

ATOMS = st.sampled_from(["a", "b", ".", r"\.", "[ab]", "[^a]", r"\d", "_", "(a|b)", "(ab|a)", "(a.)"])
QUANT = st.sampled_from(["", "", "*", "+", "?", "{2}", "{1,3}", "*?"])


@st.composite
def patterns(draw: Any) -> str:
    parts = draw(st.lists(st.tuples(ATOMS, QUANT), min_size=1, max_size=5))
    body = "".join(a + q for a, q in parts)
    return draw(st.sampled_from([body, f"({body})+", f"({body})*x", f"^{body}$"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(), st.lists(st.text(alphabet="ab._1x", max_size=10), min_size=1, max_size=10))
def test_path_matcher_agrees_with_re(pattern: str, texts: list[str]) -> None:
    compiled = compile_path_pattern(pattern)
    for text in texts:
        assert compiled.fullmatch(text) == (re.fullmatch(pattern, text) is not None), (pattern, text)


def test_catastrophic_patterns_finish_on_long_paths() -> None:
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor" * 4
    for pattern in ["([a-z_0-9.]+)+X", "(a|a)*X", "(.*)*(.*)*(.*)*X", "((a+)+)+X"]:
        assert not compile_path_pattern(pattern).fullmatch(path)
        assert not compile_path_pattern(pattern).fullmatch("a" * 200)


@pytest.mark.parametrize("pattern", ["(", r"(a)\1", "(?=a)", "(?<!a)b", "(?i)a", "a{1000}", "x" * 1001])
def test_unsupported_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(PatternError):
        compile_path_pattern(pattern)


# --- any document: a Recipe or one RecipeError, nothing else ------------------------------------

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=30,
)
KEYS = st.sampled_from(["name", "base_resolution", "target_resolutions", "passes", "version", "sampling", "model", "source"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, JSONISH, max_size=6))
def test_arbitrary_documents_give_a_recipe_or_one_recipe_error(document: dict[str, Any]) -> None:
    try:
        parse_recipe(document)
    except RecipeError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "kernel", "stride", "stage", "level", "axis", "kind", "paths"]), JSONISH, max_size=4))
def test_arbitrary_selectors_give_a_recipe_or_one_recipe_error(select: dict[str, Any]) -> None:
    document = json.loads(json.dumps({"name": "x", "base_resolution": [512, 512], "target_resolutions": [[1024, 1024]],
                                      "passes": [{"type": "redilate", "select": select, "factor": 2}]}))
    try:
        parse_recipe(document)
    except RecipeError as exc:
        assert "\n" not in str(exc)


# --- configs and transform sizes ----------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unet_surgery.presets import build_unet

    folder = tmp_path_factory.mktemp("tiny") / "unet"
    build_unet("sd15", size="tiny", device="cpu").save_pretrained(str(folder))
    return folder


def tiny_folder(saved: Path, tmp_path: Path, **overrides: Any) -> Path:
    folder = tmp_path / "unet"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(overrides)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


CONFIGS = {
    "layers_per_block 1000000": {"layers_per_block": 1_000_000},
    "huge channels": {"block_out_channels": [10**9, 10**9]},
    "zero channels": {"block_out_channels": [0, 0]},
    "negative channels": {"block_out_channels": [-32, -64]},
    "unknown block": {"down_block_types": ["EvilBlock2D", "DownBlock2D"]},
    "unknown class": {"_class_name": "os.system"},
    "string layers": {"layers_per_block": "many"},
    "too many blocks": {"block_out_channels": [32] * 50},
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_hostile_configs_exit_2_in_one_line_before_building(kind: str, saved_tiny: Path, tmp_path: Path) -> None:
    folder = tiny_folder(saved_tiny, tmp_path, **CONFIGS[kind])
    code, err = cli("inspect", str(folder))
    assert code == 2 and len(err) == 1 and "error:" in err[0], err


@pytest.mark.parametrize(
    "args",
    [["--input-size", "500"], ["--large", "201"], ["--large", "21"], ["--scale", "1000"], ["--small", "99", "--large", "101"]],
)
def test_disperse_sizes_are_bounded(args: list[str], tmp_path: Path) -> None:
    code, err = cli("disperse", *args, "-o", str(tmp_path / "r.safetensors"))
    assert code == 2 and len(err) == 1 and "error:" in err[0], err
    assert not (tmp_path / "r.safetensors").exists()


def test_disperse_into_a_directory_and_a_read_only_folder(tmp_path: Path) -> None:
    (tmp_path / "d.safetensors").mkdir()
    code, err = cli("disperse", "-o", str(tmp_path / "d.safetensors"))
    assert code == 2 and len(err) == 1 and "error:" in err[0], err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        code, err = cli("disperse", "-o", str(locked / "r.safetensors"))
        assert code == 2 and len(err) == 1 and "Permission denied" in err[0], err
    finally:
        locked.chmod(0o700)


def test_inspect_refuses_a_config_that_does_not_fit_its_weights(saved_tiny: Path, tmp_path: Path) -> None:
    config = json.loads((saved_tiny / "config.json").read_text())
    widths = [2 * w for w in config["block_out_channels"]]  # a valid architecture, other widths
    folder = tiny_folder(saved_tiny, tmp_path, block_out_channels=widths)
    code, err = cli("inspect", str(folder))
    assert code == 2 and len(err) == 1 and ("do not fit" in err[0] or "has shape" in err[0]), err
    assert resolve_model(str(saved_tiny), device="meta").kind == "diffusers-folder"  # what inspect then maps


def test_alias_expansion_is_counted_not_walked() -> None:
    """Nine levels of nine shared references: 9**9 (387 420 489) leaves in ten distinct lists."""
    node: Any = "lol"
    for _ in range(9):
        node = [node] * 9
    document = {"name": "x", "base_resolution": [512, 512], "target_resolutions": [[1024, 1024]], "passes": node}
    with pytest.raises(RecipeError, match="aliases are expanded"):
        parse_recipe(document)
    small: Any = "lol"
    for _ in range(4):  # 9**4 = 6561 leaves: within the limit, so the usual field error follows
        small = [small] * 9
    with pytest.raises(RecipeError, match=r"passes\[0\]"):
        parse_recipe({**document, "passes": small})


def test_inspect_takes_the_tiny_single_files_export_takes_and_refuses_broken_ones(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from unet_surgery.presets import build_unet

    state = {k: v.contiguous() for k, v in build_unet("sd15", size="tiny", device="cpu").state_dict().items()}
    save_file(state, str(tmp_path / "tiny.safetensors"))
    resolved = resolve_model(str(tmp_path / "tiny.safetensors"), device="meta")  # what inspect then maps
    assert (resolved.preset, resolved.model.unet_surgery_size) == ("sd15", "tiny")
    state.pop(sorted(state)[0])
    save_file(state, str(tmp_path / "broken.safetensors"))
    code, err = cli("inspect", str(tmp_path / "broken.safetensors"))
    assert code == 2 and len(err) == 1 and "fit no shipped architecture" in err[0], err


# --- a pipeline folder's model_index.json names what diffusers imports -------------------------------

@pytest.mark.parametrize(("entry", "refusal"), [
    # diffusers imports the library a component names: "this" prints the Zen of Python on import
    ({"safety_checker": ["this", "Anything"]}, "component 'safety_checker' names '[\"this\", \"Anything\"]', not a "
     "[library, class] pair of diffusers, transformers or a diffusers pipeline module"),
    ({"unet": ["os", "system"]}, "component 'unet' names '[\"os\", \"system\"]', not a [library, class] pair of "
     "diffusers, transformers or a diffusers pipeline module"),
    ({"../../elsewhere": ["diffusers", "AutoencoderKL"]}, "component name '../../elsewhere' is not a plain name"),
])
def test_model_index_may_name_only_diffusers_and_transformers_components(
        entry: dict[str, Any], refusal: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by the second hostile run: `generate` on a folder whose model_index.json named
    `["antigravity", "X"]` imported that module (running its import-time code) and exit 0."""
    import sys

    folder = tmp_path / "pipe"
    folder.mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
             "feature_extractor": [None, None], "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             **entry}
    (folder / "model_index.json").write_text(json.dumps(index))
    sys.modules.pop("this", None)
    code = main(["generate", str(folder), "--prompt", "x", "--size", "64", "-q", "-o", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 2 and "this" not in sys.modules and "Beautiful is better" not in out
    assert err == f"unet-surgery generate: error: MODEL: {folder / 'model_index.json'}: {refusal}\n"


def _edited(folder: Path, file: str, **changes: Any) -> None:
    data = json.loads((folder / file).read_text())
    data.update(changes)
    (folder / file).write_text(json.dumps(data))


@pytest.mark.parametrize(("file", "changes", "refusal"), [
    # 10**9 timesteps allocated gigabytes of betas (a traceback at best); 0 an IndexError later
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 10**9},
     "num_train_timesteps 1000000000 is not an integer from 1 to 100000"),
    # betas above 1 made every image NaN, written as a black PNG, exit 0
    ("scheduler/scheduler_config.json", {"beta_end": 5.0}, "beta_end 5.0 is not a number in (0, 1)"),
    # diffusers builds a pipeline folder's UNet itself: "8" as sample_size was a ValueError
    ("unet/config.json", {"sample_size": "8"}, "sample_size must hold integers in [1, 16384], got 8"),
    # the VAE asked for 1.4 TB
    ("vae/config.json", {"block_out_channels": [200000, 200000]},
     "block_out_channels must hold integers in [1, 16384], got [200000, 200000]"),
])
def test_pipeline_component_configs_are_bounded_before_loading(file: str, changes: dict[str, Any], refusal: str,
                                                               sd15_folder: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Found by the second hostile run: only the UNet's config was bounded."""
    folder = tmp_path / "pipe"
    shutil.copytree(sd15_folder, folder)
    _edited(folder, file, **changes)
    code = main(["generate", str(folder), "--prompt", "x", "--size", "64", "-q", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("unet-surgery generate: error: MODEL: ")
    assert str(folder / file) in err and err.rstrip().endswith(refusal), err
    assert not (tmp_path / "out").exists()


def test_pipeline_tokenizer_files_and_component_weights_are_checked(sd15_folder: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A tokenizer file over 16 MiB was read whole; a NaN in the VAE gave a black PNG and exit 0."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "pipe"
    shutil.copytree(sd15_folder, folder)
    merges = folder / "tokenizer" / "tokenizer.json"
    original = merges.read_bytes()
    merges.write_bytes(b"a" * (16 * 2**20 + 1))
    command = ["generate", str(folder), "--prompt", "x", "--size", "64", "--steps", "1", "-q", "-o", str(tmp_path / "out")]
    assert main(command) == 2
    assert capsys.readouterr().err == (f"unet-surgery generate: error: MODEL: {merges} is larger than 16777216 bytes "
                                       "(a tokenizer file is a few MiB)\n")
    merges.write_bytes(original)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = sorted(state)[0]
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(weights))
    assert main(command) == 2
    assert capsys.readouterr().err == (f"unet-surgery generate: error: MODEL: {folder}: vae weight {key} "
                                       "holds NaN or infinity\n")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))
