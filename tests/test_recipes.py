"""Recipe loading: every shipped recipe validates; bad input gives one-line UserErrors."""

from __future__ import annotations

import pytest

from kdcli.engine.pipeline import resolve_recipe
from kdcli.errors import UserError
from kdcli.recipes import Recipe, list_recipes, read_yaml


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_loads(name: str) -> None:
    recipe = resolve_recipe(name)
    assert isinstance(recipe, Recipe)
    assert recipe.name == name
    trains = recipe.teacher is not None or recipe.student is not None or recipe.method.params.get("networks")
    assert trains or name.startswith("probe-")  # a probe recipe describes a dataset and a linear classifier


def test_cifar100_resnet_is_the_standard_protocol() -> None:
    r = resolve_recipe("cifar100-resnet")
    assert (r.data.dataset, r.teacher.arch, r.student.arch) == ("cifar100", "resnet32x4", "resnet8x4")
    assert (r.train.epochs, r.train.batch_size) == (240, 64)
    assert (r.optim.name, r.optim.lr, r.optim.momentum, r.optim.weight_decay) == ("sgd", 0.05, 0.9, 5e-4)
    assert (r.schedule.name, r.schedule.milestones, r.schedule.gamma) == ("multistep", [150, 180, 210], 0.1)
    assert r.method.name == "kd" and r.method.weights == {"ce": 0.1, "kd": 0.9}
    assert r.method.params == {"temperature": 4.0}
    assert (r.data.crop_padding, r.data.hflip) == (4, True)


def test_overrides_are_typed_and_nested() -> None:
    r = resolve_recipe("cifar100-resnet", ["train.epochs=3", "optim.lr=0.1", "schedule.milestones=[1,2]",
                                        "method.weights.kd=0.5"])
    assert (r.train.epochs, r.optim.lr, r.schedule.milestones) == (3, 0.1, [1, 2])
    assert r.method.weights == {"ce": 0.1, "kd": 0.5}


def test_set_method_switches_the_method_with_its_defaults() -> None:
    switched = resolve_recipe("cifar100-resnet", ["method=ttm"])
    assert (switched.method.name, switched.method.weights, switched.method.params) == ("ttm", {}, {})
    renamed = resolve_recipe("cifar100-resnet", ["method.name=dkd", "method.weights={ce: 1.0, dkd: 1.0}"])
    assert renamed.method.params == {"temperature": 4.0}  # method.name=... keeps the section's other keys
    with pytest.raises(UserError, match="'method.name'.*nope"):
        resolve_recipe("cifar100-resnet", ["method=nope"])


def test_config_hash_changes_with_content() -> None:
    a, b = resolve_recipe("cifar100-resnet"), resolve_recipe("cifar100-resnet", ["train.epochs=3"])
    assert a.config_hash() == resolve_recipe("cifar100-resnet").config_hash()
    assert a.config_hash() != b.config_hash()


@pytest.mark.parametrize("yaml_text, needle", [
    ("train: {epochz: 3}", "unknown key 'train.epochz'"),
    ("train: {epochs: three}", "'train.epochs' must be int"),
    ("train: {epochs: 0}", "'train.epochs' must be >= 1"),
    ("data: {dataset: mnist}", "'data.dataset' must be one of"),
    ("optim: {lr: -1}", "'optim.lr' must be > 0"),
    ("train: {eval_split: val}", "'train.eval_split' is 'val' but data.val_fraction is 0"),
    ("method: {name: nope}", "unknown method 'nope'"),
    ("method: {name: kd, params: {temprature: 2}}", "unknown key 'method.params.temprature'"),
    ("method: {name: kd, weights: {foo: 1}}", "'method.weights.foo' is not a loss term"),
    ("train: [1, 2]", "'train' must be a mapping"),
    ("train: {epochs: 2", "not valid YAML"),
])
def test_bad_recipes_name_the_key_and_file(tmp_path, yaml_text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError) as info:
        resolve_recipe(str(path))
    message = str(info.value)
    assert needle in message and str(path) in message
    assert "\n" not in message


def test_unknown_recipe_suggests_close_names() -> None:
    with pytest.raises(UserError, match="did you mean cifar100-resnet"):
        resolve_recipe("cifar100-resnt")


def test_base_chain_and_bad_override(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("base: cifar100-resnet\ntrain: {epochs: 7}\n")
    r = resolve_recipe(str(path))
    assert (r.name, r.train.epochs, r.teacher.arch, r.optim.lr) == ("mine", 7, "resnet32x4", 0.05)
    with pytest.raises(UserError, match="expected key.path=value"):
        resolve_recipe(str(path), ["train.epochs"])


@pytest.mark.parametrize("spelling, value", [("5e-4", 5e-4), ("5.0e-4", 5e-4), ("1E3", 1000.0), (".5", 0.5),
                                             ("1e+2", 100.0), ("0.05", 0.05)])
def test_floats_in_every_spelling_ml_users_write(tmp_path, spelling: str, value: float) -> None:
    """YAML 1.1 (PyYAML) reads `5e-4` as a string; recipes and --set read it as the float everyone means."""
    assert resolve_recipe("quickstart", [f"optim.weight_decay={spelling}"]).optim.weight_decay == value
    path = tmp_path / "r.yaml"
    path.write_text(f"base: quickstart\noptim: {{weight_decay: {spelling}}}\n")
    assert resolve_recipe(str(path)).optim.weight_decay == value


def test_only_numbers_become_floats() -> None:
    assert read_yaml("-2.5e+3") == -2500.0 and read_yaml("1_000") == 1000
    assert [read_yaml(text) for text in ("5e-4e", "e5", "1e", "resnet8x4")] == ["5e-4e", "e5", "1e", "resnet8x4"]
