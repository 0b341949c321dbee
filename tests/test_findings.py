"""Reading Figure 5 and Table 6 off sweep rows (blip2lab.worlds.shapes.findings): effect
sizes, spread and the paper's-sign count, on rows whose answers are known."""

import json

import pytest

from blip2lab.worlds.shapes import findings as F


def _fig5_rows():
    rows = []
    for seed, (w, wo) in enumerate([(0.6, 0.4), (0.5, 0.45), (0.3, 0.35)]):
        for stage1, last in ((True, w), (False, wo)):
            for step, value in ((10, 0.5), (20, last)):
                rows.append({"seed": seed, "llm": "opt", "stage1": stage1, "step": step, "vqa": value,
                             "caption_f1": value, "lm_loss": 1 - value})
    return rows


def test_figure5_effects_pair_seeds_and_count_the_papers_sign():
    eff = F.figure5_effects(_fig5_rows())
    vqa = eff["opt/vqa"]
    assert vqa["diff"][0] == pytest.approx((0.2 + 0.05 - 0.05) / 3)
    assert vqa["with"][0] == pytest.approx(1.4 / 3) and vqa["paper_sign"] == "2/3"
    assert eff["opt/lm_loss"]["paper_sign"] == "2/3"  # lower loss with stage 1 is the paper's sign
    assert F.figure5_effects(_fig5_rows(), step=10)["opt/vqa"]["paper_sign"] == "0/3"  # a tie is not a sign


def test_curve_and_forgetting():
    steps, mean, sd = F.curve(_fig5_rows(), "vqa", "opt", False)
    assert steps == [10, 20] and mean[0] == pytest.approx(0.5) and sd[0] == 0
    drop = F.forgetting(_fig5_rows(), "opt", False)  # without stage 1: 0.5 -> 0.4, 0.45, 0.35
    assert drop["seeds_falling"] == "3/3" and drop["last_minus_best"][0] == pytest.approx(-0.1)
    assert F.forgetting(_fig5_rows(), "opt", True)["seeds_falling"] == "1/3"


def test_table6_effects_usual_and_hard_gallery(tmp_path):
    rows = []
    for seed in range(3):
        for losses, r1 in (("ITC", 0.5), ("ITC+ITM", 0.6), ("ITC+ITM+ITG", 0.6 + 0.01 * (seed - 1))):
            rows.append({"losses": losses, "seed": seed, **{f"{g}{h}/{d}_r1": r1 for g in ("", "hard/")
                                                            for h in ("itc", "itm") for d in ("txt", "img")}})
    (tmp_path / "table6.json").write_text(json.dumps({"sweep": "table6", "rows": rows}))
    meta, back = F.read_rows(tmp_path / "table6.json")
    eff = F.table6_effects(back)
    assert meta == {"sweep": "table6"}
    itg = eff["ITC+ITM+ITG vs ITC+ITM, hard gallery, ITM"]
    assert itg["diff"][0] == pytest.approx(0.0, abs=1e-12) and itg["paper_sign"] == "1/3"
    assert eff["ITC+ITM vs ITC, usual gallery, ITC"]["paper_sign"] == "3/3"
    assert not any("vs ITC," in k and k.endswith("ITM") for k in eff)  # an ITC-only model's ITM head is untrained
