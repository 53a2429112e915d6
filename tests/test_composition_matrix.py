"""SPGPlugin composed with every training strategy and every plugin Avalanche 0.6.0 ships.

Each entry of :data:`STRATEGIES` and :data:`PLUGINS` says what happens, and the test checks it:

* ``masks``: trained for two experiences with a gradient probe right before ``SPGPlugin`` and
  one appended at the very end of ``strategy.plugins`` (after the strategy's own plugins, the
  evaluator and the clock), every ``before_update`` of the second experience sees feature
  gradients ``(1 - A) * g`` and head gradients ``head_scale * g`` exactly (Section 3.2 of the
  paper), with ``A`` and the head scale as they were when the experience started;
* ``refused``: ``train`` raises :class:`SPGCompatibilityError` (with the reason) before any
  training step: no ``before_update`` ran and no parameter moved;
* ``skipped``: the strategy cannot run here without SPG either (a weight download, a dependency
  that is not installed, an Avalanche bug with this torch), with the reason.

* ``never called``: Avalanche's ``PackNet`` *strategy* nests the user's plugin list inside a list,
  so SPG is never called (checked), and :func:`check_strategy` says so when called directly.

The lists are compared with what ``avalanche.training``, ``avalanche.training.supervised`` (every
module of the package) and ``avalanche.training.plugins`` export, so a strategy or plugin that is
not in the matrix fails a test. Data: a few dozen digits per experience, one epoch.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.core import BasePlugin
from avalanche.models import BaseModel, MultiHeadClassifier, MultiTaskModule
from avalanche.training import plugins as avl_plugins
from avalanche.training.templates import BaseTemplate
from helpers import (
    DIGITS_FEATURES,
    GradRecorder,
    TensorDigits,
    digits_tensors,
    quiet_evaluator,
    snapshot_params,
)
from torch import Tensor, nn

from avalanche_spg import SPGPlugin
from avalanche_spg.compat import SPGCompatibilityError, check_strategy
from avalanche_spg.heads import default_head_names

HIDDEN = 16
N_CLASSES = 4  # digits 0-3: two experiences of two classes


# ------------------------------------------------------------------------------------- data
def _benchmark(*, task_labels: bool, images: bool = False) -> Any:
    """Digits 0-3 in two experiences (about 50 training samples each); ``images``: (1, 8, 8)."""
    x, y = digits_tensors()
    keep = y < N_CLASSES
    x, y = x[keep], y[keep]
    if images:
        x = x.view(-1, 1, 8, 8)
    train = TensorDigits(x[:100], y[:100])
    test = TensorDigits(x[100:140], y[100:140])
    return nc_benchmark(
        train,
        test,
        n_experiences=2,
        task_labels=task_labels,
        class_ids_from_zero_in_each_exp=task_labels,
        seed=0,
        fixed_class_order=list(range(N_CLASSES)),
    )


@pytest.fixture(scope="module")
def benchmarks() -> dict[str, Any]:
    return {
        "task": _benchmark(task_labels=True),
        "class": _benchmark(task_labels=False),
        "class_images": _benchmark(task_labels=False, images=True),
    }


# ------------------------------------------------------------------------------------ models
class TaskMLP(MultiTaskModule, BaseModel):
    """Task-incremental: a shared feature extractor and one head per task (``get_features``
    for LFL)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(DIGITS_FEATURES, HIDDEN), nn.ReLU())
        self.classifier = MultiHeadClassifier(HIDDEN, initial_out_features=2)

    def get_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.classifier(self.features(x), task_label)


class ClassMLP(nn.Module, BaseModel):
    """Class-incremental: one classifier over all classes (no task heads, so for SPG every
    parameter is a feature parameter)."""

    def __init__(self, n_out: int = N_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(DIGITS_FEATURES, HIDDEN), nn.ReLU())
        self.classifier = nn.Linear(HIDDEN, n_out)

    def get_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _feature_and_head(n_out: int = N_CLASSES) -> tuple[nn.Module, nn.Module]:
    return (
        nn.Sequential(nn.Flatten(), nn.Linear(DIGITS_FEATURES, HIDDEN), nn.ReLU()),
        nn.Linear(HIDDEN, n_out),
    )


# --------------------------------------------------------------------------------- the cases
Build = Callable[[list[Any]], Any]  # plugins (probe, SPG) -> strategy


@dataclass
class Case:
    """One row of the matrix: the outcome and how to build the strategy."""

    outcome: str  # "masks" | "refused" | "never called" | "skipped"
    scenario: str = "task"  # which benchmark
    build: Build | None = None
    reason: str = ""  # refused: a regex of the error; skipped: why
    # a strategy whose old feature parameters are frozen by itself (PNN): heads only
    frozen_features: bool = False
    eval_streams: bool = False  # pass the test stream to train() (early stopping reads it)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05)


def _common(model: nn.Module, epochs: int = 1) -> dict[str, Any]:
    return {
        "model": model,
        "optimizer": _sgd(model),
        "train_mb_size": 16,
        "train_epochs": epochs,
        "eval_mb_size": 64,
        "evaluator": quiet_evaluator(),
        "device": "cpu",
    }


def _t(name: str) -> Any:
    """A class exported by ``avalanche.training`` or one of its ``supervised`` modules."""
    import avalanche.training as training

    if hasattr(training, name):
        return getattr(training, name)
    module, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(f"avalanche.training.supervised.{module}"), cls)


def _naive_with(
    *others: Callable[[nn.Module], Any], scenario_model: Callable[[], nn.Module]
) -> Build:
    """Naive with ``others`` (built from the model) placed before the probe and SPG."""

    def build(pl: list[Any]) -> Any:
        model = scenario_model()
        return _t("Naive")(plugins=[*(make(model) for make in others), *pl], **_common(model))

    return build


def _vae_strategy() -> Any:
    from avalanche.models.generator import MlpVAE

    generator = MlpVAE((1, 8, 8), nhid=2, device="cpu")
    return _t("VAETraining")(
        model=generator,
        optimizer=torch.optim.Adam(generator.parameters(), lr=1e-3),
        train_mb_size=16,
        train_epochs=1,
        device="cpu",
        evaluator=quiet_evaluator(),
    )


def _train_eval_model(eval_classifier: nn.Module) -> nn.Module:
    from avalanche.models import TrainEvalModel

    feature_extractor, head = _feature_and_head()
    return TrainEvalModel(feature_extractor, head, eval_classifier)


def _ncm() -> nn.Module:
    from avalanche.models import NCMClassifier

    return _train_eval_model(NCMClassifier())


def _fecam() -> nn.Module:
    from avalanche.models import FeCAMClassifier

    return _train_eval_model(FeCAMClassifier())


def _feature_extractor_model() -> nn.Module:
    from avalanche.models.utils import FeatureExtractorModel

    return FeatureExtractorModel(*_feature_and_head())


def _packnet_model() -> nn.Module:
    """PackNet wraps every layer (a shared two-logit output: each task gets its own subset of
    the weights, and its labels are 0/1)."""
    from avalanche.models.packnet import PackNetModel

    return PackNetModel(
        nn.Sequential(
            nn.Flatten(), nn.Linear(DIGITS_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2)
        )
    )


def _bic_skip_reason() -> str:
    params = inspect.signature(torch.optim.lr_scheduler.MultiStepLR).parameters
    if "verbose" not in params:
        return (
            "Avalanche 0.6.0's BiCPlugin builds MultiStepLR(verbose=...), which this torch no "
            "longer accepts: its bias-correction stage crashes with or without SPG"
        )
    return ""


def _l2p_skip_reason() -> str:
    if importlib.util.find_spec("timm") is None:
        return "LearningToPrompt needs timm (not installed) and a pretrained ViT download"
    return "LearningToPrompt builds a pretrained ViT (a weight download)"


STRATEGIES: dict[str, Case] = {
    # --- mask exactly
    "Naive": Case("masks", build=lambda pl: _t("Naive")(plugins=pl, **_common(TaskMLP()))),
    "Cumulative": Case(
        "masks",
        build=lambda pl: _t("Cumulative")(
            plugins=pl, criterion=nn.CrossEntropyLoss(), **_common(TaskMLP())
        ),
    ),
    "Replay": Case(
        "masks",
        build=lambda pl: _t("Replay")(
            plugins=pl, criterion=nn.CrossEntropyLoss(), mem_size=30, **_common(TaskMLP())
        ),
    ),
    "LwF": Case(
        "masks",
        build=lambda pl: _t("LwF")(
            plugins=pl,
            criterion=nn.CrossEntropyLoss(),
            alpha=1.0,
            temperature=2.0,
            **_common(TaskMLP()),
        ),
    ),
    "EWC": Case(
        "masks",
        build=lambda pl: _t("EWC")(
            plugins=pl, criterion=nn.CrossEntropyLoss(), ewc_lambda=1.0, **_common(TaskMLP())
        ),
    ),
    "SynapticIntelligence": Case(
        "masks",
        build=lambda pl: _t("SynapticIntelligence")(
            plugins=pl, criterion=nn.CrossEntropyLoss(), si_lambda=1.0, **_common(TaskMLP())
        ),
    ),
    "MAS": Case(
        "masks",
        build=lambda pl: _t("MAS")(
            plugins=pl, criterion=nn.CrossEntropyLoss(), **_common(TaskMLP())
        ),
    ),
    "LFL": Case(
        "masks",
        build=lambda pl: _t("LFL")(
            plugins=pl, criterion=nn.CrossEntropyLoss(), lambda_e=0.1, **_common(TaskMLP())
        ),
    ),
    "AGEM": Case(
        "masks",
        build=lambda pl: _t("AGEM")(
            plugins=pl,
            criterion=nn.CrossEntropyLoss(),
            patterns_per_exp=10,
            **_common(TaskMLP()),
        ),
    ),
    "GEM": Case(
        "masks",
        build=lambda pl: _t("GEM")(
            plugins=pl,
            criterion=nn.CrossEntropyLoss(),
            patterns_per_exp=10,
            **_common(TaskMLP()),
        ),
    ),
    "MIR": Case(
        "masks",
        build=lambda pl: _t("MIR")(
            plugins=pl,
            criterion=nn.CrossEntropyLoss(),
            mem_size=30,
            subsample=10,
            batch_size_mem=4,
            **_common(TaskMLP()),
        ),
    ),
    "ER_ACE": Case(
        "masks",
        build=lambda pl: _t("ER_ACE")(
            plugins=pl, mem_size=30, batch_size_mem=4, **_common(TaskMLP())
        ),
    ),
    "DER": Case(  # DER calls the model without task labels: class-incremental
        "masks",
        scenario="class",
        build=lambda pl: _t("DER")(
            plugins=pl, mem_size=30, batch_size_mem=4, **_common(ClassMLP())
        ),
    ),
    "GSS_greedy": Case(  # GSS calls the model without task labels: class-incremental
        "masks",
        scenario="class",
        build=lambda pl: _t("GSS_greedy")(
            plugins=pl,
            criterion=nn.CrossEntropyLoss(),
            mem_size=64,
            mem_strength=2,
            input_size=[DIGITS_FEATURES],
            **_common(ClassMLP()),
        ),
    ),
    "FeatureReplay": Case(
        "masks",
        scenario="class",
        build=lambda pl: _t("FeatureReplay")(
            plugins=pl, mem_size=30, batch_size_mem=4, **_common(ClassMLP())
        ),
    ),
    "GenerativeReplay": Case(
        "masks",
        scenario="class_images",
        build=lambda pl: _t("GenerativeReplay")(
            plugins=pl, generator_strategy=_vae_strategy(), **_common(ClassMLP())
        ),
    ),
    "PNNStrategy": Case(  # PNN freezes old columns itself: SPG has only heads left to scale
        "masks",
        frozen_features=True,
        build=lambda pl: _t("PNNStrategy")(
            plugins=pl,
            **_common(
                _t_model("PNN")(
                    num_layers=1, in_features=DIGITS_FEATURES, hidden_features_per_column=HIDDEN
                )
            ),
        ),
    ),
    "strategy_wrappers_online.OnlineNaive": Case(
        "masks",
        build=lambda pl: _t("strategy_wrappers_online.OnlineNaive")(
            plugins=pl, **{k: v for k, v in _common(TaskMLP()).items() if k != "train_epochs"}
        ),
    ),
    # --- refused before training
    "MER": Case(
        "refused",
        reason="before_update",
        build=lambda pl: _t("MER")(plugins=pl, mem_size=30, **_common(TaskMLP())),
    ),
    "lamaml.LaMAML": Case(
        "refused",
        reason="before_update",
        build=lambda pl: _t("lamaml.LaMAML")(plugins=pl, **_common(TaskMLP())),
    ),
    "lamaml_v2.LaMAML": Case(
        "refused",
        reason="before_update",
        build=lambda pl: _t("lamaml_v2.LaMAML")(plugins=pl, **_common(TaskMLP())),
    ),
    "StreamingLDA": Case(
        "refused",
        scenario="class",
        reason="no optimizer",
        build=lambda pl: _t("StreamingLDA")(
            slda_model=_feature_and_head()[0],
            criterion=nn.CrossEntropyLoss(),
            input_size=HIDDEN,
            num_classes=N_CLASSES,
            train_mb_size=16,
            eval_mb_size=64,
            plugins=pl,
            evaluator=quiet_evaluator(),
        ),
    ),
    "GDumb": Case(
        "refused",
        reason="GDumbPlugin.*re-initialises",
        build=lambda pl: _t("GDumb")(
            plugins=pl, criterion=nn.CrossEntropyLoss(), mem_size=30, **_common(TaskMLP())
        ),
    ),
    "FromScratchTraining": Case(
        "refused",
        reason="FromScratchTrainingPlugin.*re-initialises",
        build=lambda pl: _t("FromScratchTraining")(
            plugins=pl, criterion=nn.CrossEntropyLoss(), **_common(TaskMLP())
        ),
    ),
    "JointTraining": Case(
        "refused",
        reason="no later experience",
        build=lambda pl: _t("JointTraining")(
            plugins=pl, criterion=nn.CrossEntropyLoss(), **_common(TaskMLP())
        ),
    ),
    "ExpertGateStrategy": Case(
        "refused",
        reason="separate expert",
        build=lambda pl: _t("ExpertGateStrategy")(
            plugins=pl,
            **_common(_tiny_expert_gate()),
        ),
    ),
    "VAETraining": Case(
        "refused",
        scenario="class_images",
        reason="VAE_loss",
        build=lambda pl: _t("VAETraining")(
            plugins=pl,
            **_common(_t_model("generator.MlpVAE")((1, 8, 8), nhid=2, device="cpu")),
        ),
    ),
    "AETraining": Case(
        "refused",
        scenario="class",
        reason="AE_loss",
        build=lambda pl: _t("AETraining")(
            plugins=pl,
            **_common(nn.Sequential(nn.Linear(DIGITS_FEATURES, 8), nn.ReLU(), nn.Linear(8, 64))),
        ),
    ),
    "SCR": Case(
        "refused",
        scenario="class",
        reason="SCRLoss",
        build=lambda pl: _t("SCR")(
            plugins=pl,
            mem_size=30,
            batch_size_mem=8,
            **_common(_t_model("SCRModel")(*_feature_and_head(8))),
        ),
    ),
    "CoPE": Case(
        "refused",
        scenario="class",
        reason="CoPEPlugin",
        build=lambda pl: _t("CoPE")(
            plugins=pl,
            criterion=nn.CrossEntropyLoss(),
            mem_size=30,
            n_classes=N_CLASSES,
            p_size=HIDDEN,
            **_common(ClassMLP(HIDDEN)),
        ),
    ),
    "ICaRL": Case(
        "refused",
        scenario="class",
        reason="ICaRLLossPlugin",
        build=lambda pl: _icarl(pl),
    ),
    "ER_AML": Case(
        "refused",
        scenario="class",
        reason="metric-learning",
        build=lambda pl: _er_aml(pl),
    ),
    "CWRStar": Case(  # appends its CWRStarPlugin after the user's plugins, so after SPG
        "refused",
        scenario="class",
        reason="CWRStarPlugin .*after SPGPlugin",
        build=lambda pl: _cwr_star(pl),
    ),
    "naive_object_detection.ObjectDetectionTemplate": Case(
        "refused",
        reason="object detection",
        build=lambda pl: _t("naive_object_detection.ObjectDetectionTemplate")(
            plugins=pl, **_common(TaskMLP())
        ),
    ),
    # --- not run here
    "AR1": Case(  # appends a CWRStarPlugin after the user's plugins, as CWRStar does
        "refused",
        scenario="class",
        reason="CWRStarPlugin .*after SPGPlugin",
        build=lambda pl: _ar1(pl),
    ),
    "BiC": Case("skipped", reason=_bic_skip_reason() or "BiC: no skip reason any more"),
    "LearningToPrompt": Case("skipped", reason=_l2p_skip_reason()),
    # --- SPG never called: the user's plugins are nested in a list that Avalanche skips
    "PackNet": Case(
        "never called",
        build=lambda pl: _t("PackNet")(
            plugins=pl,
            post_prune_epochs=1,
            prune_proportion=0.5,
            **_common(_packnet_model(), epochs=2),
        ),
    ),
}


def _t_model(name: str) -> Any:
    """A class of ``avalanche.models`` (or one of its modules: ``module.Class``)."""
    import avalanche.models as models

    if hasattr(models, name):
        return getattr(models, name)
    module, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(f"avalanche.models.{module}"), cls)


def _tiny_expert_gate() -> nn.Module:
    """An ``ExpertGate`` whose initial expert is a small net instead of torchvision's AlexNet
    (``ExpertGate(pretrained_flag=False)`` asks this torchvision for ``AlexNet_Weights.NONE``,
    which does not exist; ``True`` downloads AlexNet). It is refused before it would run."""
    gate_class = _t_model("expert_gate.ExpertGate")
    gate = gate_class.__new__(gate_class)
    nn.Module.__init__(gate)
    gate.shape, gate.arch, gate.pretrained_flag, gate.device = (1, 8, 8), "alexnet", False, "cpu"
    gate.autoencoder_dict = nn.ModuleDict()
    gate.expert_dict = nn.ModuleDict()
    gate.expert = ClassMLP()
    return gate


def _ar1(pl: list[Any]) -> Any:
    """AR1 builds ``MobilenetV1(pretrained=True)`` itself (a weight download): built here with
    ``pretrained=False`` instead. It is refused before it would train."""
    from unittest import mock

    from avalanche.models import MobilenetV1

    def offline(pretrained: bool, latent_layer_num: int) -> nn.Module:
        return MobilenetV1(pretrained=False, latent_layer_num=latent_layer_num)

    with mock.patch("avalanche.training.supervised.ar1.MobilenetV1", offline):
        return _t("AR1")(plugins=pl, train_mb_size=16, evaluator=quiet_evaluator())


def _icarl(pl: list[Any]) -> Any:
    feature_extractor, head = _feature_and_head()
    common = _common(nn.Sequential(feature_extractor, head))
    del common["model"]
    return _t("ICaRL")(
        feature_extractor=feature_extractor,
        classifier=head,
        memory_size=30,
        buffer_transform=None,
        fixed_memory=True,
        plugins=pl,
        **common,
    )


def _er_aml(pl: list[Any]) -> Any:
    model = ClassMLP()
    return _t("ER_AML")(
        plugins=pl,
        feature_extractor=model.features,
        mem_size=30,
        batch_size_mem=4,
        **_common(model),
    )


def _cwr_star(pl: list[Any]) -> Any:
    return _t("CWRStar")(
        plugins=pl,
        criterion=nn.CrossEntropyLoss(),
        cwr_layer_name="classifier",
        **_common(ClassMLP()),
    )


def _cwr_plugin_first(pl: list[Any]) -> Any:
    from avalanche.training.plugins import CWRStarPlugin

    model = ClassMLP()
    cwr = CWRStarPlugin(model, cwr_layer_name="classifier", freeze_remaining_model=True)
    return _t("Naive")(plugins=[cwr, *pl], **_common(model))


def _generative_replay_plugins(pl: list[Any]) -> Any:
    from avalanche.training.plugins import GenerativeReplayPlugin, TrainGeneratorAfterExpPlugin

    generator_strategy = _vae_strategy()
    others = [TrainGeneratorAfterExpPlugin(), GenerativeReplayPlugin(generator_strategy)]
    return _t("Naive")(plugins=[*others, *pl], **_common(ClassMLP()))


def _early_stopping(pl: list[Any]) -> Any:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EarlyStoppingPlugin, EvaluationPlugin

    model = TaskMLP()
    common = _common(model, epochs=3)
    common["evaluator"] = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    stopper = EarlyStoppingPlugin(
        patience=1, val_stream_name="test_stream", metric_name="Top1_Acc_Stream", mode="min"
    )
    return _t("Naive")(plugins=[stopper, *pl], eval_every=1, **common)


def _evaluation_plugin(pl: list[Any]) -> Any:
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
    from avalanche.training.plugins import EvaluationPlugin

    common = _common(TaskMLP())
    common["evaluator"] = EvaluationPlugin(
        accuracy_metrics(minibatch=True, experience=True, stream=True),
        loss_metrics(minibatch=True, epoch=True),
        forgetting_metrics(experience=True),
        loggers=[],
    )
    return _t("Naive")(plugins=pl, **common)


def _lr_scheduler(pl: list[Any]) -> Any:
    from avalanche.training.plugins import LRSchedulerPlugin

    common = _common(TaskMLP())
    scheduler = torch.optim.lr_scheduler.StepLR(common["optimizer"], step_size=1, gamma=0.5)
    return _t("Naive")(plugins=[LRSchedulerPlugin(scheduler), *pl], **common)


def _criterion_plugin(name: str, model: Callable[[], nn.Module]) -> Build:
    def build(pl: list[Any]) -> Any:
        import avalanche.training as training

        criterion = getattr(training, name)()
        return _t("Naive")(plugins=pl, criterion=criterion, **_common(model()))

    return build


def _p(name: str) -> Any:
    return getattr(avl_plugins, name)


PLUGINS: dict[str, Case] = {
    "AGEMPlugin": Case(
        "masks",
        build=_naive_with(
            lambda m: _p("AGEMPlugin")(patterns_per_experience=10, sample_size=10),
            scenario_model=TaskMLP,
        ),
    ),
    "GEMPlugin": Case(
        "masks",
        build=_naive_with(
            lambda m: _p("GEMPlugin")(patterns_per_experience=10, memory_strength=0.5),
            scenario_model=TaskMLP,
        ),
    ),
    "EWCPlugin": Case(
        "masks",
        build=_naive_with(lambda m: _p("EWCPlugin")(ewc_lambda=1.0), scenario_model=TaskMLP),
    ),
    "LwFPlugin": Case(
        "masks",
        build=_naive_with(
            lambda m: _p("LwFPlugin")(alpha=1.0, temperature=2.0), scenario_model=TaskMLP
        ),
    ),
    "MASPlugin": Case(
        "masks", build=_naive_with(lambda m: _p("MASPlugin")(), scenario_model=TaskMLP)
    ),
    "SynapticIntelligencePlugin": Case(
        "masks",
        build=_naive_with(
            lambda m: _p("SynapticIntelligencePlugin")(si_lambda=1.0), scenario_model=TaskMLP
        ),
    ),
    "LFLPlugin": Case(
        "masks",
        build=_naive_with(lambda m: _p("LFLPlugin")(lambda_e=0.1), scenario_model=TaskMLP),
    ),
    "RWalkPlugin": Case(  # Avalanche's RWalk: NaN gradients unless it checkpoints every
        # step on this tiny stream, and a KeyError on heads that appear later: one head, delta_t=1
        "masks",
        scenario="class",
        build=_naive_with(lambda m: _p("RWalkPlugin")(delta_t=1), scenario_model=ClassMLP),
    ),
    "ReplayPlugin": Case(
        "masks",
        build=_naive_with(lambda m: _p("ReplayPlugin")(mem_size=30), scenario_model=TaskMLP),
    ),
    "MIRPlugin": Case(
        "masks",
        build=_naive_with(
            lambda m: _p("MIRPlugin")(batch_size_mem=4, mem_size=30, subsample=10),
            scenario_model=TaskMLP,
        ),
    ),
    "GSS_greedyPlugin": Case(
        "masks",
        scenario="class",
        build=_naive_with(
            lambda m: _p("GSS_greedyPlugin")(
                mem_size=64, mem_strength=2, input_size=[DIGITS_FEATURES]
            ),
            scenario_model=ClassMLP,
        ),
    ),
    "RARPlugin": Case(
        "masks",
        scenario="class",
        build=_naive_with(
            lambda m: _p("RARPlugin")(batch_size_mem=4, mem_size=30), scenario_model=ClassMLP
        ),
    ),
    "FeatureDistillationPlugin": Case(
        "masks",
        scenario="class",
        build=_naive_with(
            lambda m: _p("FeatureDistillationPlugin")(alpha=1.0),
            scenario_model=_feature_extractor_model,
        ),
    ),
    "CurrentDataNCMUpdate": Case(
        "masks",
        scenario="class",
        build=_naive_with(lambda m: _p("CurrentDataNCMUpdate")(), scenario_model=_ncm),
    ),
    "MemoryNCMUpdate": Case(
        "masks",
        scenario="class",
        build=_naive_with(lambda m: _p("MemoryNCMUpdate")(mem_size=30), scenario_model=_ncm),
    ),
    "NCMOracle": Case(
        "masks",
        scenario="class",
        build=_naive_with(lambda m: _p("NCMOracle")(), scenario_model=_ncm),
    ),
    "CurrentDataFeCAMUpdate": Case(
        "masks",
        scenario="class",
        build=_naive_with(lambda m: _p("CurrentDataFeCAMUpdate")(), scenario_model=_fecam),
    ),
    "MemoryFeCAMUpdate": Case(
        "masks",
        scenario="class",
        build=_naive_with(lambda m: _p("MemoryFeCAMUpdate")(mem_size=30), scenario_model=_fecam),
    ),
    "FeCAMOracle": Case(
        "masks",
        scenario="class",
        build=_naive_with(lambda m: _p("FeCAMOracle")(), scenario_model=_fecam),
    ),
    "CWRStarPlugin": Case("masks", scenario="class", build=_cwr_plugin_first),
    "GenerativeReplayPlugin": Case(
        "masks", scenario="class_images", build=_generative_replay_plugins
    ),
    "TrainGeneratorAfterExpPlugin": Case(
        "masks", scenario="class_images", build=_generative_replay_plugins
    ),
    "EarlyStoppingPlugin": Case("masks", build=_early_stopping, eval_streams=True),
    "EvaluationPlugin": Case("masks", build=_evaluation_plugin),
    "LRSchedulerPlugin": Case("masks", build=_lr_scheduler),
    "MaskedCrossEntropy": Case("masks", build=_criterion_plugin("MaskedCrossEntropy", TaskMLP)),
    "PackNetPlugin": Case(
        "refused",
        reason="PackNetPlugin.*zero gradients",
        build=lambda pl: _t("Naive")(
            plugins=[_packnet_plugin(), *pl], **_common(_packnet_model(), epochs=2)
        ),
    ),
    # --- refused
    "CoPEPlugin": Case(
        "refused",
        scenario="class",
        reason="CoPEPlugin",
        build=_naive_with(
            lambda m: _p("CoPEPlugin")(mem_size=30, n_classes=N_CLASSES, p_size=HIDDEN),
            scenario_model=lambda: ClassMLP(HIDDEN),
        ),
    ),
    "GDumbPlugin": Case(
        "refused",
        reason="GDumbPlugin.*re-initialises",
        build=_naive_with(lambda m: _p("GDumbPlugin")(mem_size=30), scenario_model=TaskMLP),
    ),
    "FromScratchTrainingPlugin": Case(
        "refused",
        reason="FromScratchTrainingPlugin.*re-initialises",
        build=_naive_with(lambda m: _p("FromScratchTrainingPlugin")(), scenario_model=TaskMLP),
    ),
    "ICaRLLossPlugin": Case(
        "refused",
        scenario="class",
        reason="ICaRLLossPlugin",
        build=_criterion_plugin("ICaRLLossPlugin", ClassMLP),
    ),
    # --- not run here
    "BiCPlugin": Case("skipped", reason=_bic_skip_reason() or "BiCPlugin: no skip reason any more"),
}


def _packnet_plugin() -> Any:
    from avalanche.models.packnet import PackNetPlugin

    return PackNetPlugin(post_prune_epochs=1, prune_proportion=0.5)


# ------------------------------------------------------------------- the lists are complete
def _shipped_strategies() -> set[str]:
    """Every strategy class in ``avalanche.training``, ``avalanche.training.supervised`` and
    the modules of that package, named as in :data:`STRATEGIES`."""
    import avalanche.training as training
    import avalanche.training.supervised as supervised

    found: dict[str, type] = {}
    namespaces = [training, supervised]
    for info in pkgutil.iter_modules(supervised.__path__):
        namespaces.append(importlib.import_module(f"avalanche.training.supervised.{info.name}"))
    exported = {
        obj
        for namespace in (training, supervised)
        for obj in vars(namespace).values()
        if inspect.isclass(obj)
    }
    for namespace in namespaces:
        for value in vars(namespace).values():
            obj = getattr(value, "__wrapped__", value)  # @deprecated classes (OnlineNaive)
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseTemplate)
                and obj.__module__.startswith("avalanche.training.supervised.")
            ):
                module = obj.__module__.rsplit(".", 1)[1]
                key = obj.__name__ if obj in exported else f"{module}.{obj.__name__}"
                found[key] = obj
    return set(found)


#: Classes of ``avalanche.training.plugins`` that are not plugins to compose.
NOT_PLUGINS = {
    "SupervisedPlugin": "the base class of plugins",
    "PPPloss": "CoPE's loss, not a plugin (covered by CoPEPlugin and the CoPE strategy)",
}


def _shipped_plugins() -> set[str]:
    """Every class of ``avalanche.training.plugins``, every plugin class (losses that are
    plugins) of ``avalanche.training``, and ``PackNetPlugin`` (``avalanche.models.packnet``)."""
    import avalanche.training as training

    names = {name for name in dir(avl_plugins) if inspect.isclass(getattr(avl_plugins, name))}
    for name in dir(training):
        obj = getattr(training, name)
        if inspect.isclass(obj) and issubclass(obj, BasePlugin):
            names.add(name)
    return (names - set(NOT_PLUGINS)) | {"PackNetPlugin"}


def test_the_matrix_lists_every_strategy_avalanche_ships() -> None:
    shipped = _shipped_strategies()
    assert shipped - set(STRATEGIES) == set(), "strategies missing from the matrix"
    assert set(STRATEGIES) - shipped == set(), "matrix rows that Avalanche does not ship"


def test_the_matrix_lists_every_plugin_avalanche_ships() -> None:
    shipped = _shipped_plugins()
    assert shipped - set(PLUGINS) == set(), "plugins missing from the matrix"
    assert set(PLUGINS) - shipped == set(), "matrix rows that Avalanche does not ship"


# ------------------------------------------------------------------------------ the checks
def _assert_masks_exactly(case: Case, benchmark: Any) -> None:
    raw, masked = GradRecorder(), GradRecorder()
    spg = SPGPlugin(warn_optimizer=False)
    assert case.build is not None
    strategy = case.build([raw, spg])
    strategy.plugins.append(masked)  # after the strategy's own plugins, evaluator and clock
    train_kwargs: dict[str, Any] = {}
    if case.eval_streams:
        train_kwargs["eval_streams"] = [benchmark.test_stream]
    strategy.train(benchmark.train_stream[0], **train_kwargs)
    strategy.eval(benchmark.test_stream)
    importance = {n: v.clone() for n, v in spg.importance.items()}
    scale = spg.head_scale
    assert importance and 0.0 < scale < 1.0
    assert max(float(v.max()) for v in importance.values()) > 0.0
    strategy.train(benchmark.train_stream[1], **train_kwargs)
    assert spg.seen_tasks  # the importance pass ran after both experiences
    assert len(raw.records) == 2 and len(raw.records[1]) == len(masked.records[1]) > 0
    # heads by name, whether trainable or not (LFL freezes the last head after training it)
    heads = default_head_names(strategy.model)
    features_checked = heads_checked = 0
    changed = False
    for before, after in zip(raw.records[1], masked.records[1]):
        for name, grad in before.items():
            if grad is None:
                assert after.get(name) is None, name
                continue
            if name in heads:
                expected = grad * scale
                heads_checked += 1
            elif name in importance:
                expected = (1 - importance[name]) * grad
                features_checked += 1
            else:  # appeared after the first experience: importance 0, not masked
                expected = grad
            assert torch.equal(after[name], expected), name
            changed = changed or not torch.equal(after[name], grad)
    assert changed, "the mask changed no gradient"
    if case.frozen_features:  # every feature gradient is of a parameter new in this experience
        assert heads_checked > 0 and features_checked == 0
    else:
        assert features_checked > 0


def _assert_refused(case: Case, benchmark: Any) -> None:
    raw = GradRecorder()
    spg = SPGPlugin(warn_optimizer=False)
    assert case.build is not None
    strategy = case.build([raw, spg])
    model = strategy.model
    before = snapshot_params(model)
    experiences = benchmark.train_stream
    target = experiences if type(strategy).__name__ == "JointTraining" else experiences[0]
    with pytest.raises(SPGCompatibilityError, match=case.reason) as info:
        strategy.train(target)
    assert "SPG" in str(info.value)
    assert all(not records for records in raw.records), "a training step ran"
    after = snapshot_params(model)
    # (CoPEPlugin, before SPG in the list, has already swapped the last layer for a wrapper)
    assert all(torch.equal(after[n], v) for n, v in before.items() if n in after), "moved"
    assert spg.importance == {}


def _assert_never_called(case: Case, benchmark: Any) -> None:
    """Avalanche 0.6.0's ``PackNet`` passes ``plugins=[plugins, PackNetPlugin(...)]``: the
    user's list becomes one element that Avalanche skips, so SPG (and every other user plugin)
    never runs. SPG cannot raise from a callback that is never called; ``check_strategy``,
    called directly, says so."""
    raw = GradRecorder()
    spg = SPGPlugin(warn_optimizer=False)
    assert case.build is not None
    strategy = case.build([raw, spg])
    assert [raw, spg] in strategy.plugins  # nested, not spliced in
    with pytest.raises(SPGCompatibilityError, match="PackNet"):
        check_strategy(strategy)
    strategy.train(benchmark.train_stream[0])
    assert raw.records == [] and spg.importance == {} and spg.seen_tasks == []


def _run(case: Case, benchmarks: dict[str, Any]) -> None:
    if case.outcome == "skipped":
        pytest.skip(case.reason)
    benchmark = benchmarks[case.scenario]
    checks = {
        "masks": _assert_masks_exactly,
        "refused": _assert_refused,
        "never called": _assert_never_called,
    }
    checks[case.outcome](case, benchmark)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_masks_exactly_or_is_refused_before_training(
    benchmarks: dict[str, Any], name: str
) -> None:
    _run(STRATEGIES[name], benchmarks)


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_plugin_masks_exactly_or_is_refused_before_training(
    benchmarks: dict[str, Any], name: str
) -> None:
    _run(PLUGINS[name], benchmarks)


# ------------------------------------------------------------------------------- PackNet
def test_packnet_plugin_on_naive_calls_the_user_plugins(benchmarks: dict[str, Any]) -> None:
    """What works instead of the PackNet strategy: ``PackNetPlugin`` with a ``PackNetModel`` on
    ``Naive``: the user's plugins are called and PackNet prunes. (SPG itself does not combine with
    PackNet: the matrix row ``PackNetPlugin``.)"""
    from avalanche.models.packnet import PackNetModel

    probe = GradRecorder()
    model = _packnet_model()
    strategy = _t("Naive")(plugins=[_packnet_plugin(), probe], **_common(model, epochs=2))
    strategy.train(benchmarks["task"].train_stream[0])
    assert isinstance(model, PackNetModel) and model.task_count == 1
    assert probe.records and len(probe.records[0]) > 0
    # task 0 keeps some weights, the pruned ones are released for task 1
    assert set(model.wrappee[1].task_index.unique().tolist()) == {0, 1}
