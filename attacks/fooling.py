"""Fooling images by evolution (Nguyen, Yosinski, Clune, "Deep Neural Networks are Easily
Fooled", CVPR 2015): images no human would recognise that the model labels with ≥ 99 %
confidence, found with MAP-Elites and only the model's outputs.

The attack has no source image: `FoolingEvolution(...)(model, input_shape=(C, H, W))`
returns a `FoolingResult` with the best image and its confidence for every class.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from bastion.attacks import cppn
from bastion.attacks.base import Model
from bastion.attacks.black_box import BlackBoxQueries
from bastion.attacks.evolution_ops import polynomial_mutation, sbx_crossover
from bastion.errors import ConfigError, InvalidInputError, ModelOutputError
from bastion.modes import eval_mode
from bastion.validation import looks_like_probabilities

FoolingProgress = Callable[[int, int, torch.Tensor], None]
"""`progress(done, total, best_confidence_per_class)`, called after every generation."""

Encoding = Literal["direct", "cppn"]


@dataclass
class FoolingResult:
    """The best image found for each asked class.

    `confidence[i]` is the softmax probability of `classes[i]` on `images[i]` and
    `predicted[i]` the model's label for it (a fooling image needs both: high confidence
    and the class being the argmax). `generation[i]` is the generation (gradient ascent:
    the step) that produced the image; `history[g, i]` the best confidence for class i
    after generation g (row 0: the initial population or the start image); `num_classes`
    the model's output count. `queries`
    counts the images sent to the model, `gradients` the backward passes per image.
    """

    classes: torch.Tensor
    images: torch.Tensor
    confidence: torch.Tensor
    predicted: torch.Tensor
    generation: torch.Tensor
    history: torch.Tensor
    num_classes: int
    generations: int
    queries: int
    gradients: int
    seconds: float

    def fooled_mask(self, threshold: float = 0.99) -> torch.Tensor:
        """Per class: labelled as that class with confidence ≥ `threshold`."""
        return (self.confidence >= threshold) & (self.predicted == self.classes)

    def fooled(self, threshold: float = 0.99) -> float:
        """The fraction of classes fooled above `threshold` (the suite's headline figure)."""
        return float(self.fooled_mask(threshold).float().mean()) if len(self.classes) else 0.0

    def first_generation(self, threshold: float = 0.99) -> torch.Tensor:
        """Per class, the first generation whose best confidence reached `threshold` (−1: never)."""
        reached = self.history >= threshold
        first = reached.float().argmax(0)
        return torch.where(reached.any(0), first, torch.full_like(first, -1))

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Plain numbers for JSON: per-class rows and the totals."""
        first = self.first_generation(0.99).tolist()
        rows = []
        for i, j in enumerate(self.classes.tolist()):
            rows.append(
                {
                    "class": j,
                    "name": class_names[j] if class_names is not None else str(j),
                    "confidence": float(self.confidence[i]),
                    "predicted": int(self.predicted[i]),
                    "generation": int(self.generation[i]),
                    "first_generation_0.99": first[i],
                }
            )
        return {
            "fooled_0.99": self.fooled(0.99),
            "fooled_0.9999": self.fooled(0.9999),
            "median_confidence": float(self.confidence.median()) if rows else 0.0,
            "generations": self.generations,
            "queries": self.queries,
            "gradients": self.gradients,
            "seconds": self.seconds,
            "classes": rows,
        }


def check_input_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """The image shape (C, H, W) as three positive ints, or an `InvalidInputError`."""
    try:
        dims = tuple(int(v) for v in shape)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise InvalidInputError(
            f"input_shape must be (C, H, W) with positive sizes, got {shape!r}; "
            "pass the shape of one image, e.g. data.x.shape[1:]"
        )
    return dims[0], dims[1], dims[2]


def resolve_classes(classes: Sequence[int] | torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """The asked classes as a long tensor (all of them by default), checked against the model."""
    if classes is None:
        return torch.arange(num_classes)
    values = [int(c) for c in classes]
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"classes must be distinct class indices, got {values}")
    if min(values) < 0 or max(values) >= num_classes:
        raise ConfigError(
            f"classes must lie in [0, {num_classes}) for a model with {num_classes} outputs, "
            f"got {values}"
        )
    return torch.tensor(values)


def model_device(model: Model) -> torch.device:
    """The device of the model's first parameter (CPU for callables and parameterless models)."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
    first = next(params, None)
    return first.device if first is not None else torch.device("cpu")


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax confidences (the papers' fitness), refusing a model that already outputs them."""
    if looks_like_probabilities(logits.detach()):
        raise ModelOutputError(
            "the model's outputs sum to 1 (probabilities); fooling confidences are the softmax "
            "of logits, so pass the model without its final softmax"
        )
    return logits.softmax(1)


def first_call(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`forward(x)` for the first batch, turning images the model cannot take (wrong channels
    or size) into a one-line user error."""
    try:
        return forward(x)
    except RuntimeError as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        raise InvalidInputError(
            f"the model cannot take images of shape {tuple(x.shape[1:])} ({exc}); "
            "give the input_shape the model expects"
        ) from None


class _Genomes(Protocol):
    def random(self, n: int, generator: torch.Generator) -> list[Any]: ...
    def offspring(
        self, parents: list[Any], size: int, generation: int, generator: torch.Generator
    ) -> list[Any]: ...
    def render(self, genomes: list[Any], device: torch.device) -> torch.Tensor: ...


@dataclass
class _Direct:
    """Direct encoding: one gene in [0, 1] per pixel value, pixel = int(g·255)/255."""

    shape: tuple[int, int, int]
    mutation_rate: float
    halve_every: int | None
    eta_m: float
    crossover_rate: float
    eta_c: float

    def random(self, n: int, generator: torch.Generator) -> list[Any]:
        return list(torch.rand(n, math.prod(self.shape), generator=generator).unbind(0))

    def offspring(
        self, parents: list[Any], size: int, generation: int, generator: torch.Generator
    ) -> list[Any]:
        pop = torch.stack(parents)
        pairs = torch.randint(len(pop), (math.ceil(size / 2), 2), generator=generator)
        a, b = sbx_crossover(
            pop[pairs[:, 0]], pop[pairs[:, 1]], rate=self.crossover_rate, eta=self.eta_c,
            generator=generator,
        )  # fmt: skip
        children = torch.stack([a, b], 1).reshape(-1, pop.shape[1])[:size]
        rate = self.mutation_rate
        if self.halve_every:
            rate *= 0.5 ** (generation // self.halve_every)
        children = polynomial_mutation(children, rate=rate, eta=self.eta_m, generator=generator)
        return list(children.unbind(0))

    def render(self, genomes: list[Any], device: torch.device) -> torch.Tensor:
        genes = torch.stack(genomes).reshape(-1, *self.shape)
        return (torch.floor(genes * 255) / 255).to(device)


@dataclass
class _Cppn:
    """CPPN encoding (`bastion.attacks.cppn`): one small network per image."""

    shape: tuple[int, int, int]
    params: cppn.CppnParams

    def random(self, n: int, generator: torch.Generator) -> list[Any]:
        return cppn.random_genomes(n, self.shape[0], self.params, generator)

    def offspring(
        self, parents: list[Any], size: int, generation: int, generator: torch.Generator
    ) -> list[Any]:
        return cppn.offspring(parents, size, self.params, generator)

    def render(self, genomes: list[Any], device: torch.device) -> torch.Tensor:
        return cppn.render(genomes, self.shape, device)


class _Archive:
    """MAP-Elites with one bin per asked class: every child is tried in every bin."""

    def __init__(self, classes: torch.Tensor, shape: tuple[int, int, int], k: int) -> None:
        device = classes.device
        self.classes = classes
        self.genomes: list[Any] = [None] * len(classes)
        self.best = torch.full((len(classes),), -1.0, device=device)
        self.images = torch.zeros(len(classes), *shape, device=device)
        self.probs = torch.zeros(len(classes), k, device=device)
        self.found = torch.zeros(len(classes), dtype=torch.long, device=device)
        self.history: list[torch.Tensor] = []

    def insert(
        self, genomes: list[Any], images: torch.Tensor, probs: torch.Tensor, generation: int
    ) -> None:
        top, who = probs[:, self.classes].max(0)
        better = top > self.best
        for i in better.nonzero().flatten().tolist():
            self.genomes[i] = genomes[int(who[i])]
        self.best = torch.where(better, top, self.best)
        self.images[better] = images[who[better]]
        self.probs[better] = probs[who[better]]
        self.found[better] = generation
        self.history.append(self.best.cpu())


class FoolingEvolution:
    """Evolve one fooling image per class with MAP-Elites (Nguyen et al. 2015, §2.1–2.3).

    Defaults are the authors' MNIST experiment: 200 random genomes, then per generation 200
    children from 100 pairs of parents drawn uniformly from the archive; direct encoding
    with SBX crossover (rate 0.5, η_c = 10) and polynomial mutation (rate 0.1 per gene,
    η_m = 15); or `encoding="cppn"` with the CPPN operators of `bastion.attacks.cppn`.
    Every child is scored (softmax, one batched query per generation) against every class
    bin and replaces each elite it beats. `generations` = 1000 as in the code (the paper's
    MNIST figures show 200); `halve_every=1000` gives the ImageNet mutation schedule.
    The run stops early at `time_budget` seconds or once every class reaches
    `target_confidence` (both off by default). RGB genomes (not the code's 8-bit HLS)
    for colour images.
    """

    def __init__(
        self,
        encoding: Encoding = "direct",
        *,
        generations: int = 1000,
        population: int = 200,
        init_size: int = 200,
        mutation_rate: float = 0.1,
        halve_every: int | None = None,
        eta_m: float = 15.0,
        crossover_rate: float = 0.5,
        eta_c: float = 10.0,
        cppn_params: cppn.CppnParams | None = None,
        target_confidence: float | None = None,
        time_budget: float | None = None,
        chunk: int = 1024,
        seed: int = 0,
    ) -> None:
        if encoding not in ("direct", "cppn"):
            raise ConfigError(f"encoding must be 'direct' or 'cppn', got {encoding!r}")
        if generations < 0 or population < 1 or init_size < 1:
            raise ConfigError(
                "generations must be >= 0, population and init_size >= 1; "
                f"got {generations}, {population}, {init_size}"
            )
        for name, rate in (("mutation_rate", mutation_rate), ("crossover_rate", crossover_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {rate}")
        if eta_m < 0 or eta_c < 0:
            raise ConfigError(f"eta_m and eta_c must be >= 0, got {eta_m} and {eta_c}")
        if halve_every is not None and halve_every < 1:
            raise ConfigError(f"halve_every must be >= 1 generation or None, got {halve_every}")
        if target_confidence is not None and not 0.0 < target_confidence <= 1.0:
            raise ConfigError(f"target_confidence must lie in (0, 1], got {target_confidence}")
        if time_budget is not None and time_budget <= 0:
            raise ConfigError(f"time_budget must be > 0 seconds, got {time_budget}")
        self.encoding = encoding
        self.generations = generations
        self.population = population
        self.init_size = init_size
        self.mutation_rate = mutation_rate
        self.halve_every = halve_every
        self.eta_m = eta_m
        self.crossover_rate = crossover_rate
        self.eta_c = eta_c
        self.cppn_params = cppn_params or cppn.CppnParams()
        self.target_confidence = target_confidence
        self.time_budget = time_budget
        self.chunk = chunk
        self.seed = seed

    def _genomes(self, shape: tuple[int, int, int]) -> _Genomes:
        if self.encoding == "cppn":
            return _Cppn(shape, self.cppn_params)
        return _Direct(
            shape, self.mutation_rate, self.halve_every, self.eta_m, self.crossover_rate, self.eta_c
        )

    def __call__(
        self,
        model: Model,
        *,
        input_shape: Sequence[int],
        classes: Sequence[int] | torch.Tensor | None = None,
        progress: FoolingProgress | None = None,
    ) -> FoolingResult:
        """The best image per class (all classes by default) for images of `input_shape`."""
        start = time.perf_counter()
        shape = check_input_shape(input_shape)
        device = model_device(model)
        generator = torch.Generator().manual_seed(self.seed)
        encoding = self._genomes(shape)
        queries = BlackBoxQueries(model, chunk=self.chunk)
        with eval_mode(model):
            genomes = encoding.random(self.init_size, generator)
            images = encoding.render(genomes, device)
            probs = probabilities(first_call(queries.logits, images))
            asked = resolve_classes(classes, probs.shape[1]).to(device)
            archive = _Archive(asked, shape, probs.shape[1])
            archive.insert(genomes, images, probs, 0)
            done = 0
            if progress is not None:
                progress(0, self.generations, archive.best)
            while done < self.generations and not self._stop(start, archive.best):
                done += 1
                parents = [g for g in archive.genomes if g is not None]
                genomes = encoding.offspring(parents, self.population, done, generator)
                images = encoding.render(genomes, device)
                archive.insert(genomes, images, probabilities(queries.logits(images)), done)
                if progress is not None:
                    progress(done, self.generations, archive.best)
        return FoolingResult(
            classes=asked,
            images=archive.images,
            confidence=archive.best,
            predicted=archive.probs.argmax(1),
            generation=archive.found,
            history=torch.stack(archive.history),
            num_classes=archive.probs.shape[1],
            generations=done,
            queries=queries.count,
            gradients=0,
            seconds=time.perf_counter() - start,
        )

    def _stop(self, start: float, best: torch.Tensor) -> bool:
        if self.time_budget is not None and time.perf_counter() - start >= self.time_budget:
            return True
        return self.target_confidence is not None and bool((best >= self.target_confidence).all())
