from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from utils.config import ConfigError, merge_config, option
from wetr.config import make_config


def test_overrides_and_dotlist_merge():
    cfg = make_config({"tag": "x", "data": {"num_classes": 5}},
                      ["max_iters=7", "cam.scales=[1.0,0.5]", "model.pretrained=/w/vit.pth"])
    assert cfg.tag == "x" and cfg.max_iters == 7 and cfg.data.num_classes == 5
    assert list(cfg.cam.scales) == [1.0, 0.5]
    assert cfg.model.pretrained == "/w/vit.pth"
    assert make_config(None, ["model.pretrained=false"]).model.pretrained is False


@pytest.mark.parametrize("argv, words", [
    (["maxiters=3"], ["unknown config key 'maxiters'", "max_iters"]),
    (["data.nme=voc"], ["unknown config key 'data.nme'", "data.name"]),
    (["max_iters=abc"], ["max_iters"]),
    (["amp=fp8"], ["amp", "bf16"]),
    (["reg.filter=fast"], ["reg.filter", "permutohedral"]),
    (["justaword"], ["key=value"]),
])
def test_bad_config_is_one_line_error(argv, words):
    with pytest.raises(ConfigError) as info:
        make_config(None, argv)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_script_dicts_only_use_known_keys():
    from scripts.train_coco import COCO
    from scripts.train_voc import VOC
    voc, coco = make_config(VOC), make_config(COCO)
    assert voc.data.num_classes == 21 and coco.data.num_classes == 81
    assert list(voc.cam.scales) == [1.0, 0.5, 0.75, 1.5]
    assert list(coco.cam.scales) == [1.0, 0.5, 0.75, 1.25, 1.5]
    with pytest.raises(ConfigError):
        make_config({**VOC, "lr": 1.0})


@pytest.mark.parametrize("bad", ["[0.4,0.4]", "[0.4,-1,0.2,0.1]", "[0.4,0.4,0.2,0.7]"])
def test_bad_jitter_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="data.jitter"):
        make_config({}, [f"data.jitter={bad}"])


@pytest.mark.parametrize("script, planes, aux, bkg", [
    ("train_voc", (0.7, 0.25), [0.7, 0.25], 0.5),
    ("train_coco", (0.65, 0.25), [0.65, 0.25], 0.45),
])
def test_reference_scripts_use_spec_thresholds(script, planes, aux, bkg):
    """METHOD.md §4: refined-label background planes VOC 0.7 / 0.25, COCO 0.65 / 0.25; L_aux (and the
    PTC labels) likewise; L_cle (0.5, 0.25) and L_fin (0.6, 0.35) in both; METHOD.md §7: validation
    background VOC 0.5, COCO 0.45."""
    import importlib
    mod = importlib.import_module(f"scripts.{script}")
    cam = make_config(getattr(mod, "VOC" if script == "train_voc" else "COCO")).cam
    assert (cam.high, cam.low, cam.bkg) == (*planes, bkg)
    assert [list(cam.cle_thresholds), list(cam.aux_thresholds), list(cam.fin_thresholds)] == [
        [0.5, 0.25], aux, [0.6, 0.35]]


def test_demo_dict_keeps_the_voc_method():
    """The demo scales sizes and the schedule down; losses, token-label thresholds and CAM scales
    stay VOC's (of the loss weights only the segmentation and patch-token contrast terms' may
    differ, of the thresholds only the refined labels' background planes: the search behind each
    is in logs/demo_recipe_search.md)."""
    from scripts.train_demo import DEMO
    from scripts.train_voc import VOC
    demo, voc = make_config(DEMO), make_config(VOC)
    for key in ("data.jitter", "cam.scales", "cam.bkg", "cam.cle_thresholds",
                "cam.aux_thresholds", "cam.fin_thresholds", "loss.cle_temp",
                "une", "reg", "par"):
        assert OmegaConf.select(demo, key) == OmegaConf.select(voc, key), key
    demo_w, voc_w = (OmegaConf.to_container(c.loss.weights) for c in (demo, voc))
    assert {k for k in voc_w if demo_w[k] != voc_w[k]} <= {"seg", "ptc"}
    assert demo.cam.low < demo.cam.high
    assert demo.data.num_classes == 5 and demo.model.pretrained is False


def test_run_demo_evaluates_at_the_training_crop_size(tmp_path):
    """run_demo.sh resizes the val images to the run's training crop for the evaluation (as the
    reference resizes VOC to its 448 crop): its lookup, run on a saved run config, yields the
    crop, and that value is what reaches run_evaluate_voc.sh."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path
    from scripts.train_demo import DEMO
    script = (Path(__file__).resolve().parents[1] / "run_demo.sh").read_text()
    run = re.search(r"^tag=\S+; run=\S+$", script, re.M)
    lookup = re.search(r"^crop=\$\(python -c .*?\)$", script, re.M | re.S)
    assert run and lookup
    assert re.search(r'run_evaluate_voc\.sh .*"\$run/\S+" size="\$crop" ', script)
    OmegaConf.save(make_config(DEMO, ["data.crop_size=80"]), tmp_path / "trained.yaml")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    steps = [run.group(0), 'mkdir -p "$run" && cp trained.yaml "$run/config.yaml"', lookup.group(0),
             'echo "$crop"']
    out = subprocess.run(["bash", "-c", "\n".join(steps)], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "80"


def test_readme_training_commands_are_valid_configs():
    """Every `run_train.sh scripts/train_X.py ...` command of the README (continuation lines
    joined) merges into the script's config: no key the schema does not know, no bad value."""
    import importlib
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"run_train\.sh scripts/(train_\w+)\.py \S+ \d+ \d+ \S+ ([^\n`#]*)", readme)
    assert commands
    for script, args in commands:
        mod = importlib.import_module(f"scripts.{script}")
        recipe = getattr(mod, script.split("_")[1].upper())
        make_config(recipe, [a for a in args.split() if "=" in a])


# ----------------------------------------------------------------------------- machinery
@dataclass
class _Inner:
    ratio: float = option(0.5, "how much", check=(lambda v: 0 < v <= 1, "in (0, 1]"))


@dataclass
class _Schema:
    mode: str = option("a", "which mode", choices=("a", "b"))
    sizes: list[int] = option([1, 2], "some sizes")
    inner: _Inner = field(default_factory=_Inner)


@pytest.mark.parametrize("argv, message", [
    (["mode=c"], "config key 'mode' must be one of a, b; got 'c'"),
    (["inner.ratio=2"], "config key 'inner.ratio' must be in (0, 1]; got 2.0"),
    (["inner.ratoi=2"], "unknown config key 'inner.ratoi' (did you mean 'inner.ratio'?)"),
    (["sizes=[1,x]"], None),
])
def test_merge_config_enforces_the_fields_rules(argv, message):
    """utils.config.merge_config on any schema: choices and checks from the fields' metadata,
    unknown keys with the nearest known one, one line each; list defaults are not shared."""
    assert merge_config(_Schema, {"mode": "b"}, ["inner.ratio=1"]).inner.ratio == 1.0
    with pytest.raises(ConfigError) as info:
        merge_config(_Schema, None, argv)
    assert "\n" not in str(info.value)
    if message is not None:
        assert str(info.value) == message
    a, b = _Schema(), _Schema()
    a.sizes.append(3)
    assert b.sizes == [1, 2]
