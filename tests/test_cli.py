"""The command line end to end on tiny settings (in-process calls of vidssl.cli.main)."""

import json

import numpy as np
import pytest

from vidssl.cli import main

# the demo recipe (configs/mast_demo.yaml) shrunk: MAST on the stride-4 encoder ended at layer2, bf16 autocast
# where the CPU computes bf16 natively
TINY = ["data.synth_videos=4", "data.synth_frames=6", "data.synth_size=[64, 64]", "data.crop_size=32",
        "data.clips_per_video=1", "train.batch_size=2", "train.steps=2", "train.log_every=1"]


def sets(items):
    out = []
    for s in items:
        out += ["--set", s]
    return out


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDSSL_CACHE", str(tmp_path / "cache"))


def test_pretrain_end_to_end_with_demo_evaluation(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--no-progress"] + sets(TINY)) == 0
    text = capsys.readouterr().out
    assert "trained 2 steps" in text
    final = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["loss"]
    assert f"final loss {final:.4f}" in text
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["steps"] == 2
    for label in ("trained", "random", "identity", "lab"):  # the printed table holds each scored run's J&F
        metrics = json.loads((out / "eval" / label / "metrics.json").read_text())
        assert f"{metrics['global']['J&F-Mean']:.4f}" in text, label
    ident = json.loads((out / "eval" / "identity" / "metrics.json").read_text())["global"]
    assert ident["J&F-Mean"] == pytest.approx((ident["J-Mean"] + ident["F-Mean"]) / 2, abs=1e-6)
    # the checkpoint alone rebuilds the model for propagate
    root = next((tmp_path / "cache").glob("synth-*"))
    assert main(["propagate", "--checkpoint", str(out), "--davis-root", str(root), "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 0
    m = json.loads((tmp_path / "p" / "metrics.json").read_text())
    # the demo's trunk ends at layer2 (model.out_layer): that stage is read and recorded, at stride 4
    assert config["model"]["out_layer"] == "layer2"
    assert m["extra_info"]["source"] == "checkpoint" and m["hyperparameters"]["layer"] == "layer2"
    assert (m["extractor"]["stride"], m["extractor"]["channels"]) == (4, 128)
    # the random-init row is the trained encoder's step-0 weights, fed the colour space MAST trains on (Lab)
    rand = json.loads((out / "eval" / "random" / "metrics.json").read_text())["extra_info"]
    assert rand["source"] == "random-init" and rand["colour"] == "lab" and rand["seed"] == config["train"]["seed"]
    # an existing results folder is never overwritten silently
    assert main(["propagate", "--encoder", "identity", "--davis-root", str(root), "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    # rerunning pretrain in the same folder resumes (nothing left to do) instead of starting over
    assert main(["pretrain", "--out", str(out), "--no-progress"] + sets(TINY + ["eval.enabled=false"])) == 0
    assert "trained 2 steps" in capsys.readouterr().out


def test_pretrain_bad_config_is_one_line(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--set", "objectives.0.name=simclr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "objectives.0.name: unknown objective 'simclr'" in err[0]
    assert not (tmp_path / "r").exists()
    assert main(["pretrain", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config not found" in capsys.readouterr().err


def test_pretrain_missing_data_folder(tmp_path, capsys):
    code = main(["pretrain", "--out", str(tmp_path / "r"), "--set", "data.source=frames",
                 "--set", f"data.root={tmp_path / 'missing'}"])
    assert code == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_print_config_and_help(capsys):
    assert main(["pretrain", "--print-config", "--set", "optim.lr=0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["lr"] == 0.5
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    from vidssl.config import describe
    from vidssl.engine.config import RunConfig
    from vidssl.engine.objectives import objective_class, objective_names

    for key, _, _ in describe(RunConfig):  # every config key and every objective's parameters are documented
        if not key.startswith(("objectives", "streams")):
            assert f"  {key} (" in text, key
    for name in objective_names():
        assert f"objective {name!r} parameters:" in text
        for key, _, _ in describe(objective_class(name).Params):
            assert f"  {key} (" in text, (name, key)
    assert "--resume PATH" in text and "--plugin MODULE" in text


def test_data_synth_and_evaluate_and_identity_propagation(tmp_path, capsys):
    root = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(root), "--videos", "2", "--val-videos", "2", "--frames", "5",
                 "--size", "48", "64"]) == 0
    assert (root / "ImageSets" / "2017" / "val.txt").read_text().split() == ["synth-val-0000", "synth-val-0001"]
    # ground truth scored against itself is perfect
    assert main(["evaluate", "--davis-root", str(root), "--results", str(root / "Annotations" / "480p")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("J&F-Mean"))
    header, values = lines[at:at + 2]  # the printed global table, official layout
    assert header.split() == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    assert values.split() == ["1.000", "1.000", "1.000", "0.000", "1.000", "1.000", "0.000"]
    rows = (root / "Annotations" / "480p" / "global_results-val.csv").read_text().splitlines()
    assert rows[0] == "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay"
    assert rows[1].startswith("1.000,1.000,1.000")
    assert main(["propagate", "--encoder", "identity", "--davis-root", str(root), "--out", str(tmp_path / "id"),
                 "--no-progress"]) == 0
    from vidssl.io import read_label_png
    ids, palette = read_label_png(tmp_path / "id" / "synth-val-0000" / "00004.png")
    first, _ = read_label_png(root / "Annotations" / "480p" / "synth-val-0000" / "00000.png")
    assert palette is not None and np.array_equal(ids, first)


def test_propagate_needs_a_source(tmp_path, capsys):
    assert main(["propagate", "--davis-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "feature source" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    import av
    import torch

    assert f"torch        {torch.__version__}" in out and f"av           {av.__version__}" in out
    from vidssl.io.video import available_backends

    assert f"video decoders: {', '.join(available_backends())}" in out
    assert ("cuda: not available" in out) == (not torch.cuda.is_available())
