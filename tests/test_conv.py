"""Low-rank and sketched Conv2d: ops, factorizations, modules, and the backend rewrite."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import panther_fx  # noqa: F401  (registers torch.ops.panther.*)
from panther_fx.backend import last_report, panther_backend
from panther_fx.linalg import as_generator
from panther_fx.linalg.conv import (conv_sketch_factors, conv_svd_factors, conv_weight_from_lowrank,
                                    conv_weight_from_sketch)
from panther_fx.nn import LowRankConv2d, SKConv2d
from panther_fx.ops.conv2d import conv_padding
from panther_fx.passes import TrainingRewriteError, inspect_model, rewrite_graph
from panther_fx.policy import Policy

lowrank_conv2d = torch.ops.panther.lowrank_conv2d
sketched_conv2d = torch.ops.panther.sketched_conv2d


def _full_rank(conv: nn.Conv2d) -> int:
    O, Cg, kh, kw = conv.weight.shape
    return min(O // conv.groups, Cg * kh * kw) * conv.groups


# ---- padding --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding, kernel, dilation, expected", [
    (1, 3, 1, [1, 1]), ((2, 0), 3, 1, [2, 0]), ("valid", 5, 1, [0, 0]), ("same", 3, 1, [1, 1]),
    ("same", 3, 2, [2, 2]), ("same", (2, 4), 1, [1, 2, 0, 1]), ("same", 2, 3, [1, 2, 1, 2]),
])
def test_conv_padding_forms(padding, kernel, dilation, expected):
    assert conv_padding(padding, kernel, 1, dilation) == expected


def test_conv_padding_rejects_same_with_stride():
    with pytest.raises(ValueError, match="strided"):
        conv_padding("same", 3, 2)


# ---- exactness at full rank, for every option ---------------------------------------------------------

_OPTIONS = [  # stride, padding, dilation, groups, bias, kernel
    (s, p, d, g, b, k)
    for s, p, d, g, b, k in itertools.product((1, 2), (0, 1, (1, 2), "same", "valid"), (1, 2), (1, 2),
                                              (True, False), (3, (2, 3)))
    if not (p == "same" and s != 1)
]


@pytest.mark.parametrize("stride, padding, dilation, groups, bias, kernel", _OPTIONS)
def test_full_rank_svd_reproduces_dense_conv(stride, padding, dilation, groups, bias, kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    x = torch.randn(2, 4, 9, 8)
    module = LowRankConv2d.from_dense(conv, _full_rank(conv))
    with torch.no_grad():
        torch.testing.assert_close(module(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_full_rank_svd_honours_padding_mode(padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding="same", padding_mode=padding_mode)
    module = LowRankConv2d.from_dense(conv, _full_rank(conv))
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(module(x), conv(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(module(x[0]), conv(x[0]), atol=1e-5, rtol=1e-5)  # unbatched


# ---- optimality of the truncation -----------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 2])
def test_rank_r_is_the_optimal_truncation_per_group(groups):
    gen = torch.Generator().manual_seed(1)
    K = torch.randn(16, 8 // groups, 3, 3, generator=gen, dtype=torch.float64)
    rank = 6
    V, U = conv_svd_factors(K, rank, groups=groups)
    assert V.shape == (rank, 8 // groups, 3, 3) and U.shape == (16, rank // groups, 1, 1)
    error = torch.linalg.vector_norm(K - conv_weight_from_lowrank(V, U, groups))
    # Eckart–Young per group: the tail singular values of each (O/G, C/G·kh·kw) block are what remains.
    tails = [torch.linalg.svdvals(Kg.reshape(16 // groups, -1))[rank // groups:] for Kg in K.chunk(groups)]
    optimal = torch.cat(tails).norm()
    torch.testing.assert_close(error, optimal, rtol=1e-10, atol=0)


def test_op_matches_reconstructed_kernel_at_low_rank():
    gen = torch.Generator().manual_seed(2)
    K = torch.randn(12, 3, 3, 3, generator=gen)
    V, U = conv_svd_factors(K, 6, groups=2)
    x = torch.randn(2, 6, 10, 10, generator=gen)
    y = lowrank_conv2d(x, V, U.reshape(12, 3), None, [1, 1], [1, 1], [1, 1], 2)  # 2-D U works too
    expected = F.conv2d(x.double(), conv_weight_from_lowrank(V, U, 2).double(), None, 1, 1, 1, 2)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


# ---- sketch ---------------------------------------------------------------------------------------------

def _sketch_reference(x, S1, U1, bias, stride, padding, dilation, groups):
    """float64 Panther SKConv2d, one conv and one channel mix per term and group (no shared code path)."""
    x, S1, U1 = x.double(), S1.double(), U1.double()
    T2, k, O = U1.shape
    Cg, Og = S1.shape[1], O // groups
    outs = []
    for g in range(groups):
        xg = x[:, g * Cg:(g + 1) * Cg]
        yg = 0
        for i in range(T2):
            rows = S1[(g * T2 + i) * k:(g * T2 + i + 1) * k]
            z = F.conv2d(xg, rows, None, stride, padding, dilation)
            yg = yg + torch.einsum("jo,njhw->nohw", U1[i][:, g * Og:(g + 1) * Og], z)
        outs.append(yg / T2)
    y = torch.cat(outs, 1)
    return y if bias is None else y + bias.double()[:, None, None]


@pytest.mark.parametrize("groups, stride, padding, dilation, bias", [
    (1, 1, 1, 1, True), (2, 2, 0, 1, False), (1, 1, 2, 2, True), (4, 1, (1, 0), 1, True),
])
def test_sketched_conv_matches_float64_reference(groups, stride, padding, dilation, bias):
    gen = torch.Generator().manual_seed(3)
    K = torch.randn(16, 8 // groups, 3, 3, generator=gen)
    S1, U1 = conv_sketch_factors(K, 2, 4, groups=groups, generator=as_generator(7))
    b = torch.randn(16, generator=gen) if bias else None
    x = torch.randn(2, 8, 9, 9, generator=gen)
    pad = conv_padding(padding, 3)
    y = sketched_conv2d(x, S1, U1, b, [stride] * 2, pad, [dilation] * 2, groups)
    expected = _sketch_reference(x, S1, U1, b, stride, padding, dilation, groups)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    # The same seed gives the same signs: the module built from the same conv computes the same.
    conv = nn.Conv2d(8, 16, 3, stride, padding, dilation, groups, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(K)
        if bias:
            conv.bias.copy_(b)
    torch.testing.assert_close(SKConv2d.from_dense(conv, 2, 4, seed=7)(x), y)


def test_sketch_is_unbiased():
    gen = torch.Generator().manual_seed(4)
    K = torch.randn(16, 4, 3, 3, generator=gen, dtype=torch.float64)
    draws = 200
    total = sum(conv_weight_from_sketch(*conv_sketch_factors(K, 1, 4, generator=as_generator(s)))
                for s in range(draws))
    one = torch.linalg.vector_norm(conv_weight_from_sketch(*conv_sketch_factors(K, 1, 4, generator=as_generator(0))) - K)
    mean_error = torch.linalg.vector_norm(total / draws - K) / torch.linalg.vector_norm(K)
    # One draw has relative error ≈ √(O/(2Lk)) = √2; the mean of n draws ≈ √2/√n = 0.1.
    assert 0.7 < one / torch.linalg.vector_norm(K) < 2.5
    assert mean_error < 0.2


# ---- op registration: opcheck and gradcheck ------------------------------------------------------------

_OP_CASES = [  # stride, padding (canonical), dilation, groups, bias
    ([1, 1], [1, 1], [1, 1], 1, True), ([2, 1], [0, 1], [1, 2], 2, False), ([1, 1], [0, 1, 1, 2], [1, 1], 2, True),
]


@pytest.mark.parametrize("stride, padding, dilation, groups, bias", _OP_CASES)
def test_lowrank_conv2d_opcheck_and_gradcheck(stride, padding, dilation, groups, bias):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    V = torch.randn(4, 4 // groups, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    U = torch.randn(6, 4 // groups, 1, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    geometry = (stride, padding, dilation, groups)
    if bias:  # opcheck compiles the op several times: two configurations cover schema, fake and autograd
        torch.library.opcheck(lowrank_conv2d, (x, V, U, b, *geometry))
    tensors = (x, V, U) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(lambda *t: lowrank_conv2d(*t[:3], t[3] if bias else None, *geometry), tensors,
                                    fast_mode=True)


@pytest.mark.parametrize("stride, padding, dilation, groups, bias", _OP_CASES)
def test_sketched_conv2d_opcheck_and_gradcheck(stride, padding, dilation, groups, bias):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    S1 = torch.randn(groups * 2 * 2, 4 // groups, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    U1 = torch.randn(2, 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    geometry = (stride, padding, dilation, groups)
    if groups > 1:
        torch.library.opcheck(sketched_conv2d, (x, S1, U1, b, *geometry))
    tensors = (x, S1, U1) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(lambda *t: sketched_conv2d(*t[:3], t[3] if bias else None, *geometry), tensors,
                                    fast_mode=True)


def test_lowrank_conv2d_double_backward():
    gen = torch.Generator().manual_seed(9)
    tensors = [torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
               for shape in ((1, 4, 5, 4), (4, 2, 3, 3), (6, 2, 1, 1), (6,))]
    assert torch.autograd.gradgradcheck(
        lambda x, V, U, b: lowrank_conv2d(x, V, U, b, [1, 1], [0, 1, 1, 2], [1, 1], 2), tensors, fast_mode=True)


def test_op_errors_name_the_shapes():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(RuntimeError, match="groups=2 expect 6"):
        lowrank_conv2d(x, torch.randn(4, 3, 3, 3), torch.randn(6, 2), None, [1, 1], [0, 0], [1, 1], 2)
    with pytest.raises(RuntimeError, match="G·2L·k"):
        sketched_conv2d(x, torch.randn(5, 4, 3, 3), torch.randn(2, 2, 6), None, [1, 1], [0, 0], [1, 1], 1)


# ---- modules --------------------------------------------------------------------------------------------

def test_fresh_modules_keep_conv2d_output_scale():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 12, 12)
    dense = nn.Conv2d(64, 128, 3, padding=1)(x).std()
    lowrank = LowRankConv2d(64, 128, 3, padding=1, rank=32, seed=1)(x).std()
    sketched = SKConv2d(64, 128, 3, padding=1, num_terms=2, low_rank=8, seed=1)(x).std()
    for std in (lowrank, sketched):
        assert 0.75 < (std / dense).item() < 1.33


def test_modules_train_and_report_shapes():
    lowrank = LowRankConv2d(8, 16, 3, padding=1, groups=2, rank=8, seed=0)
    sketched = SKConv2d(8, 16, 3, padding=1, groups=2, num_terms=1, low_rank=4, seed=0)
    assert lowrank.V.shape == (8, 4, 3, 3) and lowrank.U.shape == (16, 4, 1, 1)
    assert sketched.S1s.shape == (2 * 2 * 4, 4, 3, 3) and sketched.U1s.shape == (2, 4, 16)
    assert [n for n, _ in sketched.named_parameters()] == ["S1s", "bias"]  # the signs are a buffer
    x = torch.randn(2, 8, 6, 6)
    for module in (lowrank, sketched):
        module(x).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        with torch.no_grad():
            torch.testing.assert_close(module(x), F.conv2d(x, module.dense_weight(), module.bias, 1, 1, 1, 2))
    with pytest.raises(ValueError, match="multiple of groups"):
        LowRankConv2d(8, 16, 3, groups=2, rank=5)


@pytest.mark.parametrize("rank, message", [(0, "rank=0 must be an integer >= 1"), (-1, "rank=-1 must be"),
                                           (7, "rank=7 must be a multiple of groups=2"),
                                           (1000, r"rank=1000 exceeds groups · min\(O/G, C/G·kh·kw\) = 6")])
def test_lowrank_from_dense_rejects_bad_rank(rank, message):
    # used to clamp silently: 0 and -1 gave rank 1 (per group), 1000 the full rank
    with pytest.raises(ValueError, match=rf"LowRankConv2d.from_dense: {message}"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 6, 3, groups=2), rank)


@pytest.mark.parametrize("num_terms, low_rank, message", [(0, 4, "num_terms=0"), (1, 0, "low_rank=0")])
def test_sketch_from_dense_rejects_bad_sizes(num_terms, low_rank, message):
    with pytest.raises(ValueError, match=rf"SKConv2d.from_dense: {message} must be an integer >= 1"):
        SKConv2d.from_dense(nn.Conv2d(4, 6, 3), num_terms, low_rank)


def test_modules_compile_train_and_export():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    for module in (LowRankConv2d(8, 16, 3, padding="same", groups=2, rank=8, seed=0),
                   SKConv2d(8, 16, 3, stride=2, padding=1, num_terms=1, low_rank=4, seed=0)):
        expected = module(x)
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        y = compiled(x)
        torch.testing.assert_close(y, expected)
        y.sum().backward()  # the op's autograd formula, traced by AOTAutograd
        grads = [p.grad.clone() for p in module.parameters()]
        module.zero_grad()
        expected.sum().backward()
        for got, want in zip(grads, (p.grad for p in module.parameters())):
            torch.testing.assert_close(got, want)
        exported = torch.export.export(module, (x,))
        torch.testing.assert_close(exported.module()(x), expected)


# ---- backend rewrite ------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, "same", groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.layer1 = Block(16, 16, 1)
        self.layer2 = Block(16, 32, 2, groups=2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _trained_like(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, eval mode, frozen weights (what the backend is for)."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval().requires_grad_(False)


def _compile(model, policy, **options):
    return torch.compile(model, backend=panther_backend, fullgraph=True, options={"policy": policy, **options})


FULL_RANK = {"defaults": {"method": "svd", "rank": 0.9999, "force": True}}


def test_resnet_full_rank_rewrite_is_exact_without_graph_breaks():
    from torch._dynamo.utils import counters

    model = _trained_like(TinyResNet())
    x = torch.randn(2, 3, 16, 16)
    compiled = _compile(model, FULL_RANK, use_inductor=False)
    y = compiled(x)
    report = last_report()
    convs = [r for r in report if r.op == "conv2d"]
    assert len(convs) == 6 and all(r.status == "rewritten" for r in convs), report.table()
    assert not counters["graph_break"]
    torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-4)
    with torch.compiler.set_stance("fail_on_recompile"):
        torch.testing.assert_close(compiled(x), y)


def test_resnet_inductor_matches_eager_rewritten_graph():
    model = _trained_like(TinyResNet())
    policy = {"defaults": {"method": "svd", "rank": 0.5}}
    x = torch.randn(2, 3, 16, 16)
    eager = _compile(model, policy, use_inductor=False)(x)
    rows = [r for r in last_report() if r.op == "conv2d" and r.status == "rewritten"]
    assert rows and all(r.rel_error > 0 for r in rows)  # a real approximation, not the identity
    torch._dynamo.reset()
    inductor = _compile(model, policy)(x)
    torch.testing.assert_close(inductor, eager, atol=1e-4, rtol=1e-4)


def test_rewritten_graph_calls_the_panther_ops():
    seen = {}
    policy = Policy.load({"defaults": {"method": "svd", "rank": 0.5}, "rule": [
        {"match": "layer2.conv1", "method": "sketch", "num_terms": 1, "low_rank": 4}]})

    def backend(gm, example_inputs):
        rewrite_graph(gm, example_inputs, policy)
        seen["targets"] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        return gm.forward

    torch.compile(_trained_like(TinyResNet()), backend=backend, fullgraph=True)(torch.randn(1, 3, 8, 8))
    targets = seen["targets"]
    assert targets.count(torch.ops.panther.sketched_conv2d.default) == 1
    assert targets.count(torch.ops.panther.lowrank_conv2d.default) == 5
    assert torch.conv2d not in targets


def test_padding_mode_and_transposed_convs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

        def forward(self, x):
            return self.up(self.reflect(x))

    model = Net().eval().requires_grad_(False)
    x = torch.randn(2, 8, 6, 6)
    y = _compile(model, FULL_RANK, use_inductor=False)(x)
    rows = {r.path: r for r in last_report()}
    assert rows["reflect"].status == "rewritten"  # the F.pad stays in the graph, so the rewrite is exact
    assert rows["up"].status == "dense" and "transposed" in rows["up"].reason
    torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-4)


def test_functional_conv_on_another_modules_kernel_stays_dense():
    """A rule keeping 'conv' dense must protect its kernel where the parent calls F.conv2d on it too (the
    defaults factorized that call: error 1.3); the linear pass already refused the same for F.linear."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):  # one kernel at two scales
            return self.conv(x) + F.conv2d(x, self.conv.weight, self.conv.bias, stride=2, padding=1).mean()

    model = Net().eval().requires_grad_(False)
    x = torch.randn(1, 16, 8, 8)
    policy = {"defaults": {"method": "svd", "rank": 0.25}, "rule": [{"match": "conv", "method": "dense"}]}
    y = _compile(model, policy, use_inductor=False)(x)
    torch.testing.assert_close(y, model(x))
    rows = {r.path: r for r in last_report()}
    assert rows[""].status == "dense" and "F.conv2d on the parameter of 'conv'" in rows[""].reason


def test_one_element_stride_padding_and_dilation_are_pairs():
    """nn.Conv2d accepts stride=(2,), padding=(1,): the pass crashed the compile on them, even with no policy."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, stride=(2,), padding=(1,), dilation=(1,))).eval().requires_grad_(False)
    x = torch.randn(2, 8, 9, 9)
    y = _compile(model, FULL_RANK, use_inductor=False)(x)
    assert last_report()[0].status == "rewritten"
    torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-4)


def test_grouped_sketch_above_break_even_stays_dense_with_reason():
    model = nn.Sequential(nn.Conv2d(32, 32, 3, groups=4)).eval().requires_grad_(False)
    policy = {"defaults": {"method": "sketch", "num_terms": 1, "low_rank": 4}}
    _compile(model, policy, use_inductor=False)(torch.randn(1, 32, 8, 8))
    (row,) = last_report()
    # The policy's 2Lk(I + O) = 8·(72 + 32) < 2304, but per group the sketch stores 4·8·72 + 8·32 = 2560.
    assert row.status == "dense" and "groups=4" in row.reason and "2560" in row.reason


def test_trainable_conv_weights_are_refused():
    model = nn.Sequential(nn.Conv2d(16, 16, 3))
    with pytest.raises(Exception) as info:
        _compile(model, {"defaults": {"method": "svd", "rank": 4}}, use_inductor=False)(torch.randn(1, 16, 8, 8))
    assert isinstance(info.value, TrainingRewriteError) or "TrainingRewriteError" in repr(info.value)


def test_inspect_model_reports_convs():
    report = inspect_model(TinyResNet(), Policy.load({"defaults": {"method": "svd", "rank": 0.25}}))
    convs = {r.path: r for r in report if r.op == "conv2d"}
    assert set(convs) == {"stem", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2",
                          "layer2.down.0"}
    assert convs["layer1.conv1"].status == "rewritten" and convs["layer1.conv1"].rank == 4


@pytest.mark.cuda
def test_ops_on_cuda_match_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # on by default for cuDNN convolutions
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 8, 12, 12, generator=gen)
    V, U = conv_svd_factors(torch.randn(16, 4, 3, 3, generator=gen), 8, groups=2)
    S1, U1 = conv_sketch_factors(torch.randn(16, 4, 3, 3, generator=gen), 1, 4, groups=2, generator=as_generator(0))
    b = torch.randn(16, generator=gen)
    for op, first, mix in ((lowrank_conv2d, V, U), (sketched_conv2d, S1, U1)):
        args = ([1, 1], [1, 1], [1, 1], 2)
        expected = op(x, first, mix, b, *args)
        got = op(x.cuda(), first.cuda(), mix.cuda(), b.cuda(), *args)
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
        torch.library.opcheck(op, (x.cuda(), first.cuda(), mix.cuda(), b.cuda(), *args))


@pytest.mark.cuda
@pytest.mark.parametrize("cls, kwargs", [(LowRankConv2d, {"rank": 4}), (SKConv2d, {"num_terms": 1, "low_rank": 2})])
def test_seeded_layer_built_on_cuda_equals_the_cpu_one(cls, kwargs):
    # The seed's CPU generator draws the initial weights; building on CUDA used to draw there and raise.
    on_cpu = cls(4, 8, 3, padding=1, seed=3, **kwargs)
    on_cuda = cls(4, 8, 3, padding=1, device="cuda", seed=3, **kwargs)
    for (name, expected), got in zip(on_cpu.state_dict().items(), on_cuda.state_dict().values()):
        assert got.device.type == "cuda", name
        torch.testing.assert_close(got.cpu(), expected)
