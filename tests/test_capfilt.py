"""`blip2lab capfilt`: synthetic captions plus the originals, kept by the ITM threshold, written
as a caption file the train command reads; the counts add up."""

import train_data as D

from blip2lab.cli import main
from blip2lab.training.capfilt import CapFiltConfig, capfilt
from blip2lab.training.data_sources import DataConfig, read_records


def test_capfilt_counts_and_writes_a_caption_file(tmp_path):
    rows = D.write_images(tmp_path / "images", D.scenes(4))
    rows[1]["caption"] = rows[0]["caption"]  # a wrong caption: another scene's
    D.write_csv(tmp_path / "images" / "captions.csv", rows)
    data = str(tmp_path / "images" / "captions.csv")
    keep_all = capfilt("shapes-stage1", data, tmp_path / "all.jsonl", cfg=CapFiltConfig(samples=1, threshold=0.0),
                       log=lambda _: None)
    assert keep_all["originals_kept"] == 4 and keep_all["dropped"] == 0
    assert keep_all["kept"] == 4 + keep_all["added"] == 4 + keep_all["synthetic"]
    strict = capfilt("shapes-stage1", data, tmp_path / "kept.json", cfg=CapFiltConfig(samples=1, threshold=0.9),
                     log=lambda _: None)
    assert strict["kept"] == strict["originals_kept"] + strict["added"] <= keep_all["kept"]
    records, _ = read_records(DataConfig(path=str(tmp_path / "kept.json"), images=str(tmp_path / "images")))
    assert len(records) == strict["kept"]
    assert main(["capfilt", "--model", "shapes-stage1", "--data", data, "--out", str(tmp_path / "c.csv"),
                 "--samples", "1"]) == 0
