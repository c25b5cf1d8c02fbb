"""`kdcli report`: one table from many runs: mean ± std over seeds, the teacher, the baseline, the paper.

A *run* is a directory with a ``run.json`` written by ``train-teacher`` or ``distill`` (a ``--seeds`` parent is
one run; its ``seed-<s>/`` folders belong to it). Its ``results.csv`` has one row per (seed, stage, network);
a run without one did not finish and is listed as incomplete, never averaged.

Rows are grouped by (recipe, stage, network) by default, always split by config hash (the same recipe name
with other settings is another experiment) and by smoke-ness. Per group:

* ``top1``: test top-1 at the epoch chosen on the validation split (``selection = val``), or, for runs that
  selected on the test split, the best test top-1 over the epochs (``selection = best-on-test``, optimistic by
  construction; RepDistiller and mdistiller report this); mean and sample standard deviation over seeds;
* ``last_top1``: test top-1 at the last epoch, mean ± std;
* ``teacher_top1`` and ``baseline_top1``: the teacher's and the student-alone's ``top1`` in the same runs,
  and ``gain`` over the baseline; ``paper_top1`` (the recipe's reported number) and ``paper_delta``;
* seconds and images/s of the stage (means), the kdcli and torch versions.

All accuracies are percentages, times seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kdcli.errors import UserError
from kdcli.recipes import read_yaml

RUN_FILE, RECIPE_FILE, RESULTS_FILE, HISTORY_FILE = "run.json", "recipe.yaml", "results.csv", "history.csv"
TRAINING_COMMANDS = ("train-teacher", "distill")
GROUP_KEYS = ("recipe", "stage", "network", "arch")
FORMATS = ("md", "csv", "html")


@dataclass
class Run:
    """One run directory as the report reads it."""

    path: Path
    command: str
    smoke: bool
    recipe: dict
    results: pd.DataFrame | None  # per-seed rows (the mean rows of --seeds are recomputed here)
    histories: dict[tuple[int, str], Path] = field(default_factory=dict)  # (seed, stage) -> history.csv
    extras: dict[str, list[Path]] = field(default_factory=dict)  # evaluation.csv / violations.csv inside the run

    @property
    def complete(self) -> bool:
        return self.results is not None


def find_runs(paths: Iterable[Path]) -> list[Run]:
    """Every training run at or under ``paths`` (a run directory, a --seeds parent, or a tree of runs)."""
    found: list[Path] = []
    for path in paths:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise UserError(f"{path} is not a directory; give run directories or folders holding runs")
        found += _run_dirs(path)
    runs = [run for run in (_read_run(path) for path in dict.fromkeys(found)) if run is not None]
    if not runs:
        raise UserError(f"no kdcli training run (a folder with {RUN_FILE} from train-teacher or distill) under "
                        f"{', '.join(str(p) for p in paths)}; point at run directories or their parent")
    return runs


def _run_dirs(path: Path) -> list[Path]:
    if (path / RUN_FILE).is_file():
        return [path]  # its subfolders (stages, seeds) belong to it
    return [run for child in sorted(p for p in path.iterdir() if p.is_dir()) for run in _run_dirs(child)]


def _read_run(path: Path) -> Run | None:
    try:
        record = json.loads((path / RUN_FILE).read_text())
    except ValueError:
        raise UserError(f"{path / RUN_FILE} is not valid JSON; repair or remove the run") from None
    if record.get("command") not in TRAINING_COMMANDS:
        return None
    recipe = read_yaml((path / RECIPE_FILE).read_text()) if (path / RECIPE_FILE).is_file() else {}
    results = None
    if (path / RESULTS_FILE).is_file():
        frame = pd.read_csv(path / RESULTS_FILE)
        results = frame[frame["seed"].astype(str) != "mean"].copy()
        results["seed"] = results["seed"].astype(int)
    run = Run(path, record["command"], bool(record.get("smoke")), recipe or {}, results)
    for history in sorted(path.rglob(HISTORY_FILE)):
        relative = history.relative_to(path).parts  # [seed-<s>/]<stage>/history.csv
        seed = int(relative[0].removeprefix("seed-")) if relative[0].startswith("seed-") else record["seeds"][0]
        run.histories[(seed, relative[-2])] = history
    for name in ("evaluation.csv", "violations.csv"):
        run.extras[name] = sorted(path.rglob(name))
    return run


# -- the table ----------------------------------------------------------------------------------------------
def selected_top1(row: pd.Series) -> float:
    """The test top-1 a row reports: at the epoch chosen on val, or the best on test."""
    return row["test_top1_at_best"] if row["eval_split"] == "val" else row["best_top1"]


def last_test_top1(row: pd.Series) -> float:
    return row["test_top1_last"] if row["eval_split"] == "val" else row["last_top1"]


def per_seed_rows(runs: Sequence[Run]) -> pd.DataFrame:
    """Every finished (run, seed, stage, network) with its reported numbers and its run's recipe fields."""
    frames = []
    for run in runs:
        if not run.complete:
            continue
        frame = run.results.copy()
        frame["run"] = str(run.path)
        frame["top1"] = frame.apply(selected_top1, axis=1)
        frame["last_test_top1"] = frame.apply(last_test_top1, axis=1)
        frame["selection"] = frame["eval_split"].map({"val": "val"}).fillna("best-on-test")
        frame["method"] = run.recipe.get("method", {}).get("name", "")
        frame["paper_top1"] = run.recipe.get("paper_top1")
        frame["smoke"] = run.smoke
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def build_report(runs: Sequence[Run], group_by: Sequence[str] = ("recipe", "stage", "network")) -> pd.DataFrame:
    """One row per group (``group_by`` + config hash + smoke), then one per incomplete run."""
    unknown = [key for key in group_by if key not in GROUP_KEYS]
    if unknown:
        raise UserError(f"--group-by '{unknown[0]}' is not a column to group by; choose from {', '.join(GROUP_KEYS)}")
    seeds = per_seed_rows(runs)
    rows = []
    if not seeds.empty:
        keys = [*group_by, "config_hash", "smoke"]
        for values, group in seeds.groupby(keys, sort=False, dropna=False):
            rows.append(_summarise(dict(zip(keys, values, strict=True)), group, seeds))
    frame = pd.DataFrame(rows)
    if not frame.empty:
        hashes = frame.groupby("recipe")["config_hash"].transform("nunique")
        frame["note"] = [_join(note, f"{n} configs of this recipe, not averaged" if n > 1 else "")
                         for note, n in zip(frame["note"], hashes, strict=True)]
    incomplete = pd.DataFrame([_incomplete(run) for run in runs if not run.complete])
    return pd.concat([frame, incomplete], ignore_index=True).reindex(columns=list(COLUMNS))


def _summarise(key: dict, group: pd.DataFrame, seeds: pd.DataFrame) -> dict:
    first = group.iloc[0]
    same_runs = seeds[seeds["run"].isin(group["run"]) & (seeds["config_hash"] == key["config_hash"])]
    teacher = same_runs[same_runs["stage"] == "teacher"]["top1"]
    baseline = same_runs[(same_runs["stage"] == "baseline") & (same_runs["network"] == first["network"])]["top1"]
    top1, last = group["top1"].astype(float), group["last_test_top1"].astype(float)
    is_method = first["stage"] == first["method"] and first["network"] in ("student", "net1")  # what the paper reports
    paper = first["paper_top1"] if is_method and pd.notna(first["paper_top1"]) else None
    row = {**{column: _distinct(group[column]) for column in GROUP_KEYS}, "config_hash": key["config_hash"],
           "method": first["method"], "seeds": int(group[["run", "seed"]].drop_duplicates().shape[0]),
           "selection": first["selection"],
           "top1": top1.mean(), "top1_std": _std(top1), "last_top1": last.mean(), "last_top1_std": _std(last),
           "teacher_top1": teacher.mean() if first["stage"] != "teacher" and len(teacher) else None,
           "baseline_top1": baseline.mean() if first["stage"] not in ("teacher", "baseline") and len(baseline)
           else None,
           "paper_top1": paper, "seconds": group["stage_seconds"].mean(), "images_per_s": group["images_per_s"].mean(),
           "kdcli": _distinct(group["kdcli"]), "torch": _distinct(group["torch"]), "runs": group["run"].nunique(),
           "status": "smoke" if key["smoke"] else "complete", "note": ""}
    row["gain"] = row["top1"] - row["baseline_top1"] if row["baseline_top1"] is not None else None
    row["paper_delta"] = row["top1"] - paper if paper is not None else None
    return row


def _incomplete(run: Run) -> dict:
    recipe = run.recipe.get("name", run.path.name)
    epochs = run.recipe.get("train", {}).get("epochs")
    done = {stage: len(pd.read_csv(path)) for (_, stage), path in run.histories.items()}
    progress = ", ".join(f"{stage} {count}/{epochs} epochs" for stage, count in done.items()) or "no epoch finished"
    return {"recipe": recipe, "stage": "", "network": "", "seeds": 0, "runs": 1,
            "status": f"incomplete ({progress})", "note": f"{run.path}: no {RESULTS_FILE}; resume it with --resume"}


def _std(values: pd.Series) -> float | None:
    return float(values.std(ddof=1)) if len(values) > 1 else None


def _distinct(values: pd.Series) -> str:
    return " ".join(sorted({str(v) for v in values}))


def _join(*parts: str) -> str:
    return "; ".join(part for part in parts if part)


# -- writing ------------------------------------------------------------------------------------------------
COLUMNS = ("recipe", "stage", "network", "arch", "config_hash", "method", "seeds", "selection", "top1", "top1_std",
           "last_top1", "last_top1_std", "teacher_top1", "baseline_top1", "gain", "paper_top1", "paper_delta", "seconds",
           "images_per_s", "kdcli", "torch", "runs", "status", "note")
SHOWN = {"recipe": "recipe", "stage": "stage", "network": "network", "arch": "arch", "seeds": "seeds",
         "selection": "selection", "top1": "top-1 (%)", "last_top1": "last-epoch top-1 (%)",
         "teacher_top1": "teacher (%)", "baseline_top1": "baseline (%)", "gain": "gain", "paper_top1": "paper (%)",
         "paper_delta": "vs paper", "seconds": "time (s)", "images_per_s": "img/s", "config_hash": "config",
         "status": "status", "note": "note"}


def display_table(report: pd.DataFrame) -> pd.DataFrame:
    """The report as strings for reading: mean ± std with two decimals, blanks for what does not apply."""
    def number(value, digits: int = 2, sign: bool = False) -> str:
        if value is None or pd.isna(value):
            return ""
        return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"

    def spread(mean, std) -> str:
        return "" if mean is None or pd.isna(mean) else number(mean) + (f" ± {std:.2f}" if pd.notna(std) else "")

    report = report.reindex(columns=list(dict.fromkeys([*COLUMNS, *report.columns])))  # an all-incomplete report too
    shown = pd.DataFrame({
        "recipe": report["recipe"], "stage": report.get("stage"), "network": report.get("network"),
        "arch": report.get("arch"), "seeds": report["seeds"].astype("Int64").astype(str),
        "selection": report.get("selection"),
        "top1": [spread(m, s) for m, s in zip(report.get("top1"), report.get("top1_std"), strict=True)],
        "last_top1": [spread(m, s) for m, s in zip(report.get("last_top1"), report.get("last_top1_std"), strict=True)],
        "teacher_top1": report.get("teacher_top1").map(number), "baseline_top1": report.get("baseline_top1").map(number),
        "gain": report.get("gain").map(lambda v: number(v, sign=True)), "paper_top1": report.get("paper_top1").map(number),
        "paper_delta": report.get("paper_delta").map(lambda v: number(v, sign=True)),
        "seconds": report.get("seconds").map(lambda v: number(v, 0)),
        "images_per_s": report.get("images_per_s").map(lambda v: number(v, 0)),
        "config_hash": report.get("config_hash"), "status": report["status"], "note": report["note"]})
    return shown.fillna("").rename(columns=SHOWN)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "|".join(" --- " for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_report(report: pd.DataFrame, out: Path, formats: Sequence[str], curves: Sequence[Path] = (),
                 extras: dict[str, pd.DataFrame] | None = None) -> list[Path]:
    """``report.csv`` (every column, full precision), ``report.md`` (the readable table, ready to paste) and a
    self-contained ``report.html`` (the table, the extra tables, the curves inlined) as ``formats`` ask."""
    from kdcli.engine.io import atomic_write, write_csv

    written, table, extras = [], display_table(report), extras or {}
    if "csv" in formats:
        write_csv(out / "report.csv", report)
        written.append(out / "report.csv")
    if "md" in formats:
        text = to_markdown(table) + "".join(f"\n### {name}\n\n{to_markdown(frame)}" for name, frame in extras.items())
        with atomic_write(out / "report.md") as handle:
            handle.write(text)
        written.append(out / "report.md")
    if "html" in formats:
        with atomic_write(out / "report.html") as handle:
            handle.write(to_html(table, extras, curves))
        written.append(out / "report.html")
    return written


def extra_tables(runs: Sequence[Run]) -> dict[str, pd.DataFrame]:
    """``kdcli evaluate`` and ``measure-violations`` results found inside the runs, one table each."""
    tables = {}
    for name, title in (("evaluation.csv", "evaluations"), ("violations.csv", "label-order violations")):
        frames = [pd.read_csv(path).assign(run=str(run.path)) for run in runs for path in run.extras.get(name, [])]
        if frames:
            tables[title] = pd.concat(frames, ignore_index=True).round(4)
    return tables


def to_html(table: pd.DataFrame, extras: dict[str, pd.DataFrame], curves: Sequence[Path]) -> str:
    """One HTML file with no outside reference: the tables, and each curve as an inline PNG/SVG data URI."""
    import base64
    import html

    def frame_html(frame: pd.DataFrame) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                       for row in frame.itertuples(index=False))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    media = {".png": "image/png", ".svg": "image/svg+xml", ".pdf": None}
    images = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:{media[p.suffix]};base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in curves if media.get(p.suffix))
    sections = "".join(f"<h2>{html.escape(name)}</h2>{frame_html(frame)}" for name, frame in extras.items())
    style = ("body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
             "td:nth-child(-n+4){text-align:left}img{max-width:100%}figure{margin:1em 0}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>kdcli report</title><style>{style}</style>"
            f"</head><body><h1>kdcli report</h1><p>Accuracies in percent (test split); top-1 at the epoch chosen on "
            f"val, or the best test epoch where marked best-on-test; mean ± sample std over seeds; time in seconds."
            f"</p>{frame_html(table)}{sections}{'<h2>learning curves</h2>' + images if images else ''}</body></html>\n")


def stage_histories(run: Run) -> dict[str, dict[int, pd.DataFrame]]:
    """stage -> seed -> history table, for the curves."""
    stages: dict[str, dict[int, pd.DataFrame]] = {}
    for (seed, stage), path in sorted(run.histories.items()):
        stages.setdefault(stage, {})[seed] = pd.read_csv(path)
    return stages
