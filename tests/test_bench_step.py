"""`kdcli bench step`: the table's arithmetic, the variants' switches, the CSV, and bad input."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from kdcli.bench.step import _variant_recipe, parse_variants
from kdcli.cli import app
from kdcli.engine.pipeline import resolve_recipe
from kdcli.errors import UserError

runner = CliRunner()
CPU = torch.device("cpu")


def test_bench_step_writes_both_throughputs_their_ratio_and_the_projection(tiny_recipe, tmp_path: Path) -> None:
    recipe = tiny_recipe(method="kd", epochs=3)
    csv = tmp_path / "bench.csv"
    result = runner.invoke(app, ["bench", "step", "--recipe", str(recipe), "--variants", "fp32,default+cache",
                                 "--warmup", "1", "--repeats", "2", "--steps", "1", "--results-file", str(csv)])
    assert result.exit_code == 0, result.output
    assert "x the reference loop" in result.output and "projected 3-epoch run" in result.output
    frame = pd.read_csv(csv)
    assert list(frame["config"]) == ["reference", "fp32", "default+cache"]
    reference = frame["step_time"].iloc[0]
    assert frame["speedup"].tolist() == pytest.approx((reference / frame["step_time"]).tolist(), rel=1e-2)
    assert frame["samples_per_sec"].tolist() == pytest.approx((32 * 1e3 / frame["step_time"]).tolist(), rel=1e-2)
    # tiny recipe: 320 synthetic images, a quarter held out for val -> 240 // 32 = 7 steps per epoch, 3 epochs
    assert frame["projected_run_h"].tolist() == pytest.approx((7 * 3 * frame["step_time"] / 3.6e6).tolist(), abs=2e-3)
    assert (frame["step_time_min"] <= frame["step_time"]).all() and (frame["step_time"] <= frame["step_time_max"]).all()
    assert frame["teacher_share"].iloc[2] < frame["teacher_share"].iloc[1]  # a lookup costs less than a forward
    assert frame.loc[frame.config == "default+cache", "channels_last"].item()  # the tiny recipe keeps the default


def test_variants_switch_exactly_what_they_name() -> None:
    recipe = resolve_recipe("cifar100-resnet")
    plain = _variant_recipe(recipe, "fp32", CPU)
    assert (plain.train.precision, plain.train.channels_last, plain.teacher.fold_bn) == ("fp32", False, False)
    mixed = _variant_recipe(recipe, "bf16+channels_last+fold", CPU)
    assert (mixed.train.precision, mixed.teacher.precision, mixed.train.channels_last, mixed.teacher.fold_bn) == (
        "bf16", "bf16", True, True)
    default = _variant_recipe(recipe, "default", CPU)
    assert default.train.channels_last and default.teacher.fold_bn and default.train.precision in ("fp32", "bf16")
    assert parse_variants(" default , default+cache ") == ["default", "default+cache"]
    with pytest.raises(UserError, match="unknown switch 'turbo'"):
        parse_variants("default+turbo")


@pytest.mark.parametrize("args, said", [
    (["--recipe", "cifar100-resnet", "--variants", "fast"], "unknown switch 'fast'"),
    (["--recipe", "quickstart-kdav", "--variants", "default+cache"], "reads more of the teacher (its feature terms"),
    (["--recipe", "quickstart", "--set", "method.weights.crd=0.8", "--variants", "default+cache"],
     "reads more of the teacher"),
    (["--recipe", "quickstart-kd-aug", "--variants", "default+cache"], "shows the teacher mixed images"),
])
def test_bad_bench_input_is_one_line_and_exit_2(args: list[str], said: str) -> None:
    result = runner.invoke(app, ["bench", "step", *args, "--repeats", "1", "--warmup", "0"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and said in lines[0], result.output
