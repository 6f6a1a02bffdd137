"""A fit carried over to another preset or dataset (lmlab.experiments.calibration): a preset of a fitted recipe is
sized by that fit at once; on other data the data's floor and scale are measured once, within their share of the
budget, and read back after; a recipe no fit knows is sized by the nearest one's, said with how they differ and the
refit that measures its own. The mechanism is held over the whole range of figures it can meet."""

import itertools
import json
import math
import subprocess

import pytest
import torch

from lmlab.analysis.scaling import LossSurface
from lmlab.core import cache
from lmlab.core.cache import cache_path
from lmlab.core.config_toml import load_config
from lmlab.core.jsontext import json_sha256
from lmlab.core.machine import READ_BACK
from lmlab.data.prepare import prepare
from lmlab.data.shards import read_meta
from lmlab.experiments.calibration import SCALES, Calibration, calibrate, floor_and_scale, prior, recipe
from lmlab.experiments.family import Family, LrRule, SizeFit, fit_path, read_fit
from lmlab.experiments.sizing import with_vocab
from lmlab.model import build_model
from tests.helpers import LMLAB, a_machine, write_config, write_corpus, write_fit

FIT = SizeFit("p.toml", "0" * 64, {"bytes_per_token": 1.0}, LossSurface(1.2, 8.4, 0.3, 1180.0, 0.6, 0.012),
              LrRule(1.7, 0.17), [{"depth": 1, "params": 55_360, "tokens": 1_048_576, "val": 1.84, "run": "a"}],
              held_out=[{"depth": 1, "params": 55_360, "tokens": 1_048_576, "val": 1.84, "predicted": 1.83}])


@pytest.mark.parametrize("floor, scale, ratio", list(itertools.product((-0.5, 0.0, 2.0), (0.3, 1.0, 4.0),
                                                                       (0.5, 1.0, 3.6))))
def test_a_calibrated_fit_is_the_datas_floor_plus_its_scale_times_the_fit_and_chooses_as_its_bytes_say(floor, scale,
                                                                                                       ratio):
    """L(N, D) = floor + scale × the fit's L(N, D × ratio) at every size and length; and of sizes trading parameters
    for tokens, the one predicted best is the same whatever the floor and scale: only the bytes per token move it."""
    calibrated = Calibration(floor, scale, ratio).applied(FIT)
    sizes = [(n, 2e9 / n) for n in (1e4, 1e5, 1e6, 1e7)]  # a budget's tokens fall as the size grows
    for n, d in sizes:
        expected = floor + scale * FIT.surface.predict(n, d * ratio)
        assert calibrated.surface.predict(n, d) == pytest.approx(expected, rel=1e-12)
    best = min(sizes, key=lambda s: calibrated.surface.predict(*s))
    assert best == min(sizes, key=lambda s: Calibration(ratio=ratio).applied(FIT).surface.predict(*s))
    assert Calibration(floor, scale, ratio).spread(FIT) == pytest.approx(scale * 0.012)  # rmse over held out


@pytest.mark.parametrize("floor, scale", list(itertools.product((-1.0, 0.0, 1.5), (0.25, 0.8, 1.0, 3.0, 4.9))))
@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_two_runs_give_the_datas_floor_and_scale_and_noise_never_an_absurd_scale(floor, scale, noise):
    """Two runs' vals against the fit's predictions there: without noise the floor and scale come back; a line too
    steep or too flat to be a scale (two close predictions and noise) keeps the fit's scale, within SCALES always."""
    for close in (False, True):
        predicted = (2.0, 2.0005 if close else 1.6)
        points = tuple({"predicted": x, "val": floor + scale * x + (noise if i else -noise)}
                       for i, x in enumerate(predicted))
        found_floor, found_scale = floor_and_scale(points)
        assert SCALES[0] <= found_scale <= SCALES[1]
        if not close and not noise:
            assert (found_floor, found_scale) == (pytest.approx(floor), pytest.approx(scale))
        mean_val = sum(p["val"] for p in points) / 2
        assert found_floor + found_scale * sum(predicted) / 2 == pytest.approx(mean_val)  # through the points' mean


def test_a_recipe_is_what_a_fit_holds_for_not_the_shape_length_data_or_machine(tmp_path, char_dataset):
    cfg = load_config(write_config(tmp_path / "tiny.toml", char_dataset))
    same = load_config(tmp_path / "tiny.toml", ["model.n_layer=4", "model.n_embd=64", "model.n_head=4",
                                                 "train.max_iters=9", "data.dataset=elsewhere", "train.threads=1",
                                                 "train.dtype=bfloat16"])
    assert recipe(same) == recipe(cfg)
    for changed in ("model.mlp=swiglu", "train.optimizer=muon", "model.block_size=64", "train.batch_size=4",
                    "train.learning_rate=1e-2", "model.n_head=4"):
        assert recipe(load_config(tmp_path / "tiny.toml", [changed])) != recipe(cfg), changed


def test_a_preset_without_a_fit_takes_its_recipes_and_else_the_nearest_saying_how_they_differ(tmp_path, char_dataset):
    own = write_config(tmp_path / "own.toml", char_dataset)
    write_fit(own, char_dataset, 10_000)
    copy = tmp_path / "copy.toml"
    copy.write_text(own.read_text())
    found = prior(copy, load_config(copy))
    assert found is not None and (found.path, found.own, found.differs) == (fit_path(own), False, ())
    other = tmp_path / "other.toml"
    other.write_text(own.read_text().replace("n_head = 2", "n_head = 1"))
    found = prior(other, load_config(other))
    assert found is not None and found.path == fit_path(own) and found.differs == ("family.head 16, not 32",)
    assert prior(own, load_config(own)).own  # its own first


@pytest.fixture(scope="session")
def other_data(tmp_path_factory):
    """A char dataset of other text than the fit's."""
    root = tmp_path_factory.mktemp("other")
    target, _, _ = prepare([str(write_corpus(root / "corpus", n_docs=8, seed=7))], "char", name="other",
                           out_dir=root / "data")
    return target


@pytest.mark.slow
def test_size_auto_on_other_data_measures_its_floor_and_scale_once_and_reads_them_back(tmp_path, char_dataset,
                                                                                       other_data):
    """The fit is of the preset's recipe on other text: its floor and scale on this data are measured (two runs of the
    smallest size, within their share of the budget, said in the sizing's line), kept, and read back by the next
    sizing, which measures nothing; a prediction moves with them, the choice does not. Where the second run does not
    fit what the first left of the share (a busy machine's first may run slow), nothing is measured nor kept: one run
    says no scale."""
    preset = write_config(tmp_path / "tiny.toml", char_dataset)
    with torch.device("meta"):
        params = build_model(with_vocab(load_config(preset)).model).num_params()
    write_fit(preset, char_dataset, params // 2)
    said, kept = [], []
    for _ in range(2):
        done = subprocess.run([LMLAB, "plan", preset, "--budget", "300s", "--size", "auto", "--device", "cpu",
                               "--set", "train.threads=1", "--set", f"data.dataset={other_data}"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        said.append(" ".join(done.stdout.split()))
        kept.append({k: v for k, v in json.loads(cache_path().read_text())["entries"].items()
                     if v["kind"] == "calibration"})
    if f"its floor and scale on {other_data} were not measured (6% of the budget holds too few steps for two runs" \
            in said[0]:
        assert not kept[0] and "were not measured" in said[1]
        return
    assert f"its floor and scale measured on {other_data} in " in said[0], said[0]
    assert f"its floor and scale measured on {other_data} read back" in said[1]
    assert len(kept[0]) == 1 and kept[1] == kept[0]
    measured = next(iter(kept[0].values()))["value"]
    assert len(measured["points"]) == 2 and "2 runs of depth 1 of" in said[0], said[0]
    # the second run twice the first where the share held it at the first's pace (a busy machine's share, in wall
    # time, is no verdict here: a load that comes between the runs slows the second)
    first, second = (p["tokens"] for p in measured["points"])
    assert 1.5 * first <= second <= 2 * first and 0 < measured["seconds"]
    assert all(math.isfinite(p["val"]) for p in measured["points"])


@pytest.mark.slow
def test_a_recipe_no_fit_knows_is_sized_by_the_nearest_saying_how_and_the_refit_that_measures_its_own(tmp_path,
                                                                                                      char_dataset):
    fitted = write_config(tmp_path / "fitted.toml", char_dataset)
    with torch.device("meta"):
        params = build_model(with_vocab(load_config(fitted)).model).num_params()
    write_fit(fitted, char_dataset, params // 2)
    mine = tmp_path / "mine.toml"
    mine.write_text(fitted.read_text().replace("block_size = 32", "block_size = 32\nmlp = \"swiglu\""))
    done = subprocess.run([LMLAB, "plan", mine, "--budget", "30s", "--size", "auto", "--device", "cpu", "--set",
                           "train.threads=1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())
    assert (f"note: {mine} has no fit of its own nor of its recipe: sized by the nearest, {fit_path(fitted)}, whose "
            "recipe differs (model.mlp 'gelu', not 'swiglu')") in said
    assert f"`lmlab scaling {mine} --refit --budget 10m` measures one of its own in 10 minutes" in said
    assert "the nearest recipe's fit (1 setting differs)" in said


RUN = {"depth": 1, "params": 1000, "tokens": 4096, "val": 3.0, "predicted": 2.9}
GOOD = {"floor": -0.2, "scale": 1.1, "ratio": 1.0, "seconds": 9.5, "points": [RUN, {**RUN, "tokens": 8192}]}


@pytest.mark.parametrize("edit, trusted", [({}, True), ({"scale": 50.0}, False), ({"floor": math.nan}, False),
                                           ({"ratio": -1.0}, False), ({"seconds": "long"}, False),
                                           ({"points": None}, False), ({"points": [RUN]}, False),
                                           ({"extra": 1}, False)])
def test_a_kept_calibration_is_read_back_only_where_it_is_one_a_measurement_gives(tmp_path, char_dataset, edit,
                                                                                  trusted):
    """A calibration kept with `edit` (its checksum recomputed, as an edit would) is read back as kept where it could
    be a measurement's, else measured again (here: not, a preview's way, so none)."""
    preset = write_config(tmp_path / "tiny.toml", char_dataset)
    write_fit(preset, char_dataset, 10_000)
    cfg, fit, meta = with_vocab(load_config(preset)), read_fit(preset), read_meta(char_dataset)
    key = {"fit": json_sha256(fit.to_json()), "recipe": recipe(cfg), "train": meta["train"]["sha256"],
           "val": meta["val"]["sha256"]}
    cache.keep("calibration", key, {**GOOD, **edit})
    found = calibrate(Family.of(cfg, str(preset)), fit, a_machine(), meta, 10.0, measure=False)
    assert (found.how == READ_BACK and found.floor == -0.2) is trusted
