"""Report plots (seaborn, PNG). Every curve is keyed by its matrix entry label, never by model/preset, so two
rungs of one model are two lines."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .. import stats
from .load import Store


def _t_interval(values) -> tuple[float, float]:
    """The tables' 95% t-interval over seeds, for seaborn's errorbar (not its bootstrap, meaningless on 3 seeds)."""
    mean, half = stats.mean_ci(list(values))
    half = 0.0 if not math.isfinite(half) else half
    return mean - half, mean + half

LOSS_PLOT = "val_loss_vs_flops.png"
FRONTIER_PLOT = "frontier.png"
WATERFALL_PLOT = "waterfall.png"
GROWTH_PLOT = "growth_loss_vs_cumulative_flops.png"
SWEEP_PLOT = "lr_sweeps.png"


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid")
    return plt, sns


def loss_vs_flops(store: Store, path: Path) -> list[str]:
    """Validation loss against training FLOPs, one line per entry label (and line style per budget), mean and
    95% band over evaluation seeds. Returns the labels drawn (empty: no plot)."""
    curves = store.curves()
    if curves.empty:
        return []
    curves = curves[curves["phase"] == "main"].dropna(subset=["val_loss"])
    if curves.empty:
        return []
    plt, sns = pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    style = "budget" if curves["budget"].nunique() > 1 else None
    # markers: a short run has one or two validation points, which a bare line would not show
    sns.lineplot(data=curves, x="flops", y="val_loss", hue="label", style=style, errorbar=_t_interval, marker="o",
                 markersize=4, ax=ax)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss against training compute")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return sorted(curves["label"].unique())


def frontier(df: pd.DataFrame, path: Path) -> None:
    """Mean final validation loss per budget per entry label against training FLOPs."""
    plt, sns = pyplot()
    per = df.groupby(["budget_index", "label"], as_index=False).agg(val_loss=("val_loss", "mean"), flops=("flops", "mean"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(data=per, x="flops", y="val_loss", hue="label", marker="o", ax=ax)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final validation loss (mean over seeds)")
    ax.set_title("Final loss per budget (each model at one size)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def waterfall(df: pd.DataFrame, path: Path) -> None:
    plt, sns = pyplot()
    order = df.sort_values("entry_index")["label"].drop_duplicates().tolist()
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(order) + 1.8))
    sns.pointplot(data=df, y="label", x="val_loss", hue="matching", order=order, errorbar=_t_interval,
                  linestyle="none", dodge=0.3 if df["matching"].nunique() > 1 else False, ax=ax)
    ax.set_ylabel("")
    ax.set_xlabel("validation loss, whole split (mean, 95% t-interval over seeds)")
    ax.set_title("Transformer++ to Tokenformer, one component at a time", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def growth(curves: pd.DataFrame, path: Path) -> None:
    plt, sns = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    sns.lineplot(data=curves, x="cumulative_flops", y="val_loss", hue="label", errorbar=None, ax=ax)
    grown = curves.dropna(subset=["grown_at"])
    first = grown.sort_values("cumulative_flops").groupby(["label", "seed"]).head(1)
    ax.scatter(first["cumulative_flops"], first["val_loss"], marker="x", color="black", zorder=5, label="growth")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative training FLOPs (base runs included)")
    ax.set_ylabel("validation loss")
    ax.set_title("Growth against training from scratch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lr_sweeps(choice: dict, path: Path) -> bool:
    """Small multiples: one panel per entry, final validation loss against peak LR, one line per budget, the
    chosen rate marked."""
    rows, chosen = [], []
    for label, per_budget in choice.items():
        for key, pick in per_budget.items():
            for lr, p in (pick.get("curve") or {}).items():
                if math.isfinite(p["val_loss"]):
                    rows.append({"entry": label, "budget": pick.get("budget", key), "lr": float(lr),
                                 "val_loss": p["val_loss"]})
            if pick.get("lr") and pick.get("val_loss") is not None and pick.get("source") == "sweep":
                chosen.append({"entry": label, "lr": pick["lr"], "val_loss": pick["val_loss"]})
    if not rows:
        return False
    plt, sns = pyplot()
    df = pd.DataFrame(rows)
    n = df["entry"].nunique()
    g = sns.relplot(data=df, x="lr", y="val_loss", hue="budget", col="entry", col_wrap=min(4, n), kind="line",
                    marker="o", height=2.6, aspect=1.2, facet_kws={"sharey": False, "sharex": True})
    marks = pd.DataFrame(chosen)
    ticks = sorted(df["lr"].unique())
    for entry, ax in g.axes_dict.items():
        ax.set_xscale("log")
        ax.minorticks_off()  # the swept rates are the ticks; log minor labels would collide
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:.2g}" for t in ticks], rotation=45, fontsize=7)
        ax.set_title(entry, fontsize=8)
        m = marks[marks["entry"] == entry] if not marks.empty else marks
        if not m.empty:
            ax.scatter(m["lr"], m["val_loss"], marker="*", s=90, color="black", zorder=5)
    g.set_axis_labels("peak learning rate", "final val loss")
    g.figure.suptitle("Learning-rate sweeps (star: chosen rate)", y=1.02)
    g.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(g.figure)
    return True
