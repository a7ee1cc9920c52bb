"""benchmarks/oracle_logits.py: a logit store of the true classes, Reduced MPL's oracle teacher."""
import runpy
from pathlib import Path

import pytest
import torch

from mpl_fast.data.logit_store import LogitStore, store_path
from mpl_fast.train import config as cfg
from mpl_fast.train.loop import Run, train
from mpl_fast.train.run_log import read_jsonl

SCRIPT = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "oracle_logits.py"))
oracle_batches, main = SCRIPT["oracle_batches"], SCRIPT["main"]


def test_oracle_batches_put_the_margin_on_each_true_class_in_order():
    labels = torch.tensor([3, 0, 4, 4, 1, 2, 0], dtype=torch.int64)
    parts = list(oracle_batches(labels, 5, 7.5, rows=3))
    assert [len(p) for p in parts] == [3, 3, 1]
    z = torch.cat(parts)
    assert torch.equal(z.argmax(dim=1), labels)
    assert torch.equal(z.sum(dim=1), torch.full((7,), 7.5)) and z.min() == 0


def test_the_store_makes_reduced_mpl_s_pseudo_labels_the_true_classes(tmp_path, capsys):
    out = tmp_path / "oracle"
    assert main(["--out", str(out), "--margin", "12"]) == 0
    assert "1258 training and 539 test images of 10 classes" in capsys.readouterr().out
    data = Run(cfg.load("digits", ["method=supervised"]), tmp_path).data
    for split in ("train", "test"):
        store = LogitStore(store_path(out, split))
        z = store[torch.arange(store.rows)].float()
        assert torch.equal(z.argmax(dim=1), data.labels(split))
        assert float(z.max()) == 12.0
        assert store.meta["fingerprint"] == data.fingerprint(split)
    assert main(["--out", str(out), "--overwrite"]) == 0  # the default margin, 20
    assert float(LogitStore(store_path(out, "train"))[torch.arange(3)].max()) == 20.0
    # the teacher without a loss stays the store (with its labeled loss it would learn to spread
    # probability over the other classes): sampled at temperature 1 from margin 20 over 10
    # classes, a label is wrong with probability 2e-8
    sets = ["model.teacher=reduced", f"model.teacher_logits={out}", "mpl.mpl_weight=0",
            "mpl.uda_weight=0", "mpl.teacher_supervised_weight=0", "train.steps=20",
            "train.log_every=1", "train.finetune_steps=0", "data.batch_size=8", "data.mu=2"]
    train(cfg.load("digits", sets), tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["pseudo/accuracy"] for r in rows] == [1.0] * 20
    assert rows[-1]["eval/teacher_top1"] == 1.0


def test_bad_input_stops_in_one_line_and_leaves_what_was_there(tmp_path, capsys):
    out = tmp_path / "oracle"
    assert main(["--out", str(out)]) == 0
    before = store_path(out, "train").read_bytes()
    capsys.readouterr()
    assert main(["--out", str(out), "--margin", "3"]) == 2  # stores there: --overwrite replaces
    err = capsys.readouterr().err
    assert "already holds teacher logits" in err and err.count("\n") == 1, err
    assert store_path(out, "train").read_bytes() == before
    assert main(["--out", str(out), "--margin", "3", "--overwrite"]) == 0
    assert store_path(out, "train").read_bytes() != before
    fresh = tmp_path / "fresh"
    capsys.readouterr()
    assert main(["--out", str(fresh), "--set", "data.mu=zero"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oracle_logits: ") and err.count("\n") == 1, err
    assert not fresh.exists()  # nothing half-written, no empty folder
    blocker = tmp_path / "a_file"
    blocker.write_text("x\n")
    assert main(["--out", str(blocker)]) == 2
    assert "is a file" in capsys.readouterr().err and blocker.read_text() == "x\n"
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(fresh), "--margin", "0"])
    assert stop.value.code == 2
