"""The growth-cost table from hand-made records whose answers are computed by hand: the common target loss,
the interpolated FLOPs at which each chain (base run included) reaches it, the per-seed saving against scratch
with its bootstrap interval, and the labels of the three Tokenformer growth variants."""
import json

import pytest

from harness import store
from harness.report import write_report
from harness.results import growth

BIG = {"qkv_tokens": 96, "proj_tokens": 96, "ffn_hidden": 384}
ARM_3E9 = {0: 2.5, 1: 2.4, 2: 2.2}  # the grown arm's loss at 3e9 FLOPs, per seed


def _cell(root, label, seed, curve, entry_index, **fields):
    cell_id = f"{label.replace(' ', '_')}-seed{seed}"
    d = store.cell_dir(root, "g", cell_id)
    store.write_record(d, {"matrix": "g", "cell_id": cell_id, "label": label, "model": "tokenformer",
                           "preset": "tiny", "phase": "main", "status": "complete", "seed": seed,
                           "entry_index": entry_index, "val_loss": curve[-1][1], "val_bpb": curve[-1][1] / 0.69,
                           "cumulative_flops": curve[-1][0], "flops": curve[-1][0], "budget_label": "x",
                           "git_revision": "0123456789abcdef0123" + ("-dirty" if seed == 2 else ""),
                           "versions": {"torch": "2.13.0+cpu"}, "matrix_source": "/x/harness/matrices/g.yaml",
                           "environment": {"cpu_count": 2, "torch_threads": 1, "platform": "Linux", "python": "3.11"},
                           **fields})
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "cumulative_flops": f, "val_loss": v}) + "\n"
                                             for i, (f, v) in enumerate(curve)))


@pytest.fixture
def root(tmp_path):
    for s in (0, 1, 2):
        _cell(tmp_path, "base", s, [(1e9, 4.0), (2e9, 3.0)], 0, config={"model_overrides": {}})
        # grown at 2e9: its first point is the loss just after growth, then it trains on
        _cell(tmp_path, "exact", s, [(2e9, 3.0), (3e9, ARM_3E9[s]), (4e9, 2.0)], 1,
              config={"model_overrides": BIG}, grow={"from": "base", "method": "tokens", "init": "preserving",
                                                      "optimizer": "fresh", "schedule": "restart"})
        _cell(tmp_path, "scratch", s, [(1e9, 4.5), (2e9, 3.5), (3e9, 2.8), (4e9, 2.2 + 0.01 * s)], 2,
              config={"model_overrides": BIG}, reference="scratch", flops_of="exact")
        _cell(tmp_path, "no growth", s, [(2e9, 3.2), (4e9, 2.6)], 3, config={"model_overrides": {}},
              reference="no_growth", flops_of="exact")
    return tmp_path


def test_flops_to_interpolates_the_first_crossing():
    curve = [(1e9, 4.0), (2e9, 3.0), (3e9, 2.5), (4e9, 2.7), (5e9, 2.0)]
    assert growth.flops_to(curve, 2.6) == pytest.approx(2e9 + 0.4 / 0.5 * 1e9)  # the first crossing only
    assert growth.flops_to(curve, 5.0) == 1e9 and growth.flops_to(curve, 1.0) is None


def test_growth_table_target_flops_saving_and_bootstrap(root):
    text = write_report(root / "g").read_text()
    # target: the worst of every compared run's best point = no growth's 2.6 (the base is not compared)
    assert "target loss 2.6000" in text
    row = next(line for line in text.splitlines() if line.startswith("| exact "))
    header = next(line for line in text.splitlines() if line.startswith("| entry "))
    cols = dict(zip([h.strip() for h in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert cols["variant"] == "exact (zero keys, √n held); fresh AdamW, schedule restarted"
    # per seed: the chain crosses 2.6 between (2e9, 3.0) and (3e9, l): 2e9 + 0.4 / (3 - l) x 1e9; scratch between
    # (3e9, 2.8) and (4e9, 2.2 + 0.01 s): 3e9 + 0.2 / (0.6 - 0.01 s) x 1e9
    arm = {s: 2e9 + 0.4 / (3.0 - ARM_3E9[s]) * 1e9 for s in (0, 1, 2)}
    ref = {s: 3e9 + 0.2 / (0.6 - 0.01 * s) * 1e9 for s in (0, 1, 2)}
    savings = [1 - arm[s] / ref[s] for s in (0, 1, 2)]
    mean = sum(savings) / 3
    # a percentile bootstrap of 3 values: the 2.5% and 97.5% quantiles are the smallest and largest saving
    # (each all-same resample has probability 1/27 > 2.5%)
    assert cols["saving vs scratch [95% CI]"] == f"{mean:+.1%} [{min(savings):+.1%}, {max(savings):+.1%}]"
    assert cols["FLOPs to target"] == f"{sum(arm.values()) / 3 / 1e9:.3g}G"
    assert cols["Δ vs scratch [95% CI]"].startswith("-0.2") and cols["Δ vs no growth [95% CI]"].startswith("-0.6")
    # the references: scratch is the reference of its column, no growth is compared with scratch
    assert any(line.startswith("| scratch ") and "scratch at the target size" in line for line in text.splitlines())
    assert "no growth: the base size for the whole budget" in text
    assert "savings" not in header and "total FLOPs" not in header  # constant by construction: not columns
    # provenance: the revisions that trained the records (8 clean, 4 dirty), libraries, hardware, the command
    assert "- Records trained at revision: 0123456789ab (8); 0123456789ab-dirty (4)." in text
    assert "- Libraries: torch 2.13.0+cpu; Python 3.11." in text and "CPU x1, 2 cores, 1 torch threads" in text
    assert f"`harness run g --out {root}`" in text


@pytest.mark.parametrize("init, name", [("zero", "paper (zero keys, √n changes)"),
                                        ("random", "official (random tokens)"),
                                        ("preserving", "exact (zero keys, √n held)")])
def test_the_three_token_growth_variants_are_named_as_the_papers_do(init, name, root):
    from harness.results.load import load
    run = next(r for r in load(root / "g").runs if r.label == "exact")
    carried = run.__class__(**{**run.__dict__, "grow": {**run.grow, "init": init, "optimizer": "carry",
                                                         "schedule": "continue"}})
    assert growth.variant(carried) == f"{name}; Adam state carried, one schedule"


def test_html_report_is_one_self_contained_page(root):
    """report.html holds every table of report.md and every plot as an embedded PNG, and refers to no other
    file (checked by parsing it; no browser on the test machines to take a screenshot)."""
    import base64
    from html.parser import HTMLParser

    from harness.results.html import write_html
    md = write_report(root / "g")
    tables_md = sum(1 for a, b in zip(md.read_text().splitlines(), md.read_text().splitlines()[1:])
                    if a.startswith("|") and b.startswith("|") and set(b.replace("|", "").strip()) <= set("-: "))
    images_md = md.read_text().count("![")

    class Page(HTMLParser):
        tables, images, external = 0, [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            self.tables += tag == "table"
            if tag == "img":
                self.images.append(a["src"])
            for key in ("src", "href"):
                if a.get(key) and not a[key].startswith(("data:", "#")):
                    self.external.append(a[key])
    page = Page()
    page.feed(write_html(md).read_text())
    assert page.tables == tables_md > 0 and len(page.images) == images_md > 0 and page.external == []
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_frontier_value_heads_the_table_and_each_row_is_compared_with_it(root, monkeypatch):
    # L*(C) = 2 + 1e9 / C: at the table's total compute (every arm ends at 4e9) 2.25, marked extrapolated
    # because the frontier's budgets stop at 3e9; exact's final losses 2.0 → Δ -0.25; no growth 2.6 → +0.35
    fit = {"E": 2.0, "A": 1e9, "alpha": 1.0}
    monkeypatch.setattr(growth, "_frontier_fits", lambda store, runs: (
        {"name": "f", "fits": {"tokenformer": fit}, "range": (1e9, 3e9)}, ""))
    text = write_report(root / "g").read_text()
    assert "target loss 2.6000, frontier L*(C) 2.2500 (extrapolated)" in text
    header = next(line for line in text.splitlines() if line.startswith("| entry "))
    names = [h.strip() for h in header.strip("|").split("|")]
    assert "frontier L*(C)" not in names  # one value per table: the heading says it

    def col(entry):
        row = next(line for line in text.splitlines() if line.startswith(f"| {entry} "))
        return dict(zip(names, [c.strip() for c in row.strip("|").split("|")]))["Δ vs frontier"]
    assert float(col("exact")) == pytest.approx(-0.25) and float(col("no growth")) == pytest.approx(0.35)
