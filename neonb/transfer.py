"""Transfer learning by DynUNet block: what each fine-tuning strategy trains (paper §3.5).

Richter & Fetit (2022, §3.5.2, §4.3) pre-train the segmentation network on the oldest
infants (the *source*) and adapt it to the youngest (the *target*) in six ways:

=========== ====================================================================
strategy    what trains on the target training set
=========== ====================================================================
``none``    nothing: the pre-trained network is evaluated as it is
``shallow`` the bottleneck and the directly adjacent encoder and decoder blocks
``medium``  one more level on each side
``deep``    two more levels on each side
``full``    every parameter (ordinary fine-tuning)
``scratch`` a new network, trained on the target alone
=========== ====================================================================

Freezing goes by DynUNet block, from the bottleneck outwards. A DynUNet with ``L`` strides
(``L = 6`` in the paper: ``(1, 2, 2, 2, 2, 2)``) has an input block, ``L - 2`` downsampling
blocks, a bottleneck, ``L - 1`` upsampling blocks, an output block and, with deep
supervision, ``deep_supr_num`` extra heads. :func:`dynunet_blocks` gives each block its
*level*, the number of resolution steps between it and the bottleneck:

================================ ================= =====================
block                            level             paper network (L = 6)
================================ ================= =====================
``bottleneck``                   0                 0
``downsamples[i]``               ``L - 2 - i``     4, 3, 2, 1
``upsamples[j]``                 ``j + 1``         1, 2, 3, 4, 5
``input_block``                  ``L - 1``         5
``output_block``                 ``L - 1``         5
``deep_supervision_heads[k]``    ``L - 2 - k``     4, 3
================================ ================= =====================

A deep-supervision head sits at the level of the upsampling block whose output it reads
(head ``k`` reads ``upsamples[L - 3 - k]``, at ``1 / 2**(k + 1)`` of the input resolution).

A strategy of *depth* ``d`` trains every block of level ``<= d`` and freezes the rest.
The paper's depths (:data:`PAPER_DEPTHS`) are 1 (shallow: bottleneck, last downsampling
block, first upsampling block), 2 (medium) and 4 (deep: "two more downsampling and
upsampling blocks"), which on the paper's network leaves only the outermost level frozen:
input block, last upsampling block and output block. The authors' public code trains the
same encoder and decoder blocks, but names the sets the other way round (its ``"deep"``
trains the bottleneck level only) and trains every deep-supervision head in each. On a
network with fewer levels (the CPU demo's ``(1, 2, 2, 2, 2)`` has levels 0-4) depth 4 would
train every block, as ``full`` does; there, depth 3 keeps the paper's "all but the
outermost level" (:func:`check_depths` warns about a depth that reaches the outermost
level).

The output block and the deep-supervision heads are 1×1×1 convolutions that read one
decoder level; they train together with that level. The paper's shallow condition keeps
"all parameters of the outer layers in the expanding and contracting pathways" fixed, so
the output block, at the outermost level, trains only under ``full`` and ``scratch``. A
frozen head still contributes its loss term, whose gradient reaches the trainable blocks
below it. A frozen block also stays in eval mode when the model is put in training mode
(:func:`freeze_blocks`), so that batch normalisation (``norm: batch``) neither updates its
running statistics nor normalises with batch statistics there: a frozen block is exactly
unchanged by training, and computes what it computed in the source network. (Instance
normalisation, the default, keeps no running statistics and behaves the same in both modes.)

Example:
    >>> from neonb.models import ModelConfig, build_model
    >>> model = build_model(ModelConfig())          # the paper's network
    >>> apply_strategy(model, "shallow")
    ['downsamples.3', 'bottleneck', 'upsamples.0']
    >>> strategy_table(model)                        # blocks and parameters per strategy
"""

from __future__ import annotations

import copy
import os
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
from monai.networks.nets import DynUNet
from torch import nn

from neonb import paper
from neonb.errors import ConfigError
from neonb.experiment import Record, TrainedRun, TrainingConfig, train_segmentation
from neonb.statistics import Claim, check_claims

__all__ = [
    "FINE_TUNED",
    "PAPER_DEPTHS",
    "STRATEGIES",
    "DynUNetBlock",
    "apply_strategy",
    "block_table",
    "check_depths",
    "dynunet_blocks",
    "fine_tune",
    "freeze_blocks",
    "is_kept_in_eval",
    "outermost_level",
    "paper_claims",
    "paper_findings",
    "strategy_table",
    "trained_blocks",
]

STRATEGIES: tuple[str, ...] = ("none", "shallow", "medium", "deep", "full", "scratch")
"""The six strategies of the paper's Table 4, in its order."""

FINE_TUNED: tuple[str, ...] = ("shallow", "medium", "deep", "full")
"""The strategies that start from the pre-trained network and train part or all of it."""

PAPER_DEPTHS: dict[str, int] = {"shallow": 1, "medium": 2, "deep": 4}
"""Levels from the bottleneck that each partial strategy trains (§4.3)."""


@dataclass(frozen=True)
class DynUNetBlock:
    """One named block of a DynUNet.

    Attributes:
        name: its attribute path in the model, e.g. ``"downsamples.3"``.
        path: ``"encoder"``, ``"bottleneck"``, ``"decoder"``, ``"output"`` or
            ``"deep supervision"``.
        level: resolution steps between the block and the bottleneck (0: the bottleneck).
        module: the block itself.
    """

    name: str
    path: str
    level: int
    module: nn.Module

    @property
    def parameters(self) -> int:
        """Number of parameters (scalars) of the block."""
        return sum(p.numel() for p in self.module.parameters())


def _check_dynunet(model: nn.Module) -> DynUNet:
    if not isinstance(model, DynUNet):
        raise ConfigError(
            f"freezing by block needs a MONAI DynUNet, but found {type(model).__name__}"
        )
    return model


def outermost_level(model: nn.Module) -> int:
    """Level of the input and output blocks: ``len(strides) - 1`` (5 in the paper)."""
    return len(_check_dynunet(model).strides) - 1


def dynunet_blocks(model: nn.Module) -> list[DynUNetBlock]:
    """Every block of a DynUNet with its level, encoder first, then decoder and heads.

    Every parameter of the model belongs to exactly one of these blocks.

    Args:
        model: a MONAI ``DynUNet`` (:func:`neonb.models.build_model`).

    Returns:
        Input block, downsampling blocks, bottleneck, upsampling blocks, output block
        and deep-supervision heads, with the levels of the module docstring's table.

    Raises:
        ConfigError: if ``model`` is not a DynUNet.
    """
    net = _check_dynunet(model)
    outer = outermost_level(net)
    blocks = [DynUNetBlock("input_block", "encoder", outer, net.input_block)]
    for i, block in enumerate(net.downsamples):
        blocks.append(DynUNetBlock(f"downsamples.{i}", "encoder", outer - 1 - i, block))
    blocks.append(DynUNetBlock("bottleneck", "bottleneck", 0, net.bottleneck))
    for j, block in enumerate(net.upsamples):
        blocks.append(DynUNetBlock(f"upsamples.{j}", "decoder", j + 1, block))
    blocks.append(DynUNetBlock("output_block", "output", outer, net.output_block))
    if net.deep_supervision:
        for k, head in enumerate(net.deep_supervision_heads):
            name = f"deep_supervision_heads.{k}"
            blocks.append(DynUNetBlock(name, "deep supervision", outer - 1 - k, head))
    return blocks


def check_depths(depths: Mapping[str, int], model: nn.Module | None = None) -> dict[str, int]:
    """Validate the depths of the partial strategies.

    Args:
        depths: levels trained by ``shallow``, ``medium`` and ``deep`` (any subset).
        model: if given, a depth that reaches its outermost level (and so trains every
            block, like ``full``) gives a :class:`RuntimeWarning`.

    Returns:
        The depths as a plain dict of ints.

    Raises:
        ConfigError: for an unknown strategy, a depth below 1, or depths that do not grow
            from shallow to deep.
    """
    unknown = set(depths) - set(PAPER_DEPTHS)
    if unknown:
        raise ConfigError(
            f"depths are given for the partial strategies {sorted(PAPER_DEPTHS)}, "
            f"but found {sorted(unknown)}"
        )
    values = {name: depths[name] for name in PAPER_DEPTHS if name in depths}
    for name, depth in values.items():
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"the depth of {name!r} must be an integer >= 1, got {depth!r}")
    ordered = list(values.values())
    if ordered != sorted(set(ordered)):
        raise ConfigError(f"depths must grow from shallow to deep, got {values}")
    if model is not None:
        outer = outermost_level(model)
        for name, depth in values.items():
            if depth >= outer:
                warnings.warn(
                    f"{name!r} trains levels 0-{depth} of a network whose outermost level is "
                    f"{outer}: every block trains, as under 'full'; use a depth below {outer}",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return values


def trained_blocks(
    model: nn.Module, strategy: str, depths: Mapping[str, int] = PAPER_DEPTHS
) -> list[str]:
    """Names of the blocks that ``strategy`` trains, in :func:`dynunet_blocks` order.

    Args:
        model: a DynUNet.
        strategy: one of :data:`STRATEGIES`.
        depths: levels trained by the partial strategies (default: the paper's).

    Returns:
        Block names; empty for ``none``, all blocks for ``full`` and ``scratch``.

    Raises:
        ConfigError: for an unknown strategy or a partial strategy without a depth.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, but found {strategy!r}")
    blocks = dynunet_blocks(model)
    if strategy == "none":
        return []
    if strategy in ("full", "scratch"):
        return [block.name for block in blocks]
    depth = check_depths(depths).get(strategy)
    if depth is None:
        raise ConfigError(f"no depth given for {strategy!r}; depths: {dict(depths)}")
    return [block.name for block in blocks if block.level <= depth]


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen block: eval mode, whatever mode is asked for."""
    return nn.Module.train(module, False)


def is_kept_in_eval(module: nn.Module) -> bool:
    """Whether :func:`freeze_blocks` froze ``module``, so it stays in eval mode."""
    method = module.__dict__.get("train")
    return isinstance(method, types.MethodType) and method.__func__ is _stay_in_eval


def freeze_blocks(model: nn.Module, trainable: Iterable[str]) -> nn.Module:
    """Let the parameters of the named blocks train and freeze all others.

    A frozen block has ``requires_grad=False`` on every parameter and is kept in eval mode:
    its ``train()`` is replaced (on the instance) by one that always sets eval mode, so
    ``model.train()`` (as :func:`neonb.engine.fit` calls every epoch) leaves its batch
    normalisation with its running statistics, unchanged. Trainable blocks get their
    ordinary ``train()`` back. The model's ``state_dict`` is unaffected, and a
    ``copy.deepcopy`` keeps the frozen blocks frozen.

    Args:
        model: a DynUNet; changed in place (``requires_grad`` of every parameter, the mode
            of the frozen blocks).
        trainable: names of :func:`dynunet_blocks` to train.

    Returns:
        ``model``.

    Raises:
        ConfigError: naming any block the model does not have.
    """
    blocks = {block.name: block for block in dynunet_blocks(model)}
    trainable = list(trainable)
    unknown = [name for name in trainable if name not in blocks]
    if unknown:
        raise ConfigError(f"the model has no block(s) {unknown}; its blocks are {list(blocks)}")
    for name, block in blocks.items():
        train = name in trainable
        for parameter in block.module.parameters():
            parameter.requires_grad_(train)
        if train:
            block.module.__dict__.pop("train", None)
        else:
            block.module.train = types.MethodType(_stay_in_eval, block.module)
    model.train(model.training)  # apply the blocks' modes now
    return model


def apply_strategy(
    model: nn.Module, strategy: str, depths: Mapping[str, int] = PAPER_DEPTHS
) -> list[str]:
    """Freeze ``model`` as ``strategy`` prescribes; return the names of the trained blocks.

    Example:
        >>> apply_strategy(build_model(ModelConfig()), "medium")
        ['downsamples.2', 'downsamples.3', 'bottleneck', 'upsamples.0', 'upsamples.1']
    """
    names = trained_blocks(model, strategy, depths)
    freeze_blocks(model, names)
    return names


def _levels(depth: int | None, outer: int) -> str:
    if depth is None:
        return "—"
    return f"0–{min(depth, outer)}"


def block_table(model: nn.Module, depths: Mapping[str, int] | None = None) -> pd.DataFrame:
    """One row per block: path, level, parameters and, optionally, which strategies train it.

    Args:
        model: a DynUNet.
        depths: if given, one column per strategy of :data:`STRATEGIES`, ``"train"`` or
            ``""`` (frozen, or not trained at all for ``none``).

    Returns:
        Columns ``block, path, level, parameters`` (and the strategy columns).
    """
    blocks = dynunet_blocks(model)
    table = pd.DataFrame(
        {
            "block": [b.name for b in blocks],
            "path": [b.path for b in blocks],
            "level": [b.level for b in blocks],
            "parameters": [b.parameters for b in blocks],
        }
    )
    if depths is not None:
        for strategy in STRATEGIES:
            names = set(trained_blocks(model, strategy, depths))
            table[strategy] = ["train" if b.name in names else "" for b in blocks]
    return table


def strategy_table(model: nn.Module, depths: Mapping[str, int] = PAPER_DEPTHS) -> pd.DataFrame:
    """Per strategy: the levels and blocks it trains and how many parameters that is.

    Args:
        model: a DynUNet.
        depths: levels trained by the partial strategies.

    Returns:
        Indexed by strategy (:data:`STRATEGIES` order); columns ``start`` (pre-trained or
        new), ``levels`` trained, ``blocks`` trained, ``trained parameters`` and
        ``trained %`` of all parameters.
    """
    outer = outermost_level(model)
    total = sum(p.numel() for p in model.parameters())
    sizes = {block.name: block.parameters for block in dynunet_blocks(model)}
    rows = {}
    for strategy in STRATEGIES:
        names = trained_blocks(model, strategy, depths)
        depth = None if strategy == "none" else depths.get(strategy, outer)
        trained = sum(sizes[name] for name in names)
        rows[strategy] = {
            "start": "new" if strategy == "scratch" else "pre-trained",
            "levels": _levels(depth, outer),
            "blocks": ", ".join(names) if len(names) < len(sizes) else "all",
            "trained parameters": trained,
            "trained %": round(100 * trained / total, 1),
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("strategy")


def fine_tune(
    source: nn.Module,
    strategy: str,
    train_records: Sequence[Record],
    val_records: Sequence[Record],
    config: TrainingConfig,
    run_dir: str | os.PathLike,
    *,
    depths: Mapping[str, int] = PAPER_DEPTHS,
    progress: bool = False,
) -> TrainedRun:
    """Fine-tune a copy of the pre-trained network with one strategy.

    The source network is deep-copied (it stays as it is), frozen by
    :func:`apply_strategy` and trained by :func:`neonb.experiment.train_segmentation`,
    whose optimiser sees only the trainable parameters. A finished ``run_dir`` is
    reloaded rather than trained again.

    Args:
        source: the pre-trained DynUNet.
        strategy: one of :data:`FINE_TUNED`.
        train_records: target training sessions.
        val_records: sessions validated on after every epoch (the best epoch is kept).
        config: the fine-tuning settings (epochs, learning rate, ...); its network must
            be the source's.
        run_dir: the run folder.
        depths: levels trained by the partial strategies.
        progress: show progress bars.

    Returns:
        The trained run; its model has the weights of the best validation epoch.

    Raises:
        ConfigError: for a strategy that does not fine-tune (``none``, ``scratch``).
    """
    if strategy not in FINE_TUNED:
        raise ConfigError(f"fine_tune() runs one of {FINE_TUNED}, but found {strategy!r}")
    model = copy.deepcopy(_check_dynunet(source)).train()
    apply_strategy(model, strategy, depths)
    return train_segmentation(
        train_records, val_records, config, run_dir, model=model, progress=progress
    )


def paper_claims() -> list[Claim]:
    """The paper's conclusions on transfer learning (§4.3, Tables 4-5, Figure 11) as claims.

    "Deeper fine-tuning is better" is checked step by step (medium beats shallow, deep beats
    medium); "medium comes close to full" as an equivalence; "training more parameters
    spreads the results" as shallow's per-subject SD below full's.
    """
    return [
        Claim("medium fine-tuning beats shallow", "medium", "shallow", "greater", "paper"),
        Claim("deep fine-tuning beats medium", "deep", "medium", "greater", "paper"),
        Claim("medium is as good as full fine-tuning", "medium", "full", "equivalent", "paper"),
        Claim("full fine-tuning beats scratch", "full", "scratch", "greater", "paper"),
        Claim("deep fine-tuning beats scratch", "deep", "scratch", "greater", "paper"),
        Claim(
            "shallow spreads less than full fine-tuning",
            "shallow",
            "full",
            "less_spread",
            "paper",
        ),
    ]


def _paper_reference(claim: Claim) -> str:
    """What the paper reports for a claim: Table 4 means and Table 5's corrected p."""
    if claim.kind == "less_spread":
        return "Figure 11"
    means = paper.table4().mean(axis=1)
    table5 = paper.table5()
    a, b = claim.a, claim.b
    p = table5.loc[a, b] if pd.notna(table5.loc[a, b]) else table5.loc[b, a]
    return f"{a} {means[a]:.3f}, {b} {means[b]:.3f} (Table 4); corrected p {p:.1e} (Table 5)"


def paper_findings(
    cases: pd.DataFrame,
    value: str = "dice_mean_nobg",
    *,
    margin: float = 0.01,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """The paper's conclusions on transfer learning (:func:`paper_claims`), checked here.

    Each claim is decided by :func:`neonb.statistics.check_claims` on the per-subject scores
    (averaged over a strategy's runs), with the rule of its kind, and the p-values of the
    six claims Bonferroni-corrected together.

    Args:
        cases: one row per test subject, strategy (and run), with ``strategy``,
            ``participant_id`` and ``value``.
        value: the per-subject score compared (default: mean Dice without background).
        margin: the equivalence margin (Dice) of "as good as".
        alpha: family-wise error rate.

    Returns:
        :func:`~neonb.statistics.check_claims` rows with a first column ``paper (dHCP)``:
        what the paper reports for the claim.
    """
    claims = paper_claims()
    checked = check_claims(cases, value, claims, by="strategy", margin=margin, alpha=alpha)
    checked.insert(0, "paper (dHCP)", [_paper_reference(c) for c in claims])
    return checked
