"""What a bench run shows: table.md, plot.png and heatmap.png rendered from tiny fake cells (they name what was run,
follow the run's order of names whatever order the cells came in, give each method its own style, draw a panel per
dataset and the average, and a sensitivity run's lr × λ grid as a heat map), and the run's one progress line."""

from __future__ import annotations

import logging
import random
import zlib

import matplotlib.figure
import numpy as np
import pytest

from prolip import standin
from prolip.bench import runner
from prolip.bench.config import BenchConfig
from prolip.bench.results import RunResults, lr_lambda_grids, render_heatmap, render_plot, render_table
from prolip.bench.store import FeatureStore

CONFIG = {
    "setting": "few-shot", "model": "ViT-Q-9", "pretrained": "weights-q", "source": None, "views": 7, "epochs": 11,
    "templates": None, "precision": "fp32", "data_root": "/data/of/this/run",
}  # fmt: skip
PAPER_METHODS = [
    "zero-shot", "prolip", "prolip-val", "linear-probe", "lp++", "clap", "tip-adapter", "tip-adapter-f",
    "clip-adapter", "taskres", "rla", "prolip-text", "prolip+tip-adapter", "prolip+taskres",
]  # fmt: skip


def accuracy(method: str, dataset: str, shots: int, seed: int) -> float:
    """A distinct, reproducible accuracy per cell (a multiple of 1/1000)."""
    return (100 + 37 * (zlib.crc32(f"{method}/{dataset}".encode()) % 17) + 11 * shots + 3 * seed) / 1000


def few_shot(methods, datasets=("eurosat", "dtd"), shots=(2, 8), seeds=(4,), info=None):
    return [
        {"dataset": d, "shots": n, "seed": s, "method": m, "accuracy": {d: accuracy(m, d, n, s)}, "fit_seconds": 0.5,
         "info": (info or {}).get(m, {})}
        for m in methods for d in datasets for n in shots for s in seeds
    ]  # fmt: skip


def shuffled(cells, seed):
    cells = list(cells)
    random.Random(seed).shuffle(cells)
    return cells


@pytest.fixture
def figures(monkeypatch):
    """The figures the renderers save, kept for inspection after they are written."""
    saved = []
    original = matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return saved


def header(table: str) -> str:
    return table.split("Hyperparameters the cells trained with")[0]


# ---------------------------------------------------------------------------------------------------- table.md
def test_the_table_names_what_was_run_not_the_settings_defaults():
    methods = ["zero-shot", "prolip:lr=1e-2"]
    table = render_table(RunResults(CONFIG, few_shot(methods), methods, ["eurosat", "dtd"]))
    top = header(table)
    for shown in ("`ViT-Q-9`", "`weights-q`", "7 augmented views", "11 steps", "`/data/of/this/run`",
                  "**N**: 2, 8", "**seeds**: 4", "(2): eurosat, dtd", "(2): zero-shot, prolip:lr=1e-2", "**cells**: 8"):  # fmt: skip
        assert shown in top, shown
    assert "1, 2, 4, 8, 16" not in table and "seeds 1, 2, 3" not in table  # the few-shot setting's defaults
    assert "missing" not in top
    partial = render_table(RunResults(CONFIG, few_shot(methods)[:-1], methods))
    assert "**cells**: 7; 1 of the 8 dataset × N × seed × method missing" in partial


def test_one_seed_shows_the_mean_alone_and_several_seeds_mean_and_std():
    one = render_table(RunResults(CONFIG, few_shot(["zero-shot"], datasets=["dtd"], shots=[2]), ["zero-shot"]))
    assert "±" not in one and "(accuracy %, seed 4)" in one
    assert f"| zero-shot | {100 * accuracy('zero-shot', 'dtd', 2, 4):.2f} |" in one
    two = render_table(RunResults(CONFIG, few_shot(["zero-shot"], datasets=["dtd"], shots=[2], seeds=[1, 2])))
    values = [100 * accuracy("zero-shot", "dtd", 2, s) for s in (1, 2)]
    assert f"| zero-shot | {np.mean(values):.2f} ± {np.std(values):.2f} |" in two


def test_rows_and_columns_follow_the_run_order_whatever_order_the_cells_came_in():
    methods = ["zero-shot", "prolip-val", "prolip", "linear-probe"]  # neither sorted nor the cells' first order
    cells = few_shot(sorted(methods), datasets=["dtd", "eurosat"])
    tables = {render_table(RunResults(CONFIG, shuffled(cells, seed), methods, ["eurosat", "dtd"])) for seed in range(5)}
    (table,) = tables  # the same table from every order of the cells
    rows = [line.split(" | ")[0][2:] for line in table.split("**N = 2**")[1].split("\n\n")[1].splitlines()[2:]]
    assert rows == methods
    assert "| method | eurosat | dtd | average |" in table
    # A method of another run sharing results.json follows the run's own, and so does a dataset it lacks.
    extra = render_table(RunResults(CONFIG, [*cells, *few_shot(["clap"], datasets=["ucf101"])], methods, ["eurosat"]))
    assert "| method | eurosat | dtd | ucf101 | average |" in extra
    assert extra.index("| linear-probe |") < extra.index("| clap |")


# ---------------------------------------------------------------------------------------------------- plot.png
def _lines(ax):
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_the_plot_draws_a_panel_per_dataset_and_the_average_and_each_method_in_its_own_style(tmp_path, figures):
    datasets = ["eurosat", "dtd", "ucf101"]
    cells = few_shot(PAPER_METHODS, datasets=datasets, shots=(1, 2, 4), seeds=(1, 2))
    assert render_plot(RunResults(CONFIG, shuffled(cells, 0), PAPER_METHODS, datasets), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
    (fig,) = figures
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [*datasets, "average"]
    for ax in panels:
        lines = _lines(ax)
        assert [line.get_label() for line in lines] == PAPER_METHODS
        assert len({line.get_color() for line in lines}) == len(PAPER_METHODS)  # 14 colours
        assert len({(line.get_color(), line.get_linestyle(), line.get_marker()) for line in lines}) == len(lines)
    styles = [[(line.get_color(), line.get_linestyle(), line.get_marker()) for line in _lines(ax)] for ax in panels]
    assert all(s == styles[0] for s in styles)  # a method looks the same in every panel
    prolip = _lines(panels[-1])[PAPER_METHODS.index("prolip")]
    expected = [100 * np.mean([accuracy("prolip", d, n, s) for d in datasets for s in (1, 2)]) for n in (1, 2, 4)]
    assert list(prolip.get_xdata()) == [1, 2, 4] and np.allclose(prolip.get_ydata(), expected)
    assert [text.get_text() for text in fig.legends[0].get_texts()] == PAPER_METHODS
    title = fig.get_suptitle()
    assert "ViT-Q-9 (weights-q)" in title and "seeds 1, 2" in title and "/data/of/this/run" in title


def test_the_plot_keeps_each_methods_style_whatever_order_the_cells_came_in(tmp_path, figures):
    methods = ["prolip", "zero-shot", "rla"]
    for seed in (0, 1):
        render_plot(RunResults(CONFIG, shuffled(few_shot(methods), seed), methods), tmp_path / f"{seed}.png")
    looks = [
        [(line.get_label(), line.get_color(), line.get_linestyle()) for line in _lines(f.axes[-1])] for f in figures
    ]
    assert looks[0] == looks[1] and [label for label, _, _ in looks[0]] == methods


def test_base_to_new_bars_base_new_and_harmonic_mean_per_dataset_and_the_average(tmp_path, figures):
    methods = ["zero-shot", "prolip", "linear-probe"]
    cells = [
        {"dataset": d, "shots": 16, "seed": 1, "method": m, "accuracy": {"base": 0.8, "new": None if m == "linear-probe"
         else 0.6}, "fit_seconds": 0.1, "info": {}}
        for m in methods for d in ("dtd", "eurosat")
    ]  # fmt: skip
    assert render_plot(RunResults({**CONFIG, "setting": "base-to-new"}, cells, methods), tmp_path / "plot.png")
    (fig,) = figures
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["dtd", "eurosat", "average"]
    average = panels[-1]
    assert [t.get_text() for t in average.get_xticklabels()] == ["base", "new", "HM"]
    bars = average.containers
    assert [b.get_label() for b in bars] == methods
    assert len({(b.patches[0].get_facecolor(), b.patches[0].get_hatch()) for b in bars}) == len(methods)
    heights = [p.get_height() for p in bars[1].patches]
    assert np.allclose(heights, [80, 60, 100 * 2 * 0.8 * 0.6 / 1.4])


# ---------------------------------------------------------------------------------------------------- heatmap.png
def _sensitivity_cells(shots=(1, 4)):
    specs = {
        "prolip:lr=1e-5": (1e-5, None), "prolip:lr=1e-3": (1e-3, None),
        "prolip:lr=1e-5,reg_lambda=0": (1e-5, 0.0), "prolip:lr=1e-3,reg_lambda=0": (1e-3, 0.0),
    }  # fmt: skip
    cells = few_shot(["zero-shot"], shots=shots, seeds=(1, 2))
    for m, (lr, reg_lambda) in specs.items():
        for c in few_shot([m], shots=shots, seeds=(1, 2)):
            c["info"] = {"lr": lr, "reg_lambda": 1 / c["shots"] if reg_lambda is None else reg_lambda}
            cells.append(c)
    return ["zero-shot", *specs], cells


def test_a_sensitivity_run_draws_its_lr_lambda_grid_as_a_heat_map(tmp_path, figures):
    methods, cells = _sensitivity_cells()
    run = RunResults(CONFIG, shuffled(cells, 0), methods)
    assert lr_lambda_grids(run) == {
        "prolip": {
            (1e-5, "1/N"): methods[1],
            (1e-3, "1/N"): methods[2],
            (1e-5, "0"): methods[3],
            (1e-3, "0"): methods[4],
        }
    }
    assert render_heatmap(run, tmp_path / "heatmap.png") and (tmp_path / "heatmap.png").stat().st_size > 0
    (fig,) = figures
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in panels] == [
        f"N = {n} (zero-shot {100 * np.mean([accuracy('zero-shot', d, n, s) for d in ('eurosat', 'dtd') for s in (1, 2)]):.2f})"
        for n in (1, 4)
    ]
    ax = panels[1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1e-05", "0.001"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["λ = 1/N", "λ = 0"]
    assert ax.get_images()[0].get_array().shape == (2, 2)
    mean = {m: 100 * np.mean([accuracy(m, d, 4, s) for d in ("eurosat", "dtd") for s in (1, 2)]) for m in methods}
    # Rows λ = 1/N then 0, columns lr ascending: each square names its method's average accuracy at N = 4.
    assert [t.get_text() for t in ax.texts] == [
        f"{mean[m]:.2f}" for m in (methods[1], methods[2], methods[3], methods[4])
    ]
    assert "λ × learning rate" in fig.get_suptitle() and "ViT-Q-9 (weights-q)" in fig.get_suptitle()


def test_a_run_without_an_lr_lambda_grid_draws_no_heat_map(tmp_path):
    methods = ["zero-shot", "prolip", "prolip:lr=1e-5", "prolip:train_dtype=fp16", "prolip:lr=1e-5,train_dtype=fp16"]
    info = {m: {"lr": 1e-5 if "lr=" in m else 1e-3, "reg_lambda": 0.5} for m in methods[1:]}
    run = RunResults(CONFIG, few_shot(methods, shots=[2], info=info), methods)
    assert lr_lambda_grids(run) == {} and not render_heatmap(run, tmp_path / "heatmap.png")
    assert not (tmp_path / "heatmap.png").exists()


# ---------------------------------------------------------------------------------------------------- progress
class _Bar:
    """Stands in for the tqdm bar: what the run counted."""

    def __init__(self, **kwargs):
        self.kwargs, self.updates, self.closed = kwargs, 0, False

    def update(self, n=1):
        self.updates += n

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        self.closed = True


@pytest.mark.usefixtures("one_thread")
def test_one_progress_line_counts_every_cell_and_a_resume_says_how_many_were_done(
    mini_suite, tmp_path, monkeypatch, caplog
):
    mini_suite.make_suite(tmp_path / "suite", seed=0, train=4, val=3, test=3)
    bars = []
    monkeypatch.setattr(runner, "progress", lambda **kwargs: bars.append(_Bar(**kwargs)) or bars[-1])
    caplog.set_level(logging.INFO, logger="prolip.bench.runner")

    def bench(methods):
        args = {"data_root": tmp_path / "suite", "out_dir": tmp_path / "out", "model": standin.MODEL_NAME}
        args.update(pretrained=standin.PRETRAINED_TAG, templates=standin.TEMPLATES, datasets=["eurosat"], shots=[1])
        return runner.run_bench(BenchConfig("few-shot", **args, methods=methods, views=2, epochs=3, seeds=[1]))

    bench(["zero-shot"])
    assert [(b.kwargs["total"], b.kwargs["initial"], b.updates, b.closed) for b in bars] == [(1, 0, 1, True)]
    assert "resuming" not in caplog.text
    bench(["zero-shot", "prolip"])
    assert [(b.kwargs["total"], b.kwargs["initial"], b.updates) for b in bars[1:]] == [(2, 1, 1)]
    assert caplog.text.count("resuming: 1 of 2 cells already in") == 1
    # Nothing left to run: no feature is read, and table.md and plot.png are rendered again.
    monkeypatch.setattr(FeatureStore, "features", lambda *a, **k: pytest.fail("features read with every cell done"))
    (tmp_path / "out" / "table.md").unlink()
    bench(["prolip", "zero-shot"])
    assert "resuming: 2 of 2 cells" in caplog.text
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.index("| prolip |") < table.index("| zero-shot |")  # this run's --methods order
