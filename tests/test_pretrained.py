"""Pretrained teachers by name: loading from a file or the cache, the one-line offline answer, and the teacher's
own normalisation (its input re-normalised when the data's differs)."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.engine.pretrained import load_pretrained, parse_pretrained
from kdcli.engine.step import TeacherSeam, teacher_normalisation
from kdcli.errors import UserError
from kdcli.models import Taps

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # torchvision's and timm's ImageNet normalisation


@pytest.mark.parametrize("text", ["resnet34", "torchvision:resnet34", "hub:resnet34.X", "timm:.a1_in1k"])
def test_a_misspelt_name_says_the_expected_spelling(text: str) -> None:
    with pytest.raises(UserError, match="expected torchvision:<model>.<WEIGHTS>"):
        parse_pretrained(text)


def test_offline_torchvision_names_the_file_and_where_to_put_it(monkeypatch) -> None:
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(UserError) as error:
        load_pretrained("torchvision:resnet18.IMAGENET1K_V1", 1000)
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message and str(Path(torch.hub.get_dir()) / "checkpoints") in message
    assert "teacher.checkpoint" in message and "\n" not in message


def test_offline_timm_names_the_download_and_the_checkpoint_option(monkeypatch) -> None:
    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match=r"download https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/"
                                        r"model.safetensors and pass the file as teacher.checkpoint"):
        load_pretrained("timm:resnet18.a1_in1k", 1000)


@pytest.mark.parametrize("name", ["torchvision:resnet18.IMAGENET1K_V1", "timm:resnet18.a1_in1k"])
def test_a_downloaded_file_gives_the_weights_and_the_name_the_network_and_normalisation(name: str,
                                                                                        tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = (torchvision.models.resnet18() if name.startswith("torchvision") else timm.create_model("resnet18"))
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / ("w.pth" if name.startswith("torchvision") else "w.safetensors")
    torch.save(state, path) if path.suffix == ".pth" else save_file(state, path)
    teacher = load_pretrained(name, 1000, str(path))
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in state.items())
    assert teacher.kdcli_meta["mean"] == pytest.approx(IMAGENET[0]) and teacher.kdcli_meta["std"] == pytest.approx(
        IMAGENET[1])
    assert not teacher.training
    with pytest.raises(UserError, match="predicts 1000 classes but the data has 100"):
        load_pretrained(name, 100, str(path))


def test_the_teacher_sees_its_own_normalisation() -> None:
    """Images normalised with the data's statistics reach the teacher normalised with its own."""
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=10).eval()
    teacher.kdcli_meta = {"mean": IMAGENET[0], "std": IMAGENET[1]}
    data_mean, data_std = [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]  # CIFAR-100's
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    as_data = (pixels - torch.tensor(data_mean).view(1, 3, 1, 1)) / torch.tensor(data_std).view(1, 3, 1, 1)
    as_teacher = (pixels - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
    seam = TeacherSeam(teacher, Taps(), "fp32", renormalise=teacher_normalisation(teacher, data_mean, data_std))
    from kdcli.methods.base import Batch

    out = seam(Batch(as_data, torch.zeros(4, dtype=torch.long), torch.arange(4)))
    with torch.no_grad():
        torch.testing.assert_close(out.logits, teacher(as_teacher), rtol=1e-5, atol=1e-5)
    assert teacher_normalisation(teacher, *IMAGENET) is None  # the same statistics: nothing to do
    assert "re-normalised" in seam.describe()


RECIPE = """
name: named-teacher
data: {dataset: synthetic, num_classes: 1000, train_size: 64, test_size: 32}
teacher: {arch: resnet18, pretrained: "torchvision:resnet18.IMAGENET1K_V1"%s}
student: {arch: resnet8}
method: {name: kd}
train: {epochs: 1, batch_size: 16, eval_batch_size: 32}
"""


def test_distill_from_a_named_teacher_file_end_to_end_and_offline_is_one_line(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    recipe = tmp_path / "named.yaml"
    recipe.write_text(RECIPE % f", checkpoint: {weights}")
    result = CliRunner().invoke(app, ["distill", "--recipe", str(recipe), "--smoke", "--device", "cpu", "--out",
                                      str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "input re-normalised to its own mean/std" in result.output  # synthetic data has its own statistics

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    recipe.write_text(RECIPE % "")
    result = CliRunner().invoke(app, ["distill", "--recipe", str(recipe), "--device", "cpu", "--out",
                                      str(tmp_path / "offline")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines[-1].startswith("error: teacher.pretrained")
    assert "resnet18-f37072fd.pth" in lines[-1]
    assert not (tmp_path / "offline").exists()
    smoke = CliRunner().invoke(app, ["distill", "--recipe", str(recipe), "--smoke", "--device", "cpu", "--out",
                                     str(tmp_path / "smoke")])
    assert smoke.exit_code == 0 and "are not at hand, using a random resnet18" in smoke.output
    mismatch = CliRunner().invoke(app, ["distill", "--recipe", str(recipe), "--set", "teacher.arch=resnet34",
                                        "--dry-run"])
    assert mismatch.exit_code == 0  # --dry-run only prints; the check runs before training:
    mismatch = CliRunner().invoke(app, ["distill", "--recipe", str(recipe), "--set", "teacher.arch=resnet34", "--out",
                                        str(tmp_path / "m")])
    assert mismatch.exit_code == 2 and "set teacher.arch=resnet18" in mismatch.output


def test_measure_violations_measures_a_named_teacher_with_its_own_normalisation(tmp_path: Path, monkeypatch) -> None:
    """With teacher.pretrained and no checkpoint, measure-violations loads the named weights (here served as if
    from torch hub's cache) and feeds them images normalised with ImageNet's statistics, not the data's."""
    import dataclasses

    import pandas as pd

    from kdcli.data import smoke_data
    from kdcli.violations import measure_violations

    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", lambda self, *a, **k: state)
    recipe = tmp_path / "named.yaml"
    recipe.write_text(RECIPE % "")
    result = CliRunner().invoke(app, ["measure-violations", "--recipe", str(recipe), "--smoke", "--augment",
                                      "none,mixup", "--samples", "24", "--out", str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "v" / "violations.csv")
    assert set(table.teacher) == {"torchvision:resnet18.IMAGENET1K_V1"} and set(table.arch) == {"resnet18"}
    teacher = torchvision.models.resnet18()
    teacher.load_state_dict(state)
    split = dataclasses.replace(smoke_data(1000, 32).train, mean=tuple(IMAGENET[0]), std=tuple(IMAGENET[1]))
    direct = measure_violations(teacher.eval(), split, ["none", "mixup"], batch_size=32, device=torch.device("cpu"),
                                samples=24, seed=0).table
    assert table.kendall_tau.tolist() == pytest.approx(direct.kendall_tau.tolist(), abs=1e-6)
    assert table.violation_rate.tolist() == pytest.approx(direct.violation_rate.tolist(), abs=1e-9)
