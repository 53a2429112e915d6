"""The fast importance pass gives the reference loop's importance (``docs/algorithm.md``,
section 5).

``compute_gamma(method="fast")`` shares one forward per minibatch between all heads, runs the
per-head backward passes from the classifier's input (optionally vectorised) and uses larger
minibatches with per-sample weights. Without dropout
its result must equal the straightforward per-head loop's within 1e-5, for several heads, a last
minibatch smaller than the others, several pass batch sizes, the MLP and the AlexNet-like CNN,
and minibatches that mix task labels; its safety nets (a model that post-processes its logits,
a feature parameter inside the classifier, an operation without a batching rule, a model
without task heads) must give the same result too.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.models.utils import avalanche_model_adaptation
from helpers import PlainMLP, TensorDigits, make_digits_benchmark, reference_gamma
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from avalanche_spg.importance_pass import compute_gamma, default_pass_batch_size
from avalanche_spg.models import AlexNetLike, MultiHeadMLP

TOL = 1e-5
REF_MB = 16
N_SAMPLES = 70  # 4 reference minibatches of 16 and a last one of 6
N_TASKS = 5  # digits in 5 tasks of 2 classes; the pass after task 3 has 4 heads


# --------------------------------------------------------------------------------- fixtures
def _images(x: Tensor) -> Tensor:
    """8x8 digits as 3x12x12 images (bilinear upsampling), for the CNN."""
    img = F.interpolate(x.view(-1, 1, 8, 8), size=(12, 12), mode="bilinear", align_corners=False)
    return img.repeat(1, 3, 1, 1).contiguous()


Digits = tuple[Tensor, Tensor]  # the ``digits`` fixture of conftest.py
Trained = tuple[nn.Module, Any]  # a model with 5 trained heads, and its training stream


def _stream(digits: Digits, images: bool) -> Any:
    """Digits in 5 tasks; images for the CNN."""
    benchmark = make_digits_benchmark(N_TASKS, n_train=600, n_test=100, data=digits)
    if not images:
        return benchmark.train_stream
    x, y = digits
    from avalanche.benchmarks import nc_benchmark

    return nc_benchmark(
        TensorDigits(_images(x[:600]), y[:600]),
        TensorDigits(_images(x[600:700]), y[600:700]),
        n_experiences=N_TASKS,
        task_labels=True,
        class_ids_from_zero_in_each_exp=True,
        seed=0,
    ).train_stream


class _Indexed(Dataset):
    """The first ``n`` samples of a dataset, as ``[x, y, task]``."""

    def __init__(self, dataset: Any, n: int) -> None:
        self.items = [dataset[i] for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        x, y, t = self.items[index][:3]
        return x, y, t


def _trained(model: nn.Module, stream: Any, steps: int = 15) -> nn.Module:
    """Create every head and take a few SGD steps per task, so gradients are not those of a
    random network (whose cross-entropy gradients cancel almost entirely)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for experience in stream:
        model.train()
        avalanche_model_adaptation(model, experience)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        loader = torch.utils.data.DataLoader(experience.dataset.train(), batch_size=32)
        for step, (x, y, t) in enumerate(loader):
            if step == steps:
                break
            optimizer.zero_grad()
            F.cross_entropy(model(x, task_labels=int(t[0])), y).backward()
            optimizer.step()
    model.zero_grad(set_to_none=True)
    return model


# The trained models are built once per module and shared by its tests: the pass leaves a model
# as it found it (which these tests check), and a test that changes one works on a copy.
@pytest.fixture(scope="module")
def mlp(digits: Digits) -> Trained:
    torch.set_num_threads(1)  # module fixtures run before the per-test setup of conftest.py
    torch.manual_seed(0)
    stream = _stream(digits, images=False)
    return _trained(MultiHeadMLP(64, (32, 24)), stream), stream


@pytest.fixture(scope="module")
def alexnet(digits: Digits) -> Trained:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stream = _stream(digits, images=True)
    return _trained(AlexNetLike((3, 12, 12), drop1=0.0, drop2=0.0, hidden=48), stream), stream


@pytest.fixture
def trained(kind: str, request: pytest.FixtureRequest) -> Trained:
    """The module's ``mlp`` or ``alexnet``, as the test's ``kind`` parameter says."""
    value: Trained = request.getfixturevalue(kind)
    return value


def _features(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not n.startswith("classifier.")}


def _gamma(
    model: nn.Module,
    dataset: Dataset,
    current: list[int],
    previous: list[int],
    features: dict[str, nn.Parameter] | None = None,
    **kwargs: Any,
) -> dict[str, Tensor]:
    return compute_gamma(
        model,
        dataset,
        _features(model) if features is None else features,
        current,
        previous,
        device="cpu",
        reference_batch_size=REF_MB,
        **kwargs,
    )


def _max_diff(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        assert actual[name].dtype == torch.float32, name
    return max(float((actual[n] - expected[n]).abs().max()) for n in expected)


def _assert_not_trivial(gamma: dict[str, Tensor]) -> None:
    """Every tensor got a real importance: the comparison is not between zeros."""
    for name, value in gamma.items():
        assert float(value.max()) > 0.3, name


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", ["mlp", "alexnet"])
@pytest.mark.parametrize("pass_batch_size", [REF_MB, 23, 48, 128])
def test_fast_equals_reference_loop(kind: str, pass_batch_size: int, trained: Trained) -> None:
    model, stream = trained
    dataset = _Indexed(stream[3].dataset.train(), N_SAMPLES)
    reference = _gamma(model, dataset, [3], [0, 1, 2], method="reference")
    _assert_not_trivial(reference)
    fast = _gamma(model, dataset, [3], [0, 1, 2], method="fast", pass_batch_size=pass_batch_size)
    assert _max_diff(fast, reference) <= TOL


@pytest.mark.parametrize("kind", ["mlp", "alexnet"])
def test_fast_at_the_reference_batch_size_is_bit_for_bit_the_loop(
    kind: str, trained: Trained
) -> None:
    """Same minibatches, same kernels: only the forward sharing differs, which changes no
    arithmetic."""
    model, stream = trained
    dataset = _Indexed(stream[3].dataset.train(), N_SAMPLES)
    reference = _gamma(model, dataset, [3], [0, 1, 2], method="reference")
    fast = _gamma(model, dataset, [3], [0, 1, 2], method="fast", pass_batch_size=REF_MB)
    assert _max_diff(fast, reference) == 0.0


@pytest.mark.parametrize("kind", ["mlp", "alexnet"])
def test_fast_equals_the_independent_spec_loop(kind: str, trained: Trained) -> None:
    """Against ``helpers.reference_gamma`` (written from ``docs/algorithm.md``, batch means)."""
    model, stream = trained
    dataset = _Indexed(stream[3].dataset.train(), N_SAMPLES)
    expected = reference_gamma(model, dataset, [0, 1, 2], 3, REF_MB, _features(model))
    fast = _gamma(model, dataset, [3], [0, 1, 2], method="fast")
    assert _max_diff(fast, expected) <= TOL


@pytest.mark.parametrize("kind", ["mlp", "alexnet"])
@pytest.mark.parametrize("pass_batch_size", [REF_MB, 37])
def test_vectorized_heads_equal_reference_loop(
    kind: str, pass_batch_size: int, trained: Trained
) -> None:
    model, stream = trained
    dataset = _Indexed(stream[3].dataset.train(), N_SAMPLES)
    reference = _gamma(model, dataset, [3], [0, 1, 2], method="reference")
    fast = _gamma(
        model,
        dataset,
        [3],
        [0, 1, 2],
        method="fast",
        pass_batch_size=pass_batch_size,
        vectorize_heads=True,
    )
    assert _max_diff(fast, reference) <= TOL


class _MixedTasks(Dataset):
    """Samples of tasks 2 and 3 interleaved, so every minibatch mixes task labels."""

    def __init__(self, stream: Any) -> None:
        a = _Indexed(stream[2].dataset.train(), 30).items
        b = _Indexed(stream[3].dataset.train(), 31).items
        self.items = [item for pair in zip(a, b) for item in pair] + b[len(a) :]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


@pytest.mark.parametrize("kind", ["mlp", "alexnet"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_minibatches_with_mixed_task_labels(kind: str, vectorize: bool, trained: Trained) -> None:
    model, stream = trained
    dataset = _MixedTasks(stream)
    assert {int(dataset[i][2]) for i in range(4)} == {2, 3}
    reference = _gamma(model, dataset, [2, 3], [0, 1], method="reference")
    _assert_not_trivial(reference)
    for pass_batch_size in (REF_MB, 25):
        fast = _gamma(
            model,
            dataset,
            [2, 3],
            [0, 1],
            pass_batch_size=pass_batch_size,
            vectorize_heads=vectorize,
        )
        assert _max_diff(fast, reference) <= TOL


def test_first_task_single_head_and_shards_add_up(mlp: Trained) -> None:
    """One head (k = 0), and a two-shard pass whose per-head sums are added by the reducer."""
    model, stream = mlp
    dataset = _Indexed(stream[0].dataset.train(), N_SAMPLES)
    reference = _gamma(model, dataset, [0], [], method="reference")
    assert _max_diff(_gamma(model, dataset, [0], [], pass_batch_size=50), reference) <= TOL

    # Shard 1 first computes its sums; shard 0's reducer adds them (an all-reduce of two ranks).
    shard_sums: list[list[Tensor]] = []
    _gamma(
        model,
        dataset,
        [0],
        [],
        indices=list(range(1, N_SAMPLES, 2)),
        total_samples=N_SAMPLES,
        grad_reducer=lambda sums: shard_sums.append([s.clone() for s in sums]),
    )

    def add_other_shard(sums: list[Tensor]) -> None:
        for mine, other in zip(sums, shard_sums.pop(0)):
            mine.add_(other)

    sharded = _gamma(
        model,
        dataset,
        [0],
        [],
        indices=list(range(0, N_SAMPLES, 2)),
        total_samples=N_SAMPLES,
        grad_reducer=add_other_shard,
    )
    assert _max_diff(sharded, reference) <= TOL


class _ScaledLogits(MultiTaskModule):
    """Post-processes the classifier's output: the captured features alone do not give the
    model's logits, so the fast path must notice and fall back."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 24), nn.ReLU())
        self.classifier = MultiHeadClassifier(24, initial_out_features=2)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return 3.0 * self.classifier(self.features(x), task_label) + 0.5


class _NoVmapRule(torch.autograd.Function):
    """An identity whose backward doubles the gradient, with no batching rule for vmap."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return 2.0 * grad


class _CustomFunctionMLP(MultiHeadMLP):
    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.classifier(_NoVmapRule.apply(self.features(x)), task_label)


@pytest.mark.parametrize("model_cls", [_ScaledLogits, _CustomFunctionMLP])
@pytest.mark.parametrize("vectorize", [False, True])
def test_safety_nets_give_the_reference(model_cls: type, vectorize: bool, digits: Digits) -> None:
    torch.manual_seed(1)
    stream = _stream(digits, images=False)
    model = model_cls() if model_cls is _ScaledLogits else model_cls(64, (32,))
    model = _trained(model, stream)
    dataset = _Indexed(stream[3].dataset.train(), N_SAMPLES)
    reference = _gamma(model, dataset, [3], [0, 1, 2], method="reference")
    _assert_not_trivial(reference)
    fast = _gamma(model, dataset, [3], [0, 1, 2], pass_batch_size=32, vectorize_heads=vectorize)
    assert _max_diff(fast, reference) <= TOL


def test_feature_parameter_inside_the_classifier_still_gets_its_gradient(mlp: Trained) -> None:
    """A user may call part of the classifier a feature: the tap at the classifier's input
    cannot reach it, so the fast path must not use it."""
    model, stream = mlp
    dataset = _Indexed(stream[3].dataset.train(), N_SAMPLES)
    features = dict(_features(model))
    features["classifier.classifiers.3.classifier.weight"] = dict(model.named_parameters())[
        "classifier.classifiers.3.classifier.weight"
    ]
    reference = _gamma(model, dataset, [3], [0, 1, 2], features=features, method="reference")
    fast = _gamma(model, dataset, [3], [0, 1, 2], features=features, pass_batch_size=32)
    assert float(reference["classifier.classifiers.3.classifier.weight"].max()) > 0.3
    assert _max_diff(fast, reference) <= TOL


def test_model_without_task_heads(digits: Digits) -> None:
    torch.manual_seed(2)
    model = PlainMLP(hidden=24)
    x, y = digits
    dataset = TensorDigits(x[:N_SAMPLES], y[:N_SAMPLES])
    reference = _gamma(model, dataset, [0], [], method="reference")
    _assert_not_trivial(reference)
    fast = _gamma(model, dataset, [0], [], pass_batch_size=128)
    assert _max_diff(fast, reference) <= TOL


def test_pass_leaves_no_gradients_and_restores_flags(alexnet: Trained) -> None:
    model, stream = copy.deepcopy(alexnet[0]), alexnet[1]  # its flags are changed below
    model.eval()
    model.fc[0].train()
    flags = {n: m.training for n, m in model.named_modules()}
    dataset = _Indexed(stream[3].dataset.train(), 20)
    _gamma(model, dataset, [3], [0, 1, 2], vectorize_heads=True)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ["mlp", "alexnet"])
def test_heads_in_groups_under_a_memory_budget_give_the_same_bits(
    kind: str, trained: Trained
) -> None:
    """Long streams: the per-head summed gradients (one copy of the feature parameters per
    head) are held for a group of heads at a time, one more forward per minibatch and group;
    each head's sum comes from the same operations, so the result is the same bit for bit."""
    model, stream = trained
    dataset = _Indexed(stream[3].dataset.train(), N_SAMPLES)
    per_head = sum(p.numel() * 4 for p in _features(model).values())  # float32 sums
    forwards: list[int] = []
    hook = model.features.register_forward_pre_hook(lambda m, a: forwards.append(len(a[0])))
    try:
        whole = _gamma(model, dataset, [3], [0, 1, 2], sum_memory_budget=None)
        whole_forwards = sum(forwards)
        _assert_not_trivial(whole)
        for heads_per_group, groups in ((1, 4), (2, 2), (3, 2)):
            forwards.clear()
            grouped = _gamma(
                model, dataset, [3], [0, 1, 2], sum_memory_budget=heads_per_group * per_head + 3
            )
            assert all(torch.equal(grouped[n], whole[n]) for n in whole)
            # every group runs the data through the feature extractor once more
            assert sum(forwards) - whole_forwards == (groups - 1) * N_SAMPLES
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="sum_memory_budget"):
        _gamma(model, dataset, [3], [0, 1, 2], sum_memory_budget=0)


def test_a_last_minibatch_element_that_is_not_task_labels_is_refused(mlp: Trained) -> None:
    """Task labels are a minibatch's last element (as Avalanche reads them): anything that
    cannot be per-sample labels gets an error naming what was found."""
    model, stream = mlp
    items = _Indexed(stream[3].dataset.train(), 8).items

    class _Weights(Dataset):
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, index: int) -> Any:
            x, y, t = items[index]
            return x, y, t, 0.5  # a per-sample weight last: floats are no task labels

    with pytest.raises(ValueError, match="last element.*torch.float"):
        _gamma(model, _Weights(), [3], [0, 1, 2])


def test_default_pass_batch_size_is_a_multiple_of_the_reference(mlp: Trained) -> None:
    assert default_pass_batch_size(64, "cpu") == 128
    assert default_pass_batch_size(48, "cpu") == 96
    assert default_pass_batch_size(200, "cpu") == 200
    assert default_pass_batch_size(64, "cuda") == 512
    assert default_pass_batch_size(48, torch.device("cuda", 0)) == 480
    with pytest.raises(ValueError, match="pass_batch_size"):
        _gamma(
            mlp[0],
            _Indexed(mlp[1][0].dataset.train(), 8),
            [0],
            [],
            pass_batch_size=0,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_equals_reference_on_gpu(alexnet: Trained) -> None:
    model, stream = alexnet
    dataset = _Indexed(stream[3].dataset.train(), N_SAMPLES)
    expected = _gamma(model, dataset, [3], [0, 1, 2], method="reference")
    on_gpu = copy.deepcopy(model).cuda()
    for vectorize in (False, True):
        fast = compute_gamma(
            on_gpu,
            dataset,
            _features(on_gpu),
            [3],
            [0, 1, 2],
            device="cuda",
            reference_batch_size=REF_MB,
            vectorize_heads=vectorize,
        )
        # TF32 may be on for convolutions: a looser bound than the CPU's
        assert _max_diff({n: v.cpu() for n, v in fast.items()}, expected) <= 1e-3


def test_max_over_heads_matches_standardized_importance_with_unusable_heads(
    mlp: Trained,
) -> None:
    """The pass folds ``|z|`` of each head into a running max and applies tanh once; that must
    equal the max over heads of :func:`standardized_importance`, including the
    unusable gradients (NaN, infinite, all zero, constant), which contribute 0."""
    from avalanche_spg.importance import standardized_importance

    model, stream = mlp
    dataset = _Indexed(stream[3].dataset.train(), N_SAMPLES)
    seen: list[list[Tensor]] = []
    poison = {
        0: lambda t: t.fill_(float("nan")),
        1: lambda t: t.zero_(),
        2: lambda t: t.fill_(3.0),
    }

    def spoil_and_record(sums: list[Tensor]) -> None:
        head = len(seen)
        if head < 3:  # heads 0-2: one tensor each made unusable in a different way
            poison[head](sums[head])
        if head == 1:
            sums[3].view(-1)[0] = float("inf")
        seen.append([s.clone() for s in sums])

    gamma = _gamma(model, dataset, [3], [0, 1, 2], grad_reducer=spoil_and_record)
    names = list(_features(model))
    assert len(seen) == 4
    for index, name in enumerate(names):
        per_head = [standardized_importance(sums[index]) for sums in seen]
        expected = torch.stack(per_head).amax(0)
        assert float((gamma[name] - expected).abs().max()) <= 2e-7, name
        assert float(gamma[name].max()) < 1.0
