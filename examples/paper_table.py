"""The paper's Table 2 in miniature: ProLIP vs zero-shot and a linear probe over N shots.

Rows: zero-shot; ProLIP with λ = 1/N at lr ∈ {1e-5, 1e-4, 1e-3, 1e-2}; λ = 0 at the same rates;
a linear probe on the frozen image embeddings. Columns: N ∈ {1, 2, 4, 8, 16} shots per class.
Mean ± std over ``--draws`` few-shot draws, in-domain and under the task's shift.

For each shift and draw, the training views of the 16-shot draw are extracted once; the smaller
N use nested subsets of that draw, and every training in the grid reuses those features.

    python examples/paper_table.py --out-dir docs/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prolip import ProLIPAdapter, standin
from prolip.datasets import FASHION_MNIST_CLASSES, apply_shift, few_shot_indices, load_fashion_mnist

LRS = (1e-5, 1e-4, 1e-3, 1e-2)


def fit_and_score(
    adapter: ProLIPAdapter,
    x: torch.Tensor,
    y: list[int],
    test_features: torch.Tensor,
    test_labels: list[int],
    **params: float | str,
) -> float:
    """Fit ProLIP with ``params`` on training features and return the test accuracy."""
    adapter.set_params(**params).fit_features(x, y, class_names=FASHION_MNIST_CLASSES)
    return adapter.score_features(test_features, test_labels)


def linear_probe_accuracy(
    adapter: ProLIPAdapter,
    train: torch.Tensor,
    y: torch.Tensor,
    test: torch.Tensor,
    test_y: torch.Tensor,
    weight_decay: float = 1e-3,
) -> float:
    """Logistic regression (L-BFGS, L2 penalty) on L2-normalised frozen image embeddings of all views."""
    p = adapter.backbone.projector
    w0 = p.to_in_out(p.parameter).detach().float()
    bias = 0 if p.bias is None else p.bias.detach().float()

    def embed(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x @ w0 + bias, dim=-1)

    x = embed(train.reshape(-1, train.shape[-1]))
    targets = y.repeat(train.shape[0])
    weight = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    offset = torch.zeros(int(y.max()) + 1, requires_grad=True)
    opt = torch.optim.LBFGS([weight, offset], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + offset, targets) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((embed(test) @ weight + offset).argmax(1) == test_y).float().mean())


def run(args: argparse.Namespace) -> dict:
    """Fill the table: results[shift][row][N] = list of accuracies over draws."""
    train_x, train_y = load_fashion_mnist("train", root=args.data_root, download=args.download)
    test_x, test_y = load_fashion_mnist("test", root=args.data_root, download=args.download)
    if args.test_size:
        test_x, test_y = test_x[: args.test_size], test_y[: args.test_size]
    adapter = ProLIPAdapter(
        args.model,
        args.pretrained,
        templates=standin.TEMPLATES,
        views=args.views,
        epochs=args.epochs,
        device=args.device,
        verbose=False,
    )
    rows = [
        "zero-shot",
        *(f"ProLIP λ=1/N, lr={lr:g}" for lr in LRS),
        *(f"ProLIP λ=0, lr={lr:g}" for lr in LRS),
        "linear probe",
    ]
    results: dict = {}
    for shift in args.shifts:
        table = results.setdefault(shift, {row: {n: [] for n in args.shots} for row in rows})
        test_features = adapter.set_params(verbose=True).extract_features(list(apply_shift(test_x, shift)), views=0)
        test_labels = test_y.tolist()
        for draw in range(args.draws):
            started = time.perf_counter()
            order = few_shot_indices(train_y, max(args.shots), seed=1000 + draw).view(len(FASHION_MNIST_CLASSES), -1)  # [K, S], nested
            flat = order.flatten()
            adapter.set_params(random_state=draw, verbose=True)
            features = adapter.extract_features(list(apply_shift(train_x[flat], shift)))  # [V, K*S, d]
            adapter.set_params(verbose=False)
            features = features.view(features.shape[0], *order.shape, -1)
            for n in args.shots:
                x = features[:, :, :n].reshape(features.shape[0], -1, features.shape[-1])
                y = train_y[order[:, :n].flatten()].tolist()

                data = (adapter, x, y, test_features, test_labels)
                table["zero-shot"][n].append(fit_and_score(*data, epochs=0))
                for lr in LRS:
                    table[f"ProLIP λ=1/N, lr={lr:g}"][n].append(
                        fit_and_score(*data, epochs=args.epochs, lr=lr, reg_lambda="auto")
                    )
                    table[f"ProLIP λ=0, lr={lr:g}"][n].append(
                        fit_and_score(*data, epochs=args.epochs, lr=lr, reg_lambda=0.0)
                    )
                table["linear probe"][n].append(
                    linear_probe_accuracy(adapter, x, torch.tensor(y), test_features[0], test_y)
                )
            print(f"[{shift}] draw {draw + 1}/{args.draws} done in {time.perf_counter() - started:.0f} s", flush=True)
    return results


def markdown(results: dict, shots: list[int]) -> str:
    """One markdown table per shift: mean ± std accuracy (%) over draws."""
    out = []
    for shift, table in results.items():
        out += [f"**{'in-domain' if shift == 'none' else f'shifted ({shift})'}** — accuracy % (mean ± std)", ""]
        out += ["| method | " + " | ".join(f"N={n}" for n in shots) + " |", "|---" * (len(shots) + 1) + "|"]
        for row, cols in table.items():
            cells = [f"{100 * np.mean(cols[n]):.2f} ± {100 * np.std(cols[n]):.2f}" for n in shots]
            out.append(f"| {row} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(results: dict, shots: list[int], path: Path) -> None:
    """Accuracy against N, one panel per shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    for ax, (shift, table) in zip(axes[0], results.items(), strict=True):
        for row, cols in table.items():
            mean = np.array([np.mean(cols[n]) for n in shots]) * 100
            std = np.array([np.std(cols[n]) for n in shots]) * 100
            style = "--" if "λ=0" in row else ("-" if "1/N" in row else ":")
            ax.errorbar(shots, mean, yerr=std, label=row, linestyle=style, marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(n) for n in shots])
        ax.set_xlabel("shots per class (N)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("in-domain" if shift == "none" else f"shifted: {shift}")
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    """Parse options, run the grid, write table.md, plot.png and results.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=standin.MODEL_NAME)
    parser.add_argument("--pretrained", default=standin.PRETRAINED_TAG)
    parser.add_argument("--shifts", nargs="+", default=["none", "upside_down"])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--views", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--test-size", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/results"))
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="re-render from an earlier results.json")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.from_json:  # re-render the table and plot of an earlier run
        results = {
            shift: {row: {int(n): accs for n, accs in cols.items()} for row, cols in table.items()}
            for shift, table in json.loads(args.from_json.read_text()).items()
        }
    else:
        results = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    table = markdown(results, args.shots)
    (args.out_dir / "table.md").write_text(table, encoding="utf-8")
    plot(results, args.shots, args.out_dir / "plot.png")
    print(table)
    print(f"wrote {args.out_dir}/table.md, plot.png, results.json in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
