"""Compress a span's decoder layers in place: plain or whitened SVD, uniform or globally allocated ranks.

Call order of :func:`compress_layers` for the whitened method:

1. *Spectra.* Calibration hidden states run through the original layers; a :class:`GramCollector`
   gathers each projection's input Gram matrix, giving each matrix's whitened singular values.
2. *Ranks.* Eq. 15 per matrix (``allocation="uniform"``), or one global parameter budget
   ``C · Σ m·n`` split by :func:`allocate_ranks`, which may keep some matrices dense: matrices
   weighed by relative output error (``"global"``) or by measured loss sensitivity (``"loss"``,
   the default for whitened ratios; sensitivities passed in by the caller). Costs are those of
   the storage form (``factor_form``: the interpolative form by default, eq. 9's on request);
   the energy rule (eq. 12) applies to whitened energy, i.e. to the output on calibration inputs.
3. *Sequential truncation.* Calibration runs again, now through the already-compressed layers:
   each layer's projections are whitened with Grams of the inputs they will really see, stage by
   stage (q/k/v, then o, then gate/up, then down), so errors of earlier stages are accounted for.
   Each truncated projection is stored in ``factor_form`` before the next stage runs.

The plain method needs no calibration: eq. 15 (ratio) or eq. 12 (energy) on W's own spectrum.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from efedllm.compression.allocation import MatrixSpectrum, allocate_ranks, uniform_ranks
from efedllm.compression.lowrank import linear_nbytes, low_rank_module
from efedllm.compression.rank import FactorForm, factor_parameter_count, rank_for_energy
from efedllm.compression.svd import SvdAlgorithm, singular_values, truncated_svd
from efedllm.compression.output_fit import InputRecorder, output_fit_svd, paired_grams
from efedllm.compression.whitening import GramCollector, whitened_singular_values, whitening_factor
from efedllm.models.family import LLAMA_PROJECTION_STAGES

# (layer index, hidden [B, T, H]) -> hidden [B, T, H], running the span's layer i causally
LayerRunner = Callable[[int, torch.Tensor], torch.Tensor]

# projections in the order their inputs are produced inside a Llama-style decoder layer
# the default projections, in calibration order (a family names its own: ModelFamily.projection_stages)
PROJECTION_STAGES = LLAMA_PROJECTION_STAGES


class CompressionMethod(str, enum.Enum):
    PLAIN = "plain"
    WHITENED = "whitened"


class RankAllocation(str, enum.Enum):
    UNIFORM = "uniform"  # eq. 15 / eq. 12 per matrix
    GLOBAL = "global"  # one parameter budget over the span (ratio only), matrices weighed by relative output error
    LOSS = "loss"  # one parameter budget, matrices weighed by measured loss sensitivity (whitened, ratio only)


@dataclass(frozen=True)
class CompressionConfig:
    """How to compress a span. Exactly one of ``ratio`` (eq. 10) or ``energy`` (eq. 12) is set.

    ``ratio`` counts the span's projection parameters: a dense matrix costs m·n, a low-rank one
    k·(m+n−k) in the interpolative ``factor_form`` (the default) or k·(m+n+1) in eq. 9's ``"svd"``.
    ``allocation`` defaults to ``"loss"`` for a whitened ratio (the best measured), ``"global"``
    for a plain one and ``"uniform"`` for an energy. Calibration (whitened only): ``calibration_samples`` windows of
    ``calibration_length`` tokens from ``calibration_text`` (default: the shared WikiText-2 file),
    drawn with ``seed`` from the part of the text after ``calibration_offset`` tokens, so that
    they do not overlap the perplexity evaluation windows at the start of the file.

    ``allocation="loss"`` weighs each matrix's whitened output error by its loss sensitivity,
    measured on ``sensitivity_samples`` further windows (drawn with ``seed + 1``, same offset and
    length; see :mod:`~efedllm.compression.sensitivity`). ``fit_dense_outputs`` fits each truncated
    projection to the dense model's outputs instead of W's own output on the drifted inputs
    (:mod:`~efedllm.compression.output_fit`); measured worse on SmolLM2-135M, so off by default.
    """

    ratio: float | None = None
    energy: float | None = None
    method: CompressionMethod = CompressionMethod.WHITENED
    allocation: RankAllocation | None = None
    factor_form: FactorForm = FactorForm.INTERPOLATIVE
    algorithm: SvdAlgorithm = SvdAlgorithm.EXACT
    allow_dense: bool = True
    fit_dense_outputs: bool = False
    calibration_samples: int = 32
    calibration_length: int = 512
    calibration_offset: int = 65_536
    calibration_text: Path | None = None
    seed: int = 0
    sensitivity_samples: int = 8

    def __post_init__(self) -> None:
        if self.allocation is None:
            object.__setattr__(self, "allocation", _default_allocation(self))
        for name, enum_type in (("method", CompressionMethod), ("allocation", RankAllocation), ("algorithm", SvdAlgorithm),
                                ("factor_form", FactorForm)):
            try:
                object.__setattr__(self, name, enum_type(getattr(self, name)))
            except ValueError:
                choices = ", ".join(member.value for member in enum_type)
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}") from None
        if (self.ratio is None) == (self.energy is None):
            raise ValueError("set exactly one of ratio (--svd-ratio) or energy (--svd-energy)")
        for name in ("ratio", "energy"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if self.energy is not None and self.allocation is not RankAllocation.UNIFORM:
            object.__setattr__(self, "allocation", RankAllocation.UNIFORM)  # energy is a per-matrix rule
        if self.allocation is RankAllocation.LOSS and self.method is not CompressionMethod.WHITENED:
            raise ValueError("allocation 'loss' weighs whitened output errors: it needs method 'whitened'")
        for name in ("calibration_samples", "calibration_length", "sensitivity_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.calibration_offset, int) or self.calibration_offset < 0:
            raise ValueError(f"calibration_offset must be a non-negative integer, got {self.calibration_offset!r}")
        if self.calibration_text is not None:
            object.__setattr__(self, "calibration_text", Path(self.calibration_text))

    @property
    def needs_calibration(self) -> bool:
        return self.method is CompressionMethod.WHITENED

    def signature(self) -> dict:
        """What determines the compressed weights, for comparing two peers' settings (the text's path excluded)."""
        return {
            "ratio": self.ratio, "energy": self.energy, "method": self.method.value, "allocation": self.allocation.value,
            "algorithm": self.algorithm.value, "factor_form": self.factor_form.value, "allow_dense": self.allow_dense,
            "fit_dense_outputs": self.fit_dense_outputs, "calibration_samples": self.calibration_samples,
            "calibration_length": self.calibration_length, "calibration_offset": self.calibration_offset, "seed": self.seed,
            "sensitivity_samples": self.sensitivity_samples,
        }


def _default_allocation(config: CompressionConfig) -> RankAllocation:
    """Loss-weighted for a whitened ratio (measured best), global for a plain ratio, per matrix for an energy."""
    if config.energy is not None:
        return RankAllocation.UNIFORM
    return RankAllocation.LOSS if config.method == CompressionMethod.WHITENED else RankAllocation.GLOBAL


@dataclass(frozen=True)
class MatrixReport:
    layer: int
    name: str
    shape: tuple[int, int]
    rank: int | None  # None: kept dense
    retained_energy: float  # of W's own spectrum, eq. 12's measure
    output_energy: float | None  # of W·S (whitened): the output on calibration inputs
    parameters: int  # eq. 9 (m·n when dense)
    nbytes: int


@dataclass(frozen=True)
class CompressionReport:
    config: CompressionConfig
    matrices: tuple[MatrixReport, ...] = field(default_factory=tuple)

    @property
    def dense_parameters(self) -> int:
        return sum(report.shape[0] * report.shape[1] for report in self.matrices)

    @property
    def parameters(self) -> int:
        return sum(report.parameters for report in self.matrices)

    @property
    def achieved_ratio(self) -> float:
        return self.parameters / self.dense_parameters

    @property
    def mean_retained_energy(self) -> float:
        return sum(report.retained_energy for report in self.matrices) / len(self.matrices)

    @property
    def nbytes(self) -> int:
        return sum(report.nbytes for report in self.matrices)

    def summary(self) -> dict:
        return {
            "matrices": len(self.matrices),
            "dense_kept": sum(report.rank is None for report in self.matrices),
            "achieved_ratio": round(self.achieved_ratio, 4),
            "mean_retained_energy": round(self.mean_retained_energy, 4),
            "projection_bytes": self.nbytes,
        }


def projections(layer: nn.Module, stages=PROJECTION_STAGES) -> dict[str, nn.Linear]:
    """The layer's projections by dotted name, in ``stages`` order."""
    found = {}
    for stage in stages:
        for name in stage:
            module = layer.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{name} is {type(module).__name__}, expected an uncompressed nn.Linear")
            found[name] = module
    return found


def _replace(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(layer.get_submodule(parent_name), child, module)


def _energy(values: torch.Tensor, rank: int | None) -> float:
    squares = values.double() ** 2
    return 1.0 if rank is None else float(squares[:rank].sum() / squares.sum().clamp_min(1e-300))


def _plain_ranks(config: CompressionConfig, weights: list[torch.Tensor], spectra: list[torch.Tensor], sensitivities=None) -> list[int | None]:
    if config.energy is not None:
        return [rank_for_energy(values.tolist(), config.energy) for values in spectra]
    if config.allocation is RankAllocation.LOSS and sensitivities is None:
        raise ValueError("allocation 'loss' needs the projections' loss sensitivities (efedllm.compression.sensitivity)")
    if config.allocation in (RankAllocation.GLOBAL, RankAllocation.LOSS):
        budget = config.ratio * sum(weight.numel() for weight in weights)
        loss_weights = sensitivities if config.allocation is RankAllocation.LOSS else [allocation_weight(values) for values in spectra]
        problems = [MatrixSpectrum(*weight.shape, values, float(w)) for weight, values, w in zip(weights, spectra, loss_weights)]
        return allocate_ranks(problems, budget, config.allow_dense, config.factor_form)
    return uniform_ranks([tuple(weight.shape) for weight in weights], config.ratio, config.factor_form)


def allocation_weight(values: torch.Tensor) -> float:
    """Loss weight of a matrix in :func:`allocate_ranks`: 1 / Σσ², its dropped share of its own output energy."""
    return 1.0 / float((values.double() ** 2).sum().clamp_min(1e-300))


def whitened_spectra(layers: nn.ModuleList, hidden: torch.Tensor, run_layer: LayerRunner,
                     stages=PROJECTION_STAGES) -> list[torch.Tensor]:
    """Pass 1: whitened singular values of every projection (layer order, then ``stages`` order).

    Inputs come from the original layers; the result depends only on the model and the calibration
    inputs, so callers that try several ratios can compute it once and pass it to :func:`compress_layers`.
    """
    _check_hidden(hidden)
    spectra = []
    for index, layer in enumerate(layers):
        modules = projections(layer, stages)
        collector = GramCollector(modules)
        with torch.no_grad():
            next_hidden = run_layer(index, hidden)
        grams = collector.close()
        for name, module in modules.items():
            spectra.append(whitened_singular_values(module.weight.detach(), whitening_factor(grams[name])))
        hidden = next_hidden
    return spectra


def compress_layers(
    layers: nn.ModuleList,
    config: CompressionConfig,
    calibration_hidden: torch.Tensor | None = None,
    run_layer: LayerRunner | None = None,
    spectra: list[torch.Tensor] | None = None,
    sensitivities: list[float] | None = None,
    stages=PROJECTION_STAGES,
) -> CompressionReport:
    """Replace every projection of ``layers`` by a low-rank module in ``config.factor_form`` (or keep it dense), in place.

    ``calibration_hidden`` [B, T, H] are the span's input hidden states for calibration and
    ``run_layer(i, hidden)`` runs them through ``layers[i]``; both are needed for whitening only.
    ``spectra``: the output of :func:`whitened_spectra` for these layers and inputs, if already known.
    ``stages``: the family's projections in calibration order (``ModelFamily.projection_stages``).
    """
    modules = [module for layer in layers for module in projections(layer, stages).values()]
    weights = [module.weight.detach() for module in modules]
    plain_spectra = [singular_values(weight.float()) for weight in weights]
    if not config.needs_calibration:
        ranks = _plain_ranks(config, weights, plain_spectra)
        reports = _compress_plain(layers, config, ranks, plain_spectra, stages)
        return CompressionReport(config, tuple(reports))
    if calibration_hidden is None or run_layer is None:
        raise ValueError("whitened compression needs calibration_hidden and run_layer")
    _check_hidden(calibration_hidden)
    whitened = spectra if spectra is not None else whitened_spectra(layers, calibration_hidden, run_layer, stages)
    if len(whitened) != len(modules):
        raise ValueError(f"got {len(whitened)} spectra for {len(modules)} projections")
    if sensitivities is not None and len(sensitivities) != len(modules):
        raise ValueError(f"got {len(sensitivities)} sensitivities for {len(modules)} projections")
    ranks = _plain_ranks(config, weights, whitened, sensitivities)
    reports = _compress_sequentially(layers, config, ranks, calibration_hidden, run_layer, stages)
    reports = [
        MatrixReport(r.layer, r.name, r.shape, r.rank, _energy(plain, r.rank), _energy(white, r.rank), r.parameters, r.nbytes)
        for r, plain, white in zip(reports, plain_spectra, whitened)
    ]
    return CompressionReport(config, tuple(reports))


def _check_hidden(hidden: torch.Tensor) -> None:
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"calibration hidden states must be a float [B, T, H] tensor, got {tuple(hidden.shape)} {hidden.dtype}")
    if not torch.isfinite(hidden).all():
        raise ValueError("calibration hidden states contain NaN or infinite values")


def _report(index: int, name: str, module: nn.Module, rank: int | None, shape: tuple[int, int], form: FactorForm) -> MatrixReport:
    count = shape[0] * shape[1] if rank is None else factor_parameter_count(*shape, rank, form)
    return MatrixReport(index, name, shape, rank, 1.0, None, count, linear_nbytes(module))


def _compress_plain(layers, config, ranks, spectra, stages) -> list[MatrixReport]:
    reports, position = [], 0
    for index, layer in enumerate(layers):
        for name, module in projections(layer, stages).items():
            rank, values = ranks[position], spectra[position]
            shape = tuple(module.weight.shape)
            if rank is not None:
                factors = truncated_svd(module.weight.detach().double(), rank, config.algorithm)
                module = low_rank_module(factors, module.bias, module.weight.dtype, config.factor_form)
                _replace(layer, name, module)
            report = _report(index, name, module, rank, shape, config.factor_form)
            reports.append(MatrixReport(index, name, shape, rank, _energy(values, rank), None, report.parameters, report.nbytes))
            position += 1
    return reports


def _compress_sequentially(layers, config, ranks, hidden, run_layer, stages) -> list[MatrixReport]:
    """Pass 3: per layer and stage, fit the projections on the inputs produced by the already-compressed model.

    With ``fit_dense_outputs`` the target is the dense layer's output on the dense model's inputs
    (:mod:`~efedllm.compression.output_fit`); otherwise it is W's own output on the compressed inputs
    (plain whitening). The dense layer is a copy run in the layer's slot, so ``run_layer`` must read
    ``layers[i]`` at call time (both runners in ``calibration`` do).
    """
    reports, rank_of, dense_hidden = [], iter(ranks), hidden
    for index, layer in enumerate(layers):
        layer_ranks = {name: next(rank_of) for name in projections(layer, stages)}
        dense_inputs, dense_output = _dense_inputs(layers, index, dense_hidden, run_layer, stages) if config.fit_dense_outputs else (None, None)
        for stage in stages:
            stage_modules = {name: layer.get_submodule(name) for name in stage if layer_ranks[name] is not None}
            inputs = _record_inputs(stage_modules, index, hidden, run_layer) if stage_modules else {}
            for name in stage:
                module = layer.get_submodule(name)
                shape = tuple(module.weight.shape)
                if layer_ranks[name] is not None:
                    reference = inputs[name] if dense_inputs is None else dense_inputs[name]
                    module = _fitted(module, inputs[name], reference, layer_ranks[name], config)
                    _replace(layer, name, module)
                reports.append(_report(index, name, module, layer_ranks[name], shape, config.factor_form))
        with torch.no_grad():
            hidden = run_layer(index, hidden)
        dense_hidden = hidden if dense_output is None else dense_output
    return reports


def _record_inputs(modules: dict[str, nn.Module], index: int, hidden: torch.Tensor, run_layer: LayerRunner) -> dict[str, torch.Tensor]:
    recorder = InputRecorder(modules)
    try:
        with torch.no_grad():
            run_layer(index, hidden)
    finally:
        inputs = recorder.close()
    return inputs


def _dense_inputs(layers: nn.ModuleList, index: int, hidden: torch.Tensor, run_layer: LayerRunner,
                  stages=PROJECTION_STAGES) -> tuple[dict, torch.Tensor]:
    """Every projection's inputs and the output of a dense copy of layer ``index`` run on the dense model's hidden states."""
    original = layers[index]
    dense = copy.deepcopy(original)
    layers[index] = dense
    recorder = InputRecorder(projections(dense, stages))
    try:
        with torch.no_grad():
            output = run_layer(index, hidden)
    finally:
        inputs = recorder.close()
        layers[index] = original
    return inputs, output


def _fitted(module: nn.Linear, inputs: torch.Tensor, reference: torch.Tensor, rank: int, config: CompressionConfig) -> nn.Module:
    gram, cross = paired_grams(inputs, reference)
    factors = output_fit_svd(module.weight.detach(), whitening_factor(gram), cross, rank, config.algorithm)
    return low_rank_module(factors, module.bias, module.weight.dtype, config.factor_form)
