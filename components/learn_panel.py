"""Learn: what merging does, measured on the demo zoo (``assets/zoo``) in seconds, for teaching.

Four charts, each with a plain-language note: the merging papers' table on the zoo (read from ``table.json``, never
recomputed at page load), a λ slider for task arithmetic with per-task accuracy updating live, the Git Re-Basin
barrier curve, and EMR-Merging step by step. The numbers come from ``merging.zoo.learn``; the figures from
``components.learn_charts``.

Speed: the slider's λ path keeps everything that does not depend on λ (the base body, Σ_i τ_i, each task's head and
test data, one model object) and only reloads the body θ_base + λ Σ_i τ_i per update; results are kept per λ in a
bounded cache. The barrier curve and the EMR steps are computed on the first opening of the section, then kept.

Threads: torch's thread count is process-wide and ``merging.zoo`` switches it to one thread while it runs. Every
zoo computation here runs on one thread under one lock and puts the count back afterwards, so two visitors' Learn
updates cannot interleave their save/restore and leave the app's merges single-threaded. (A merge running at that
very moment runs on one thread for those milliseconds.)
"""

from __future__ import annotations

import copy
import time
from functools import lru_cache
from pathlib import Path

import gradio as gr
import torch

from merging.errors import MergeError
from merging.zoo import charts as learn_charts
from merging.zoo import learn
from merging.zoo.data import TASKS
from merging.zoo.eval import Zoo, accuracy, average
from merging.zoo.model import HEAD_PREFIX, build_model
from merging.zoo.train import single_thread

from .common import user_errors

DEFAULT_LAMBDA = 0.3  # the table's task arithmetic row
LAMBDA_STEP = 0.05

INTRO = """Everything below runs on the **demo zoo**: a small vision transformer pre-trained on 8×8 digits and
fine-tuned on 8 tasks (which digit, odd or even, greater than 4, rotated, mirrored, inverted, noisy, shifted
digits), each task with its own output layer. Merges are scored on held-out test images: a model that guesses at
random gets 10 % on the digit tasks and 50 % on the yes/no tasks."""

TABLE_TEXT = """**The table.** Each method merges the same 8 fine-tunes into one model. *Average* is the share of
test images it gets right, averaged over the tasks; *normalized* divides each task's score by that task's own
fine-tune first (100 % = as good as keeping 8 separate models). The red diamonds are what each method's own paper
reports for it on a much larger model (ViT-B/32 on 8 photo datasets; the hover names the paper's table): the
ranking, more than the numbers, is what to compare. Where a paper picks a scale on held-out data, the row's was
picked on the zoo's validation images, never its test images."""

LAMBDA_TEXT = """**Task arithmetic.** A *task vector* is what fine-tuning changed: τ = fine-tune − base. Task
arithmetic adds all of them to the base, scaled by one number: θ = θ_base + λ (τ₁ + … + τ₈). At λ = 0 you have
the base model; as λ grows every task's knowledge is added in, but the task vectors also start to interfere
with each other. Slide λ and watch which tasks gain and which collapse: there is a sweet spot, and it is far
below 1. The red marks are each task's own fine-tune, the score a merge hopes to reach."""

BARRIER_TEXT = """**Why averaging two separately trained networks fails.** Two networks trained from different random
starts can compute the same thing with their hidden units in a different order. Averaging them unit by unit then
mixes unrelated units, and accuracy falls in the middle of the path (the *barrier*). Git Re-Basin first reorders
model B's units to line up with A's; REPAIR then restores the spread of each unit's activations, which averaging
shrinks. Fine-tunes of one base (the other charts) share their starting point, so they are already lined up."""

EMR_TEXT = """**EMR-Merging, one step at a time.** *Elect*: keep one shared task vector, with the sign most
task vectors agree on and, per weight, the largest agreeing size. *Mask*: each task keeps only the weights where
its own change has that sign (a tiny on/off map per task). *Rescale*: one number per task brings the size of its
masked vector back to that of its own task vector. Masks and rescalers cost almost no storage; each helps on its
own, and together they come close to the separate fine-tunes (dashed line). The grey bars are the paper's numbers
for the same steps on a much larger model."""


# --- threads ---------------------------------------------------------------------------------------------------

# One zoo computation at a time, single-threaded, the thread count restored (see merging.zoo.train.single_thread).
zoo_work = single_thread


# --- task arithmetic at one λ, fast ------------------------------------------------------------------------------

class TaskArithmeticExplorer:
    """Task arithmetic θ(λ) = θ_base + λ Σ_i τ_i (Ilharco et al. 2023) scored per task with each task's head.

    The same numbers as ``merging.zoo.learn.lambda_sweep`` (the library's registered ``task_arithmetic`` run through
    the engine), without the merge round trip: Σ_i τ_i is summed once in the engine's order (a zero tensor, then
    each τ_i added in the models' order) so θ(λ) is bit-for-bit the engine's, and only the body is reloaded per λ.
    Not thread-safe (one model object): call it inside ``zoo_work``.
    """

    def __init__(self, zoo: Zoo, split: str = "test") -> None:
        self.zoo, self.split, self.tasks = zoo, split, zoo.tasks
        if len(self.tasks) < 2:
            raise MergeError(f"{zoo.root}: the zoo needs at least two task fine-tunes for task arithmetic")
        base = zoo.state("base")
        self.body = [k for k in base if not k.startswith(HEAD_PREFIX)]
        self.base = {k: base[k] for k in self.body}
        self.task_sum = {}
        for k in self.body:
            total = torch.zeros_like(base[k])
            for task in self.tasks:
                total.add_(zoo.state(task)[k] - base[k], alpha=1.0)
            self.task_sum[k] = total
        self.heads = {t: zoo.head(t) for t in self.tasks}
        self.data = {t: zoo.data(t, split) for t in self.tasks}
        self.model = build_model(zoo.config, base)
        self.model.eval()
        self.individual = {t: self._score({k: zoo.state(t)[k] for k in self.body}, [t])[t] for t in self.tasks}

    def _score(self, body: dict[str, torch.Tensor], tasks: list[str]) -> dict[str, float]:
        self.model.load_state_dict(body, strict=False)
        scores = {}
        for task in tasks:
            self.model.load_state_dict(self.heads[task], strict=False)
            x, y = self.data[task]
            scores[task] = accuracy(self.model, x, y, TASKS[task].num_classes)
        return scores

    def __call__(self, lam: float) -> dict:
        """{"lambda", "accuracy": {task: acc}, "average", "individual", "normalized", "split"} at this λ."""
        lam = float(lam)
        scores = self._score({k: self.base[k] + lam * self.task_sum[k] for k in self.body}, self.tasks)
        return {"lambda": lam, "accuracy": scores, "average": average(scores), "individual": dict(self.individual),
                "normalized": sum(scores[t] / self.individual[t] for t in scores) / len(scores), "split": self.split}


@lru_cache(maxsize=2)  # one per zoo folder: a few MB each
def _explorer(root: str, split: str) -> TaskArithmeticExplorer:
    return TaskArithmeticExplorer(Zoo(root), split)


@lru_cache(maxsize=128)  # a slider with step 0.05 has 21 positions; a typed number adds one entry
def _lambda_result(root: str, split: str, lam: float) -> dict:
    return _explorer(root, split)(lam)


def lambda_update(lam: float, root: str | Path | None = None, split: str = "test") -> dict:
    """Per-task accuracy of task arithmetic at ``lam`` on the zoo (cached per λ); same schema as
    ``merging.zoo.learn.lambda_sweep``."""
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise MergeError(f"λ = {lam:g}: pick a value from 0 to 1")
    with zoo_work():
        return copy.deepcopy(_lambda_result(_root(root), split, round(lam, 4)))


# --- the rest, computed once ------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _barrier(root: str) -> dict:
    return learn.barrier_curve(root)


@lru_cache(maxsize=2)
def _emr(root: str) -> dict:
    return learn.emr_steps(root)


def barrier_data(root: str | Path | None = None) -> dict:
    with zoo_work():
        return copy.deepcopy(_barrier(_root(root)))


def emr_data(root: str | Path | None = None) -> dict:
    with zoo_work():
        return copy.deepcopy(_emr(_root(root)))


def table_data(root: str | Path | None = None) -> dict:
    """The committed table (``<zoo>/table.json``); no merge runs here."""
    path = Path(_root(root)) / "table.json"
    if not path.is_file():
        raise MergeError(f"{path}: no table yet (python -m merging zoo table writes it)")
    return learn.table_data(_root(root))


def _root(root: str | Path | None) -> str:
    from merging.zoo.train import DEFAULT_ZOO_DIR

    return str(Path(root or DEFAULT_ZOO_DIR).resolve())


def zoo_available(root: str | Path | None = None) -> bool:
    return (Path(_root(root)) / "base" / "model.safetensors").is_file()


# --- what the page shows ----------------------------------------------------------------------------------------

def lambda_view(lam: float, root: str | Path | None = None) -> tuple:
    """(figure, one-line status) for the slider."""
    started = time.perf_counter()
    result = lambda_update(lam, root)
    fig = learn_charts.lambda_chart(result)
    ms = 1000 * (time.perf_counter() - started)
    worst = min(result["accuracy"], key=lambda t: result["accuracy"][t] / result["individual"][t])
    status = (f"λ = {result['lambda']:.2f}: average {100 * result['average']:.1f} % "
              f"(the fine-tunes: {100 * average(result['individual']):.1f} %); hardest hit: **{worst}** · "
              f"computed in {ms:.0f} ms")
    return fig, status


def open_view(lam: float, root: str | Path | None = None) -> tuple:
    """Every chart of the section: the table, task arithmetic at ``lam``, the barrier curve, EMR step by step."""
    table = learn_charts.table_chart(table_data(root))
    lambda_fig, lambda_status = lambda_view(lam, root)
    curve = barrier_data(root)
    emr = emr_data(root)
    barrier = curve.get("barrier") or {}
    barrier_status = ("Barrier (largest drop below the straight line between the two models): "
                      + ", ".join(f"{label} {100 * barrier[key]:.1f} points"
                                  for key, label, _ in learn_charts.CURVES if key in barrier)
                      + f"; re-basin moved {100 * curve.get('matched_units', 0):.0f} % of B's hidden units.")
    return (table, lambda_fig, lambda_status, learn_charts.barrier_chart(curve), barrier_status,
            learn_charts.emr_steps_chart(emr))


def build_learn_panel(root: str | Path | None = None) -> dict:
    """The "Learn" section (closed until opened: nothing is computed before that) with its events wired."""
    with gr.Accordion("Learn: what merging does, measured on the demo zoo", open=False, elem_id="learn") as section:
        if not zoo_available(root):
            gr.Markdown(f"The demo zoo is not in `{_root(root)}`: `python -m merging zoo build` creates it.")
            return {"section": section}
        gr.Markdown(INTRO)
        with gr.Row(equal_height=False):
            with gr.Column(scale=7):
                table_plot = gr.Plot(show_label=False, elem_id="learn-table")
            with gr.Column(scale=3):
                gr.Markdown(TABLE_TEXT)
        with gr.Row(equal_height=False):
            with gr.Column(scale=7):
                slider = gr.Slider(0, 1, value=DEFAULT_LAMBDA, step=LAMBDA_STEP, label="λ (task arithmetic)",
                                   elem_id="learn-lambda")
                lambda_plot = gr.Plot(show_label=False, elem_id="learn-lambda-chart")
            with gr.Column(scale=3):
                gr.Markdown(LAMBDA_TEXT)
                lambda_status = gr.Markdown(elem_id="learn-lambda-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=7):
                barrier_plot = gr.Plot(show_label=False, elem_id="learn-barrier")
            with gr.Column(scale=3):
                gr.Markdown(BARRIER_TEXT)
                barrier_status = gr.Markdown(elem_id="learn-barrier-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=7):
                emr_plot = gr.Plot(show_label=False, elem_id="learn-emr")
            with gr.Column(scale=3):
                gr.Markdown(EMR_TEXT)

    @user_errors
    def open_learn(lam: float) -> tuple:
        return open_view(lam, root)

    @user_errors
    def set_lambda(lam: float) -> tuple:
        return lambda_view(lam, root)

    section.expand(open_learn, [slider],
                   [table_plot, lambda_plot, lambda_status, barrier_plot, barrier_status, emr_plot],
                   concurrency_id="learn", api_visibility="private")
    slider.change(set_lambda, [slider], [lambda_plot, lambda_status],
                  concurrency_id="learn", trigger_mode="always_last", show_progress="hidden",
                  api_visibility="private")
    return {"section": section, "slider": slider, "plots": [table_plot, lambda_plot, barrier_plot, emr_plot]}
