"""FedDST's server side (Bibikar et al., AAAI 2022), as DESIGN section 6 decides it.

- Initial masks: the per-layer densities of ``distribution`` ("erk" or "uniform") meeting the
  global ``density`` (default 0.2), keeping the largest magnitudes of the random initialisation
  (or a random subset). The kept count of each layer, ``k_l``, is the budget for the whole run.
- Rounds: devices train their sparse subnetwork; on rounds ``1, 1 + R_adj, ...`` before ``T_end``
  (default half the run) the round carries a ``Readjust`` with
  ``alpha_r = alpha/2 * (1 + cos(pi r / T_end))`` at ``at_fraction`` of local training (0.5: grown
  weights train before upload; 1.0 is the reference code's "after the last epoch").
- Aggregation: per coordinate, the example-weighted mean over the devices whose mask holds it;
  new mask = coordinates held by at least ``min_votes`` devices, then per-layer top-k by magnitude
  back to ``k_l``; everything outside the mask is zero (``aggregate.sparse_vote_merge``).

Where the paper's intent and the reference code differ, the paper is the default:

- ``fill_to_budget=True`` keeps exactly ``k_l`` per layer every round; when fewer coordinates have
  ``min_votes`` votes the mask is filled (by votes, then magnitude; see ``sparse_vote_merge``).
  The reference re-prunes only when the union is denser than the budget and otherwise lets the
  model get sparser (``fill_to_budget=False``).
- ``min_votes`` counts devices. The reference thresholds the *example-weighted* vote sum with
  ``votes > min_votes``; with its default ``min_votes = 0`` both are the plain union.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from device.errors import ConfigError
from device.sparse.density import ALLOCATORS, allocate
from device.sparse.masks import initial_masks
from device.sparse.schedule import ConstantAlpha, CosineAlpha, FedDSTSchedule
from device.wire.messages import (
    GrowPolicy,
    InitialPruneResult,
    LocalTraining,
    Readjust,
    ValueDType,
)
from fleet.strategies.aggregate import sparse_vote_merge
from fleet.strategies.base import (
    Candidate,
    ClientResult,
    GlobalModel,
    InitialJob,
    RoundConfig,
    check_common_options,
    check_result_tensors,
    check_round,
    check_state_keys,
    initial_weights,
    require_masks_keep_nnz,
    select_uniform,
)
from fleet.strategies.precision import resolve_precisions
from fleet.strategies.robust import RobustOptions, clip_results

__all__ = ["FedDST", "FedDSTOptions"]


@dataclass(frozen=True)
class FedDSTOptions:
    """FedDST's settings; defaults are the paper's MNIST setting (DESIGN section 6, issue 4).

    ``density``: global kept fraction of the pruned tensors, in (0, 1]. ``distribution``: per-layer
    allocation ("erk" or "uniform"). ``mask_init``: "magnitude" of the initialisation or "random".
    ``alpha``: readjustment fraction at r = 0, in [0, 1]; ``cosine``: decay it with the cosine
    schedule (else constant). ``readjust_every``: R_adj in rounds (>= 1). ``total_rounds``: the
    run's length, used only for the default ``t_end = total_rounds // 2``; ``t_end``: no
    readjustment from this round on. ``at_fraction``: where in local training the device
    readjusts (in (0, 1]; 1.0 = the reference code). ``grad_window``: minibatches of gradient
    for growth (0 = the last local epoch). ``grow``: gradient (RigL) or random (SET).
    ``min_votes`` >= 1: devices that must hold a coordinate for it to stay a candidate.
    ``fill_to_budget``: module docstring. ``robust``: clipping and trimmed mean / median over
    each coordinate's holders instead of their weighted mean (``fleet.strategies.robust``; off by
    default).
    """

    clients_per_round: int = 20
    training: LocalTraining = field(default_factory=LocalTraining)
    upload_dtype: ValueDType = ValueDType.FP32  # the older name of upload_values
    upload_values: ValueDType | None = None  # fleet.strategies.precision
    download_values: ValueDType = ValueDType.FP32
    density: float = 0.2
    distribution: str = "erk"
    mask_init: Literal["magnitude", "random"] = "magnitude"
    alpha: float = 0.05
    cosine: bool = True
    readjust_every: int = 10
    total_rounds: int = 400
    t_end: int | None = None
    at_fraction: float = 0.5
    grad_window: int = 0
    grow: GrowPolicy = GrowPolicy.GRADIENT
    min_votes: int = 1
    fill_to_budget: bool = True
    robust: RobustOptions = field(default_factory=RobustOptions)

    def __post_init__(self) -> None:
        resolve_precisions(self, "feddst")
        check_common_options("feddst", self.clients_per_round, self.training, self.upload_dtype)
        object.__setattr__(self, "robust", RobustOptions.coerce(self.robust, "feddst"))
        if not 0.0 < self.density <= 1.0 or math.isnan(self.density):
            raise ConfigError(
                f"feddst: density must be a kept fraction in (0, 1], got {self.density}"
            )
        if self.distribution not in ALLOCATORS:
            raise ConfigError(
                f"feddst: unknown distribution {self.distribution!r}; "
                f"known: {', '.join(sorted(ALLOCATORS))}"
            )
        if self.mask_init not in ("magnitude", "random"):
            raise ConfigError(
                f"feddst: mask_init must be magnitude or random, got {self.mask_init!r}"
            )
        if self.total_rounds < 1:
            raise ConfigError(f"feddst: total_rounds must be >= 1, got {self.total_rounds}")
        if self.t_end is not None and self.t_end < 1:
            raise ConfigError(f"feddst: t_end must be >= 1, got {self.t_end}")
        if not 0.0 < self.at_fraction <= 1.0:
            raise ConfigError(f"feddst: at_fraction must be in (0, 1], got {self.at_fraction}")
        if self.grad_window < 0:
            raise ConfigError(f"feddst: grad_window must be >= 0, got {self.grad_window}")
        if not isinstance(self.grow, GrowPolicy):
            raise ConfigError(f"feddst: grow must be a GrowPolicy, got {self.grow!r}")
        if self.min_votes < 1:
            raise ConfigError(f"feddst: min_votes must be >= 1, got {self.min_votes}")
        # The schedule checks alpha and readjust_every itself (ConfigError).
        self.schedule()

    @property
    def end_round(self) -> int:
        """T_end: ``t_end`` or half the run (at least 1)."""
        return self.t_end if self.t_end is not None else max(1, self.total_rounds // 2)

    def schedule(self) -> FedDSTSchedule:
        alpha = (
            CosineAlpha(self.alpha, self.end_round) if self.cosine else ConstantAlpha(self.alpha)
        )
        return FedDSTSchedule(alpha, self.readjust_every, self.end_round)


class FedDST:
    """FedDST (module docstring). State: the per-layer kept-count budget ``k_l``."""

    name = "feddst"

    def __init__(self, options: FedDSTOptions | None = None) -> None:
        self.options = options or FedDSTOptions()
        self.schedule = self.options.schedule()
        self._budgets: dict[str, int] = {}

    @property
    def budgets(self) -> dict[str, int]:
        """Kept entries per pruned tensor, fixed by ``initialize`` (empty before)."""
        return dict(self._budgets)

    def initialize(
        self,
        weights: Mapping[str, npt.ArrayLike],
        model_name: str,
        prunable: Sequence[str],
        rng: np.random.Generator,
    ) -> GlobalModel:
        """Version 0: ``weights`` with the initial masks of ``options`` on ``prunable``."""
        w = initial_weights(weights, prunable, self.name)
        if not prunable:
            raise ConfigError("feddst: needs at least one prunable tensor")
        shapes = {name: w[name].shape for name in prunable}
        densities = allocate(self.options.distribution, shapes, self.options.density)
        generator = None
        if self.options.mask_init == "random":
            generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        masks_t = initial_masks(
            {name: torch.from_numpy(w[name]) for name in prunable},
            densities,
            method=self.options.mask_init,
            generator=generator,
        )
        masks = {name: masks_t[name].numpy().copy() for name in prunable}
        for name, m in masks.items():
            w[name][~m] = 0.0
        self._budgets = {name: int(np.count_nonzero(m)) for name, m in masks.items()}
        return GlobalModel(0, w, masks, model_name)

    def initial_job(self, model: GlobalModel, candidates: Sequence[Candidate]) -> InitialJob | None:
        return None

    def on_initial_result(self, model: GlobalModel, result: InitialPruneResult) -> GlobalModel:
        raise ValueError("feddst has no initial job, so it takes no initial result")

    def readjust(self, round: int) -> Readjust | None:
        """The round's readjustment, or None (not a readjust round, or alpha_r is 0)."""
        if not self.schedule.is_readjust_round(round):
            return None
        alpha = self.schedule.alpha(round)
        if alpha <= 0.0:
            return None
        return Readjust(
            alpha=alpha,
            at_fraction=self.options.at_fraction,
            grad_window=self.options.grad_window,
            grow=self.options.grow,
        )

    def configure_round(
        self,
        round: int,
        model: GlobalModel,
        candidates: Sequence[Candidate],
        rng: np.random.Generator,
        *,
        num_select: int | None = None,
    ) -> RoundConfig:
        check_round(round)
        count = self.options.clients_per_round if num_select is None else num_select
        return RoundConfig(
            selected=select_uniform(candidates, count, rng),
            training=self.options.training,
            readjust=self.readjust(round),
            report_importance=False,
            upload_dtype=self.options.upload_dtype,
            download_values=self.options.download_values,
        )

    def check_result(self, model: GlobalModel, result: ClientResult) -> None:
        """Besides the common checks, each layer's mask must keep the global mask's count."""
        check_result_tensors(model, result)
        require_masks_keep_nnz(model, result)

    def aggregate(
        self, round: int, model: GlobalModel, results: Sequence[ClientResult]
    ) -> GlobalModel:
        check_round(round)
        if not results:
            raise ValueError("aggregate needs at least one result")
        if set(self._budgets) != set(model.masks):
            raise ConfigError(
                "feddst: the budgets do not match the model's masks; call initialize() or "
                "load_state_dict() with this run's checkpoint first"
            )
        for r in results:
            self.check_result(model, r)
        robust = self.options.robust
        results = clip_results(model, results, robust.clip_norm)
        weights, masks = sparse_vote_merge(
            model.weights,
            model.masks,
            [r.weights for r in results],
            [r.masks for r in results],
            [r.num_examples for r in results],
            self._budgets,
            min_votes=self.options.min_votes,
            fill_to_budget=self.options.fill_to_budget,
            combine=robust.combiner(),
        )
        return GlobalModel(model.version + 1, weights, masks, model.model_name)

    def state_dict(self) -> dict[str, npt.NDArray[np.generic]]:
        """``budget/<tensor>``: the kept count ``k_l`` as an int64 scalar array."""
        return {f"budget/{n}": np.array(k, dtype=np.int64) for n, k in self._budgets.items()}

    def load_state_dict(self, state: Mapping[str, npt.NDArray[np.generic]]) -> None:
        budgets: dict[str, int] = {}
        for key, value in state.items():
            prefix, _, name = key.partition("/")
            if prefix != "budget" or not name or np.shape(value) != ():
                check_state_keys(self.name, state, [k for k in state if k.startswith("budget/")])
                raise ConfigError(f"feddst: checkpointed budget {key!r} must be a scalar")
            budgets[name] = int(value)
        self._budgets = budgets
