"""The Mediator router on synthetic features whose right answers are known (Gaussian clusters)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergewise.errors import MergewiseError
from mergewise.mediator.router import ROUTER_KINDS, Route, Router
from mergewise.mediator.settings import RouterSettings

TASKS = ["add", "reverse", "sort"]
WIDTH = 16


def centres(separation: float) -> torch.Tensor:
    """One centre per task on its own axis, `separation` apart pairwise (unit noise per dimension)."""
    return separation / math.sqrt(2) * torch.eye(len(TASKS), WIDTH)


def draw(centre: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    return centre + torch.randn(count, WIDTH, generator=torch.Generator().manual_seed(seed))


def clusters(separation: float = 10.0, count: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    points = centres(separation)
    return {task: draw(points[t], count, seed * 100 + t) for t, task in enumerate(TASKS)}


def fitted(separation: float = 10.0, **settings) -> tuple[Router, object]:
    return Router.fit(clusters(separation), RouterSettings(**settings))


@pytest.fixture(scope="module")
def separated() -> tuple[Router, object]:
    """The distance router (`gaussian`), whose decisions follow the geometry of the task means."""
    return fitted(kind="gaussian")


def far_point() -> torch.Tensor:
    point = centres(10.0)[0].clone()
    point[-1] += 50.0  # 50 noise standard deviations along an axis no task uses
    return point[None]


def test_the_fit_estimates_selection_and_flagging_from_its_held_out_prompts(separated):
    """The shares recorded at build time are close to those of fresh prompts of the same tasks."""
    router, report = separated
    routes = [(task, route) for task, x in clusters(count=200, seed=7).items() for route in router.route(x)]
    own = sum(route.decision == "select" and route.task == task for task, route in routes) / len(routes)
    flagged = sum(route.decision != "select" for _, route in routes) / len(routes)
    assert report.heldout_own_selected == pytest.approx(1 - report.heldout_flagged)  # separated: no wrong selection
    assert abs(report.heldout_own_selected - own) <= 0.1 and abs(report.heldout_flagged - flagged) <= 0.1


def test_separated_clusters_are_selected(separated):
    router, report = separated
    assert router.tasks == TASKS
    assert report.heldout_accuracy == 1.0
    assert report.prompts == {task: 64 for task in TASKS}
    assert all(0 < value < 0.5 for value in report.uncertainty_thresholds.values())
    assert set(report.ood_thresholds) == set(router.tasks) and min(report.ood_thresholds.values()) > 0
    fresh = clusters(seed=7)
    for task in TASKS:
        routes = router.route(fresh[task])
        good = [r for r in routes if r.decision == "select" and r.task == task and r.probs[task] >= 0.9]
        assert len(good) >= 0.95 * len(routes)
        assert all(r.weights() == {task: 1.0} for r in good)
        assert sorted(r.ood for r in routes)[len(routes) // 2] < 1.0


def test_probabilities_are_distributions(separated):
    router, _ = separated
    probs = router.probabilities(clusters(seed=3)["sort"])
    assert probs.shape == (64, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(64))
    assert (probs.argmax(-1) == 2).all()


def test_halfway_point_blends_its_two_tasks(separated):
    router, _ = separated
    state = router.state_dict()
    prototypes = state["prototypes"] * state["std"] + state["mean"]  # back in feature space
    (route,) = router.route(((prototypes[0] + prototypes[1]) / 2)[None])
    assert route.decision == "blend"
    assert route.task in ("add", "reverse")
    assert route.probs["add"] + route.probs["reverse"] > 0.95
    assert min(route.probs["add"], route.probs["reverse"]) > 0.3
    assert route.uncertainty > float(router.uncertainty_thresholds[router.tasks.index(route.task)])
    assert route.weights() == route.probs
    assert math.isclose(sum(route.weights().values()), 1.0, rel_tol=1e-5)


def test_uncertain_and_beyond_calibration_goes_dense(separated):
    """Between two tasks and pushed off the data: blends while the calibration prompts reach that far,
    dense once it is farther from every prototype than (nearly) all of them."""
    router, _ = separated
    state = router.state_dict()
    first, second = state["prototypes"][0], state["prototypes"][1]
    across = second - first  # stay equidistant from both: move orthogonally to the line between them
    away = torch.zeros(WIDTH)
    away[-1] = 1.0
    away -= (away @ across) / (across @ across) * across
    decisions = []
    for offset in torch.linspace(0.0, 12.0, 49):
        standardised = (first + second) / 2 + offset * away / away.norm()
        (route,) = router.route((standardised * state["std"] + state["mean"])[None])
        decisions.append((route.decision, route.ood))
    assert decisions[0][0] == "blend"
    beyond = [decision for decision, ood in decisions if ood > router.settings.ood_quantile]
    assert beyond and set(beyond) == {"dense"}
    assert all(decision == "blend" for decision, ood in decisions if ood <= router.settings.ood_quantile)


def test_far_point_falls_back_to_dense(separated):
    router, _ = separated
    (route,) = router.route(far_point())
    assert route.decision == "dense"
    assert route.task is None
    assert route.ood == 1.0
    assert route.weights() == {}
    assert math.isclose(sum(route.probs.values()), 1.0, rel_tol=1e-5)


def test_uniform_on_ood():
    router, _ = fitted(on_ood="uniform")
    (route,) = router.route(far_point())
    assert route.decision == "dense" and route.task is None
    assert route.weights() == pytest.approx({task: 1 / 3 for task in TASKS})


def test_logistic_head_classifies_clusters():
    router, report = fitted(kind="logistic")
    assert report.heldout_accuracy == 1.0
    assert set(router.state_dict()) >= {"weight", "bias"}
    fresh = clusters(seed=5)
    for t, task in enumerate(TASKS):
        assert (router.probabilities(fresh[task]).argmax(-1) == t).float().mean() >= 0.95
    assert router.route(far_point())[0].decision == "dense"


def test_cosine_metric_classifies_clusters():
    router, report = fitted(metric="cosine")
    assert report.heldout_accuracy == 1.0
    fresh = clusters(seed=9)
    for task in TASKS:
        routes = router.route(fresh[task])
        assert sum(r.decision == "select" and r.task == task for r in routes) >= 0.95 * len(routes)


def test_overlapping_clusters_are_less_certain():
    _, separated_fit = fitted(10.0)
    _, overlapping_fit = fitted(1.5)
    assert overlapping_fit.heldout_accuracy < 1.0
    assert (
        min(overlapping_fit.uncertainty_thresholds.values()) > max(separated_fit.uncertainty_thresholds.values()) + 0.3
    )
    assert overlapping_fit.temperature > separated_fit.temperature


def test_fit_is_deterministic():
    (first, first_fit), (second, second_fit) = fitted(3.0, kind="logistic"), fitted(3.0, kind="logistic")
    assert first_fit == second_fit
    assert first.metadata() == second.metadata()
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name])


@pytest.mark.parametrize("kind", ["prototype", "logistic"])
def test_round_trip_through_files(tmp_path, kind):
    router, _ = fitted(3.0, kind=kind, metric="cosine" if kind == "logistic" else "euclidean")
    save_file(router.state_dict(), tmp_path / "router.safetensors")
    (tmp_path / "router.json").write_text(json.dumps(router.metadata()))
    loaded = Router.from_state(
        load_file(tmp_path / "router.safetensors"), json.loads((tmp_path / "router.json").read_text())
    )
    assert loaded.tasks == router.tasks and loaded.settings == router.settings
    probe = torch.cat([clusters(3.0, count=16, seed=11)[task] for task in TASKS] + [far_point()])
    assert torch.equal(loaded.probabilities(probe), router.probabilities(probe))
    assert loaded.route(probe) == router.route(probe)


@pytest.mark.parametrize("kind", list(ROUTER_KINDS))
def test_every_registered_router_kind_fits_routes_and_reloads(kind):
    """A kind is one entry: the settings take its name, fitting stores the tensors it declares with
    their shapes, the folder check asks for them, and it routes separated clusters."""
    router, report = fitted(kind=kind)
    assert RouterSettings(kind=kind).kind == kind and report.heldout_accuracy == 1.0
    sizes = {"tasks": len(TASKS), "width": WIDTH}
    state = router.state_dict()
    for name, axes in ROUTER_KINDS[kind].tensors.items():
        assert tuple(state[name].shape) == tuple(sizes[axis] for axis in axes)
        with pytest.raises(MergewiseError, match=name):
            Router.from_state({other: tensor for other, tensor in state.items() if other != name}, router.metadata())
    loaded = Router.from_state(state, router.metadata())
    fresh = clusters(seed=5)
    for task in TASKS:
        assert [route.task for route in loaded.route(fresh[task])] == [task] * len(fresh[task])


def keyword_clusters(count: int, seed: int) -> dict[str, torch.Tensor]:
    """Tasks told apart by one feature each (a keyword), with a wide spread shared in every other
    feature, as prompts of one format with different keywords are."""
    generator = torch.Generator().manual_seed(seed)
    clustered = {}
    for t, task in enumerate(TASKS):
        x = 4.0 * torch.randn(count, WIDTH, generator=generator)
        x[:, : len(TASKS)] = 0.5 * torch.randn(count, len(TASKS), generator=generator)
        x[:, t] += 2.0
        clustered[task] = x
    return clustered


def test_a_discriminative_router_reads_the_keyword_features_and_keeps_the_spread_test():
    shares = {}
    for kind in ("gaussian", "discriminative"):
        router, _ = Router.fit(keyword_clusters(64, 0), RouterSettings(kind=kind))
        routes = [(task, route) for task, x in keyword_clusters(200, 7).items() for route in router.route(x)]
        shares[kind] = sum(route.decision == "select" and route.task == task for task, route in routes) / len(routes)
        far = torch.zeros(1, WIDTH)
        far[0, 0], far[0, -1] = 2.0, 60.0  # the first task's keyword, far out along a spread feature
        assert router.route(far)[0].decision == "dense"
    assert shares["discriminative"] >= 0.95 and shares["discriminative"] >= shares["gaussian"] + 0.05, shares


def test_an_unknown_router_kind_names_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown router kind 'lda'; known: gaussian, prototype, logistic, discriminative"
    ):
        RouterSettings(kind="lda")


def test_route_json():
    route = Route("blend", "add", {"add": 0.666666, "sort": 0.333334}, 0.918295, 0.5, {"add": 0.666666})
    assert route.to_json() == {
        "decision": "blend",
        "task": "add",
        "probs": {"add": 0.6667, "sort": 0.3333},
        "uncertainty": 0.9183,
        "ood": 0.5,
    }
    json.dumps(route.to_json())


def test_too_few_prompts_names_the_task():
    features = clusters()
    features["reverse"] = features["reverse"][:15]
    with pytest.raises(MergewiseError, match="'reverse' has 15 calibration prompts"):
        Router.fit(features, RouterSettings())


def test_single_task_is_refused():
    with pytest.raises(MergewiseError, match="at least 2 tasks"):
        Router.fit({"add": clusters()["add"]}, RouterSettings())


def test_mismatched_widths_are_refused():
    features = clusters()
    features["sort"] = features["sort"][:, :8]
    with pytest.raises(MergewiseError, match="mismatched widths.*sort: 8"):
        Router.fit(features, RouterSettings())


def test_wrong_feature_width_at_route_time(separated):
    router, _ = separated
    with pytest.raises(MergewiseError, match=r"shape \[N, 16\]"):
        router.route(torch.zeros(2, 8))


def test_missing_state_tensor_is_refused(separated):
    router, _ = separated
    tensors = router.state_dict()
    del tensors["prototypes"]
    with pytest.raises(MergewiseError, match="prototypes"):
        Router.from_state(tensors, router.metadata())


def test_fresh_prompts_spread_over_the_ood_percentiles():
    """Fit prompts enter the calibration distances leave-one-out, so wide features are not biased high."""
    width, generator = 512, torch.Generator().manual_seed(1)
    points = 3.0 * torch.randn(len(TASKS), width, generator=generator)
    features = {task: points[t] + torch.randn(32, width, generator=generator) for t, task in enumerate(TASKS)}
    router, _ = Router.fit(features, RouterSettings())
    fresh = torch.cat([points[t] + torch.randn(100, width, generator=generator) for t in range(len(TASKS))])
    ood = torch.tensor([route.ood for route in router.route(fresh)])
    assert 0.3 < float(ood.median()) < 0.7
    assert float((ood == 1.0).float().mean()) < 0.1


def test_a_router_that_cannot_tell_the_tasks_apart_says_so_and_never_selects():
    """Identically distributed tasks: held-out accuracy near chance is recorded as not telling them
    apart, and probabilities at maximal uncertainty blend (or go dense), whatever the thresholds."""
    router, report = fitted(0.0)
    assert not report.distinguishes_tasks and "cannot tell the tasks apart" in report.warning()
    assert fitted(10.0)[1].distinguishes_tasks
    router.uncertainty_thresholds = torch.ones(len(TASKS))  # as a chance-level fit can leave them
    flat = router.prototypes.mean(0, keepdim=True) * router.std + router.mean  # equidistant from every task
    [route] = router.route(flat)
    assert route.uncertainty > 0.99 and route.decision != "select"


def test_the_gaussian_router_flags_a_prompt_that_moves_a_feature_its_task_never_varies():
    """A value between the tasks' own values of a feature each task holds still (as a prompt's
    keyword does) is out of distribution for the gaussian router, not for the prototype one."""
    generator = torch.Generator().manual_seed(0)
    still = 10  # each task holds feature 10 at its own value: 0, 1, -1
    features = {}
    for t, task in enumerate(TASKS):
        x = 3.0 * torch.eye(len(TASKS), WIDTH)[t] + torch.randn(64, WIDTH, generator=generator)
        x[:, still] = [0.0, 1.0, -1.0][t] + 0.01 * torch.randn(64, generator=generator)
        features[task] = x
    probe = features["add"][:20].clone()
    probe[:, still] = 0.5  # within the feature's range over all tasks, but no task's own value
    gaussian, _ = Router.fit(features, RouterSettings(kind="gaussian"))
    prototype, _ = Router.fit(features, RouterSettings(kind="prototype"))
    assert all(route.decision == "dense" for route in gaussian.route(probe))
    assert sum(route.decision == "dense" for route in prototype.route(probe)) <= 2
    assert all(route.decision == "select" and route.task == "add" for route in gaussian.route(features["add"][:5]))
