"""tools/learning_evidence.py end to end on tiny settings, its input checks, and the CPU recipes' measured headers.

The end-to-end test trains every CPU recipe of the correspondence learners for 2 steps, propagates the first frames
of one held-out real sequence at a small size under two protocols, and checks that the JSON has one row per learner,
protocol and feature source, that each row's numbers are the ones in its metrics.json, and that a second call reuses
the runs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from vidssl.config import ConfigError, to_dict
from vidssl.engine import resolve_run_config

ROOT = Path(__file__).resolve().parents[1]
#: The CPU recipes whose headers state what was measured.
CPU_RECIPES = ("crw_sample", "timecycle_sample", "corrflow_sample", "mast_sample")
#: Held-out sequence and size of the tiny end-to-end run (the shortest sample sequence, 25 frames), and the
#: cheaper contexts it propagates with (plumbing, not scores, is under test).
TINY_SEQUENCE = "dog-agility"
TINY_SHORT_SIDE = 32
#: Frames of that sequence the tiny runs propagate and score (its first ones, symlinked into a tmp DAVIS root; the
#: evaluator needs 3 annotated frames): each of the ~18 propagations reads and scores every frame at 480p.
TINY_FRAMES = 4
TINY_CONTEXT = ["crw:propagate.context=2", "mast:propagate.window.memory=previous"]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("learning_evidence", ROOT / "tools" / "learning_evidence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_davis(davis_sample, tmp_path_factory) -> Path:
    """A DAVIS-2016 root holding the first :data:`TINY_FRAMES` frames and masks of :data:`TINY_SEQUENCE`, symlinked
    from the real sample (never copied)."""
    root = tmp_path_factory.mktemp("tiny_davis")
    for kind, ext in (("JPEGImages", "jpg"), ("Annotations", "png")):
        folder = root / kind / "480p" / TINY_SEQUENCE
        folder.mkdir(parents=True)
        for t in range(TINY_FRAMES):
            (folder / f"{t:05d}.{ext}").symlink_to(davis_sample / kind / "480p" / TINY_SEQUENCE / f"{t:05d}.{ext}")
    return root


# ------------------------------------------------------------------------------------------- recipe headers
def measured_line(path: Path) -> dict[str, str]:
    """``key=value`` pairs of the header line ``# measured with: k=v k=v ...`` (the values a recipe was measured
    with), in the header (the comment block before the first key)."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    found = [line for line in header if line.startswith("# measured with:")]
    assert len(found) == 1, f"{path.name}: expected one '# measured with:' line in the header, found {len(found)}"
    pairs = found[0].split(":", 1)[1].split()
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        assert eq and key and value, f"{path.name}: {pair!r} in the measured line is not key=value"
        out[key] = value
    return out


def _lookup(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        if isinstance(node, list):
            node = node[int(part)]
        elif part in node:
            node = node[part]
        else:  # objectives.<i>.<param> lives under params in the resolved config
            node = node["params"][part]
    return node


def _same(stated: str, actual) -> bool:
    if isinstance(actual, (list, tuple)):  # written without spaces: [0.8,0.95]
        items = [v for v in stated.strip("[]()").split(",") if v]
        return len(items) == len(actual) and all(_same(v, a) for v, a in zip(items, actual))
    if isinstance(actual, bool):
        return stated.lower() == str(actual).lower()
    if isinstance(actual, (int, float)):
        return float(stated) == float(actual)
    return stated == str(actual)


@pytest.mark.parametrize("recipe", CPU_RECIPES + ("mast_demo",))
def test_recipe_resolves_to_what_its_header_says_was_measured(recipe):
    path = ROOT / "configs" / f"{recipe}.yaml"
    stated = measured_line(path)
    assert "train.steps" in stated, f"{path.name}: the measured line must state train.steps"
    cfg = to_dict(resolve_run_config(path))
    wrong = {k: (v, _lookup(cfg, k)) for k, v in stated.items() if not _same(v, _lookup(cfg, k))}
    assert not wrong, f"{path.name}: header says (measured, resolved): {wrong}"
    # the header's free text names the same step count as the structured line
    prose = "\n".join(line for line in path.read_text().splitlines()
                      if line.startswith("#") and not line.startswith("# measured with:"))
    assert re.search(rf"\b{stated['train.steps']}\b", prose), f"{path.name}: the header text never names the steps"


def test_measured_line_check_can_fail(tmp_path):
    src = (ROOT / "configs" / "crw_sample.yaml").read_text()
    steps = int(measured_line(ROOT / "configs" / "crw_sample.yaml")["train.steps"])
    bad = tmp_path / "crw_bad.yaml"
    bad.write_text(src.replace(f"steps: {steps}\n", f"steps: {steps + 1}\n"))
    cfg = to_dict(resolve_run_config(bad))
    assert not _same(measured_line(bad)["train.steps"], _lookup(cfg, "train.steps"))


# ------------------------------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("argv, field", [
    (["--seeds", "0", "0"], "--seeds"),
    (["--steps", "0"], "--steps"),
    (["--presets", "nope"], "--presets"),
    (["--baselines", "imagenet"], "--baselines"),
    (["--set", "topk=5"], "--set"),
    (["--set", "dino2:propagate.topk=5"], "--set"),
    (["--short-side", "-1"], "--short-side"),
    (["--train-set", "train.steps"], "--train-set"),
    (["--davis-root", "/nonexistent/davis"], "--davis-root"),
])
def test_bad_options_name_the_field(tool, argv, field, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(field)):
        tool.parse_args(argv + ([] if "--davis-root" in argv else ["--davis-root", str(tmp_path)])).validate()


def test_protocol_key_of_the_other_family_is_an_error(tool, tmp_path):
    opts = tool.parse_args(["--davis-root", str(tmp_path), "--set", "propagate.topk=5"])
    assert tool.protocol("crw", opts).topk == 5
    with pytest.raises(ConfigError, match="topk"):
        tool.protocol("mast", opts)  # a top-k key under a window preset is refused, never ignored
    scoped = tool.parse_args(["--davis-root", str(tmp_path), "--set", "crw:propagate.topk=5", "--short-side", "240"])
    assert tool.protocol("mast", scoped).window.short_side == 240
    crw = tool.protocol("crw", scoped)
    assert (crw.resize, crw.short_side, crw.topk) == ("short_floor", 240, 5)


def test_window_preset_for_a_stride8_learner_is_refused(tool, tmp_path):
    opts = tool.parse_args(["--recipes", "crw_sample", "--seeds", "0", "--presets", "mast",
                            "--davis-root", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    with pytest.raises(ConfigError, match="--presets"):
        tool.collect(opts, log=lambda m: None)
    assert not (tmp_path / "runs").exists()


def test_training_sequences_are_refused_for_evaluation(tool, davis_sample, tmp_path):
    opts = tool.parse_args(["--recipes", "crw_sample", "--seeds", "0", "--davis-root", str(davis_sample),
                            "--sequences", "tennis", "--train-set", f"data.root={davis_sample}",
                            "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match="--sequences"):
        tool.collect(opts, log=lambda m: None)
    assert not (tmp_path / "runs").exists()  # refused before any training


def test_run_of_another_config_is_refused(tool, tmp_path):
    opts = tool.parse_args(["--recipes", "corrflow_sample", "--seeds", "0", "--steps", "2",
                            "--davis-root", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    cfg = tool.run_config("corrflow_sample", 0, opts)
    run_dir = tool.run_dir_for(cfg, opts)
    run_dir.mkdir(parents=True)
    stored = json.loads(json.dumps(to_dict(cfg)))
    stored["optim"]["lr"] = 1.0
    (run_dir / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match="optim.lr"):
        tool.ensure_trained("corrflow_sample", cfg, run_dir, log=lambda m: None)


def test_two_recipes_with_one_name_are_refused(tool, tmp_path):
    copy = tmp_path / "crw_copy.yaml"
    copy.write_text((ROOT / "configs" / "crw_sample.yaml").read_text())  # still named crw_sample
    opts = tool.parse_args(["--recipes", f"crw_sample,{copy}", "--seeds", "0", "--davis-root", str(tmp_path),
                            "--runs-dir", str(tmp_path / "runs")])
    with pytest.raises(ConfigError, match="--recipes: two recipes are named 'crw_sample'"):
        tool.collect(opts, log=lambda m: None)
    assert not (tmp_path / "runs").exists()


def test_a_recipe_given_as_a_yaml_path_is_labelled_by_its_name(tool, davis_sample, tiny_davis, tmp_path, one_thread):
    """A variant YAML outside configs/ (here the MAST recipe with its trunk ended at layer3): its runs, result folders
    and table rows carry the recipe's ``name``, not the path."""
    variant = tmp_path / "variant.yaml"
    text = (ROOT / "configs" / "mast_sample.yaml").read_text()
    assert "\n  out_layer: layer2" in text
    variant.write_text(text.replace("\n  out_layer: layer2", "\n  out_layer: layer3", 1))
    out = tmp_path / "out"
    argv = ["--recipes", str(variant), "--steps", "1", "--seeds", "0", "--presets", "crw", "--baselines", "random",
            "--sequences", TINY_SEQUENCE, "--short-side", str(TINY_SHORT_SIDE), "--davis-root", str(tiny_davis),
            "--train-set", f"data.root={davis_sample}", "--train-set", "train.batch_size=2",
            "--train-set", "data.num_workers=0", "--runs-dir", str(tmp_path / "runs"), "--out", str(out),
            "--set", TINY_CONTEXT[0]]
    assert tool.main(argv) == 0
    evidence = json.loads((out / "evidence.json").read_text())
    assert {(r["recipe"], r["features"]) for r in evidence["rows"]} == {("mast_sample", "trained"),
                                                                          ("mast_sample", "random")}
    assert (tmp_path / "runs" / "mast_sample_s0_steps1" / "config.json").is_file()
    metrics = json.loads((out / "propagation" / "mast_sample" / "crw" / "trained_s0" / "metrics.json").read_text())
    assert metrics["hyperparameters"]["layer"] == "layer3" and metrics["extractor"]["channels"] == 256
    assert list((out / "propagation" / "random" / "crw").glob("mast_resnet18.layer3.*_s0"))  # the tag names the trunk


# ------------------------------------------------------------------------------------------------- end to end
def test_evidence_tool_end_to_end_tiny(tool, davis_sample, tiny_davis, tmp_path, one_thread):
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--steps", "2", "--seeds", "0", "--presets", "own,crw", "--sequences", TINY_SEQUENCE,
            "--short-side", str(TINY_SHORT_SIDE), "--davis-root", str(tiny_davis),
            "--train-set", f"data.root={davis_sample}", "--train-set", "train.batch_size=2",
            "--train-set", "data.num_workers=0", "--runs-dir", str(runs), "--out", str(out)]
    for override in TINY_CONTEXT:
        argv += ["--set", override]
    assert tool.main(argv) == 0
    evidence = json.loads((out / "evidence.json").read_text())
    rows = evidence["rows"]
    keys = {(r["recipe"], r["preset"], r["features"]) for r in rows}
    assert len(keys) == len(rows)
    own = {"crw_sample": "crw", "timecycle_sample": "crw", "corrflow_sample": "corrflow", "mast_sample": "mast"}
    expected = {(recipe, preset, features) for recipe in CPU_RECIPES for preset in {own[recipe], "crw"}
                for features in ("trained", "random", "lab", "identity")}
    assert keys == expected
    for r in rows:
        assert r["J&F"]["n"] == 1 and 0.0 <= r["J&F"]["mean"] <= 1.0
        seed_key = "0" if r["features"] in ("trained", "random") else "-"
        folder = {"trained": f"{r['recipe']}/{r['preset']}/trained_s0", "lab": f"lab/{r['preset']}",
                  "identity": f"identity/{r['preset']}"}.get(r["features"])
        if folder is None:
            model = resolve_run_config(ROOT / "configs" / f"{r['recipe']}.yaml").model
            folder = f"random/{r['preset']}/{tool._model_tag(model)}_s0"
        metrics = json.loads((out / "propagation" / folder / "metrics.json").read_text())
        assert metrics["sequences"] == [TINY_SEQUENCE]
        assert len(list((out / "propagation" / folder / TINY_SEQUENCE).glob("*.png"))) == TINY_FRAMES
        assert metrics["preset"] == r["preset"]
        assert r["per_seed"][seed_key]["J&F-Mean"] == pytest.approx(metrics["global"]["J&F-Mean"])
        if r["features"] == "random":  # the trained model's architecture, fed the colour space it trains on
            model = resolve_run_config(ROOT / "configs" / f"{r['recipe']}.yaml").model
            assert metrics["extra_info"]["source"]["colour"] == model.colour
            assert metrics["extra_info"]["source"]["encoder"] == model.encoder
    colours = {r["recipe"]: resolve_run_config(ROOT / "configs" / f"{r['recipe']}.yaml").model.colour for r in rows}
    assert colours["corrflow_sample"] == "rgb" and colours["mast_sample"] == "lab"
    md = (out / "evidence.md").read_text()
    assert md.count("\n| ") == 1 + len({(r["recipe"], r["preset"]) for r in rows})  # header + one line each
    assert all(r["steps"] == 2 and not r["reused"] for r in evidence["runs"])

    # a second call reuses the finished runs and the propagation results
    lines = []
    opts = tool.parse_args(argv)
    again = tool.collect(opts, log=lines.append)
    assert all(r["reused"] for r in again["runs"])
    assert not any("training" in line for line in lines)
    assert [r["J&F"] for r in again["rows"]] == [r["J&F"] for r in rows]


# ---------------------------------------------------------------------------------------- random-init baseline
@pytest.mark.parametrize("recipe, colour, layer", [("corrflow_sample", "rgb", "layer2"),
                                                   ("mast_sample", "lab", "layer2"),
                                                   ("crw_sample", "imagenet", "layer2")])
def test_random_init_baseline_is_the_trained_models_step0_encoder_in_its_colour_space(recipe, colour, layer):
    import torch

    from vidssl.engine import build_training_model
    from vidssl.evaluation.presets import preset_config
    from vidssl.evaluation.sources import random_init_extractor

    cfg = resolve_run_config(ROOT / "configs" / f"{recipe}.yaml", ["train.seed=3"])
    ext, info, used = random_init_extractor(cfg.model, seed=3, preset=preset_config("crw"))
    assert ext.colour == colour and used.layer == layer  # CorrFlow's encoder reads RGB under the crw preset too
    assert info["colour"] == cfg.model.colour
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # what vidssl.engine.train does before building the model
        step0 = build_training_model(cfg).encoder.state_dict()
    mine = ext.encoder.state_dict()
    assert mine.keys() == step0.keys()
    assert all(torch.equal(mine[k], step0[k]) for k in mine)


def test_curve_scores_every_stored_checkpoint(tool, davis_sample, tiny_davis, tmp_path, one_thread):
    argv = ["--recipes", "crw_sample", "--steps", "2", "--seeds", "0", "--presets", "crw", "--baselines", "identity",
            "--curve", "--sequences", TINY_SEQUENCE, "--short-side", str(TINY_SHORT_SIDE),
            "--davis-root", str(tiny_davis), "--train-set", f"data.root={davis_sample}",
            "--train-set", "train.batch_size=2", "--train-set", "train.ckpt_every=1",
            "--train-set", "train.keep_checkpoints=3", "--runs-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out")]
    for override in TINY_CONTEXT:
        argv += ["--set", override]
    evidence = tool.collect(tool.parse_args(argv), log=lambda m: None)
    curve = evidence["curve"]
    assert [c["step"] for c in curve] == [1, 2]
    trained = next(r for r in evidence["rows"] if r["features"] == "trained")
    assert curve[-1]["J&F-Mean"] == trained["J&F"]["mean"]  # the final point is the trained row
    first = json.loads((tmp_path / "out" / "propagation" / "crw_sample" / "crw" / "curve_s0" / "step_00000001" /
                        "metrics.json").read_text())
    assert first["extra_info"]["source"]["step"] == 1
    assert curve[0]["J&F-Mean"] == pytest.approx(first["global"]["J&F-Mean"])
    assert "Learning curve" in tool.markdown(evidence)
