"""The exact teacher-output cache: views, building, replaying through the teacher seam, refusals."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.data import DataConfig, TensorSplit, ViewGrid, build_data, make_loader
from kdcli.data.loader import crop_flip, normalise
from kdcli.engine.cache import Manifest
from kdcli.engine.checkpoint import save_weights
from kdcli.models import create_model

runner = CliRunner()
CPU = torch.device("cpu")

RECIPE = """
name: cached
data: {{dataset: cifar100, root: {root}, val_fraction: {val}}}
teacher: {{arch: resnet8, checkpoint: {teacher}, cache: {cache}}}
student: {{arch: resnet8}}
method: {{name: {method}}}
optim: {{name: sgd, lr: 0.05}}
schedule: {{name: constant}}
train: {{epochs: 2, batch_size: 8, eval_batch_size: 16, eval_split: test}}
"""


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def world(tmp_path_factory, cifar_files) -> Path:
    """A 40-image CIFAR-100 file in the real format and two random resnet8 teachers."""
    root = tmp_path_factory.mktemp("cache")
    cifar_files.cifar100(root / "data", n_train=40, n_test=16)
    for name, seed in (("teacher", 0), ("other", 1)):
        torch.manual_seed(seed)
        net = create_model("resnet8", num_classes=100)
        with torch.no_grad():  # non-trivial BatchNorm statistics, so that folding them is tested too
            for module in net.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
        save_weights(net, root / name, {"arch": "resnet8", "num_classes": 100})
    return root


def _recipe(world: Path, name: str, method: str = "kd", cache: str = "auto", teacher: str = "teacher",
            val: float = 0.0) -> Path:
    path = world / f"{name}.yaml"
    path.write_text(RECIPE.format(root=world / "data", teacher=world / f"{teacher}.safetensors", cache=cache,
                                  method=method, val=val))
    return path


@pytest.fixture(scope="module")
def built(world: Path) -> Path:
    folder = world / "built"
    result = invoke("cache-teacher", "--recipe", _recipe(world, "build"), "--out", folder, "--device", "cpu",
                    "--batch-size", "512")
    assert result.exit_code == 0, result.output
    assert "40 images x 162 views" in result.output and "6480 teacher forwards" in result.output
    return folder


def test_view_ids_round_trip_and_name_the_crop_the_loader_made() -> None:
    grid = ViewGrid(4, True)
    assert grid.count == 162 and ViewGrid(4, False).count == 81 and ViewGrid(0, False).count == 1
    ids = torch.arange(grid.count)
    offsets, flips = grid.params(ids)
    assert torch.equal(grid.ids(offsets, flips), ids) and offsets.max() == 8 and flips.sum() == 81
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    split = TensorSplit(images, torch.arange(24) % 3, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25))
    loaded = next(iter(make_loader(split, 24, train=True, device=CPU, seed=5, channels_last=True)))
    offsets, flips = grid.params(loaded.views)
    again = crop_flip(images[loaded.indices], offsets, flips, 4)
    mean, std = torch.tensor(split.mean).view(1, 3, 1, 1), torch.tensor(split.std).view(1, 3, 1, 1)
    assert torch.equal(loaded.images, normalise(again, mean, std, torch.channels_last))


def test_cached_outputs_equal_a_fresh_teacher_forward(world: Path, built: Path) -> None:
    manifest = Manifest.read(built)
    assert (manifest.images, manifest.views, manifest.outputs) == (40, 162, ["logits"])
    split = build_data(DataConfig("cifar100", root=str(world / "data"))).train
    from kdcli.engine.checkpoint import load_model

    teacher = load_model(world / "teacher.safetensors", arch="resnet8", num_classes=100).eval()
    table = torch.cat([_shard(built, i) for i in range(manifest.shards)])
    gen = torch.Generator().manual_seed(0)
    rows, views = torch.randint(0, 40, (32,), generator=gen), torch.randint(0, 162, (32,), generator=gen)
    offsets, flips = ViewGrid(4, True).params(views)
    mean, std = torch.tensor(split.mean).view(1, 3, 1, 1), torch.tensor(split.std).view(1, 3, 1, 1)
    with torch.no_grad():  # the unfolded, contiguous fp32 teacher: an independent computation
        fresh = teacher(normalise(crop_flip(split.images[rows], offsets, flips, 4), mean, std, torch.contiguous_format))
    cached = table[rows, views].float()
    # fp16 keeps 11 significant bits: |x - fp16(x)| <= 2^-11 |x|, plus float noise from BN folding
    torch.testing.assert_close(cached, fresh, rtol=2.0**-11, atol=1e-4)
    assert not torch.equal(table[rows, views], table[rows, (views + 1) % 162])  # views differ


def _shard(folder: Path, index: int) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(folder / f"shard-{index:05d}.safetensors"))["logits"]


def test_distill_with_the_cache_matches_the_live_teacher(world: Path, built: Path) -> None:
    """Same seed, same data: only the teacher's logits differ, by fp16 rounding. A val carve-out maps its
    rows back to the cache's (the cache covers the whole training file)."""
    histories = {}
    for cache in ("off", str(built)):
        out = world / f"run-{Path(cache).name}"
        recipe = _recipe(world, f"d-{Path(cache).name}", cache=cache, val=0.25)
        result = invoke("distill", "--recipe", recipe, "--out", out, "--device", "cpu")
        assert result.exit_code == 0, result.output
        histories[cache] = pd.read_csv(out / "kd/history.csv")
        assert ("replayed from the cache" in result.output) == (cache != "off")
        recorded = pd.read_csv(out / "results.csv").set_index("stage")["teacher_outputs"]
        assert recorded["kd"] == ("live" if cache == "off" else f"cache {built}")
    live, cached = histories["off"], histories[str(built)]
    for term in ("ce", "kd", "loss"):
        assert cached[term].tolist() == pytest.approx(live[term].tolist(), rel=2e-3)
    assert cached["kd"].tolist() != live["kd"].tolist()  # the cache really was read (fp16, not bit-equal)


def test_auto_finds_the_shared_cache_by_fingerprint(world: Path, monkeypatch) -> None:
    monkeypatch.setenv("KDCLI_CACHE", str(world / "shared"))
    recipe = _recipe(world, "auto")
    result = invoke("cache-teacher", "--recipe", recipe, "--device", "cpu")
    assert result.exit_code == 0 and "distill finds it by itself" in result.output, result.output
    [folder] = (world / "shared" / "teacher-outputs").iterdir()
    again = invoke("cache-teacher", "--recipe", recipe, "--device", "cpu")
    assert "already complete" in again.output  # same fingerprint, same folder: nothing recomputed
    result = invoke("distill", "--recipe", recipe, "--out", world / "run-auto", "--device", "cpu")
    assert result.exit_code == 0 and f"replayed from the cache {folder}" in result.output.replace("\n", "")
    other = invoke("distill", "--recipe", _recipe(world, "auto-other", teacher="other"), "--out",
                   world / "run-auto-other", "--device", "cpu")
    assert other.exit_code == 0 and "replayed" not in other.output  # another teacher: no cache, live teacher


def test_a_cache_of_another_teacher_is_refused_naming_the_difference(world: Path, built: Path) -> None:
    recipe = _recipe(world, "mismatch", cache=str(built), teacher="other")
    result = invoke("distill", "--recipe", recipe, "--out", world / "run-mismatch", "--device", "cpu")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "does not match this run: teacher_weights (cache" in lines[0] and "data" not in lines[0].split(":")[2]
    build_again = invoke("cache-teacher", "--recipe", recipe, "--out", built, "--device", "cpu")
    assert build_again.exit_code == 2 and "holds a teacher cache for something else: teacher_weights" in build_again.output


def test_a_killed_build_resumes_with_the_missing_shards_only(world: Path, monkeypatch) -> None:
    monkeypatch.setattr("kdcli.engine.cache.SHARD_IMAGES", 16)  # 40 images: shards of 16, 16, 8
    folder = world / "resumed"
    recipe = _recipe(world, "resume")
    assert invoke("cache-teacher", "--recipe", recipe, "--out", folder, "--device", "cpu").exit_code == 0
    complete = _shard(folder, 1).clone()
    (folder / "shard-00001.safetensors").unlink()  # as if killed while computing shard 1
    result = invoke("cache-teacher", "--recipe", recipe, "--out", folder, "--device", "cpu")
    assert result.exit_code == 0 and f"computed {16 * 162} teacher forwards" in result.output
    assert torch.equal(_shard(folder, 1), complete)


def test_methods_that_mix_or_tap_more_bypass_the_cache_and_say_so(world: Path, built: Path) -> None:
    for method, said in (("kd-aug", "not used: method 'kd-aug' shows the teacher mixed images"),
                         ("kdav", "holds logits only")):
        recipe = _recipe(world, f"bypass-{method}", method=method, cache=str(built))
        result = invoke("distill", "--recipe", recipe, "--out", world / f"run-{method}", "--device", "cpu",
                        "--set", "train.epochs=1")
        assert result.exit_code == 0, result.output
        assert result.output.replace("\n", " ").count(said) == 1
