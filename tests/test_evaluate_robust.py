"""The field's robustness protocol in the evaluate stage (mlsys.evaluate: evaluate.robust):
per-image states against SegMetrics, the worst case over attacks and per tissue against a
recomputation written here from mlsys.attacks and SegMetrics, shards and chunk sizes
against one pass, and the curves over the steps against separate shorter runs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mlsys import data, prepare
from mlsys.attacks import full_area, pgd
from mlsys.robust import SEA_LOSSES, untargeted
from mlsys.distributed import ChunkStore, Shard
from mlsys.data import split_tissues
from mlsys.evaluate import StepStates, curve_points, evaluate_split, image_states, robust_results, robust_seed, train_class_weights
from mlsys.metrics import SegMetrics, unpack_state
from mlsys.model import UNet
from mlsys.params import AttackParams, DataParams, EvaluateParams, ParamsError, RobustParams, load_params

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> str:
    """The synthetic generator's micro set: 27 patches of 16x16, 6 test images of 4 tissues."""
    path = tmp_path_factory.mktemp("data") / "clean.h5"
    prepare.prepare(DataParams(n_images=27, image_size=16), path, progress=False)
    return str(path)


@pytest.fixture(scope="module")
def model() -> UNet:
    """A random U-Net leaning to background (most pixels right, as a trained one), so the
    attacks have pixels to fool and differ from each other."""
    torch.manual_seed(0)
    m = UNet(n_classes=6, base=4, depth=2).eval()
    with torch.no_grad():
        m.head.bias[0] += 0.4
    return m


def protocol(chunk: int, attacks=("pgd", "segpgd", "sea"), radii=(4.0, 8.0), steps=3, every=1,
             paper_steps=2, mode="faithful") -> EvaluateParams:
    # the plain fp32 NCHW attack, as the independent recomputations run it (fast paths: test_attacks.py)
    attack = AttackParams(steps=paper_steps, batch_size=chunk, mode=mode, channels_last=False)
    return EvaluateParams(n_panel=1, attack=attack,
                          robust=RobustParams(attacks=list(attacks), radii=list(radii), steps=steps,
                                              curve_every=every))


def run(model, path, cfg, folder, shard=None):
    return evaluate_split(model, path, "test", cfg, CPU, ChunkStore(folder, {}), shard=shard, progress=False)


def counts(m: SegMetrics | torch.Tensor) -> dict[str, float | list[float]]:
    """Every count of a SegMetrics or a state (S,) but the float sums (the loss and the
    per-image mIoU, equal only up to float order), by field name."""
    state = m.state() if isinstance(m, SegMetrics) else m
    return {k: v.tolist() for k, v in unpack_state(state).items() if k not in ("loss_sum", "miou_image")}


def forward(model, x):
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------- per-image states
def test_image_states_are_segmetrics_of_each_image_alone():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, 7, 9, generator=g) * 3
    masks = torch.randint(0, 6, (5, 7, 9), generator=g)
    bits = torch.randint(0, 64, (5, 7, 9), generator=g).to(torch.uint8)
    for b in (bits, None):
        rows = image_states(logits, masks, b, 6, 0.1)
        assert rows.shape == (5, 3 * 6 + 9) and rows.dtype == torch.float64
        whole = SegMetrics()
        for i in range(5):
            one = SegMetrics()
            one.update(logits[i:i + 1], masks[i:i + 1], None if b is None else b[i:i + 1])
            whole.update(logits[i:i + 1], masks[i:i + 1], None if b is None else b[i:i + 1])
            assert counts(rows[i]) == counts(one)
            assert unpack_state(rows[i])["loss_sum"].item() == pytest.approx(one.loss_sum, rel=1e-6)
            assert unpack_state(rows[i])["miou_image"].item() == one.miou_image  # the same image_miou
        assert counts(rows.sum(0)) == counts(whole)
        assert unpack_state(rows.sum(0))["miou_image"].item() == pytest.approx(whole.miou_image, rel=1e-12)
    with pytest.raises(ValueError, match="need 6 classes"):
        image_states(logits[:, :4], masks.clamp(max=3), bits, 4, 0.1)


# --------------------------------------------------------------------------- worst case, tissue
def test_worst_case_and_tissue_metrics_equal_an_independent_recomputation(micro, model, tmp_path):
    cfg = protocol(chunk=4)
    clean, _, _, rob = run(model, micro, cfg, tmp_path / "s")
    tissues = split_tissues(micro, "test")
    assert rob["tissues"] == tissues and len(tissues) >= 2
    worst = {r: SegMetrics() for r in cfg.robust.radii}
    per_attack = {(a, r): SegMetrics() for a in cfg.robust.attacks for r in cfg.robust.radii}
    tissue_clean = {t: SegMetrics() for t in tissues}
    tissue_worst = {(t, r): SegMetrics() for t in tissues for r in cfg.robust.radii}
    weights = train_class_weights(micro, model.head.out_channels)[0]  # SEA's: the train split's
    for j, (_, x, y, names, bits) in enumerate(data.iter_chunks(micro, "test", 4, channels=True)):
        names = [n.decode() for n in names]
        for i, t in enumerate(names):
            tissue_clean[t].update(forward(model, x[i:i + 1]), y[i:i + 1], bits[i:i + 1])
        for r in cfg.robust.radii:
            logits = []
            for a in cfg.robust.attacks:
                g = torch.Generator().manual_seed(robust_seed(j, r, a))
                logits.append(forward(model, untargeted(model, x, y, a, r / 255, 3, generator=g, weights=weights)))
                per_attack[(a, r)].update(logits[-1], y, bits)
            acc = torch.stack([(z.argmax(1) == y).float().mean((1, 2)) for z in logits])  # (attacks, N)
            for i in range(len(x)):
                k = min(range(len(logits)), key=lambda k: (acc[k, i].item(), k))     # lowest, first of equals
                worst[r].update(logits[k][i:i + 1], y[i:i + 1], bits[i:i + 1])
                tissue_worst[(names[i], r)].update(logits[k][i:i + 1], y[i:i + 1], bits[i:i + 1])
    for ri, r in enumerate(cfg.robust.radii):
        assert counts(rob["worst"][ri]) == counts(worst[r])
        assert rob["worst"][ri].loss_sum == pytest.approx(worst[r].loss_sum, rel=1e-6)
        for a in cfg.robust.attacks:
            assert counts(rob["per_attack"][a][ri]) == counts(per_attack[(a, r)])
        # the worst case is at most as accurate as any single attack
        assert rob["worst"][ri].correct <= min(rob["per_attack"][a][ri].correct for a in cfg.robust.attacks)
        for t in tissues:
            assert counts(rob["tissue_worst"][t][ri]) == counts(tissue_worst[(t, r)])
        # per-tissue counts add up to the totals
        total = SegMetrics()
        for t in tissues:
            total.merge(rob["tissue_worst"][t][ri])
        assert counts(total) == counts(rob["worst"][ri])
    for t in tissues:
        assert counts(rob["tissue_clean"][t]) == counts(tissue_clean[t])
    total = SegMetrics()
    for t in tissues:
        total.merge(rob["tissue_clean"][t])
    assert counts(total) == counts(clean)
    assert rob["worst"][-1].correct < clean.correct   # the attacks do something


# --------------------------------------------------------------------------- shards, chunks
def states_of(res) -> dict:
    clean, attacked, _, rob = res
    out = {"clean": counts(clean), "attack": counts(attacked)}
    for key in ("worst", "paper_curve"):
        out[key] = [counts(m) for m in rob[key]]
    out["per_attack"] = {a: [counts(m) for m in ms] for a, ms in rob["per_attack"].items()}
    out["tissue_clean"] = {t: counts(m) for t, m in rob["tissue_clean"].items()}
    out["tissue_worst"] = {t: [counts(m) for m in ms] for t, ms in rob["tissue_worst"].items()}
    out["curves"] = {a: [[None if m is None else counts(m) for m in pts] for pts in per_r]
                     for a, per_r in rob["curves"].items()}
    return out


def test_shards_merge_into_the_single_process_result(micro, model, tmp_path):
    cfg = protocol(chunk=2, attacks=("cospgd", "sea"), radii=(8.0,), steps=2, mode="standard")
    cfg.attack.random_start = True
    one = run(model, micro, cfg, tmp_path / "one")
    for i in (1, 0):   # independent processes filling one store, then the merge
        assert run(model, micro, cfg, tmp_path / "sharded", Shard(i, 2)) is None
    assert states_of(run(model, micro, cfg, tmp_path / "sharded")) == states_of(one)
    again = run(model, micro, cfg, tmp_path / "again")
    assert states_of(again) == states_of(one), "per-chunk seeded random starts: the same numbers every run"


def test_chunk_size_changes_nothing_without_random_starts(micro, model, tmp_path):
    """Chunks of 2 against all 6 test images at once (APGD and the faithful attack draw no
    random start; the attacks with one draw theirs per chunk, so there the chunk size matters)."""
    small = run(model, micro, protocol(chunk=2, attacks=("apgd",), radii=(2.0, 8.0)), tmp_path / "two")
    whole = run(model, micro, protocol(chunk=64, attacks=("apgd",), radii=(2.0, 8.0)), tmp_path / "all")
    assert states_of(small) == states_of(whole)


# --------------------------------------------------------------------------- curves
def test_curve_points_are_the_metrics_of_separate_shorter_runs(micro, model, tmp_path):
    """pgd's and the paper attack's point at t = a run of t steps from the same start; apgd's
    and SEA's last point = the image they return, apgd's accuracy never rises; the "worst"
    curve ends at the worst case."""
    steps, every = 4, 2
    cfg = protocol(chunk=8, attacks=("pgd", "apgd", "sea"), radii=(8.0,), steps=steps, every=every, paper_steps=3)
    _, attacked, _, rob = run(model, micro, cfg, tmp_path / "s")
    assert rob["steps"] == curve_points(steps, every) == [0, 2, 4] and rob["paper_steps"] == [0, 2, 3]
    x, y, bits = data.load_split(micro, "test", channels=True)
    seed = robust_seed(0, 8.0, "pgd")   # one chunk: chunk 0
    for i, t in enumerate(rob["steps"]):
        ref = SegMetrics()
        adv = untargeted(model, x, y, "pgd", 8 / 255, t, generator=torch.Generator().manual_seed(seed))
        ref.update(forward(model, adv), y, bits)
        assert counts(rob["curves"]["pgd"][0][i]) == counts(ref), f"pgd after {t} steps"
    for i, t in enumerate(rob["paper_steps"]):
        ref = SegMetrics()
        ref.update(forward(model, pgd(model, x, full_area(x, 0), mode="faithful", eps=0.01, steps=t)), y, bits)
        assert counts(rob["paper_curve"][i]) == counts(ref), f"paper attack after {t} steps"
    assert counts(rob["paper_curve"][-1]) == counts(attacked)
    for a in ("apgd", "sea"):
        assert counts(rob["curves"][a][0][-1]) == counts(rob["per_attack"][a][0]), a
    # SEA's 4 steps: 1 at 2 eps, 1 at 1.5 eps, then 2 at eps: no point inside the ball before 2 updates
    assert rob["curves"]["sea"][0][0] is None and rob["curves"]["sea"][0][1] is not None
    assert rob["curves"]["worst"][0][0].correct <= min(rob["curves"][a][0][0].correct for a in ("pgd", "apgd"))
    correct = [m.correct for m in rob["curves"]["apgd"][0]]
    assert correct == sorted(correct, reverse=True) and correct[-1] < correct[0]
    assert counts(rob["curves"]["worst"][0][-1]) == counts(rob["worst"][0])


def test_step_states_fill_the_points_an_early_stop_skipped():
    """SEA as the evaluate stage runs it (``untargeted``: its authors' early stop) on a model
    where every stage of each loss stops after its first update (grey images at the boundary
    of a 1x1 convolution; tests/test_attacks_field.py derives it): the forwards reported are
    t = 0, 1 | 4, 5 | 8, 9 of a full run's 0..12 (stages of 3, 3, 4 updates). Update counts:
    stage 1's t 0..3 are 0..3, stage 2's t 4..7 are 3..6 (a start shares its count with the
    update before it), stage 3's t 8..12 are 6..10. The counts no forward reported (2 and 5
    inside a stage, 8..10 after the last forward) hold what the stopped stage returns: its
    lowest-accuracy logits at the stop, those of its update 1 (accuracy 0, later ones win
    ties) -- the same as the counts 1, 4, 7 of those updates."""
    net = torch.nn.Conv2d(3, 2, 1)  # logit 0 = 0, logit 1 = r + g + b - 1.51: grey 0.5 is class 0 by 0.01
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.0] * 3, [1.0] * 3]).view(2, 3, 1, 1))
        net.bias.copy_(torch.tensor([0.0, -1.51]))
    net.eval()
    x, y = torch.full((2, 3, 4, 4), 0.5), torch.zeros(2, 4, 4, dtype=torch.int64)
    steps, stages, points = 10, [3, 3, 4], curve_points(10, 1)

    def states(logits):
        return image_states(logits, y, None, 2, 0.5)

    runs = {name: StepStates(points, stages, True, states, y) for name in SEA_LOSSES}
    as_evaluate = {name: StepStates(points, stages, True, states, y, valid_from=6) for name in SEA_LOSSES}
    seen = {name: {} for name in SEA_LOSSES}

    def on_step(name, t, logits):
        seen[name][t] = logits.clone()
        runs[name].on_step(t, logits)
        as_evaluate[name].on_step(t, logits)

    adv = untargeted(net, x, y, "sea", 0.03, steps, generator=torch.Generator().manual_seed(0), on_step=on_step)
    at = [0, 1, 1, 4, 5, 5, 8, 9, 9, 9, 9]  # the t whose logits each count 0..10 holds
    for name in SEA_LOSSES:
        assert sorted(seen[name]) == [0, 1, 4, 5, 8, 9]
        got = runs[name].result(points)
        assert got.shape == (11, 2, states(seen[name][0]).shape[1])
        for u, t in enumerate(at):
            assert torch.equal(got[u], states(seen[name][t])), (name, u)
        inside = as_evaluate[name].result(points)  # NaN before the last stage, as _attack_curve has it
        assert inside[:6].isnan().all() and torch.equal(inside[6:], got[6:])
    # the last point is the returned image: all at accuracy 0, worst_case keeps the first loss's
    assert torch.equal(runs[SEA_LOSSES[0]].result(points)[-1], states(forward(net, adv)))


def test_robust_results_are_json_clean_and_laid_out_by_radius(micro, model, tmp_path):
    import json

    cfg = protocol(chunk=8, attacks=("segpgd",), radii=(0.5, 8.0), steps=2)
    res = robust_results(run(model, micro, cfg, tmp_path / "s")[3])
    text = json.dumps(res, allow_nan=False)      # strict JSON: no NaN left
    back = json.loads(text)
    assert back["radii"] == [0.5, 8.0] and list(back["worst"]) == ["0.5", "8"]
    assert set(back["per_attack"]) == {"segpgd"} and set(back["curves"]) == {"segpgd", "worst"}
    assert back["curves"]["segpgd"]["8"]["steps"] == [0, 1, 2] and len(back["curves"]["segpgd"]["8"]["dice"]) == 3
    assert back["worst"]["8"]["dice/dead"] is None or isinstance(back["worst"]["8"]["dice/dead"], float)
    assert set(back["tissue"]) == set(split_tissues(micro, "test"))
    assert set(back["tissue"]["Breast"]) == {"clean", "worst"} and list(back["tissue"]["Breast"]["worst"]) == ["0.5", "8"]
    assert back["paper_curve"]["steps"] == [0, 1, 2]


def test_sea_class_weights_are_the_train_splits_and_recorded(micro, model, tmp_path):
    """Mask-CE-Bal's weights: inverse pixel frequency of the TRAIN split's masks, sum 1,
    in the results; a file with no training split falls back to per-image weights, saying so."""
    import h5py
    import shutil

    C = model.head.out_channels
    _, train_masks = data.load_split(micro, "train")
    count = torch.bincount(train_masks.flatten(), minlength=C).double()
    want = torch.where(count > 0, 1 / count.clamp(min=1), torch.zeros_like(count))
    want = (want / want.sum()).tolist()
    w, source = train_class_weights(micro, C)
    assert w.tolist() == pytest.approx(want, rel=1e-6) and sum(w.tolist()) == pytest.approx(1.0)
    assert "train split" in source
    cfg = protocol(chunk=8, attacks=("sea",), radii=(8.0,), steps=2)
    res = robust_results(run(model, micro, cfg, tmp_path / "s")[3])
    assert res["class_weights"] == pytest.approx(want, rel=1e-6) and "train split" in res["class_weights_source"]
    bare = tmp_path / "no_train.h5"
    shutil.copy(micro, bare)
    with h5py.File(bare, "a") as f:
        del f["split/train"]
    w, source = train_class_weights(str(bare), C)
    assert w is None and "fallback" in source and "no training split" in source


def test_greedy_worst_miou_is_reported_beside_the_accuracy_worst_case(micro, model, tmp_path):
    """robust.worst_miou per radius: the greedy search over the candidates (SEA as its three
    runs), starting from the first candidate, never above that candidate's own mIoU."""
    from mlsys.evaluate import candidates

    cfg = protocol(chunk=4, attacks=("segpgd", "sea"), radii=(8.0,), steps=2)
    rob = run(model, micro, cfg, tmp_path / "s")[3]
    res = robust_results(rob)
    w = res["worst_miou"]["8"]
    assert w["candidates"] == candidates(["segpgd", "sea"]) == ["segpgd", "sea/mask-ce-bal", "sea/mask-ce", "sea/js"]
    assert sum(w["chosen"].values()) == len(data.split_of(micro, "test")) and w["rounds"] >= 1
    first = rob["per_attack"]["segpgd"][0].state()  # candidate 0 for every image: the search's start
    C = model.head.out_channels
    tp, fp, fn = (unpack_state(first)[k].numpy() for k in ("tp", "fp", "fn"))
    assert tp.shape == (C,)
    union = tp + fp + fn
    assert w["greedy"] <= float((tp[union > 0] / union[union > 0]).mean()) + 1e-6
    assert 0 <= w["by_accuracy"] <= 1


def test_disabled_protocol_gives_none(micro, model, tmp_path):
    cfg = protocol(chunk=8)
    cfg.robust.enabled = False
    clean, attacked, panel, rob = run(model, micro, cfg, tmp_path / "s")
    assert rob is None and attacked.pixels == clean.pixels and len(panel) == 4


# --------------------------------------------------------------------------- params
def test_params_yaml_protocol_loads_and_bad_values_are_one_line_errors(root, tmp_path):
    from mlsys.robust import check

    p = load_params(root / "params.yaml")
    assert dataclasses.asdict(p.evaluate.robust) == dataclasses.asdict(RobustParams())  # params.yaml = defaults
    check(p.evaluate.robust)
    for bad, key in (({"attacks": ["fgsm"]}, "attacks"), ({"attacks": []}, "attacks"),
                     ({"attacks": ["sea", "sea"]}, "attacks"), ({"radii": [0, 8]}, "radii"),
                     ({"radii": []}, "radii"), ({"steps": 0}, "steps"), ({"curve_every": 0}, "curve_every")):
        path = tmp_path / "p.yaml"
        path.write_text(__import__("yaml").safe_dump({"evaluate": {"robust": bad}}))
        with pytest.raises(ParamsError, match=rf"^params: evaluate\.robust\.{key} = .* is invalid; expected") as err:
            check(load_params(path).evaluate.robust)  # the names: checked by the attacks' own module
        assert "\n" not in str(err.value)
